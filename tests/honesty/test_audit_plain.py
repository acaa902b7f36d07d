"""qswap.audit on plain torch models: honest conversions, and each adversarial case caught with
the right module and op."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
from helpers import Residual, recipe_with
from qswap import AuditError, QuantSpec
from qswap.nn.base import QuantModule
from qswap.quant.fake_quantize import FakeQuantize

torch.manual_seed(0)
A8 = QuantSpec(bits=8, symmetric=False)


def _quantized(model, inputs, recipe="w8a8"):
    qmodel = qswap.convert(model, recipe)
    qswap.calibrate(qmodel, [inputs])
    return qmodel


def _hits(report, kind=None):
    return {(v.module, v.op) for v in report.violations if kind is None or v.kind == kind}


COUNTERPARTS = {
    "Linear": (lambda: nn.Linear(16, 24), lambda: torch.randn(4, 5, 16)),
    "Conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), lambda: torch.randn(2, 8, 20)),
    "Conv1d_reflect": (lambda: nn.Conv1d(8, 12, 3, padding=1, padding_mode="reflect"),
                       lambda: torch.randn(2, 8, 20)),
    "Conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2), lambda: torch.randn(2, 3, 12, 12)),
    "Embedding": (lambda: nn.Embedding(30, 16, padding_idx=1), lambda: torch.randint(0, 30, (3, 7))),
    "LayerNorm": (lambda: nn.LayerNorm(16), lambda: torch.randn(4, 5, 16)),
    "GroupNorm": (lambda: nn.GroupNorm(4, 16), lambda: torch.randn(2, 16, 10)),
    "Softmax": (lambda: nn.Softmax(dim=-1), lambda: torch.randn(4, 10)),
    "GELU": (lambda: nn.GELU(), lambda: torch.randn(4, 10)),
    "GLU": (lambda: nn.GLU(dim=1), lambda: torch.randn(4, 10)),
    "ReLU": (lambda: nn.ReLU(), lambda: torch.randn(4, 10)),
}


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel"])
@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_every_torch_counterpart_audits_honest_and_its_float_module_does_not(name, recipe, simulate):
    build, make_input = COUNTERPARTS[name]
    module, x = build().eval(), make_input()
    if name != "Embedding":  # a lookup alone computes nothing
        assert not qswap.audit(module, (x,)).honest
    report = qswap.audit(_quantized(module, (x,), recipe_with(recipe, simulate)), (x,))
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]
    # with simulate: integer, GLU and LayerNorm compute their integer forms (qswap.nn.simulate):
    # the int32 accumulator's value (its scale a Python number) is the kernel's own
    internal = 1 if simulate == "integer" and name in ("GLU", "LayerNorm") else 0
    assert report.totals["kernel_internal"] == internal
    assert report.totals["compute"] == report.totals["quantized"] + internal
    assert report.totals["compute"] > 0 or name == "Embedding"


def test_multihead_attention_w8a8_is_honest_and_float_names_its_kernels():
    mha = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(5, 2, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    float_report = qswap.audit(mha, (x, x, x, pad))
    assert {"aten._softmax", "aten.baddbmm", "aten.addmm"} <= {op for _, op in _hits(float_report)}
    report = qswap.audit(_quantized(mha, (x, x, x, pad)), (x, x, x, pad))
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]
    assert report.bits_histogram[32] > 0  # the int32 biases of the projections


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_torch_exp_on_a_float_tensor_is_caught():
    x = torch.randn(3, 8)
    report = qswap.audit(_quantized(nn.Sequential(nn.Linear(8, 8), _Exp()), (x,)), (x,))
    assert _hits(report) == {("1", "aten.exp")}
    v = report.violations[0]
    assert "accumulator" in v.operand and v.source.endswith(".py:" + v.source.rsplit(":", 1)[1])
    assert v.code == "return torch.exp(x)"


class _Thief(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x), F.linear(x, self.b.weight)  # b never runs: its raw weight is used


def test_reading_another_modules_raw_weight_is_caught():
    x = torch.randn(3, 8)
    report = qswap.audit(_quantized(_Thief(), (x,)), (x,))
    raw = [v for v in report.violations if v.kind == "raw_parameter"]
    assert [(v.module, v.op) for v in raw] == [("", "aten.mm")]
    assert "parameter b.weight" in raw[0].operand and raw[0].code.startswith("return self.a(x)")
    assert _hits(report) == {("", "aten.mm"), ("b", "<not executed>")}


class _LyingQuantize(FakeQuantize):
    """Claims its 8-bit grid but emits values a third of a step off it."""

    def forward(self, x):
        return super().forward(x) + self.scale / 3


def test_a_quantizer_whose_output_is_off_its_grid_is_caught():
    x = torch.randn(3, 8)
    qmodel = _quantized(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), (x,))
    honest = qmodel[2].input_quant
    liar = _LyingQuantize(honest.spec)
    liar.load_state_dict(honest.state_dict())
    qmodel[2].input_quant = liar
    report = qswap.audit(qmodel, (x,))
    assert _hits(report, "off_grid") == {("2.input_quant", "aten.add"), ("2", "aten.addmm")}
    consumer = next(v for v in report.violations if v.module == "2")
    assert "2.input_quant" in consumer.operand and "off its grid" in consumer.operand


class _Sdpa(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 24)
        self.q_quant, self.k_quant, self.v_quant = (FakeQuantize(A8) for _ in range(3))

    def forward(self, x):  # x: (B, T, 8)
        q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)  # (B, 1, T, 8) each
        return F.scaled_dot_product_attention(self.q_quant(q), self.k_quant(k), self.v_quant(v))


def test_fused_sdpa_is_caught_even_on_quantized_operands():
    x = torch.randn(2, 5, 8)
    model = _Sdpa()
    model.proj = qswap.convert(model.proj, "w8a8")
    qswap.calibrate(model, [(x,)])
    report = qswap.audit(model, (x,))
    fused = [v for v in report.violations if v.kind == "fused_kernel"]
    assert len(fused) == 1 and fused[0].module == "" and "scaled_dot_product" in fused[0].op
    assert fused[0].operand == "query, key, value"
    assert report.violations == fused  # its operands themselves were quantized


class _Skipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.skip_a = False

    def forward(self, x):
        return self.b(x if self.skip_a else self.a(x))


def test_a_swapped_module_skipped_at_run_time_is_caught():
    x = torch.randn(3, 8)
    qmodel = _quantized(_Skipper(), (x,))
    assert qswap.audit(qmodel, (x,)).honest
    qmodel.skip_a = True
    report = qswap.audit(qmodel, (x,))
    assert _hits(report) == {("a", "<not executed>")}
    assert report.violations[0].source.startswith("qswap/nn/linear.py:")


class _ManualSoftmax(QuantModule):
    """A leaf counterpart doing softmax as separate ops: one simulated integer kernel."""

    def __init__(self):
        super().__init__()
        self.input_quant = FakeQuantize(A8)

    def forward(self, x):
        x = self.input_quant(x)
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)


class _FloatSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_quant = FakeQuantize(A8)

    def forward(self, x):
        x = self.input_quant(x)
        e = torch.exp(x - x.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)


def test_kernel_internal_math_is_counted_apart_only_inside_a_leaf_counterpart():
    x = torch.randn(3, 8)
    report = qswap.audit(_ManualSoftmax(), (x,))
    assert report.honest
    assert report.totals["kernel_internal"] == 3  # exp, sum, div
    assert {r.op for r in report.kernel_internal} == {"aten.exp", "aten.sum", "aten.div"}
    report = qswap.audit(_FloatSoftmax(), (x,))  # the same math outside a counterpart
    assert {op for _, op in _hits(report)} == {"aten.exp", "aten.sum", "aten.div"}


class _WeightNorm(nn.Module):
    def __init__(self, quantize_weight: bool):
        super().__init__()
        self.g, self.v = nn.Parameter(torch.ones(4, 1)), nn.Parameter(torch.randn(4, 8))
        self.input_quant = FakeQuantize(A8)
        self.weight_quant = (FakeQuantize(QuantSpec(bits=8), kind="weight") if quantize_weight
                             else nn.Identity())

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)  # parameters only: constant-foldable
        return F.linear(self.input_quant(x), self.weight_quant(w))


def test_weight_preprocessing_is_constant_folding_and_honest_only_through_a_quantizer():
    x = torch.randn(3, 8)
    report = qswap.audit(_WeightNorm(quantize_weight=True), (x,))
    assert report.honest and report.totals["constant_fold"] == 3
    report = qswap.audit(_WeightNorm(quantize_weight=False), (x,))
    assert [v.kind for v in report.violations] == ["raw_parameter"]
    assert "parameter g (derived)" in report.violations[0].operand


class _Masked(QuantModule):
    def __init__(self):
        super().__init__()
        self.input_quant = FakeQuantize(A8)
        self.out = nn.Linear(8, 8)

    def forward(self, x, pad):  # pad: (B, T) bool, True = padding
        x = self.input_quant(x) * (~pad).unsqueeze(-1).float()  # zeroing by a 0/1 mask
        return self.out(x)


def test_multiplying_by_a_mask_made_from_bool_data_keeps_values_quantized():
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    model = _Masked()
    model.out = qswap.convert(model.out, "w8a8")
    qswap.calibrate(model, [(x, pad)])
    report = qswap.audit(model, (x, pad))
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def test_float_ok_declarations_are_listed_apart_and_never_counted_as_quantized():
    x = torch.randn(3, 8)
    recipe = {"version": 1, "name": "w8a8_float_residual",
              "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False}},
              "float_ok": {"add": "the residual add stays float in this study"}}
    report = qswap.audit(_quantized(Residual(), (x,), recipe), (x,))
    assert report.honest and not report.honest_strict
    assert report.verdict == "honest with declared exceptions"
    assert {(v.module, v.op) for v in report.declared} == {("", "aten.add")}
    assert report.declared[0].declared == "add: the residual add stays float in this study"
    assert report.totals["declared"] == 1 and report.totals["quantized"] == 1
    extra = qswap.audit(Residual(), (x,), float_ok={"fc": "float baseline"})
    assert {v.module for v in extra.declared} == {"fc"} and _hits(extra) == {("", "aten.add")}


def test_a_float_ok_op_key_declares_that_op_never_its_family_nor_a_bypass():
    """``matmul`` (a family name) declared every aten.mm/addmm/bmm finding, and any op key a raw
    weight reaching that op without its quantizer."""
    x = torch.randn(3, 8)
    qmodel = _quantized(_Thief(), (x,))
    for key in ("matmul", "mm", "family:matmul", "*:mm"):
        report = qswap.audit(qmodel, (x,), float_ok={key: "the matmuls stay float"})
        assert ("", "aten.mm") in _hits(report, "raw_parameter"), key
    weight_only = _quantized(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), (x,), "w8_weight_only")
    stale = qswap.audit(weight_only, (x,), float_ok={"matmul": "float"})
    assert ("0", "aten.addmm") in _hits(stale)
    assert "float_ok key 'matmul' matched no finding (an op family is keyed 'family:matmul')" in stale.notes
    report = qswap.audit(weight_only, (x,), float_ok={"family:matmul": "activations stay float"})
    assert {(v.module, v.op, v.kind) for v in report.declared} == {
        ("0", "aten.addmm", "float_operand"), ("1", "aten.addmm", "float_operand")}
    # the float biases (weight-only leaves them float): only a module key declares them
    assert {(v.module, v.kind) for v in report.violations} == {("0", "raw_parameter"), ("1", "raw_parameter")}
    assert qswap.audit(weight_only, (x,), float_ok={"*": "a weight-only study"}).honest


def test_the_audit_restores_modes_and_uncalibrated_quantizer_state():
    x = torch.randn(3, 8)
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4)), "w8a8")
    qmodel.train()
    qmodel[1].eval()
    activation = [m for m in qmodel.modules() if isinstance(m, FakeQuantize) and m.kind == "activation"]
    before = [{k: v.clone() for k, v in q.state_dict().items()} for q in activation]
    report = qswap.audit(qmodel, (x,))
    assert report.honest
    assert qmodel.training and qmodel[0].training and not qmodel[1].training
    for q, state in zip(activation, before):  # (weight grids are a function of the weights)
        after = q.state_dict()
        assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert {v.module for v in report.dynamic} == {"0.input_quant", "2.input_quant"}
    assert report.verdict == "honest with dynamic ranges (computed at run time)"
    assert not report.honest_strict
    markdown = report.to_markdown()
    assert "Verdict: **HONEST with dynamic ranges (computed at run time)**" in markdown
    assert "## Dynamic ranges, computed at run time (2)" in markdown


def test_a_recipe_may_declare_dynamic_activations():
    x = torch.randn(3, 8)
    recipe = {**qswap.load_recipe("w8a8").to_dict(), "name": "w8a8_dynamic", "dynamic_activations": True}
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), recipe)
    report = qswap.audit(qmodel, (x,))
    assert len(report.dynamic) == 3 and all("dynamic_activations" in v.declared for v in report.dynamic)
    assert report.verdict == "honest" and report.honest_strict
    qswap.calibrate(qmodel, [(x,)])
    assert qswap.audit(qmodel, (x,)).dynamic == []


def test_report_formats_and_bad_inputs():
    x = torch.randn(3, 8)
    report = qswap.audit(Residual(), (x,))
    data = report.to_dict()
    assert data["verdict"] == "dishonest" and data["paths"] == ["forward"]
    fields = {"module", "op", "operand", "reason", "source", "shape", "dtype", "count"}
    assert fields <= set(data["violations"][0])
    assert "| module | op | operand |" in report.to_markdown()
    with pytest.raises(AuditError, match="net_input dict"):
        qswap.audit(Residual(), "not an input")
    with pytest.raises(AuditError, match="failed on the 'forward' path"):
        qswap.audit(Residual(), (torch.randn(3, 5),))
    # a model that checks its inputs with assert (as fairseq does): a raw AssertionError had escaped
    with pytest.raises(AuditError, match="failed on the 'forward' path with these inputs: AssertionError: "
                                         "expected 8 features"):
        qswap.audit(_Asserting(), (torch.randn(3, 5),))


class _Asserting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        assert x.size(-1) == 8, "expected 8 features"
        return self.fc(x)


def test_inputs_and_options_the_audit_cannot_judge_by_are_audit_errors_not_findings():
    """A NaN input had the honest model reported dishonest (its first quantizer's output off the
    grid); a float64 input ran on the quantized model (its float model refuses it) with every op
    off-grid; float_ok and decode_steps of the wrong type were a TypeError or blamed on the model."""
    x = torch.randn(3, 8)
    qmodel = _quantized(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), (x,))
    assert qswap.audit(qmodel, (x,)).honest
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(AuditError, match="'argument 0' holds NaN values"):
        qswap.audit(qmodel, (bad,))
    with pytest.raises(AuditError, match="'input' holds NaN"):
        qswap.audit(qmodel, bad)
    with pytest.raises(AuditError, match="'argument 0' is torch.float64, the model's parameters are torch.float32"):
        qswap.audit(qmodel, (x.double(),))
    with pytest.raises(AuditError, match="float_ok: must map an op or module to its reason, got list"):
        qswap.audit(qmodel, (x,), float_ok=["softmax"])
    for entry in ({"softmax": ""}, {1: "why"}):
        with pytest.raises(AuditError, match="float_ok entry .*needs a string key and a non-empty reason"):
            qswap.audit(qmodel, (x,), float_ok=entry)
    for steps in ("3", -1, True, 0):  # 0 ran one step anyway; the CLI refuses --decode-steps 0
        with pytest.raises(AuditError, match="decode_steps is a number .*1 or more"):
            qswap.audit(qmodel, (x,), decode_steps=steps)


def test_qswap_audit_is_the_function_after_importing_the_honesty_package():
    import qswap.honesty  # the package has its own name: importing it cannot rebind qswap.audit
    from qswap.honesty import HonestyReport
    report = qswap.audit(nn.ReLU(), (torch.randn(2),))
    assert isinstance(report, HonestyReport)
    assert qswap.audit is qswap.honesty.audit
