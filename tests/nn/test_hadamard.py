"""The online Walsh-Hadamard transform's integer form (qswap/nn/hadamard.py, issue 19 item 1: the
``hadamard`` strategy's rotation before fc2 runs on integers): the op against its fake-quant
counterpart in grid steps (a real fairseq model with the rotation integerized:
tests/nn/fairseq/test_integer_hadamard.py)."""
import pytest
import torch

from qswap.nn.base import QuantConfig
from qswap.nn.hadamard import IntegerHadamard, QHadamard
from qswap.nn.simulate import simulating
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.integer import Grid
from qswap.quant.spec import QuantSpec
from qswap.transforms.hadamard import Hadamard

FEATURES, BLOCK = 48, 16


def _calibrated(bits_in: int = 8, matrix_bits: int = 2, seed: int = 0):
    """A QHadamard (relu'd 8-bit input: asymmetric, zero point 0) and its reader (fc2's input
    quantizer), calibrated on the same data."""
    torch.manual_seed(seed)
    config = QuantConfig(QuantSpec(bits=matrix_bits), QuantSpec(bits=bits_in, symmetric=False))
    op = QHadamard(Hadamard(FEATURES, BLOCK), config).eval()
    reader = FakeQuantize(QuantSpec(bits=8, symmetric=False))
    x = torch.relu(torch.randn(6, 5, FEATURES) * 2)
    with torch.no_grad():
        reader(op(x))  # both observe
    op.input_quant.freeze()
    reader.freeze()
    return op, reader, x


def test_the_matrix_is_additions_and_subtractions_of_input_codes():
    op, reader, _ = _calibrated()
    form = op.to_integer(Grid.of(reader))
    assert isinstance(form, IntegerHadamard)
    assert set(form.linear.weight.unique().tolist()) == {-1, 1} and form.linear.bias is None
    assert form.linear.weight.shape == (BLOCK, BLOCK)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_codes_are_the_fake_quant_codes_within_a_step(seed):
    """The integer form (int32 sums of +-codes, fixed-point requantization) against the
    fake-quant op in float (float32 sums, the reader's float rounding): the same codes but for
    rounding ties, one step apart; with ``simulate: integer`` the counterpart told its reader
    computes the integer form's codes exactly."""
    op, reader, x = _calibrated(seed=seed)
    grid_in, grid_out = Grid.of(op.input_quant), Grid.of(reader)
    form = op.to_integer(grid_out)
    with torch.no_grad():
        codes = form(grid_in.quantize(op.input_quant(x)))
        assert codes.dtype == grid_out.dtype and codes.shape == x.shape
        with simulating(op, "float"):
            floated = grid_out.quantize(reader(op(x)))
        assert int((codes.to(torch.int32) - floated.to(torch.int32)).abs().max()) <= 1
        simulated = grid_out.quantize(reader(op(x, out_quant=reader)))
    assert torch.equal(simulated.to(torch.int32), codes.to(torch.int32))


def test_a_per_channel_reader_has_no_integer_form_and_the_op_stays_float():
    from qswap.errors import IntegerizeError
    op, _, x = _calibrated()
    per_channel = FakeQuantize(QuantSpec(bits=8, symmetric=False, granularity="per_channel", axis=-1))
    with torch.no_grad():
        per_channel(op(x))
    per_channel.freeze()
    from qswap.quant.integer import stream_grid
    with pytest.raises(IntegerizeError, match="per-tensor grid only"):
        op.to_integer(stream_grid(per_channel))
    with torch.no_grad():
        torch.testing.assert_close(op(x, out_quant=per_channel), op(x), rtol=0, atol=0)


def test_training_carries_the_float_ops_gradient():
    op, reader, x = _calibrated()
    op.train()
    x = x.clone().requires_grad_(True)
    y = op(x, out_quant=reader)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
