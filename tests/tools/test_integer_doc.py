"""tools/integer_doc.py: the tables are rendered from every set's stored results."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import integer_doc  # noqa: E402


def test_a_run_of_one_set_renders_the_other_sets_stored_rows_too():
    """--subsets test_heldout (one process a core, as its docstring suggests) had rewritten
    docs/integer.md and the README with that set's rows alone (4 of 8 rows)."""
    for pattern in ("integer_{}.json", "stream_integer_{}.json"):
        results = integer_doc.stored_results(pattern, ["test_heldout"])
        assert list(results) == list(integer_doc.SUBSETS)
    table = integer_doc.table(integer_doc.stored_results("integer_{}.json", ["test"]),
                              None)
    assert "8 of 8 rows" in table


def test_a_set_asked_for_without_stored_results_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(integer_doc, "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    with pytest.raises(SystemExit, match="no docs/integer_test.json; decode the set first"):
        integer_doc.stored_results("integer_{}.json", ["test"])
