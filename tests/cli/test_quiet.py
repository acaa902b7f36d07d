"""The CLI shows qswap's own output: fairseq's log lines and torch's warnings are held back and
summarized once (``--verbose`` shows them in full); progress is drawn only on a terminal."""
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

from qswap.cli.quiet import held_back, summary

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"
AUTO = "Auto converting transforms into feature_transforms"


def _fairseq_config_warning() -> None:
    from fairseq.data.audio.data_cfg import S2TDataConfig

    S2TDataConfig(ASSET / "config.yaml").get_feature_transforms("test", False)  # logs AUTO


def test_held_back_counts_fairseq_records_and_warnings_and_passes_qswaps_own():
    with held_back(verbose=False) as seen:
        _fairseq_config_warning()
        _fairseq_config_warning()
        warnings.warn("a third-party warning", UserWarning)
        logging.getLogger("qswap.test").warning("qswap's own")
    lines = summary(seen)
    assert lines[0].startswith("3 third-party messages held back (2 distinct")
    assert any("2x fairseq.data.audio.data_cfg warning: " + AUTO in line for line in lines)
    assert any("UserWarning" in line and "a third-party warning" in line for line in lines)
    assert not any("qswap's own" in line for line in lines)
    with held_back(verbose=False) as nothing:
        pass
    assert summary(nothing) == []


def test_qswaps_own_warnings_are_shown_not_held_back(capsys):
    """A QswapWarning (a recipe rule that matched no module) is about the user's input: printed as
    'warning: ...' when it happens, not filed among the third-party messages (it had been)."""
    import qswap

    with held_back(verbose=False) as seen:
        warnings.warn("r: rule 0 (line 8): path=encoder.subsampel.* matched no module", qswap.QswapWarning)
        warnings.warn("a third-party warning", UserWarning)
    assert capsys.readouterr().err == "warning: r: rule 0 (line 8): path=encoder.subsampel.* matched no module\n"
    lines = summary(seen)
    assert lines[0].startswith("1 third-party message held back") and "QswapWarning" not in "".join(lines)


def _run(*flags: str, after: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qswap.cli", *flags, "eval", str(ASSET / "checkpoint.pt"), "--data", str(ASSET),
           "--subset", "train_calib", "--beam", "1", *after]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)


def _eval(*flags: str) -> str:
    done = _run(*flags)
    return done.stdout + done.stderr


def test_json_to_stdout_is_the_json_alone():
    done = _run(after=("--json", "-"))
    payload = json.loads(done.stdout)
    assert payload["counts"]["utterances"] == 32 and len(payload["wer_ci"]) == 2
    assert "float: 32 utterances" in done.stderr


def test_cli_output_has_no_third_party_lines_unless_verbose():
    quiet, verbose = _eval(), _eval("--verbose")
    for out in (quiet, verbose):
        assert "float: 32 utterances of train_calib: WER" in out
    assert f"WARNING fairseq.data.audio.data_cfg: {AUTO}" not in quiet and "UserWarning:" not in quiet
    assert quiet.count(AUTO) == 1 and "held back" in quiet and "--verbose" in quiet
    assert "decoding train_calib" not in quiet  # no progress bar in a pipe (CI logs)
    assert f"WARNING fairseq.data.audio.data_cfg: {AUTO}" in verbose and "held back" not in verbose


def test_convert_shows_a_rule_that_matched_nothing_once(tmp_path, capsys):
    """convert's summary lists the rules that matched nothing; the QswapWarning passed through is
    not printed a second time."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("version: 1\nname: typo\ndefaults:\n  weight: {bits: 8}\nrules:\n"
                      "  - match: {path: \"encoder.subsampel.conv_layers.*\"}\n    skip: true\n")
    from qswap.cli import main

    assert main(["convert", str(ASSET / "checkpoint.pt"), "--data", str(ASSET), "--recipe", str(recipe),
                 "--no-calibrate", "-o", str(tmp_path / "q.pt")]) == 0
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert output.count("matched no module") == 1 and "QswapWarning" not in output
