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
