"""Terminal rendering of the honesty report (rich). Only the CLI prints."""
from __future__ import annotations

from qswap.cli.render import styled, styled_line
from qswap.honesty.markdown import TOTAL_LABELS
from qswap.honesty.report import KINDS, HonestyReport

TOTALS_SHOWN = ("compute", "quantized", "kernel_internal", "integer_gemm", "constant_fold", "declared", "float",
                "unclassified")


def verdict_line(report: HonestyReport):  # a rich Text: the verdict styled, the rest plain
    style = "green" if report.honest else "red"
    label = report.verdict_label
    counts = ", ".join(f"{n} {KINDS[k]}" for k, n in report.violations_by_kind().items())
    if report.dynamic:
        declared = len(report.dynamic) - len(report.undeclared_dynamic)
        counts = ", ".join(filter(None, [counts, f"{len(report.dynamic)} {KINDS['dynamic_range']}"
                                         + (f" ({declared} declared by the recipe)" if declared else "")]))
    values = "" if report.values_verdict is None else (
        f"; value-level check: {report.values_verdict}, {len(report.value_disagreements)} "
        f"disagreement(s) with the tags")
    return styled_line(label, f"bold {style}", f": {report.model}, recipe {report.recipe or 'none'}; "
                       f"{len(report.violations)} violation(s)" + (f" ({counts})" if counts else "") + values)


def paths_table(report: HonestyReport):
    from rich.table import Table

    table = Table(title="inference paths audited")
    for col in ("path", "aten ops", "compute ops", "violations"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for p in report.coverage:
        table.add_row(p.name, str(p.ops), str(p.compute), str(p.violations))
    return table


def totals_table(report: HonestyReport):
    from rich.table import Table

    table = Table(title="compute ops")
    table.add_column("count")
    table.add_column("value", justify="right")
    for key in TOTALS_SHOWN:
        style = "red" if key in ("float", "unclassified") and report.totals[key] else ""
        value = str(report.totals[key])
        table.add_row(TOTAL_LABELS[key], styled(value, style))
    bits = ", ".join(f"{b}-bit: {n}" for b, n in report.bits_histogram.items()) or "none"
    table.caption = f"quantized operands by bit width: {bits}"
    return table


def violations_table(items, title: str, max_rows: int | None = None, declared: bool = False):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    cols = ["module", "op", "operand", "shape", "dtype", "n", "reason", "source"]
    cols += ["declared by"] if declared else []
    for col in cols:
        table.add_column(col, overflow="fold")
    shown = items if max_rows is None else items[:max_rows]
    for v in shown:
        row = [v.module or "<model>", v.op, v.operand, "x".join(map(str, v.shape or [])) or "-",
               v.dtype or "-", str(v.count), KINDS[v.kind], v.source or "-"]
        row += [v.declared] if declared else []
        table.add_row(*row)
    if len(shown) < len(items):
        table.caption = f"{len(items) - len(shown)} more rows: write them with --json or --markdown"
    return table


def print_report(out, report: HonestyReport, max_rows: int | None = 40) -> None:
    out.print(paths_table(report))
    out.print(totals_table(report))
    if report.violations:
        out.print(violations_table(report.violations, "violations", max_rows))
    if report.declared:
        out.print(violations_table(report.declared, "declared exceptions (float_ok)", max_rows,
                                   declared=True))
    if report.kernel_internal:
        ops = ", ".join(f"{r.op} x{r.count} ({r.module or '<model>'})" for r in report.kernel_internal[:6])
        out.print(f"kernel-internal float math (simulated): {report.totals['kernel_internal']} ops: {ops}")
    for note in report.notes:
        out.print(f"note: {note}")
    out.print(verdict_line(report))


def print_deploy_audit(out, audit, max_rows: int | None = 40) -> None:
    """The deploy audit (``qswap.export.onnx_audit.DeployAudit``): nodes per graph, the float
    nodes with their qswap sites, the verdict."""
    from rich.table import Table

    graphs = Table(title=f"deployed graphs (onnxruntime CPU, optimization {audit.graphs[0].optimization})")
    for col in ("graph", "nodes", "integer", "quantize", "movement", "index", "float", "float ops"):
        graphs.add_column(col, justify="left" if col in ("graph", "float ops") else "right")
    for g in audit.graphs:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(g.float_ops.items(), key=lambda kv: -kv[1]))
        float_cell = styled(str(g.float_count), "red") if g.float_count else "0"
        graphs.add_row(g.graph, str(g.nodes), *(str(g.buckets.get(b, 0)) for b in ("integer", "quantize",
                       "movement", "index")), float_cell, ops or "-")
    out.print(graphs)
    nodes = [(g.graph, n) for g in audit.graphs for n in g.float_nodes]
    if nodes:
        table = Table(title="float nodes")
        for col in ("graph", "node", "op", "qswap site", "why"):
            table.add_column(col, overflow="fold")
        shown = nodes if max_rows is None else nodes[:max_rows]
        for graph, n in shown:
            table.add_row(graph, n.name, n.op_type, n.site or "-", n.reason)
        if len(shown) < len(nodes):
            table.caption = f"{len(nodes) - len(shown)} more rows: write them with --json or --markdown"
        out.print(table)
    style = "green" if audit.integer_only else "red"
    out.print(styled_line(audit.verdict, f"bold {style}",
                          f" (recipe {audit.recipe}; {audit.integer_count} integer nodes)"))
