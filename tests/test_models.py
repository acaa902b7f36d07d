"""qswap.models: the builders build the fairseq model asked for."""
import warnings

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.models import build_wav2vec2_ctc, build_wav2vec2_ctc_registered, wav2vec2_net_input  # noqa: E402

# the wav2vec 2.0 conformer layer: fairseq's MultiheadAttention (its default) or ESPnet's, abs positions
# (with rel_pos or rope, fairseq's ConformerEncoder.build_encoder_layer takes no layer_idx and fails)
CONFORMER = {"fairseq_attention": {}, "espnet_attention": {"attn_type": "espnet"}}


def _layers(model):
    return model.w2v_encoder.w2v_model.encoder.layers


@pytest.mark.parametrize("attention", sorted(CONFORMER))
def test_wav2vec2_ctc_builds_the_conformer_layers_asked_for(attention):
    """fairseq's Wav2VecEncoder replaces the model's layer_type (and adp_*) with its CTC config's
    (default "transformer"): the builder passes the asked value through the CTC config."""
    model = build_wav2vec2_ctc(layer_type="conformer", **CONFORMER[attention])
    assert [type(layer).__name__ for layer in _layers(model)] == ["ConformerWav2Vec2EncoderLayer"] * 2
    assert model.w2v_encoder.w2v_model.cfg.layer_type == "conformer"
    espnet = attention == "espnet_attention"
    assert type(_layers(model)[0].self_attn).__name__ == ("ESPNETMultiHeadedAttention" if espnet else "MultiheadAttention")
    assert {type(layer).__name__ for layer in _layers(build_wav2vec2_ctc())} == {"TransformerSentenceEncoderLayer"}


def test_wav2vec2_ctc_passes_the_adapter_fields_and_the_finetuning_configs_stay_transformer():
    model = build_wav2vec2_ctc(layer_type="trf_adp", adp_num=3, adp_dim=8, adp_trf_idx="1:2")
    assert [type(layer).__name__ for layer in _layers(model)] == ["TransformerSentenceEncoderLayer",
                                                                   "TransformerSentenceEncoderWithAdapterLayer"]
    assert (_layers(model)[1].adapter_num, _layers(model)[1].adapter_dim) == (3, 8)
    shipped = build_wav2vec2_ctc_registered("wav2vec2_large", finetuning="vox_100h", encoder_layers=1)
    assert type(_layers(shipped)[0]).__name__ == "TransformerSentenceEncoderLayer"
    assert _layers(shipped)[0].layer_norm_first


@pytest.mark.parametrize("attention", sorted(CONFORMER))
def test_wav2vec2_conformer_ctc_w8a8_is_honest(attention):
    model, net_input = build_wav2vec2_ctc(layer_type="conformer", **CONFORMER[attention]), wav2vec2_net_input()
    qmodel = qswap.convert(model, "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batch never takes keep observing
        qswap.calibrate(qmodel, [net_input])
    report = qmodel.qswap_report
    assert report.by_action("float") == [], [(e.path, e.reason) for e in report.by_action("float")]
    assert "ConformerWav2Vec2EncoderLayer" in {e.float_class for e in report.by_action("quantized")}
    audit = qswap.audit(qmodel, net_input)
    assert audit.honest, [(v.module, v.op, v.operand) for v in audit.violations][:10]
    assert all(p.compute > 0 for p in audit.coverage)
    with torch.no_grad():
        assert torch.isfinite(qmodel(**net_input)["encoder_out"]).all()
