"""The audit's self-test: small models written to slip a float op past the audit, each with the
op it hides and the finding expected (module, op, kind), and honest models that must not be
flagged. Every model is converted with w8a8 and calibrated first; the audit runs with the
value-level check on, whose verdict must agree."""
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
from helpers import reports_with_and_without_shortcuts
from qswap.quant.fake_quantize import FakeQuantize

torch.manual_seed(0)
ROWS = torch.arange(4)
IDX = ROWS[:, None].expand(4, 8)
MASK = torch.tensor([[True, False] * 4] * 4)


@torch.library.custom_op("qswap_adversarial::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


def _write_through_unsafe_view(a, h):
    """``_unsafe_view`` shares ``a``'s storage with its own version counter: overwriting ``a``
    with the accumulator ``h`` changes the view's values, and the view's counter does not move."""
    view = torch.ops.aten._unsafe_view(a, list(a.shape))
    a.copy_(h)
    return view


def _on_thread(fn, *args):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    return out[0]


class _Hide(nn.Module):
    """``h`` and ``g`` are accumulators (Linear outputs); ``ra(h)``, ``rb(g)``, ``rc(h)`` are
    quantized on three different grids (a counterpart ReLU quantizes its input). ``f`` hides one
    float op; ``out`` requantizes whatever ``f`` returns."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ra, self.rb, self.rc = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.out(self.f(self, self.a(x), self.b(x)))


def _off(s, h) -> float:
    """A number off the grid of ``s.ra`` (a third of its step)."""
    return s.ra.input_quant.scale.item() / 3


CASES = {  # name: (f(self, h, g), expected (module, op, kind); op None: any op)
    "exp": (lambda s, h, g: torch.exp(h), ("", "aten.exp", "float_operand")),
    "sigmoid": (lambda s, h, g: torch.sigmoid(h), ("", "aten.sigmoid", "float_operand")),
    "add of two accumulators": (lambda s, h, g: h + g, ("", "aten.add", "float_operand")),
    "mul of two accumulators": (lambda s, h, g: h * g, ("", "aten.mul", "float_operand")),
    "div": (lambda s, h, g: h / (g.abs() + 1), ("", "aten.abs", "float_operand")),
    "index_put accumulate": (lambda s, h, g: h.index_put((ROWS,), g, accumulate=True),
                             ("", "aten.index_put", "float_operand")),
    "index_add": (lambda s, h, g: h.index_add(0, ROWS, g), ("", "aten.index_add", "float_operand")),
    "scatter_add": (lambda s, h, g: h.scatter_add(0, IDX, g), ("", "aten.scatter_add", "float_operand")),
    "scatter_reduce sum": (lambda s, h, g: h.scatter_reduce(0, IDX, g, "sum"),
                           ("", "aten.scatter_reduce", "float_operand")),
    "scatter reduce=multiply": (lambda s, h, g: h.scatter(0, IDX, g, reduce="multiply"),
                                ("", "aten.scatter", "float_operand")),
    "write through a tensor sharing storage (_unsafe_view)": (
        lambda s, h, g: _write_through_unsafe_view(s.ra(h).clone(), h) * s.rb(g), ("", "aten.mul", "float_operand")),
    "float16 round trip": (lambda s, h, g: s.ra(h).half().float() * s.rb(g), ("", "aten.mul", "float_operand")),
    "bits reinterpreted as bfloat16": (
        lambda s, h, g: s.ra(h).view(torch.bfloat16)[:, 1::2].float() * s.rb(g), ("", "aten.mul", "float_operand")),
    "cast round trip": (lambda s, h, g: torch.softmax((h * 20).long().float() * 0.05, -1),
                        ("", "aten._softmax", "float_operand")),
    "cast round trip through integer math": (
        lambda s, h, g: torch.softmax(((h * 20).long() + 1).float(), -1), ("", "aten._softmax", "float_operand")),
    "integers times a quantized tensor": (lambda s, h, g: s.ra(h) * (g * 4).long(),
                                          ("", "aten.mul", "float_operand")),
    "maximum of two grids": (lambda s, h, g: s.rc(h).T @ torch.maximum(s.ra(h), s.rb(g)),
                             ("", "aten.mm", "float_operand")),
    "minimum of two grids": (lambda s, h, g: s.rc(h).T @ torch.minimum(s.ra(h), s.rb(g)),
                             ("", "aten.mm", "float_operand")),
    "cat of two grids": (lambda s, h, g: s.rc(h).T @ torch.cat([s.ra(h)[:2], s.rb(g)[2:]]),
                         ("", "aten.mm", "float_operand")),
    "where of two grids": (lambda s, h, g: s.rc(h).T @ torch.where(MASK, s.ra(h), s.rb(g)),
                           ("", "aten.mm", "float_operand")),
    "masked_fill off the grid": (lambda s, h, g: s.rc(h).T @ s.ra(h).masked_fill(MASK, _off(s, h)),
                                 ("", "aten.mm", "float_operand")),
    "where with a constant off the grid": (lambda s, h, g: s.rc(h).T @ torch.where(MASK, s.ra(h), _off(s, h)),
                                           ("", "aten.mm", "float_operand")),
    "pad off the grid": (lambda s, h, g: s.rc(h).T @ F.pad(s.ra(h), (0, 0, 1, 0), value=_off(s, h))[:4],
                         ("", "aten.mm", "float_operand")),
    "clamp off the grid": (lambda s, h, g: s.rc(h).T @ s.ra(h).clamp(max=_off(s, h)),
                           ("", "aten.mm", "float_operand")),
    "a mask that is not 0/1": (lambda s, h, g: s.ra(h) * (2 - MASK.float()), ("", "aten.mul", "float_operand")),
    "a 0/1 mask times a Python number": (
        lambda s, h, g: s.rc(h).T @ (s.ra(h) * torch.maximum(MASK.float() * 0.37, (~MASK).float())),
        ("", "aten.mul", "float_operand")),
    "as_strided beyond its input": (lambda s, h, g: s.rc(h).T @ _restrided(s.ra(h), h),
                                    ("", "aten.mm", "float_operand")),
    "as_strided_copy beyond its input": (
        lambda s, h, g: s.rc(h).T @ _restrided(s.ra(h), h, torch.ops.aten.as_strided_copy),
        ("", "aten.mm", "float_operand")),
    "integers joined with quantized data": (
        lambda s, h, g: s.rc(h).T[:, :4] @ torch.cat([s.ra(h)[:2], torch.arange(16).view(2, 8)]),
        ("", "aten.mm", "float_operand")),
    "where with an integer tensor": (lambda s, h, g: s.rc(h).T @ torch.where(MASK, s.ra(h), torch.tensor(10)),
                                     ("", "aten.mm", "float_operand")),
    "where with integer data": (lambda s, h, g: s.rc(h).T @ torch.where(MASK, s.ra(h), torch.arange(8)),
                                ("", "aten.mm", "float_operand")),
    "masked_fill with an integer tensor": (
        lambda s, h, g: s.rc(h).T @ s.ra(h).masked_fill(MASK, torch.tensor(10)), ("", "aten.mm", "float_operand")),
    "quantized data times integers": (lambda s, h, g: s.ra(h) * torch.arange(8), ("", "aten.mul", "float_operand")),
    "clamp to an integer tensor": (lambda s, h, g: s.ra(h).clamp(min=torch.tensor(10)),
                                   ("", "aten.clamp", "float_operand")),
    "maximum with an integer tensor": (lambda s, h, g: torch.maximum(s.ra(h), torch.tensor(10)),
                                       ("", "aten.maximum", "float_operand")),
    "integer data as a factor": (lambda s, h, g: s.ra(h) * torch.arange(8).float(),
                                 ("", "aten.mul", "float_operand")),
    "in-place add after quantizing": (lambda s, h, g: s.rc(h).T @ s.ra(h).add_(0.01), ("", "aten.mm", "float_operand")),
    "an alias changed in place": (lambda s, h, g: s.rc(h).T @ _alias_exp(s.ra(h)), ("", "aten.mm", "float_operand")),
    "float64 detour": (lambda s, h, g: h.double().exp().float(), ("", "aten.exp", "float_operand")),
    "exp on a worker thread": (lambda s, h, g: _on_thread(torch.exp, h), ("", "aten.exp", "float_operand")),
    "exp in numpy": (lambda s, h, g: torch.from_numpy(np.exp(h.numpy())),
                     ("out.input_quant", "<quantizer input>", "unseen_origin")),
    "exp with the dispatch switched off": (lambda s, h, g: _undispatched(torch.exp, h),
                                           ("out.input_quant", "<quantizer input>", "unseen_origin")),
    "values through Python": (lambda s, h, g: torch.tensor(h.tolist()),
                              ("out.input_quant", "<quantizer input>", "unseen_origin")),
    "a custom op": (lambda s, h, g: _double(s.ra(h)), ("", "qswap_adversarial.double", "unclassified_op")),
    "fused attention": (lambda s, h, g: F.scaled_dot_product_attention(s.ra(h)[None], s.rb(g)[None],
                                                                       s.rc(h)[None])[0],
                        ("", "aten._safe_softmax", "float_operand")),  # CPU runs SDPA's math ops
    "another module's raw weight": (lambda s, h, g: F.linear(s.ra(h), s.b.weight), ("", None, "raw_parameter")),
    "a random constant": (lambda s, h, g: s.ra(h) * torch.rand(8), ("", "aten.mul", "float_constant")),
    "a fill with a computed value": (lambda s, h, g: torch.empty(4, 8).fill_(h.sum()), ("", "aten.sum", "float_operand")),
    "log_softmax": (lambda s, h, g: torch.log_softmax(h, -1), ("", "aten._log_softmax", "float_operand")),
    "integers copied into a quantized tensor": (lambda s, h, g: s.rc(h).T @ _copied(s.ra(h), (g * 20).long()),
                                                ("", "aten.mm", "float_operand")),
    "a float GEMM on codes beyond 2^24": (lambda s, h, g: _codes(s.ra, h) @ torch.full((8, 8), 2.0 ** 16),
                                          ("", "aten.mm", "inexact_gemm")),
    "a float GEMM of codes and float data": (lambda s, h, g: _codes(s.ra, h).T @ s.rc(h),
                                             ("", "aten.mm", "float_operand")),
    "an accumulator's bits as integers, then a GEMM": (
        lambda s, h, g: _codes(s.ra, h).T @ h.view(torch.int32).view(torch.float32), ("", "aten.mm", "float_operand")),
    "a softmax in complex numbers": (lambda s, h, g: torch.view_as_real(_complex_softmax(h))[..., 0],
                                     ("", "aten.exp", "float_operand")),
    "an accumulator compared, the comparisons summed": (
        lambda s, h, g: torch.exp((h[..., None] > torch.linspace(-2, 2, 16)).float().sum(-1) * 0.25),
        ("", "aten.sum", "float_operand")),
    "an accumulator's argmax as a number": (
        lambda s, h, g: torch.exp(h.argmax(-1, keepdim=True).float() * 0.3).expand(4, 8), ("", "aten.mul", "float_operand")),
    "quantized values bucketized back to their codes, then float math": (
        lambda s, h, g: torch.softmax(torch.exp(_bucketized(s.ra, h)) * _bucketized(s.ra, h).tanh(), -1),
        ("", "aten.exp", "float_operand")),
    "quantized values found by searchsorted, then float math": (
        lambda s, h, g: torch.exp(_searched(s.ra, h).float() * 0.01),
        ("", "aten.exp", "float_operand")),
    "quantized values compared, the comparisons summed": (
        lambda s, h, g: torch.exp(_thermometer(s.ra, h).float() * _step(s.ra)),
        ("", "aten.exp", "float_operand")),
    "masks of quantized values added as floats": (
        lambda s, h, g: (s.ra(h) > 0).float() + (s.ra(h) > _step(s.ra)).float(), ("", "aten.add", "float_operand")),
    "a quantized tensor's argmax as a number": (
        lambda s, h, g: torch.exp(s.ra(h).argmax(-1, keepdim=True).float() * 0.3).expand(4, 8),
        ("", "aten.exp", "float_operand")),
    "an accumulator's rounded integers compared, as floats": (
        lambda s, h, g: torch.exp(((h * 20).long() > 3).float()), ("", "aten.exp", "float_operand")),
    "a quantized tensor's sort indices as numbers": (
        lambda s, h, g: torch.exp(s.ra(h).sort(-1).indices.float()), ("", "aten.exp", "float_operand")),
    # FakeQuantize.codes had been taken for index math: exp and a raw-weight GEMM on them passed
    "a quantizer's own codes, then float math": (
        lambda s, h, g: torch.exp(s.ra.input_quant.codes(s.ra(h)).float() * 0.01) @ s.b.weight.T,
        ("", "aten.exp", "float_operand")),
    # factories reading tensor values had made their outputs constants: float math on them folded
    "an accumulator copied by normal(h, 0, out=)": (
        lambda s, h, g: torch.softmax(torch.normal(h, 0.0, out=torch.empty(4, 8)), -1),
        ("", "aten.normal", "float_operand")),
    "an accumulator's element through linspace": (
        lambda s, h, g: torch.softmax(torch.cat([torch.linspace(v, v, 1) for v in h.reshape(-1)]).view(4, 8), -1),
        ("", "aten.linspace", "float_operand")),
    # accumulating writes (ARGUMENT_RULES' adds and products) had kept the input's 8-bit grid
    "put accumulate=True keeps no grid": (
        lambda s, h, g: torch.softmax(torch.zeros(32).put_(torch.tensor([0, 1] * 16), s.ra(h).reshape(-1),
                                                           accumulate=True).reshape(4, 8), -1),
        ("", "aten._softmax", "float_operand")),
    "scatter reduce=add keeps no grid": (
        lambda s, h, g: torch.softmax(torch.zeros(4, 8).scatter_(0, torch.zeros(4, 8, dtype=torch.long), s.ra(h),
                                                                 reduce="add"), -1),
        ("", "aten._softmax", "float_operand")),
    # an accumulator's bits read as a float (Schraudolph's exp): no float op, a view
    "exp from integer bits viewed as float32": (
        lambda s, h, g: ((h * (2 ** 23 / 0.6931471805599453)).to(torch.int32) + (127 << 23)).view(torch.float32),
        ("", "aten.view", "float_operand")),
    # an integer op took the tag of its first tagged operand: integer data of a model input (here
    # an integer buffer's stand-in, a 0-d index tensor) first had hidden the activations' integers
    "integers of an accumulator added after index integers": (
        lambda s, h, g: torch.softmax((torch.arange(8)[None, :] * 0 + (h * 100).long()).float() * 0.01, -1),
        ("", None, "float_operand")),
}


def _step(relu) -> float:
    return relu.input_quant.scale.item()


def _levels(relu):
    """Boundaries halfway between the grid points of ``relu``'s input quantizer: a constant."""
    return (torch.arange(1, 256) - 0.5) * _step(relu)


def _searched(relu, h):
    q = relu(h)
    return torch.searchsorted(_levels(relu), q.contiguous())


def _thermometer(relu, h):
    """The codes of ``relu(h)``: how many levels each value exceeds (comparisons, summed)."""
    q = relu(h)
    return (q[..., None] > _levels(relu)).sum(-1)


def _bucketized(relu, h):
    """``relu(h)`` (quantized) turned back into its values by integer comparisons with constant
    levels (``bucketize``), cast to float: exactly ``relu(h)``, with no quantizer's tag."""
    q = relu(h)
    return torch.bucketize(q, _levels(relu)).float() * _step(relu)


def _restrided(q, h, op=torch.as_strided):
    """A view of quantized values re-strided (``as_strided`` addresses the storage, not the view)
    onto the accumulator ``h`` written beside them in one buffer."""
    buf = torch.empty(2, 4, 8)
    buf[1] = h
    top = buf[0]
    top.copy_(q)
    return op(top, (4, 8), (8, 1), 32)


def _complex_softmax(h):
    z = torch.view_as_complex(torch.stack([h, torch.zeros_like(h)], -1))
    e = torch.exp(z)
    return e / e.sum(-1, keepdim=True)


def _copied(q, ints):
    """``q`` overwritten in place with integers made from float data (not a qswap quantizer)."""
    return q.copy_(ints)


def _codes(relu, h):
    """The codes of ``relu(h)`` (its input quantizer's grid) as float32 integers."""
    return torch.round(relu(h) * (1 / relu.input_quant.scale.item())).to(torch.int32).to(torch.float32)


def _undispatched(fn, *args):
    """What a hook or an extension running outside the dispatcher does."""
    with torch._C._DisableTorchDispatch():  # noqa: SLF001
        return fn(*args)


def _alias_exp(q):
    q.view(-1).exp_()
    return q


def _audit(model, x):
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, [(x,)])
    return qswap.audit(qmodel, (x,), values=True)


def test_the_suite_has_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hidden_float_op_is_found(name):
    f, (module, op, kind) = CASES[name]
    report = _audit(_Hide(f), torch.randn(4, 8))
    hits = [v for v in report.violations if v.kind == kind and (module is None or v.module == module)
            and (op is None or v.op == op)]
    assert hits, [(v.module, v.op, v.kind, v.operand) for v in report.violations]
    assert not report.honest


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.r, self.out = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)

    def forward(self, x):
        q = self.r(self.a(x))
        keep = (q > 0).float()  # a mask of quantized values: a selection, as a ReLU's
        return self.out(torch.cat([q.masked_fill(MASK, 0.0), q * MASK.float()], 0)[:4] * keep)


class _Clamped(_Masked):
    def forward(self, x):
        q = self.r(self.a(x))
        step = self.r.input_quant.scale.item()
        return self.out(torch.maximum(q, q.flip(0)).clamp(max=5 * step) * 0.5)


class _Selected(_Masked):
    def forward(self, x):
        q = self.r(self.a(x))
        top = q.gather(-1, q.argmax(-1, keepdim=True)).expand(4, 8)  # an argmax of quantized values as an index
        return self.out(torch.where(q > top * 0.5, q, 0.0).masked_fill(q.isnan(), 0.0))  # masks of them


class _IntegerGemm(nn.Module):
    """A simulated integer linear: the codes of a quantized tensor times integer weight codes
    kept as a float buffer, on the float kernel (exact), the accumulator requantized."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.out = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)
        self.register_buffer("w", torch.randint(-127, 128, (8, 8)).float(), persistent=False)

    def forward(self, x):
        acc = _codes(self.r, self.a(x)) @ self.w.T
        return self.out(acc.to(torch.int32).to(torch.float32) * 0.01)


HONEST = {
    "linear": (lambda: nn.Linear(8, 8), lambda: torch.randn(4, 8)),
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), lambda: torch.randn(4, 8)),
    "conv": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)), lambda: torch.randn(2, 4, 12)),
    "layer norm": (lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), lambda: torch.randn(4, 8)),
    "softmax": (lambda: nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)), lambda: torch.randn(4, 8)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8)), lambda: torch.randint(0, 20, (3, 5))),
    "attention": (lambda: _SelfAttention(), lambda: torch.randn(5, 2, 8)),
    "masks and a shared grid": (_Masked, lambda: torch.randn(4, 8)),
    "clamp to grid points": (_Clamped, lambda: torch.randn(4, 8)),
    "masks and indices of quantized values": (_Selected, lambda: torch.randn(4, 8)),
    "an exact integer GEMM on codes": (_IntegerGemm, lambda: torch.randn(4, 8)),
}


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_models_are_not_flagged(name):
    build, make_input = HONEST[name]
    report = _audit(build().eval(), make_input())
    assert report.honest and report.honest_strict, [(v.module, v.op, v.operand) for v in report.violations]
    assert report.values_verdict == "honest" and report.value_disagreements == []


def test_at_least_8_honest_models():
    assert len(HONEST) >= 8


def test_an_audit_under_inference_mode_reads_its_inputs_as_any():
    """Tensors made under ``torch.inference_mode`` carry no version counter, which the audit reads
    for every tensor: an audit called there (or given such inputs) runs with the mode off."""
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "w8a8")
    qswap.calibrate(qmodel, [torch.randn(4, 8)])
    with torch.inference_mode():
        x = torch.randn(4, 8)
        assert qswap.audit(qmodel, x).honest
    assert qswap.audit(qmodel, x).honest  # an inference tensor, outside the mode


class _InferenceInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.inside = False

    def forward(self, x):
        with torch.inference_mode(self.inside):
            return self.b(self.a(x))


def test_a_model_running_under_inference_mode_is_an_audit_error_that_says_so():
    qmodel = qswap.convert(_InferenceInside(), "w8a8")
    qswap.calibrate(qmodel, [torch.randn(4, 8)])
    qmodel.inside = True
    with pytest.raises(qswap.QswapError, match="runs part of its forward under torch.inference_mode"):
        qswap.audit(qmodel, torch.randn(4, 8))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hidden_float_op_gets_the_same_report_without_the_view_shortcut(monkeypatch, name):
    """The tracker's view shortcut (``_one_move``) is only a faster ``_movement``."""
    torch.manual_seed(0)
    qmodel = qswap.convert(_Hide(CASES[name][0]), "w8a8")
    x = torch.randn(4, 8)
    qswap.calibrate(qmodel, [(x,)])
    report, general = reports_with_and_without_shortcuts(monkeypatch, lambda: qswap.audit(qmodel, (x,), values=True))
    assert report == general
    assert not report["honest"]


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_models_get_the_same_report_without_the_view_shortcut(monkeypatch, name):
    torch.manual_seed(0)
    build, make_input = HONEST[name]
    qmodel = qswap.convert(build().eval(), "w8a8")
    x = make_input()
    qswap.calibrate(qmodel, [(x,)])
    report, general = reports_with_and_without_shortcuts(monkeypatch, lambda: qswap.audit(qmodel, (x,), values=True))
    assert report == general
    assert report["honest"]


class _ExpThenQuantize(FakeQuantize):
    """A quantizer class of the user's own: float math on its (unquantized) input, then
    qswap's quantization of the result, whose output lies on the grid."""

    def forward(self, x):
        return super().forward(torch.softmax(torch.exp(x), -1) * 4.0)


def test_a_quantizer_class_not_qswaps_own_is_a_violation_naming_it():
    """The ops a quantizer runs are not classified: qswap's own classes (exactly ``FakeQuantize``,
    ``BiasQuantize``) are trusted code; a subclass hid float exp and softmax on an accumulator."""
    x = torch.randn(4, 8)
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval(), "w8a8")
    qswap.calibrate(qmodel, [(x,)])
    qmodel[1].input_quant.__class__ = _ExpThenQuantize
    report = qswap.audit(qmodel, (x,), values=True)
    assert not report.honest
    found = [v for v in report.violations if v.kind == "untrusted_quantizer"]
    assert [(v.module, v.op) for v in found] == [("1.input_quant", "<quantizer>")]
    assert "_ExpThenQuantize" in found[0].operand and "FakeQuantize" in found[0].operand


class _PcmFrontend(nn.Module):
    """A user's frontend (no qswap counterpart) on int16 PCM: normalized and convolved with its raw
    float weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 1, 5))
        self.proj = nn.Linear(8, 4)

    def forward(self, wav):
        x = wav.float() / 32768.0
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
        return self.proj(torch.tanh(F.conv1d(x[:, None], self.weight, stride=2)).transpose(1, 2))


def test_float_compute_on_an_integer_model_input_is_found():
    """An int16 waveform cast to float was index math, and its convolution with a raw weight
    'constant-foldable weight preprocessing': honest, with values=True too. The model's integer
    inputs are data; index math on them alone is still ignored."""
    torch.manual_seed(0)
    pcm = (torch.randn(2, 400) * 3000).to(torch.int16)
    report = _audit(_PcmFrontend().eval(), pcm)
    found = {(v.op, v.kind) for v in report.violations}
    assert ("aten.convolution", "raw_parameter") in found and ("aten.convolution", "float_operand") in found
    assert not report.honest and not report.constant_fold


class _Normalized(nn.Module):
    """An int16 waveform normalized in float (no raw weight: only index-like ops before a quantizer)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(400, 4)

    def forward(self, wav):
        x = wav.float()
        return self.proj((x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1))


class _Lengths(nn.Module):
    """Index math on an integer input ending in integers (fairseq's subsampled lengths), used as a
    mask of the quantized data: no finding."""

    def __init__(self):
        super().__init__()
        self.r, self.proj = nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x, lengths):
        out = ((lengths.float() - 1) / 2 + 1).floor().long()
        mask = torch.arange(x.size(1))[None, :] < out[:, None]
        return self.proj(self.r(x).masked_fill(~mask[..., None], 0.0))


@pytest.mark.parametrize("op, integral", [
    (lambda w: torch.div(w, 2, rounding_mode="floor"), True),
    (lambda w: w.clamp(-100, 100), True),
    (lambda w: torch.relu(w) * 2 - 1, True),
    (lambda w: torch.sign(w) + w * w, True),
    (lambda w: torch.add(w, w, alpha=0.5), False),
    (lambda w: w / 2, False),
    (lambda w: w ** 2 - w ** 0, True),
    (lambda w: 2 ** w, False),
    (lambda w: w ** -1, False),
    (lambda w: w.abs() ** 0.5, False),
    (lambda w: (w.double() / 3).float(), False),
    (lambda w: (w.double() * 2 - 1).float(), True),
], ids=["floor-div", "clamp", "relu", "sign-square", "alpha-half", "div", "pow-2", "2-pow", "pow-minus-1",
        "pow-half", "div-in-float64", "integers-in-float64"])
def test_integer_input_math_that_ends_in_integers_reaches_a_quantizer_honestly(op, integral):
    """Index math ending in integers (a rounding division, a clamp to integers, a ReLU, a power by a
    whole exponent of at least 0) had been flagged as float math on the input data;
    ``add(w, w, alpha=0.5)`` had passed as integers, and so had float64 math cast back to float32.
    In ``2 ** w`` the number is the base (a negative sample makes a fraction)."""
    class Frontend(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 4)

        def forward(self, wav):
            return self.proj(op(wav.float()))

    wav = (torch.randn(2, 16) * 50).to(torch.int16)
    qmodel = qswap.convert(Frontend(), "w8a8")
    qswap.calibrate(qmodel, [(wav,)])
    report = qswap.audit(qmodel, (wav,))
    assert report.honest == integral, [(v.module, v.op, v.operand) for v in report.violations]


def test_float_math_on_an_integer_input_read_by_a_quantizer_is_found_index_math_is_not():
    """The same normalization on a float waveform is 9 findings; on the int16 one every op had been
    index math, and the model honest. Index math that ends in integers stays ignored."""
    torch.manual_seed(0)
    report = _audit(_Normalized().eval(), (torch.randn(2, 400) * 3000).to(torch.int16))
    assert not report.honest
    assert any(v.module == "proj.input_quant" and v.kind == "float_operand" and "integer input data" in v.operand
               for v in report.violations), [(v.module, v.op, v.operand) for v in report.violations]
    x, lengths = torch.randn(2, 6, 8), torch.tensor([6, 3])
    qmodel = qswap.convert(_Lengths(), "w8a8")
    qswap.calibrate(qmodel, [(x, lengths)])
    assert qswap.audit(qmodel, (x, lengths)).honest


@pytest.mark.parametrize("first", [True, False], ids=["input first", "activations first"])
def test_an_integer_ops_result_carries_the_worst_tag_whatever_the_order(first):
    """``lengths * 0 + codes`` had taken the model input's tag (index math), ``codes + lengths * 0``
    the activations': the float softmax of the activations was honest one way round."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.r, self.out = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)

        def forward(self, x, lengths):
            codes, zero = (self.r(self.a(x)) * 1000).long(), lengths[:, None] * 0
            mixed = zero + codes if first else codes + zero
            return self.out(torch.softmax(mixed.float() * 1e-3, -1))

    torch.manual_seed(0)
    x, lengths = torch.randn(4, 8), torch.tensor([8, 7, 6, 5])
    qmodel = qswap.convert(Mixed(), "w8a8")
    qswap.calibrate(qmodel, [(x, lengths)])
    report = qswap.audit(qmodel, (x, lengths))
    assert not report.honest and any(v.op == "aten._softmax" for v in report.violations), report.violations


def test_an_uncalibrated_model_under_inference_mode_is_an_audit_error_and_calibrate_says_so_too():
    """With quantizers still observing, the audit's restore (and calibrate's rollback) had written
    into the inference tensors the run left and raised their own RuntimeError, hiding the error
    that names the mode; calibrate called under inference_mode had blamed the batches."""
    qmodel = qswap.convert(_InferenceInside(), "w8a8")
    qmodel.inside = True
    with pytest.raises(qswap.AuditError, match="runs part of its forward under torch.inference_mode"):
        qswap.audit(qmodel, torch.randn(4, 8))
    with pytest.raises(qswap.CalibrationError, match="runs part of its forward under torch.inference_mode"):
        qswap.calibrate(qmodel, [torch.randn(4, 8)])
    qmodel.inside = False
    with torch.inference_mode(), pytest.raises(qswap.CalibrationError, match="called under torch.inference_mode"):
        qswap.calibrate(qmodel, [torch.randn(4, 8)])
    assert qswap.calibrate(qmodel, [torch.randn(4, 8)]) == 1  # the rolled-back model calibrates as any
