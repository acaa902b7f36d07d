"""Every registered counterpart declares the kind of each quantizer site, and the declaration is
true: a "weight" site quantizes a parameter, buffer or constant (the same tensor whatever the
input), an "activation" site a tensor computed at run time; each takes the recipe's spec of its
kind, also when a recipe's ``sites:`` entry names it; every parameter is sized by its quantizer."""
import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq.modules import PositionalEmbedding  # noqa: E402
from fairseq.modules.conformer_layer import ConformerWav2Vec2EncoderLayer  # noqa: E402
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase  # noqa: E402
from fairseq_testkit import E, Call, build, transformer_config  # noqa: E402
from qswap.integration.cost import grid_bits, parameter_bytes  # noqa: E402
from qswap.nn.base import SITE_KINDS, QuantModule, param_quantizer  # noqa: E402
from qswap.nn.registry import REGISTRY  # noqa: E402
from qswap.quant.bias import BiasQuantize  # noqa: E402
from qswap.quant.fake_quantize import FakeQuantize  # noqa: E402
from qswap.transforms.hadamard import Hadamard, rotate_ffn  # noqa: E402

W_BITS, A_BITS = 4, 8  # a quantizer's bits tell which spec it took


def _recipe():
    """Every declared site named in ``sites:`` with a partial entry, merged over its kind's spec."""
    names = sorted({site for cls in REGISTRY.values() for site in cls.sites})
    return {"version": 1, "name": "kinds",
            "defaults": {"weight": {"bits": W_BITS, "observer": "minmax"},
                         "activation": {"bits": A_BITS, "symmetric": False},
                         "sites": {site: {"rounding": "half_away"} for site in names}}}


def _seq(*args, **kwargs):
    return lambda: torch.randn(*args, **kwargs)


def _torch_cases():
    mha = nn.MultiheadAttention(E, 4, add_bias_kv=True)
    float_mask = torch.randn(5, 5)  # an additive float mask: the attn_bias site
    conv = nn.utils.weight_norm(nn.Conv1d(E, E, 5, padding=2, groups=4), name="weight", dim=2)
    bn = nn.BatchNorm1d(E).eval()
    with torch.no_grad():
        rotated = rotate_ffn(nn.Linear(E, 8), 4)  # the hadamard transform's fc2: a RotatedLinear
    cases = {
        "Linear": (nn.Linear(E, 8), {"input": _seq(3, E)}),
        "Conv2d": (nn.Conv2d(2, 4, 3), {"input": _seq(1, 2, 8, 8)}),
        "weight_normed_Conv1d": (conv, {"input": _seq(2, E, 9)}),
        "Embedding": (nn.Embedding(20, E), {"input": lambda: torch.randint(0, 20, (2, 5))}),
        "LayerNorm": (nn.LayerNorm(E), {"input": _seq(3, E)}),
        "GroupNorm": (nn.GroupNorm(4, E), {"input": _seq(2, E, 6)}),
        "BatchNorm1d": (bn, {"input": _seq(2, E, 6)}),
        "Hadamard": (Hadamard(E, 4), {"input": _seq(3, E)}),
        "RotatedLinear": (rotated, {"input": _seq(3, E)}),
        "MultiheadAttention": (mha, {"query": _seq(5, 2, E), "key": _seq(5, 2, E), "value": _seq(5, 2, E),
                                     "attn_mask": lambda: float_mask}),
    }
    for act in (nn.ReLU(), nn.GELU(), nn.SiLU(), nn.GLU(), nn.Tanh(), nn.Sigmoid(), nn.Softmax(-1),
                nn.LogSoftmax(-1)):
        cases[type(act).__name__] = (act, {"input": _seq(3, E)})
    # by keyword where a positional call would give the mask to another argument (torch's
    # attention: key_padding_mask comes before attn_mask)
    return {name: (Call(module.eval(), positional=name != "MultiheadAttention"), inputs)
            for name, (module, inputs) in cases.items()}


def _first_key_blocked():
    mask = torch.zeros(6, 6)
    mask[:, 0] = 1  # nonzero = blocked: fairseq turns it into an additive -1e8 (the attn_bias site)
    return mask


def _fairseq_cases():
    torch.manual_seed(0)
    normformer = TransformerDecoderLayerBase(transformer_config(scale_heads=True, scale_resids=True))
    post_norm = TransformerEncoderLayerBase(transformer_config())
    cases = {
        "normformer_decoder_layer": (normformer, {"x": _seq(4, 2, E), "encoder_out": _seq(7, 2, E)}),
        "encoder_layer_float_mask": (post_norm, {"x": _seq(6, 2, E), "encoder_padding_mask":
                                                 lambda: torch.zeros(2, 6, dtype=torch.bool),
                                                 "attn_mask": _first_key_blocked}),
        "wav2vec2_conformer_layer": (ConformerWav2Vec2EncoderLayer(E, 2 * E, 4, 0.0, False, 3, attn_type="espnet"),
                                     {"x": _seq(6, 2, E)}),
        "learned_positions": (PositionalEmbedding(64, E, padding_idx=1, learned=True),
                              {"input": lambda: torch.tensor([[2, 7, 8, 9]])}),
    }
    cases = {name: (Call(module.eval()), inputs) for name, (module, inputs) in cases.items()}
    models = {"s2t_transformer": ("s2t_transformer", {}),
              **{f"s2t_conformer_{pos}": ("s2t_conformer", {"pos_enc_type": pos}) for pos in ("abs", "rel_pos", "rope")},
              "wav2vec2_ctc": ("wav2vec2_ctc", {}),
              "wav2vec2_ctc_layer_norm": ("wav2vec2_ctc", {"extractor_mode": "layer_norm", "layer_norm_first": True})}
    for name, (arch, overrides) in models.items():
        model, net_input = build(arch, **overrides)
        cases[name] = (model, {k: (lambda v=v: v) for k, v in net_input.items()})
    return cases


CASES = {**_torch_cases(), **_fairseq_cases()}


def _inputs(case, noise: float) -> dict:
    """The case's inputs, floating ones (but masks) moved by ``noise`` (a second, different batch)."""
    out = {}
    for key, make in case[1].items():
        value = make()
        moved = value.is_floating_point() and "mask" not in key and noise
        out[key] = value + noise * torch.randn_like(value) if moved else value
    return out


def _quantizer_inputs(qmodel, inputs: dict) -> dict[str, list[torch.Tensor]]:
    """What every FakeQuantize is given in one forward, by its module path."""
    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def converted():
    return {name: qswap.convert(case[0], _recipe()) for name, case in CASES.items()}


def test_every_registered_counterpart_is_walked_and_declares_its_site_kinds(converted):
    built = {type(m) for q in converted.values() for m in q.modules() if isinstance(m, QuantModule)}
    assert set(REGISTRY.values()) - built == set()  # FusedLayerNorm registers only with apex
    for cls in set(REGISTRY.values()):
        assert isinstance(cls.sites, Mapping) and set(cls.sites.values()) <= set(SITE_KINDS), cls


@pytest.mark.parametrize("name", CASES)
def test_each_quantizer_takes_the_spec_of_its_declared_kind_and_the_kind_is_true(name, converted):
    qmodel = converted[name]
    quantizers = {n: m for n, m in qmodel.named_modules() if isinstance(m, (FakeQuantize, BiasQuantize))}
    assert quantizers
    for path, q in quantizers.items():
        if isinstance(q, BiasQuantize):
            assert q.kind == "bias", path
            continue
        assert q.kind in SITE_KINDS, path
        assert q.spec.bits == {"weight": W_BITS, "activation": A_BITS}[q.kind], (path, q.kind)
        assert q.spec.rounding == "half_away", path  # the recipe's site entry was applied
    first = _quantizer_inputs(qmodel, _inputs(CASES[name], 0.0))
    second = _quantizer_inputs(qmodel, _inputs(CASES[name], 0.5))
    state = [*qmodel.parameters(), *qmodel.buffers()]  # after the forwards: calibration sets buffers
    assert first
    for path, tensors in first.items():
        if quantizers[path].kind == "weight":  # the same tensor whatever the input: a constant
            assert all(torch.equal(a, b) for a, b in zip(tensors, second[path], strict=True)), path
        else:  # computed at run time, never a parameter or buffer itself
            assert not any(t is s for t in tensors for s in state), path


@pytest.mark.parametrize("name", CASES)
def test_every_parameter_is_sized_by_its_quantizer(name, converted):
    qmodel = converted[name]
    for module_name, module in qmodel.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            declared = getattr(type(module), "param_quantizers", {})
            if declared.get(pname, "") is None:
                continue  # declared unused at inference
            quant = param_quantizer(module, pname)
            assert isinstance(quant, (FakeQuantize, BiasQuantize)), f"{module_name}.{pname}"


def test_weight_normed_positional_conv_is_counted_at_its_quantizer_width(converted):
    qmodel = converted["wav2vec2_ctc"]
    conv = qmodel.w2v_encoder.w2v_model.encoder.pos_conv[0]
    assert {"weight_g", "weight_v"} <= {n for n, _ in conv.named_parameters(recurse=False)}
    normed = conv.weight_g.numel() + conv.weight_v.numel()
    _, quantized = parameter_bytes(qmodel)
    conv.weight_quant.enabled = False
    try:
        _, with_float_conv = parameter_bytes(qmodel)
    finally:
        conv.weight_quant.enabled = True
    grids = grid_bits(conv.weight_quant.spec, conv.weight_v.shape)  # once, by the weight it quantizes
    assert with_float_conv - quantized == (normed * (32 - W_BITS) - grids) // 8
