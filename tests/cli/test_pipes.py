"""The command line when the reader of its standard output stops early (``| head``, a pager)."""
import json
import subprocess
import sys
from pathlib import Path

QSWAP = [sys.executable, "-m", "qswap.cli"]


def _closed_stdout(argv, tmp_path):
    """Run ``qswap argv`` with a standard output whose reader has gone: exit status and stderr."""
    proc = subprocess.Popen([*QSWAP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), err


def _result(path: Path) -> str:
    refs = ["a b c d", "e f g h"]
    utterances = [{"id": i, "ref": r, "hyp": r} for i, r in enumerate(refs)]
    counts = {"utterances": 2, "words": 8, "word_errors": 0, "chars": 14, "char_errors": 0}
    path.write_text(json.dumps({"counts": counts, "subset": "test", "model": "m", "settings": {},
                                "shard": [0, 1], "utterances": utterances}))
    return str(path)


def test_a_closed_pipe_is_exit_141_and_loses_no_file(tmp_path):
    """rich's SystemExit(1) had read as an audit's negative verdict, a print to stdout had been a raw
    BrokenPipeError traceback, and the --json/--markdown files (written after the terminal report)
    were never written."""
    out = tmp_path / "merged.json"
    rc, err = _closed_stdout(["eval", "--merge", _result(tmp_path / "r.json"), "--json", str(out)], tmp_path)
    assert rc == 141 and "Traceback" not in err, err
    assert json.loads(out.read_text())["counts"]["words"] == 8
    rc, err = _closed_stdout(["eval", "--merge", _result(tmp_path / "r.json"), "--json", "-"], tmp_path)
    assert rc == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
    rc, err = _closed_stdout(["recipes"], tmp_path)
    assert rc == 141 and "Traceback" not in err, err


def test_sensitivity_and_search_write_their_files_before_a_closed_pipe(float_checkpoint, tmp_path):
    """They had printed the terminal table first: a reader that closed stdout (| head) lost the
    --json, --markdown and --plot files of minutes of probing."""
    _, data, ckpt = float_checkpoint
    common = ["--data", str(data), "--subset", "test", "--max-sentences", "4", "--calib-batches", "1"]
    rc, err = _closed_stdout(["sensitivity", str(ckpt), *common, "--batches", "1", "--recipe", "w4a8",
                              "--json", str(tmp_path / "s.json")], tmp_path)
    assert rc == 141 and "Traceback" not in err, err
    assert json.loads((tmp_path / "s.json").read_text())["sites"]
    rc, err = _closed_stdout(["search", str(ckpt), *common, "--batches", "1", "--target-mb", "0.03", "--beam", "1",
                              "-o", str(tmp_path / "r.yaml"), "--json", str(tmp_path / "r.json"), "--markdown",
                              str(tmp_path / "r.md")], tmp_path)
    assert rc == 141 and "Traceback" not in err, err
    assert json.loads((tmp_path / "r.json").read_text())["row"]["recipe"] == "searched"
    assert "| searched |" in (tmp_path / "r.md").read_text() and (tmp_path / "r.yaml").exists()
