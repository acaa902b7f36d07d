"""Copy the first N utterances of a data directory's split into the shipped model's folder as the
``train_calib`` subset (fairseq wants training splits named train*) (a fbank zip + manifest in make_corpus.py's layout). The demo and the fairseq
walkthrough calibrate on it, so no test utterance is ever used for calibration.

    .venv/bin/python tools/ship_calib_subset.py --data /work/s2t_work/data --split dev --num 32
"""
from __future__ import annotations

import argparse
import csv
import zipfile
from pathlib import Path

ASSET = Path(__file__).resolve().parents[1] / "qswap" / "assets" / "s2t_demo"


def read_rows(data: Path, split: str) -> list[dict]:
    with open(data / f"{split}.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def feature_bytes(data: Path, audio: str) -> bytes:
    name, offset, length = audio.rsplit(":", 2)
    with open(data / name, "rb") as f:
        f.seek(int(offset))
        return f.read(int(length))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--out", type=Path, default=ASSET)
    p.add_argument("--name", default="train_calib")
    args = p.parse_args()
    rows = read_rows(args.data, args.split)[: args.num]
    zname = f"fbank80_{args.name}.zip"
    with zipfile.ZipFile(args.out / zname, "w", zipfile.ZIP_STORED) as zf:
        for row in rows:  # fixed timestamps: byte-identical zips
            info = zipfile.ZipInfo(f"{row['id']}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, feature_bytes(args.data, row["audio"]))
    with zipfile.ZipFile(args.out / zname) as zf:
        where = {i.filename[:-4]: f"{zname}:{i.header_offset + 30 + len(i.filename.encode())}:{i.file_size}"
                 for i in zf.infolist()}
    with open(args.out / f"{args.name}.tsv", "w", encoding="utf-8") as f:
        f.write("id\taudio\tn_frames\ttgt_text\tspeaker\n")
        for row in rows:
            f.write(f"{row['id']}\t{where[row['id']]}\t{row['n_frames']}\t{row['tgt_text']}\t{row['speaker']}\n")
    print(f"wrote {len(rows)} utterances to {args.out / zname} and {args.name}.tsv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
