"""Markdown table cells and rows: what every Markdown report qswap writes shares (the honesty and
deploy audits, compare, eval, search). Text users wrote goes into cells (recipe and row names,
module paths, notes): a ``|`` had split a cell and moved every later number a column right, a
line break had split the row."""
from __future__ import annotations

import re

_BREAK = re.compile(r"\r\n|\r|\n")


def cell(text: object) -> str:
    """``text`` as one table cell: ``|`` escaped, line breaks (\\n, \\r, \\r\\n) as spaces."""
    return _BREAK.sub(" ", str(text)).replace("|", "\\|")


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """The lines of a table (and a blank line after it), every cell through ``cell``."""
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines + [""]
