"""The integer-GEMM rule: a float GEMM on integer data, proven exact, is integer arithmetic.

The fake-quant simulation (``simulate: integer``, ``qswap.nn.simulate``) computes the integer
model's GEMMs (``(x - zp) W``, ``(q - zq)(k - zk)^T``) on float kernels, on float tensors that
hold the integers, because torch's integer kernels are slow. That is integer arithmetic exactly
when no step of the float kernel rounds; this module proves it for each call, from the operands'
values, and never from a name.

An op of ``INTEGER_GEMMS`` (``ops.py``: mm, bmm, addmm, baddbmm, linear, convolution) is covered
when every float operand is one of

* **codes**: integers of quantized data (a tag of kind ``acc`` or ``kernel`` marked
  ``integral``: a quantized tensor's codes, rounded, or cast back to float from an integer
  dtype, or an exact integer GEMM's output); at least one operand must be;
* **integers**: an ``integral`` float made from integer data with no float origin (``index``):
  a weight's int8 codes or a bias's int32 codes cast to float;
* **constants**: a parameter, buffer or module tensor attribute (not looked up by index) whose
  values the audit reads and finds to be integers: the float copies of weight codes a
  simulation keeps. Their width is not tied to a quantizer, as an integer-dtype buffer's isn't.

It is exact, and counted as ``integer_gemm`` with an output that is again codes, when every
partial sum stays an exactly representable integer: each output sums at most ``fan_in``
products of the two multiplied operands plus one term of the added one (a bias), so no partial
sum, in whatever order or blocking the kernel adds, exceeds

    bound = fan_in * max|a| * max|b| + max|c|

(the operands' actual maxima, ``aminmax``). Below 2^24 in float32 every product, sum and fused
multiply-add of the kernel is an integer within float32's exact range and needs no rounding;
below 2^53 in float64 likewise. Besides the bound: float32 matmuls and convolutions must run in
IEEE float32 (``qswap.quant.integer._ieee_float32``: no TF32 or bf16 reduced precision), a
convolution must be a sum of products (on CPU, where no Winograd or FFT algorithm may run:
``winograd_may_run``), ``alpha`` and ``beta`` must be 1, and a convolution must not be
transposed. A covered op that fails any of these is an ``inexact_gemm`` finding naming the
reason ("float GEMM on integer data not exact: bound B >= 2^24 (float32)"). An op with an
operand of any other kind is decided as every compute op (a float operand is a finding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qswap.honesty import ops as O
from qswap.honesty.tags import ACC, CONST, INDEX, KERNEL, PARAM, Tag

CODES, INTEGERS, CONSTANT = "codes", "integers", "constant"
_LIMITS = {torch.float32: (2 ** 24, "2^24"), torch.float64: (2 ** 53, "2^53")}


@dataclass(frozen=True)
class Verdict:
    """A covered GEMM: exact (integer arithmetic), or the reason it is not proven exact."""

    exact: bool
    bound: float  # an int, or inf
    why: str = ""


def role(tag: Tag) -> str | None:
    """What an operand with this tag is to the rule (None: not integer data it vouches for)."""
    if tag.integral and tag.kind in (ACC, KERNEL):
        return CODES
    if tag.integral and tag.kind == INDEX:
        return INTEGERS
    if tag.kind in (PARAM, CONST) and not tag.lookup:
        return CONSTANT
    return None


def decide(func, name: str, args, kwargs, tags: list[Tag], operands: list) -> Verdict | None:
    """The verdict on a GEMM-family op (``name`` in ``INTEGER_GEMMS``) whose float operands
    (``operands``: (position, tensor)) carry ``tags``; None where the rule does not cover it.
    Operands are read on every call, constants included: a cache by version would miss a write
    through ``.data`` (which bumps no version counter)."""
    roles = [role(t) for t in tags]
    if CODES not in roles or None in roles:
        return None
    magnitudes = {}
    for (_, t), r in zip(operands, roles):
        magnitudes[id(t)] = _magnitude(t, check_integers=r == CONSTANT)
        if magnitudes[id(t)] is None:
            return None  # a constant that is not all integers: float data
    a_name, b_name, c_name = O.INTEGER_GEMMS[name]
    a, b = O.argument(func, args, kwargs, a_name), O.argument(func, args, kwargs, b_name)
    c = O.argument(func, args, kwargs, c_name) if c_name else None
    conv = "conv" in name
    fan_in = b[0].numel() if conv else a.shape[-1]
    bound = fan_in * magnitudes[id(a)] * magnitudes[id(b)] + (0 if c is None else magnitudes[id(c)])
    why = _unproven(func, args, kwargs, a, conv)
    limit, label = _LIMITS.get(a.dtype, (0, ""))
    if why is None and not bound < limit:
        why = f"bound {_number(bound)} >= {label} ({str(a.dtype).removeprefix('torch.')})"
    if why is not None:
        return Verdict(False, bound, f"float GEMM on integer data not exact: {why}")
    return Verdict(True, bound)


def _magnitude(t: torch.Tensor, check_integers: bool = False) -> float | None:
    """``max |t|`` (an int, or inf for a non-finite value); with ``check_integers``, None unless
    every value of ``t`` is an integer. Read with the dispatch mode off (the audit's own reads,
    not the model's ops)."""
    with torch._C._DisableTorchDispatch(), torch.no_grad():  # noqa: SLF001
        if check_integers and not torch.equal(torch.trunc(t), t):  # NaN too: never equal
            return None
        if not t.numel():
            return 0
        low, high = torch.aminmax(t)
        magnitude = max(-float(low), float(high))
    return math.ceil(magnitude) if math.isfinite(magnitude) else math.inf


def _unproven(func, args, kwargs, a: torch.Tensor, conv: bool) -> str | None:
    """Why this call's kernel is not proven to add exactly, besides the bound (None: it is)."""
    from qswap.quant.integer import _ieee_float32, winograd_may_run
    if a.dtype not in _LIMITS:
        return f"{str(a.dtype).removeprefix('torch.')} (only float32 and float64 are covered)"
    for scale in ("alpha", "beta"):
        if O.argument(func, args, kwargs, scale, 1) != 1:
            return f"{scale} is not 1"
    if conv and O.argument(func, args, kwargs, "transposed", False):
        return "a transposed convolution"
    if conv and (a.device.type != "cpu" or (a.dtype == torch.float32 and winograd_may_run(a))):
        return "the convolution may run a Winograd or FFT algorithm (which rounds)"
    if a.dtype == torch.float32 and not _ieee_float32(a.device):
        return "float32 matmuls do not run in IEEE float32 (TF32 or bf16 reduced precision)"
    return None


def _number(bound: float) -> str:
    return str(int(bound)) if math.isfinite(bound) else "inf"
