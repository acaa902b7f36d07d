import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qswap.errors import CalibrationError
from qswap.quant.observers import MSEObserver
from qswap.quant.spec import QuantSpec

SPEC = QuantSpec(bits=4, granularity="per_channel", axis=0, observer="mse")


class _ReadBacks(TorchDispatchMode):
    """Counts tensor-to-Python reads (``item``, ``bool``): each one waits for the GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket is torch.ops.aten._local_scalar_dense
        return func(*args, **(kwargs or {}))


def test_mse_search_reads_the_range_back_once_not_per_candidate():
    """QAT re-observes every weight each update: the 15 clipping candidates of the MSE search are
    finite when the range is, so the finiteness check runs once per observation."""
    obs = MSEObserver(SPEC)
    with _ReadBacks() as reads:
        obs(torch.randn(16, 8))
    assert obs.has_range and reads.count <= 4


def test_mse_observer_refuses_non_finite_values():
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or inf"):
        MSEObserver(SPEC)(x)
