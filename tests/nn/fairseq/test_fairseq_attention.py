"""fairseq MultiheadAttention and the conformer's ESPnet attentions, path by path: with identity
quantizers each counterpart computes what fairseq computes; with w8a8 it stays close and audits
honest (the whole-model tests cover the paths the three architectures take)."""
import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq.modules import MultiheadAttention, RelPositionalEncoding  # noqa: E402
from fairseq.modules.espnet_multihead_attention import (  # noqa: E402
    ESPNETMultiHeadedAttention,
    RelPositionMultiHeadedAttention,
    RotaryPositionMultiHeadedAttention,
)
from fairseq_testkit import NO_QUANT  # noqa: E402
from helpers import sqnr_db  # noqa: E402
from qswap.nn.attention import quantize_shared, repeat_kv  # noqa: E402
from qswap.nn.fairseq.attention import QUANTIZED_CACHE, QFairseqMultiheadAttention  # noqa: E402

E, H, T, S, B = 32, 4, 5, 7, 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, E, generator=g)
    mem = torch.randn(S, B, E, generator=g)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -2:] = True
    return x, mem, pad


def _mha(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiheadAttention(E, H, **kwargs).eval()


def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _both(module, *args, **kwargs):
    exact = qswap.convert(module, NO_QUANT)
    with torch.no_grad():
        return module(*args, **kwargs), exact(*args, **kwargs)


def test_self_attention_with_padding_and_float_future_mask():
    x, _, _ = _inputs()
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -1] = True
    future = torch.triu(torch.full((T, T), float("-inf")), 1)
    (ref, ref_w), (out, w) = _both(_mha(self_attention=True), x, x, x, key_padding_mask=pad,
                                   attn_mask=future)
    _close(out, ref)
    _close(w, ref_w)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_generic_attention_with_distinct_key_value_and_masks(mask):
    x, mem, pad = _inputs()
    value = mem.flip(0)
    attn_mask = torch.rand(T, S, generator=torch.Generator().manual_seed(1)) > 0.7
    attn_mask[:, 0] = False
    if mask == "additive":
        attn_mask = torch.randn(T, S)  # a real score bias, not only blocks
    (ref, ref_w), (out, w) = _both(_mha(), x, mem, value, key_padding_mask=pad, attn_mask=attn_mask,
                                   need_head_weights=True)
    _close(out, ref)
    assert w.shape == (H, B, T, S)  # per head, as fairseq's python path returns them
    _close(w.mean(dim=0), ref_w)  # fairseq's fast path averages them regardless


def test_kdim_vdim_add_bias_kv_add_zero_attn():
    x, mem, pad = _inputs()
    module = _mha(kdim=24, vdim=20, add_bias_kv=True, add_zero_attn=True)
    key, value = torch.randn(S, B, 24), torch.randn(S, B, 20)
    (ref, _), (out, _) = _both(module, x, key, value, key_padding_mask=pad)
    _close(out, ref)


def test_encoder_decoder_attention_incremental_static_kv_matches_batch():
    """Cached encoder keys/values (static_kv) step by step: as fairseq's incremental path."""
    x, mem, pad = _inputs()
    module = _mha(encoder_decoder_attention=True)
    exact = qswap.convert(module, NO_QUANT)
    for m in (module, exact):
        state: dict = {}
        with torch.no_grad():
            steps = [m(x[t: t + 1], mem, mem, key_padding_mask=pad, incremental_state=state,
                       static_kv=True)[0] for t in range(T)]
        m.result = torch.cat(steps)
    _close(exact.result, module.result)
    with torch.no_grad():
        batch = exact(x, mem, mem, key_padding_mask=pad, static_kv=True)[0]
    _close(exact.result, batch)


def test_beamable_encoder_decoder_attention():
    """set_beam_size: one encoder output per sentence, shared by its beams."""
    x, mem, pad = _inputs()
    beam = 3
    q = qswap.convert(_mha(encoder_decoder_attention=True), "w8a8")
    with torch.no_grad():
        q(x, mem, mem, key_padding_mask=pad)  # calibrate the grids once
    for fq in q.modules():
        if isinstance(fq, qswap.FakeQuantize) and fq.kind == "activation" and fq.initialized:
            fq.freeze()
    xb = x.repeat_interleave(beam, dim=1)  # (T, B*beam, E), beams of a sentence adjacent
    memb, padb = mem.repeat_interleave(beam, dim=1), pad.repeat_interleave(beam, dim=0)
    with torch.no_grad():
        plain = q(xb, memb, memb, key_padding_mask=padb, incremental_state={}, static_kv=True)[0]
        q.set_beam_size(beam)
        shared = q(xb, memb, memb, key_padding_mask=padb, incremental_state={}, static_kv=True)[0]
    _close(shared, plain)


def _frozen_w8a8(module, *args, **kwargs):
    q = qswap.convert(module, "w8a8")
    with torch.no_grad():
        q(*args, **kwargs)  # calibrate the grids once
    for fq in q.modules():
        if isinstance(fq, qswap.FakeQuantize) and fq.kind == "activation" and fq.initialized:
            fq.freeze()
    return q


def _decode(q, x, mem=None, pad=None):
    """(T, B, E) outputs of decoding x one step at a time (self-attention, or attention to a
    static mem), and the cache it left."""
    state: dict = {}
    with torch.no_grad():
        steps = [q(x[t: t + 1], x[t: t + 1], x[t: t + 1], incremental_state=state)[0] if mem is None
                 else q(x[t: t + 1], mem, mem, key_padding_mask=pad, incremental_state=state,
                        static_kv=True)[0]
                 for t in range(x.size(0))]
    return torch.cat(steps), q._get_input_buffer(state)


@pytest.mark.parametrize("kind", ["self", "encoder-decoder"])
def test_decoding_cache_kept_quantized_gives_the_same_bits(kind, monkeypatch):
    """Frozen per-tensor k/v quantizers: the cache holds quantized projections and each step
    quantizes only its new rows; the result is bit for bit that of a float cache quantized whole
    at every step."""
    x, mem, pad = _inputs()
    module = _mha(self_attention=True) if kind == "self" else _mha(encoder_decoder_attention=True)
    args = (x, x, x) if kind == "self" else (x, mem, mem)
    q = _frozen_w8a8(module, *args, key_padding_mask=None if kind == "self" else pad)
    mem, pad = (None, None) if kind == "self" else (mem, pad)
    kept, cache = _decode(q, x, mem, pad)
    assert QUANTIZED_CACHE in cache
    monkeypatch.setattr(QFairseqMultiheadAttention, "_quantized_cache", lambda self, saved: False)
    floats, cache = _decode(q, x, mem, pad)
    assert QUANTIZED_CACHE not in cache
    assert torch.equal(kept.view(torch.int32), floats.view(torch.int32))


def test_observing_kv_quantizers_keep_a_float_cache():
    x, _, _ = _inputs()
    q = _frozen_w8a8(_mha(self_attention=True), x, x, x)
    q.core.k_quant.unfreeze()
    _, cache = _decode(q, x)
    assert QUANTIZED_CACHE not in cache


def test_kv_shared_by_beams_are_quantized_once_when_that_is_the_same():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2 * H, S, E // H, generator=g)  # (B'*H, S, D)
    q = qswap.FakeQuantize(qswap.QuantSpec(symmetric=False))
    seen = []
    q.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        quantize_shared(q, t, 3, H)  # observing: it must see every beam's rows
        q.freeze()
        shared = quantize_shared(q, t, 3, H)
        expected = q(repeat_kv(t, 3, H))
    assert seen == [6 * H, 2 * H, 6 * H]
    assert torch.equal(shared, expected)


def test_before_softmax_is_refused():
    x, _, _ = _inputs()
    q = qswap.convert(_mha(self_attention=True), NO_QUANT)
    with pytest.raises(NotImplementedError, match="before_softmax"):
        q(x, x, x, before_softmax=True)


class _Call(nn.Module):
    """Audits a module called with keyword arguments (the audit's plain path)."""

    def __init__(self, module, **fixed):
        super().__init__()
        self.module, self.fixed = module, fixed

    def forward(self, **inputs):
        return self.module(**inputs, **self.fixed)[0]


def _w8a8(module, inputs: dict, **fixed):
    """(float output, w8a8 output, audit report) of ``module(**inputs, **fixed)``."""
    wrapped = _Call(module, **fixed)
    q = qswap.convert(wrapped, "w8a8")
    with torch.no_grad():
        q(**inputs)  # observe
        ref, out = wrapped(**inputs), q(**inputs)
    return ref, out, qswap.audit(q, inputs)


def test_w8a8_generic_attention_with_additive_mask_is_honest():
    x, mem, pad = _inputs()
    inputs = {"query": x, "key": mem, "value": mem.flip(0), "key_padding_mask": pad,
              "attn_mask": torch.randn(T, S)}
    ref, out, report = _w8a8(_mha(), inputs)
    assert sqnr_db(ref, out) > 20
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def _espnet(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(E, H, 0.0, **kwargs).eval()


ESPNET = {
    "espnet": lambda: _espnet(ESPNETMultiHeadedAttention),
    "rel_pos": lambda: _espnet(RelPositionMultiHeadedAttention),
    "rel_pos_zero_triu": lambda: _espnet(RelPositionMultiHeadedAttention, zero_triu=True),
    "rope": lambda: _espnet(RotaryPositionMultiHeadedAttention, precision=None),
}


def _espnet_inputs(kind):
    x, _, _ = _inputs()
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -2:] = True
    inputs = {"query": x, "key": x, "value": x, "key_padding_mask": pad}
    if kind.startswith("rel_pos"):
        inputs["pos_emb"] = RelPositionalEncoding(100, E)(x)  # (2T-1, 1, E)
    return inputs


@pytest.mark.parametrize("kind", sorted(ESPNET))
def test_espnet_attentions_match_fairseq(kind):
    module = ESPNET[kind]()
    inputs = _espnet_inputs(kind)
    (ref, _), (out, _) = _both(module, **inputs)
    finite = torch.isfinite(ref)  # zero_triu can leave fully masked rows
    assert torch.equal(finite, torch.isfinite(out))
    _close(out[finite], ref[finite])


@pytest.mark.parametrize("kind", ["espnet", "rope"])  # rel_pos runs in the s2t_conformer tests
def test_w8a8_espnet_attentions_are_honest(kind):
    ref, out, report = _w8a8(ESPNET[kind](), _espnet_inputs(kind))
    assert sqnr_db(ref, out) > 20
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def test_counterpart_keeps_fairseq_incremental_plumbing():
    q = qswap.convert(_mha(self_attention=True), NO_QUANT)
    assert isinstance(q, QFairseqMultiheadAttention)
    state: dict = {}
    x, _, _ = _inputs()
    with torch.no_grad():
        q(x[:1], x[:1], x[:1], incremental_state=state)
    order = torch.tensor([1, 0])
    before = q._get_input_buffer(state)["prev_key"].clone()
    q.reorder_incremental_state(state, order)
    assert torch.equal(q._get_input_buffer(state)["prev_key"], before.index_select(0, order))


@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_a_sentence_of_padding_only_attends_nowhere_instead_of_nan(simulate):
    """fairseq's softmax gives NaN for a query whose every key is padded; the counterpart gives
    zero weights and a finite output in both simulations (the integer softmax's definition of
    such a row), and the other sentence what it gets beside an unpadded one."""
    from helpers import recipe_with

    x, mem, pad = _inputs()
    q = qswap.convert(_mha(), recipe_with("w8a8", simulate))
    qswap.calibrate(q, [(x, mem)], forward=lambda m, b: m(b[0], b[1], b[1], key_padding_mask=pad))
    empty = pad.clone()
    empty[1] = True
    with torch.no_grad():
        ref, _ = _mha()(x, mem, mem, key_padding_mask=empty)
        out, w = q(x, mem, mem, key_padding_mask=empty, need_head_weights=True)
        beside, _ = q(x, mem, mem, key_padding_mask=torch.zeros_like(pad))
    assert ref[:, 1].isnan().all()  # fairseq's own arithmetic
    assert torch.isfinite(out).all() and w[:, 1].abs().sum() == 0
    assert torch.equal(out[:, 0], beside[:, 0])  # sentence 0 has no padding either way
