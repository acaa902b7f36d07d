"""Argument-aware op rules (qswap.honesty.ops ARGUMENT_RULES, value_arguments) and the grid-tag
rules (GRID_RULES): one test per row. Each probe feeds the result of one op straight into a
matmul with a quantized weight, so the matmul is honest exactly when the op kept a grid."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import qswap
from qswap import QuantSpec
from qswap.honesty import ops, tracker
from qswap.quant.fake_quantize import FakeQuantize

torch.manual_seed(0)
A8, W8 = QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8)
MASK = torch.tensor([[True, False] * 4] * 4)


class _Probe(nn.Module):
    """``f(a, b, x)`` of two quantized tensors on different grids, consumed by a matmul."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.qa, self.qb = FakeQuantize(A8), FakeQuantize(A8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.wq = FakeQuantize(W8, kind="weight")

    def forward(self, x):
        return self.f(self.qa(x), self.qb(3 * x + 1), x) @ self.wq(self.w)


def _mm_findings(f):
    x = torch.randn(4, 8)
    model = _Probe(f)
    qswap.calibrate(model, [(x,)])
    report = qswap.audit(model, (x,))
    return [v for v in report.violations if v.op == "aten.mm"]


def _step(a):
    """The grid step of ``a`` (its per-tensor scale), read from its values."""
    levels = torch.unique(a)
    return float((levels[1:] - levels[:-1]).min())


@pytest.mark.parametrize("name, f, kept", [
    # common: one grid kept, two grids joined keep none
    ("relu", lambda a, b, x: torch.relu(a), True),
    ("maximum of one grid", lambda a, b, x: torch.maximum(a, a.flip(0)), True),
    ("maximum of two grids", lambda a, b, x: torch.maximum(a, b), False),
    ("minimum of two grids", lambda a, b, x: torch.minimum(a, b), False),
    ("where of two grids", lambda a, b, x: torch.where(MASK, a, b), False),
    ("cat of one grid", lambda a, b, x: torch.cat([a[:2], a[2:]]), True),
    ("cat of two grids", lambda a, b, x: torch.cat([a[:2], b[2:]]), False),
    ("copy_ of a grid", lambda a, b, x: torch.empty_like(a).copy_(a), True),
    ("index_put of another grid", lambda a, b, x: a.index_put((torch.tensor([0]),), b[0]), False),
    ("amax of one grid", lambda a, b, x: a.amax(0, keepdim=True).expand(4, 8), True),
    ("a grid joined with integer data", lambda a, b, x: torch.cat([a[:2], MASK[2:].float()]), False),
    # integer tensors promoted into the result as values are integer data (a bool one a 0/1 mask)
    ("a grid joined with an integer tensor", lambda a, b, x: torch.cat([a[:2], torch.arange(16).view(2, 8)]),
     False),
    ("mul by a bool tensor", lambda a, b, x: a * MASK, True),
    ("mul by an integer tensor", lambda a, b, x: a * torch.arange(8), False),
    ("where with a 0-d integer zero", lambda a, b, x: torch.where(MASK, a, torch.tensor(0)), True),
    ("where with a 0-d integer off the grid", lambda a, b, x: torch.where(MASK, a, torch.tensor(7)), False),
    # as_strided addresses the storage: its input's grid only where it reads its input's elements
    ("as_strided within its input", lambda a, b, x: a.as_strided((4, 8), (1, 4)), True),
    ("as_strided of a row, within it", lambda a, b, x: a[1].as_strided((4, 8), (0, 1)), True),
    ("as_strided of a transposed view, within it", lambda a, b, x: a.t().as_strided((8, 4), (1, 8), 0).t(), True),
    ("as_strided of a row, beyond it", lambda a, b, x: a[0].as_strided((4, 8), (8, 1)), False),
    ("as_strided_copy of a row, beyond it",
     lambda a, b, x: torch.ops.aten.as_strided_copy(a[0], (4, 8), (8, 1)), False),
    # fill: the written value must be a point of the grid
    ("masked_fill 0", lambda a, b, x: a.masked_fill(MASK, 0.0), True),
    ("masked_fill -inf then back to 0", lambda a, b, x: torch.nan_to_num(a.masked_fill(MASK, -math.inf)), False),
    ("masked_fill a code", lambda a, b, x: a.masked_fill(MASK, 3 * _step(a)), True),
    ("masked_fill off the grid", lambda a, b, x: a.masked_fill(MASK, 0.37 * _step(a)), False),
    ("where with a 0-d constant off the grid", lambda a, b, x: torch.where(MASK, a, 0.37 * _step(a)), False),
    ("where with zero", lambda a, b, x: torch.where(MASK, a, 0.0), True),
    ("pad with zero", lambda a, b, x: nn.functional.pad(a, (0, 0, 1, 0))[:4], True),
    ("pad off the grid", lambda a, b, x: nn.functional.pad(a, (0, 0, 1, 0), value=0.37 * _step(a))[:4], False),
    # bounds: a clamp to grid points keeps the grid
    ("clamp to grid points", lambda a, b, x: a.clamp(-2 * _step(a), 5 * _step(a)), True),
    ("clamp off the grid", lambda a, b, x: a.clamp(max=0.37 * _step(a)), False),
    # mask: a multiply by a proven 0/1 mask keeps the grid; a Python factor rescales it
    ("mul by a bool mask", lambda a, b, x: a * MASK.float(), True),
    ("mul by 1 - mask", lambda a, b, x: a * (1 - MASK.float()), True),
    ("mul by 2 - mask (not 0/1)", lambda a, b, x: a * (2 - MASK.float()), False),
    ("mul by a Python number", lambda a, b, x: a * 0.5, True),
    ("maximum of a grid and its rescaled self", lambda a, b, x: torch.maximum(a, a * 0.5), False),
])
def test_grid_rule(name, f, kept):
    found = _mm_findings(f)
    assert (found == []) is kept, [(v.operand, v.kind) for v in found]


_LARGE = (4, 8, 500, 625)  # 10^7 elements, each an element of a 4 x 8 tensor


@pytest.mark.parametrize("name, f, kept", [
    ("within its input", lambda a, b, x: a.as_strided(_LARGE, (8, 1, 0, 0))[:, :, 0, 0], True),
    ("within a strided input", lambda a, b, x: torch.cat(
        [a[:, ::2].as_strided(_LARGE[:1] + (4,) + _LARGE[2:], (8, 2, 0, 0))[:, :, 0, 0]] * 2, 1), True),
    ("beyond its input", lambda a, b, x: a[0].as_strided(_LARGE, (8, 1, 0, 0))[:, :, 0, 0], False),
])
def test_a_large_as_strided_view_is_audited_without_listing_its_offsets(monkeypatch, name, f, kept):
    """as_strided's footprint check reads its span from the sizes and strides: the offsets of a
    10^7-element view are never listed (those of a non-dense input are, without repeats)."""
    built = []
    footprint = tracker._footprint

    def counted(size, stride, offset):
        offsets = footprint(size, stride, offset)
        built.append(offsets.numel())
        return offsets

    monkeypatch.setattr(tracker, "_footprint", counted)
    found = _mm_findings(f)
    assert (found == []) is kept, [(v.operand, v.kind) for v in found]
    assert max(built, default=0) <= 32


def test_every_grid_rule_row_is_a_known_rule():
    assert set(ops.GRID_RULES.values()) <= {ops.COMMON, ops.FILL, ops.BOUNDS, ops.MASK}
    assert all(name in ops.OPS for name in ops.GRID_RULES)


@pytest.mark.parametrize("func, args, kwargs, cls, family", [
    (torch.ops.aten.index_put.default, (None, None, None, True), {}, ops.COMPUTE, "add"),
    (torch.ops.aten.index_put.default, (None, None, None, False), {}, ops.MOVEMENT, "scatter"),
    (torch.ops.aten.index_put.default, (None, None, None), {}, ops.MOVEMENT, "scatter"),
    (torch.ops.aten.scatter.reduce, (None, 0, None, None), {"reduce": "add"}, ops.COMPUTE, "add"),
    (torch.ops.aten.scatter.src, (None, 0, None, None), {}, ops.MOVEMENT, "scatter"),
    (torch.ops.aten.scatter_reduce.two, (None, 0, None, None, "sum"), {}, ops.COMPUTE, "add"),
    (torch.ops.aten.scatter_reduce.two, (None, 0, None, None, "amax"), {"include_self": False},
     ops.GRID, "max"),
    (torch.ops.aten.index_reduce.default, (None, 0, None, None, "mean"), {}, ops.COMPUTE, "reduction"),
    (torch.ops.aten.put.default, (None, None, None, True), {}, ops.COMPUTE, "add"),
    (torch.ops.aten.bernoulli.default, (torch.rand(2),), {}, ops.COMPUTE, "random"),
    (torch.ops.aten.bernoulli.p, (torch.rand(2), 0.5), {}, ops.FACTORY, "factory"),
    (torch.ops.aten.bernoulli_.Tensor, (torch.rand(2), torch.rand(2)), {}, ops.COMPUTE, "random"),
    (torch.ops.aten.bernoulli_.float, (torch.rand(2), 0.5), {}, ops.FACTORY, "factory"),
    (torch.ops.aten.normal.Tensor_Tensor, (torch.zeros(2), torch.ones(2)), {}, ops.COMPUTE, "random"),
    (torch.ops.aten.normal.float_float, (0.0, 1.0, [2]), {}, ops.FACTORY, "factory"),
    # schema-read overloads a hand-kept list had missed: an ``out=`` form, tensor endpoints
    (torch.ops.aten.normal.Tensor_float_out, (torch.zeros(2), 0.0), {"out": torch.empty(2)}, ops.COMPUTE, "random"),
    (torch.ops.aten.linspace.Tensor_Tensor, (torch.tensor(0.0), torch.tensor(1.0), 3), {}, ops.COMPUTE, "factory"),
    (torch.ops.aten.logspace.Tensor_Scalar, (torch.tensor(0.0), 1.0, 3), {}, ops.COMPUTE, "factory"),
    (torch.ops.aten.rand_like.default, (torch.zeros(2),), {}, ops.FACTORY, "factory"),
    (torch.ops.aten.full_like.default, (torch.zeros(2), 1.0), {}, ops.FACTORY, "factory"),
])
def test_an_ops_rule_is_read_from_its_arguments(func, args, kwargs, cls, family):
    name = ops.op_name(func)
    assert ops.refine(func, name, ops.OPS[name], args, kwargs) == ops.OpRule(cls, family)


@pytest.mark.parametrize("func", [torch.ops.aten.resize_.default, torch.ops.aten._resize_output_.default,
                                  torch.ops.aten.set_.source_Tensor])
def test_inplace_metadata_ops_match_their_rows(func):
    assert ops.lookup(func) == ops.OpRule(ops.META, "meta")


class _Accumulate(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.out(self.op(a, b))


ROWS = torch.arange(4)


@pytest.mark.parametrize("op, name", [
    (lambda a, b: a.index_add(0, ROWS, b), "aten.index_add"),
    (lambda a, b: a.scatter_add(0, ROWS[:, None].expand(4, 8), b), "aten.scatter_add"),
    (lambda a, b: a.scatter_reduce(0, ROWS[:, None].expand(4, 8), b, "sum"), "aten.scatter_reduce"),
    (lambda a, b: a.scatter(0, ROWS[:, None].expand(4, 8), b, reduce="add"), "aten.scatter"),
    (lambda a, b: a.index_put((ROWS,), b, accumulate=True), "aten.index_put"),
])
def test_accumulating_movement_ops_are_adds(op, name):
    x = torch.randn(4, 8)
    qmodel = qswap.convert(_Accumulate(op), "w8a8")
    qswap.calibrate(qmodel, [(x,)])
    report = qswap.audit(qmodel, (x,))
    assert ("", name, "float_operand") in {(v.module, v.op, v.kind) for v in report.violations}


class _Numpy(nn.Module):
    """exp computed in numpy: no aten op runs, the result enters as a tensor of unseen origin."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.from_numpy(np.exp(self.a(x).numpy())))


def test_a_value_computed_outside_torch_is_an_unseen_origin():
    x = torch.randn(4, 8)
    qmodel = qswap.convert(_Numpy(), "w8a8")
    qswap.calibrate(qmodel, [(x,)])
    report = qswap.audit(qmodel, (x,))
    assert {(v.module, v.op, v.kind) for v in report.violations} == {
        ("b.input_quant", "<quantizer input>", "unseen_origin")}


COL, ROW = torch.tensor([1, 5]), torch.tensor([1, 3])


def _s(a):
    return 0.37 * _step(a)  # a number off the grid of ``a``


ROW_CASES = {  # every row of GRID_RULES: (the op keeping the grid, the op losing it)
    "masked_fill": (lambda a, b, x: a.masked_fill(MASK, 0.0), lambda a, b, x: a.masked_fill(MASK, _s(a))),
    "index_fill": (lambda a, b, x: a.index_fill(1, COL, 2 * _step(a)), lambda a, b, x: a.index_fill(1, COL, _s(a))),
    # fill_diagonal_ reaches the audit as as_strided + fill_ (torch decomposes it first): an
    # in-place fill_ of a view changes its base, whose tag is then void: conservative both ways
    "fill_diagonal": (None, lambda a, b, x: a.clone().fill_diagonal_(0.0)),
    "where": (lambda a, b, x: torch.where(MASK, a, -math.inf).clamp_min(0), lambda a, b, x: torch.where(MASK, a, b)),
    "constant_pad_nd": (lambda a, b, x: nn.functional.pad(a, (1, 0))[:, :8],
                        lambda a, b, x: nn.functional.pad(a, (1, 0), value=_s(a))[:, :8]),
    "index_put": (lambda a, b, x: a.index_put((ROW,), torch.tensor(0.0)), lambda a, b, x: a.index_put((ROW,), b[0])),
    "_index_put_impl": (lambda a, b, x: torch.ops.aten._index_put_impl_(a.clone(), (ROW,), torch.tensor(0.0)),
                        lambda a, b, x: torch.ops.aten._index_put_impl_(a.clone(), (ROW,), b[0])),
    "put": (lambda a, b, x: a.put(COL, a.flatten()[:2]), lambda a, b, x: a.put(COL, b.flatten()[:2])),
    "scatter": (lambda a, b, x: a.scatter(1, COL.expand(4, 2), 0.0),
                lambda a, b, x: a.scatter(1, COL.expand(4, 2), _s(a))),
    "clamp": (lambda a, b, x: a.clamp(-_step(a), 3 * _step(a)), lambda a, b, x: a.clamp(-_s(a), None)),
    "clip": (lambda a, b, x: a.clip(None, 3 * _step(a)), lambda a, b, x: a.clip(None, _s(a))),
    "clamp_min": (lambda a, b, x: a.clamp_min(0.0), lambda a, b, x: a.clamp_min(_s(a))),
    "clamp_max": (lambda a, b, x: a.clamp_max(_step(a)), lambda a, b, x: a.clamp_max(_s(a))),
    "hardtanh": (lambda a, b, x: nn.functional.hardtanh(a, -_step(a), _step(a)),
                 lambda a, b, x: nn.functional.hardtanh(a, -_s(a), _s(a))),
    "mul": (lambda a, b, x: a * (MASK.float() * MASK.float()), lambda a, b, x: a * (MASK.float() + MASK.float())),
}


def test_every_grid_rule_row_has_a_case():
    assert set(ROW_CASES) == set(ops.GRID_RULES)


@pytest.mark.parametrize("name", sorted(ROW_CASES))
def test_each_grid_rule_row_keeps_and_loses_the_grid(name):
    keep, lose = ROW_CASES[name]
    assert keep is None or _mm_findings(keep) == []
    assert _mm_findings(lose) != []



class _CodesBack(nn.Module):
    """An integer kernel on the codes of a quantized tensor (qswap.nn.simulate's pattern): round
    to codes, integer arithmetic, cast back to float and rescale; requantized (``qv``) or not
    before a matmul with a quantized weight. ``raw``: the same on the float input's values."""

    def __init__(self, requantize: bool, raw: bool = False, inplace: bool = False):
        super().__init__()
        self.requantize, self.raw, self.inplace = requantize, raw, inplace
        self.qa, self.qv = FakeQuantize(A8), FakeQuantize(A8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.wq = FakeQuantize(W8, kind="weight")

    def forward(self, x):
        codes = torch.round((x if self.raw else self.qa(x)) * 7.0).to(torch.int32)
        ints = codes.to(torch.int64, copy=True).mul_(3).add_(1) if self.inplace else codes * 3 + 1
        value = (ints.to(torch.float64) * 0.01).to(torch.float32)
        return (self.qv(value) if self.requantize else value) @ self.wq(self.w)


def test_integer_codes_cast_back_are_an_accumulator_a_quantizer_must_take():
    """Kept: the float result of integer ops on a quantized tensor's codes, requantized, feeds
    the matmul honestly. Lost: fed to the matmul directly it is an unquantized accumulator; made
    from float data's values, it stays float."""
    x = torch.randn(4, 8)
    found = {}
    for name, model in (("kept", _CodesBack(True)), ("lost", _CodesBack(False)), ("raw", _CodesBack(False, True))):
        if name != "raw":  # raw runs no activation quantizer
            qswap.calibrate(model, [(x,)])
        found[name] = [v for v in qswap.audit(model, (x,)).violations if v.op == "aten.mm"]
    assert found["kept"] == []
    assert found["lost"] and "accumulator" in found["lost"][0].operand
    assert found["raw"] and "accumulator" not in found["raw"][0].operand


def test_integer_ops_in_place_keep_the_origin_of_their_integers():
    """In-place integer ops on codes (the simulation's requantization writes a fresh int64 tensor
    in place) keep the integers' origin: cast back, rescaled and requantized, they feed the
    matmul honestly (the tag is kept for the version the op leaves)."""
    x = torch.randn(4, 8)
    model = _CodesBack(True, inplace=True)
    qswap.calibrate(model, [(x,)])
    report = qswap.audit(model, (x,))
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def test_one_moved_tensor_keeps_its_tag_as_combine_movement_says():
    """The tracker's shortcut for a movement op of one float operand, no index argument and no
    fill value (its tag, unchanged) is ``combine_movement``'s answer for every kind of tag."""
    from qswap.honesty.classify import combine_movement
    from qswap.honesty.tags import ACC, CONST, FLOAT, INDEX, KERNEL, PARAM, QUANT, UNSEEN, GridInfo, Tag

    grid = GridInfo("q", 8, "int8", step=0.5, qmin=-128, qmax=127)
    tags = [Tag(QUANT, "q", grid), Tag(QUANT, "q", GridInfo("q", 8, "int8", False, 3, 10)),
            Tag(ACC, "mm", call=1), Tag(KERNEL, "add", call=2), Tag(FLOAT, "x"), UNSEEN,
            Tag(PARAM, "w"), Tag(PARAM, "w", lookup=True), Tag(CONST, "c"), Tag(CONST, "c", zero=True),
            Tag(INDEX, "lengths"), Tag(INDEX, "mask", binary=True)]
    for tag in tags:
        assert combine_movement([tag], False, "aten.view at m") == tag, tag
