"""Copy the first N utterances of a data directory's split into the shipped model's folder as the
``train_calib`` subset (fairseq wants training splits named train*) (a fbank zip + manifest in make_corpus.py's layout). The demo and the fairseq
walkthrough calibrate on it, so no test utterance is ever used for calibration.

    .venv/bin/python tools/ship_calib_subset.py --data /work/s2t_work/data --split dev --num 32
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ASSET = REPO / "qswap" / "assets" / "s2t_demo"

from qswap.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from tools.tool_cli import positive_int  # noqa: E402


def read_rows(data: Path, split: str) -> list[dict]:
    with open(data / f"{split}.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def feature_bytes(data: Path, audio: str) -> bytes:
    name, offset, length = audio.rsplit(":", 2)
    with open(data / name, "rb") as f:
        f.seek(int(offset))
        data_bytes = f.read(int(length))
    if len(data_bytes) != int(length):
        raise SystemExit(f"ship_calib_subset: {data / name} holds {len(data_bytes)} of the {length} bytes at offset "
                         f"{offset} its manifest names; nothing written")
    return data_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--num", type=positive_int, default=32, help="utterances (1 or more; default 32)")
    p.add_argument("--out", type=Path, default=ASSET)
    p.add_argument("--name", default="train_calib")
    args = p.parse_args(argv)
    if not (args.data / f"{args.split}.tsv").is_file():
        p.error(f"{args.data / (args.split + '.tsv')} does not exist")
    rows = read_rows(args.data, args.split)
    if len(rows) < args.num:
        p.error(f"--num {args.num}: {args.split}.tsv has {len(rows)} utterances")
    rows = rows[: args.num]
    try:  # every feature read before anything is written: a missing zip leaves the shipped files as they were
        features = [feature_bytes(args.data, row["audio"]) for row in rows]
    except OSError as exc:
        raise SystemExit(f"ship_calib_subset: {exc}; nothing written") from None
    zname = f"fbank80_{args.name}.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for row, data in zip(rows, features):  # fixed timestamps: byte-identical zips
            zf.writestr(zipfile.ZipInfo(f"{row['id']}.npy", date_time=(1980, 1, 1, 0, 0, 0)), data)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as zf:
        where = {i.filename[:-4]: f"{zname}:{i.header_offset + 30 + len(i.filename.encode())}:{i.file_size}"
                 for i in zf.infolist()}
    manifest = "id\taudio\tn_frames\ttgt_text\tspeaker\n" + "".join(
        f"{row['id']}\t{where[row['id']]}\t{row['n_frames']}\t{row['tgt_text']}\t{row['speaker']}\n" for row in rows)
    atomic_write_bytes(args.out / zname, buffer.getvalue())
    atomic_write_text(args.out / f"{args.name}.tsv", manifest)
    print(f"wrote {len(rows)} utterances to {args.out / zname} and {args.name}.tsv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
