"""The integer model's declared float steps (qswap.nn.integer_steps): the input quantization
refuses values with no code (NaN, +-inf) with a DataError instead of reading them as the zero
point's code."""
import pytest
import torch

from qswap.errors import DataError
from qswap.nn.integer_steps import QuantizeStep
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.integer import Grid
from qswap.quant.spec import QuantSpec


def _step():
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False))
    fq(torch.randn(4, 8))
    fq.freeze()
    return QuantizeStep(Grid.of(fq)), fq


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_a_data_error(bad):
    step, _ = _step()
    x = torch.randn(2, 8)
    x[1, 3] = bad
    with pytest.raises(DataError, match="holds NaN or \\+-inf"):
        step(x)


def test_finite_input_gives_the_fake_quant_codes():
    step, fq = _step()
    x = torch.randn(3, 8) * 2
    assert torch.equal(step(x).long(), Grid.of(fq).quantize(fq(x)).long())
