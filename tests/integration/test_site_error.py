"""qswap.integration.site_error: per-site SQNR of a calibrated fairseq model's activation quantizers."""
import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.integration.site_error import site_names, site_sqnr  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402


def _sqnr(recipe):
    x = s2t_net_input(vocab=40, frames=48)
    qmodel = qswap.convert(build_s2t_transformer(), recipe)
    qswap.calibrate(qmodel, [x])
    return site_sqnr(qmodel, [x])


def test_site_names_are_the_declared_sites():
    qmodel = qswap.convert(build_s2t_transformer(), "w8a8")
    names = site_names(qmodel)
    layer = qmodel.decoder.layers[0]
    assert names[id(layer.encoder_attn.key_quant)] == "key_in"
    assert names[id(qmodel.encoder.subsample.glu_quant[1])] == "glu"
    assert names[id(layer.encoder_attn.core.softmax_out_quant)] == "softmax_out"
    from qswap.calibrate import activation_quantizers
    assert all(id(q) in names for q in activation_quantizers(qmodel))  # every site has its name


def test_fewer_bits_lose_about_six_db_a_bit_on_every_site():
    w8, w4 = _sqnr("w8a8"), _sqnr("w4a4")
    assert {"input", "softmax_out", "attn_residual", "ffn_act", "glu", "key_in"} <= set(w8)
    assert set(w8) == set(w4)
    for site in w8:
        assert w8[site] > w4[site] + 10, site  # 4 bits fewer: about 24 dB on a uniform grid


def test_integer_insides_measure_the_same_rounding():
    """Under ``simulate: integer`` an op writes onto its reader's grid itself; the measure still
    sees each quantizer round (run with the float insides), so no site reads as noiseless: each
    within 1 dB of the float insides' (the calibration ran the integer insides: its grids differ
    a little)."""
    from helpers import recipe_with
    integer, float_ = _sqnr(recipe_with("w8a8", "integer")), _sqnr("w8a8")
    assert integer.keys() == float_.keys()
    assert all(abs(integer[site] - float_[site]) < 1 for site in float_), (integer, float_)
