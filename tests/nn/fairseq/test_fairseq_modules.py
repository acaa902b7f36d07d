"""The other fairseq counterparts, one by one: exact with identity quantizers, honest with w8a8
(options the three small architectures do not take: NormFormer scales, post-norm layers,
attention masks, learned positions, CTC blank weights, the wav2vec 2.0 layer-norm extractor)."""
import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq.models.speech_to_text.modules.convolution import Conv1dSubsampler  # noqa: E402
from fairseq.modules import PositionalEmbedding  # noqa: E402
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase  # noqa: E402
from fairseq_testkit import NO_QUANT, E, Call, build, convert_calibrated, run, transformer_config  # noqa: E402
from helpers import sqnr_db  # noqa: E402
from qswap.models import wav2vec2_net_input  # noqa: E402

def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _exact_and_honest(module, inputs: dict, bound_db: float = 20.0, positional: bool = False):
    """Identity quantizers reproduce ``module``; w8a8 stays within ``bound_db`` and is honest."""
    wrapped = Call(module.eval(), positional)
    with torch.no_grad():
        ref = wrapped(**inputs)
        _close(qswap.convert(wrapped, NO_QUANT)(**inputs), ref)
        q = qswap.convert(wrapped, "w8a8")
        q(**inputs)  # observe once
        assert sqnr_db(ref, q(**inputs)) > bound_db
    report = qswap.audit(q, inputs)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]
    return q


def test_post_norm_encoder_layer_with_attention_mask_and_fc_result():
    cfg = transformer_config(activation_fn="gelu")
    cfg.encoder.normalize_before = False
    torch.manual_seed(0)
    layer = TransformerEncoderLayerBase(cfg, return_fc=True)
    x = torch.randn(6, 2, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.zeros(6, 6)
    mask[:, 0] = 1  # nonzero = blocked (fairseq fills it with -1e8)
    _exact_and_honest(layer, {"x": x, "encoder_padding_mask": pad, "attn_mask": mask})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("normalize_before", [False, True])
def test_encoder_layer_attention_mask_blocking_a_whole_row_computes_what_fairseq_does(dtype, normalize_before):
    """fairseq fills a float mask's nonzero positions with -1e8 (a row blocked everywhere: near
    uniform) and passes a bool mask on (torch's attention: zero probabilities in such a row); a
    row blocked by the mask and the padding together too. The counterpart's -inf block would give
    NaN there, which spreads through the next layers."""
    cfg = transformer_config()
    cfg.encoder.normalize_before = normalize_before
    torch.manual_seed(0)
    layer = TransformerEncoderLayerBase(cfg)
    x = torch.randn(6, 2, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.zeros(6, 6)
    mask[0, :] = 1  # row 0 blocked everywhere
    mask[2, :4] = 1  # row 2: its open keys are sentence 1's padding
    mask[3, 1] = 1  # a partial row
    q = _exact_and_honest(layer, {"x": x, "encoder_padding_mask": pad, "attn_mask": mask.to(dtype)})
    with torch.no_grad():
        assert torch.isfinite(q(x=x, encoder_padding_mask=pad, attn_mask=mask.to(dtype))).all()


def test_normformer_decoder_layer():
    """scale_heads (c_attn), scale_resids (w_resid), scale_attn / scale_fc (extra LayerNorms)."""
    cfg = transformer_config(scale_heads=True, scale_resids=True, scale_attn=True, scale_fc=True)
    cfg.decoder.normalize_before = True
    torch.manual_seed(0)
    layer = TransformerDecoderLayerBase(cfg)
    with torch.no_grad():  # non-trivial scales
        layer.c_attn.uniform_(0.5, 1.5)
        layer.w_resid.uniform_(0.5, 1.5)
    x, enc = torch.randn(4, 2, E), torch.randn(7, 2, E)
    _exact_and_honest(layer, {"x": x, "encoder_out": enc,
                              "self_attn_mask": torch.triu(torch.full((4, 4), float("-inf")), 1)})


def test_conv1d_subsampler_integer_lengths_match_fairseq():
    torch.manual_seed(0)
    module = Conv1dSubsampler(20, 16, E, [5, 5])
    q = qswap.convert(module, NO_QUANT)
    lengths = torch.arange(0, 200)
    assert torch.equal(q.get_out_seq_lens_tensor(lengths), module.get_out_seq_lens_tensor(lengths))


def test_positional_embeddings_batch_and_incremental():
    tokens = torch.tensor([[2, 7, 8, 9], [2, 5, 1, 1]])  # padding_idx 1
    for learned in (False, True):
        torch.manual_seed(0)
        module = PositionalEmbedding(64, E, padding_idx=1, learned=learned).eval()
        exact = qswap.convert(module, NO_QUANT)
        with torch.no_grad():
            _close(exact(tokens), module(tokens))
            _close(exact(tokens, incremental_state={}), module(tokens, incremental_state={}))
            if not learned:  # a sinusoidal table grows past its initial size
                longer = torch.full((2, 80), 3)
                _close(exact(longer), module(longer))
        q = qswap.convert(module, "w8a8")
        with torch.no_grad():
            assert sqnr_db(module(tokens), q(tokens)) > 30


def test_batch_norm_folds_into_a_depthwise_conv():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(E)
    with torch.no_grad():
        bn(torch.randn(8, E, 10) * 3 + 1)  # running statistics
    bn.eval()
    q = _exact_and_honest(bn, {"x": torch.randn(2, E, 10) * 3 + 1}, positional=True)
    x2 = torch.randn(4, E)
    with torch.no_grad():
        _close(qswap.convert(bn, NO_QUANT)(x2), bn(x2))  # (B, C) inputs too
        before = q(x=x2)
        q.module.running_var.mul_(4.0)  # a new fold after the buffer changes
        after = q(x=x2)
    assert not torch.equal(before, after)


def test_batch_norm_training_mode_updates_running_statistics_like_torch():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(E)
    q = qswap.convert(bn, NO_QUANT).train()
    x = torch.randn(8, E, 10)
    bn.train()(x)
    q(x)
    _close(q.running_mean, bn.running_mean)
    _close(q.running_var, bn.running_var)
    assert int(q.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_weight_normed_conv_keeps_weight_g_and_v():
    torch.manual_seed(0)
    conv = nn.utils.weight_norm(nn.Conv1d(E, E, 5, padding=2, groups=4), name="weight", dim=2)
    q = qswap.convert(conv, NO_QUANT)
    assert {"weight_g", "weight_v", "bias"} == set(q.state_dict())
    x = torch.randn(2, E, 9)
    with torch.no_grad():
        _close(q(x), conv(x))
        q.weight_v.mul_(-1.0)
        conv.weight_v.mul_(-1.0)
        _close(q(x), conv(x))  # the normed weight follows its sources


@pytest.mark.parametrize("blank_mode", ["add", "set"])
def test_ctc_blank_weight(blank_mode):
    model, net_input = build("wav2vec2_ctc")
    model.blank_weight, model.blank_mode = 0.7, blank_mode
    exact = qswap.convert(model, NO_QUANT)
    for ref, out in zip(run(model, net_input), run(exact, net_input)):
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(out))
        _close(out[finite], ref[finite])
    if blank_mode == "add":
        q = convert_calibrated(model, net_input)
        with torch.no_grad():
            q.get_normalized_probs(q(**net_input), log_probs=True)  # the blank-logits grid
        report = qswap.audit(q, net_input)
        assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def test_wav2vec2_layer_norm_extractor_and_pre_norm_layers():
    """extractor_mode="layer_norm" (TransposeLast + Fp32LayerNorm), layer_norm_first=True."""
    model, _ = build("wav2vec2_ctc", extractor_mode="layer_norm", layer_norm_first=True)
    net_input = wav2vec2_net_input()
    for ref, out in zip(run(model, net_input), run(qswap.convert(model, NO_QUANT), net_input)):
        finite = torch.isfinite(ref)
        _close(out[finite], ref[finite])
    q = convert_calibrated(model, net_input)
    assert q.qswap_report.by_action("float") == []
    report = qswap.audit(q, net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]


def _hook_containers(model, containers, fired):
    """On each container: a pre-hook that halves its input and a hook that records its call."""
    for name in containers:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:]))
        module.register_forward_hook(lambda m, args, out, name=name: fired.append(name))


@pytest.mark.parametrize("arch, containers", [
    ("wav2vec2_ctc", ("w2v_encoder.w2v_model.feature_extractor", "w2v_encoder.w2v_model.encoder.pos_conv")),
    ("s2t_conformer", ("encoder.conformer_layers.0.ffn1", "encoder.conformer_layers.0.conv_module",
                       "encoder.conformer_layers.0.ffn2")),
])
def test_hooks_on_containers_whose_children_a_counterpart_runs_still_run(arch, containers):
    """The converted wav2vec 2.0 model runs its feature extractor's and positional conv's ops
    itself, a conformer layer its feed-forwards' and convolution module's: hooks on those
    containers (a feature tap, a pre-hook that changes the input) had never run, so the converted
    model computed something else than the hooked float model, with no quantizer at all."""
    from fairseq_testkit import ARCHS
    build, net_input = ARCHS[arch]
    model, inputs = build(), net_input()
    converted = qswap.convert(model, NO_QUANT)
    outputs = {}
    for label, m in (("float", model), ("converted", converted)):
        fired = []
        _hook_containers(m, containers, fired)
        with torch.no_grad():
            out = m(**inputs)
        outputs[label] = out["encoder_out"][0] if isinstance(out, dict) else out[0]
        assert fired == list(containers), label
    torch.testing.assert_close(outputs["converted"], outputs["float"], atol=2e-6, rtol=0)


def test_a_backward_hook_on_such_a_container_is_a_convert_error():
    from fairseq_testkit import ARCHS
    from qswap.errors import ConvertError
    build, net_input = ARCHS["s2t_conformer"]
    converted = qswap.convert(build(), NO_QUANT)
    converted.encoder.conformer_layers[0].ffn1.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(ConvertError, match="a backward hook on FeedForwardModule"):
        converted(**net_input())
