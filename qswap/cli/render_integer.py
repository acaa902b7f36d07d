"""Terminal rendering of the integer audit report (rich). Only the CLI prints."""
from __future__ import annotations

from qswap.cli.render import styled, styled_line
from qswap.honesty.integer import IntegerAuditReport


def print_integer_report(out, report: IntegerAuditReport, max_rows: int | None = 40) -> None:
    from rich.table import Table

    paths = Table(title="inference paths run on the integer model")
    for col in ("path", "aten ops", "integer ops", "float ops (findings)"):
        paths.add_column(col, justify="left" if col == "path" else "right")
    for p in report.paths:
        paths.add_row(p.name, str(p.ops), str(p.integer_ops), styled(str(p.findings), "red") if p.findings else "0")
    out.print(paths)
    steps = Table(title="declared float steps")
    for col in ("module", "step", "ops", "count"):
        steps.add_column(col, overflow="fold")
    for d in report.declared:
        steps.add_row(d.module, d.step, ", ".join(d.ops), str(d.count))
    out.print(steps)
    if report.findings:
        found = Table(title="float ops outside the declared steps")
        for col in ("path", "module", "op", "dtypes", "count"):
            found.add_column(col, overflow="fold")
        shown = report.findings if max_rows is None else report.findings[:max_rows]
        for f in shown:
            found.add_row(f.path, f.module, f.op, f.dtypes, str(f.count))
        if len(shown) < len(report.findings):
            found.caption = f"{len(report.findings) - len(shown)} more rows: write them with --json or --markdown"
        out.print(found)
    style = "green" if report.integer_only else "red"
    out.print(styled_line(report.verdict, f"bold {style}",
                          f": {report.model}, recipe {report.recipe or 'none'}; {len(report.findings)} float op(s) "
                          f"outside the declared steps; integer dtypes: {', '.join(report.dtypes) or 'none'}"))
