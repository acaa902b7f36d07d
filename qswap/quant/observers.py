"""Observers: small modules that turn observed tensors into a (min, max) range.

Each keeps its range in buffers (saved in the state_dict, synchronized by DDP like any buffer).
``minmax`` keeps the running extremes; ``moving_average`` an exponential average of per-batch
extremes; ``percentile`` and ``mse`` average a per-batch clipped range (the given percentile,
or the clipping ratio that minimizes the quantization MSE of that batch).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qswap.errors import CalibrationError, SpecError
from qswap.quant import fused
from qswap.quant.lazy_state import LazyStateModule
from qswap.quant.primitives import (AXIS_ADVICE, MAX_RANGE, MIN_SCALE, all_finite, channel_axis, choose_qparams,
                                    choose_qparams_scalar, fake_quantize, groups_view, reduce_min_max)
from qswap.quant.spec import QuantSpec

NONFINITE_INPUT = ("observed a tensor with NaN or inf values; quantization ranges need finite data (check the "
                   "input features or the model)")
_MSE_RATIOS = torch.linspace(0.3, 1.0, 15)
_MSE_BATCHED_MAX = 1 << 24  # elements of the all-candidates pass (64 MB of float32); larger: the loop


class Observer(LazyStateModule):
    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)
        self.num_batches.zero_()

    @property
    def has_range(self) -> bool:
        return self.min_val.numel() > 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the range of ``x`` and return ``x`` unchanged (a pass-through, like torch's
        observers: module hooks, fairseq's among them, expect a forward to return a tensor)."""
        if x.numel() == 0:
            return x
        lo, hi = self.batch_range(x.detach().float())
        if not all_finite(lo, hi):
            raise CalibrationError(NONFINITE_INPUT)
        if not self.has_range:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        elif lo.shape != self.min_val.shape:
            raise SpecError(
                f"{self.spec.granularity} ranges of shape {tuple(lo.shape)} after ranges of shape "
                f"{tuple(self.min_val.shape)} (tensor shape {tuple(x.shape)}): per-channel and per-group "
                f"grids need an axis whose size never changes, not a time, key or batch axis: {AXIS_ADVICE}")
        else:
            self.min_val, self.max_val = self.combine(self.min_val, self.max_val, lo, hi)
        self.num_batches.add_(1)
        return x

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reduce_min_max(x, self.spec)

    def combine(self, mn, mx, lo, hi):
        """The new range from the running one (``mn``, ``mx``) and a batch's (``lo``, ``hi``).

        Called with float32 tensors (``forward``) or ``np.float32`` scalars (``observe_scalar``):
        the same float32 arithmetic either way."""
        n1 = _as_operand(self.num_batches.item() + 1, lo)  # running mean of per-batch ranges
        return mn + (lo - mn) / n1, mx + (hi - mx) / n1

    scalar_path = True  # min/max-family observers: ``observe_scalar`` computes what forward does

    def observe_scalar(self, x: torch.Tensor, grid_of: QuantSpec | None = None) -> tuple | None:
        """``forward`` for a per-tensor spec, with the new range returned as Python numbers (min,
        max); with ``grid_of`` its grid too, as ``choose_qparams_scalar`` sets it: (min, max, scale,
        zero point, the float32 1 / scale or None). Calibration runs it for every activation
        quantizer on every batch: for the observers whose rule the kernel has (``_KERNEL_RULES``),
        one call of qswap's kernel (``fused.observe``: the extremes, the running range and the grid),
        else one read of the extremes (``fused.min_max``, else ``aminmax``) and the same float32
        arithmetic on numpy scalars; the same numbers either way (``tests/quant/test_fused.py``). No
        ``no_grad`` needed: it reads a detached input and writes buffers. None for an empty tensor."""
        if x.numel() == 0:
            return None
        buffers = self._buffers  # read once: ``Module.__getattr__`` per buffer costs more, per call
        min_val, max_val, count = buffers["min_val"], buffers["max_val"], buffers["num_batches"]
        has_range = min_val.numel() > 0
        rule = _KERNEL_RULES.get(type(self))  # this very class: a subclass may combine otherwise
        found = None
        if rule is not None:
            operand = float(count.item() + 1) if rule == 0 else self.spec.momentum if rule == 2 else 0.0
            found = fused.observe(x, rule, (min_val.item(), max_val.item()) if has_range else None, operand,
                                  (MIN_SCALE, MAX_RANGE), grid_of)
        if found is not None:
            if found[0] == 1:
                raise CalibrationError(NONFINITE_INPUT)
            lo, hi = found[1], found[2]
            out = (lo, hi) if grid_of is None else (lo, hi, found[3], int(found[4]), found[5]) if found[0] == 0 else None
        else:
            lo, hi = self._combined_scalar(x, min_val, max_val, has_range)
            out = None
        if has_range:
            min_val.fill_(lo)
            max_val.fill_(hi)
        else:
            self.min_val = torch.tensor(lo, device=x.device)
            self.max_val = torch.tensor(hi, device=x.device)
        count.add_(1)
        if out is None and grid_of is not None:  # raises for a range that is not finite, as the kernel's status 2
            out = (lo, hi, *choose_qparams_scalar(lo, hi, grid_of), None)
        return out if out is not None else (lo, hi)

    def _combined_scalar(self, x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor,
                         has_range: bool) -> tuple[float, float]:
        """``observe_scalar``'s new range where the kernel does not compute it: ``x``'s extremes
        (``fused.min_max``, else ``aminmax``) combined with the running range by ``combine`` on
        numpy float32 scalars."""
        found = fused.min_max(x)  # one pass of qswap's kernel, where it can read x
        if found is None:
            lo_t, hi_t = torch.aminmax(x.detach().float())
            lo, hi = lo_t.item(), hi_t.item()
            nonfinite = not (math.isfinite(lo) and math.isfinite(hi))
        else:
            lo, hi, nonfinite = found
        if nonfinite:
            raise CalibrationError(NONFINITE_INPUT)
        lo, hi = np.float32(lo), np.float32(hi)
        if has_range:
            lo, hi = self.combine(np.float32(min_val.item()), np.float32(max_val.item()), lo, hi)
        return float(lo), float(hi)

    def extra_repr(self) -> str:
        return f"batches={int(self.num_batches)}"


class MinMaxObserver(Observer):
    def combine(self, mn, mx, lo, hi):
        if isinstance(lo, torch.Tensor):
            return torch.minimum(mn, lo), torch.maximum(mx, hi)
        return min(mn, lo), max(mx, hi)


class MovingAverageMinMaxObserver(Observer):
    def combine(self, mn, mx, lo, hi):
        m = _as_operand(self.spec.momentum, lo)
        return mn + m * (lo - mn), mx + m * (hi - mx)


class PercentileObserver(Observer):
    scalar_path = False

    def batch_range(self, x):  # per tensor only: QuantSpec refuses percentile per channel or group
        p = self.spec.percentile / 100.0
        return exact_quantiles(x.reshape(-1), torch.tensor([1.0 - p, p]))


def exact_quantiles(flat: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.quantile(flat, q)`` for two float32 levels ``q = (q_lo, q_hi)`` with ``q_lo < 0.5 <
    q_hi``, bit for bit (the same float32 ranks, neighbours and ``lerp``; NaN in, NaN out), for a
    tensor of any size: the neighbours of each rank come from its own tail (``topk`` of the smaller
    side) instead of a full sort. ``torch.quantile`` refuses more than 16M elements, and a strided
    sample of a larger tensor aligns with its feature axis (a stride of 2 over 256 features reads
    the even channels only: an outlier channel at an odd index was never seen)."""
    n = flat.numel()
    if bool(torch.isnan(flat).any()):
        nan = torch.tensor(float("nan"), device=flat.device)
        return nan, nan.clone()
    # torch.quantile's float32 ranks where float32 holds n - 1 exactly (its own limit is 16M
    # elements); beyond 2^24 float64, else a rank could round past the last element
    ranks = q.to(torch.float32 if n <= 2 ** 24 else torch.float64) * (n - 1)
    below, above = ranks.long().clamp(0, n - 1), ranks.ceil().long().clamp(0, n - 1)
    weights = (ranks - below).to(flat.device)
    (b_lo, b_hi), (a_lo, a_hi) = below.tolist(), above.tolist()
    low = torch.topk(flat, a_lo + 1, largest=False).values  # the a_lo + 1 smallest, ascending
    high = torch.topk(flat, n - b_hi).values  # the n - b_hi largest, descending: [-1] is sorted[b_hi]
    lo = _lerp(low[b_lo], low[a_lo], weights[0])
    hi = _lerp(high[n - 1 - b_hi], high[n - 1 - a_hi], weights[1])
    return lo, hi


def _lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.lerp`` (torch.quantile's float32 interpolation, bit for bit), in float64 where the
    float32 one overflows between finite neighbours (-3e38 and 3e38: ``end - start`` is inf in
    float32, and the percentile had been refused as 'NaN or inf input'); a value between two
    finite float32s is one."""
    value = torch.lerp(start, end, weight)
    if bool(torch.isfinite(value)) or not (bool(torch.isfinite(start)) and bool(torch.isfinite(end))):
        return value
    return torch.lerp(start.double(), end.double(), weight.double()).to(start.dtype)


class MSEObserver(Observer):
    scalar_path = False

    def batch_range(self, x):
        lo, hi = reduce_min_max(x, self.spec)
        finite, wide = _range_facts(lo, hi, x.numel())
        if not finite:  # forward refuses it; scaled candidates of a finite range are finite
            return lo, hi
        if (self.spec.granularity == "per_channel" and channel_axis(x, self.spec) == 0
                and x.numel() * len(_MSE_RATIOS) <= _MSE_BATCHED_MAX):
            return self._batched_range(x, lo, hi, wide)
        best_err, best = None, (lo, hi)
        for r in _MSE_RATIOS.tolist():
            cand_lo, cand_hi = lo * r, hi * r
            scale, zp = choose_qparams(cand_lo, cand_hi, self.spec, finite=True)
            xq = fake_quantize(x, scale, zp, self.spec.replace(learnable=False))
            err = _mean_at((x.double() - xq.double() if wide else x - xq).pow(2), self.spec)
            if best_err is None:
                best_err, best = err, (cand_lo, cand_hi)
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, cand_lo, best[0]), torch.where(better, cand_hi, best[1]))
        return best

    def _batched_range(self, x, lo, hi, wide: bool = False):
        """The candidate loop above for per-channel grids along axis 0 (weights: QAT re-observes
        each one every update), all candidates in one pass: the candidates' channels stacked
        along axis 0 (R * C channels), each element's arithmetic and each channel's mean the
        loop's, and ``argmin``'s first minimum the loop's strict ``<``. Same ranges, bit for bit
        on the CPU (``tests/quant/test_observers.py``), in a few dozen ops instead of hundreds."""
        ratios = _MSE_RATIOS.to(lo.device)[:, None]  # (R, 1): float32, as lo * r computes
        cand_lo, cand_hi = (lo[None] * ratios).reshape(-1), (hi[None] * ratios).reshape(-1)  # (R * C,)
        scale, zp = choose_qparams(cand_lo, cand_hi, self.spec, finite=True)
        rows = x.reshape(1, x.shape[0], -1).expand(len(ratios), -1, -1).reshape(-1, x[0].numel())
        xq = fake_quantize(rows, scale, zp, self.spec.replace(axis=0, learnable=False))  # the spec's axis may be -1
        diff = rows.double() - xq.double() if wide else rows - xq
        err = diff.pow(2).mean(dim=1).reshape(len(ratios), -1)  # (R, C)
        pick = err.argmin(dim=0, keepdim=True)  # the first minimum, as the loop's strict <
        return (cand_lo.reshape(len(ratios), -1).gather(0, pick)[0],
                cand_hi.reshape(len(ratios), -1).gather(0, pick)[0])


def _range_facts(lo, hi, count: int) -> tuple[bool, bool]:
    """(finite, wide) of a batch's range, read back once: no NaN or inf in it, and whether the sum
    of ``count`` squared errors of values this large can overflow float32 (an error is at most
    (2 amax)^2; with every candidate's error inf, the first, most clipped, had been kept): the
    errors are then float64's. Smaller inputs (any real activation or weight) keep float32's
    errors, bit for bit the ranges they always had."""
    if lo.numel() == 0:
        return all_finite(lo, hi), False
    amax = float(torch.maximum(lo.abs().max(), hi.abs().max()))  # NaN and inf carry through
    return math.isfinite(amax), 4.0 * amax * amax * max(count, 1) > 2.0 ** 127


def _as_operand(c: float, like):
    """A Python constant for float32 arithmetic with ``like``: ``np.float32`` next to numpy
    scalars (numpy 1.x promotes np.float32 with a Python float to float64), unchanged next to
    tensors (torch keeps a float32 tensor float32)."""
    return np.float32(c) if isinstance(like, np.generic) else c


def _mean_at(err: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == "per_tensor":
        return err.mean()
    if spec.granularity == "per_channel":
        axis = channel_axis(err, spec)
        return err.movedim(axis, 0).reshape(err.shape[axis], -1).mean(dim=1)
    return groups_view(err, spec).mean(dim=2)  # (rows, G)


OBSERVER_CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


# The observers whose ``combine`` the kernel computes (``fused.observe``'s rule), by exact class: 0 the
# running mean of per-batch ranges, 1 the running extremes, 2 the moving average.
_KERNEL_RULES = {Observer: 0, MinMaxObserver: 1, MovingAverageMinMaxObserver: 2}


def make_observer(spec: QuantSpec) -> Observer:
    return OBSERVER_CLASSES[spec.observer](spec)
