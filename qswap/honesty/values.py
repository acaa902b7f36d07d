"""The value-level check: a second line beside the provenance tags (``qswap.audit(...,
values=True)``, ``qswap audit --values``).

It looks only at numbers: each float operand of a compute op must take its values on a uniform
grid of at most 2^bits levels, per tensor or per channel (axis 0 or the last axis). ``bits`` is
the width the operand's tag claims when it comes from a quantizer, else the widest activation or
weight width in the model. Infinities count as masked entries; NaN is off every grid. A grid
need not have every level present: the smallest gap between distinct values is tried as every
whole number of steps that fits the bound, and every value must sit within 1e-3 steps of a level
(so a tensor of three distinct values is on some grid almost always: a limit of any value test).

An operand claimed 24 bits or wider (an int32 bias) is not checked: such a grid is as dense as
float32 itself, so no value could be off it. Ops the tags count as one simulated integer kernel
(kernel-internal), constant folding and index math are not checked either.
"""
from __future__ import annotations

import torch

MAX_CHECKED_BITS = 16  # wider grids (int32 biases) cannot be told apart from float32 by value
CODE_TOL = 1e-3  # in grid steps, as the quantizer check (qswap.honesty.tags.ATOL)
_MAX_CHANNELS = 4096  # per-channel grids: at most this many channels are tried


def on_uniform_grid(t: torch.Tensor, bits: int) -> bool:
    """``t``'s values lie on a uniform grid of at most ``2**bits`` levels, per tensor or per
    channel (axis 0 or -1)."""
    if bits > MAX_CHECKED_BITS or t.numel() == 0:
        return True
    with torch._C._DisableTorchDispatch():  # noqa: SLF001  (the audit's own arithmetic)
        values = t.detach().float()
        if _grid(values.reshape(-1), bits):
            return True
        if values.dim() < 2:
            return False
        rows = values.reshape(-1, values.size(-1))  # per row: channel 0 moved by a lookup, too
        for channels in (values.unbind(0), rows.unbind(0), rows.unbind(1)):
            if len(channels) <= _MAX_CHANNELS and all(_grid(c.reshape(-1), bits) for c in channels):
                return True
    return False


def _grid(values: torch.Tensor, bits: int) -> bool:
    if bool(torch.isnan(values).any()):
        return False
    levels = torch.unique(values[torch.isfinite(values)]).double()  # sorted
    if levels.numel() <= 2:
        return True
    if levels.numel() > 2 ** bits:
        return False
    offsets, span = levels - levels[0], float(levels[-1] - levels[0])
    smallest = float((levels[1:] - levels[:-1]).min())
    # the smallest gap spans d >= 1 steps, with at most 2**bits - 1 steps in all
    d = torch.arange(1, max(1, int(2 ** bits * smallest / span)) + 1, dtype=torch.float64)
    steps = torch.round(span / (smallest / d))  # how many steps the span is, for each d
    steps = steps[(steps >= 1) & (steps <= 2 ** bits - 1)]
    if steps.numel() == 0:
        return False
    codes = offsets[None, :] * (steps[:, None] / span)  # (candidates, levels)
    return bool(((codes - codes.round()).abs() <= CODE_TOL).all(dim=1).any())
