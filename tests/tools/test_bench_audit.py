"""tools/bench_audit.py: its page section is rewritten in place between the markers, and a page
without them is a typed error that says what to change (the page left as it was)."""
import importlib.util
from pathlib import Path

import pytest

from qswap.errors import OutputError

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_audit", REPO / "tools" / "bench_audit.py")
bench_audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_audit)


def test_the_section_between_the_markers_is_replaced_and_the_rest_kept(tmp_path, monkeypatch):
    doc = tmp_path / "honesty.md"
    doc.write_text(f"before\n{bench_audit.START}\nold table\n{bench_audit.END}\nafter\n")
    monkeypatch.setattr(bench_audit, "DOC", doc)
    bench_audit.write_docs("new table\n")
    assert doc.read_text() == f"before\n{bench_audit.START}\nnew table\n{bench_audit.END}\nafter\n"


def test_a_page_without_the_markers_is_a_typed_error(tmp_path, monkeypatch):
    doc = tmp_path / "honesty.md"
    doc.write_text("a page someone rewrote\n")
    monkeypatch.setattr(bench_audit, "DOC", doc)
    with pytest.raises(OutputError, match="marker lines"):
        bench_audit.write_docs("new table\n")
    assert doc.read_text() == "a page someone rewrote\n"
