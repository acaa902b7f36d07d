"""The per-op decision: given an op's rule and the tags of its float operands, which bucket the
op falls in, which operands are findings, and what tag its outputs get. Pure functions; the
tracker feeds them.

Rules beyond "every float operand of compute is quantized" (docs/honesty.md explains each):

* a quantized tensor (or an accumulator) multiplied or divided by a Python constant stays on a
  rescaled grid: hardware folds the constant into requantization;
* a quantized tensor times a 0/1 mask made from bool data stays quantized (masking);
* inside one counterpart call, non-matmul compute on quantized operands and on that call's own
  intermediates is one simulated integer kernel ("kernel-internal", counted apart), and an int32
  bias added to that call's accumulator is the accumulator's own bias add;
* compute whose operands are all parameters/buffers/constants is constant-foldable weight
  preprocessing; its result is honest only once it passes a quantizer; integer data of the
  model's inputs (``Tag.input``: an int16 waveform) is data, not a constant: with a parameter
  (a convolution of the waveform with a raw weight) it is data compute, whose float operands
  are findings;
* compute whose operands all come from integer data (lengths cast to float) is index math; not
  integers computed from activations (a comparison of quantized values: ``Tag.activation``),
  which may only mask;
* a float GEMM on integer data (codes), proven exact from its operands' values, is integer
  arithmetic (``qswap.honesty.gemm``; the tracker applies it before these decisions).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qswap.honesty.kinds import FLOAT_CONSTANT, FLOAT_OPERAND, OFF_GRID, RAW_PARAMETER, UNSEEN_ORIGIN
from qswap.honesty.ops import ACCUMULATING, BOUNDS, MASK, ROUNDINGS, OpRule, grid_rule
from qswap.honesty.tags import ACC, CONST, FLOAT, INDEX, KERNEL, PARAM, QUANT, Tag

QUANTIZED, KERNEL_INTERNAL, FLOAT_BUCKET, CONSTANT_FOLD, IGNORED = (
    "quantized", "kernel_internal", "float", "constant_fold", "ignored")
INTEGER_GEMM = "integer_gemm"  # a float GEMM on integer data, proven exact (qswap.honesty.gemm)



@dataclass
class Decision:
    bucket: str
    out: Tag
    findings: list[tuple[int, str]] = field(default_factory=list)  # (operand index, kind)
    bits: list[int] = field(default_factory=list)  # bit widths of the quantized operands


def _is_const(tag: Tag) -> bool:
    """A parameter/buffer/constant with no data dependence (not looked up by data indices)."""
    return tag.kind in (PARAM, CONST) and not tag.lookup


def decide_compute(name: str, rule: OpRule, tags: list[Tag], call: int, where: str,
                   rescale: float | None, scalars: tuple = (), options: dict | None = None) -> Decision:
    """``tags``: one per float tensor operand; ``call``: the innermost counterpart call (-1:
    none); ``where``: "aten.op at module" for output provenance; ``rescale``: the Python number
    a mul/div multiplies its one tensor operand by (None: not such an op); ``scalars``: the
    op's Python-number arguments (clamp bounds, the constant of an ``rsub``); ``options``: its
    keyword arguments (an add's ``alpha``, a division's ``rounding_mode``)."""
    if rescale is not None and len(tags) == 1 and _rescalable(tags[0]):
        t = tags[0]
        if t.kind != QUANT:
            return Decision(KERNEL_INTERNAL, t)
        return Decision(QUANTIZED, dataclasses.replace(t, grid=t.grid.rescaled(rescale)), bits=[t.grid.bits])
    if all(_index_math(t) for t in tags):
        return Decision(IGNORED, Tag(INDEX, where, binary=_binary(name, tags, scalars),
                                     input=any(t.input for t in tags),
                                     integral=_integral_math(name, tags, scalars, options or {})))
    if all(_is_const(t) or _index_math(t) for t in tags) and not any(t.input for t in tags):
        first = next(t for t in tags if t.kind != INDEX)
        return Decision(CONSTANT_FOLD, Tag(first.kind, _derived(first.where)))
    return _decide_data(name, rule, tags, call, where, scalars)


def _index_math(tag: Tag) -> bool:
    """Integer data from model inputs, integer buffers or factories (lengths, token ids, masks of
    them): not integers computed from activations, whose float math is math on activations."""
    return tag.kind == INDEX and not tag.activation


# Index math that keeps integers integers (with integer Python numbers): ``(lengths - 1) * 2``
_INTEGER_CLOSED = frozenset({"add", "sub", "rsub", "mul", "neg", "abs", "clone", "maximum", "minimum",
                             "floor_divide", "remainder", "fmod", "sum", "cumsum", "max", "min", "amax", "amin",
                             "relu", "sign", "clamp", "clip", "clamp_min", "clamp_max", "square"})


def _integral_math(name: str, tags: list[Tag], scalars: tuple, options: dict) -> bool:
    """Whether index math's result is proven to hold integers: a rounding (``floor`` of
    ``(lengths - 1) / 2 + 1``, as fairseq's subsampler computes its output lengths; a division with
    ``rounding_mode``), or an op that keeps integers integers on integer operands, with integer
    Python numbers and ``alpha`` (``add(w, w, alpha=0.5)`` does not; ``w * w`` does), and a power
    of integers by a whole exponent of at least 0 (``w ** 2``; the tracker names the exponent: in
    ``2 ** w`` the number is the base, and a negative ``w`` makes fractions). The model's
    integer input data under other float math (a waveform normalized, an ``exp``) is float data
    where a quantizer reads it (``Tracker._check_seen``)."""
    if name in ROUNDINGS or (name == "div" and options.get("rounding_mode") in ("floor", "trunc")):
        return True
    numbers = [*scalars, *(v for k, v in options.items() if k == "alpha")]
    if name == "pow":
        exponent = options.get("exponent")
        return exponent is not None and _whole(exponent) and exponent >= 0 and all(t.integral for t in tags)
    return name in _INTEGER_CLOSED and all(t.integral for t in tags) and all(_whole(v) for v in numbers)


def _whole(v) -> bool:
    """A Python number that is an integer (``2.0`` is; ``0.5``, ``inf`` and ``nan`` are not)."""
    try:
        return float(v).is_integer()
    except (TypeError, ValueError, OverflowError):
        return False


def _binary(name: str, tags: list[Tag], scalars: tuple) -> bool:
    """Integer-data math whose result is proven to be 0/1 when its inputs are: a product (whose
    every Python-number factor is 0 or 1: ``m * 0.37`` is no mask), a min/max, or ``1 - m``
    (``rsub(m, 1)``)."""
    if not all(t.binary for t in tags):
        return False
    if name == "rsub":
        return len(tags) == 1 and tuple(scalars) in ((1,), (1, 1), (1.0,), (1.0, 1))
    if name == "mul":
        return all(v in (0, 1) for v in scalars)
    return name in ("minimum", "maximum", "clone")


def _rescalable(t: Tag) -> bool:
    return (t.kind == QUANT and t.grid.on_grid) or t.kind in (ACC, KERNEL)


def _derived(name: str) -> str:
    return name if name.endswith("(derived)") else f"{name} (derived)"


def _decide_data(name: str, rule: OpRule, tags: list[Tag], call: int, where: str,
                 scalars: tuple) -> Decision:
    d = Decision(QUANTIZED, None)  # its out tag: below, once the bucket is known
    internal = False
    bias_add = name == "add" and _is_bias_add(tags, call)
    mask_mul = name == "mul" and any(t.kind == QUANT for t in tags)
    for i, t in enumerate(tags):
        if t.kind == QUANT:
            if t.grid.on_grid:
                d.bits.append(t.grid.bits)
            else:
                d.findings.append((i, OFF_GRID))
        elif t.kind == KERNEL and t.call == call and call >= 0 and rule.family not in ACCUMULATING:
            internal = True
        elif t.kind == ACC and bias_add and t.call == call:
            internal = True
        elif t.kind == INDEX and t.binary and mask_mul:
            continue
        elif t.kind == CONST and t.zero:
            continue
        else:
            d.findings.append((i, finding_kind(t)))
    if d.findings:
        d.bucket, d.out = FLOAT_BUCKET, Tag(FLOAT, f"output of {where}")
        return d
    if internal:
        d.bucket = KERNEL_INTERNAL
    d.out = _output_tag(name, rule, tags, call, where, internal, scalars)
    return d


def _is_bias_add(tags: list[Tag], call: int) -> bool:
    kinds = sorted(t.kind for t in tags)
    return (call >= 0 and kinds == [ACC, QUANT]
            and all(t.grid.bits == 32 for t in tags if t.kind == QUANT))


def finding_kind(t: Tag) -> str:
    if t.unseen:
        return UNSEEN_ORIGIN
    if t.kind == PARAM:
        return RAW_PARAMETER
    if t.kind == CONST:
        return FLOAT_CONSTANT
    return FLOAT_OPERAND


def _output_tag(name: str, rule: OpRule, tags: list[Tag], call: int, where: str,
                internal: bool, scalars: tuple) -> Tag:
    quant = [t for t in tags if t.kind == QUANT]
    if not internal and quant:
        kept = _kept_grid(name, rule, tags, quant, scalars, where)
        if kept is not None:
            return kept
    if name == "round" and len(tags) == 1 and quant:  # a quantized tensor's codes (rescaled), as floats
        return Tag(KERNEL, where, call=call)
    if call < 0:
        return Tag(FLOAT, f"output of {where} (compute on quantized operands, not requantized)")
    if rule.family in ACCUMULATING or any(t.kind == ACC for t in tags):
        return Tag(ACC, where, call=call)
    return Tag(KERNEL, where, call=call)


def _kept_grid(name: str, rule: OpRule, tags: list[Tag], quant: list[Tag], scalars: tuple,
               where: str) -> Tag | None:
    """The output's tag by the op's row of ``GRID_RULES``; None: the output is on no grid."""
    kind = grid_rule(name, rule)
    if kind == MASK:
        mask = all(t.kind == QUANT or (t.kind == INDEX and t.binary) or (t.kind == CONST and t.zero)
                   for t in tags)
        return quant[0] if len(quant) == 1 and mask else None
    if kind == BOUNDS:
        on = len(tags) == 1 and all(quant[0].grid.holds(float(v)) for v in scalars)
        return quant[0] if on else None
    if kind is None:
        return None
    return join_grids(tags, where)


def join_grids(tags: list[Tag], where: str, fills: tuple = ()) -> Tag:
    """The tag of values gathered from several quantized tensors (and written ``fills``): the
    grid they share, or a float tag saying which grids met (``GRID_RULES`` "common", "fill")."""
    quant = [t for t in tags if t.kind == QUANT]
    off = [t for t in quant if not t.grid.on_grid]
    if off:
        return off[0]
    g = quant[0].grid
    other = next((t.grid for t in quant[1:] if not t.grid.same(g)), None)
    if other is not None:
        return Tag(FLOAT, f"output of {where}: values of two grids ({g.quantizer} {g.label}, "
                          f"{other.quantizer} {other.label}), on neither")
    if any(t.kind not in (QUANT, CONST) for t in tags) or any(t.kind == CONST and not t.zero for t in tags):
        return Tag(FLOAT, f"output of {where}: quantized values joined with other values")
    bad = next((v for v in fills if not g.holds(v)), None)
    if bad is not None:
        return Tag(FLOAT, f"output of {where}: it writes {bad:g}, not a point of the grid of "
                          f"{g.quantizer} ({g.label})")
    return quant[0]


def combine_movement(tags: list[Tag], has_index_arg: bool, where: str, fills: tuple = ()) -> Tag:
    """The tag of a movement op's output from its float data inputs' tags and the numbers it
    writes (``fills``): float beats parameter beats constant beats quantized; quantized
    inputs keep a grid only as ``join_grids`` says. A parameter or constant moved by an
    integer index tensor (an embedding lookup) is data-dependent."""
    if not tags:
        return Tag(INDEX, where)
    for t in tags:
        if t.kind in (FLOAT, ACC, KERNEL):
            return t
    for t in tags:
        if t.kind == PARAM or (t.kind == CONST and not t.zero):
            return Tag(t.kind, t.where, lookup=True) if has_index_arg and not t.lookup else t
    if any(t.kind == QUANT for t in tags):
        return join_grids(tags, where, fills)
    index = [t for t in tags if t.kind == INDEX]
    if index:
        first = next((t for t in index if t.activation), index[0])  # a mask of activations stays one
        binary = all(t.binary for t in index) and all(v in (0, 1) for v in fills)
        data = any(t.input for t in index)  # the model's integer inputs moved with others stay data
        if binary:
            return first if first.input == data else dataclasses.replace(first, input=data)
        return Tag(INDEX, first.where, activation=first.activation, input=data)
    if any(v != 0 for v in fills):
        return Tag(CONST, tags[0].where)
    return tags[0]  # zero constants
