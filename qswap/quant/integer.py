"""Integer primitives: pure functions on integer tensors (int8/int16/int32/int64), no float inside.

Floats appear only when a constant is *built* from float scales
(``quantize_multiplier``, ``build_lut``, the ``*_params`` helpers): that is constant folding done
once before execution. The functions that run on data take and return integer tensors only.

=============================  ============================  ====================================
function                       rounding                      accumulator / overflow
=============================  ============================  ====================================
quantize_multiplier            half away from zero           M0 in [2^30, 2^31) as a Python int
saturating_rounding_doubling   ties toward +inf (gemmlowp)   int64 product; saturates INT32_MIN^2
  _high_mul
rounding_divide_by_pot         half away from zero           int32, never overflows (wider
                                                             input refused)
requantize                     single: once, ties toward     int32 in, int64 product; saturates
                               +inf; double: the two above   to [qmin, qmax]
rescaled_add                   the two above, per operand    int32, bound in its docstring,
                                                             checked per call (refused)
add_constant                   constant: half to even;       int32, bound checked when built
                               then requantize (single)      and per call (refused)
isqrt                          floor (exact)                 int64 in [0, 2^62]
build_lut / apply_lut          half to even (like the grid)  table of the output dtype
integer_softmax                exp table: half to even;      row sum int32 (< 2^11 positions)
                               division: half up             or int64; int64 division (< 2^26)
integer_layer_norm(_acc)       mean exact (N*q - sum);       int64 variance, int32 affine
                               isqrt floor; division half    accumulator; sqrt_bits chosen
                               away from zero                when built (wide inputs)
common_grid                    once, ties toward +inf        int64 product; |out| <= 2^16
rescaled_sum per channel       as rescaled_add, per channel  int32, as rescaled_add
integer_group_norm             as LayerNorm; eps rounded     int64 variance (N <= 2^22),
                               half to even (exact)          int32 affine, saturating
=============================  ============================  ====================================
"""
from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from qswap.errors import IntegerizeError
from qswap.io.serializable import FLOAT, INT, Choice, Either, Obj, Opt, Tensor, Tuple, serializable
from qswap.quant.fake_quantize import FakeQuantize, quantizes
from qswap.quant.primitives import quantize

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
FLOAT32_EXACT, FLOAT64_EXACT = 2 ** 24, 2 ** 53  # every integer of at most this magnitude is representable
_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INTEGER_DTYPES:
        raise IntegerizeError(f"{name} must be an integer tensor (int8/uint8/int16/int32/int64), "
                              f"got {t.dtype}; quantize it first")


def _bounds(v) -> tuple[int, int]:
    return (int(v.min()), int(v.max())) if isinstance(v, torch.Tensor) and v.numel() else (int(v), int(v))


def check_multiplier(m0: torch.Tensor | int, shift: torch.Tensor | int) -> None:
    """IntegerizeError unless M0 is in [0, 2^31) and shift in [-31, 30] (``quantize_multiplier``'s
    range, where the int64 products and shifts of the fixed-point multiply are exact): a multiplier
    made by hand, or read from an edited file, is refused rather than wrapped silently."""
    (m_lo, m_hi), (s_lo, s_hi) = _bounds(m0), _bounds(shift)
    if not (0 <= m_lo and m_hi < 2 ** 31 and -31 <= s_lo and s_hi <= 30):
        raise IntegerizeError(f"a fixed-point multiplier needs M0 in [0, 2^31) and shift in [-31, 30], got M0 "
                              f"{m_lo}..{m_hi}, shift {s_lo}..{s_hi}; make it with quantize_multiplier")


def _check_int32(name: str, t: torch.Tensor) -> None:
    """An integer tensor whose values fit int32 (an int64 one is checked: the fixed-point multiply's
    int64 product of a larger value with M0 could wrap)."""
    _check_int(name, t)
    if t.dtype == torch.int64 and t.numel() and (int(t.min()) < INT32_MIN or int(t.max()) > INT32_MAX):
        raise IntegerizeError(f"{name} must hold int32 values, got {int(t.min())}..{int(t.max())}; the op "
                              f"before it overflowed its stated bound")


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest torch integer dtype holding every code in [qmin, qmax]."""
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


# -- fixed-point multipliers (gemmlowp / TFLite) ------------------------------------------------------

def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real`` >= 0 as ``(M0, shift)`` with ``real ~= M0 * 2**(shift - 31)`` (TFLite's
    ``QuantizeMultiplier``): M0 in [2^30, 2^31) (the fraction in [0.5, 1) times 2^31, rounded
    half away from zero), ``shift`` > 0 a left shift, < 0 a right shift. A multiplier whose
    right shift would exceed 31 is below 2^-32 and becomes (0, 0), as in TFLite; 0 is (0, 0).

    >>> quantize_multiplier(0.25)
    (1073741824, -1)
    """
    if not (isinstance(real, (int, float)) and math.isfinite(real) and real >= 0):
        raise IntegerizeError(f"a requantization multiplier must be a finite number >= 0, got {real!r}; "
                              f"check the scales of the quantizers involved")
    if real == 0:
        return 0, 0
    fraction, shift = math.frexp(real)  # real = fraction * 2**shift, fraction in [0.5, 1)
    m0 = math.floor(fraction * 2.0 ** 31 + 0.5)  # exact in float64: 22 fraction bits at most
    if m0 == 2 ** 31:
        m0, shift = m0 // 2, shift + 1
    if shift < -31:
        return 0, 0
    if shift > 30:  # real rounds to 2^30 or more: above (2^31 - 1) 2^-1, the largest M0 2^(30 - 31)
        raise IntegerizeError(f"requantization multiplier {real} rounds to 2^30 or more: the scales of input "
                              f"and output differ too much to rescale in int32")
    return int(m0), int(shift)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul``: ``a * b / 2^31`` of two int32 values,
    rounded to nearest with ties toward +infinity (the nudge is ``2^30`` for a non-negative
    product, ``1 - 2^30`` for a negative one, then the int64 quotient is truncated toward zero).
    The product is formed in int64 (|a*b| <= 2^62); the one overflowing case,
    ``a == b == INT32_MIN``, saturates to ``INT32_MAX``. Returns int32."""
    _check_int32("a", a)
    b = torch.as_tensor(b, dtype=torch.int64)
    _check_int32("b", b)
    return _high_mul(a.to(torch.int64), b)


def _high_mul(a64: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    """``saturating_rounding_doubling_high_mul`` of int64 tensors holding int32 values, unchecked."""
    prod = a64 * b64
    nudge = torch.where(prod >= 0, 1 << 30, 1 - (1 << 30))
    out = torch.div(prod + nudge, 1 << 31, rounding_mode="trunc")
    out = torch.where((a64 == INT32_MIN) & (b64 == INT32_MIN), INT32_MAX, out)
    return out.to(torch.int32)


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` of int32 ``x``, exponent in
    [0, 31] (a tensor broadcasts, per channel), rounded half away from zero. The result's
    magnitude is at most ``|x|``'s: no overflow. Returns int32. An int64 ``x`` beyond int32 is
    refused (IntegerizeError), not wrapped."""
    _check_int32("x", x)
    e = torch.as_tensor(exponent, dtype=torch.int64)
    if e.numel() and (int(e.min()) < 0 or int(e.max()) > 31):
        raise IntegerizeError(f"rounding_divide_by_pot needs exponents in [0, 31], got "
                              f"[{int(e.min())}, {int(e.max())}]")
    x64 = x.to(torch.int64)
    mask = (torch.ones_like(e) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0).to(torch.int64)
    return ((x64 >> e) + (remainder > threshold).to(torch.int64)).to(torch.int32)


def multiply_by_quantized_multiplier(x: torch.Tensor, m0: torch.Tensor | int,
                                     shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite's ``MultiplyByQuantizedMultiplier``: ``x * M0 * 2^(shift - 31)`` on int32 ``x``.
    A left shift (``shift`` > 0) is applied first and saturates to int32 (TFLite's reference
    wraps), so results are exact up to 2^30 in magnitude and saturate there (any output grid of
    at most 30 bits still saturates correctly); then ``saturating_rounding_doubling_high_mul`` (ties toward +inf) and
    ``rounding_divide_by_pot`` (half away from zero). ``m0`` and ``shift`` may be tensors
    broadcasting against ``x`` (per channel). Returns int32."""
    _check_int("x", x)
    check_multiplier(m0, shift)  # an int64 x beyond int32 is defined: the shift's clamp saturates it
    return _multiply_double(x, m0, shift)


def _multiply_double(x: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """``multiply_by_quantized_multiplier`` of a multiplier already checked (a ``Requant``'s)."""
    if (isinstance(m0, int) and isinstance(shift, int) and 0 <= m0 <= INT32_MAX and -31 <= shift <= 30
            and x.dtype != torch.int64):
        return _multiply_scalar(x, m0, shift)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    shifted = (x.to(torch.int64) << left).clamp(INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(_high_mul(shifted, torch.as_tensor(m0, dtype=torch.int64)), right)


def _multiply_scalar(x: torch.Tensor, m0: int, shift: int) -> torch.Tensor:
    """``multiply_by_quantized_multiplier`` of int32 (or narrower) ``x`` with one multiplier (Python
    ints, ``m0`` in [0, 2^31)): the same integers in fewer passes. ``a == b == INT32_MIN`` cannot
    occur (``m0`` >= 0), so the high multiply needs no saturation case, and it is ``(v + 2^30) >>
    31`` (round half toward +inf): for ``v`` >= 0 the nudge 2^30 then truncation; for ``v`` < 0
    the nudge ``1 - 2^30`` then truncation toward zero, ``trunc(w / 2^31) = (w + 2^31 - 1) >> 31``
    for ``w`` < 0, and ``1 - 2^30 + 2^31 - 1 = 2^30``. The rounding shift takes its mask and
    threshold as Python ints."""
    v = x.to(torch.int64, copy=True)
    if shift > 0:
        v.bitwise_left_shift_(shift).clamp_(INT32_MIN, INT32_MAX)
    v.mul_(m0).add_(1 << 30).bitwise_right_shift_(31)  # |v m0| < 2^62: int64
    right = -shift if shift < 0 else 0
    if right:
        mask = (1 << right) - 1
        up = (v & mask) > ((v < 0).to(torch.int64) + (mask >> 1))
        v.bitwise_right_shift_(right).add_(up)
    return v.to(torch.int32)


def multiply_by_quantized_multiplier_single(x: torch.Tensor, m0: torch.Tensor | int,
                                            shift: torch.Tensor | int) -> torch.Tensor:
    """TFLite's single-rounding ``MultiplyByQuantizedMultiplier`` (``TFLITE_SINGLE_ROUNDING``):
    ``(x * M0 + 2^(30 - shift)) >> (31 - shift)`` in int64 (|x * M0| < 2^62), i.e. ``x * real``
    rounded once, ties toward +inf; the result saturates to int32. Returns int32. ``x`` must hold
    int32 values and the multiplier be ``quantize_multiplier``'s (IntegerizeError otherwise)."""
    _check_int32("x", x)
    check_multiplier(m0, shift)
    return _multiply_single(x, m0, shift)


def _multiply_single(x: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """``multiply_by_quantized_multiplier_single`` of int32 values and a checked multiplier."""
    total = 31 - torch.as_tensor(shift, dtype=torch.int64)
    prod = x.to(torch.int64) * torch.as_tensor(m0, dtype=torch.int64)
    return ((prod + (torch.ones_like(total) << (total - 1))) >> total).clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def quantize_multipliers(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_multiplier`` of each value of a 1-d tensor: (M0, shift) as two int64 tensors."""
    pairs = [quantize_multiplier(float(r)) for r in real.double().flatten()]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.int64),
            torch.tensor([p[1] for p in pairs], dtype=torch.int64))


def channel_shape(t: torch.Tensor | int, dim: int, axis: int) -> torch.Tensor | int:
    """A per-channel 1-d tensor reshaped to broadcast along ``axis`` of a ``dim``-d tensor (an int
    or a one-value tensor is returned as is)."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1):
        return t
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


ROUNDINGS = ("single", "double")


@serializable(m0=Either(INT, Tensor("int64")), shift=Either(INT, Tensor("int64")),
              zero_point=Either(INT, Tensor("int64")), qmin=INT, qmax=INT, rounding=Choice(*ROUNDINGS))
@dataclass(frozen=True)
class Requant:
    """A fixed-point rescaling to an output grid: ``M0`` and ``shift`` (Python ints per tensor,
    int64 tensors per channel), the output zero point (an int, or an int64 tensor per channel of
    a ``ChannelGrid``) and code range, and the rounding (``requantize``)."""

    m0: torch.Tensor | int
    shift: torch.Tensor | int
    zero_point: torch.Tensor | int
    qmin: int
    qmax: int
    rounding: str = "single"

    def __post_init__(self) -> None:
        """The ranges ``requantize``'s arithmetic is defined for (``quantize_multiplier``'s
        output): M0 in [0, 2^31), shift in [-31, 30], qmin <= qmax; IntegerizeError otherwise,
        not a silent int64 wrap (a Requant made by hand, or read from an edited file)."""
        check_multiplier(self.m0, self.shift)
        if self.qmin > self.qmax:
            raise IntegerizeError(f"a requantization needs qmin <= qmax, got codes {self.qmin}..{self.qmax}; "
                                  f"make it with Requant.from_scales")

    @classmethod
    def from_scales(cls, real: float | torch.Tensor, zero_point: int | torch.Tensor, qmin: int, qmax: int,
                    rounding: str = "single") -> "Requant":
        """``real`` = input scale / output scale (a Python float, or a 1-d tensor per channel);
        ``zero_point``: an int, or a 1-d tensor per channel."""
        zp = zero_point.to(torch.int64) if isinstance(zero_point, torch.Tensor) and zero_point.numel() > 1 \
            else int(zero_point)
        if isinstance(real, torch.Tensor) and real.numel() > 1:
            m0, shift = quantize_multipliers(real)
            return cls(m0, shift, zp, int(qmin), int(qmax), rounding)
        m0, shift = quantize_multiplier(float(real))
        return cls(m0, shift, zp, int(qmin), int(qmax), rounding)

    def __call__(self, acc: torch.Tensor, axis: int = -1) -> torch.Tensor:
        # its multiplier was checked when it was made (``__post_init__``): not again per call
        return _requantize(acc, self.m0, self.shift, self.zero_point, self.qmin, self.qmax, axis, self.rounding)


def requantize(acc: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int, zero_point: int,
               qmin: int, qmax: int, axis: int = -1, rounding: str = "single") -> torch.Tensor:
    """An int32 accumulator onto an output grid: ``clamp(MBQM(acc, M0, shift) + zero_point,
    qmin, qmax)`` in the narrowest dtype holding [qmin, qmax].

    Per tensor: ``m0``/``shift`` are ints. Per channel: 1-d tensors of the size of ``acc``'s
    ``axis``. ``rounding="single"`` (the default; TFLite's ``TFLITE_SINGLE_ROUNDING``): ``acc *
    real`` rounded once, ties toward +inf, so it equals the exactly rounded product except on a
    tie (where the fake-quant grid rounds half to even) and within 2^-30 relative of one (M0's own
    rounding). ``rounding="double"`` (gemmlowp and TFLite's default build): ties toward +inf in
    the high multiply, then half away from zero in the shift; within one output step of
    ``acc * real`` but it can differ from its single rounding (263 * 0.15 = 39.45 gives 40:
    157.8 -> 158, 158 / 4 = 39.5 -> 40). The input must fit int32 (a larger value raises); the
    zero point (an int, or per channel of ``axis``: a ``ChannelGrid``'s) is added in int64 and
    the sum saturates to [qmin, qmax]. A multiplier outside ``quantize_multiplier``'s ranges is
    an IntegerizeError."""
    check_multiplier(m0, shift)
    return _requantize(acc, m0, shift, zero_point, qmin, qmax, axis, rounding)


def _requantize(acc: torch.Tensor, m0: torch.Tensor | int, shift: torch.Tensor | int, zero_point: int,
                qmin: int, qmax: int, axis: int = -1, rounding: str = "single") -> torch.Tensor:
    """``requantize`` of a checked multiplier (a ``Requant``'s)."""
    if rounding not in ROUNDINGS:
        raise IntegerizeError(f"requantize rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    _check_int("acc", acc)
    if acc.numel() and acc.dtype == torch.int64 and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        raise IntegerizeError("requantize got an accumulator outside int32; the op overflowed its "
                              "stated bound (reduce the reduction length or the bit widths)")
    fast = _single_per_tensor(acc, m0, shift, zero_point, qmin, qmax) if rounding == "single" else None
    if fast is not None:
        return (fast + zero_point).to(code_dtype(qmin, qmax))
    m0, shift = torch.as_tensor(m0, dtype=torch.int64), torch.as_tensor(shift, dtype=torch.int64)
    m0, shift = channel_shape(m0, acc.dim(), axis), channel_shape(shift, acc.dim(), axis)
    multiply = _multiply_single if rounding == "single" else _multiply_double
    scaled = multiply(acc, m0, shift).to(torch.int64)
    return (scaled + channel_shape(zero_point, acc.dim(), axis)).clamp(qmin, qmax).to(code_dtype(qmin, qmax))


def _single_per_tensor(acc: torch.Tensor, m0, shift, zero_point, qmin: int, qmax: int) -> torch.Tensor | None:
    """``requantize``'s single rounding with one multiplier (Python ints), minus the zero point:
    ``clamp((acc M0 + 2^(n-1)) >> n, qmin - zp, qmax - zp)`` with ``n = 31 - shift``, as int64, in
    five passes over the tensor (the general path takes a dozen; the same integers: the int32
    saturation and then the output range's clamp are one clamp to their intersection). None
    where the general path applies (per-channel multipliers or zero point, a shift outside it)."""
    if not all(isinstance(v, int) for v in (m0, shift, zero_point)):
        return None
    total, low, high = 31 - shift, max(qmin - zero_point, INT32_MIN), min(qmax - zero_point, INT32_MAX)
    if not (1 <= total <= 62 and low <= high):
        return None
    # a float accumulator holds integers (an exact GEMM's): converted to int64 exactly
    out = acc.to(torch.int64, copy=True)  # one fresh tensor the passes write in place (not a fresh
    # tensor per pass; the honesty audit follows integer data through in-place ops too)
    return out.mul_(m0).add_(1 << (total - 1)).bitwise_right_shift_(total).clamp_(low, high)


def requantized_values(requant: Requant, acc: torch.Tensor, scale: float, axis: int = -1) -> torch.Tensor:
    """The float32 values ``(code - zp) * scale`` of ``requant(acc)``'s codes on a grid of ``scale``
    (``qswap.nn.simulate.dequantized`` of them), without forming the codes where the single
    per-tensor rounding applies: the fake-quant simulation's requantization. ``acc``: an integer
    tensor, or a float tensor holding integers (converted to integers exactly)."""
    if requant.rounding == "single" and acc.dtype != torch.int64:
        m0, shift, zp = requant.m0, requant.shift, requant.zero_point
        fast = _single_per_tensor(acc, m0, shift, zp, requant.qmin, requant.qmax)
        if fast is not None:
            return fast.to(torch.float32).mul_(scale)
    codes = requant(acc.to(torch.int32) if acc.is_floating_point() else acc, axis)
    return (codes.to(torch.int32) - requant.zero_point).to(torch.float32) * scale  # integer subtraction: exact


# -- rescaled add ------------------------------------------------------------------------------------

_MULTIPLIER = Either(INT, Tensor("int64"))


@serializable(left_shift=INT, a=Tuple(_MULTIPLIER, _MULTIPLIER), b=Tuple(_MULTIPLIER, _MULTIPLIER),
              sum_scale=Either(FLOAT, Tensor("float64")), out=Opt(Obj("Requant")))
@dataclass(frozen=True)
class AddParams:
    """TFLite's quantized ADD: both operands shifted left by ``left_shift``, rescaled to the grid
    of twice the larger input scale, added in int32 (the sum's grid: ``sum_scale``), then
    requantized to the output grid (``out``; None keeps the int32 sum, e.g. a residual stream
    read by several consumers). Per channel (an operand on a ``ChannelGrid``, channels on the last
    axis): the same per channel, each channel's sum on the grid of twice its larger input scale
    (``sum_scale`` and the multipliers ``a``, ``b`` are then (C,) tensors)."""

    left_shift: int
    a: tuple[int, int] | tuple[torch.Tensor, torch.Tensor]
    b: tuple[int, int] | tuple[torch.Tensor, torch.Tensor]
    sum_scale: float | torch.Tensor
    out: Requant | None

    def __post_init__(self) -> None:
        """``build``'s ranges (inputs of 2 to 16 bits: ``left_shift`` 12 to 26, each operand's
        multiplier a valid ``Requant`` multiplier); IntegerizeError otherwise (made by hand, or read
        from an edited file), not a negative shift or an int64 wrap when the add runs."""
        if not 12 <= self.left_shift <= 26:
            raise IntegerizeError(f"an integer add shifts its operands left by 12 to 26 bits (inputs of 16 to 2 "
                                  f"bits), got {self.left_shift}")
        for m0, shift in (self.a, self.b):
            check_multiplier(m0, shift)

    @classmethod
    def build(cls, scale_a: float | torch.Tensor, scale_b: float | torch.Tensor, scale_out: float | None = None,
              zero_point_out: int = 0, qmin: int = INT32_MIN, qmax: int = INT32_MAX,
              input_bits: int = 8) -> "AddParams":
        """``left_shift = 28 - input_bits`` (20 for 8-bit inputs, TFLite's value) keeps
        ``|q - zp| << left_shift`` below 2^28: inputs of at most 16 bits. A scale may be a (C,)
        tensor (a ``ChannelGrid``'s): the multipliers and the sum's grid are then per channel."""
        if not 2 <= input_bits <= 16:
            raise IntegerizeError(f"rescaled_add takes inputs of 2 to 16 bits, got {input_bits}")
        left = 28 - input_bits
        if isinstance(scale_a, torch.Tensor) or isinstance(scale_b, torch.Tensor):
            sa, sb = torch.as_tensor(scale_a, dtype=torch.float64), torch.as_tensor(scale_b, dtype=torch.float64)
            sa, sb = torch.broadcast_tensors(sa.reshape(-1), sb.reshape(-1))
            twice = 2.0 * torch.maximum(sa, sb)
            sum_scale = twice / 2 ** left
            out = None if scale_out is None else Requant.from_scales(sum_scale / scale_out, zero_point_out, qmin, qmax)
            return cls(left, quantize_multipliers(sa / twice), quantize_multipliers(sb / twice), sum_scale, out)
        twice_max = 2.0 * max(scale_a, scale_b)
        sum_scale = twice_max / 2 ** left
        out = None if scale_out is None else Requant.from_scales(sum_scale / scale_out, zero_point_out, qmin, qmax)
        return cls(left, quantize_multiplier(scale_a / twice_max), quantize_multiplier(scale_b / twice_max),
                   sum_scale, out)


def add_input_bits(*grids) -> int:
    """``AddParams.build``'s ``input_bits`` for operands on ``grids`` (``Grid`` or ``ChannelGrid``):
    the bits of their largest ``|code - zero_point|``, at least 8 (TFLite's 20-bit shift, which
    every operand of at most 8 bits keeps). A 12-bit operand's 20-bit shift would leave int32
    (``rescaled_sum``): its ``|q - zp| < 2^input_bits`` is what makes the shift exact."""
    spans = [int(torch.maximum(g.qmax - torch.as_tensor(g.zero_point), torch.as_tensor(g.zero_point) - g.qmin).max())
             for g in grids]
    return max([8] + [span.bit_length() for span in spans])


def rescaled_sum(qa: torch.Tensor, zp_a: int | torch.Tensor, qb: torch.Tensor, zp_b: int | torch.Tensor,
                 params: AddParams) -> torch.Tensor:
    """``s_a (qa - zp_a) + s_b (qb - zp_b)`` as int32 on the grid ``params.sum_scale``.

    Each operand: ``(q - zp) << left_shift`` (exact: |q - zp| < 2^input_bits, so the value is
    below 2^28), times its multiplier (<= 0.5, so below 2^27 in magnitude; gemmlowp rounding:
    ties toward +inf then half away from zero); the int32 sum is below 2^28 (no overflow).
    Per channel (zero points and multipliers (C,) tensors, channels on the last axis): the same
    arithmetic, rounding and bound in every channel, each on its own sum grid. An operand with
    ``|q - zp| >= 2^input_bits`` (codes wider than the add was built for) is refused
    (IntegerizeError), not shifted past int32."""
    _check_int("qa", qa)
    _check_int("qb", qb)
    left = params.left_shift
    for name, q, zero_point in (("qa", qa, zp_a), ("qb", qb, zp_b)):
        _check_centered(f"rescaled_sum's {name}", q, zero_point, 1 << (28 - left),
                        f"build AddParams with input_bits = add_input_bits(its operands' grids), {29 - left} or more")
    a = multiply_by_quantized_multiplier(_centered(qa, zp_a) << left, *params.a)
    b = multiply_by_quantized_multiplier(_centered(qb, zp_b) << left, *params.b)
    return a + b


_DTYPE_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def _check_centered(name: str, q: torch.Tensor, zero_point: int | torch.Tensor, limit: int, fix: str) -> None:
    """``|q - zero_point| < limit`` for every code (the shift after the centring stays exact and
    inside int32), else IntegerizeError saying ``fix``. 8-bit codes are checked by their dtype's
    range alone (no pass over ``q``), wider ones by their extremes (one read); only where those
    bounds reach ``limit`` is each code's own distance read."""
    if q.numel() == 0:
        return
    zlo, zhi = _bounds(zero_point)
    lo, hi = _DTYPE_RANGES.get(q.dtype, (None, None))
    if lo is None:  # wider codes: their extremes (one read, no copy)
        lo, hi = (int(v) for v in torch.aminmax(q))
    if max(hi - zlo, zhi - lo) < limit:  # every |q - zp| is at most this
        return
    span = int((q.to(torch.int64) - torch.as_tensor(zero_point, dtype=torch.int64)).abs().max())
    if span >= limit:
        raise IntegerizeError(f"{name}: a code {span} steps from its zero point, beyond the {limit - 1} the op "
                              f"keeps exact in int32 (codes wider than it was built for): {fix}")


def _centered(q: torch.Tensor, zero_point: int | torch.Tensor) -> torch.Tensor:
    """``q - zero_point`` in int32 (a per-channel zero point: of the last axis)."""
    return q.to(torch.int32) - torch.as_tensor(zero_point, dtype=torch.int32)


def rescaled_add(qa: torch.Tensor, zp_a: int, qb: torch.Tensor, zp_b: int, params: AddParams) -> torch.Tensor:
    """``rescaled_sum`` requantized onto the output grid (saturating to [qmin, qmax])."""
    if params.out is None:
        raise IntegerizeError("rescaled_add needs AddParams built with an output scale")
    return params.out(rescaled_sum(qa, zp_a, qb, zp_b, params))


CONSTANT_ADD_BITS = 16  # fraction bits of the input grid a folded constant keeps
# The int32 residual stream's grid of the integer encoders and decoder: 2^-STREAM_BITS of the step
# of the grid it starts from (the encoder's embedded features, the decoder's finest table grid).
STREAM_BITS = 16


@serializable(zero_point=INT, folded=Tensor("int32"), out=Obj("Requant"))
@dataclass(frozen=True)
class ConstantAddParams:
    """``codes + constant`` (a per-channel constant of the last axis, e.g. rel-pos attention's
    ``pos_bias_u``) onto an output grid: the constant folded once onto the grid
    ``s_in 2^-CONSTANT_ADD_BITS`` (``folded``, int32, rounded half to even), and the requantization
    of that grid onto the output grid."""

    zero_point: int
    folded: torch.Tensor
    out: Requant

    @functools.cached_property
    def code_limit(self) -> int:
        """The bound on ``|q - zero_point|`` that keeps ``(q - zp) << 16`` plus the folded constant
        inside int32 (``add_constant`` checks its codes against it), read once."""
        room = INT32_MAX - (int(self.folded.abs().max()) if self.folded.numel() else 0)
        return (room >> CONSTANT_ADD_BITS) + 1

    @classmethod
    def build(cls, grid_in: "Grid", constant: torch.Tensor, grid_out: "Grid") -> "ConstantAddParams":
        fine = grid_in.scale * 2.0 ** -CONSTANT_ADD_BITS
        folded = torch.round(constant.detach().double().flatten() / fine)
        span = max(grid_in.qmax - grid_in.zero_point, grid_in.zero_point - grid_in.qmin)
        check_bound("a constant add", (span << CONSTANT_ADD_BITS) + int(folded.abs().max()) if folded.numel() else 0)
        return cls(grid_in.zero_point, folded.to(torch.int32),
                   Requant.from_scales(fine / grid_out.scale, grid_out.zero_point, grid_out.qmin, grid_out.qmax))


def add_constant(codes: torch.Tensor, params: ConstantAddParams) -> torch.Tensor:
    """``((q - zp) << 16) + folded`` in int32 (below 2^31: checked when built, ``|q - zp| << 16`` <
    2^24 for 8-bit codes), requantized onto the output grid (single rounding, saturating). The
    constant's own rounding onto the fine grid moves the sum by at most 2^-17 input steps."""
    _check_int("codes", codes)
    _check_centered("add_constant's codes", codes, params.zero_point, params.code_limit,
                    "pass codes of the grid ConstantAddParams was built for")
    return params.out((codes.to(torch.int32) - params.zero_point) * (1 << CONSTANT_ADD_BITS) + params.folded)


# -- integer square root -------------------------------------------------------------------------------

ISQRT_MAX = 2 ** 62


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Bit length of non-negative int64 values (0 for 0), by binary search on shifts."""
    length = torch.zeros_like(n)
    for step in (32, 16, 8, 4, 2, 1):
        higher = (n >> (length + step)) > 0
        length = length + torch.where(higher, step, 0)
    return length + (n > 0).to(torch.int64)


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` of int64 values in [0, 2^62], exactly, by I-BERT's integer Newton
    iteration ``x <- (x + n // x) // 2`` (floor divisions) from ``x0 = 2^ceil(bits(n) / 2)``
    >= sqrt(n), stopped where it stops decreasing. Every intermediate stays below 2^33.
    Returns int64."""
    _check_int("n", n)
    n = n.to(torch.int64)
    if n.numel() and (int(n.min()) < 0 or int(n.max()) > ISQRT_MAX):
        raise IntegerizeError(f"isqrt takes values in [0, 2^62], got [{int(n.min())}, {int(n.max())}]")
    x = torch.ones_like(n) << ((_bit_length(n) + 1) >> 1)
    while True:
        nxt = (x + torch.div(n, x, rounding_mode="floor")) >> 1
        smaller = (nxt < x) & (nxt > 0)  # n = 0 would reach x = 0: kept at 1, answered below
        if not bool(smaller.any()):
            return torch.where(n == 0, 0, x)
        x = torch.where(smaller, nxt, x)


# -- lookup tables --------------------------------------------------------------------------------------

@serializable(scale=FLOAT, zero_point=INT, qmin=INT, qmax=INT)
@dataclass(frozen=True)
class Grid:
    """A per-tensor affine grid: ``value = scale * (code - zero_point)``, codes in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        """A grid the integer ops are defined on: a finite positive scale, qmin <= zero point <= qmax
        (every grid a calibrated quantizer has); IntegerizeError otherwise (a grid made by hand, or
        read from an edited file)."""
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise IntegerizeError(f"a grid needs a finite scale above 0, got {self.scale!r}")
        if not self.qmin <= self.zero_point <= self.qmax:
            raise IntegerizeError(f"a grid needs qmin <= zero point <= qmax, got zero point {self.zero_point} "
                                  f"and codes {self.qmin}..{self.qmax}")

    @classmethod
    def of(cls, quantizer) -> "Grid":
        """The grid of a calibrated per-tensor ``FakeQuantize``. An activation quantizer that
        calibration did not freeze has none: its range follows the inputs it saw last (a forward
        after ``convert`` gives it one, a learned scale's too), which no integer model can keep."""
        if _running(quantizer) or not (quantizes(quantizer) and quantizer.initialized):
            if not isinstance(quantizer, FakeQuantize):
                what = f"a site the recipe leaves float ({type(quantizer).__name__})"
                fix = "use a recipe that quantizes this site's activations (e.g. w8a8)"
            elif not quantizer.enabled:  # not the recipe's doing: a probe or a caller switched it off
                what = f"a disabled {quantizer.kind} quantizer ({quantizer.spec.short()}, enabled=False)"
                fix = "enable it again (quantizer.enabled = True) before integerizing"
            else:  # no range yet, or one observed at run time (not frozen)
                what = f"an uncalibrated {quantizer.kind} quantizer ({quantizer.spec.short()})"
                fix = "calibrate the model first (qswap calibrate, or qswap convert --calib-batches N --data DIR)"
            raise IntegerizeError(f"{what} has no grid: an integer op needs every operand quantized and the "
                                  f"model calibrated; {fix}")
        if quantizer.scale.numel() != 1:
            raise IntegerizeError(f"an activation grid must be per tensor, got {quantizer.spec.short()}")
        _check_rounding(quantizer)
        _check_scales(quantizer)
        return cls(float(quantizer.scale.detach()), int(quantizer.zero_point), quantizer.spec.qmin,
                   quantizer.spec.qmax)

    @property
    def dtype(self) -> torch.dtype:
        return code_dtype(self.qmin, self.qmax)

    @property
    def span(self) -> int:
        """The largest ``|code - zero_point|`` of the grid."""
        return max(self.qmax - self.zero_point, self.zero_point - self.qmin)

    def codes(self) -> torch.Tensor:
        """Every code of the grid, ascending (int64)."""
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.int64)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Build-time only (tables, tests): the float32 values of ``codes``."""
        return (codes.to(torch.float32) - self.zero_point) * torch.tensor(self.scale, dtype=torch.float32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Build-time only: float ``x`` onto the grid as ``torch.fake_quantize_per_tensor_affine``
        and ``FakeQuantize`` do (``x * (1/scale)`` in float32, half to even), as codes."""
        t = torch.round(x.to(torch.float32) * (1.0 / torch.tensor(self.scale, dtype=torch.float32)))
        return (t.clamp(self.qmin - self.zero_point, self.qmax - self.zero_point).to(torch.int64)
                + self.zero_point).to(self.dtype)


@serializable(scale=Tensor("float64"), zero_point=Tensor("int64"), qmin=INT, qmax=INT)
@dataclass(frozen=True)
class ChannelGrid:
    """A per-channel affine grid of the last axis: ``value[..., c] = scale[c] * (code - zero_point[c])``,
    codes in [qmin, qmax]. Only the ops that take it say so (``stream_grid``): requantization onto
    it, the residual add (``AddParams``), the LayerNorm's input (``CommonGridParams``), the S2T
    encoder's entry (its embed grid: the conv subsampler's last GLU writes it, ``GluParams``)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @property
    def dtype(self) -> torch.dtype:
        return code_dtype(self.qmin, self.qmax)

    @property
    def span(self) -> int:
        """The largest ``|code - zero_point|`` of any channel (``Grid.span``'s bound, per channel)."""
        return int(torch.maximum(self.qmax - self.zero_point, self.zero_point - self.qmin).max())

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Build-time only (tests): the float32 values of ``codes`` (channels last)."""
        return (codes.to(torch.float32) - self.zero_point.to(torch.float32)) * self.scale.to(torch.float32)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Build-time only: float ``x`` (channels last) onto the grid as ``FakeQuantize`` does
        (``x * (1/scale)`` in float32, half to even), as codes."""
        zp = self.zero_point.to(torch.float32)
        t = torch.round(x.to(torch.float32) * (1.0 / self.scale.to(torch.float32)))
        t = torch.maximum(torch.minimum(t, self.qmax - zp), self.qmin - zp)
        return (t.to(torch.int64) + self.zero_point).to(self.dtype)


def rounds_to_nearest(quantizer) -> bool:
    """Whether an activation quantizer's codes are what the integer ops write: the nearest grid
    point (``rounding: half_even``, the default; requantization breaks exact ties toward +inf, the
    model's input quantization to even). Another rounding (``floor``, ``half_away``) has no integer
    form: every requantization of the integer model rounds to the nearest point."""
    return quantizer.kind != "activation" or quantizer.spec.rounding == "half_even"


def _check_rounding(quantizer) -> None:
    if not rounds_to_nearest(quantizer):
        raise IntegerizeError(f"an activation grid rounding {quantizer.spec.rounding!r} has no integer form: the "
                              f"integer ops requantize to the nearest code; use rounding: half_even (the default) "
                              f"for integer execution (the fake-quant model computes the ops reading it in float)")


def _check_scales(quantizer) -> None:
    """A grid's scales are finite and nonzero (a learned scale an optimizer drove to 0 is not):
    IntegerizeError otherwise, before a multiplier divides by one. (A negative learned scale is
    refused where its multiplier is made: ``quantize_multiplier``'s typed error.)"""
    scale = quantizer.scale.detach().reshape(-1)
    bad = ~torch.isfinite(scale) | (scale == 0)
    if bool(bad.any()):
        raise IntegerizeError(f"a grid needs finite nonzero scales, got {float(scale[bad][0])} "
                              f"({quantizer.spec.short()}; a learned scale trained to 0, or set by hand): "
                              f"recalibrate the model (qswap calibrate) or retrain its scales with a smaller "
                              f"learning rate")


def _running(quantizer) -> bool:
    """Whether ``quantizer`` is an activation quantizer with a range calibration did not freeze
    (observed at run time: ``Grid.of`` refuses it; ``stream_grid``, which the simulation reads
    while calibrating too, does not)."""
    return (isinstance(quantizer, FakeQuantize) and quantizer.kind == "activation" and quantizer.initialized
            and not bool(quantizer.frozen))


def stream_grid(quantizer) -> "Grid | ChannelGrid":
    """The grid of a calibrated quantizer of the residual stream: a ``Grid`` per tensor, a
    ``ChannelGrid`` per channel of the last axis (any other per-channel axis raises)."""
    if not (quantizes(quantizer) and quantizer.initialized) \
            or quantizer.scale.numel() == 1:
        return Grid.of(quantizer)
    spec = quantizer.spec
    if spec.granularity != "per_channel" or spec.axis != -1:
        raise IntegerizeError(f"a residual-stream grid must be per tensor or per channel of the last axis "
                              f"(axis: -1), got {spec.short()}")
    _check_rounding(quantizer)
    _check_scales(quantizer)
    return ChannelGrid(quantizer.scale.detach().double().reshape(-1), quantizer.zero_point.detach().to(
        torch.int64).reshape(-1), spec.qmin, spec.qmax)


COMMON_GRID_BITS = 16  # |value| < 2^16 steps of the common grid a per-channel norm input is put on


@serializable(m0=Tensor("int64"), shift=Tensor("int64"), zero_point=Tensor("int64"), scale=FLOAT)
@dataclass(frozen=True)
class CommonGridParams:
    """Per-channel codes of a ``ChannelGrid`` onto one int32 grid ``scale`` (a norm mixes the
    channels, so their values must share a grid): ``scale = max_c(s_c span_c) 2^-COMMON_GRID_BITS``
    (``span_c`` = the largest ``|q - zp_c|`` of channel c), and per channel the multiplier
    ``s_c / scale`` as (M0, shift)."""

    m0: torch.Tensor
    shift: torch.Tensor
    zero_point: torch.Tensor
    scale: float

    @classmethod
    def build(cls, grid: ChannelGrid) -> "CommonGridParams":
        zp = grid.zero_point
        span = torch.maximum(grid.qmax - zp, zp - grid.qmin).double()  # (C,)
        scale = float((grid.scale * span).max()) * 2.0 ** -COMMON_GRID_BITS
        m0, shift = quantize_multipliers(grid.scale / scale)
        return cls(m0, shift, zp, scale)

    @property
    def bound(self) -> int:
        """The largest ``|value|`` ``common_grid`` writes."""
        return 2 ** COMMON_GRID_BITS


def common_grid(codes: torch.Tensor, params: CommonGridParams) -> torch.Tensor:
    """Per-channel codes (channels last) as int32 values on the common grid ``params.scale``:
    ``(q - zp_c) * s_c / scale`` by ``multiply_by_quantized_multiplier_single`` (int64 product,
    rounded once, ties toward +inf; the fake-quant value ``s_c (q - zp_c)`` is a float32 product,
    so the two differ by at most half a common step, ``max_c(s_c span_c) 2^-17``). ``|q - zp_c|
    <= span_c`` and ``s_c / scale <= 2^16 / span_c`` keep ``|value| <= 2^16`` (no overflow; int32)."""
    _check_int("codes", codes)
    x = codes.to(torch.int32) - params.zero_point.to(torch.int32)
    return multiply_by_quantized_multiplier_single(x, params.m0, params.shift)


LUT_MAX_BITS = 16


def build_lut(fn: Callable[[torch.Tensor], torch.Tensor], grid_in: Grid, grid_out: Grid) -> torch.Tensor:
    """The table of ``fn`` from every input code to an output code, built once: the input grid's
    float32 values through ``fn`` (in float32, as the fake-quant model computes it), rounded onto
    the output grid half to even (as its quantizer does). So ``apply_lut`` is bit-exact with
    ``fake_quantize_out(fn(fake_quantize_in(x)))``. Inputs of up to 16 bits (65536 entries)."""
    if grid_in.qmax - grid_in.qmin + 1 > 2 ** LUT_MAX_BITS:
        raise IntegerizeError(f"a lookup table over [{grid_in.qmin}, {grid_in.qmax}] has more than "
                              f"2^{LUT_MAX_BITS} entries; use a piecewise table for wider inputs")
    return grid_out.quantize(fn(grid_in.dequantize(grid_in.codes())))


def apply_lut(codes: torch.Tensor, table: torch.Tensor, qmin: int) -> torch.Tensor:
    """``table[codes - qmin]``: an integer index, no arithmetic on values."""
    _check_int("codes", codes)
    return table[codes.to(torch.int64) - qmin]


# -- GLU --------------------------------------------------------------------------------------------

GLU_GATE_BITS = 15  # the gate sigmoid(b) in [0, 2^15]


@serializable(gate=Tensor("int32"), zero_point=INT, qmin=INT, out=Opt(Obj("Requant")))
@dataclass(frozen=True)
class GluParams:
    """Integer GLU constants: ``gate[b - qmin]`` = round(2^15 sigmoid(b's value)) over every input
    code (built in float64, half to even), and the requantization of ``(a - zp) * gate``
    (scale ``s_in 2^-15``) to the output grid."""

    gate: torch.Tensor
    zero_point: int
    qmin: int
    out: Requant | None

    def __post_init__(self) -> None:
        """The table's range: one gate in [0, 2^15] per input code of at most 16 bits, from ``qmin`` on,
        the zero point one of those codes; IntegerizeError otherwise (a read-back file edited so had
        raised torch's IndexError at its first forward)."""
        n = self.gate.numel()
        if not (self.gate.dim() == 1 and 1 <= n <= 2 ** 16 and -2 ** 16 <= self.qmin
                and self.qmin + n - 1 <= 2 ** 16 and self.qmin <= self.zero_point <= self.qmin + n - 1):
            raise IntegerizeError(f"a GLU's gate table covers one input code each from qmin, codes of at most 16 bits "
                                  f"with the zero point among them: got {n} gates from {self.qmin}, zero point "
                                  f"{self.zero_point}")
        if n and not (0 <= int(self.gate.min()) and int(self.gate.max()) <= 2 ** GLU_GATE_BITS):
            raise IntegerizeError(f"a GLU's gates are 0 to 2^{GLU_GATE_BITS}")

    def covers(self, qmin: int, qmax: int) -> bool:
        """Whether input codes ``qmin..qmax`` (its producer's requantization) index this table."""
        return self.qmin <= qmin and qmax <= self.qmin + self.gate.numel() - 1

    @classmethod
    def build(cls, grid_in: Grid, grid_out: "Grid | ChannelGrid | None") -> "GluParams":
        """``grid_out`` None: no requantization (``glu_accumulator`` only: the fake-quant
        simulation, whose consumer rounds the accumulator's value). A ``ChannelGrid`` (the
        conv subsampler's last GLU onto a per-channel embed grid): one multiplier and zero point
        per output channel, applied along the GLU's ``dim`` (``integer_glu``)."""
        values = (grid_in.codes() - grid_in.zero_point).double() * grid_in.scale
        gate = torch.round(torch.sigmoid(values) * 2 ** GLU_GATE_BITS).to(torch.int32)
        out = None if grid_out is None else Requant.from_scales(glu_acc_scale(grid_in) / grid_out.scale,
                                                                grid_out.zero_point, grid_out.qmin, grid_out.qmax)
        return cls(gate, grid_in.zero_point, grid_in.qmin, out)


def glu_acc_scale(grid_in: Grid) -> float:
    """The grid of the GLU accumulator ``(a - zp) * gate[b]`` of inputs on ``grid_in``: s_in 2^-15."""
    return grid_in.scale * 2.0 ** -GLU_GATE_BITS


def glu_accumulator(codes: torch.Tensor, params: GluParams, dim: int = -1) -> torch.Tensor:
    """``(a - zp) * gate[b]`` in int32 (|a - zp| < 2^16 for inputs of at most 16 bits, gate <=
    2^15: below 2^31), on the grid ``glu_acc_scale(grid_in)``: ``a`` the first half of ``codes`` along
    ``dim``, ``b`` the second."""
    _check_int("codes", codes)
    a, b = codes.chunk(2, dim=dim)
    gate = params.gate[b.to(torch.int64) - params.qmin]
    return (a.to(torch.int32) - params.zero_point) * gate


def integer_glu(codes: torch.Tensor, params: GluParams, dim: int = -1) -> torch.Tensor:
    """GLU of input codes: ``glu_accumulator`` requantized onto the output grid (single rounding,
    saturating)."""
    return params.out(glu_accumulator(codes, params, dim), axis=dim)


# -- softmax ----------------------------------------------------------------------------------------

# exp table entries in [0, 2^20] (2^15 left probability codes of the shipped model a step from
# the float softmax's); a row's sum stays in int32 below 2^11 positions (82 s of audio after 4x
# subsampling of 10 ms frames, 41 s at wav2vec 2.0's 20 ms frames) and is summed in int64 from there
EXP_BITS = 20
DIV_BITS = 16  # fraction bits of the output reciprocal


@serializable(exp_table=Tensor("int32"), out_mult=INT, out=Obj("Grid"))
@dataclass(frozen=True)
class SoftmaxParams:
    """Integer softmax tables: ``exp_table[d]`` = round(2^EXP_BITS * exp(s_in * -d)) for the
    distances ``d = max - q`` in [0, qmax - qmin] (half to even, built in float64), and
    ``out_mult`` = round(2^DIV_BITS / s_out), the output grid's reciprocal."""

    exp_table: torch.Tensor
    out_mult: int
    out: Grid

    def __post_init__(self) -> None:
        """``build``'s ranges: a 1-d int32 table of values in [0, 2^EXP_BITS], ``out_mult`` in
        [1, 2^(62 - EXP_BITS)) (``e * out_mult`` plus the rounding term stays within int64);
        IntegerizeError otherwise."""
        table = self.exp_table
        if not (isinstance(table, torch.Tensor) and table.dtype == torch.int32 and table.dim() == 1
                and table.numel() > 0 and int(table.min()) >= 0 and int(table.max()) <= 2 ** EXP_BITS):
            raise IntegerizeError(f"a softmax's exp table is a 1-d int32 table of values 0..2^{EXP_BITS}")
        if not 1 <= self.out_mult < 2 ** (62 - EXP_BITS):
            raise IntegerizeError(f"a softmax's output multiplier is 1 to 2^{62 - EXP_BITS} - 1, got {self.out_mult}")

    @classmethod
    def build(cls, grid_in: Grid, grid_out: Grid) -> "SoftmaxParams":
        d = torch.arange(0, grid_in.qmax - grid_in.qmin + 1, dtype=torch.float64)
        table = torch.round(torch.exp(-d * grid_in.scale) * 2 ** EXP_BITS).to(torch.int32)
        return cls(table, int(round(2 ** DIV_BITS / grid_out.scale)), grid_out)


def integer_softmax(codes: torch.Tensor, params: SoftmaxParams, blocked: torch.Tensor | None = None,
                    dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim`` of input codes, as codes of the output grid.

    ``e = exp_table[max - q]`` (int32, max along ``dim`` over unblocked positions; blocked ones get
    0), ``sum`` of ``e``: in int32 for rows of fewer than 2^11 positions (``e <= 2^20``: exact), in
    int64 for longer rows (a row of 2^11 or more had been refused, stopping the integer model on a
    41 s wav2vec 2.0 utterance), then ``code = (e * out_mult + sum * 2^15) // (sum * 2^16)`` in
    int64 (round half up; ``e * out_mult < 2^62``, ``out_mult < 2^42``; ``sum * 2^16 < 2^62``:
    rows of fewer than 2^26 positions, a longer one is refused), plus the zero point, clamped
    (saturation) to [qmin, qmax]. A row with every position blocked gives the zero point (the
    float softmax gives NaN there)."""
    _check_int("codes", codes)
    if codes.shape[dim] >= 2 ** (63 - EXP_BITS - DIV_BITS - 1):
        raise IntegerizeError(f"integer_softmax's int64 division holds rows of fewer than "
                              f"2^{63 - EXP_BITS - DIV_BITS - 1} positions, got a row of {codes.shape[dim]}")
    q = codes.to(torch.int32)
    low = torch.iinfo(torch.int32).min
    if blocked is not None:
        q = q.masked_fill(blocked, low)
    row_max = q.amax(dim=dim, keepdim=True)
    dist = (row_max.to(torch.int64) - q.to(torch.int64)).clamp(max=params.exp_table.numel() - 1)
    e = params.exp_table[dist]  # int32
    if blocked is not None:
        e = e.masked_fill(blocked, 0)
    wide = codes.shape[dim] >= 2 ** (31 - EXP_BITS)
    total = e.sum(dim=dim, keepdim=True, dtype=torch.int64 if wide else torch.int32).to(torch.int64)
    num = e.to(torch.int64) * params.out_mult
    den = total << DIV_BITS
    safe = torch.where(den == 0, 1, den)
    out = torch.div(num + (safe >> 1), safe, rounding_mode="floor")
    out = torch.where(den == 0, 0, out) + params.out.zero_point
    return out.clamp(params.out.qmin, params.out.qmax).to(params.out.dtype)


# -- LayerNorm ----------------------------------------------------------------------------------------

LN_MAX_DIM = 4096
LN_FRAC_BITS = 16  # fraction bits of the normalized value
_LN_SQRT_BITS = 10  # extra fraction bits of the standard deviation


@serializable(eps_int=INT, gamma=Tensor("int32"), beta=Tensor("int32"), out=Opt(Obj("Requant")),
              acc_scale=Either(FLOAT, Tensor("float64")), sqrt_bits=INT)
@dataclass(frozen=True)
class LayerNormParams:
    """Integer LayerNorm constants: ``eps_int`` = round(N^2 eps / s_in^2) (the variance's epsilon in
    the units of ``N^2 (q - mean)^2``), ``gamma`` codes (int32) and ``beta`` on the int32 grid of
    the affine accumulator (``acc_scale`` = ``s_gamma * 2^-LN_FRAC_BITS``, half to even), and the
    requantization of that accumulator to the output grid (``out``; None keeps the int32
    accumulator, e.g. a post-norm layer's output stream read by several consumers), and the
    standard deviation's extra fraction bits (``sqrt_bits``: 10 for codes of up to 8 bits, fewer
    for wider inputs such as ``common_grid``'s, so that ``_normalized`` stays within int64)."""

    eps_int: int
    gamma: torch.Tensor
    beta: torch.Tensor
    out: Requant | None
    acc_scale: float | torch.Tensor = 0.0
    sqrt_bits: int = 10

    def __post_init__(self) -> None:
        """``build``'s ranges: ``eps_int`` >= 0, ``sqrt_bits`` 0 to ``_LN_SQRT_BITS``; IntegerizeError
        otherwise (a negative variance epsilon, or a shift out of the int64 range the arithmetic
        was sized for)."""
        if self.eps_int < 0:
            raise IntegerizeError(f"a LayerNorm's integer epsilon is 0 or more, got {self.eps_int}")
        if not 0 <= self.sqrt_bits <= _LN_SQRT_BITS:
            raise IntegerizeError(f"a LayerNorm's sqrt_bits is 0 to {_LN_SQRT_BITS}, got {self.sqrt_bits}")

    @classmethod
    def build(cls, n: int, eps: float, scale_in: float, gamma_codes: torch.Tensor,
              gamma_scale: float | torch.Tensor, beta: torch.Tensor | None, grid_out: Grid | None,
              input_bound: int | None = None) -> "LayerNormParams":
        """``gamma_scale``: a float (per tensor) or a (N,) tensor (per channel); ``beta``: float
        values (already on their own grid) or None; ``grid_out`` None: no requantization;
        ``input_bound``: the largest ``|code|`` of a wider input than 8-bit codes (then
        ``sqrt_bits`` is the most, at most 10, that keeps ``(V + eps_int) << 2 sqrt_bits`` within
        2^62, with ``V <= N^2 input_bound^2``)."""
        if not 1 <= n <= LN_MAX_DIM:
            raise IntegerizeError(f"integer_layer_norm normalizes 1 to {LN_MAX_DIM} features, got {n}")
        acc_scale, beta_int, out = _affine_constants(n, gamma_scale, beta, grid_out)
        _check_affine_range(n, gamma_codes, beta_int)
        eps_int = int(round(n * n * eps / (scale_in * scale_in)))
        sqrt_bits = _LN_SQRT_BITS
        if input_bound is None and eps_int > 0 and (n * n * 2 ** 16 + eps_int).bit_length() > 62 - 2 * sqrt_bits:
            input_bound = 2 ** 8  # 8-bit codes, an epsilon large in code units: fewer sqrt bits, as below
        if input_bound is not None:
            bound = n * n * input_bound * input_bound + eps_int
            sqrt_bits = (62 - bound.bit_length()) // 2
            if sqrt_bits < 0 or n * input_bound * 2 ** (1 + LN_FRAC_BITS + sqrt_bits) > 2 ** 62:
                raise IntegerizeError(f"integer_layer_norm of {n} features of |code| <= {input_bound}: the "
                                      f"variance leaves int64; use fewer features or a coarser input")
            sqrt_bits = min(_LN_SQRT_BITS, sqrt_bits)
        return cls(eps_int, gamma_codes.to(torch.int32), beta_int, out, acc_scale, sqrt_bits)


def _check_affine_range(n: int, gamma_codes: torch.Tensor, beta_int: torch.Tensor) -> None:
    """Refuse a LayerNorm whose affine accumulator ``y gamma + beta`` could leave int32: ``|y| <=
    (isqrt(N) + 1) 2^LN_FRAC_BITS`` (``|y| < sqrt(N) 2^16``), so gamma's codes must stay below
    ``(2^31 - 1 - max|beta|) / that`` (8-bit gamma always does, for every N <= LN_MAX_DIM; 16-bit
    gamma does not, and the accumulator would saturate instead of normalizing)."""
    gamma_max = int(gamma_codes.abs().max()) if gamma_codes.numel() else 0
    beta_max = int(beta_int.abs().max()) if beta_int.numel() else 0
    y_max = (math.isqrt(n) + 1) << LN_FRAC_BITS
    if gamma_max * y_max + beta_max > INT32_MAX:
        raise IntegerizeError(f"integer_layer_norm's affine accumulator y * gamma + beta can leave int32: gamma's "
                              f"codes reach {gamma_max} over {n} features (at most 8-bit norm weights fit): "
                              "quantize the norm_weight site with fewer bits for integer execution (the fake-quant "
                              "model computes this norm in float)")


def _affine_constants(channels: int, gamma_scale: float | torch.Tensor, beta: torch.Tensor | None,
                      grid_out: Grid | None) -> tuple:
    """(acc_scale (float or (C,) float64), beta (C,) int32 on it (half to even), Requant or None)
    of a norm's fixed-point affine ``y * gamma + beta`` (``y`` with ``LN_FRAC_BITS`` fraction bits)."""
    acc_scale = torch.as_tensor(gamma_scale, dtype=torch.float64) * 2.0 ** -LN_FRAC_BITS
    beta_int = torch.zeros(channels, dtype=torch.int64) if beta is None else torch.round(beta.double() / acc_scale)
    if beta_int.numel() and beta_int.abs().max() > 2 ** 30:
        raise IntegerizeError("the norm's bias is beyond 2^30 steps of the affine accumulator (gamma's grid is too "
                              "fine for this beta): quantize the norm_weight site with fewer bits for integer "
                              "execution (the fake-quant model computes this norm in float)")
    out = None if grid_out is None else Requant.from_scales(acc_scale / grid_out.scale, grid_out.zero_point,
                                                            grid_out.qmin, grid_out.qmax)
    scale = float(acc_scale) if acc_scale.numel() == 1 else acc_scale
    return scale, beta_int.to(torch.int32), out


def _normalized(q: torch.Tensor, eps_int: int, sqrt_bits: int,
                root: Callable[[torch.Tensor], torch.Tensor] = isqrt) -> torch.Tensor:
    """``round((q - mean) / sqrt(var + eps) * 2^LN_FRAC_BITS)`` over the last axis (N values) of
    int64 codes, in integers: ``c = N q - sum(q)`` (exact, = N (q - mean)), ``V = N sum(q^2) -
    sum(q)^2`` (exact, = sum(c^2) / N = N^2 var; int64 below N^2 2^16 for 8-bit codes),
    ``D = isqrt((V + eps_int) << 2 sqrt_bits)`` (floor; ~ 2^sqrt_bits N sqrt(var + eps) in code
    units), ``y = round(c 2^(LN_FRAC_BITS + sqrt_bits) / D)`` (int64, half away from zero).
    The caller picks ``sqrt_bits`` so that ``(V + eps_int) << 2 sqrt_bits`` stays within 2^62.
    ``root``: another exact ``floor(sqrt)`` of int64 values in place of ``isqrt`` (the same
    result; the fake-quant simulation's per-row one, ``qswap.nn.simulate.row_isqrt``)."""
    n = q.shape[-1]
    total = q.sum(dim=-1, keepdim=True)
    c = n * q - total
    var = n * (q * q).sum(dim=-1, keepdim=True) - total * total + eps_int
    d = root(var << (2 * sqrt_bits)).clamp(min=1)
    num = c << (LN_FRAC_BITS + sqrt_bits)
    return torch.sign(num) * torch.div(num.abs() + (d >> 1), d, rounding_mode="floor")


def integer_layer_norm_acc(codes: torch.Tensor, params: LayerNormParams,
                           root: Callable[[torch.Tensor], torch.Tensor] = isqrt) -> torch.Tensor:
    """LayerNorm over the last axis (N features) of input codes, as the int32 affine accumulator
    on the grid ``params.acc_scale`` (what ``integer_layer_norm`` requantizes).

    ``_normalized`` with ``params.sqrt_bits`` extra fraction bits of the standard deviation (10
    for 8-bit codes where ``N^2 2^16 + eps_int`` fits 42 bits, so that ``<< 20`` stays below
    2^62; fewer, chosen when built, for a wider input or an epsilon large in code units, a very
    fine input grid's: ``LayerNormParams.build``); ``|y| < sqrt(N) 2^16
    <= 2^22``; affine accumulator ``y gamma + beta`` (|y gamma| < 2^29 for 8-bit gamma,
    |beta| <= 2^30; ``LayerNormParams.build`` refuses gamma and beta whose sum could leave int32,
    and the clamp below is never reached). The input zero point cancels in ``c``.
    ``root``: as ``_normalized``'s (the fake-quant simulation passes its per-row one)."""
    _check_int("codes", codes)
    y = _normalized(codes.to(torch.int64), params.eps_int, params.sqrt_bits, root)
    acc = y * params.gamma.to(torch.int64) + params.beta.to(torch.int64)
    return acc.clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def integer_layer_norm(codes: torch.Tensor, params: LayerNormParams) -> torch.Tensor:
    """LayerNorm over the last axis of input codes, as output codes: ``integer_layer_norm_acc``
    then ``requantize`` onto the output grid (single rounding, saturating to [qmin, qmax])."""
    if params.out is None:
        raise IntegerizeError("integer_layer_norm needs LayerNormParams built with an output grid")
    return params.out(integer_layer_norm_acc(codes, params))


GN_MAX_ELEMENTS = 2 ** 22  # values normalized together (a group's channels times the time steps)


@serializable(groups=INT, eps_ratio=Tuple(INT, INT), span=INT, gamma=Tensor("int32"), beta=Tensor("int32"),
              out=Opt(Obj("Requant")), acc_scale=Either(FLOAT, Tensor("float64")))
@dataclass(frozen=True)
class GroupNormParams:
    """Integer GroupNorm constants for (B, C, ...) codes in ``groups`` groups of channels: the
    epsilon in code units ``eps / s_in^2`` as an exact ratio of integers ``eps_ratio`` (each call
    rounds ``N^2 eps / s_in^2`` for its group size N in Python integers), the input code span,
    per-channel ``gamma`` codes and ``beta`` on the affine accumulator's grid (as
    ``LayerNormParams``), the requantization (None: the accumulator)."""

    groups: int
    eps_ratio: tuple[int, int]
    span: int
    gamma: torch.Tensor
    beta: torch.Tensor
    out: Requant | None
    acc_scale: float | torch.Tensor

    @classmethod
    def build(cls, groups: int, channels: int, eps: float, grid_in: Grid, gamma_codes: torch.Tensor,
              gamma_scale: float | torch.Tensor, beta: torch.Tensor | None, grid_out: Grid | None) -> "GroupNormParams":
        if channels % groups:
            raise IntegerizeError(f"GroupNorm of {channels} channels in {groups} groups: not a whole number per group")
        acc_scale, beta_int, out = _affine_constants(channels, gamma_scale, beta, grid_out)
        gamma_max = int(gamma_codes.abs().max()) if gamma_codes.numel() else 0
        if gamma_max > 128:  # N (channels per group times positions) is only known per call: bound gamma
            raise IntegerizeError(f"integer_group_norm's affine accumulator y * gamma + beta saturates int32 at "
                                  f"2^15 / max|gamma| standard deviations, and gamma's codes reach {gamma_max}: "
                                  f"quantize the norm_weight site with at most 8 bits for integer execution (the "
                                  f"fake-quant model computes this norm in float)")
        eps_units = Fraction(eps) / (Fraction(grid_in.scale) ** 2)
        return cls(groups, (eps_units.numerator, eps_units.denominator), grid_in.qmax - grid_in.qmin, gamma_codes.to(torch.int32), beta_int, out,
                   acc_scale)


def integer_group_norm(codes: torch.Tensor, params: GroupNormParams) -> torch.Tensor:
    """GroupNorm of (B, C, ...) input codes (each group of C/G channels normalized over its
    channels and every position), then the per-channel affine, as output codes (or the int32
    accumulator when built without an output grid).

    ``_normalized`` over the N = C/G * positions values of a group (N <= 2^22; ``V`` <= N^2
    span^2 / 4 <= 2^58 for 8-bit codes), with ``eps_int = round(N^2 eps / s_in^2)`` (half to even,
    exact rational arithmetic) and the largest number of standard-deviation fraction bits, at most
    10, that keeps ``(V + eps_int) << 2 bits`` within 2^62 (10 up to N = 2^13 for 8-bit codes,
    fewer beyond, when ``D`` has more bits anyway). ``|y| <=
    sqrt(N) 2^16``; the accumulator ``y gamma + beta`` saturates to int32 beyond 2^31 (a value
    more than 2^15 / max|gamma| standard deviations from its group's mean). Requantized per
    channel (axis 1) when gamma's grid is per channel."""
    _check_int("codes", codes)
    b, c = codes.shape[:2]
    g = params.groups
    q = codes.to(torch.int64).reshape(b, g, -1)  # (B, G, N)
    n = q.shape[-1]
    if n > GN_MAX_ELEMENTS:
        raise IntegerizeError(f"integer_group_norm normalizes at most {GN_MAX_ELEMENTS} values per group, got {n}")
    eps_int = round(Fraction(*params.eps_ratio) * n * n)
    bound = (n * n * params.span * params.span) // 4 + eps_int
    if bound >= 2 ** 62:  # the variance plus epsilon leaves int64 (an epsilon far above the input's scale)
        raise IntegerizeError(f"integer_group_norm of {n} values per group: the variance plus epsilon in code "
                              f"units ({eps_int}) leaves int64; the input grid is far finer than the norm's "
                              f"epsilon (calibrated on silence?): calibrate on speech, or use fewer samples per group")
    sqrt_bits = max(0, min(_LN_SQRT_BITS, (62 - bound.bit_length()) // 2))
    y = _normalized(q, eps_int, sqrt_bits).reshape(codes.shape)  # (B, C, ...)
    shape = (1, c) + (1,) * (codes.dim() - 2)
    acc = y * params.gamma.to(torch.int64).reshape(shape) + params.beta.to(torch.int64).reshape(shape)
    acc = acc.clamp(INT32_MIN, INT32_MAX).to(torch.int32)
    return acc if params.out is None else params.out(acc, axis=1)


# -- from fake-quant modules (build time) ----------------------------------------------------------------

def weight_codes(quantizer, weight: torch.Tensor, *, symmetric: bool = True,
                 derived: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``weight`` on its ``FakeQuantize`` grid (the same rounding as the fake-quant
    forward) and the float scale per tensor () or per channel (C,), for building integer forms.
    Symmetric weights only unless ``symmetric=False`` (a weight zero point needs cross terms
    with the input's that integer forms do not compute yet); per-group grids are not supported.
    ``derived``: the quantizer's grid was derived from this very ``weight`` by the caller's own
    forward just before (``_grid_codes``)."""
    if not quantizes(quantizer):
        raise IntegerizeError("a weight without a quantizer stays float; quantize it in the recipe "
                              "to run the op on integers")
    spec = quantizer.spec
    if spec.granularity == "per_group":
        raise IntegerizeError(f"{spec.short()} weights have an integer form in a Linear only "
                              f"(group_weight_codes); use per_tensor or per_channel here")
    codes = _grid_codes(quantizer, weight, symmetric, derived=derived)
    return codes, quantizer.scale.detach().reshape(-1) if quantizer.scale.numel() > 1 else quantizer.scale.detach()


def _grid_codes(quantizer, weight: torch.Tensor, symmetric: bool = True,
                check: Callable[[torch.Tensor], None] | None = None, derived: bool = False) -> torch.Tensor:
    """Codes of ``weight`` on its quantizer's grid, re-derived for the current weight (the same
    rounding as the fake-quant forward); ``check(scale)`` first, on the re-derived scale. A
    zero point where ``symmetric``: IntegerizeError (integer forms compute no cross terms).
    ``derived``: the caller's forward has just called ``quantizer(weight)`` on this very tensor
    (a training step's float op, run before its integer form: ``qswap.nn.linear.onto_linear``),
    so the grid is that weight's and is read as it is. A training forward re-derives a weight's
    grid on every call (``FakeQuantize._forward_weight``), a full observer pass (an MSE search for
    ``observer: mse``); deriving it twice per layer was an eighth of a W4A4 QAT step."""
    with torch.no_grad():
        if not derived:
            quantizer(weight)  # (re)derives the grid of the current weight
        if check is not None:
            check(quantizer.scale.detach())
        codes = quantize(weight, quantizer.scale, quantizer.zero_point, quantizer.spec)
    if symmetric and bool((quantizer.zero_point != 0).any()):
        raise IntegerizeError(f"{quantizer.spec.short()} weights have a zero point; integer forms need "
                              f"symmetric weights (symmetric: true)")
    return codes


GROUP_SHIFT_MAX = 14  # fraction bits of a per-group weight's multiplier (codes times it stay int16)


def bias_codes(bias: torch.Tensor | None, acc_scale: torch.Tensor) -> torch.Tensor | None:
    """A weighted op's int32 bias codes on its accumulator's grid ``acc_scale`` (float32, per tensor
    or per output channel): ``round(bias / acc_scale)`` in float32, half to even (as
    ``BiasQuantize``), saturated to int32. None without a bias."""
    if bias is None:
        return None
    return torch.round(bias.detach() / acc_scale).clamp(INT32_MIN, INT32_MAX).to(torch.int32)


def group_weight_codes(quantizer, weight: torch.Tensor, *, span: int, in_scale: float,
                       bias: torch.Tensor | None, derived: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A Linear's per-group weight (groups of ``group_size`` along its input axis, group scale
    ``s[c, g]``, symmetric) as one integer weight on a per-output-channel grid, for ``IntegerLinear``.

    Definition: each row's reference scale ``S[c] = max_g s[c, g]``; each group's multiplier
    ``m[c, g] = round_half_even(s[c, g] / S[c] * 2^k)``, an integer in [0, 2^k] (a group more than
    2^(k+1) times finer than its row's coarsest gets 0); the integer weight ``code[c, i] * m[c,
    g(i)]`` (int16), on the grid ``S[c] * 2^-k``. The accumulator is then ``sum_g m[c, g] * sum_{i in
    g} (x_i - zp) code_i`` (each group's partial sum scaled by its multiplier, summed), exact in
    int32, followed by the per-channel requantization every linear has. ``k`` is the largest of
    ``GROUP_SHIFT_MAX`` .. 0 with every integer weight within int16 and, row by row, ``span *
    sum_i |code_i m| + |bias code| < 2^31`` (``span``: the input grid's largest ``|x - zp|``; the
    bias codes ``bias_codes`` on ``in_scale * S[c] * 2^-k``, as ``integer_linear`` rounds them): the
    accumulator's exact worst case over every input of the grid. The effective weight ``code *
    S[c] * m / 2^k`` differs from the fake-quant model's ``code * s[c, g]`` by the multiplier's
    rounding: at most ``|code| * S[c] * 2^-(k+1)``. The fake-quant model with ``simulate:
    integer`` computes this form; with ``simulate: float``, its own per-group weights. Returns
    (int16 weight (out, in), float32 scales (out,), that row bound: the largest over the rows).
    IntegerizeError for a scale that is not finite and positive (a learned scale trained to 0 or
    below), a weight grouped along another axis, or no ``k`` that fits."""
    from qswap.quant.primitives import channel_axis
    spec = quantizer.spec
    if weight.dim() != 2 or channel_axis(weight, spec) != 1:
        raise IntegerizeError(f"{spec.short()} weights have an integer form along a Linear's input axis "
                              f"(axis -1) only; got a {weight.dim()}-d weight grouped along axis {spec.channel_axis}")
    out, fan_in = weight.shape
    groups = fan_in // spec.group_size

    def positive(scale: torch.Tensor) -> None:
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise IntegerizeError(f"{spec.short()} weights need finite positive group scales for an integer "
                                  f"form; got scales down to {float(scale.min()):g}")

    codes = _grid_codes(quantizer, weight, check=positive, derived=derived).to(torch.int64)  # (out, in)
    scale = quantizer.scale.detach().reshape(out, groups).double()  # float32 values
    row = scale.amax(dim=1)  # (out,) S[c]
    magnitudes = codes.abs().reshape(out, groups, spec.group_size).sum(dim=2)  # (out, groups)
    for shift in range(GROUP_SHIFT_MAX, -1, -1):
        multipliers = torch.round(scale / row[:, None] * 2.0 ** shift).to(torch.int64)  # (out, groups)
        wide = codes.reshape(out, groups, spec.group_size) * multipliers[:, :, None]
        if int(wide.abs().max()) > 32767:
            continue
        w_scale = (row * 2.0 ** -shift).float()
        acc_scale = torch.tensor(in_scale, dtype=torch.float32) * w_scale  # integer_linear's
        biases = bias_codes(bias, acc_scale)
        rows = span * (magnitudes * multipliers).sum(dim=1)
        if biases is not None:
            rows = rows + biases.to(torch.int64).abs()
        bound = int(rows.max())
        if bound <= INT32_MAX:
            return wide.reshape(out, fan_in).to(torch.int16), w_scale, bound
    raise IntegerizeError(f"a Linear of fan-in {fan_in} with {spec.short()} weights overflows int32 even "
                          f"with whole multipliers; reduce the input or weight bit widths")


def check_bound(what: str, bound: int, limit: int = INT32_MAX) -> None:
    """Raise when an op's largest accumulator (``bound``, from the shapes and code ranges it was
    built for) exceeds ``limit``."""
    if bound > limit:
        raise IntegerizeError(f"{what} can reach {bound} in its accumulator, beyond {limit}; "
                              f"reduce the reduction length or the bit widths")


# -- exact integer GEMMs on float units (the fake-quant simulation's, never the integer model's) --------



def exact_float_dtype(bound: int, device: torch.device) -> torch.dtype:
    """The float dtype whose GEMM computes an integer GEMM exactly when no partial sum can exceed
    ``bound`` in magnitude (``exact_gemm``): float32 below 2^24 where float32 GEMMs and
    convolutions run in IEEE float32 (``_ieee_float32``), else float64 below 2^53;
    IntegerizeError beyond."""
    if bound < FLOAT32_EXACT and _ieee_float32(device):
        return torch.float32
    if bound < FLOAT64_EXACT:
        return torch.float64
    raise IntegerizeError(f"an integer GEMM whose partial sums can reach {bound} has no exact float form "
                          f"(float64 is exact below 2^53)")


_FP32_SETTINGS = {"cpu": ("fp32_precision", "mkldnn.fp32_precision", "mkldnn.matmul.fp32_precision",
                          "mkldnn.conv.fp32_precision"),
                  "cuda": ("fp32_precision", "cuda.matmul.fp32_precision", "cudnn.fp32_precision",
                           "cudnn.conv.fp32_precision")}


def _ieee_float32(device: torch.device) -> bool:
    """Whether float32 matmuls and convolutions on ``device`` compute in IEEE float32: torch's
    ``float32_matmul_precision`` "highest", no backend set to TF32 or bf16 (``fp32_precision``
    "none" or "ieee"), and on CUDA TF32 off for matmuls and cuDNN. Other devices: no."""
    if device.type not in _FP32_SETTINGS or torch.get_float32_matmul_precision() != "highest":
        return False
    for name in _FP32_SETTINGS[device.type]:
        setting = torch.backends
        for part in name.split("."):
            setting = getattr(setting, part, None)
        if setting not in (None, "none", "ieee"):
            return False
    return device.type == "cpu" or not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def winograd_may_run(x: torch.Tensor) -> bool:
    """Whether torch may convolve an input of ``x``'s shape and device in float32 with an
    algorithm that rounds (not a sum of products): NNPACK's Winograd and FFT, which torch may pick
    on CPU for a 4-D float32 input with a batch of 16 or more while NNPACK is available and
    enabled (``torch.backends.nnpack``), and the depthwise 3x3 Winograd kernel of ARM builds; on
    other devices, always (cuDNN may pick FFT or Winograd). Float64 never runs them: an exact
    float convolution then uses float64."""
    if x.device.type != "cpu":
        return True
    if x.dim() != 4:
        return False
    nnpack = x.shape[0] >= 16 and torch._nnpack_available() and torch._C._get_nnpack_enabled()  # noqa: SLF001
    return nnpack or platform.machine().lower() in ("arm64", "aarch64")


def exact_gemm(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor, fan_in: int,
               bias: torch.Tensor | None = None, *, b_max: int | None = None, bias_max: int = 0,
               spans: tuple[int, int] | None = None, **kwargs) -> torch.Tensor:
    """``op(a, b[, bias], **kwargs)`` of integer-valued operands, computed by the float kernel
    of ``op`` and returned as the exact int32 result. ``op``: a sum of products (``F.linear``,
    ``torch.bmm``, ``F.conv1d``/``F.conv2d``) in which each output sums at most ``fan_in``
    products ``a_i b_i`` (plus ``bias``); ``a``, ``b``, ``bias``: integer tensors, or float
    tensors holding integers (centered codes); ``b_max``/``bias_max``: their largest magnitude
    when the caller knows it (a constant weight), else measured.

    Exactness: a binary float type of p significand bits holds every integer of magnitude at
    most 2^p (p = 24 for float32, 53 for float64), and the sum, product or fused multiply-add of
    two such integers is computed exactly when the exact result is again an integer within 2^p
    (IEEE 754: the result is the exact value rounded, and it needs no rounding). Every product
    of the GEMM is at most ``max|a| max|b|``, every partial sum, in whatever order or blocking
    the kernel accumulates, at most ``fan_in max|a| max|b| + max|bias|`` (the ``bound``, from the
    operands' actual maxima, measured per call, or from ``spans``, bounds of them): so when the bound is below 2^p no operation
    rounds, the float result is the integer result, and its conversion to int32 is exact. float32
    is used below 2^24 (``exact_float_dtype``), float64 below 2^53 (beyond every int32 result).
    The same holds for the integer op this replaces (int32 accumulation without overflow), so
    both give the same integers. Used by the fake-quant simulation (``simulate: integer``) in
    place of torch's generic int32 kernels; ``qswap.integerize``'s model keeps integer dtypes.
    ``spans``: bounds of ``|a|`` and ``|b|`` the caller knows (the grids' ``Grid.span``): where
    they already put the bound below 2^24, float32 is used without measuring the operands."""
    out, _ = exact_gemm_float(op, a, b, fan_in, bias, b_max=b_max, bias_max=bias_max, spans=spans, **kwargs)
    return out.to(torch.int32)


def exact_gemm_float(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor, fan_in: int,
                     bias: torch.Tensor | None = None, *, b_max: int | None = None, bias_max: int = 0,
                     spans: tuple[int, int] | None = None, **kwargs) -> tuple[torch.Tensor, int]:
    """``exact_gemm``'s result before its int32 conversion (a float tensor of exact integers, for
    ``requantized_values``) and its bound (``fan_in max|a| max|b| + max|bias|``, or the one of
    ``spans`` where that is below 2^24)."""
    if bias is not None and bias_max == 0:
        bias_max = magnitude(bias)
    if spans is not None and fan_in * spans[0] * spans[1] + bias_max < FLOAT32_EXACT:
        a_max, b_max = spans  # bound enough for float32: the operands are not measured
    else:
        a_max, b_max = magnitude(a), magnitude(b) if b_max is None else b_max
    bound = fan_in * a_max * b_max + bias_max
    dtype = exact_float_dtype(bound, a.device)
    args = (a.to(dtype), b.to(dtype)) + (() if bias is None else (bias.to(dtype),))
    return op(*args, **kwargs), bound


def magnitude(t: torch.Tensor) -> int:
    """``max |t|`` as a Python int (0 for an empty tensor), in one pass (``aminmax``). Read
    outside any torch dispatch mode: it only picks an exact GEMM's kernel (``exact_float_dtype``),
    and the honesty audit proves that GEMM's exactness from the operands' values itself
    (``qswap.honesty.gemm``)."""
    if not t.numel():
        return 0
    with torch._C._DisableTorchDispatch():  # noqa: SLF001
        low, high = torch.aminmax(t)
        return int(max(-low, high))
