"""The integer-GEMM rule (qswap.honesty.gemm): a float GEMM on the codes of quantized data and
integer weights is integer arithmetic when the audit proves it exact from the operands' values;
beyond the float type's exact integers, on a kernel that may round, or with an operand that is
not integer data it can vouch for, it is a finding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
from qswap import QuantSpec
from qswap.quant.fake_quantize import FakeQuantize

A8 = QuantSpec(bits=8, symmetric=False)


class _Codes(nn.Module):
    """The simulation's pattern: the codes of a quantized input (rounded, cast to int32 and back
    to float), an integer weight kept as a float buffer (non-persistent), ``gemm(codes, w)`` on
    the float kernel, the accumulator cast to int32 and requantized by ``out``."""

    def __init__(self, gemm, weight: torch.Tensor, dtype=torch.float32, codes=None):
        super().__init__()
        self.gemm, self.dtype, self.codes = gemm, dtype, codes
        self.q, self.out = FakeQuantize(A8), FakeQuantize(A8)
        self.register_buffer("w", weight.to(dtype), persistent=False)

    def forward(self, x):
        xq = self.q(x)
        c = torch.round(xq * (1 / float(self.q.scale))).to(torch.int32).to(self.dtype)  # code - zp
        c = c if self.codes is None else self.codes(self, c, x)
        acc = self.gemm(c, self.w)
        return self.out(acc.to(torch.int32).to(torch.float32) * 0.01)


def _int(*shape, high=127):
    return torch.randint(-high, high + 1, shape, generator=torch.Generator().manual_seed(0))


def _audit(model, x):
    qswap.calibrate(model, [(x,)])
    return qswap.audit(model, (x,))


def _rows(report):
    return [(v.module, v.op, v.kind, v.operand) for v in report.violations]


EXACT = {  # name: (gemm, weight, input)
    "mm": (lambda c, w: c @ w.T, _int(8, 16), torch.randn(4, 16)),
    "linear with an integer bias": (lambda c, w: F.linear(c, w[:, :-1], w[:, -1]), _int(8, 17), torch.randn(4, 16)),
    "bmm": (lambda c, w: torch.bmm(c, w.expand(3, 8, 16).transpose(1, 2)), _int(8, 16), torch.randn(3, 5, 16)),
    "conv1d": (lambda c, w: F.conv1d(c, w.view(6, 4, 3), padding=1), _int(6, 12), torch.randn(2, 4, 10)),
}


@pytest.mark.parametrize("name", sorted(EXACT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_exact_gemm_on_codes_is_integer_arithmetic(name, dtype):
    gemm, weight, x = EXACT[name]
    report = _audit(_Codes(gemm, weight, dtype), x)
    assert report.honest, _rows(report)
    assert report.totals["integer_gemm"] == 1 and report.totals["float"] == 0
    assert [(r.module, r.count) for r in report.integer_gemm] == [("", 1)]


def test_a_float32_gemm_whose_bound_reaches_2_24_is_flagged_and_float64_is_exact():
    """4096 products of |code| >= 128 (a min-max grid of 8 bits reaches 128 on one side) and
    |w| = 127: at least 66M, beyond float32's 2^24."""
    x, w = torch.randn(4, 4096, generator=torch.Generator().manual_seed(1)), _int(8, 4096)
    report = _audit(_Codes(lambda c, w: c @ w.T, w), x)
    hit = [v for v in report.violations if v.kind == "inexact_gemm"]
    assert len(hit) == 1 and (hit[0].module, hit[0].op) == ("", "aten.mm"), _rows(report)
    assert hit[0].operand.startswith("float GEMM on integer data not exact: bound ")
    assert hit[0].operand.endswith(">= 2^24 (float32)")
    bound = int(hit[0].operand.split("bound ")[1].split(" ")[0])
    assert bound >= 2 ** 24 and not report.honest
    assert _audit(_Codes(lambda c, w: c @ w.T, w, torch.float64), x).honest


def test_the_bound_is_read_from_the_values_not_the_shapes():
    """The same 1024-long GEMM on small codes (|w| <= 2) stays below 2^24: exact in float32."""
    report = _audit(_Codes(lambda c, w: c @ w.T, _int(8, 1024, high=2)), torch.randn(4, 1024))
    assert report.honest and report.totals["integer_gemm"] == 1, _rows(report)


@pytest.mark.parametrize("name, codes, kind", [
    # real float data: the quantized values themselves (not codes) with the integer weight
    ("quantized values, not codes", lambda s, c, x: s.q(x), "raw_parameter"),
    # compute on codes makes no integers the rule vouches for (a rescale keeps the accumulator tag)
    ("codes rescaled", lambda s, c, x: c * 0.5, "float_operand"),
    # float data rounded by a cast (not a qswap quantizer) and cast back
    ("rounded float data", lambda s, c, x: (x * 20).long().to(c.dtype), "float_operand"),
])
def test_a_gemm_with_an_operand_that_is_not_vouched_integer_data_is_decided_as_before(name, codes, kind):
    report = _audit(_Codes(lambda c, w: c @ w.T, _int(8, 16), codes=codes), torch.randn(4, 16))
    assert report.totals["integer_gemm"] == 0 and not report.honest
    assert any(v.op == "aten.mm" and v.kind == kind for v in report.violations), _rows(report)


def test_a_raw_float_weight_is_flagged():
    w = nn.Parameter(torch.randn(8, 16))
    model = _Codes(lambda c, _: c @ w.T, _int(8, 16))
    model.w2 = w  # a parameter of the model: seen, and not integers
    report = _audit(model, torch.randn(4, 16))
    assert any(v.op == "aten.mm" and v.kind == "raw_parameter" for v in report.violations), _rows(report)


def test_a_weight_copy_is_checked_by_its_values():
    """A kept float copy of integer weight codes passes because its values are integers, and
    only then: one value nudged off an integer (through ``.data``, no version bump) is a raw
    float weight again."""
    model = _Codes(lambda c, w: c @ w.T, _int(8, 16))
    x = torch.randn(4, 16)
    assert _audit(model, x).honest
    model.w.data[0, 0] += 0.5
    report = qswap.audit(model, (x,))
    assert any(v.op == "aten.mm" and v.kind == "raw_parameter" for v in report.violations), _rows(report)


def test_a_weight_copy_kept_in_a_cached_form_is_seen_and_checked():
    """A module held as a plain attribute (as the simulation caches its integer forms, not a
    registered child) is walked: its float tensors are constants whose values the rule reads."""
    class _Form(nn.Module):
        def __init__(self):
            super().__init__()
            self.float_weights = {torch.float32: _int(8, 16).float()}

    form = _Form()
    model = _Codes(lambda c, _: c @ form.float_weights[torch.float32].T, _int(8, 16))
    model.__dict__["_kept"] = (form, None)
    report = _audit(model, torch.randn(4, 16))
    assert report.honest and report.totals["integer_gemm"] == 1, _rows(report)


def test_a_weight_copy_made_outside_the_audits_view_is_an_unseen_origin():
    model = _Codes(lambda c, w: c @ _undispatched_copy(w).T, _int(8, 16))
    report = _audit(model, torch.randn(4, 16))
    assert any(v.op == "aten.mm" and v.kind == "unseen_origin" for v in report.violations), _rows(report)


def _undispatched_copy(t):
    """What an extension or a hook outside the dispatcher makes."""
    with torch._C._DisableTorchDispatch():  # noqa: SLF001
        return t.clone()


def test_reduced_precision_float32_matmuls_are_not_proven_exact():
    model = _Codes(lambda c, w: c @ w.T, _int(8, 16))
    x = torch.randn(4, 16)
    qswap.calibrate(model, [(x,)])
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        report = qswap.audit(model, (x,))
    finally:
        torch.set_float32_matmul_precision(saved)
    hit = [v for v in report.violations if v.kind == "inexact_gemm"]
    assert hit and "IEEE" in hit[0].operand, _rows(report)


@pytest.mark.skipif(not torch._nnpack_available(), reason="NNPACK not built")  # noqa: SLF001
def test_a_float32_conv_that_may_run_winograd_is_not_proven_and_float64_is():
    """A 4-D float32 batch of 16 may go to NNPACK (Winograd, FFT: they round)."""
    def conv(c, w):
        return F.conv2d(c, w.view(4, 2, 3, 3), padding=1)
    x = torch.randn(16, 2, 6, 6)
    report = _audit(_Codes(conv, _int(4, 18)), x)
    hit = [v for v in report.violations if v.kind == "inexact_gemm"]
    assert hit and "Winograd" in hit[0].operand, _rows(report)
    assert _audit(_Codes(conv, _int(4, 18), torch.float64), x).honest


def test_a_scaled_addmm_is_not_covered():
    report = _audit(_Codes(lambda c, w: torch.addmm(w[:, 0], c, w.T, alpha=2), _int(16, 16)), torch.randn(4, 16))
    hit = [v for v in report.violations if v.kind == "inexact_gemm"]
    assert hit and "alpha is not 1" in hit[0].operand, _rows(report)


@pytest.mark.parametrize("name, codes, exact", [
    ("round of codes", lambda s, c, x: torch.round(s.q(x) * (1 / float(s.q.scale))), True),
    # only round is a quantized tensor's codes (floor of its values over the step may fall a code low)
    ("floor of quantized data", lambda s, c, x: torch.floor(s.q(x) * (1 / float(s.q.scale))), False),
    ("round to decimals", lambda s, c, x: torch.round(s.q(x) * (1 / float(s.q.scale)), decimals=1), False),
    ("round of float data", lambda s, c, x: torch.round(x * 20), False),
])
def test_a_rounding_of_quantized_data_gives_codes_and_nothing_else_does(name, codes, exact):
    """``round`` of a quantized tensor (rescaled) is its codes without a cast through an integer
    dtype; a rounding to decimals, a floor, or a rounding of float data is not."""
    report = _audit(_Codes(lambda c, w: c @ w.T, _int(8, 16), codes=codes), torch.randn(4, 16))
    assert (report.totals["integer_gemm"] == 1) == exact and report.honest == exact, _rows(report)
