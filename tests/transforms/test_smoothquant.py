"""SmoothQuant (qswap.transforms.smoothquant) given calibration data it cannot use: a typed
ConvertError before any weight changes, not NaN weights or a raw exception."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.errors import ConvertError  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402

SMOOTHQUANT = {"version": 1, "name": "w8a8_sq", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
               "transforms": [{"smoothquant": {"alpha": 0.5}}]}


def _model():
    return build_s2t_transformer(seed=0, encoder_normalize_before=True, decoder_normalize_before=True)


def test_a_nan_in_the_data_is_a_convert_error_and_the_model_keeps_its_weights():
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    bad = s2t_net_input()
    bad["src_tokens"][0, 5, 3] = float("nan")
    with pytest.raises(ConvertError, match="NaN or inf activations.*input features"):
        qswap.convert(model, SMOOTHQUANT, data=[bad])
    with pytest.raises(ConvertError, match="NaN or inf"):
        qswap.convert(model, SMOOTHQUANT, data=[bad], inplace=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("batch", [{"src_tokens": torch.zeros(1, 8, 80)}, {}, torch.zeros(2, 3)])
def test_a_batch_the_model_cannot_take_is_a_convert_error_naming_the_batch(batch):
    with pytest.raises(ConvertError, match=r"smoothquant: calibration batch 0: the model raised TypeError"):
        qswap.convert(_model(), SMOOTHQUANT, data=[batch])
