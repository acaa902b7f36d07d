"""docs/reliability.md lists the corpus as it is."""
import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "reliability_table.py"


def test_reliability_doc_is_up_to_date():
    spec = importlib.util.spec_from_file_location("reliability_table", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--check"]) == 0, "run: python tools/reliability_table.py"
