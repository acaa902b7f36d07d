"""The integer check (issue 16, work in progress): every aten op an integer model runs, with the
module that ran it and the dtypes it read and wrote. Outside the model's two declared float steps
(``quantize_input`` and ``dequantize_output`` of ``qswap.integerize.IntegerModel``), an op that
reads or writes a floating-point tensor is a finding, named with its module and op.

>>> report = check_integer(qswap.integerize(qmodel), x)
>>> report.ok, report.findings[:1]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("quantize_input", "compute", "dequantize_output")


@dataclass(frozen=True)
class OpRecord:
    phase: str
    module: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def touches_float(self) -> bool:
        return any(d.startswith("float") or d in ("bfloat16", "half") for d in self.inputs + self.outputs)

    def __str__(self) -> str:
        return f"{self.module}: {self.op} ({', '.join(self.inputs)} -> {', '.join(self.outputs)})"


@dataclass
class IntegerReport:
    ops: list[OpRecord] = field(default_factory=list)

    @property
    def findings(self) -> list[OpRecord]:
        """Ops on float tensors outside the declared float steps."""
        return [r for r in self.ops if r.phase == "compute" and r.touches_float]

    @property
    def declared(self) -> list[OpRecord]:
        return [r for r in self.ops if r.phase != "compute"]

    @property
    def compute_ops(self) -> list[OpRecord]:
        return [r for r in self.ops if r.phase == "compute"]

    @property
    def ok(self) -> bool:
        return bool(self.compute_ops) and not self.findings

    def dtypes(self) -> set[str]:
        """Every dtype the compute ops read or wrote."""
        return {d for r in self.compute_ops for d in r.inputs + r.outputs}


def _dtypes(tree) -> tuple[str, ...]:
    leaves, _ = tree_flatten(tree)
    return tuple(str(t.dtype).replace("torch.", "") for t in leaves if isinstance(t, torch.Tensor))


class _Recorder(TorchDispatchMode):
    def __init__(self, report: IntegerReport):
        super().__init__()
        self.report, self.phase, self.stack = report, PHASES[0], ["(model)"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, outputs = _dtypes((args, kwargs)), _dtypes(out)
        if inputs or outputs:
            self.report.ops.append(OpRecord(self.phase, self.stack[-1], str(func.overloadpacket.__name__),
                                            inputs, outputs))
        return out


def check_integer(model: nn.Module, x: torch.Tensor) -> IntegerReport:
    """Run ``model`` (an ``IntegerModel``: ``quantize_input``, ``forward_codes``,
    ``dequantize_output``) on ``x`` and record every op, by phase and module."""
    report = IntegerReport()
    recorder = _Recorder(report)
    def enter(name: str):
        def hook(module, args) -> None:
            recorder.stack.append(name)
        return hook

    def leave(module, args, output) -> None:
        recorder.stack.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), recorder:
            codes = model.quantize_input(x)
            recorder.phase = "compute"
            acc = model.forward_codes(codes)
            recorder.phase = "dequantize_output"
            model.dequantize_output(acc)
    finally:
        for h in handles:
            h.remove()
    return report
