"""The convert report: one entry per module, what happened to it and which rule said so.

A library object; the CLI renders it (``qswap.cli.render``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# "no_quantizer": a counterpart in place whose every declared site the recipe leaves float (null
# specs: the model's root under fp32, every module under a recipe that quantizes nothing); it
# computes in float, declared so by its rule (not a module the walk could not convert: "float")
ACTIONS = ("quantized", "no_quantizer", "float", "skipped", "passthrough", "container")


@dataclass(frozen=True)
class ModuleEntry:
    path: str
    float_class: str
    action: str  # one of ACTIONS
    rule: str  # "defaults", "rule 2 (line 14): path=...", or "" for containers
    counterpart: str = ""
    weight: str = ""  # spec label, "float", or ""
    activation: str = ""
    reason: str = ""  # why it was left float / notes


@dataclass
class ConvertReport:
    recipe: str
    entries: list[ModuleEntry] = field(default_factory=list)
    float_ok: dict[str, str] = field(default_factory=dict)
    unmatched_rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quantized_bytes: int = 0

    def by_action(self, action: str) -> list[ModuleEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def left_float(self) -> list[ModuleEntry]:
        """Modules that do arithmetic and were not quantized (skips included)."""
        return [e for e in self.entries if e.action in ("float", "skipped")]

    def counts(self) -> dict[str, int]:
        return {a: len(self.by_action(a)) for a in ACTIONS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = self.counts()
        return d
