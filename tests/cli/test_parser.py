"""The CLI's choices are the library's tuples, not copies of them."""
import pytest

from qswap.calibrate import OBSERVE
from qswap.cli import build_parser
from qswap.nn.simulate import SIMULATIONS


def _choices(command: str, option: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).choices


def test_calibrate_observe_offers_the_library_modes():
    assert _choices("calibrate", "--observe") is OBSERVE


def test_eval_simulate_offers_the_library_simulations():
    assert _choices("eval", "--simulate") is SIMULATIONS


@pytest.mark.parametrize("argv", [["calibrate", "q.pt", "--data", "d", "-o", "o.pt", "--observe", "fp32"],
                                  ["eval", "q.pt", "--data", "d", "--simulate", "fixed"]])
def test_a_mode_the_library_lacks_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option, low", [
    (["eval", "q.pt", "--data", "d", "--beam", "0"], "--beam", 1),
    (["eval", "q.pt", "--data", "d", "--beam", "-1"], "--beam", 1),
    (["eval", "q.pt", "--data", "d", "--calib-batches", "-1"], "--calib-batches", 1),
    (["eval", "q.pt", "--data", "d", "--recipe", "w8a8", "--calib-batches", "0"], "--calib-batches", 1),
    (["eval", "q.pt", "--data", "d", "--num-shards", "0"], "--num-shards", 1),
    (["eval", "q.pt", "--data", "d", "--shard-id", "-1"], "--shard-id", 0),
    (["eval", "q.pt", "--data", "d", "--threads", "0"], "--threads", 1),
    (["eval", "q.pt", "--data", "d", "--max-sentences", "0"], "--max-sentences", 1),
    (["compare", "c.pt", "--data", "d", "--beam", "0"], "--beam", 1),
    (["compare", "c.pt", "--data", "d", "--calib-batches", "-2"], "--calib-batches", 1),
    (["compare", "c.pt", "--data", "d", "--calib-batches", "0"], "--calib-batches", 1),
    (["calibrate", "q.pt", "--data", "d", "-o", "o.pt", "--batches", "-2"], "--batches", 1),
    (["calibrate", "q.pt", "--data", "d", "-o", "o.pt", "--batches", "0"], "--batches", 1),
    (["sensitivity", "c.pt", "--data", "d", "--calib-batches", "0"], "--calib-batches", 1),
    (["convert", "c.pt", "--recipe", "w8a8", "-o", "o.pt", "--calib-batches", "-1"], "--calib-batches", 0),
    (["convert", "c.pt", "--recipe", "w8a8", "-o", "o.pt", "--max-sentences", "-3"], "--max-sentences", 1),
    (["search", "c.pt", "--data", "d", "--target-mb", "2", "--batches", "0"], "--batches", 1),
    (["sensitivity", "c.pt", "--data", "d", "--beam", "0"], "--beam", 1),
    (["sensitivity", "c.pt", "--data", "d", "--show", "-3"], "--show", 1),
    (["sensitivity", "c.pt", "--data", "d", "--top-k", "-2"], "--top-k", 1),
    (["audit", "c.pt", "--recipe", "w8a8", "--synthetic", "0"], "--synthetic", 1),
    (["audit", "c.pt", "--recipe", "w8a8", "--data", "d", "--subset", "test", "--count", "0"], "--count", 1),
    (["audit", "c.pt", "--recipe", "w8a8", "--decode-steps", "0"], "--decode-steps", 1),
    (["audit", "c.pt", "--recipe", "w8a8", "--max-rows", "-1"], "--max-rows", 1),
])
def test_a_count_out_of_range_is_a_usage_error_naming_the_option(argv, option, low, capsys):
    """A beam, batch count, shard, thread count or batch size below what the option takes stops at
    the parser (exit 2) with the option and its smallest value named: not a traceback from fairseq's
    beam search (beam 0: a reshape of 0 elements) or itertools (negative batches). Calibration
    batches are 1 or more where the command calibrates (--calib-batches 0 had failed after loading,
    in compare after the float decode, with "calibration got zero batches", naming no option);
    convert's and search's 0 means no calibration."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be {low} or more, got " in err and "Traceback" not in err
    assert f"qswap {argv[0]}: error: argument {option}" in err  # the command named, as qswap's own errors do


def test_a_count_that_is_not_an_integer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "q.pt", "--data", "d", "--beam", "five"])
    assert "argument --beam: must be an integer, got 'five'" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--target-mb", "--max-delta-wer"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_budget_that_is_not_finite_is_a_usage_error(option, value, capsys):
    """float() takes nan and inf; a search budget of nan had given a recipe and exit 0."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["search", "c.pt", "--data", "d", "-o", "r.yaml", f"{option}={value}"])
    assert exc.value.code == 2
    assert f"argument {option}: must be a finite number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option, high, why", [
    (["eval", "q.pt", "--data", "d", "--max-sentences", "99999999999999999999"], "--max-sentences", 2**31 - 1, ""),
    (["eval", "q.pt", "--data", "d", "--beam", str(2**31)], "--beam", 2**31 - 1, ""),
    (["eval", "q.pt", "--data", "d", "--num-shards", str(2**40)], "--num-shards", 2**31 - 1, ""),
    (["eval", "q.pt", "--data", "d", "--calib-batches", str(2**31)], "--calib-batches", 2**31 - 1, ""),
    (["calibrate", "q.pt", "--data", "d", "-o", "o.pt", "--max-sentences", "9" * 30],
     "--max-sentences", 2**31 - 1, ""),
    (["convert", "c.pt", "--recipe", "w8a8", "-o", "o.pt", "--calib-batches", str(2**63)], "--calib-batches",
     2**31 - 1, ""),
    (["search", "c.pt", "--data", "d", "--target-mb", "2", "--max-sentences", str(2**32)], "--max-sentences",
     2**31 - 1, ""),
    (["sensitivity", "c.pt", "--data", "d", "--show", str(2**31)], "--show", 2**31 - 1, ""),
    (["compare", "c.pt", "--data", "d", "--max-sentences", str(2**31)], "--max-sentences", 2**31 - 1, ""),
    (["eval", "x", "--data", "d", "--backend", "onnxruntime", "--threads", "100000"], "--threads", 256,
     "pass at most the number of CPU cores"),
    (["audit", "c.pt", "--recipe", "w8a8", "--synthetic", "3000000"], "--synthetic", 64, "one batch"),
    (["audit", "c.pt", "--recipe", "w8a8", "--data", "d", "--subset", "t", "--count", "65"], "--count", 64,
     "one batch"),
    (["audit", "c.pt", "--recipe", "w8a8", "--decode-steps", str(2**31)], "--decode-steps", 2**31 - 1, ""),
    (["audit", "c.pt", "--recipe", "w8a8", "--max-rows", str(2**31)], "--max-rows", 2**31 - 1, ""),
])
def test_a_count_too_large_is_a_usage_error_naming_the_option(argv, option, high, why, capsys):
    """A count beyond what the option takes stops at the parser (exit 2) with the option and its
    largest value named: --max-sentences 10**20 had been an OverflowError traceback from fairseq's
    Cython batching, --threads 100000 a hung onnxruntime session, --synthetic 3000000 a 115 GB
    allocation error from torch."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be {high} or less, got " in err and why in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["eval", "q.pt", "--data", "d", "--max-sentences", str(2**31 - 1), "--threads", "256"],
    ["audit", "c.pt", "--recipe", "w8a8", "--synthetic", "64", "--decode-steps", str(2**31 - 1)],
])
def test_the_largest_count_an_option_takes_parses(argv):
    build_parser().parse_args(argv)


def test_every_command_batches_the_same_number_of_utterances_by_default():
    """search and sensitivity had --max-sentences 16 against the others' 32; the value also batches
    calibration, so search's row of a recipe was calibrated differently from compare's."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    # an option declared without a default (so that a command can tell it given: eval's --merge,
    # convert without --calib-batches refuse it) sets it when it runs, as its help says
    defaults = {name: next(a.default if a.default is not None else
                           (32 if "(default: 32)" in (a.help or "") else None)
                           for a in sub._actions if "--max-sentences" in a.option_strings)
                for name, sub in commands.items()
                if any("--max-sentences" in a.option_strings for a in sub._actions)}
    assert {"search", "sensitivity", "compare", "eval", "convert", "calibrate"} <= set(defaults)
    assert set(defaults.values()) == {32}, defaults
