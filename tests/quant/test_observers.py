import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qswap.errors import CalibrationError
from qswap.quant.observers import MSEObserver, make_observer
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


def test_mse_search_reads_the_range_back_per_observation_not_per_candidate():
    """QAT re-observes every weight each update: the 15 clipping candidates of the MSE search are
    finite when the range is, so the range is checked (one read-back each) by the search and by
    the observer, not per candidate."""
    obs = MSEObserver(SPEC)
    with _ReadBacks() as reads:
        obs(torch.randn(16, 8))
    assert obs.has_range and reads.count <= 2


def test_mse_observer_refuses_non_finite_values():
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or inf"):
        MSEObserver(SPEC)(x)


def _loop_range(obs, x):
    """The candidate loop alone (what batch_range does for any granularity)."""
    from qswap.quant import observers

    saved, observers._MSE_BATCHED_MAX = observers._MSE_BATCHED_MAX, -1
    try:
        return obs.batch_range(x)
    finally:
        observers._MSE_BATCHED_MAX = saved


@pytest.mark.parametrize("shape", [(16, 8), (64, 33), (12, 5, 3), (7, 1)])
@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, True), (4, False)])
def test_batched_mse_search_is_the_candidate_loop_bit_for_bit(shape, bits, symmetric):
    torch.manual_seed(sum(shape) + bits)
    x = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 3
    x[0] = 0.0  # a constant channel
    obs = MSEObserver(QuantSpec(bits=bits, symmetric=symmetric, granularity="per_channel", axis=0, observer="mse"))
    for got, want in zip(obs.batch_range(x), _loop_range(obs, x)):
        assert torch.equal(got, want)


def test_batched_mse_search_equals_the_loop_on_the_shipped_models_weights():
    from qswap.demo import ASSET

    state = torch.load(ASSET / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    obs = MSEObserver(SPEC)
    weights = [w.float() for k, w in state.items() if k.endswith(".weight") and w.dim() >= 2]
    assert len(weights) > 20
    for w in weights:
        for got, want in zip(obs.batch_range(w), _loop_range(obs, w)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("shape, axis", [((60,), -1), ((6, 4, 3), -3), ((6, 4), 0)])
def test_batched_mse_search_takes_the_spec_axis_in_any_spelling(shape, axis):
    """A negative axis naming dim 0 (a 1-D weight's -1, a conv weight's -3) takes the batched
    search too, and gives the loop's ranges."""
    torch.manual_seed(5)
    x = torch.randn(shape)
    obs = MSEObserver(QuantSpec(bits=4, granularity="per_channel", axis=axis, observer="mse"))
    got = obs.batch_range(x)
    assert got[0].shape == (shape[0],)
    for g, want in zip(got, _loop_range(obs, x)):
        assert torch.equal(g, want)


def test_percentile_of_a_large_activation_reads_every_channel():
    """Over 2^20 elements the percentile observer took every k-th element: for a (frames, 256)
    activation a stride of 2, which never read an odd channel (an outlier channel at index 1 was
    clipped away). Its range is now the exact percentile of the whole tensor (torch.quantile's,
    bit for bit), wherever the outlier channel is."""
    from qswap.quant.observers import PercentileObserver

    torch.manual_seed(0)
    x = torch.randn(4100, 256)  # just over 2^20 elements
    x[:, 1] = 40 + torch.randn(4100)
    spec = QuantSpec(bits=8, observer="percentile", percentile=99.99)
    want = torch.quantile(x.reshape(-1), torch.tensor([1 - 0.9999, 0.9999]))
    for data in (x, x[:, [0, 2, 1, *range(3, 256)]]):  # the outlier at an odd, then an even index
        obs = PercentileObserver(spec)
        obs(data)
        assert obs.max_val.item() > 39
        assert torch.equal(torch.stack([obs.min_val, obs.max_val]), want)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12_345])
@pytest.mark.parametrize("percentile", [99.99, 90.0, 50.5, 100.0])
def test_exact_quantiles_are_torch_quantile_bit_for_bit(n, percentile):
    from qswap.quant.observers import exact_quantiles

    torch.manual_seed(n)
    x = torch.randn(n) * 3
    x[::5] = x[0]  # ties
    q = torch.tensor([1 - percentile / 100, percentile / 100])
    assert torch.equal(torch.stack(exact_quantiles(x, q)), torch.quantile(x, q))
    x[n // 2] = float("nan")  # NaN in, NaN out (the observer then refuses the tensor)
    assert all(torch.isnan(v) for v in exact_quantiles(x, q))


def test_exact_quantiles_of_more_than_2_24_elements_reach_the_extremes():
    """Beyond 2^24 elements float32 cannot hold n - 1: the ranks are float64 there (percentile 100
    had rounded past the last element, an IndexError, or fallen short of the maximum)."""
    from qswap.quant.observers import exact_quantiles

    n = 2 ** 24 + 4  # float32(n - 1) rounds up to n
    flat = torch.randn(n, generator=torch.Generator().manual_seed(0))
    flat[n // 2], flat[7] = 50.0, -40.0
    lo, hi = exact_quantiles(flat, torch.tensor([0.0, 1.0]))
    assert float(lo) == -40.0 and float(hi) == 50.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_of_huge_finite_values_is_a_finite_range(symmetric):
    """[-3e38, 3e38] is finite float32, but the interpolation between them overflowed (end - start)
    and the observer refused it as 'NaN or inf' input."""
    obs = make_observer(QuantSpec(bits=8, symmetric=symmetric, observer="percentile", percentile=99.99))
    obs(torch.tensor([-3e38, 3e38]))
    lo, hi = obs.min_val.item(), obs.max_val.item()
    assert -3e38 <= lo < -2.99e38 and 2.99e38 < hi <= 3e38
    assert lo == pytest.approx(float(torch.tensor(-3e38)) * (1 - 2 * 0.0001), rel=1e-6)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_mse_of_huge_values_ranks_candidates_without_overflow(granularity):
    """Above ~1e19 every float32 squared error was inf and the first candidate (ratio 0.3, 70 %
    of the data clipped) was kept; ranked in float64 the full range wins as at any smaller scale.
    Ordinary values keep their float32 errors (the same ranges as before, bit for bit)."""
    from qswap.quant.observers import _range_facts, make_observer
    from qswap.quant.spec import QuantSpec

    spec = QuantSpec(bits=8, observer="mse", granularity=granularity, **({"axis": 0} if granularity != "per_tensor" else {}))
    x = torch.linspace(-1, 1, 64).reshape(8, 8)
    ranges = []
    for factor in (1.0, 1e25, 1e37):
        observer = make_observer(spec)
        observer(x * factor)
        ranges.append((observer.max_val / factor).tolist())
    assert ranges[1] == pytest.approx(ranges[0], rel=1e-5) and ranges[2] == pytest.approx(ranges[0], rel=1e-5)
    assert _range_facts(torch.tensor(-1e6), torch.tensor(1e6), 10 ** 9) == (True, False)
