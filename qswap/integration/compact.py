"""Compact storage of fbank features, for the large evaluation sets shipped with the demo model.

An utterance's (T, 80) log-mel features are stored as each channel's mean and standard
deviation (float32) and int8 codes ``round((x - mean) / (std * step))`` (step 0.08 standard
deviations; the error is at most step / 2 = 0.04 of a channel's std), differenced along time
and LZMA-compressed in a zip: about 0.56 bytes per value instead of 4. The shipped model
normalizes each utterance per channel (``utterance_cmvn``), and the stored mean and std are
exact, so what the model sees moves by at most 0.04 of a unit. An utterance with a value more
than 127 steps (10.2 standard deviations) from its channel's mean keeps its codes as int16
differences instead (no wrap-around); its error bound is the same.

Layout of ``fbank80_<split>.q8.zip``: per utterance ``<id>.codes.npy`` (int8, or int16 for an
outlier utterance; (T, 80), time differences of the codes) and ``<id>.norm.npy`` (float32, (2, 80): mean, std); the step is
written in ``step.npy``. fairseq reads only its own layout, so ``materialize`` writes a fairseq
data directory (float32 ``fbank80_<split>.zip`` and ``<split>.tsv``, next to the model's
config and sentencepiece files) that every qswap command and fairseq-generate read.
"""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from qswap.errors import DataError

STEP = 0.08
_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: byte-identical zips for the same input


def encode(feats: np.ndarray, step: float = STEP) -> tuple[np.ndarray, np.ndarray]:
    """(codes, norm): int8 time differences of the quantized codes, and (mean, std) per channel."""
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(f"compact storage takes (frames, channels) features of at least one frame, got shape "
                        f"{feats.shape}")
    if not (isinstance(step, (int, float, np.floating)) and np.isfinite(step) and step > 0):
        raise DataError(f"the compact step is a positive number of standard deviations, got {step!r}")
    if not np.isfinite(feats).all():
        raise DataError("features with NaN or inf values cannot be stored compactly; check the feature "
                        "extraction of this utterance")
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = feats.mean(0), feats.std(0) + np.float32(1e-5)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):  # a spread beyond float32
        raise DataError("features whose values spread beyond float32's range cannot be stored compactly; check "
                        "the feature extraction of this utterance")
    z = np.round((feats - mean) / (std * step))
    if np.abs(z).max(initial=0) > np.iinfo(np.int16).max // 2:
        raise DataError(f"a feature lies {np.abs(z).max() * step:.1f} standard deviations from its "
                        f"channel's mean; codes at step {step} reach {np.iinfo(np.int16).max // 2} * {step}: "
                        f"store this split with a larger step")
    codes = z.astype(np.int16)
    deltas = np.diff(codes, axis=0, prepend=0).astype(np.int16)  # |codes| <= 16383: no wrap
    narrow = np.abs(codes).max(initial=0) <= 127
    return (deltas.astype(np.int8) if narrow else deltas), np.stack([mean, std]).astype(np.float32)


def decode(deltas: np.ndarray, norm: np.ndarray, step: float = STEP) -> np.ndarray:
    """The float32 (T, 80) features ``encode`` stored."""
    wide = np.dtype(deltas.dtype) == np.int16  # int8 differences wrap, and their sum wraps back
    codes = np.cumsum(deltas, axis=0, dtype=np.int16 if wide else np.int8).astype(np.float32)
    return (codes * (norm[1] * np.float32(step)) + norm[0]).astype(np.float32)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _entry(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = compress
    zf.writestr(info, data)


def pack(data_dir: str | Path, split: str, out_dir: str | Path, step: float = STEP) -> Path:
    """Compact ``data_dir``'s ``<split>`` (a fairseq manifest and its float fbank zip) into
    ``out_dir``: ``fbank80_<split>.q8.zip`` and ``<split>.tsv`` without the audio column."""
    from qswap.io.atomic import atomic_open, atomic_write_text

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rows = _read_manifest(data_dir / f"{split}.tsv")
    target = out_dir / f"fbank80_{split}.q8.zip"
    with atomic_open(target, "wb") as f, zipfile.ZipFile(f, "w") as zf:
        _entry(zf, "step.npy", _npy(np.float32(step)), zipfile.ZIP_STORED)
        for row in rows:
            deltas, norm = encode(_read_features(data_dir, row["audio"]), step)
            _entry(zf, f"{row['id']}.codes.npy", _npy(deltas), zipfile.ZIP_LZMA)
            _entry(zf, f"{row['id']}.norm.npy", _npy(norm), zipfile.ZIP_STORED)
    atomic_write_text(out_dir / f"{split}.tsv", _manifest_text(rows, audio=False))
    return target


MODEL_FILES = ("config.yaml", "spm_unigram200.model", "spm_unigram200.txt")


def materialize(compact_dir: str | Path, split: str, model_dir: str | Path, out_dir: str | Path,
                copy: tuple[str, ...] = MODEL_FILES) -> Path:
    """A fairseq data directory at ``out_dir`` for ``split``: the decoded float32 features, the
    manifest, and ``model_dir``'s files named in ``copy`` (config and sentencepiece files, and
    any other subset's files the caller needs there). Rewritten only when the compact zip changed
    (its size and mtime are recorded). Returns ``out_dir``."""
    compact_dir, model_dir, out_dir = Path(compact_dir), Path(model_dir), Path(out_dir)
    source = compact_dir / f"fbank80_{split}.q8.zip"
    if not source.is_file():
        raise DataError(f"no compact features {source}; the large evaluation sets ship in "
                        f"qswap/assets/s2t_demo/eval_large (tools/make_eval_large.sh rebuilds them)")
    manifest = compact_dir / f"{split}.tsv"
    # the zip, the manifest and the files asked for: a second call asking for more files, or an
    # edited manifest, had been answered with the first call's folder
    stamp = " ".join([f"{source.stat().st_size} {source.stat().st_mtime_ns}",
                      f"{manifest.stat().st_size} {manifest.stat().st_mtime_ns}" if manifest.is_file() else "-",
                      *sorted(copy)]) + "\n"
    done = out_dir / f".{split}.materialized"
    if done.is_file() and done.read_text() == stamp:
        return out_dir
    from qswap.io.atomic import atomic_open, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in copy:
        with atomic_open(out_dir / name, "wb") as f:
            f.write((model_dir / name).read_bytes())
    rows = _read_manifest(compact_dir / f"{split}.tsv")
    zname = f"fbank80_{split}.zip"

    try:
        with zipfile.ZipFile(source) as src:
            step = float(np.load(io.BytesIO(src.read("step.npy"))))
            with atomic_open(out_dir / zname, "wb") as f, zipfile.ZipFile(f, "w") as zf:
                for row in rows:
                    feats = decode(np.load(io.BytesIO(src.read(f"{row['id']}.codes.npy"))),
                                   np.load(io.BytesIO(src.read(f"{row['id']}.norm.npy"))), step)
                    _entry(zf, f"{row['id']}.npy", _npy(feats), zipfile.ZIP_STORED)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # a damaged or edited copy
        raise DataError(f"{source}: cannot read the compact features ({type(exc).__name__}: {exc}); the file is "
                        f"damaged or does not match {manifest.name}: restore qswap/assets/s2t_demo/eval_large "
                        f"from the repository") from None
    with zipfile.ZipFile(out_dir / zname) as zf:  # fairseq reads features at their byte offsets
        where = {i.filename[:-4]: f"{zname}:{i.header_offset + 30 + len(i.filename.encode())}:{i.file_size}"
                 for i in zf.infolist()}
    atomic_write_text(out_dir / f"{split}.tsv", _manifest_text([{**r, "audio": where[r["id"]]} for r in rows]))
    atomic_write_text(done, stamp)
    return out_dir


def _read_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"manifest {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _manifest_text(rows: list[dict], audio: bool = True) -> str:
    cols = ["id", *(["audio"] if audio else []), "n_frames", "tgt_text", "speaker"]
    return "".join("\t".join(r.get(c) or "" for c in cols) + "\n" for r in [dict(zip(cols, cols)), *rows])


def _read_features(data_dir: Path, audio: str) -> np.ndarray:
    """The float features of a manifest ``audio`` field: ``<zip>:<offset>:<length>``, or a ``.npy`` file."""
    parts = audio.rsplit(":", 2)
    try:
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            with open(data_dir / parts[0], "rb") as f:
                f.seek(int(parts[1]))
                return np.load(io.BytesIO(f.read(int(parts[2]))))
        return np.load(data_dir / audio)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read the features of manifest entry {audio!r} in {data_dir} ({type(exc).__name__}: "
                        f"{exc}); compact storage takes fbank features (.npy, or a feature zip's "
                        f"<zip>:<offset>:<length>), not audio") from None
