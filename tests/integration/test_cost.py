"""qswap.integration.cost: MACs and BOPs of one forward, weighted by the operands' quantizer widths."""
import warnings

import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from helpers import recipe_with  # noqa: E402
from qswap.integration.cost import measure  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402


@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_every_mac_of_w8a8_weighs_8_by_8_bits_whatever_the_simulation(simulate):
    """``simulate: integer`` runs its GEMMs on codes it derives from the quantizers' outputs; the
    count still reads the quantizers' widths (it runs the float insides)."""
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(seed=0), recipe_with("w8a8", simulate))
        qswap.calibrate(q, [net_input])
    cost = measure(q, lambda m: m(**net_input), audio_seconds=1.0)
    assert cost.macs > 0 and cost.bops == pytest.approx(64 * cost.macs)
    assert all(m.simulate == simulate for m in q.modules() if hasattr(m, "simulate"))  # restored


def test_the_float_model_counts_32_bit_operands():
    net_input = s2t_net_input()
    model = build_s2t_transformer(seed=0).eval()
    cost = measure(model, lambda m: m(**net_input), audio_seconds=2.0)
    assert cost.bops == pytest.approx(32 * 32 * cost.macs)
    assert cost.macs > 0 and cost.macs_per_second == pytest.approx(cost.macs / 2.0)


def _linear_recipe(**weight):
    return {"version": 1, "defaults": {"weight": weight, "activation": {"bits": 8}}}


def test_a_weights_stored_size_counts_its_grids():
    import torch
    from qswap.integration.cost import grid_count, parameter_bytes

    model = torch.nn.Sequential(torch.nn.Linear(48, 6, bias=False))
    sizes = {}
    for name, weight in {"tensor": {"bits": 4},
                         "channel": {"bits": 4, "granularity": "per_channel", "axis": 0},
                         "group": {"bits": 4, "granularity": "per_group", "group_size": 16},
                         "affine_group": {"bits": 4, "granularity": "per_group", "group_size": 16,
                                          "symmetric": False}}.items():
        qmodel = qswap.convert(model, _linear_recipe(**weight))
        spec = qmodel[0].weight_quant.spec
        sizes[name] = (grid_count(spec, model[0].weight.shape), parameter_bytes(qmodel)[1])
    codes = 48 * 6 * 4 // 8  # 144 bytes of 4-bit codes
    assert sizes["tensor"] == (1, codes + 4)
    assert sizes["channel"] == (6, codes + 6 * 4)
    # rows of 48 inputs in blocks of 16: 3 groups a row
    assert sizes["group"] == (18, codes + 18 * 4)
    assert sizes["affine_group"] == (18, codes + (18 * (32 + 4)) // 8)


def test_groups_of_16_store_six_bits_a_4_bit_weight():
    import torch
    from qswap.integration.cost import parameter_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    qmodel = qswap.convert(model, _linear_recipe(bits=4, granularity="per_group", group_size=16))
    assert parameter_bytes(qmodel)[1] * 8 == 64 * 32 * 6


def test_learned_scales_are_sized_as_grids_not_as_float_weights():
    import torch
    from qswap.integration.cost import parameter_bytes

    model = torch.nn.Sequential(torch.nn.Linear(48, 6, bias=False))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 4, "granularity": "per_channel", "axis": 0},
                                         "activation": {"bits": 8, "learnable": True}}}
    qmodel = qswap.convert(model, recipe)
    before = parameter_bytes(qmodel)
    qswap.calibrate(qmodel, [torch.randn(3, 48)])  # sets the learned activation scale (a Parameter)
    assert any(p.numel() for n, p in qmodel.named_parameters() if n.endswith("scale"))
    assert parameter_bytes(qmodel) == before == (48 * 6 * 4, 48 * 6 * 4 // 8 + 6 * 4)


def test_a_tied_tensor_a_skipped_owner_reads_in_float_is_stored_in_float():
    """decoder.embed_tokens skipped, its weight tied to a quantized output projection: the
    embedding computes with the float32 values, so the model stores them in float32."""
    from qswap.integration.cost import parameter_bytes

    model = build_s2t_transformer(seed=0)
    tied = model.decoder.embed_tokens.weight
    assert tied is model.decoder.output_projection.weight
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8, "granularity": "per_channel", "axis": 0},
                                         "activation": {"bits": 8}}}
    quantized = parameter_bytes(qswap.convert(model, recipe))
    skipped = parameter_bytes(qswap.convert(model, {**recipe, "rules": [
        {"match": {"path": "decoder.embed_tokens"}, "skip": True}]}))
    assert skipped[0] == quantized[0]
    assert skipped[1] == quantized[1] + tied.numel() * (32 - 8) // 8  # the same grid, float32 values


def test_an_online_hadamard_matrix_is_sized_as_a_weight():
    """QHadamard's matrix is a buffer its ``matrix`` quantizer reads: its codes and grid are stored."""
    import torch
    from qswap.integration.cost import parameter_bytes
    from qswap.transforms.hadamard import Hadamard

    recipe = {"version": 1, "defaults": {"weight": {"bits": 2}, "activation": {"bits": 8}}}
    qmodel = qswap.convert(torch.nn.Sequential(torch.nn.ReLU(), Hadamard(64, 16)), recipe)
    assert parameter_bytes(qmodel) == (16 * 16 * 4, 16 * 16 * 2 // 8 + 4)  # 2-bit codes, one float32 scale


def test_the_float_model_counts_its_fused_attention_as_the_quantized_model_its_bmms():
    """fairseq's float self-attention runs torch's fused CPU kernel (not in torch's flop_registry);
    the quantized attention, explicit matmuls: one forward, the same MACs."""
    net_input = s2t_net_input()
    model = build_s2t_transformer(seed=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(model, "w8a8")
        qswap.calibrate(q, [net_input])
    float_cost = measure(model, lambda m: m(**net_input), audio_seconds=1.0)
    assert float_cost.macs == measure(q, lambda m: m(**net_input), audio_seconds=1.0).macs


def test_the_float_conformer_counts_its_batch_norm_as_the_quantized_one_its_convolution():
    """The quantized conformer's BatchNorm runs as a 1x1 depthwise convolution of folded weights
    (counted: C x T MACs a layer); the float one's native_batch_norm had counted nothing, so the
    MMAC/s of the fp32 and quantized rows had differed for this alone."""
    from qswap.models import build_s2t_conformer

    net_input = s2t_net_input()
    model = build_s2t_conformer().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(model, "w8a8")
        qswap.calibrate(q, [net_input])
    float_cost = measure(model, lambda m: m(**net_input), audio_seconds=1.0)
    assert float_cost.macs == measure(q.eval(), lambda m: m(**net_input), audio_seconds=1.0).macs
