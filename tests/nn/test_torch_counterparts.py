"""Each torch.nn counterpart: fp32 is exact, w8a8 is close to float and really on 8-bit grids."""
import pytest
import torch
from torch import nn

import qswap
from helpers import on_grid, sqnr_db
from qswap.quant.fake_quantize import FakeQuantize

torch.manual_seed(0)

CASES = {
    "Linear": (lambda: nn.Linear(16, 24), lambda: torch.randn(4, 5, 16)),
    "Conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), lambda: torch.randn(2, 8, 20)),
    "Conv1d_reflect": (lambda: nn.Conv1d(8, 12, 3, padding=1, padding_mode="reflect"),
                       lambda: torch.randn(2, 8, 20)),
    "Conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2), lambda: torch.randn(2, 3, 12, 12)),
    "Embedding": (lambda: nn.Embedding(30, 16, padding_idx=1), lambda: torch.randint(0, 30, (3, 7))),
    "LayerNorm": (lambda: nn.LayerNorm(16), lambda: torch.randn(4, 5, 16) * 3 + 1),
    "GroupNorm": (lambda: nn.GroupNorm(4, 16), lambda: torch.randn(2, 16, 10)),
    "Softmax": (lambda: nn.Softmax(dim=-1), lambda: torch.randn(4, 10) * 2),
    "ReLU": (lambda: nn.ReLU(), lambda: torch.randn(4, 10)),
    "GELU": (lambda: nn.GELU(), lambda: torch.randn(4, 10)),
    "SiLU": (lambda: nn.SiLU(), lambda: torch.randn(4, 10)),
    "GLU": (lambda: nn.GLU(dim=1), lambda: torch.randn(4, 10)),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(16, 4), lambda: torch.randn(6, 2, 16)),
    "MultiheadAttention_batch_first": (lambda: nn.MultiheadAttention(16, 2, batch_first=True),
                                       lambda: torch.randn(2, 6, 16)),
}


def _run(module, x):
    with torch.no_grad():
        if isinstance(module, (nn.MultiheadAttention, qswap.nn.attention.QMultiheadAttention)):
            return module(x, x, x)[0]
        return module(x)


def _model_and_input(name):
    build, make_input = CASES[name]
    torch.manual_seed(1)
    return build().eval(), make_input()


@pytest.mark.parametrize("name", CASES)
def test_fp32_recipe_is_exact(name):
    model, x = _model_and_input(name)
    converted = qswap.convert(model, "fp32")
    assert torch.equal(_run(converted, x), _run(model, x))


@pytest.mark.parametrize("name", CASES)
def test_w8a8_is_close_to_float_and_activations_are_on_8bit_grids(name):
    model, x = _model_and_input(name)
    converted = qswap.convert(model, "w8a8")
    qswap.calibrate(converted, [(x,)], forward=lambda m, b: _run(m, b[0]))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, out)))
             for m in converted.modules() if isinstance(m, FakeQuantize)]
    try:
        out = _run(converted, x)
    finally:
        for h in hooks:
            h.remove()
    assert sqnr_db(_run(model, x), out) > 25.0
    assert seen, "no quantizer ran"
    for fq, y in seen:
        assert fq.spec.bits == 8
        assert on_grid(y, fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax, fq.spec.channel_axis)


def test_attention_key_padding_mask_matches_float():
    mha = nn.MultiheadAttention(16, 4).eval()
    x = torch.randn(6, 2, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.triu(torch.full((6, 6), float("-inf")), 1)
    q = qswap.convert(mha, "w8a8")
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, key_padding_mask=pad, attn_mask=causal)
        out, w = q(x, x, x, key_padding_mask=pad, attn_mask=causal)
    assert sqnr_db(ref, out) > 25.0
    assert torch.equal(w == 0, ref_w == 0)  # masked positions get exactly zero probability


NO_QUANT = {"version": 1, "name": "no_quant", "defaults": {"weight": None, "activation": None}}


def _float_padding(kind):
    pad = torch.zeros(2, 6)
    pad[1, 0], pad[0, 2] = -2.0, 1.5  # torch adds a float key_padding_mask to the scores
    if kind == "with_inf":
        pad[1, -1] = float("-inf")
    return pad


@pytest.mark.parametrize("attn_mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("kind", ["additive", "with_inf"])
@pytest.mark.parametrize("extra", [{}, {"batch_first": True}, {"add_bias_kv": True, "add_zero_attn": True}])
def test_a_float_key_padding_mask_is_added_to_the_scores_as_torch_adds_it(attn_mask, kind, extra):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **extra).eval()
    x = torch.randn(2, 6, 8) if extra.get("batch_first") else torch.randn(6, 2, 8)
    mask = {"none": None, "bool": torch.triu(torch.ones(6, 6, dtype=torch.bool), 1),
            "additive": torch.randn(2 * 2, 6, 6)}[attn_mask]
    pad = _float_padding(kind)
    q = qswap.convert(mha, NO_QUANT).eval()
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, key_padding_mask=pad, attn_mask=mask)
        out, w = q(x, x, x, key_padding_mask=pad, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-5)


def test_a_float_key_padding_mask_reaches_the_additive_bias_quantizer_without_its_blocked_keys():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    x, pad = torch.randn(6, 2, 8), _float_padding("with_inf")
    q = qswap.convert(mha, "w8a8")
    seen = []
    hook = q.core.attn_bias_quant.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    qswap.calibrate(q, [(x, pad)], forward=lambda m, b: m(b[0], b[0], b[0], key_padding_mask=b[1]))
    hook.remove()
    assert seen and all(torch.isfinite(t).all() for t in seen)  # the -inf key is filled, not quantized
    assert torch.isfinite(q.core.attn_bias_quant.scale).all()
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, key_padding_mask=pad)
        out, w = q(x, x, x, key_padding_mask=pad)
    assert sqnr_db(ref, out) > 25.0
    assert torch.equal(w == 0, ref_w == 0)


def test_linear_bias_lies_on_the_int32_accumulator_grid():
    lin = qswap.convert(nn.Linear(8, 4), "w8a8_per_channel")
    x = torch.randn(3, 8)
    with torch.no_grad():
        lin(x)
    b = lin.bias_quant(lin.bias, lin.input_quant, lin.weight_quant)
    scale = lin.input_quant.scale * lin.weight_quant.scale
    torch.testing.assert_close(b / scale, (b / scale).round(), rtol=0, atol=1e-3)


def test_counterparts_train_with_straight_through_gradients():
    model = qswap.convert(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)), "w4a8").train()
    model(torch.randn(16, 8)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_batch_first_self_attention_quantizes_its_input_once_and_trains_like_seq_first():
    """``key is query`` is tested before the batch-first transpose: self-attention gets one input
    quantizer, as in the sequence-first layout, and the same values and gradients."""
    torch.manual_seed(0)
    seq_first = nn.MultiheadAttention(16, 2)
    batch_first = nn.MultiheadAttention(16, 2, batch_first=True)
    batch_first.load_state_dict(seq_first.state_dict())
    x = torch.randn(6, 2, 16)  # (L, B, E)
    quantized = []
    for module, layout in ((seq_first, x), (batch_first, x.transpose(0, 1).contiguous())):
        q = qswap.convert(module, "w8a8")
        qswap.calibrate(q, [(layout,)], forward=lambda m, b: m(b[0], b[0], b[0]))
        xi = layout.clone().requires_grad_()
        out = q.train()(xi, xi, xi)[0]
        (out * torch.linspace(-1, 1, 16)).sum().backward()
        quantized.append((q, out, xi.grad))
    (q_seq, out_seq, grad_seq), (q_bf, out_bf, grad_bf) = quantized
    assert not q_bf.key_quant.initialized and not q_bf.value_quant.initialized
    torch.testing.assert_close(out_bf.transpose(0, 1), out_seq)
    torch.testing.assert_close(grad_bf.transpose(0, 1), grad_seq)
