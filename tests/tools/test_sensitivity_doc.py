"""tools/sensitivity_doc.py: what its page says of the searched recipe, and its command line."""
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import sensitivity_doc  # noqa: E402


def _rows(searched: list[int], uniform: list[int]) -> dict:
    words = [10] * len(searched)

    def row(errors):
        return {"wer": 100 * sum(errors) / sum(words), "utterance_errors": errors, "utterance_words": words}
    return {"searched": row(searched), "w4a8_edges8": row(uniform)}


def test_the_searched_recipe_is_lower_or_higher_only_where_the_interval_says_so():
    """The page had said 'reads a higher WER than' from the point estimates alone (+0.69 [-1.15, +2.51])."""
    rows = {"test": _rows([1] * 40 + [2] * 2, [1] * 42), "test_heldout": _rows([0] * 42, [2] * 42)}
    text = sensitivity_doc.budget_text(rows)
    assert ": not distinguishable on the in-voice test set" in text
    assert "ΔWER -20.00 [-20.00, -20.00]: lower on the held-out voices" in text


@pytest.mark.parametrize("argv", [["--help"], ["--bogus"]])
def test_its_command_line_answers_help_and_refuses_a_stray_option_before_running(argv):
    """It had taken no arguments: '--help' started the whole regeneration (writing docs/)."""
    proc = subprocess.run([sys.executable, str(TOOLS / "sensitivity_doc.py"), *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (0 if argv == ["--help"] else 2)
    assert "$ qswap" not in proc.stdout


def test_its_outputs_go_to_this_checkouts_docs_and_assets_from_any_directory():
    """DOCS had been ./docs (relative to where it ran) and ASSET the installed package's."""
    repo = TOOLS.parent
    assert sensitivity_doc.DOCS == repo / "docs" and sensitivity_doc.ASSET == repo / "qswap" / "assets" / "s2t_demo"
    shown = sensitivity_doc.shown(["sensitivity", str(sensitivity_doc.ASSET / "checkpoint.pt"), "--plot",
                                   str(sensitivity_doc.DOCS / "sensitivity.png")])
    assert shown == "qswap sensitivity $ASSET/checkpoint.pt --plot docs/sensitivity.png"
