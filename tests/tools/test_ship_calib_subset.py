"""tools/ship_calib_subset.py: the shipped calibration subset, rebuilt byte for byte, and nothing
written over it from bad input."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import ship_calib_subset  # noqa: E402

ASSET = REPO / "qswap" / "assets" / "s2t_demo"


def test_the_shipped_subset_rebuilds_byte_for_byte(tmp_path):
    assert ship_calib_subset.main(["--data", str(ASSET), "--split", "train_calib", "--num", "32",
                                   "--out", str(tmp_path)]) == 0
    for name in ("fbank80_train_calib.zip", "train_calib.tsv"):
        assert (tmp_path / name).read_bytes() == (ASSET / name).read_bytes()


def test_bad_input_leaves_the_output_folder_as_it_was(tmp_path, capsys):
    """A --data without its feature zip had emptied the shipped zip (22 bytes) and kept the old
    manifest; --num -1 had written 99 of 100 utterances and --num 0 none, both with exit 0."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "fbank80_train_calib.zip").write_bytes(b"kept")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.tsv").write_bytes((ASSET / "test.tsv").read_bytes())
    with pytest.raises(SystemExit, match="fbank80_test.zip.*nothing written"):
        ship_calib_subset.main(["--data", str(bad), "--split", "test", "--num", "3", "--out", str(out)])
    for argv, said in ((["--num", "0"], "expected 1 or more, got 0"), (["--num", "-1"], "got -1"),
                       (["--num", "33"], "--num 33: train_calib.tsv has 32 utterances")):
        with pytest.raises(SystemExit) as stop:
            ship_calib_subset.main(["--data", str(ASSET), "--split", "train_calib", "--out", str(out), *argv])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["fbank80_train_calib.zip"]
    assert (out / "fbank80_train_calib.zip").read_bytes() == b"kept"
