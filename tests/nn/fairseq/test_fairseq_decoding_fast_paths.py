"""Incremental decoding's fast paths give the reference bits.

A decoding step calls every quantizer on a few rows, so the quantizers keep what they can
(``qswap.quant.stamp``: a frozen grid as Python numbers, a weight's fake-quantized copy, a bias's
int32 grid) and are called without ``nn.Module.__call__``'s frames (``DirectCall``). The
reference path is the same model with every kept value dropped before each quantizer call and
every module called through ``nn.Module.__call__`` (a global forward pre-hook does both): fairseq's
SequenceGenerator must give the same tokens and bit for bit the same scores on both, for every
shipped recipe; and a weight or a grid written in place after a decode is used by the next one.
"""
import copy
import warnings

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

pytest.importorskip("fairseq")

from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq_testkit import build  # noqa: E402

import qswap  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402
from qswap.quant.bias import BiasQuantize  # noqa: E402
from qswap.quant.fake_quantize import FakeQuantize  # noqa: E402
from qswap.recipe import shipped_recipe_names  # noqa: E402


def _forget(module, args):
    """A global pre-hook: the module is called through ``nn.Module.__call__`` and computes afresh."""
    if isinstance(module, FakeQuantize):
        module._cached = module._weight_stamp = module._state_stamp = None
    elif isinstance(module, BiasQuantize):
        module._key = module._cached = None


def _decode(q, net_input, beam=3, steps=5) -> list:
    generator = SequenceGenerator([q], q.decoder.dictionary, beam_size=beam, max_len_a=0, max_len_b=steps,
                                  min_len=steps)
    sample = {"net_input": {k: net_input[k] for k in ("src_tokens", "src_lengths")}}
    with torch.no_grad():
        hypos = generator.generate([q], sample)
    return [(h["tokens"], h["score"], h["positional_scores"]) for sentence in hypos for h in sentence]


def _reference(q, net_input) -> list:
    handle = register_module_forward_pre_hook(_forget)
    try:
        return _decode(q, net_input)
    finally:
        handle.remove()


def _assert_same_bits(ours: list, reference: list) -> None:
    assert len(ours) == len(reference)
    for (tokens, score, scores), (ref_tokens, ref_score, ref_scores) in zip(ours, reference):
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(score.view(torch.int32), ref_score.view(torch.int32))
        assert torch.equal(scores.view(torch.int32), ref_scores.view(torch.int32))


@pytest.fixture(scope="module")
def float_model():
    model, _ = build("s2t_transformer")
    return model.eval(), s2t_net_input(num_tokens=6)


def _converted(model, net_input, recipe):
    qmodel = qswap.convert(model, recipe, data=[net_input])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batch never takes keep observing
        if recipe != "fp32":
            qswap.calibrate(qmodel, [net_input])
    return qmodel.eval()


@pytest.mark.parametrize("recipe", shipped_recipe_names())
def test_decoding_gives_the_reference_bits_for_every_shipped_recipe(float_model, recipe):
    model, net_input = float_model
    q = _converted(model, net_input, recipe)
    first, second = _decode(q, net_input), _decode(q, net_input)  # caches filled, then used
    reference = _reference(q, net_input)
    _assert_same_bits(first, reference)
    _assert_same_bits(second, reference)


def test_integer_simulation_decodes_the_reference_bits(float_model):
    from qswap.nn.simulate import simulating

    model, net_input = float_model
    q = _converted(model, net_input, "w8a8")
    with simulating(q, "integer"):
        _assert_same_bits(_decode(q, net_input), _reference(q, net_input))


@pytest.mark.parametrize("where", ["weight", "grid"])
def test_a_tensor_written_in_place_after_a_decode_is_used_by_the_next(float_model, where):
    """In place (no_grad ``mul_``): the fast paths see the write through the version counter."""
    model, net_input = float_model
    q = _converted(model, net_input, "w8a8")
    before = _decode(q, net_input)
    layer = q.decoder.layers[0]
    with torch.no_grad():
        if where == "weight":
            layer.fc1.weight.mul_(-1.0)
            layer.self_attn.q_proj.weight.mul_(-2.0)
        else:
            layer.fc2.input_quant.scale.mul_(4.0)
            layer.self_attn.core.softmax_in_quant.scale.mul_(0.25)
    after = _decode(q, net_input)
    _assert_same_bits(after, _reference(copy.deepcopy(q), net_input))  # a copy keeps no cache
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(after, before))
