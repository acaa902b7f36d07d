"""Compact feature storage: the codec's error bound, deterministic packing, the shipped large
evaluation sets (sizes, voices, disjoint sentences), and the float model's WER on the 100-utterance
set read back from compact storage (measured: 71 word errors stored as float32, 72 compact)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qswap.cli import main
from qswap.demo import ASSET, EVAL_LARGE
from qswap.integration import data as fdata
from qswap.integration.compact import STEP, decode, encode, materialize, pack

REPO = Path(__file__).resolve().parents[2]


def _manifest(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:]]


def test_codec_error_is_at_most_half_a_step_of_each_channels_std():
    feats = np.random.default_rng(0).normal(3.0, [0.5 + c / 20 for c in range(80)], (300, 80)).astype(np.float32)
    deltas, norm = encode(feats)
    assert deltas.dtype == np.int8 and norm.shape == (2, 80)
    back = decode(deltas, norm)
    assert np.all(np.abs(back - feats) <= STEP / 2 * norm[1] + 1e-5)
    assert np.all(np.abs(back.mean(0) - feats.mean(0)) <= 0.01 * feats.std(0))


def test_pack_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        pack(ASSET, "train_calib", out)
    assert (a / "fbank80_train_calib.q8.zip").read_bytes() == (b / "fbank80_train_calib.q8.zip").read_bytes()


def test_shipped_large_sets_sizes_voices_and_budget():
    sys.path.insert(0, str(REPO / "tools"))
    from make_corpus import is_heldout

    test, held = _manifest(EVAL_LARGE / "test_large.tsv"), _manifest(EVAL_LARGE / "test_heldout_large.tsv")
    assert len(test) >= 1000 and len(held) >= 600
    voices = {r["speaker"] for r in held}
    assert len(voices) >= 3 and all(is_heldout(*v.split(":", 1)) for v in voices)
    assert not any(is_heldout(*r["speaker"].split(":", 1)) for r in test)
    shipped = {r["tgt_text"] for s in ("test", "test_heldout", "train_calib") for r in _manifest(ASSET / f"{s}.tsv")}
    sentences = [r["tgt_text"] for r in test + held]
    assert len(set(sentences)) == len(sentences) and not set(sentences) & shipped
    assert sum(f.stat().st_size for f in EVAL_LARGE.iterdir()) <= 25e6


def test_materialized_sets_load_in_fairseq(tmp_path):
    out = materialize(EVAL_LARGE, "test_heldout_large", ASSET, tmp_path / "d")
    _, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", out)
    assert len(fdata.load_subset(task, "test_heldout_large")) == len(_manifest(EVAL_LARGE / "test_heldout_large.tsv"))


def test_compact_storage_moves_float_wer_by_at_most_one_word(tmp_path):
    (tmp_path / "c").mkdir()
    pack(ASSET, "test", tmp_path / "c")
    compact = materialize(tmp_path / "c", "test", ASSET, tmp_path / "d")
    errors = {}
    for name, data in (("float32", ASSET), ("compact", compact)):
        assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(data), "--subset", "test",
                     "--json", str(tmp_path / f"{name}.json")]) == 0
        errors[name] = json.loads((tmp_path / f"{name}.json").read_text())["counts"]["word_errors"]
    assert abs(errors["compact"] - errors["float32"]) <= 1, errors


def test_outlier_utterance_keeps_int16_codes_within_the_same_bound():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(500, 80)).astype(np.float32)
    feats[7, 3] = 40.0  # about 240 steps of its channel's std
    deltas, norm = encode(feats)
    assert deltas.dtype == np.int16
    back = decode(deltas, norm)
    assert np.all(np.abs(back - feats) <= norm[1] * STEP / 2 * 1.001)
    assert encode(rng.normal(size=(50, 80)).astype(np.float32))[0].dtype == np.int8


def test_non_finite_features_are_refused_with_a_data_error():
    from qswap.errors import DataError

    feats = np.zeros((20, 80), dtype=np.float32)
    feats[3, 4] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        encode(feats)


@pytest.mark.parametrize("feats, step, said", [
    (np.zeros((0, 80), np.float32), STEP, "at least one frame"),
    (np.zeros(80, np.float32), STEP, "at least one frame"),
    (np.zeros((4, 80), np.float32), 0.0, "positive number"),
    (np.zeros((4, 80), np.float32), float("nan"), "positive number"),
    (np.array([[3e38] * 80, [-3e38] * 80], np.float32), STEP, "spread beyond float32"),
], ids=["no_frame", "1-d", "step_0", "step_nan", "overflow"])
def test_features_the_codec_cannot_store_are_data_errors(feats, step, said):
    """They had been stored and decoded to NaN or garbage (a step of 0: 'nan standard deviations')."""
    from qswap.errors import DataError

    with pytest.raises(DataError, match=said):
        encode(feats, step)


def _tiny_split(root: Path, speaker: bool = True) -> Path:
    """A data folder with a 3-utterance split whose rows name plain .npy feature files."""
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    head = ["id", "audio", "n_frames", "tgt_text"] + (["speaker"] if speaker else [])
    lines = ["\t".join(head)]
    for i in range(3):
        np.save(data / f"u{i}.npy", rng.normal(size=(10 + i, 80)).astype(np.float32))
        lines.append("\t".join([f"u{i}", f"u{i}.npy", str(10 + i), "a b"] + (["s"] if speaker else [])))
    (data / "s.tsv").write_text("\n".join(lines) + "\n")
    return data


def test_a_split_of_npy_rows_without_speakers_packs_and_materializes(tmp_path):
    """A .npy row had been a ValueError and a manifest without the optional speaker column a KeyError."""
    data = _tiny_split(tmp_path, speaker=False)
    (tmp_path / "compact").mkdir()
    pack(data, "s", tmp_path / "compact")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.yaml").write_text("x: 1\n")
    out = materialize(tmp_path / "compact", "s", tmp_path / "model", tmp_path / "out", copy=("config.yaml",))
    rows = _manifest(out / "s.tsv")
    assert [r["id"] for r in rows] == ["u0", "u1", "u2"] and all(r["speaker"] == "" for r in rows)


def test_a_damaged_compact_zip_is_a_data_error_and_the_cache_follows_what_is_asked(tmp_path):
    """A missing entry or a corrupt zip had been a raw KeyError / BadZipFile at the demo's first use; a
    second materialize asking for more files had returned the first call's folder without them."""
    from qswap.errors import DataError

    (tmp_path / "compact").mkdir()
    pack(_tiny_split(tmp_path), "s", tmp_path / "compact")
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.yaml", "gcmvn.npz"):
        (model / name).write_text(name)
    out = materialize(tmp_path / "compact", "s", model, tmp_path / "out", copy=("config.yaml",))
    assert not (out / "gcmvn.npz").exists()
    materialize(tmp_path / "compact", "s", model, tmp_path / "out", copy=("config.yaml", "gcmvn.npz"))
    assert (out / "gcmvn.npz").read_text() == "gcmvn.npz"
    manifest = tmp_path / "compact" / "s.tsv"
    manifest.write_text(manifest.read_text() + "ghost\t5\ta b\ts\n")
    with pytest.raises(DataError, match="cannot read the compact features .KeyError"):
        materialize(tmp_path / "compact", "s", model, tmp_path / "out2", copy=("config.yaml",))
    (tmp_path / "compact" / "fbank80_s.q8.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read the compact features .BadZipFile"):
        materialize(tmp_path / "compact", "s", model, tmp_path / "out3", copy=("config.yaml",))
