"""The on-grid check: integer codes within [qmin, qmax], at every granularity."""
import torch

from qswap.honesty.tags import _LARGE, Scratch, off_grid_count, on_grid_per_tensor
from qswap.quant import QuantSpec, choose_qparams, fake_quantize, reduce_min_max


def _quantized(x, spec):
    scale, zp = choose_qparams(*reduce_min_max(x, spec), spec)
    return fake_quantize(x, scale, zp, spec), scale, zp


def test_fake_quantized_values_are_on_grid_at_every_granularity():
    x = torch.randn(6, 8)
    for spec in (QuantSpec(bits=8, symmetric=False), QuantSpec(bits=4, granularity="per_channel", axis=0),
                 QuantSpec(bits=4, granularity="per_channel", axis=1),
                 QuantSpec(bits=8, granularity="per_group", group_size=4)):
        y, scale, zp = _quantized(x, spec)
        assert off_grid_count(y, scale, zp, spec, spec.qmin, spec.qmax) == 0, spec


def test_off_grid_out_of_range_and_nan_values_are_counted():
    spec = QuantSpec(bits=8)
    y, scale, zp = _quantized(torch.randn(100), spec)
    bad = y.clone()
    bad[:3] += 0.4 * scale  # between two codes
    bad[3] = 200 * scale  # code 200 > qmax 127
    bad[4] = float("nan")
    assert off_grid_count(bad, scale, zp, spec, spec.qmin, spec.qmax) == 5


def test_a_claimed_8_bit_grid_does_not_accept_16_bit_values():
    x = torch.randn(64)
    spec8, spec16 = QuantSpec(bits=8), QuantSpec(bits=16)
    y16, scale16, _ = _quantized(x, spec16)
    _, scale8, zp8 = _quantized(x, spec8)
    assert off_grid_count(y16, scale8, zp8, spec8, spec8.qmin, spec8.qmax) > 32


def test_a_per_element_bias_scale_and_the_int32_range():
    scale = torch.tensor([0.5, 0.25, 0.125])
    codes = torch.tensor([3.0, -7.0, 1000.0])
    bias = codes * scale
    zero = torch.zeros(3)
    assert off_grid_count(bias, scale, zero, None, -(2 ** 31), 2 ** 31 - 1) == 0
    nudged = bias + torch.tensor([0.1, 0.0, 0.0])
    assert off_grid_count(nudged, scale, zero, None, -(2 ** 31), 2 ** 31 - 1) == 1


def test_the_quick_per_tensor_proof_accepts_only_what_the_exact_count_accepts():
    spec = QuantSpec(bits=8, symmetric=False)
    y, scale, zp = _quantized(torch.randn(4, 50), spec)
    s, z = float(scale), float(zp)
    assert on_grid_per_tensor(y, s, z, spec.qmin, spec.qmax)
    for change in (lambda b: b[0].__iadd__(0.4 * s),  # between two codes
                   lambda b: b[1].fill_((spec.qmax + 3 - z) * s),  # a code above qmax
                   lambda b: b[2].fill_((spec.qmin - 1 - z) * s),  # a code below qmin
                   lambda b: b[3].fill_(float("nan")), lambda b: b[3].fill_(float("inf"))):
        bad = y.clone()
        change(bad)
        assert off_grid_count(bad, scale, zp, spec, spec.qmin, spec.qmax) > 0
        assert not on_grid_per_tensor(bad, s, z, spec.qmin, spec.qmax)
    assert not on_grid_per_tensor(y.double(), s, z, spec.qmin, spec.qmax)  # float32 only
    assert not on_grid_per_tensor(y, s, z + 0.5, spec.qmin, spec.qmax)  # a fractional zero point


def test_the_quick_proof_of_a_large_tensor_in_a_reused_buffer_accepts_only_grid_points():
    """Large tensors are compared by the difference's min/max in one buffer reused across calls
    (``Scratch``): each kind of bad value is still caught, whatever the buffer held before."""
    spec = QuantSpec(bits=8, symmetric=False)
    scratch = Scratch()
    for shape in ((64, 128), (3, 50, 100), (64, 128), (5000,)):  # grows, then reuses a view
        y, scale, zp = _quantized(torch.randn(shape) * 3, spec)
        s, z = float(scale), float(zp)
        assert y.numel() >= _LARGE
        assert on_grid_per_tensor(y, s, z, spec.qmin, spec.qmax, scratch=scratch)
        flat = y.reshape(-1)
        for i, bad_value in enumerate((flat[7] + 0.4 * s, (spec.qmax + 3 - z) * s, (spec.qmin - 1 - z) * s,
                                       float("nan"), float("inf"), float("-inf"))):
            bad = y.clone()
            bad.reshape(-1)[-1 - i] = bad_value
            assert not on_grid_per_tensor(bad, s, z, spec.qmin, spec.qmax, scratch=scratch), bad_value
            assert off_grid_count(bad, scale, zp, spec, spec.qmin, spec.qmax) == 1
        assert on_grid_per_tensor(y.t() if y.dim() == 2 else y, s, z, spec.qmin, spec.qmax, scratch=scratch)


def test_the_quick_proof_of_an_int32_bias_accepts_only_what_the_exact_count_accepts():
    """A range of 2^24 codes or more (an int32 bias) is clamped to the float32 numbers inside
    it: float32(2^31 - 1) is 2^31, a code beyond qmax, which must not pass."""
    qmin, qmax = -(2 ** 31), 2 ** 31 - 1
    s = 2.0 ** -10  # a power of two: every code below 2^24 times s is exact
    codes = torch.tensor([0.0, 3.0, -7.0, 1000.0, -(2.0 ** 20), 2.0 ** 23])
    bias = codes * s
    assert on_grid_per_tensor(bias, s, 0.0, qmin, qmax)
    assert off_grid_count(bias, torch.tensor(s), torch.zeros(()), None, qmin, qmax) == 0
    for bad_value in (bias[1] + 0.4 * s, float("nan"), float("inf")):
        bad = bias.clone()
        bad[-1] = bad_value
        assert not on_grid_per_tensor(bad, s, 0.0, qmin, qmax), bad_value
        assert off_grid_count(bad, torch.tensor(s), torch.zeros(()), None, qmin, qmax) == 1, bad_value
    for beyond in (2.0 ** 31 * s, -(2.0 ** 31 + 256) * s):  # codes 2^31 and -2^31 - 256: outside the range
        bad = bias.clone()
        bad[-1] = beyond
        assert not on_grid_per_tensor(bad, s, 0.0, qmin, qmax), beyond  # left to the exact count
    edge = torch.tensor([(2.0 ** 31 - 128) * s, -(2.0 ** 31) * s])  # the float32 codes nearest the ends, inside
    assert on_grid_per_tensor(edge, s, 0.0, qmin, qmax)
    assert off_grid_count(edge, torch.tensor(s), torch.zeros(()), None, qmin, qmax) == 0
