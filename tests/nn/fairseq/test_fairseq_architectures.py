"""The three fairseq speech architectures (S2T transformer, S2T conformer with rel-pos ESPnet
attention, wav2vec 2.0 CTC), built from fairseq's own classes with small dimensions and random
weights: w8a8 converts every module, audits honest on every path, stays close to float, and
state_dicts round-trip (float -> converted, converted -> converted) with identical outputs."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq_testkit import (  # noqa: E402
    ARCHS, SEQ2SEQ, assert_identity_counterparts_match, build, convert_calibrated, log_probs, logits, run)
from helpers import sqnr_db  # noqa: E402

# Measured with `pytest tests/nn/fairseq -k sqnr -s` (seed 0): s2t_transformer 32.9 dB,
# s2t_conformer 32.1 dB, wav2vec2_ctc 25.0 dB (non-padded frames); the bound leaves a 5 dB margin.
SQNR_BOUND_DB = 20.0


@pytest.fixture(scope="module", params=sorted(ARCHS))
def case(request):
    """(arch, float model, net_input, w8a8 model calibrated on net_input)."""
    model, net_input = build(request.param)
    return request.param, model, net_input, convert_calibrated(model, net_input)


def test_w8a8_leaves_no_module_float(case):
    arch, _, _, qmodel = case
    report = qmodel.qswap_report
    assert report.by_action("float") == [], [(e.path, e.reason) for e in report.by_action("float")]
    assert report.by_action("skipped") == []
    classes = {e.float_class for e in report.by_action("quantized")}
    expected = {"s2t_transformer": {"S2TTransformerModel", "MultiheadAttention", "Conv1dSubsampler",
                                    "SinusoidalPositionalEmbedding", "TransformerDecoderLayerBase"},
                "s2t_conformer": {"RelPositionMultiHeadedAttention", "ConformerEncoderLayer",
                                  "BatchNorm1d", "S2TConformerEncoder"},
                "wav2vec2_ctc": {"Wav2VecCtc", "Wav2Vec2Model", "TransformerEncoder",
                                 "Fp32GroupNorm", "TransformerSentenceEncoderLayer"}}[arch]
    assert expected <= classes
    if arch in SEQ2SEQ:  # the decoder embedding and its tied output projection: one quantizer
        decoder = qmodel.decoder
        assert decoder.embed_tokens.weight is decoder.output_projection.weight
        assert decoder.embed_tokens.weight_quant is decoder.output_projection.weight_quant


def test_w8a8_audits_honest_on_every_path(case):
    arch, _, net_input, qmodel = case
    report = qswap.audit(qmodel, net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations]
    names = [getattr(p, "name", p) for p in report.paths]
    if arch in SEQ2SEQ:
        assert any(n.startswith("incremental decoding") for n in names), names
    assert report.totals["quantized"] > 0


@pytest.mark.parametrize("recipe", [None, "fp32"])
def test_float_and_fp32_models_are_not_honest(case, recipe):
    _, model, net_input, _ = case
    target = model if recipe is None else qswap.convert(model, recipe)
    assert not qswap.audit(target, net_input).honest


def test_w8a8_sqnr_against_float(case):
    arch, model, net_input, qmodel = case
    db = sqnr_db(logits(model, net_input), logits(qmodel, net_input))
    print(f"{arch}: logits SQNR {db:.1f} dB")
    assert db > SQNR_BOUND_DB
    assert sqnr_db(log_probs(model, net_input), log_probs(qmodel, net_input)) > SQNR_BOUND_DB


def test_identity_quantizers_compute_what_fairseq_computes(case):
    """Every counterpart with its quantizers left out: the re-implemented forwards (layers,
    encoders, wav2vec 2.0, CTC masking) are fairseq's, to float32 rounding."""
    _, model, net_input, _ = case
    assert_identity_counterparts_match(model, net_input)


def test_float_state_dict_loads_into_converted_model(case):
    """Weights changed after calibration come back from a float state_dict (strict: quantizer
    buffers missing from it keep their calibrated values); outputs are identical."""
    _, model, net_input, qmodel = case
    before = run(qmodel, net_input)
    with torch.no_grad():
        for p in qmodel.parameters():
            p.mul_(0.5).add_(0.01)
    changed = run(qmodel, net_input)
    assert not torch.equal(changed[0], before[0])
    qmodel.load_state_dict(model.state_dict(), strict=True)
    for a, b in zip(before, run(qmodel, net_input)):
        assert torch.equal(a, b)


def test_converted_state_dict_loads_into_another_converted_model(case):
    """A converted, calibrated state_dict into a fresh conversion of a different float model."""
    arch, _, net_input, qmodel = case
    other = qswap.convert(build(arch, seed=1)[0], "w8a8")
    other.load_state_dict(qmodel.state_dict(), strict=True)
    for a, b in zip(run(qmodel, net_input), run(other, net_input)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_input_is_a_data_error_in_both_simulate_modes(case, bad):
    """As the integer model's input step refuses it (``qswap.nn.base.check_finite_input``): a NaN
    has no code, and cast to an integer it became an arbitrary one, which the default ``simulate:
    integer`` decoded into finite logits as if it were speech."""
    from qswap.errors import DataError
    from qswap.nn.simulate import simulating
    _, _, net_input, qmodel = case
    key = "source" if "source" in net_input else "src_tokens"
    broken = dict(net_input, **{key: net_input[key].clone()})
    broken[key].view(-1)[3] = bad
    for mode in ("integer", "float"):
        with simulating(qmodel, mode), pytest.raises(DataError, match="holds NaN or \\+-inf"):
            logits(qmodel, broken)
    assert torch.isfinite(logits(qmodel, net_input)).all()
