"""qswap.markdown: cells of text users wrote stay one cell, rows one row (compare, eval, search and
the audits write their tables through it)."""
from qswap.markdown import cell, table


def test_a_pipe_or_line_break_in_a_cell_keeps_the_table_whole():
    assert cell("a|b") == "a\\|b" and cell("x\ny\rz\r\nw") == "x y z w" and cell(3) == "3"
    lines = table(["name", "n"], [["q|row\nnext", 1]])
    assert lines == ["| name | n |", "|---|---|", "| q\\|row next | 1 |", ""]


def test_compare_and_eval_tables_escape_their_row_names():
    """A `|` in a recipe or row name had split its cell (every later number a column right, the last
    lost); a newline had split the row."""
    from qswap.cli.eval_cmd import _markdown
    from qswap.integration.compare import Comparison, Row
    from qswap.integration.metrics import error_counts

    row = Row("pipe|name\nnl", 10.0, 5.0, 0.0, True, 0, 1.0, 2.0, 3.0, 0.1, 1, [1], [10])
    text = Comparison("ckpt", "test", [row], {}).markdown()
    body = [line for line in text.splitlines() if line.startswith("| pipe")]
    assert len(body) == 1 and body[0].count(" | ") == text.splitlines()[0].count(" | ")
    counts = error_counts(["a b"], ["a b"])
    lines = _markdown("odd|label\nx", "te|st", counts, {}).splitlines()
    assert lines[2].startswith("| odd\\|label x | te\\|st | 1 |") and lines[2].count(" | ") == lines[0].count(" | ")
