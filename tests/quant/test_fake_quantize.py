import copy

import pytest
import torch

from helpers import on_grid
from qswap.errors import CalibrationError
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_activation_quantizer_observes_then_freezes(observer):
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False, observer=observer))
    for seed in range(3):
        fq(torch.randn(32, 16, generator=torch.Generator().manual_seed(seed)))
    fq.freeze()
    scale = fq.scale.clone()
    y = fq(torch.randn(32, 16) * 100)  # frozen: the grid does not follow the new range
    torch.testing.assert_close(fq.scale, scale)
    assert on_grid(y, fq.scale, fq.zero_point, fq.spec.qmin, fq.spec.qmax)
    assert int(fq.observer.num_batches) == 3


def test_percentile_and_mse_clip_outliers_that_minmax_keeps():
    x = torch.cat([torch.randn(10000), torch.tensor([80.0])])
    scales = {}
    for observer in ("minmax", "percentile", "mse"):
        fq = FakeQuantize(QuantSpec(bits=8, observer=observer))
        fq(x)
        scales[observer] = float(fq.scale)
    assert scales["percentile"] < scales["minmax"] / 4
    assert scales["mse"] < scales["minmax"]


def test_frozen_quantizer_without_grid_is_a_typed_error():
    fq = FakeQuantize(QuantSpec())
    with pytest.raises(CalibrationError, match="no data"):
        fq.freeze()
    fq.frozen.fill_(True)
    with pytest.raises(CalibrationError, match="calibrate"):
        fq(torch.randn(3))


def test_nan_input_is_a_typed_error():
    fq = FakeQuantize(QuantSpec())
    with pytest.raises(CalibrationError, match="NaN"):
        fq(torch.tensor([1.0, float("nan")]))


def test_weight_quantizer_follows_the_weight_and_caches_in_eval():
    w = torch.nn.Parameter(torch.randn(8, 4))
    fq = FakeQuantize(QuantSpec(bits=4, granularity="per_channel"), kind="weight").eval()
    with torch.no_grad():
        first = fq(w)
        assert fq(w) is first  # cached while the weight is unchanged
        w.mul_(2)  # an optimizer step or a loaded state_dict bumps the version
        second = fq(w)
    assert second is not first
    torch.testing.assert_close(second, first * 2)
    assert on_grid(second, fq.scale, fq.zero_point, -8, 7, axis=0)


def test_lsq_scale_is_learnable():
    fq = FakeQuantize(QuantSpec(bits=4, learnable=True))
    x = torch.randn(64)
    fq(x)
    fq.freeze()
    assert isinstance(fq.scale, torch.nn.Parameter)
    fq.train()
    loss = (fq(x) - x * 0.5).pow(2).sum()
    loss.backward()
    assert fq.scale.grad is not None and torch.isfinite(fq.scale.grad).all()


def test_state_dict_round_trip_restores_grid_and_frozen_flag():
    fq = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=1))
    fq(torch.randn(5, 6))
    fq.freeze()
    fresh = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=1))
    fresh.load_state_dict(fq.state_dict())
    x = torch.randn(5, 6)
    assert bool(fresh.frozen)
    torch.testing.assert_close(fresh(x), fq(x))


def test_deepcopy_drops_the_weight_cache():
    w = torch.nn.Parameter(torch.randn(4, 4))
    fq = FakeQuantize(QuantSpec(), kind="weight").eval()
    with torch.no_grad():
        fq(w)
    assert copy.deepcopy(fq)._cached is None


def test_weight_grid_follows_in_place_data_updates_after_a_training_forward():
    w = torch.nn.Parameter(torch.randn(8, 4))
    fq = FakeQuantize(QuantSpec(bits=8), kind="weight")
    fq.eval()
    with torch.no_grad():
        before = fq(w).clone()
    w.data.mul_(2)  # what fairseq's CPU Adam does: no version bump
    fq.train()
    fq(w)  # a training step re-derives the grid
    fq.eval()
    with torch.no_grad():
        torch.testing.assert_close(fq(w), before * 2)
