"""qswap/quant/fused.py: the one-pass C kernel gives the four torch passes' values bit for bit, and
stays out of the way of everything that watches torch ops."""
import math
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qswap.quant import fused
from qswap.quant.primitives import (channel_grid, fake_quantize_channel_grid, fake_quantize_channel_passes,
                                    fake_quantize_grid, fake_quantize_grid_, grid_passes, pass_grid)
from qswap.quant.spec import QuantSpec

GRIDS = [  # (qmin, qmax, scale, zero point)
    (0, 255, 0.05, 3), (-128, 127, 0.0123, 0), (0, 15, 0.3, 7), (-8, 7, 2.0 ** -5, 0), (0, 255, 1e-3, 128),
    (0, 255, 7.5, 255), (-128, 127, 1e-30, 0),
]


def _grid(qmin, qmax, scale, zero_point):
    return pass_grid(scale, zero_point, SimpleNamespace(qmin=qmin, qmax=qmax))


def _values(scale: float) -> torch.Tensor:
    codes = torch.arange(-300, 301, dtype=torch.float32)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3e38, -3e38, 1e-45, -1e-45])
    return torch.cat([torch.randn(20011, generator=torch.Generator().manual_seed(0)) * scale * 60,
                      (codes + 0.5) * scale, codes * scale, (codes - 0.5) * scale, specials])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (so +0.0 is not -0.0), NaN where the other is NaN."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the kernel is not built")
def test_the_kernel_is_built_where_a_compiler_is():
    assert fused.AVAILABLE and fused.TWICE, \
        "pip install builds qswap/quant/_fused.c (setup.py); reinstall with a C compiler"


needs_kernel = pytest.mark.skipif(not fused.AVAILABLE, reason="the kernel is not built (no C compiler)")


@pytest.mark.skipif(not fused.TWICE, reason="the kernel is not built (no C compiler)")
@pytest.mark.parametrize("first", GRIDS[:5])
@pytest.mark.parametrize("second", [GRIDS[0], GRIDS[2], GRIDS[4]])
def test_two_grids_in_one_pass_give_two_passes_values(first, second):
    """``fake_quantize_twice_into`` is the kernel twice (the second grid reading the first's
    result), bit for bit, in place or not, with the first grid's low end raised to 0 (a ReLU
    folded in) as well."""
    g1, g2 = _grid(*first), _grid(*second)
    x = _values(first[2])
    for lo in (g1.lo, 0):
        one = g1._replace(lo=lo)
        expected = grid_passes(grid_passes(x, one), g2)
        out = fused.fake_quantize_twice_into(x, torch.empty_like(x), (one.inverse_value, one.lo, one.hi, one.scale),
                                             (g2.inverse_value, g2.lo, g2.hi, g2.scale))
        assert _same_bits(out, expected)
        inplace = x.clone()
        fused.fake_quantize_twice_into(inplace, inplace, (one.inverse_value, one.lo, one.hi, one.scale),
                                       (g2.inverse_value, g2.lo, g2.hi, g2.scale))
        assert _same_bits(inplace, expected)


@needs_kernel
@pytest.mark.parametrize("qmin, qmax, scale, zero_point", GRIDS)
def test_one_pass_gives_the_four_passes_values(qmin, qmax, scale, zero_point):
    grid = _grid(qmin, qmax, scale, zero_point)
    x = _values(scale)
    expected = grid_passes(x, grid)
    assert fused.applies(x)
    got = fake_quantize_grid(x, grid)
    assert _same_bits(got, expected)
    assert got.data_ptr() != x.data_ptr()
    inplace = x.clone()
    assert fake_quantize_grid_(inplace, grid).data_ptr() == inplace.data_ptr() and _same_bits(inplace, expected)
    for n in (0, 1, 7, 8, 9, 31, 33):  # vector bodies and tails
        assert _same_bits(fake_quantize_grid(x[-n:] if n else x[:0], grid), expected[-n:] if n else expected[:0])
    # exact ties round to even, and a zero code is +0.0
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5], dtype=torch.float32) * grid.scale
    assert torch.equal(fake_quantize_grid(ties, grid), grid_passes(ties, grid))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@needs_kernel
def test_the_four_passes_run_where_something_watches_or_the_tensor_does_not_fit():
    grid = _grid(0, 255, 0.05, 3)
    x = torch.randn(64, 33)
    with _Ops() as ops:  # the honesty audit watches through a dispatch mode: it sees the arithmetic
        watched = fake_quantize_grid(x, grid)
    assert {"mul", "round_", "clamp_", "add"} <= set(ops.seen) and torch.equal(watched, grid_passes(x, grid))
    assert not fused.applies(x[:, ::2])  # gaps between its elements
    assert not fused.applies(torch.randn(1, 33).expand(64, 33))  # elements shared
    assert not fused.applies(torch._neg_view(x))  # a negated view: its memory holds -x
    assert not fused.applies(x.double())
    leaf = x.clone().requires_grad_()
    assert not fused.applies(leaf)
    with torch.no_grad():
        assert fused.applies(leaf)
    traced = torch.jit.trace(lambda t: fake_quantize_grid(t, grid), x)
    y = torch.randn(64, 33) * 10
    assert torch.equal(traced(y), grid_passes(y, grid))  # the trace recorded the passes, not a constant
    for strided in (x[:, ::2], torch.randn(1, 33).expand(64, 33)):
        assert torch.equal(fake_quantize_grid(strided, grid), grid_passes(strided, grid))


def _tensor_kinds():
    x = torch.randn(8, 6)
    return {"dense": x, "transposed": x.t(), "strided": x[:, ::2], "expanded": torch.randn(1, 6).expand(8, 6),
            "negated": torch._neg_view(x), "float64": x.double(), "float16": x.half(), "int32": x.int(),
            "needs grad": x.clone().requires_grad_(), "parameter": torch.nn.Parameter(x.clone()),
            "empty": torch.empty(0, 6), "0-d": torch.tensor(1.5), "zero tensor": torch._efficientzerotensor(3),
            "sparse": x.to_sparse(), "meta": torch.empty(8, 6, device="meta")}


@pytest.mark.parametrize("kind", sorted(_tensor_kinds()))
def test_applies_is_readable_and_no_gradient_to_carry(kind):
    """``applies`` inlines ``readable`` (asked per quantizer call): the two stay one condition, with
    autograd on and off and under a dispatch mode."""
    x = _tensor_kinds()[kind]

    def expected():
        return fused._kernel is not None and fused.readable(x) and not (x.requires_grad and torch.is_grad_enabled())
    assert fused.applies(x) == expected()
    with torch.no_grad():
        assert fused.applies(x) == expected()
    with _Ops():
        assert fused.applies(x) == expected() and not fused.applies(x)


@needs_kernel
def test_a_permuted_tensor_is_one_block_the_kernel_walks_in_storage_order():
    grid = _grid(0, 15, 0.3, 7)
    heads = torch.randn(5, 6, 4, 3).permute(2, 0, 3, 1)  # a head split's transpose: dense, not contiguous
    assert not heads.is_contiguous() and fused.dense(heads) and fused.applies(heads)
    out = fake_quantize_grid(heads, grid)
    assert out.stride() == heads.stride() and _same_bits(out, grid_passes(heads, grid))
    expected = grid_passes(heads, grid)
    assert _same_bits(fake_quantize_grid_(heads, grid), expected) and _same_bits(heads, expected)
    assert not fused.dense(torch.randn(4, 6)[:, 1:]) and fused.dense(torch.randn(4, 1, 6).transpose(0, 1))


@pytest.mark.skipif(not fused.CHANNELS, reason="the kernel is not built (no C compiler)")
@pytest.mark.parametrize("name, bad_calls", [
    ("fake_quantize_f32", [((0, 0, 4, 1.0, 0.0, 255.0, 1.0), "negative size or a null buffer")]),
    ("fake_quantize_channels_f32", [((1, 1, 7, 2, 1, 1, 1, 1), "multiple"), ((0, 0, 4, 2, 0, 0, 0, 0), "null buffer")]),
])
def test_the_kernel_refuses_a_bad_call_with_a_python_error(name, bad_calls):
    kernel = getattr(sys.modules["qswap.quant._fused"], name)
    with pytest.raises(TypeError):
        kernel(0, 0, 1)
    for args, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            kernel(*args)


@needs_kernel
@pytest.mark.parametrize("qmin, qmax, scale, zero_point", GRIDS)
def test_grid_mismatches_counts_what_the_passes_change(qmin, qmax, scale, zero_point):
    """The audit's one-read proof: the count of values that their own fake quantization changes
    (a NaN always; -0.0 never), as torch's passes count them."""
    grid = _grid(qmin, qmax, scale, zero_point)
    on_grid = grid_passes(_values(scale), grid)
    on_grid = on_grid[~on_grid.isnan()]
    args = (grid.inverse_value, grid.lo, grid.hi, grid.scale)
    assert fused.grid_mismatches(on_grid, *args) == 0
    moved = on_grid.clone()
    moved[::97] = torch.nextafter(moved[::97], torch.tensor(math.inf))  # one float32 step off the grid
    moved[5], moved[6], moved[7] = math.nan, -0.0, (qmax - zero_point + 2) * scale  # NaN, on grid, out of range
    expected = int((grid_passes(moved, grid) != moved).sum())  # NaN != NaN: counted
    assert fused.grid_mismatches(moved, *args) == expected > 0
    assert fused.grid_mismatches(moved.view(-1, 1).expand(-1, 2), *args) is None  # not one block: torch checks


@needs_kernel
def test_the_audit_proof_reads_a_quantizer_output_once_with_the_same_verdict():
    from qswap.honesty.tags import on_grid_per_tensor

    grid = _grid(0, 255, 0.05, 3)
    y = grid_passes(torch.randn(5000) * 4, grid)
    assert on_grid_per_tensor(y, 0.05, 3.0, 0, 255)
    for bad in (math.nan, math.inf, 0.051, 300 * 0.05):
        z = y.clone()
        z[17] = bad
        assert not on_grid_per_tensor(z, 0.05, 3.0, 0, 255)
        assert not on_grid_per_tensor(z.double(), 0.05, 3.0, 0, 255)  # float64: not a float32 grid value


needs_min_max = pytest.mark.skipif(fused._min_max is None, reason="the kernel is not built (no C compiler)")


@needs_min_max
@pytest.mark.parametrize("n", [1, 2, 7, 15, 16, 17, 31, 33, 1000, 65537])
def test_min_max_reads_the_exact_extremes_at_every_length(n):
    """Every length around the 16-value vector step (the tail folds in one value at a time), the
    extremes anywhere in the tensor: torch.aminmax's values."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    for where in {0, n // 2, n - 1}:
        y = x.clone()
        y[where] = -50.0 if where % 2 else 60.0
        lo, hi, nonfinite = fused.min_max(y)
        ref_lo, ref_hi = torch.aminmax(y)
        assert (lo, hi, nonfinite) == (float(ref_lo), float(ref_hi), False)


@needs_min_max
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 5, 11, 16, 27, 40])  # both 8-value loads of a step, the tail
def test_min_max_flags_a_nonfinite_value_wherever_it_is(bad, where):
    x = torch.randn(41)
    x[where] = bad
    assert fused.min_max(x)[2] is True


@needs_min_max
def test_min_max_reads_a_permuted_block_and_refuses_what_it_cannot_read():
    heads = torch.randn(5, 6, 4, 3).permute(2, 0, 3, 1)  # dense, not contiguous: the same values
    lo, hi, _ = fused.min_max(heads)
    assert (lo, hi) == tuple(float(v) for v in torch.aminmax(heads))
    x = torch.randn(64, 33)
    for unreadable in (x[:, ::2], x.double(), torch._neg_view(x), torch.randn(1, 33).expand(64, 33)):
        assert fused.min_max(unreadable) is None
    from qswap.quant.observers import MinMaxObserver
    from qswap.quant.spec import QuantSpec
    observer = MinMaxObserver(QuantSpec(bits=8, symmetric=False))
    with _Ops() as ops:  # a dispatch mode watching: torch computes the range, where the watcher sees it
        assert fused.min_max(x) is None
        observed = observer.observe_scalar(x)
    assert "aminmax" in ops.seen and observed == tuple(float(v) for v in torch.aminmax(x))
    assert fused.min_max(torch._efficientzerotensor(8)) is None  # no memory to read
    signed = torch.tensor([-0.0, 0.0, 1.0, -0.0])
    assert fused.min_max(signed)[:2] == (0.0, 1.0)  # either zero: the same range


@needs_min_max
def test_min_max_refuses_a_bad_call_with_a_python_error():
    kernel = sys.modules["qswap.quant._fused"].min_max_f32
    with pytest.raises(TypeError):
        kernel(0)
    with pytest.raises(ValueError, match="size below 1 or a null buffer"):
        kernel(0, 4)
    with pytest.raises(ValueError, match="size below 1"):
        kernel(torch.randn(3).data_ptr(), 0)


needs_channels = pytest.mark.skipif(not fused.CHANNELS, reason="the kernel is not built (no C compiler)")


@needs_channels
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=False, granularity="per_channel", axis=-1),
                                  QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=-1),
                                  QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1)])
@pytest.mark.parametrize("channels", [1, 3, 8, 17, 64])
def test_the_per_channel_pass_gives_the_per_channel_passes_values(spec, channels):
    """``fake_quantize_channels_into`` (one grid per channel of the last axis) gives
    ``fake_quantize_channel_passes``' values bit for bit: ties, +-0, +-inf, NaN, values beyond
    both ends of each grid, channel counts around the vector widths, in place or not; the
    prepared grid's torch passes (where the kernel may not run) give them too."""
    gen = torch.Generator().manual_seed(channels)
    scale = (torch.rand(channels, generator=gen) * 0.2 + 1e-3).float()
    scale[0] = 2.0 ** -5
    if spec.symmetric:
        zero_point = torch.zeros(channels, dtype=torch.int32)
    else:
        zero_point = torch.randint(spec.qmin, spec.qmax + 1, (channels,), generator=gen, dtype=torch.int32)
    grid = channel_grid(scale, zero_point, spec)
    codes = torch.arange(-40, 41, dtype=torch.float32)[:, None, None]
    ties = torch.cat([(codes + 0.5), codes, codes - 0.5], dim=1) * scale  # (81, 3, C)
    x = torch.cat([ties.reshape(-1, channels), torch.randn(37, channels, generator=gen) * 3]).contiguous()
    x[0, 0], x[1, -1], x[2, 0], x[3, -1], x[4, 0], x[5, 0] = 0.0, -0.0, math.inf, -math.inf, math.nan, 3e38
    expected = fake_quantize_channel_passes(x, scale, zero_point, spec)
    assert fused.applies(x)
    got = fake_quantize_channel_grid(x, grid)
    assert got.data_ptr() != x.data_ptr() and _same_bits(got, expected)
    inplace = x.clone()
    assert _same_bits(fused.fake_quantize_channels_into(inplace, inplace, grid), expected)
    strided = torch.stack([x, x], dim=-1)[..., 0]  # not contiguous: the passes on the prepared grid
    assert not strided.is_contiguous() and _same_bits(fake_quantize_channel_grid(strided, grid), expected)
    for rows in (0, 1, 3):
        part = x[:rows].contiguous()
        assert _same_bits(fake_quantize_channel_grid(part, grid), expected[:rows])


needs_observe = pytest.mark.skipif(fused._observe is None, reason="the kernel is not built (no C compiler)")
OBSERVE_SPECS = [QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8), QuantSpec(bits=4, narrow_range=True),
                 QuantSpec(bits=8, signed=False), QuantSpec(bits=16, symmetric=False), QuantSpec(bits=2, symmetric=False),
                 QuantSpec(bits=3, signed=False, symmetric=False)]
RANGES = [(-1.3, 2.7), (0.25, 4.0), (-5.0, -0.125), (0.0, 0.0), (-0.0, 0.0), (-1e-30, 1e-30), (-3e38, 3e38),
          (1e37, 2e38), (-7.0, 7.0), (-0.1, 1e-7)]


def _python_step(rule, running, count, momentum, lo, hi, spec):
    """The definition the kernel's calibration step follows: ``Observer.combine`` of each rule on
    numpy float32 scalars, then ``choose_qparams_scalar`` and ``pass_grid``'s float32 1 / scale."""
    import numpy as np

    from qswap.quant.observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer
    from qswap.quant.primitives import choose_qparams_scalar

    lo, hi = np.float32(lo), np.float32(hi)
    if running is not None:
        cls = (Observer, MinMaxObserver, MovingAverageMinMaxObserver)[rule]
        obs = cls(QuantSpec(observer="minmax", momentum=momentum))
        obs.num_batches.fill_(count - 1)
        lo, hi = obs.combine(np.float32(running[0]), np.float32(running[1]), lo, hi)
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 2, lo, hi
    scale, zero_point = choose_qparams_scalar(lo, hi, spec)
    return 0, lo, hi, scale, zero_point, torch.tensor(1.0 / scale, dtype=torch.float32).item()


@needs_observe
@pytest.mark.parametrize("spec", OBSERVE_SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("rule", [0, 1, 2])
def test_the_kernels_calibration_step_is_the_python_definition_bit_for_bit(spec, rule):
    """``fused.observe``: the extremes, each rule's running range and the grid, the numbers the
    observers' numpy float32 arithmetic and ``choose_qparams_scalar`` give (status 2 where the
    combined range overflows)."""
    from qswap.quant.primitives import MAX_RANGE, MIN_SCALE

    g = torch.Generator().manual_seed(rule * 31 + spec.bits)
    for (lo, hi), running in zip(RANGES * 2, [None] * len(RANGES) + RANGES[::-1]):
        x = torch.rand(257, generator=g) * (hi - lo) + lo
        x[0], x[-1] = lo, hi  # the range itself
        x = x.clamp(lo, hi)
        count, momentum = 3, 0.3
        operand = float(count) if rule == 0 else momentum if rule == 2 else 0.0
        got = fused.observe(x, rule, running, operand, (MIN_SCALE, MAX_RANGE), spec)
        want = _python_step(rule, running, count, momentum, x.min().item(), x.max().item(), spec)
        assert got[0] == want[0]
        assert got[1:3] == want[1:3]
        if want[0] == 0:
            assert got[3:] == (want[3], float(want[4]), want[5])
        assert fused.observe(x, rule, running, operand, (MIN_SCALE, MAX_RANGE))[:3] == got[:3]  # no grid: the range


@needs_observe
def test_the_kernels_calibration_step_flags_a_nonfinite_input_and_refuses_a_bad_call():
    from qswap.quant.primitives import MAX_RANGE, MIN_SCALE

    for bad in (math.nan, math.inf, -math.inf):
        x = torch.randn(40)
        x[17] = bad
        assert fused.observe(x, 1, (-1.0, 1.0), 0.0, (MIN_SCALE, MAX_RANGE), QuantSpec(bits=8))[0] == 1
    kernel = sys.modules["qswap.quant._fused"].observe_f32
    x = torch.randn(4)
    with pytest.raises(TypeError):
        kernel(x.data_ptr(), 4)
    args = [x.data_ptr(), 4, 1, False, 0.0, 0.0, 0.0, True, -128, 127, True, True, MIN_SCALE, MAX_RANGE]
    for at, value in ((1, 0), (0, 0), (2, 3), (9, -128)):
        wrong = list(args)
        wrong[at] = value
        with pytest.raises(ValueError, match="observe_f32"):
            kernel(*wrong)


@needs_observe
@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_an_observer_keeps_the_same_numbers_with_and_without_the_kernel(monkeypatch, observer, symmetric):
    """Calibration's per-call step, ``Observer.observe_scalar``, through the kernel and through the
    Python path (the kernel not built): the same buffers, range and grid after every call, and the
    same typed error for a non-finite input."""
    from qswap.errors import CalibrationError
    from qswap.quant.observers import make_observer

    spec = QuantSpec(bits=8, symmetric=symmetric, observer=observer, momentum=0.2)
    kernel_obs, python_obs = make_observer(spec), make_observer(spec)
    g = torch.Generator().manual_seed(5)
    for i in range(7):
        x = torch.randn(33, 9, generator=g) * (0.5 + i) + (i - 3) * 0.4
        got = kernel_obs.observe_scalar(x, spec)
        with monkeypatch.context() as m:
            m.setattr(fused, "_observe", None)
            want = python_obs.observe_scalar(x, spec)
        assert got[:4] == want[:4] and want[4] is None
        assert type(got[3]) is int and type(want[3]) is int  # the zero point, as choose_qparams_scalar gives it
        assert got[4] == torch.tensor(1.0 / got[2], dtype=torch.float32).item()
        for name in ("min_val", "max_val", "num_batches"):
            assert torch.equal(getattr(kernel_obs, name), getattr(python_obs, name))
    x[0, 0] = math.nan
    with pytest.raises(CalibrationError, match="NaN or inf"):
        kernel_obs.observe_scalar(x, spec)
