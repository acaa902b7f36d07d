"""qswap.integration.site_error: per-site SQNR of a calibrated fairseq model's activation quantizers."""
import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.integration.site_error import site_name, site_sqnr  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402


def _sqnr(recipe):
    x = s2t_net_input(vocab=40, frames=48)
    qmodel = qswap.convert(build_s2t_transformer(), recipe)
    qswap.calibrate(qmodel, [x])
    return site_sqnr(qmodel, [x])


def test_site_names():
    assert site_name("encoder.transformer_layers.0.self_attn.core.softmax_out_quant") == "softmax_out"
    assert site_name("encoder.subsample.glu_quant.1") == "glu"


def test_fewer_bits_lose_about_six_db_a_bit_on_every_site():
    w8, w4 = _sqnr("w8a8"), _sqnr("w4a4")
    assert {"input", "softmax_out", "attn_residual", "ffn_act", "glu"} <= set(w8)
    assert set(w8) == set(w4)
    for site in w8:
        assert w8[site] > w4[site] + 10, site  # 4 bits fewer: about 24 dB on a uniform grid
