"""The honesty report as Markdown (``HonestyReport.to_markdown``); fields as in docs/honesty.md."""
from __future__ import annotations

from qswap.honesty.report import KINDS, HonestyReport, Violation
from qswap.markdown import table

TOTAL_LABELS = {
    "compute": "compute ops executed",
    "quantized": "on quantized operands",
    "kernel_internal": "kernel-internal float math (simulated)",
    "integer_gemm": "exact integer GEMMs on float kernels",
    "constant_fold": "constant-foldable weight preprocessing",
    "declared": "declared exceptions (float_ok)",
    "float": "on float operands (violations)",
    "movement": "data movement ops",
    "factory": "constants made at run time",
    "ignored": "integer / bool / index ops (ignored)",
    "unclassified": "ops with no rule (violations)",
    "quantizer_calls": "quantizer calls (outputs checked on their grid)",
    "ops": "aten ops observed (outside quantizers)",
}


_table = table  # the shared Markdown table (qswap.markdown): cells escaped


def _violation_rows(items: list[Violation], declared: bool) -> list[list[object]]:
    rows = []
    for v in items:
        row = [v.module or "<model>", f"`{v.op}`", v.operand, "x".join(map(str, v.shape or [])) or "-",
               v.dtype or "-", v.count, v.reason, f"`{v.source}`" if v.source else "-"]
        if declared:
            row.append(v.declared)
        rows.append(row)
    return rows


def render(report: HonestyReport, max_rows: int | None = None) -> str:
    verdict = f"**{report.verdict_label}**"
    strict = "yes" if report.honest_strict else "no"
    out = [f"# qswap honesty audit: {report.model}", "",
           f"Verdict: {verdict} (recipe: {report.recipe or 'none'}); honest with no declared exception or "
           f"undeclared dynamic range: {strict}", ""]
    out += ["## Paths covered", ""]
    out += _table(["path", "aten ops", "compute ops", "violations"],
                  [[p.name, p.ops, p.compute, p.violations] for p in report.coverage])
    out += ["## Totals", ""]
    out += _table(["count", "value"], [[TOTAL_LABELS[k], v] for k, v in report.totals.items()])
    out += ["## Bit widths of quantized operands", ""]
    out += _table(["bits", "operands"], [[b, n] for b, n in report.bits_histogram.items()] or [["-", 0]])
    header = ["module", "op", "operand", "shape", "dtype", "count", "reason", "source"]
    shown = report.violations if max_rows is None else report.violations[:max_rows]
    out += [f"## Violations ({len(report.violations)})", ""]
    if report.violations:
        by_kind = ", ".join(f"{n} {KINDS[k]}" for k, n in report.violations_by_kind().items())
        out += [f"By kind: {by_kind}.", ""]
        out += _table(header, _violation_rows(shown, declared=False))
        if len(shown) < len(report.violations):
            out += [f"... {len(report.violations) - len(shown)} more (see the JSON report)", ""]
    else:
        out += ["None.", ""]
    if report.declared:
        out += [f"## Declared exceptions ({len(report.declared)}, not counted as honest)", ""]
        out += _table(header + ["declared by"], _violation_rows(report.declared, declared=True))
    if report.dynamic:
        out += [f"## Dynamic ranges, computed at run time ({len(report.dynamic)})", "",
                "Activation quantizers still observing at inference: each input sets its own grid.", ""]
        out += _table(["quantizer", "grid", "declared by"],
                      [[v.module, v.operand, v.declared or "-"] for v in report.dynamic])
    out += ["## Kernel-internal float math (simulated)", ""]
    out += _table(["module", "op", "count"], [[r.module or "<model>", f"`{r.op}`", r.count]
                                              for r in report.kernel_internal] or [["-", "-", 0]])
    if report.integer_gemm:
        out += ["## Exact integer GEMMs on float kernels", ""]
        out += _table(["module", "op", "count"], [[r.module or "<model>", f"`{r.op}`", r.count]
                                                  for r in report.integer_gemm])
    if report.constant_fold:
        out += ["## Constant-foldable weight preprocessing", ""]
        out += _table(["module", "op", "count"], [[r.module or "<model>", f"`{r.op}`", r.count]
                                                  for r in report.constant_fold])
    if report.values_verdict is not None:  # --values: the terminal line and the JSON had it, the Markdown not
        out += [f"## Value-level check: {report.values_verdict} ({len(report.value_disagreements)} "
                f"disagreement(s) with the tags)", ""]
        if report.value_disagreements:
            out += _table(header, _violation_rows(report.value_disagreements, declared=False))
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)
