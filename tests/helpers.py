"""Small shared test utilities (no fairseq imports at module level)."""
from __future__ import annotations

import torch
from torch import nn


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.detach().double(), approx.detach().double()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp_min(1e-30)))


def on_grid(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
            axis: int | None = None) -> bool:
    """True if every value is (code - zero_point) * scale for an integer code in [qmin, qmax]."""
    if axis is not None and scale.numel() > 1:
        shape = [1] * values.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    codes = values.double() / scale.double() + zero_point.double()
    return bool(torch.allclose(codes, codes.round(), atol=1e-3)
                and codes.round().min() >= qmin and codes.round().max() <= qmax)


class Residual(nn.Module):
    """A user's block with no counterpart: a Linear and a residual add in its own forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


def assert_only_near_ties_differ(integer, reference, exact):
    """Codes agree except within 1e-4 of a tie of the exact value (the fake-quant path computes
    ``x * (1 / s)`` in float32 and rounds half to even; the integer one rounds the exact product
    once, ties up)."""
    diff = (integer.long() - reference.long()).abs()
    assert int(diff.max()) <= 1
    frac = (exact - exact.floor() - 0.5).abs()
    assert bool((frac[diff > 0] < 1e-4).all())


def core_codes(mha: nn.Module, run) -> tuple[list, float, dict]:
    """(q, k, v codes on the core's grids, the scaling, {"args", "out"} of the core call) of a
    quantized attention's core during ``run()``."""
    from qswap.quant.integer import Grid
    seen = {}
    hook = mha.core.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        run()
    hook.remove()
    q, k, v, scaling = seen["args"][:4]
    core = mha.core
    codes = [Grid.of(quant).quantize(t) for quant, t in ((core.q_quant, q), (core.k_quant, k), (core.v_quant, v))]
    return codes, scaling, seen


def recipe_with(name: str, simulate: str):
    """The shipped recipe ``name`` with its ``simulate`` key set (qswap.nn.simulate)."""
    from qswap.recipe import with_simulate
    return with_simulate(name, simulate)


def reports_with_and_without_shortcuts(monkeypatch, audit) -> tuple[dict, dict]:
    """``audit()``'s report (``to_dict``), then the same with the tracker's view shortcut off
    (every movement op decided by ``Tracker._movement``: qswap.honesty.tracker ``_one_move``).
    A first audit runs before both: a model may make state on its first call (fairseq's
    decoder keeps its future mask), which the next audit sees as a tensor attribute. Worker
    threads' names (``Thread-7``: a process-wide count) are read as ``Thread-N``."""
    import json
    import re

    from qswap.honesty import tracker

    def report() -> dict:
        return json.loads(re.sub(r"Thread-\d+", "Thread-N", json.dumps(audit().to_dict())))

    audit()
    fast = report()
    with monkeypatch.context() as m:
        m.setattr(tracker, "_one_move", lambda func, name, rule, refined: None)
        return fast, report()
