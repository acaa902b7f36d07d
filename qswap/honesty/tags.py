"""What the audit knows about a float tensor: its provenance tag, and the on-grid check.

Tags are kept per tensor object (by identity, in a weak map, never copying data):

=========  ==============================================================================
kind       meaning
=========  ==============================================================================
quant      output of a qswap quantizer (or moved / grid-preserved from one); ``on_grid`` says
           whether its values were verified to be integer codes in [qmin, qmax]
acc        output of a matmul / conv inside a quantized counterpart: an accumulator, which
           its consumer must quantize
kernel     output of other compute on quantized operands inside a counterpart: an
           intermediate of one simulated integer kernel (usable inside that call only)
float      output of compute on float values (or an untracked tensor: a model input)
param      a parameter or buffer, or computed from parameters/buffers/constants only
const      a constant made at run time (factory op, tensor attribute of a module)
index      a float tensor converted from integer/bool data (lengths, masks); ``activation``:
           a mask computed from activations (a comparison of quantized values), which only
           masks (a product with quantized data), never index math
=========  ==============================================================================

``integral`` marks a float tensor whose values are proven integers: cast from an integer dtype
(every float of an integer is an integer), moved from such tensors, rounded (``round``,
``floor``, ``ceil``, ``trunc`` of codes or a kernel intermediate), or the output of an exact
integer GEMM (``qswap.honesty.gemm``). Other compute clears it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from qswap.quant import fused
from qswap.quant.primitives import groups_view
from qswap.quant.spec import QuantSpec

QUANT, ACC, KERNEL, FLOAT, PARAM, CONST, INDEX = "quant", "acc", "kernel", "float", "param", "const", "index"
# Tolerance of the on-grid check, in units of the grid step (codes): |code - round(code)| must
# be at most ATOL + RTOL * |code| (float32 rounding of (code - zp) * scale, read back).
ATOL, RTOL = 1e-3, 2.0 ** -18
_ZERO = torch.zeros(())  # + steps * scale: a product without casting a Python float per call
_LARGE = 4096  # elements from which ``on_grid_per_tensor`` compares by min/max in a reused buffer


@dataclass(frozen=True)
class GridInfo:
    """The grid a quantizer emitted on, and whether its output really lay on it."""

    quantizer: str  # dotted path of the quantizer module
    bits: int
    label: str  # e.g. "int8 affine per_tensor", "int32 bias"
    on_grid: bool = True
    off_count: int = 0
    numel: int = 0
    step: float | None = None  # the per-tensor scale (None: per-channel, or not known)
    zero_point: float = 0.0
    qmin: int = 0
    qmax: int = 0

    def same(self, other: "GridInfo") -> bool:
        """Both are one grid: the same quantizer, or equal per-tensor scale, zero point and range."""
        if (self.quantizer, self.label, self.step) == (other.quantizer, other.label, other.step):
            return True
        return (self.step is not None and (self.step, self.zero_point, self.qmin, self.qmax)
                == (other.step, other.zero_point, other.qmin, other.qmax))

    def holds(self, value: float) -> bool:
        """``value`` is a point of this grid: zero (code zero_point), +-inf (a masked entry), or
        (code - zero_point) * step for an integer code in [qmin, qmax]."""
        if value == 0 or math.isinf(value):
            return True
        if self.step is None or math.isnan(value):
            return False
        code = value / self.step + self.zero_point
        return abs(code - round(code)) <= ATOL and self.qmin <= round(code) <= self.qmax

    def rescaled(self, factor: float) -> "GridInfo":
        """The grid of these values times a Python number (a requantization folds it)."""
        step = self.step * factor if self.step is not None and factor > 0 else None
        return dataclasses.replace(self, quantizer=f"{self.quantizer} x {factor:g}", step=step)


@dataclass(frozen=True)
class Tag:
    kind: str
    where: str = ""  # producer description: quantizer / parameter name / "aten.op at module"
    grid: GridInfo | None = None
    call: int = -1  # counterpart call id (acc, kernel)
    zero: bool = False  # const: all zeros (on every grid)
    binary: bool = False  # index: values in {0, 1} (a mask)
    lookup: bool = False  # param/const: rows picked by an integer tensor (data-dependent)
    unseen: bool = False  # float: made where the audit does not watch ("unseen_origin")
    integral: bool = False  # its values are integers (cast from an integer dtype, or an exact integer GEMM)
    activation: bool = False  # index: computed from activations (a mask of quantized values), not index math
    # index: integer data of the model's inputs (an int16 waveform, lengths, token ids) or computed
    # from them: index math alone, but data (not a constant) to a parameter it meets in compute
    input: bool = False

    def describe(self) -> str:
        if self.kind == QUANT:
            g = self.grid
            if not g.on_grid:
                return (f"from quantizer {g.quantizer} ({g.label}) but {g.off_count} of {g.numel} "
                        f"values are off its grid")
            return f"quantized by {g.quantizer} ({g.label})"
        return {
            ACC: f"unquantized accumulator: output of {self.where}",
            KERNEL: f"unquantized intermediate: output of {self.where}",
            FLOAT: f"float: {self.where}",
            PARAM: f"raw {self.where}{' (looked up by index)' if self.lookup else ''}, never "
                   f"passed its quantizer",
            CONST: f"float constant {self.where}{' (looked up by index)' if self.lookup else ''}, "
                   f"not quantized",
            INDEX: f"float made from integer data ({self.where})",
        }[self.kind]


# A float tensor the audit never saw made (not a model input, parameter, buffer, quantizer
# output or output of an op it watched): compared by identity, reported as "unseen_origin".
UNSEEN = Tag(FLOAT, "a tensor of unseen origin (made where the audit does not watch)", unseen=True)


def off_grid_count(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QuantSpec | None, qmin: int, qmax: int) -> int:
    """How many values of ``y`` are not ``(code - zero_point) * scale`` for an integer code in
    [qmin, qmax]. ``spec`` gives the granularity (None: per-tensor, or one scale per element
    of a 1-D ``y``, as for a bias). Vectorized.

    Fast path: a quantizer computes ``(code - zero_point) * scale`` in float, so rounding
    ``y / scale`` and multiplying back reproduces an on-grid ``y`` bit for bit; then only the
    range is left to check. Anything else is counted exactly, with a tolerance."""
    values, scale, zp = _aligned(y.detach().float(), scale.detach().float(), zero_point.detach().float(), spec)
    if scale.numel() == 1 and _on_grid_per_tensor(values, float(scale), float(zp), qmin, qmax):
        return 0
    if scale.numel() > 1:
        steps = (values * torch.reciprocal(scale)).round_()  # code - zero_point, if on grid
        lo, hi = torch.aminmax(steps + zp)
        if bool(lo >= qmin) and bool(hi <= qmax) and torch.equal(steps.mul_(scale), values):
            return 0
    codes = values / scale + zp
    rounded = torch.round(codes)
    ok = (codes - rounded).abs() <= ATOL + RTOL * rounded.abs()
    ok &= (rounded >= qmin) & (rounded <= qmax)
    return int(codes.numel() - ok.sum())


def on_grid_per_tensor(y: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int,
                       inverse: torch.Tensor | None = None, scratch: "Scratch | None" = None) -> bool:
    """A quick proof that every value of a float32 ``y`` is ``(code - zp) * scale`` for an
    integer code in [qmin, qmax] (False: not proven; count with ``off_grid_count``). Rounding
    ``y / scale`` to a code, clamping it into the range and multiplying back gives a grid point,
    so ``y`` equal to that everywhere is on the grid (a value out of range is clamped, changes,
    and fails the comparison). No host sync for a small ``y``; a large one is compared by the
    difference's minimum and maximum, both exactly 0 (a NaN or an infinity in ``y`` makes them
    NaN or infinite): ``torch.equal`` is a scalar loop, several times slower there, and a large
    ``y``'s passes write into ``scratch`` (``Scratch``), if given, rather than a fresh buffer.
    ``inverse``: ``1 / scale`` as a 0-d float32 tensor (a quantizer's own, saving a cast per
    call); whatever its value, only grid points pass. A range of 2^24 codes or more (an int32
    bias) is clamped to the float32 numbers inside it (``_inside``): a code the clamp cannot
    reach fails the comparison, and is counted exactly. Where qswap's C kernel is built and ``y`` is
    a dense CPU tensor, the same comparison runs in it, reading ``y`` once (``fused.grid_mismatches``)."""
    if y.dtype != torch.float32 or zp != round(zp) or not 0 < scale < math.inf:
        return False
    lo, hi = qmin - zp, qmax - zp
    if qmax - qmin >= 2 ** 24:
        lo, hi = _inside(lo, hi)
    if y.requires_grad:
        y = y.detach()
    mismatches = fused.grid_mismatches(y, 1.0 / scale if inverse is None else float(inverse), lo, hi, scale)
    if mismatches is not None:
        return mismatches == 0
    large = y.numel() >= _LARGE
    out = scratch.like(y) if large and scratch is not None else None
    steps = torch.mul(y, 1.0 / scale if inverse is None else inverse, out=out)
    steps.round_().clamp_(lo, hi)
    torch.add(_ZERO, steps, alpha=scale, out=steps)  # the grid points: steps * scale, no cast
    if not large:
        return torch.equal(steps, y)
    lo, hi = torch.aminmax(steps.sub_(y))  # a - b is 0 only where a == b (gradual underflow, torch's default)
    return lo.item() == 0 and hi.item() == 0


@functools.lru_cache(maxsize=64)  # a pure function of two numbers: a few ranges per model
def _inside(lo: float, hi: float) -> tuple[float, float]:
    """The float32 numbers nearest to ``lo`` and ``hi`` that lie within [lo, hi]: clamp bounds a
    float32 tensor's clamp keeps as they are (float32(2^31 - 1) is 2^31, one code too far)."""
    exact = torch.tensor([lo, hi], dtype=torch.float64)
    bounds = exact.to(torch.float32)  # nearest: may lie outside
    outside = torch.tensor([bounds[0].double() < lo, bounds[1].double() > hi])
    inward = torch.nextafter(bounds, torch.tensor([math.inf, -math.inf], dtype=torch.float32))
    bounds = torch.where(outside, inward, bounds)
    return bounds[0].item(), bounds[1].item()


class Scratch:
    """One float32 buffer that the on-grid checks of an audit write into: a fresh
    multi-megabyte tensor per check costs more in page faults than the check's arithmetic.
    Its views are kept per shape (making a view costs more than a small check)."""

    __slots__ = ("_buffer", "_views")

    def __init__(self):
        self._buffer = torch.empty(0)
        self._views: dict = {}

    def like(self, y: torch.Tensor) -> torch.Tensor:
        """A contiguous float32 tensor of ``y``'s shape on its device, its values undefined."""
        view = self._views.get((y.shape, y.device))
        if view is None:
            n = y.numel()
            if self._buffer.numel() < n or self._buffer.device != y.device:
                self._buffer = torch.empty(n, dtype=torch.float32, device=y.device)
                self._views.clear()
            view = self._views[(y.shape, y.device)] = self._buffer[:n].view(y.shape)
        return view


def _on_grid_per_tensor(values: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> bool:
    steps = (values * (1.0 / scale)).round_()  # code - zero_point, if on grid
    lo, hi = torch.aminmax(steps)
    return (lo.item() + zp >= qmin and hi.item() + zp <= qmax
            and torch.equal(steps.mul_(scale), values))


def _aligned(values: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
             spec: QuantSpec | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``values`` (regrouped for per_group) with ``scale`` and ``zp`` shaped to broadcast."""
    if spec is not None and spec.granularity == "per_group":
        values = groups_view(values, spec)  # (rows, G, gs)
        return values, scale.reshape(values.shape[:2] + (1,)), zp.reshape(values.shape[:2] + (1,))
    if spec is not None and spec.granularity == "per_channel":
        shape = [1] * values.dim()
        shape[spec.channel_axis % values.dim()] = -1
        return values, scale.reshape(shape), zp.reshape(shape)
    if scale.numel() > 1:  # one scale per element of a 1-D tensor (per-channel bias)
        return values, scale.reshape(-1), zp.reshape(-1)
    return values, scale.reshape(()), zp.reshape(())
