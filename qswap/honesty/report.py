"""The honesty report: a library object (no printing). The CLI renders it as a rich table;
``to_dict`` / ``to_json`` / ``to_markdown`` give the other formats. docs/honesty.md explains
every field."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from qswap.honesty.kinds import KINDS as _KINDS

REPORT_VERSION = 1
KINDS = {kind: k.label for kind, k in _KINDS.items()}
DYNAMIC = "dynamic ranges (computed at run time)"
TOTAL_KEYS = ("ops", "compute", "quantized", "kernel_internal", "integer_gemm", "constant_fold", "declared",
              "float", "movement", "factory", "ignored", "unclassified", "quantizer_calls")


@dataclass
class Violation:
    """One finding, aggregated over every execution with the same module, op, operand, kind.

    >>> v = report.violations[0]
    >>> v.module, v.op, v.operand, v.reason, v.source
    ('encoder.layer_norm', 'aten.native_layer_norm', 'input: float: ...', '...', 'fairseq/...:362')
    """

    module: str
    op: str
    operand: str
    reason: str
    source: str
    kind: str
    shape: list[int] | None = None
    dtype: str = ""
    count: int = 1
    paths: list[str] = field(default_factory=list)
    code: str = ""
    declared: str | None = None  # the float_ok reason, when a recipe declared this exception


@dataclass
class OpCount:
    """Ops counted apart, by module and op: kernel-internal math, constant folding, exact
    integer GEMMs on float kernels."""

    module: str
    op: str
    count: int = 0
    paths: list[str] = field(default_factory=list)


@dataclass
class PathCoverage:
    name: str
    ops: int = 0
    compute: int = 0
    violations: int = 0


@dataclass
class HonestyReport:
    """What ``qswap.audit`` found on the executed inference paths.

    >>> report = qswap.audit(qmodel, net_input)
    >>> report.honest, report.verdict, report.totals["float"]
    (True, 'honest', 0)
    """

    model: str
    recipe: str | None = None
    paths: list[str] = field(default_factory=list)  # names of the inference paths audited
    coverage: list[PathCoverage] = field(default_factory=list)  # ops per path
    totals: dict[str, int] = field(default_factory=lambda: {k: 0 for k in TOTAL_KEYS})
    bits_histogram: dict[int, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    declared: list[Violation] = field(default_factory=list)
    dynamic: list[Violation] = field(default_factory=list)  # activation ranges computed at run time
    values_verdict: str | None = None  # the value-level check's own verdict (None: not run)
    value_disagreements: list[Violation] = field(default_factory=list)
    kernel_internal: list[OpCount] = field(default_factory=list)
    constant_fold: list[OpCount] = field(default_factory=list)
    integer_gemm: list[OpCount] = field(default_factory=list)  # exact float GEMMs on integers
    float_ok: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def honest(self) -> bool:
        """No undeclared violation on any audited path (declared exceptions are allowed, and so
        are dynamic ranges: integer arithmetic on a grid computed at run time)."""
        return not self.violations

    @property
    def undeclared_dynamic(self) -> list[Violation]:
        """Quantizers still observing at inference that the recipe does not declare dynamic."""
        return [v for v in self.dynamic if v.declared is None]

    @property
    def honest_strict(self) -> bool:
        """Honest with no declared exceptions and no undeclared dynamic range either."""
        return self.honest and not self.declared and not self.undeclared_dynamic

    @property
    def verdict(self) -> str:
        if not self.honest:
            return "dishonest"
        parts = (["declared exceptions"] if self.declared else []) + (
            [DYNAMIC] if self.undeclared_dynamic else [])
        return " with ".join(["honest", " and ".join(parts)]) if parts else "honest"

    @property
    def verdict_label(self) -> str:
        """The verdict as the renderers headline it: ``HONEST with ...`` or ``NOT HONEST``."""
        return "HONEST" + self.verdict.removeprefix("honest") if self.honest else "NOT HONEST"

    def violations_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.kind] = out.get(v.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_histogram"] = {str(k): v for k, v in sorted(self.bits_histogram.items())}
        return {"qswap_audit_version": REPORT_VERSION, "verdict": self.verdict,
                "honest": self.honest, "honest_strict": self.honest_strict, **d}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_markdown(self, max_rows: int | None = None) -> str:
        from qswap.honesty.markdown import render
        return render(self, max_rows)
