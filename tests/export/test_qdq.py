"""The export stand-ins compute what the quantizers they replace compute."""
import pytest
import torch

from qswap.errors import ExportError
from qswap.export.qdq import ActivationQDQ, WeightDQ
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8),
                                  QuantSpec(bits=8, signed=False, symmetric=False),
                                  QuantSpec(bits=8, symmetric=False, granularity="per_channel", axis=-1)])
def test_activation_stand_in_gives_the_quantizers_values(spec):
    fq = FakeQuantize(spec)
    x = torch.randn(4, 300) * 3
    fq(x.abs() if not spec.signed else x)
    fq.freeze()
    stand_in = ActivationQDQ(fq, "act")
    y = torch.randn(4, 300) * 4  # values beyond the calibrated range too: both saturate alike
    assert torch.equal(stand_in(y), fq(y))
    assert stand_in.zero_point.dtype == torch.uint8


def test_weight_stand_in_replays_the_recorded_codes():
    fq = FakeQuantize(QuantSpec(bits=4, granularity="per_channel", axis=0), kind="weight")
    w = torch.randn(8, 16)
    stand_in = WeightDQ(fq, "w")
    stand_in.recording = True
    recorded = stand_in(w)
    stand_in.recording = False
    assert torch.equal(stand_in(w), recorded) and stand_in.codes.dtype == torch.int8
    assert stand_in.codes.abs().max() <= 8


def test_one_weight_quantizer_on_two_weights_is_a_typed_error():
    stand_in = WeightDQ(FakeQuantize(QuantSpec(), kind="weight"), "shared.weight_quant")
    stand_in.recording = True
    stand_in(torch.randn(4, 4))
    with pytest.raises(ExportError, match="shared.weight_quant: one weight quantizer quantizes two"):
        stand_in(torch.randn(4, 4))


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False), QuantSpec(bits=4),
                                  QuantSpec(bits=4, signed=False, symmetric=False), QuantSpec(bits=8, narrow_range=True),
                                  QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1)])
def test_a_grid_with_fewer_codes_saturates_where_the_quantizer_does(spec):
    """4-bit and narrow-range grids: the stand-in's codes stay within the grid's (uint8 codes
    qmin..qmax, + 128 on a signed grid), values beyond the calibrated range included."""
    fq = FakeQuantize(spec)
    x = torch.randn(4, 300) * 3
    fq(x.abs() if not spec.signed else x)
    fq.freeze()
    stand_in = ActivationQDQ(fq, "act")
    assert stand_in.problem is None
    assert (stand_in.qmax - stand_in.qmin) == spec.qmax - spec.qmin < 255
    y = torch.randn(4, 300) * 8
    assert torch.equal(stand_in(y), fq(y))
