"""A real fairseq s2t_transformer with the ``hadamard`` transform (per-head rotations folded,
an online Walsh-Hadamard transform before every fc2): its integer form (issue 19 item 1: every
strategy integer-implementable) runs on integers only, decodes the fake-quant model's logits
codes, and round-trips through the integer export."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq_testkit import assert_logits_codes_are_the_integer_models  # noqa: E402
from qswap.nn.hadamard import QRotatedLinear  # noqa: E402


W4A8_HADAMARD = {"version": 1, "name": "w4a8_hadamard_t",
                 "defaults": {"weight": {"bits": 4, "granularity": "per_channel", "axis": 0},
                              "activation": {"bits": 8, "symmetric": False}},
                 "rules": [{"match": {"class": ["LayerNorm"]},
                            "weight": {"bits": 8, "granularity": "per_tensor", "axis": None}},
                           {"match": {"class": "Hadamard"},
                            "weight": {"bits": 2, "granularity": "per_tensor", "axis": None}}],
                 "transforms": [{"hadamard": {"block": 16}}]}


@pytest.fixture(scope="module")
def rotated():
    from qswap.models import build_s2t_transformer, s2t_net_input
    model = build_s2t_transformer(seed=0, encoder_normalize_before=True, decoder_normalize_before=True,
                                  encoder_embed_dim=64, decoder_embed_dim=64, encoder_ffn_embed_dim=192,
                                  decoder_ffn_embed_dim=192, encoder_attention_heads=4, decoder_attention_heads=4)
    net_input = s2t_net_input(vocab=40, frames=48, seed=1)
    qmodel = qswap.convert(model, W4A8_HADAMARD, data=[net_input])
    qswap.calibrate(qmodel, [net_input])
    return qmodel, qswap.integerize(qmodel), net_input


def test_every_fc2_is_rotated_and_integerized_as_a_chain(rotated):
    qmodel, imodel, _ = rotated
    layers = [*qmodel.encoder.transformer_layers, *qmodel.decoder.layers]
    assert layers and all(isinstance(layer.fc2, QRotatedLinear) for layer in layers)
    assert all(layer.integer_refusal() is None for layer in qmodel.encoder.transformer_layers)
    chains = [m.fc2 for m in imodel.modules() if type(m).__name__.startswith("IntegerTransformer")]
    assert len(chains) == len(layers)
    assert all([type(op).__name__ for op in fc2] == ["IntegerHadamard", "IntegerLinear"] for fc2 in chains)


def test_the_rotated_model_runs_on_integers_only(rotated):
    from qswap.honesty.integer import check_integer
    _, imodel, net_input = rotated
    report = check_integer(imodel, net_input)
    assert report.ok, [str(r) for r in report.findings[:5]]


def test_simulated_logits_codes_are_the_integer_models(rotated):
    """``simulate: integer``: teacher-forced and step by step, every logits code of the
    fake-quant model with the rotation is the integer model's."""
    qmodel, imodel, net_input = rotated
    assert_logits_codes_are_the_integer_models(qmodel, imodel, net_input)


def test_the_rotated_integer_model_round_trips_through_the_export(rotated, tmp_path):
    from qswap.export.integer_format import write_integer_model
    from qswap.export.integer_load import load_integer_model
    _, imodel, net_input = rotated
    write_integer_model(imodel, tmp_path)
    loaded = load_integer_model(tmp_path).model
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net_input)) for m in (imodel, loaded)]
    assert torch.equal(codes[0], codes[1])


def test_the_rotated_model_audits_honest(rotated):
    qmodel, _, net_input = rotated
    report = qswap.audit(qmodel, net_input)
    assert report.honest, report.violations[:3]


def test_a_hook_on_the_rotated_fc2_still_runs(rotated):
    """The layer calls a rotated fc2 as a module (its two ops told their readers inside): a hook
    watching fc2 sees every call, and a pre-hook's change of its input is what the ops read."""
    qmodel, _, net_input = rotated
    fc2 = qmodel.encoder.transformer_layers[0].fc2
    calls = []
    handles = [fc2.register_forward_hook(lambda module, args, out: calls.append(out.shape)),
               fc2.register_forward_pre_hook(lambda module, args: (args[0] * 0,))]
    try:
        with torch.no_grad():
            hooked = qmodel.encoder(net_input["src_tokens"], net_input["src_lengths"])["encoder_out"][0]
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain = qmodel.encoder(net_input["src_tokens"], net_input["src_lengths"])["encoder_out"][0]
    assert len(calls) == 1
    assert not torch.equal(hooked, plain)  # the pre-hook zeroed fc2's input
