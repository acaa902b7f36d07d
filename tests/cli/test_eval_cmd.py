"""qswap eval's reading of results written by 'qswap eval --json' (--merge shards, --baseline):
a hand-edited or foreign file is a DataError naming it, before anything is loaded or decoded."""
import json

import pytest

from qswap.cli import main
from qswap.integration.metrics import error_counts

UTTERANCES = [{"id": 0, "ref": "a b c", "hyp": "a b"}, {"id": 1, "ref": "d e", "hyp": "d e"}]


def _shard(path, held=UTTERANCES, **counts):
    """A shard 0 of 1 whose counts are its utterances' (``counts``: fields changed after)."""
    real = error_counts([u["ref"] for u in UTTERANCES], [u["hyp"] for u in UTTERANCES]).to_dict()
    path.write_text(json.dumps({"counts": {**real, **counts}, "subset": "test", "model": "w8a8", "settings": None,
                                "shard": [0, 1], "utterances": held}))
    return str(path)


@pytest.mark.parametrize("bad_id", ["Infinity", "-Infinity", "NaN", "1.5", "true", "\"3\"", "null"])
def test_merge_refuses_an_utterance_id_that_is_no_integer(tmp_path, capsys, bad_id):
    """json reads Infinity as a float: int() of it had been a raw OverflowError traceback."""
    path = tmp_path / "s0.json"
    _shard(path)
    path.write_text(path.read_text().replace('"id": 0', f'"id": {bad_id}'))
    assert main(["eval", "--merge", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not a shard result written by 'qswap eval --json'" in err
    assert "utterance id must be an integer" in err and "Traceback" not in err


@pytest.mark.parametrize("bad_id", ["Infinity", "2.0", "false"])
def test_baseline_refuses_an_utterance_id_that_is_no_integer(tmp_path, capsys, bad_id):
    """Read before the checkpoint (which does not exist here) is loaded."""
    base = tmp_path / "b.json"
    base.write_text(json.dumps({"model": "float", "utterances": UTTERANCES}).replace('"id": 0', f'"id": {bad_id}'))
    data = f"{__import__('qswap').__path__[0]}/assets/s2t_demo"
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", data, "--baseline", str(base)]) == 2
    err = capsys.readouterr().err
    assert f"--baseline {base} is not a result written by 'qswap eval --json'" in err
    assert "utterance id must be an integer" in err and "missing.pt" not in err and "Traceback" not in err


@pytest.mark.parametrize("counts, named", [
    ({"words": 0, "word_errors": 5}, "word_errors 5 (the utterances give 1), words 0 (the utterances give 5)"),
    ({"chars": 100}, "chars 100"),
    ({"utterances": 7}, "utterances 7 (the utterances give 2)"),
])
def test_merge_refuses_counts_that_disagree_with_the_utterances(tmp_path, capsys, counts, named):
    """A hand-edited count had been merged as it was: words 0, word_errors 5 printed "WER 500%"."""
    assert main(["eval", "--merge", _shard(tmp_path / "good.json")]) == 0
    bad = _shard(tmp_path / "bad.json", **counts)
    capsys.readouterr()
    assert main(["eval", "--merge", bad, "--json", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a shard result" in err and "counts disagree with its utterances" in err and named in err
    assert not (tmp_path / "m.json").exists()


def test_merge_refuses_counts_of_utterances_the_shard_does_not_hold(tmp_path, capsys):
    assert main(["eval", "--merge", _shard(tmp_path / "s.json", held=[])]) == 2
    assert "counts disagree with its utterances" in capsys.readouterr().err


ASSET = __import__("pathlib").Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo"


def test_threads_with_the_torch_backend_is_refused(capsys):
    """--threads sets onnxruntime's threads: on a torch checkpoint it had been ignored silently."""
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "test",
                 "--threads", "4"]) == 2
    assert "--threads sets onnxruntime's threads: add --backend onnxruntime" in capsys.readouterr().err


def test_a_bad_recipe_with_vs_float_fails_before_any_decoding(tmp_path, capsys, monkeypatch):
    """The float model had been decoded first, and the recipe's YAML error reported after it."""
    from qswap.cli import eval_cmd

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the recipe was read")
    monkeypatch.setattr(eval_cmd, "_decode", no_decoding)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: [\n")
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "test",
                 "--recipe", str(bad), "--vs-float"]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def _no_decoding(monkeypatch):
    from qswap.cli import eval_cmd

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the error")
    monkeypatch.setattr(eval_cmd, "_decode", no_decoding)


def test_a_convert_error_with_vs_float_comes_before_the_float_decode(tmp_path, capsys, monkeypatch):
    """The float model had been decoded first, and an error converting the recipe reported after it
    (the whole float decode lost)."""
    _no_decoding(monkeypatch)
    unsigned = tmp_path / "unsigned.yaml"  # parses; convert refuses it (the model's weights have negatives)
    unsigned.write_text("version: 1\nname: unsigned\ndefaults:\n  weight: {bits: 8, signed: false, symmetric: true}\n"
                        "  activation: {bits: 8}\n")
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "test",
                 "--recipe", str(unsigned), "--vs-float", "--calib-subset", "train_calib"]) == 2
    err = capsys.readouterr().err
    assert "unsigned" in err and "negative" in err and "Traceback" not in err


@pytest.mark.parametrize("options, named", [
    (["--calib-batches", "2"], "--calib-batches"),
    (["--calib-subset", "train_calib"], "--calib-subset"),
    (["--calib-subset", "train_calib", "--calib-batches", "2"], "--calib-subset and --calib-batches"),
])
def test_calibration_options_without_a_recipe_are_refused(capsys, monkeypatch, options, named):
    """Without --recipe nothing is calibrated: the options had been ignored without a word."""
    _no_decoding(monkeypatch)
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "test", *options]) == 2
    err = capsys.readouterr().err
    verb = "calibrate" if " and " in named else "calibrates"
    assert f"{named} {verb} the conversion of --recipe R" in err and f"drop {named}" in err


def test_calibration_options_with_the_onnxruntime_backend_are_refused(tmp_path, capsys):
    """An ONNX export decodes with its exported grids: --calib-* had been ignored without a word.
    Refused before the export directory is read (this one does not exist)."""
    assert main(["eval", str(tmp_path / "export"), "--data", str(ASSET), "--backend", "onnxruntime",
                 "--calib-batches", "4"]) == 2
    err = capsys.readouterr().err
    assert "--calib-batches calibrates a --recipe conversion in torch; an ONNX export decodes with the grids" in err


def test_merge_refuses_calibration_options(tmp_path, capsys):
    assert main(["eval", "--merge", _shard(tmp_path / "s.json"), "--calib-batches", "3"]) == 2
    assert "--calib-batches applies when decoding" in capsys.readouterr().err


@pytest.mark.parametrize("extra, named", [(["--optimization", "basic"], "--optimization goes with --onnx"),
                                          (["--count", "5"], "--count takes that many utterances of --subset")])
def test_audit_options_that_would_be_ignored_are_refused(tmp_path, capsys, extra, named):
    """--optimization (the deploy audit's) and --count without --subset had been accepted and ignored:
    two synthetic utterances audited, exit 0; refused before the checkpoint (missing) is read."""
    assert main(["audit", str(tmp_path / "missing.pt"), "--recipe", "w8a8", *extra]) == 2
    err = capsys.readouterr().err
    assert named in err and "missing.pt" not in err


def test_fewer_calibration_batches_than_asked_are_said_and_recorded(tmp_path, capsys):
    """--calib-batches 50 on a subset of 4 batches had calibrated on 4 without a word, its JSON
    recording 50 (compare, sensitivity and search say it, convert prints the count)."""
    import json

    out = tmp_path / "e.json"
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "train_calib",
                 "--recipe", "w8a8", "--calib-subset", "train_calib", "--calib-batches", "50", "--max-sentences", "8",
                 "--beam", "1", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["calib_batches"], settings["calib_batches_used"]) == (50, 4)
    assert "--calib-batches 50: train_calib makes 4 batch(es)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--beam", "0"], "argument --beam: must be 1 or more"),
                                           (["--markdown", "out.json"], "pass a Markdown file path"),
                                           (["--markdown", ""], "pass a Markdown file path")])
def test_the_demo_refuses_its_own_bad_arguments(argv, message, capsys):
    """--beam 0 had printed qswap compare's usage; --markdown out.json complained of a --json never
    given; --markdown '' fell back to docs/demo.md."""
    from qswap.demo import main as demo

    with pytest.raises(SystemExit) as exc:
        demo(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "python -m qswap.demo: error:" in err and message in err and "qswap compare" not in err


def test_the_demo_writes_its_own_folder_not_the_committed_docs():
    """`make demo`, the README's first command, had overwritten docs/demo.md and demo.json (a run
    on another CPU then failed `make test`'s README check), and failed after minutes where the
    working directory had no docs/."""
    from qswap.demo import OUT, default_markdown

    assert default_markdown("test") == f"{OUT}/demo.md" and default_markdown("test_heldout") == f"{OUT}/demo_test_heldout.md"
    assert not default_markdown("test").startswith("docs/")
    from pathlib import Path
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().splitlines()
    assert f"/{OUT}/" in ignored


def test_an_eval_without_a_recipe_records_no_calibration(tmp_path):
    """Without --recipe nothing is calibrated: the JSON had recorded --recipe's defaults
    (calib_subset 'train', 8 batches) as if it had; compare writes null and 0 there."""
    import json

    out = tmp_path / "e.json"
    assert main(["eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--subset", "train_calib",
                 "--max-sentences", "32", "--beam", "1", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert (settings["recipe"], settings["calib_subset"], settings["calib_batches"], settings["calib_batches_used"]) \
        == (None, None, 0, None)
