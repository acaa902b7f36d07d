import pytest
import torch

from helpers import on_grid
from qswap.errors import CalibrationError, SpecError
from qswap.quant.primitives import (MIN_SCALE, choose_qparams, dequantize,
                                    fake_quantize, quantize, reduce_min_max)
from qswap.quant.spec import QuantSpec

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=4, granularity="per_channel"),
    QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=1),
    QuantSpec(bits=3, granularity="per_group", group_size=4),
    QuantSpec(bits=8, signed=False),
    QuantSpec(bits=8, scale_type="pow2"),
    QuantSpec(bits=6, rounding="half_away"),
    QuantSpec(bits=5, rounding="floor", symmetric=False),
    QuantSpec(bits=16),
]


def _qparams(x, spec):
    return choose_qparams(*reduce_min_max(x, spec), spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + "/" + s.rounding)
def test_fake_quantize_is_on_grid_and_matches_quantize_dequantize(spec):
    x = torch.randn(6, 8, 4) * 3
    scale, zp = _qparams(x, spec)
    fq = fake_quantize(x, scale, zp, spec)
    codes = quantize(x, scale, zp, spec)
    assert codes.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    torch.testing.assert_close(dequantize(codes, scale, zp, spec), fq)
    if spec.granularity != "per_group":
        assert on_grid(fq, scale, zp, spec.qmin, spec.qmax, spec.channel_axis)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + "/" + s.rounding)
def test_fake_quantize_is_idempotent(spec):
    x = torch.randn(6, 8, 4)
    scale, zp = _qparams(x, spec)
    once = fake_quantize(x, scale, zp, spec)
    torch.testing.assert_close(fake_quantize(once, scale, zp, spec), once, rtol=0, atol=1e-6)


def test_error_is_bounded_by_half_a_step():
    spec = QuantSpec(bits=8, symmetric=False)
    x = torch.rand(1000) * 10 - 3
    scale, zp = _qparams(x, spec)
    assert (fake_quantize(x, scale, zp, spec) - x).abs().max() <= scale / 2 + 1e-6


@pytest.mark.parametrize("x", [torch.zeros(16), torch.full((16,), 3.5), torch.full((16,), -2.0),
                               torch.zeros(0, 4)])
@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=False), QuantSpec(signed=False),
                                  QuantSpec(scale_type="pow2")])
def test_zero_range_and_constant_inputs_give_finite_scales(x, spec):
    if x.numel() == 0:
        lo, hi = torch.tensor(0.0), torch.tensor(0.0)
    else:
        lo, hi = reduce_min_max(x, spec)
    scale, zp = choose_qparams(lo, hi, spec)
    assert torch.isfinite(scale).all() and (scale >= MIN_SCALE).all()
    out = fake_quantize(x, scale, zp, spec)
    assert torch.isfinite(out).all()
    if x.numel() and (spec.signed or x.min() >= 0):
        assert (out - x).abs().max() <= scale.max() / 2 + 1e-6  # constants are representable


def test_non_finite_range_is_a_typed_error():
    with pytest.raises(CalibrationError, match="non-finite"):
        choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


def test_per_group_needs_divisible_axis():
    with pytest.raises(SpecError, match="divisible"):
        reduce_min_max(torch.randn(4, 10), QuantSpec(granularity="per_group", group_size=4))


def test_pow2_scales_are_powers_of_two():
    spec = QuantSpec(bits=8, scale_type="pow2", granularity="per_channel")
    scale, _ = _qparams(torch.randn(5, 7), spec)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())


def test_straight_through_gradient():
    spec = QuantSpec(bits=4)
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    scale, zp = choose_qparams(torch.tensor(-0.5), torch.tensor(0.5), spec)
    fake_quantize(x, scale, zp, spec).sum().backward()
    codes = (x.detach() / scale).round()
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)
    assert torch.equal(x.grad, inside.float())


PER_TENSOR = [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8, signed=False),
              QuantSpec(bits=4, narrow_range=True), QuantSpec(bits=16, symmetric=False)]


@pytest.mark.parametrize("numel", [880, 8192], ids=["decoding-step", "batch"])
@pytest.mark.parametrize("spec", PER_TENSOR, ids=lambda s: s.short())
def test_per_tensor_inputs_match_torchs_fused_kernel_bit_for_bit(spec, numel):
    """Without autograd fake_quantize runs torch's per-tensor kernel as vectorized passes: the
    same float32 bits, ties, zero codes (+0.0) and +-inf. A NaN stays NaN (the kernel's qmin
    would hide it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, numel // 4, generator=g) * 3
    scale, zp = _qparams(x * 0.8, spec)  # a clipped range: values beyond both ends of the grid
    codes = torch.randint(spec.qmin - 2, spec.qmax + 2, (200,), generator=g).float()
    x[0, :200] = (codes - zp + 0.5) * scale  # halfway between codes
    x[1, :60] = -torch.rand(60, generator=g) * scale * 0.49  # rounds to code zero from below
    x[2, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, 3e38])
    expected = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), spec.qmin,
                                                     spec.qmax)
    out = fake_quantize(x, scale, zp, spec)
    x[3, 7] = float("nan")
    with_nan = fake_quantize(x, scale, zp, spec)
    assert torch.isnan(with_nan[3, 7]) and torch.isnan(with_nan).sum() == 1
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("spec", PER_TENSOR, ids=lambda s: s.short())
def test_scalar_qparams_match_the_tensor_qparams_bit_for_bit(spec):
    """choose_qparams_scalar (float32 numpy scalars) against choose_qparams (0-d tensors) on
    random ranges and edge cases: zero and constant ranges, tiny, huge, one-sided."""
    from qswap.quant.primitives import choose_qparams_scalar

    g = torch.Generator().manual_seed(1)
    ranges = [(0.0, 0.0), (-0.0, 0.0), (1e-30, 2e-30), (-3e38, 3e38), (2.5, 7.0), (-7.0, -2.5),
              (-1e-12, 1e-12), (-0.5, 0.25)]
    ranges += [tuple(sorted((torch.randn(2, generator=g) * 10 ** torch.randint(-6, 6, (1,), generator=g)).tolist()))
               for _ in range(300)]
    for lo, hi in ranges:
        lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
        scale, zp = choose_qparams(lo32, hi32, spec)
        s, z = choose_qparams_scalar(float(lo32), float(hi32), spec)
        assert torch.equal(torch.tensor(s, dtype=torch.float32), scale) and z == int(zp), (lo, hi)


def test_an_axis_the_tensor_does_not_have_is_a_typed_error():
    from qswap.errors import SpecError
    from qswap.quant.primitives import reduce_min_max

    spec = QuantSpec(bits=8, granularity="per_channel", axis=2)
    with pytest.raises(SpecError, match="axis 2 of a 2-d tensor"):
        reduce_min_max(torch.randn(6, 4), spec)


def test_per_channel_activation_grid_on_a_time_axis_is_a_typed_error():
    """Per-channel ranges along an axis whose size changes between batches (time) cannot make
    one grid: a typed error names the fix instead of a raw shape mismatch."""
    from qswap.errors import SpecError
    from qswap.quant.fake_quantize import FakeQuantize

    fq = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=0))
    fq(torch.randn(7, 2, 16))  # (T, B, C): 7 frames
    with pytest.raises(SpecError, match="not a time, key or batch axis: a linear.s input and the residual stream "
                                        "have their features on axis -1"):
        fq(torch.randn(9, 2, 16))  # observing a batch of 9 frames
    fq.freeze()
    with pytest.raises(SpecError, match="not a time, key or batch axis: a linear.s input"):
        fq(torch.randn(9, 2, 16))  # frozen grid of 7 scales on 9 frames


def _passes_with_python_floats(x, scale, zero_point, spec):
    """The per-tensor passes as they were written before the prepared grid: a Python float
    ``1 / scale`` (torch wraps it as a float64 tensor and casts it to float32 per call)."""
    out = torch.mul(x, 1.0 / scale)
    out.round_().clamp_(spec.qmin - zero_point, spec.qmax - zero_point)
    return torch.add(torch.zeros(()), out, alpha=scale, out=out)


@pytest.mark.parametrize("spec", PER_TENSOR, ids=lambda s: s.short())
def test_the_prepared_grid_gives_the_python_float_passes_bit_for_bit(spec):
    """``fake_quantize_grid`` multiplies by a 0-d float32 ``1 / scale`` made once: the same float32
    multiplier the Python float became per call, so the same bits, on 200 scales from 1e-30 to
    1e4 (many whose ``1 / scale`` float32 cannot hold exactly), ties, zeros and +-inf."""
    from qswap.quant.primitives import fake_quantize_grid, pass_grid

    g = torch.Generator().manual_seed(2)
    scales = (10 ** (torch.rand(200, generator=g, dtype=torch.float64) * 34 - 30)).float().tolist()
    for scale in scales + [1 / 3, 0.1, MIN_SCALE]:
        zero_point = 0 if spec.symmetric else int(torch.randint(spec.qmin, spec.qmax + 1, (), generator=g))
        x = torch.randn(8, 33, generator=g) * scale * spec.qmax
        codes = torch.randint(spec.qmin - 2, spec.qmax + 2, (33,), generator=g).float()
        x[0] = (codes - zero_point + 0.5) * scale  # halfway between codes
        x[1, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, -scale * 0.49])
        out = fake_quantize_grid(x, pass_grid(scale, zero_point, spec))
        expected = _passes_with_python_floats(x.clone(), scale, zero_point, spec)
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32)), scale


@pytest.mark.parametrize("scale", [0.0, float("inf"), float("nan")])
def test_a_grid_with_a_zero_or_nonfinite_scale_is_a_spec_error(scale):
    """A learned scale an optimizer drove to 0: a SpecError saying so, not a ZeroDivisionError."""
    from qswap.quant.primitives import pass_grid

    with pytest.raises(SpecError, match="needs a finite nonzero scale"):
        pass_grid(scale, 0, QuantSpec(bits=8))


@pytest.mark.parametrize("spec", [QuantSpec(bits=8, granularity="per_channel", axis=-1),
                                  QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=1)],
                         ids=lambda s: s.short())
def test_per_channel_saturates_huge_values_and_keeps_nan_as_per_tensor(spec):
    """torch's per-channel kernel casts codes to int64 before clamping: 1e20 and +inf wrapped to
    qmin, a huge positive value coming out as the grid's most negative one. Now they saturate,
    with autograd (clamped before the kernel) and without (the kernel's arithmetic as passes, bit
    for bit on finite values), and without autograd a NaN stays NaN, as per tensor."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * 3
    scale, zp = choose_qparams(*reduce_min_max(x * 0.8, spec), spec)
    x[:3, :] = torch.tensor([[1.0, 1e20, float("inf"), -1e20]]).expand(3, 4)
    x[5] = torch.tensor([-float("inf"), -0.0, 3e38, -3e38])
    top, bottom = (spec.qmax - zp) * scale, (spec.qmin - zp) * scale
    want = torch.minimum(torch.maximum(x, bottom), top)
    finite = x.abs() < 1e19
    expected = torch.fake_quantize_per_channel_affine(x * finite, scale, zp, 1, spec.qmin, spec.qmax)
    w = x.clone().requires_grad_()
    for out in (fake_quantize(x, scale, zp, spec), fake_quantize(w, scale, zp, spec)):
        assert torch.equal(out[~finite], want[~finite])
        assert torch.equal(out[finite].view(torch.int32), expected[finite].view(torch.int32))
    x[6, 2] = float("nan")
    with_nan = fake_quantize(x, scale, zp, spec)
    assert torch.isnan(with_nan[6, 2]) and torch.isnan(with_nan).sum() == 1


@pytest.mark.parametrize("scale", [1e-39, 1e-45])
def test_a_subnormal_scale_is_a_spec_error_not_nan(scale):
    """A scale below 1 / FLT_MAX (a loaded or hand-set grid) had passed: its float32 inverse is inf,
    and an input of 0 came out NaN on every prepared path."""
    from qswap.quant.primitives import channel_grid, pass_grid

    with pytest.raises(SpecError, match="inverse is finite"):
        pass_grid(scale, 0, QuantSpec(bits=8))
    spec = QuantSpec(bits=8, granularity="per_channel", axis=-1)
    with pytest.raises(SpecError, match="inverse is finite"):
        channel_grid(torch.tensor([0.1, scale]), torch.zeros(2, dtype=torch.int32), spec)


def test_half_away_rounds_only_exact_ties_away_from_zero():
    """sign(t) floor(|t| + 0.5) had sent 0.49999997 (the float32 below 0.5) to code 1: in float32
    0.49999997 + 0.5 rounds to 1.0."""
    import numpy as np

    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    spec = QuantSpec(bits=6, rounding="half_away")
    x = torch.tensor([below, -below, 0.5, -0.5, 1.5, 2.5, -2.5, 2.4999998, 7.0, -0.0])
    want = [0.0, 0.0, 1.0, -1.0, 2.0, 3.0, -3.0, 2.0, 7.0, 0.0]
    one = torch.tensor(1.0)
    assert fake_quantize(x, one, torch.tensor(0), spec).tolist() == want
    assert quantize(x, one, torch.tensor(0), spec).tolist() == want
    xs = torch.linspace(-40, 40, 100003)
    reference = np.sign(xs.double().numpy()) * np.floor(np.abs(xs.double().numpy()) + 0.5)
    assert torch.equal(fake_quantize(xs, one, torch.tensor(0), QuantSpec(bits=8, rounding="half_away")),
                       torch.from_numpy(np.clip(reference, -128, 127)).float())


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, symmetric=False),
                                  QuantSpec(bits=8, granularity="per_channel", axis=-1)], ids=lambda s: s.short())
def test_float16_and_bfloat16_inputs_are_gridded_in_float32(spec):
    """A model.half() (fairseq --fp16) or autocast's half activations: 1 / scale of a scale below
    2^-16 is inf in float16, and zeros had come out NaN, other values at the grid's end."""
    x = torch.tensor([[0.0, 1e-4, -2e-4, 5e-4, 1e-3]] * 2)
    scale, zp = choose_qparams(*reduce_min_max(x, spec), spec)
    assert float(scale.max()) < 2 ** -16
    want = fake_quantize(x, scale, zp, spec)
    for dtype in (torch.float16, torch.bfloat16):
        for s in (scale, scale.to(dtype)):  # the grid kept float32, or .half()'d with the model
            got = fake_quantize(x.to(dtype), s, zp, spec)
            assert got.dtype == dtype and not torch.isnan(got).any()
            assert torch.equal(got, fake_quantize(x.to(dtype).float(), s.float(), zp, spec).to(dtype))
        assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-6)


def test_a_half_model_quantizes_a_zero_weight_row_to_zero():
    """fairseq's padding_idx embedding row is all zeros: its per-channel scale is MIN_SCALE, whose
    inverse is inf in float16, and after .half() the whole row had been NaN."""
    from qswap.quant.fake_quantize import FakeQuantize

    emb = torch.nn.Embedding(4, 3, padding_idx=1)
    quantizer = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=0), "weight")
    float_rows = quantizer(emb.weight).detach()
    emb.half()
    quantizer.half()
    half_rows = quantizer(emb.weight)
    assert half_rows.dtype == torch.float16 and torch.equal(half_rows[1], torch.zeros(3, dtype=torch.float16))
    assert torch.allclose(half_rows.float(), float_rows, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("spec", [QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_channel", axis=-1)],
                         ids=lambda s: s.short())
def test_nan_stays_nan_with_autograd_too(spec):
    """torch's kernels (the path that carries a gradient to x) had turned a NaN of a training
    forward into qmin's value; inference kept it. Both keep it now, and the gradient still flows."""
    x = torch.randn(8, 4)
    scale, zp = choose_qparams(*reduce_min_max(x, spec), spec)
    x[2, 1] = float("nan")
    w = x.clone().requires_grad_()
    out = fake_quantize(w, scale, zp, spec)
    assert torch.isnan(out[2, 1]) and torch.isnan(out).sum() == 1
    assert torch.equal(torch.nan_to_num(out.detach()), torch.nan_to_num(fake_quantize(x, scale, zp, spec)))
    out.nan_to_num().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_a_per_tensor_grid_given_several_scales_is_a_spec_error():
    """A per-channel state loaded into a per-tensor quantizer with plain load_state_dict: the
    forward had raised a raw ValueError (float() of a 4-element tensor)."""
    from qswap.quant.fake_quantize import FakeQuantize

    source = FakeQuantize(QuantSpec(bits=8, granularity="per_channel", axis=-1))
    source(torch.randn(3, 4))
    source.freeze()
    target = FakeQuantize(QuantSpec(bits=8))
    target.load_state_dict(source.state_dict())
    assert target.state_problem() == "a scale of shape (4,) for a per_tensor grid"
    with pytest.raises(SpecError, match="a per_tensor grid has one scale, got 4"):
        target(torch.randn(3, 4))
