"""tools/fairseq_walkthrough.py and tools/sensitivity_doc.py run commands to write their pages: a
command that fails is a typed error that names it and carries the end of its output, and the
tool's command line prints it as one ``error:`` message and exits with status 2 (no traceback)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from qswap.errors import CommandError

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(REPO / "tools"))  # the walkthrough imports its sibling qat_gradients
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "tools"))
    return module


FAILING = [sys.executable, "-c", "import sys; print('the reason it failed'); sys.exit(3)"]


def test_a_failed_walkthrough_command_is_a_typed_error(tmp_path):
    walkthrough = load("fairseq_walkthrough")
    with pytest.raises(CommandError, match=r"(?s)exit code 3.*the reason it failed"):
        walkthrough.run(FAILING, None, 5, tmp_path)


def test_a_failed_qswap_command_of_the_sensitivity_page_is_a_typed_error():
    sensitivity_doc = load("sensitivity_doc")
    with pytest.raises(CommandError, match=r"(?s)qswap recipes --no-such-flag failed with exit code 2.*--no-such-flag"):
        sensitivity_doc.run(["recipes", "--no-such-flag"])


@pytest.mark.parametrize("name", ["fairseq_walkthrough", "sensitivity_doc"])
def test_the_command_line_prints_one_error_line_and_exits_2(name, monkeypatch, capsys):
    tool = load(name)

    def fail():
        raise CommandError("fairseq-train ... failed with exit code 1:\nthe end of its output")
    monkeypatch.setattr(tool, "main", fail)
    assert tool.cli() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fairseq-train ... failed with exit code 1") and "Traceback" not in err
