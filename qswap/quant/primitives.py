"""Pure quantization functions: no modules, no state.

===========  =====================  ===============================================
granularity  scale/zero_point shape  meaning
===========  =====================  ===============================================
per_tensor   ()                      one scale for the whole tensor
per_channel  (C,)                    one scale per index along ``spec.channel_axis``
per_group    (..., G)                ``channel_axis`` split into blocks of
                                     ``group_size``; one scale per block and per
                                     position of every other axis
===========  =====================  ===============================================

``fake_quantize`` returns floats on the grid (quantize then dequantize, with a straight-through
gradient); ``quantize`` returns integer codes; ``dequantize`` maps codes back to floats.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from qswap.errors import CalibrationError, SpecError
from qswap.quant import fused
from qswap.quant.spec import QuantSpec

# Smallest scale we ever emit: keeps all-zero or constant tensors finite (never 0 or NaN).
MIN_SCALE = float(torch.finfo(torch.float32).eps)
# Ranges are clipped to +-float32 max / 8: wider ones overflow the scale or the grid's ends to inf.
MAX_RANGE = float(torch.finfo(torch.float32).max) / 8
_FLOOR_SLACK = 2.0 ** -20  # 8 float32 ulps, relative


# what an activation grid per channel needs, said where one meets a tensor it does not fit: the
# axis differs per site, so a per-channel spec belongs to the sites that have one, not to every site
AXIS_ADVICE = ("a linear's input and the residual stream have their features on axis -1, a convolution's input on "
               "axis 1 (its last axis is time), an attention's scores and softmax none (their last axis is the "
               "keys, the first the batch and heads); give per_channel activation grids to those sites alone (a "
               "rule's or the defaults' sites: entries, as the shipped stream recipes do), not to the defaults' "
               "activation spec")


def channel_axis(x: torch.Tensor, spec: QuantSpec) -> int:
    """The spec's scale-carrying axis of ``x`` as a non-negative index; a typed error when ``x``
    has no such axis (a recipe's ``axis: 2`` on a 2-d weight must not wrap around to axis 0)."""
    axis = spec.channel_axis
    if not -x.dim() <= axis < x.dim():
        raise SpecError(f"{spec.granularity} quantization along axis {axis} of a {x.dim()}-d tensor "
                        f"(shape {tuple(x.shape)}): pick an axis between {-x.dim()} and {x.dim() - 1}")
    return axis % x.dim()


def groups_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(..., N along axis, ...) -> (rows, G, group_size) with the group axis moved last."""
    axis = channel_axis(x, spec)
    size = x.shape[axis]
    if size % spec.group_size:
        raise SpecError(f"per_group quantization needs axis {axis} (size {size}) divisible by "
                        f"group_size {spec.group_size}; pick a group_size that divides {size}")
    moved = x.movedim(axis, -1)  # (..., N)
    return moved.reshape(-1, size // spec.group_size, spec.group_size)  # (rows, G, gs)


def all_finite(*tensors: torch.Tensor) -> bool:
    """No NaN or inf in any of the tensors. On the CPU a one-element tensor is read as a number
    (one ``item()`` instead of two kernels); elsewhere the tensors are read back once together
    (each read-back waits for the device)."""
    if all(t.device.type == "cpu" and t.numel() == 1 for t in tensors):
        return all(math.isfinite(t.item()) for t in tensors)
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).all())


def reduce_min_max(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` at the spec's granularity (shapes as in the module table)."""
    x = x.detach()
    if spec.granularity == "per_tensor":
        return torch.aminmax(x)
    if spec.granularity == "per_channel":
        axis = channel_axis(x, spec)
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, rest)
        return torch.aminmax(flat, dim=1)
    groups = groups_view(x, spec)  # (rows, G, gs)
    return torch.aminmax(groups, dim=2)  # (rows, G)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor,
                   spec: QuantSpec, *, finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that cover [min_val, max_val] (always including 0).

    A zero or constant range gets the smallest finite scale, never 0, inf or NaN. ``finite``: the
    caller has already checked the range (the check reads the tensors back: on a GPU, a wait for
    every kernel queued before it).
    """
    if not finite and not all_finite(min_val, max_val):
        raise CalibrationError("cannot choose quantization parameters for non-finite values "
                               "(NaN or inf in the observed tensor); check the input data")
    lo = torch.clamp(min_val.float(), min=-MAX_RANGE, max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0, max=MAX_RANGE)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = torch.maximum(-lo, hi) if spec.signed else hi
        scale = amax / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = None
    scale = torch.clamp(scale, min=MIN_SCALE)
    if spec.scale_type == "pow2":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if zero_point is None:
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale.to(torch.float32), zero_point


def choose_qparams_scalar(lo: float, hi: float, spec: QuantSpec) -> tuple[float, int]:
    """``choose_qparams`` of one per-tensor range given as Python numbers: the same float32
    arithmetic on numpy float32 scalars (IEEE float32 like torch's CPU kernels, about 50x less
    overhead than 0-d tensor ops), bit for bit the same scale and zero point. Not for power-of-two
    scales (``log2`` / ``exp2`` implementations may differ): use ``choose_qparams`` for those."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationError("cannot choose quantization parameters for non-finite values "
                               "(NaN or inf in the observed tensor); check the input data")
    f32 = np.float32
    lo32 = min(max(f32(lo), f32(-MAX_RANGE)), f32(0.0))
    hi32 = min(max(f32(hi), f32(0.0)), f32(MAX_RANGE))
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = max(-lo32, hi32) if spec.signed else hi32
        scale = max(f32(amax / f32(qmax)), f32(MIN_SCALE))
        return float(scale), 0
    scale = max(f32((hi32 - lo32) / f32(qmax - qmin)), f32(MIN_SCALE))
    zero_point = f32(f32(qmin) - np.round(f32(lo32 / scale)))
    return float(scale), int(min(max(zero_point, f32(qmin)), f32(qmax)))


def _broadcast(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape per-channel qparams (C,) so they broadcast against x."""
    shape = [1] * x.dim()
    shape[channel_axis(x, spec)] = -1
    return t.reshape(shape)


def _round(t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half_even":
        return torch.round(t)
    if mode == "half_away":
        # not sign(t) floor(|t| + 0.5): in float32 0.49999997 + 0.5 rounds to 1.0 (a code away
        # from zero); half to even is exact, and only exact ties (a fraction of 0.5, computed
        # exactly) go away from zero instead
        whole = torch.trunc(t)
        return torch.where((t - whole).abs() == 0.5, whole + torch.sign(t), torch.round(t))
    # A grid value divided by its scale can land a rounding error below its integer code; floor
    # must keep that code, or fake-quantizing twice would move the value down a step.
    return torch.floor(t + t.abs() * _FLOOR_SLACK)


def _round_ste(t: torch.Tensor, mode: str) -> torch.Tensor:
    return t + (_round(t, mode) - t).detach()


def _fused_ok(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> bool:
    return (spec.rounding == "half_even" and x.dtype == torch.float32
            and not scale.requires_grad and spec.granularity != "per_group")


# torch's fused per-tensor CPU kernel is a scalar loop that also writes a gradient mask; the same
# arithmetic in vectorized in-place passes is faster at every size a model produces (measured:
# equal at 900 elements, 7x at 50k, 10x at 850k; at a decoding step's 4k, 2x).
_ZERO = torch.zeros(())


class PassGrid(NamedTuple):
    """A per-tensor grid made ready for ``fake_quantize_grid``, once per change of the grid (a
    frozen quantizer keeps one): no tensor read and no Python-number conversion per call."""

    scale: float
    zero_point: int
    inverse: torch.Tensor | None  # 0-d float32: 1 / scale rounded to float32 (what the torch passes multiply
    # by); None in a grid ``observed_grid`` made for a tensor the kernel rounds
    lo: int  # qmin - zero_point: the lowest code minus the zero point
    hi: int  # qmax - zero_point
    inverse_value: float  # ``inverse`` as a Python number (exactly: a float32), for the C kernel


def _bad_scale(scale, spec: QuantSpec) -> SpecError:
    """The error for a grid whose scale (or one of its channels' scales) is 0, not finite, or so
    small (subnormal) that its float32 inverse is not finite."""
    return SpecError(f"a quantization grid needs a finite nonzero scale whose inverse is finite in float32 "
                     f"(not below about 3e-39), got {scale} ({spec.short()}; a learned "
                     f"scale trained to 0, or a grid set by hand): recalibrate the model (qswap calibrate) "
                     f"or retrain its scales with a smaller learning rate")


def pass_grid(scale: float, zero_point: int, spec: QuantSpec) -> PassGrid:
    """The ``PassGrid`` of a per-tensor ``scale`` and ``zero_point`` given as Python numbers;
    SpecError for a scale that is 0 or not finite (a learned scale trained to 0)."""
    if scale == 0 or not math.isfinite(scale):
        raise _bad_scale(scale, spec)
    inverse = torch.tensor(1.0 / scale, dtype=torch.float32)  # float32(1 / s), as a float32 op gets it
    if not math.isfinite(inverse.item()):  # a subnormal scale (a loaded or hand-set grid): 0 * inf is NaN
        raise _bad_scale(scale, spec)
    return PassGrid(scale, zero_point, inverse, spec.qmin - zero_point, spec.qmax - zero_point, inverse.item())


def observed_grid(scale: float, zero_point: int, inverse: float | None, spec: QuantSpec, x: torch.Tensor) -> PassGrid:
    """``pass_grid(scale, zero_point, spec)`` for a calibration step that rounds ``x`` onto the grid
    it just set, given the float32 ``inverse`` the kernel computed with it (``fused.observe``;
    None: not computed): where the kernel rounds ``x`` (``fused.applies``) no 0-d tensor is made
    (``inverse`` None in the grid: only for ``x`` itself, which ``fake_quantize_grid`` and
    ``fake_quantize_grid_`` then hand the kernel without checking it again)."""
    if inverse is None or not fused.applies(x):
        return pass_grid(scale, zero_point, spec)
    return PassGrid(scale, zero_point, None, spec.qmin - zero_point, spec.qmax - zero_point, inverse)


def passes_apply(x: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether ``fake_quantize_passes`` computes this fake-quantization: per-tensor, round half to
    even, float32 on CPU, and no gradient needed through it."""
    return (spec.granularity == "per_tensor" and spec.rounding == "half_even" and x.dtype == torch.float32
            and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled()))


def fake_quantize_passes(x: torch.Tensor, scale: float, zero_point: int, spec: QuantSpec) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine`` bit for bit on finite and infinite inputs, without
    autograd: ``x * (1 / scale)`` in float32, rounded half to even, clamped to the codes' range,
    times ``scale`` (+0.0: a zero code is +0.0, as the kernel's integer is). ``scale`` and
    ``zero_point`` are Python numbers (a frozen quantizer keeps them, no tensor read per call).

    A NaN stays NaN (the kernel turns it into the grid's lowest value, hiding a broken input).
    Per-tensor; per channel: ``fake_quantize_channel_passes``."""
    return fake_quantize_grid(x, pass_grid(scale, zero_point, spec))


def fake_quantize_grid(x: torch.Tensor, grid: PassGrid) -> torch.Tensor:
    """``fake_quantize_passes`` on a prepared grid: one pass of the C kernel where it may run
    (``qswap.quant.fused``), else ``grid_passes``; the same values either way."""
    if grid.inverse is None or fused.applies(x):  # None: made for this x, which the kernel rounds (observed_grid)
        return fused.fake_quantize_into(x, torch.empty_like(x), grid.inverse_value, grid.lo, grid.hi, grid.scale)
    return grid_passes(x, grid)


def grid_passes(x: torch.Tensor, grid: PassGrid) -> torch.Tensor:
    """``fake_quantize_grid`` as four torch dispatches, none of them a cast (a Python float operand
    would be wrapped as a float64 tensor and cast to float32 on every call): the definition the
    C kernel is tested against, and what runs where it may not (a dispatch mode watching, a trace,
    autograd, another dtype or device)."""
    out = torch.mul(x, grid.inverse)  # the float32 product with 1 / s, which the kernel multiplies by
    out.round_().clamp_(grid.lo, grid.hi)
    return torch.add(_ZERO, out, alpha=grid.scale, out=out)


def fake_quantize_grid_(x: torch.Tensor, grid: PassGrid) -> torch.Tensor:
    """``fake_quantize_grid`` written into ``x`` (a dense tensor its caller gives up: ``fused.dense``), which
    it returns: the same operations on the same values, so the same result bit for bit, and no
    output allocated (a batch's activation is a fresh block of memory for every new tensor)."""
    if grid.inverse is None or fused.applies(x):  # None: made for this x, which the kernel rounds (observed_grid)
        return fused.fake_quantize_into(x, x, grid.inverse_value, grid.lo, grid.hi, grid.scale)
    x.mul_(grid.inverse).round_().clamp_(grid.lo, grid.hi)
    return torch.add(_ZERO, x, alpha=grid.scale, out=x)


class ChannelGrid(NamedTuple):
    """A frozen per-channel grid of the last axis made ready for ``fake_quantize_channel_grid``,
    once per change of the grid: each part one contiguous float32 value per channel, computed as
    ``fake_quantize_channel_passes`` computes it per call."""

    inverse: torch.Tensor  # float32 1 / scale (the float32 division)
    lo: torch.Tensor  # qmin - zero_point, as float32
    hi: torch.Tensor  # qmax - zero_point, as float32
    scale: torch.Tensor
    channels: int


def channel_grid(scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> ChannelGrid:
    """The ``ChannelGrid`` of per-channel ``scale`` and ``zero_point`` (one value per channel of the
    last axis); SpecError for a scale that is 0 or not finite, as ``pass_grid``."""
    scale = scale.detach().to(torch.float32).reshape(-1).contiguous()
    if not bool(torch.isfinite(scale).all()) or not bool(torch.isfinite(1.0 / scale).all()):
        raise _bad_scale(scale.tolist(), spec)  # 0, not finite, or subnormal (1 / scale is inf)
    zero_point = zero_point.reshape(-1)
    return ChannelGrid((1.0 / scale).contiguous(), (spec.qmin - zero_point).to(torch.float32).contiguous(),
                       (spec.qmax - zero_point).to(torch.float32).contiguous(), scale.clone(), scale.numel())


def fake_quantize_channel_grid(x: torch.Tensor, grid: ChannelGrid) -> torch.Tensor:
    """``fake_quantize_channel_passes`` along the last axis of ``x`` on a prepared grid: one pass of
    the C kernel where it may run (a contiguous ``x``, ``qswap.quant.fused``), else the passes on
    the kept tensors; the same values either way (``tests/quant/test_fused.py``)."""
    if fused.CHANNELS and fused.applies(x) and x.is_contiguous():
        return fused.fake_quantize_channels_into(x, torch.empty_like(x, memory_format=torch.contiguous_format), grid)
    return _channel_passes(x, grid.inverse, grid.lo, grid.hi, grid.scale)


def fake_quantize_channel_passes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                                 spec: QuantSpec) -> torch.Tensor:
    """``torch.fake_quantize_per_channel_affine`` without autograd, as ``grid_passes`` per channel:
    ``round(x * float32(1 / scale))`` clamped to the codes' range (relative to the zero point),
    times ``scale``, plus +0.0 (a zero code is +0.0, as the kernel's integer is). The kernel's
    values on finite codes; a value beyond the grid, +-inf too, saturates (the kernel's int64 cast
    wrapped a huge positive one to qmin) and a NaN stays NaN, as in ``fake_quantize_passes``."""
    inverse = _broadcast(1.0 / scale, x, spec)
    lo, hi = _broadcast(spec.qmin - zero_point, x, spec), _broadcast(spec.qmax - zero_point, x, spec)
    return _channel_passes(x, inverse, lo, hi, _broadcast(scale, x, spec))


def _channel_passes(x: torch.Tensor, inverse: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """``round(x * inverse)`` clamped to [lo, hi], times ``scale``, plus +0.0: the per-channel
    passes, on parts that broadcast against ``x``."""
    out = torch.mul(x, inverse).round_()
    return torch.clamp(out, lo, hi, out=out).mul_(scale).add_(0.0)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``x``: floats that lie exactly on the spec's grid.

    Gradients are straight-through inside [qmin, qmax] and zero outside. When ``scale``
    requires grad (LSQ), it receives the LSQ gradient through the differentiable path.
    """
    if (x.dtype is not torch.float32 or scale.dtype is not torch.float32) and (x.dtype in _HALF or scale.dtype in _HALF):
        # float16 / bfloat16 (a model.half(), fairseq --fp16 or --amp): 1 / scale of a scale below
        # 2^-16 is inf in float16 (0 * inf is NaN), and 16-bit floats round a fine grid's codes:
        # the grid arithmetic is float32's, the result cast back to x's dtype
        return fake_quantize(x.float(), scale.float(), zero_point, spec).to(x.dtype)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.granularity == "per_tensor" and scale.numel() != 1:  # a per-channel state loaded into it
        raise SpecError(f"a per_tensor grid has one scale, got {scale.numel()} (shape {tuple(scale.shape)}): the "
                        f"quantizer's state comes from another recipe's model; load the checkpoint it was saved "
                        f"with, or convert and calibrate this model again")
    if spec.granularity == "per_channel" and scale.numel() != x.shape[channel_axis(x, spec)]:
        raise SpecError(
            f"{scale.numel()} per-channel scales for axis {spec.channel_axis} of size "
            f"{x.shape[channel_axis(x, spec)]} (tensor shape {tuple(x.shape)}): per-channel grids need an "
            f"axis whose size never changes (a weight's output channels; an activation's features), not a "
            f"time, key or batch axis: {AXIS_ADVICE}")
    if _fused_ok(x, spec, scale):
        if spec.granularity == "per_tensor":
            if passes_apply(x, spec):
                return fake_quantize_passes(x, float(scale), int(zero_point), spec)
            out = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
            return _nan_kept(x, out) if torch.is_grad_enabled() else out  # a training step's features too
        if not (x.requires_grad and torch.is_grad_enabled()):
            return fake_quantize_channel_passes(x, scale, zero_point, spec)
        # the kernel casts codes to int64 before clamping: beyond int64 (+inf too) a code wraps to
        # qmin. Clamped a step beyond the grid first (as _fake_quantize_ref), they saturate
        # (a NaN, which the kernel turns into qmin as torch's per-tensor kernel does, is put back)
        lo = _broadcast((qmin - zero_point - 1) * scale, x, spec)
        hi = _broadcast((qmax - zero_point + 1) * scale, x, spec)
        return _nan_kept(x, torch.fake_quantize_per_channel_affine(torch.clamp(x, lo, hi), scale, zero_point,
                                                                   channel_axis(x, spec), qmin, qmax))
    if spec.granularity == "per_group":
        groups = groups_view(x, spec)  # (rows, G, gs)
        out = _fake_quantize_ref(groups, scale.reshape(groups.shape[:2] + (1,)),
                                 zero_point.reshape(groups.shape[:2] + (1,)), spec)
        axis = channel_axis(x, spec)
        moved_shape = x.movedim(axis, -1).shape
        return out.reshape(moved_shape).movedim(-1, axis)
    if spec.granularity == "per_channel":
        scale, zero_point = _broadcast(scale, x, spec), _broadcast(zero_point, x, spec)
    return _fake_quantize_ref(x, scale, zero_point, spec)


_HALF = (torch.float16, torch.bfloat16)


def _nan_kept(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """torch's fake-quant kernels turn NaN into qmin's value: in a training forward (a float16
    overflow, broken features) a NaN would go on as a finite number; CPU inference keeps NaN, and
    so does every forward with gradients enabled now (two extra passes; inference under no_grad on
    other devices is unchanged)."""
    return torch.where(torch.isnan(x), x, out)


def _fake_quantize_ref(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       spec: QuantSpec) -> torch.Tensor:
    zp = zero_point.to(x.dtype)
    # x * (1 / scale), the product every other path rounds (torch's kernels, the passes, codes() and
    # the integer forms): x / scale rounds a near-tie differently, and an LSQ training forward
    # then computed other values than evaluation on the same grid (still differentiable in scale).
    # It overflows to inf for huge x and a tiny scale, and the straight-through estimator would
    # turn inf into NaN (inf - inf); values a step beyond the grid are clamped anyway.
    t = torch.clamp(x * (1.0 / scale), spec.qmin - zp - 1, spec.qmax - zp + 1)
    codes = torch.clamp(_round_ste(t, spec.rounding) + zp, spec.qmin, spec.qmax)
    return (codes - zp) * scale


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.bits <= 8:
        return torch.int8 if spec.signed else torch.uint8
    if spec.bits <= 15 or (spec.bits == 16 and spec.signed):
        return torch.int16
    return torch.int32


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             spec: QuantSpec) -> torch.Tensor:
    """Integer codes of ``x`` (int8/uint8 up to 8 bits, int16 or int32 above)."""
    with torch.no_grad():
        fq = fake_quantize(x.float(), scale, zero_point, spec.replace(learnable=False))
        if spec.granularity == "per_group":
            groups = groups_view(fq, spec)
            codes = torch.round(groups / scale.reshape(groups.shape[:2] + (1,))) \
                + zero_point.reshape(groups.shape[:2] + (1,))
            axis = channel_axis(x, spec)
            codes = codes.reshape(fq.movedim(axis, -1).shape).movedim(-1, axis)
        elif spec.granularity == "per_channel":
            codes = torch.round(fq / _broadcast(scale, fq, spec)) + _broadcast(zero_point, fq, spec)
        else:
            codes = torch.round(fq / scale) + zero_point
    return codes.to(_code_dtype(spec))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               spec: QuantSpec) -> torch.Tensor:
    """Floats from integer codes: ``(codes - zero_point) * scale``."""
    c = codes.to(torch.float32)
    if spec.granularity == "per_group":
        groups = groups_view(c, spec)
        out = (groups - zero_point.reshape(groups.shape[:2] + (1,))) * scale.reshape(groups.shape[:2] + (1,))
        axis = channel_axis(c, spec)
        return out.reshape(c.movedim(axis, -1).shape).movedim(-1, axis)
    if spec.granularity == "per_channel":
        return (c - _broadcast(zero_point, c, spec)) * _broadcast(scale, c, spec)
    return (c - zero_point) * scale
