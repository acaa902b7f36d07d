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
  preprocessing; its result is honest only once it passes a quantizer;
* compute whose operands all come from integer data (lengths cast to float) is index math.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qswap.honesty.ops import ACCUMULATING, GRID, OpRule
from qswap.honesty.tags import ACC, CONST, FLOAT, INDEX, KERNEL, PARAM, QUANT, Tag

QUANTIZED, KERNEL_INTERNAL, FLOAT_BUCKET, CONSTANT_FOLD, IGNORED = (
    "quantized", "kernel_internal", "float", "constant_fold", "ignored")

FLOAT_OPERAND, RAW_PARAMETER, FLOAT_CONSTANT, OFF_GRID = (
    "float_operand", "raw_parameter", "float_constant", "off_grid")


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
                   scalar_rescale: bool) -> Decision:
    """``tags``: one per float tensor operand; ``call``: the innermost counterpart call (-1:
    none); ``where``: "aten.op at module" for output provenance; ``scalar_rescale``: the op is
    a mul/div of its one tensor operand by a Python number."""
    if scalar_rescale and len(tags) == 1 and _rescalable(tags[0]):
        t = tags[0]
        return Decision(QUANTIZED if t.kind == QUANT else KERNEL_INTERNAL, t,
                        bits=[t.grid.bits] if t.kind == QUANT else [])
    if all(t.kind == INDEX for t in tags):
        binary = all(t.binary for t in tags) and name in ("mul", "rsub", "minimum", "maximum")
        return Decision(IGNORED, Tag(INDEX, where, binary=binary))
    if all(_is_const(t) or t.kind == INDEX for t in tags):
        first = next(t for t in tags if t.kind != INDEX)
        return Decision(CONSTANT_FOLD, Tag(first.kind, _derived(first.where)))
    return _decide_data(name, rule, tags, call, where)


def _rescalable(t: Tag) -> bool:
    return (t.kind == QUANT and t.grid.on_grid) or t.kind in (ACC, KERNEL)


def _derived(name: str) -> str:
    return name if name.endswith("(derived)") else f"{name} (derived)"


def _decide_data(name: str, rule: OpRule, tags: list[Tag], call: int, where: str) -> Decision:
    d = Decision(QUANTIZED, Tag(FLOAT, f"output of {where}"))
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
        d.bucket = FLOAT_BUCKET
        return d
    if internal:
        d.bucket = KERNEL_INTERNAL
    d.out = _output_tag(name, rule, tags, call, where, internal)
    return d


def _is_bias_add(tags: list[Tag], call: int) -> bool:
    kinds = sorted(t.kind for t in tags)
    return (call >= 0 and kinds == [ACC, QUANT]
            and all(t.grid.bits == 32 for t in tags if t.kind == QUANT))


def finding_kind(t: Tag) -> str:
    if t.kind == PARAM:
        return RAW_PARAMETER
    if t.kind == CONST:
        return FLOAT_CONSTANT
    return FLOAT_OPERAND


def _output_tag(name: str, rule: OpRule, tags: list[Tag], call: int, where: str,
                internal: bool) -> Tag:
    quant = [t for t in tags if t.kind == QUANT]
    if not internal and quant and (rule.cls == GRID or name == "mul" and len(quant) == 1):
        return quant[0]  # relu / max / max-pool, or a 0/1 mask multiply: same grid
    if call < 0:
        return Tag(FLOAT, f"output of {where} (compute on quantized operands, not requantized)")
    if rule.family in ACCUMULATING or any(t.kind == ACC for t in tags):
        return Tag(ACC, where, call=call)
    return Tag(KERNEL, where, call=call)


def combine_movement(tags: list[Tag], has_index_arg: bool, where: str) -> Tag:
    """The tag of a movement op's output from its float data inputs' tags: float beats
    parameter beats constant beats quantized; zero constants join any grid. A parameter or
    constant moved by an integer index tensor (an embedding lookup) is data-dependent."""
    if not tags:
        return Tag(INDEX, where)
    for t in tags:
        if t.kind in (FLOAT, ACC, KERNEL):
            return t
    for t in tags:
        if t.kind == PARAM or (t.kind == CONST and not t.zero):
            return Tag(t.kind, t.where, lookup=True) if has_index_arg and not t.lookup else t
    quant = [t for t in tags if t.kind == QUANT]
    off = [t for t in quant if not t.grid.on_grid]
    if off or quant:
        return (off or quant)[0]
    index = [t for t in tags if t.kind == INDEX]
    if index:
        return index[0] if all(t.binary for t in index) else Tag(INDEX, index[0].where)
    return tags[0]  # zero constants
