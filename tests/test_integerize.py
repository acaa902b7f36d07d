"""qswap.integerize on chains of counterparts (issue 16): integer execution agrees with the
fake-quant model, every compute op runs on integer dtypes, and unsupported modules are named."""
import pytest
import torch
from torch import nn

import qswap
from qswap.errors import IntegerizeError
from qswap.honesty.integer import check_integer
from helpers import assert_only_near_ties_differ
from qswap.quant.integer import Grid


def calibrated(model, x, recipe="w8a8"):
    q = qswap.convert(model.eval(), recipe)
    qswap.calibrate(q, [x, x.flip(0)])
    return q


def boundary_codes(qmodel, imodel, x):
    """(integer codes, fake-quant codes) at the input of every op after the first."""
    seen = []
    consumers = [getattr(qmodel, name) for name in imodel.names[1:]]
    hooks = [c.input_quant.register_forward_hook(lambda m, a, o, c=c: seen.append(Grid.of(c.input_quant).quantize(o)))
             for c in consumers]
    with torch.no_grad():
        qmodel(x)
    for h in hooks:
        h.remove()
    codes, integer = imodel.quantize_input(x), []
    for layer in imodel.layers[:-1]:
        codes = layer(codes)
        integer.append(codes)
    return integer, seen


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.LayerNorm(32),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel", "w4a8"])
def test_integer_chain_agrees_with_the_fake_quant_model(recipe):
    x = torch.randn(16, 32) * 2
    q = calibrated(mlp(), x, recipe)
    imodel = qswap.integerize(q)
    for integer, reference in zip(*boundary_codes(q, imodel, x)):
        assert integer.dtype == reference.dtype
        diff = (integer.long() - reference.long()).abs()
        assert int(diff.max()) <= 1
        assert float((diff == 0).float().mean()) > 0.99
    with torch.no_grad():
        steps = ((imodel(x) - q(x)).abs() / imodel.layers[-1].acc_scale)  # last accumulator's grid
    assert float(steps.median()) < 1  # most outputs: same codes in, same accumulator out
    codes = imodel.quantize_input(x)
    assert codes.dtype == torch.int8 or codes.dtype == torch.uint8
    assert imodel.forward_codes(codes).dtype == torch.int32


def test_every_compute_op_is_integer_and_the_float_steps_are_declared():
    x = torch.randn(4, 32)
    imodel = qswap.integerize(calibrated(mlp(), x))
    report = check_integer(imodel, x)
    assert report.ok, [str(r) for r in report.findings]
    assert report.dtypes() <= {"int8", "uint8", "int16", "int32", "int64", "bool"}
    assert {r.phase for r in report.declared} == {"quantize_input", "dequantize_output"}
    assert {r.module for r in report.compute_ops} >= {"layers.0", "layers.1", "layers.2", "layers.3", "layers.4"}


def test_a_float_op_inside_is_a_finding_named_with_its_module():
    x = torch.randn(4, 32)
    imodel = qswap.integerize(calibrated(mlp(), x))
    layer = imodel.layers[1]
    imodel.layers[1] = nn.Sequential(layer)  # same codes, plus a float detour below
    imodel.layers[1].register_forward_hook(lambda m, a, o: (o.float() * 1.0).to(o.dtype))
    report = check_integer(imodel, x)
    assert not report.ok
    assert any(r.module == "layers.1" and r.op == "mul" for r in report.findings)


@pytest.mark.parametrize("seed", range(4))
def test_embedding_first(seed):
    torch.manual_seed(seed)  # seed 2 gives near-ties: s_w / s_out ~ 51 / 38
    tokens = torch.randint(0, 50, (3, 7))
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    q = qswap.convert(model.eval(), "w8a8")
    qswap.calibrate(q, [tokens])
    imodel = qswap.integerize(q)
    (integer,), (reference,) = boundary_codes(q, imodel, tokens)
    assert_only_near_ties_differ(integer, reference, imodel.layers[0].codes[tokens].double()
                                 * float(q[0].weight_quant.scale) / Grid.of(q[1].input_quant).scale)
    assert check_integer(imodel, tokens).ok


def test_unsupported_modules_are_each_named():
    x = torch.randn(4, 16)
    q = calibrated(nn.Sequential(nn.Linear(16, 16), nn.LogSoftmax(-1), nn.Linear(16, 8), nn.Unflatten(1, (8, 1)),
                               nn.Conv1d(8, 8, 1), nn.Flatten(), nn.Linear(8, 8)), x)
    with pytest.raises(IntegerizeError) as info:
        qswap.integerize(q)
    message = str(info.value)
    assert "1 (QLogSoftmax): LogSoftmax has no integer form yet" in message
    assert "3 (Unflatten): no integer form yet" in message and "5 (Flatten): no integer form yet" in message
    q2 = calibrated(nn.Sequential(nn.Linear(16, 16), nn.GELU()), x)
    with pytest.raises(IntegerizeError, match="end in a Linear"):
        qswap.integerize(q2)
    with pytest.raises(IntegerizeError, match="no whole-model integer form yet; integerized so far"):
        qswap.integerize(calibrated(nn.Linear(16, 4), x))


def test_a_model_the_recipe_left_float_is_refused_naming_its_modules():
    """A whole model (fairseq's S2T transformer) converted with ``fp32`` keeps its float encoder and
    decoder: IntegerizeError naming both and the recipe, not an AttributeError from inside."""
    from qswap.models import build_s2t_transformer

    with pytest.raises(IntegerizeError) as info:
        qswap.integerize(qswap.convert(build_s2t_transformer(seed=0), "fp32"))
    message = str(info.value)
    assert "encoder (S2TTransformerEncoder): left float by recipe fp32" in message
    assert "decoder (TransformerDecoderScriptable): left float by recipe fp32" in message


def test_an_uncalibrated_model_is_refused():
    q = qswap.convert(mlp().eval(), "w8a8")
    with pytest.raises(IntegerizeError, match="no grid"):
        qswap.integerize(q)


def test_a_forward_does_not_calibrate_a_model_for_integerize():
    """One forward after convert gives every observer a range that follows its input (nothing
    frozen): integerize had baked those ranges in, a model other than the fake-quant one."""
    from qswap.models import build_s2t_transformer, s2t_net_input

    q = qswap.convert(build_s2t_transformer(seed=0), "w8a8")
    with torch.no_grad():
        q(**s2t_net_input(2, 40, seed=0))
    with pytest.raises(IntegerizeError, match="an uncalibrated activation quantizer .* no grid.*calibrate the model"):
        qswap.integerize(q)
    qswap.calibrate(q, [s2t_net_input(2, 40, seed=0)])
    assert qswap.integerize(q) is not None


def test_a_whole_model_names_the_module_whose_integer_form_fails():
    """A form refused deep in the integer arithmetic (16-bit weights: accumulators beyond int32)
    is reported with the path and type of the counterpart that asked for it."""
    import re

    from qswap.models import build_s2t_transformer, s2t_net_input

    wide = {"version": 1, "name": "w16a16", "defaults": {
        "weight": {"bits": 16, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
        "activation": {"bits": 16, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}}}
    q = qswap.convert(build_s2t_transformer(seed=0), wide)
    qswap.calibrate(q, [s2t_net_input(seed=1)])
    with pytest.raises(IntegerizeError) as info:
        qswap.integerize(q)
    match = re.match(r"cannot integerize the model:\n  (\S+) \((\w+)\): \S", str(info.value))
    assert match, str(info.value)
    modules = dict(q.named_modules())
    assert match.group(1) in modules and type(modules[match.group(1)]).__name__ == match.group(2)


def test_activation_rounding_without_an_integer_form_is_refused_and_simulated_in_float():
    """``rounding: floor`` (or ``half_away``) on activations: every integer op requantizes to the
    nearest code, so such grids have no integer form. integerize refuses, naming a quantizer and
    what to change; ``simulate: integer`` computes every op reading them in float, as ``simulate:
    float`` does (the integer model and the simulation had differed by up to 0.08 in the logits)."""
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.nn.simulate import simulating

    floor = {"version": 1, "name": "w8a8_floor", "defaults": {
        "weight": {"bits": 8, "granularity": "per_channel", "axis": 0},
        "activation": {"bits": 8, "symmetric": False, "rounding": "floor"}}}
    q = qswap.convert(build_s2t_transformer(seed=0), floor)
    qswap.calibrate(q, [s2t_net_input(seed=1)])
    with pytest.raises(IntegerizeError, match=r"\n  \S+ \(FakeQuantize\): an activation grid rounding 'floor' has no "
                                              r"integer form.*use rounding: half_even"):
        qswap.integerize(q)
    net_input = s2t_net_input(seed=2)
    with torch.no_grad():
        simulated = q(**net_input)[0]
        with simulating(q, "float"):
            assert torch.equal(q(**net_input)[0], simulated)


def test_a_float_chain_names_its_modules_as_float_not_as_ending_wrong():
    """A chain never converted (or converted with fp32) had read "2 (Linear): the chain must end in a
    Linear" and "no integer form yet" for each module (the last one twice)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    for chain in (model, qswap.convert(model, "fp32")):
        with pytest.raises(IntegerizeError) as info:
            qswap.integerize(chain)
        message = str(info.value)
        assert "must end in a Linear" not in message and message.count("2 (Linear)") == 1
        assert "0 (Linear): left float (not converted, or left so by the recipe)" in message


def test_a_disabled_quantizer_is_named_as_disabled():
    """A quantizer switched off (a sensitivity probe, a caller) had been reported as a site the recipe
    leaves float."""
    x = torch.randn(4, 16)
    q = calibrated(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), x)
    q[2].input_quant.enabled = False
    with pytest.raises(IntegerizeError, match=r"a disabled activation quantizer \(.*, enabled=False\) has no grid.*"
                                              r"enable it again"):
        qswap.integerize(q)


def test_a_weight_only_s2t_model_is_told_its_recipe_quantizes_no_activation():
    """w8_weight_only: the first activation site met (a decoder key) had been named alone."""
    from qswap.models import build_s2t_transformer

    model = build_s2t_transformer(encoder_layers=1, decoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                  decoder_ffn_embed_dim=64, conv_channels=32)
    with pytest.raises(IntegerizeError, match="recipe w8_weight_only quantizes no activation .every activation site "
                                              "left float."):
        qswap.integerize(qswap.convert(model, "w8_weight_only"))
