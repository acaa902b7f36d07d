"""The integer primitives: ties of every rounding, overflow bounds, and agreement with the
fake-quant path they replace (in output grid steps)."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qswap.errors import IntegerizeError
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.integer import (INT32_MAX, INT32_MIN, ISQRT_MAX, AddParams, ChannelGrid, CommonGridParams,
                                 GluParams, Grid, GroupNormParams, add_input_bits, common_grid, rescaled_sum, stream_grid,
                                 ConstantAddParams, LayerNormParams, add_constant, integer_group_norm,
                                 integer_layer_norm_acc,
                                 Requant, SoftmaxParams, apply_lut, build_lut, integer_glu, integer_layer_norm,
                                 integer_softmax, isqrt, multiply_by_quantized_multiplier, quantize_multiplier, requantize, rescaled_add,
                                 rounding_divide_by_pot, saturating_rounding_doubling_high_mul)
from qswap.quant.spec import QuantSpec

INT32 = st.integers(INT32_MIN, INT32_MAX)


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def round_half_away(x: Fraction) -> int:
    return int(math.floor(abs(x) + Fraction(1, 2))) * (1 if x >= 0 else -1)


def grid_of(x: torch.Tensor, spec: QuantSpec = QuantSpec(bits=8, symmetric=False)) -> FakeQuantize:
    """A frozen activation FakeQuantize calibrated on ``x``."""
    fq = FakeQuantize(spec.replace(observer="minmax"), kind="activation")
    fq(x)
    fq.freeze()
    return fq


# -- quantize_multiplier ------------------------------------------------------------------------------

@given(st.floats(min_value=2.0 ** -31, max_value=2.0 ** 20, allow_nan=False))
def test_quantize_multiplier_is_within_half_a_unit(real):
    m0, shift = quantize_multiplier(real)
    assert 2 ** 30 <= m0 < 2 ** 31
    unit = Fraction(2) ** (shift - 31)
    assert abs(m0 * unit - Fraction(real)) <= unit / 2


def test_quantize_multiplier_ties_round_half_away_and_renormalize():
    assert quantize_multiplier((2 ** 31 + 1) / 2 ** 32) == (2 ** 30 + 1, 0)  # fraction*2^31 = 2^30 + 0.5
    assert quantize_multiplier(1 - 2.0 ** -33) == (2 ** 30, 1)  # rounds to 2^31: renormalized
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0 ** -40) == (0, 0)  # right shift beyond 31: zero, as TFLite


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), 2.0 ** 31])
def test_quantize_multiplier_rejects_bad_reals(bad):
    with pytest.raises(IntegerizeError):
        quantize_multiplier(bad)


def test_a_multiplier_just_below_2_30_is_refused_as_rounding_to_it():
    """2^30 - 2^-22 rounds to M0 = 2^31, shift 31: refused, and the message had said it 'is >= 2^30'."""
    assert quantize_multiplier(2.0 ** 30 - 1) == (2 ** 31 - 2, 30)  # (2^31 - 2) 2^-1: representable
    with pytest.raises(IntegerizeError, match=r"1073741823\.9999998 rounds to 2\^30 or more"):
        quantize_multiplier(2.0 ** 30 - 2.0 ** -22)


# -- SaturatingRoundingDoublingHighMul / RoundingDivideByPOT ----------------------------------------------

def test_high_mul_ties_go_toward_plus_infinity():
    # a * 4 / 2^31 = +-0.5, +-1.5, +-2.5
    out = saturating_rounding_doubling_high_mul(i32(2 ** 28, -2 ** 28, 3 * 2 ** 28, -3 * 2 ** 28, 5 * 2 ** 28,
                                                    -5 * 2 ** 28), 4)
    assert out.tolist() == [1, 0, 2, -1, 3, -2]
    assert out.dtype == torch.int32


def test_high_mul_saturates_at_its_one_overflow():
    assert saturating_rounding_doubling_high_mul(i32(INT32_MIN), INT32_MIN).tolist() == [INT32_MAX]
    assert saturating_rounding_doubling_high_mul(i32(INT32_MAX), INT32_MIN).tolist() == [-INT32_MAX]


@given(INT32, INT32)
def test_high_mul_is_the_nearest_integer(a, b):
    out = int(saturating_rounding_doubling_high_mul(i32(a), b)[0])
    if a == b == INT32_MIN:
        assert out == INT32_MAX
    else:
        exact = Fraction(a * b, 2 ** 31)
        assert out == math.floor(exact + Fraction(1, 2))  # nearest, ties up


def test_divide_by_pot_ties_go_away_from_zero():
    x = i32(1, -1, 3, -3, 6, -6, 5, -5)
    assert rounding_divide_by_pot(x, 1).tolist() == [1, -1, 2, -2, 3, -3, 3, -3]
    assert rounding_divide_by_pot(x, 2).tolist() == [0, 0, 1, -1, 2, -2, 1, -1]


@given(INT32, st.integers(0, 31))
def test_divide_by_pot_is_round_half_away(x, e):
    assert int(rounding_divide_by_pot(i32(x), e)[0]) == round_half_away(Fraction(x, 2 ** e))


def test_divide_by_pot_at_its_bounds():
    assert rounding_divide_by_pot(i32(INT32_MIN, INT32_MAX), 31).tolist() == [-1, 1]
    assert rounding_divide_by_pot(i32(INT32_MIN, INT32_MAX), 0).tolist() == [INT32_MIN, INT32_MAX]
    with pytest.raises(IntegerizeError):
        rounding_divide_by_pot(i32(1), 32)


def test_float_input_is_refused():
    with pytest.raises(IntegerizeError, match="integer tensor"):
        rounding_divide_by_pot(torch.ones(2), 1)


# -- requantize --------------------------------------------------------------------------------------

@settings(deadline=None)
@given(st.integers(-2 ** 24, 2 ** 24), st.floats(1e-6, 0.99))
def test_requantize_rounds_twice_as_gemmlowp_and_stays_within_one_step(acc, real):
    m0, shift = quantize_multiplier(real)
    out = int(requantize(torch.tensor([acc], dtype=torch.int32), m0, shift, 3, -(2 ** 31), 2 ** 31 - 1,
                         rounding="double")[0])
    high = math.floor(Fraction(acc * m0, 2 ** 31) + Fraction(1, 2))  # ties up
    assert out - 3 == round_half_away(Fraction(high, 2 ** -shift))  # then half away from zero
    exact = Fraction(acc) * m0 * Fraction(2) ** (shift - 31)
    assert abs(out - 3 - exact) < 1


def test_requantize_double_rounding_example():
    # 263 * 0.15 = 39.45: the high multiply gives 158 (157.8), the shift by 2 gives 39.5 -> 40
    m0, shift = quantize_multiplier(0.15)
    assert requantize(i32(263), m0, shift, 0, -128, 127, rounding="double").tolist() == [40]
    assert requantize(i32(263), m0, shift, 0, -128, 127).tolist() == [39]  # single rounding


@settings(deadline=None)
@given(st.integers(INT32_MIN, INT32_MAX), st.floats(2.0 ** -31, 2.0 ** 20))
def test_single_rounding_requantize_rounds_once_ties_up(acc, real):
    m0, shift = quantize_multiplier(real)
    out = int(requantize(torch.tensor([acc], dtype=torch.int32), m0, shift, 0, INT32_MIN, INT32_MAX)[0])
    exact = Fraction(acc * m0) * Fraction(2) ** (shift - 31)
    assert out == min(max(math.floor(exact + Fraction(1, 2)), INT32_MIN), INT32_MAX)


def test_single_rounding_ties():
    m0, shift = quantize_multiplier(0.5)  # x / 2
    assert requantize(i32(1, -1, 3, -3), m0, shift, 0, -128, 127).tolist() == [1, 0, 2, -1]


def test_requantize_per_channel_and_saturation():
    acc = torch.tensor([[1000, -1000], [100000, -100000]], dtype=torch.int32)  # (rows, C)
    rq = Requant.from_scales(torch.tensor([0.01, 0.5]), zero_point=-5, qmin=-128, qmax=127)
    out = rq(acc, axis=-1)
    assert out.dtype == torch.int8
    assert out.tolist() == [[10 - 5, -128], [127, -128]]  # 1000 * 0.01 - 5; the rest saturates


def test_requantize_at_the_int32_bound():
    m0, shift = quantize_multiplier(1.0 - 2.0 ** -30)
    for rounding in ("single", "double"):
        out = requantize(i32(INT32_MAX, INT32_MIN), m0, shift, 0, INT32_MIN, INT32_MAX, rounding=rounding)
        assert out.tolist() == [INT32_MAX - 2, INT32_MIN + 2]
    m0, shift = quantize_multiplier(4.0)  # double: the left shift saturates the operand to int32 first
    assert requantize(i32(INT32_MAX), m0, shift, 0, INT32_MIN, INT32_MAX, rounding="double").tolist() == [2 ** 30]
    assert requantize(i32(INT32_MAX), m0, shift, 0, INT32_MIN, INT32_MAX).tolist() == [INT32_MAX]  # single
    for rounding in ("single", "double"):
        out = requantize(i32(INT32_MAX, 2 ** 27, -2 ** 27), m0, shift, 0, -128, 127, rounding=rounding)
        assert out.tolist() == [127, 127, -128]
    with pytest.raises(IntegerizeError, match="outside int32"):
        requantize(torch.tensor([2 ** 31], dtype=torch.int64), m0, shift, 0, -128, 127)


# -- rescaled add -------------------------------------------------------------------------------------

def test_rescaled_add_agrees_with_the_fake_quant_add():
    torch.manual_seed(0)
    a, b = torch.randn(4000) * 2, torch.randn(4000) * 0.3
    qa, qb = grid_of(a), grid_of(b)
    qout = grid_of(qa(a) + qb(b))
    ga, gb, go = Grid.of(qa), Grid.of(qb), Grid.of(qout)
    params = AddParams.build(ga.scale, gb.scale, go.scale, go.zero_point, go.qmin, go.qmax)
    out = rescaled_add(ga.quantize(a), ga.zero_point, gb.quantize(b), gb.zero_point, params)
    reference = go.quantize(qout(qa(a) + qb(b)))
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.99


def test_wide_operands_get_a_shift_that_keeps_them_exact():
    """The 20-bit shift of 8-bit operands would wrap a 12-bit operand's ``(q - zp) << 20`` around
    int32 (the sums of a model with 14-bit residual grids were garbage); ``add_input_bits`` gives
    the bits of the operands' largest ``|code - zero point|``, at least 8."""
    g8, g14 = Grid(0.01, 3, -128, 127), Grid(0.01, 0, -8192, 8191)
    assert add_input_bits(g8, g8) == 8 and add_input_bits(Grid(0.1, 0, 0, 15), g8) == 8
    assert add_input_bits(g8, g14) == 14
    per_channel = ChannelGrid(torch.tensor([0.1, 0.2]), torch.tensor([0, 2000]), 0, 4095)
    assert add_input_bits(per_channel) == 12
    codes = torch.tensor([2047, 2048, 3000, -8192, 8191], dtype=torch.int16)
    with pytest.raises(IntegerizeError, match="input_bits"):  # the 8-bit shift would wrap: refused
        rescaled_sum(codes, 0, codes * 0, 0, AddParams.build(0.01, 0.01))
    params = AddParams.build(0.01, 0.01, input_bits=add_input_bits(g14, g14))
    exact = rescaled_sum(codes, 0, codes * 0, 0, params)
    # each operand's value on the sum's grid: s (q - zp) / sum_scale = (q - zp) 2^left / 2
    assert exact.tolist() == (codes.to(torch.int64) * 2 ** (params.left_shift - 1)).tolist()


def test_rescaled_add_at_its_bound():
    # the largest operands: |q - zp| = 255 on both sides, equal scales
    go = Grid(0.01, 0, -128, 127)
    params = AddParams.build(0.01, 0.01, 0.01, 0, -(2 ** 31), 2 ** 31 - 1)
    qa = torch.tensor([255, 0], dtype=torch.uint8)
    out = rescaled_add(qa, 0, qa, 0, params)
    assert out.tolist() == [510, 0]
    params16 = AddParams.build(1.0, 1.0, 1.0, 0, INT32_MIN, INT32_MAX, input_bits=16)
    big = torch.tensor([32767, -32768], dtype=torch.int16)
    assert rescaled_add(big, -32768, big, -32768, params16).tolist() == [131070, 0]
    assert go.dtype == torch.int8
    with pytest.raises(IntegerizeError):
        AddParams.build(1.0, 1.0, 1.0, 0, -128, 127, input_bits=17)


def test_codes_wider_than_an_op_was_built_for_are_refused_not_wrapped():
    """int32 wraparound is never an answer: codes of 16 bits in an add built for 8-bit inputs
    (their 20-bit shift would leave int32), codes beyond a constant add's grid, and an int64
    beyond int32 in rounding_divide_by_pot are refused with IntegerizeError."""
    params = AddParams.build(1.0, 1.0, 1.0, 0, -128, 127)  # input_bits 8
    wide = torch.tensor([3000, -5], dtype=torch.int16)
    with pytest.raises(IntegerizeError, match="input_bits"):
        rescaled_sum(wide, 0, torch.zeros(2, dtype=torch.int8), 0, params)
    with pytest.raises(IntegerizeError, match="input_bits"):
        rescaled_add(torch.zeros(2, dtype=torch.int8), 0, wide, 0, params)
    assert rescaled_sum(torch.tensor([255, 0], dtype=torch.int16), 0, wide * 0, 0, params).tolist() == [
        255 << (params.left_shift - 1), 0]  # the widest 8-bit span still passes
    per_channel = AddParams.build(torch.ones(2), torch.ones(2))
    with pytest.raises(IntegerizeError, match="steps from its zero point"):
        rescaled_sum(torch.tensor([[0, 300]], dtype=torch.int16), torch.tensor([0, 0]),
                     torch.zeros(1, 2, dtype=torch.int16), torch.tensor([0, 0]), per_channel)
    grid = Grid(1.0, 0, -128, 127)
    constant = ConstantAddParams.build(grid, torch.tensor([2.0 ** 14]), grid)
    assert add_constant(torch.tensor([127, -128], dtype=torch.int8), constant).tolist() == [127, 127]  # saturated
    with pytest.raises(IntegerizeError, match="grid ConstantAddParams was built for"):
        add_constant(torch.tensor([40000], dtype=torch.int32), constant)
    with pytest.raises(IntegerizeError, match="int32 values"):
        rounding_divide_by_pot(torch.tensor([2 ** 40, -(2 ** 33) - 3]), 1)
    assert rounding_divide_by_pot(torch.tensor([INT32_MAX, INT32_MIN]), 1).tolist() == [2 ** 30, -(2 ** 30)]


# -- isqrt --------------------------------------------------------------------------------------------

@given(st.lists(st.integers(0, ISQRT_MAX), min_size=1, max_size=20))
def test_isqrt_is_floor_sqrt(values):
    n = torch.tensor(values, dtype=torch.int64)
    assert isqrt(n).tolist() == [math.isqrt(v) for v in values]


def test_isqrt_at_its_bounds_and_squares():
    edges = [0, 1, 2, 3, 4, 2 ** 62, 2 ** 62 - 1] + [k * k for k in range(1, 200)] + [k * k - 1 for k in range(1, 200)]
    assert isqrt(torch.tensor(edges)).tolist() == [math.isqrt(v) for v in edges]
    with pytest.raises(IntegerizeError):
        isqrt(torch.tensor([-1]))
    with pytest.raises(IntegerizeError):
        isqrt(torch.tensor([2 ** 62 + 1]))


# -- lookup tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [F.gelu, F.silu, torch.sigmoid, torch.tanh, torch.exp, F.relu],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8),
                                  QuantSpec(bits=4, symmetric=False)], ids=lambda s: s.short())
def test_lut_is_bit_exact_with_the_fake_quant_elementwise_op(fn, spec):
    torch.manual_seed(1)
    x = torch.randn(2000) * 3
    q_in = grid_of(x, spec)
    q_out = grid_of(fn(q_in(x)), spec)
    g_in, g_out = Grid.of(q_in), Grid.of(q_out)
    table = build_lut(fn, g_in, g_out)
    assert table.dtype == g_out.dtype and table.numel() == g_in.qmax - g_in.qmin + 1
    out = apply_lut(g_in.quantize(x), table, g_in.qmin)
    assert torch.equal(out, g_out.quantize(q_out(fn(q_in(x)))))


def test_lut_refuses_a_domain_wider_than_16_bits():
    with pytest.raises(IntegerizeError, match="piecewise"):
        build_lut(torch.exp, Grid(1.0, 0, 0, 2 ** 17), Grid(1.0, 0, 0, 255))


# -- softmax ------------------------------------------------------------------------------------------

def softmax_case(t=6, s=40, seed=0):
    torch.manual_seed(seed)
    scores = torch.randn(8, t, s) * 4
    q_in = grid_of(scores)
    q_out = grid_of(torch.softmax(q_in(scores), -1), QuantSpec(bits=8, signed=False, symmetric=False))
    return scores, q_in, q_out


def test_integer_softmax_agrees_with_the_fake_quant_softmax():
    scores, q_in, q_out = softmax_case()
    g_in, g_out = Grid.of(q_in), Grid.of(q_out)
    out = integer_softmax(g_in.quantize(scores), SoftmaxParams.build(g_in, g_out))
    reference = g_out.quantize(q_out(torch.softmax(q_in(scores), -1)))
    assert out.dtype == torch.uint8
    assert int((out.to(torch.int64) - reference.to(torch.int64)).abs().max()) <= 1


def test_integer_softmax_masks_and_fully_blocked_rows():
    scores, q_in, q_out = softmax_case(t=3, s=5)
    g_in, g_out = Grid.of(q_in), Grid.of(q_out)
    blocked = torch.zeros(8, 3, 5, dtype=torch.bool)
    blocked[:, 0, 2:] = True
    blocked[:, 2, :] = True
    out = integer_softmax(g_in.quantize(scores), SoftmaxParams.build(g_in, g_out), blocked)
    masked = q_in(scores).masked_fill(blocked, float("-inf"))
    reference = g_out.quantize(q_out(torch.softmax(masked, -1)))
    assert torch.equal(out[:, 0, 2:], torch.full_like(out[:, 0, 2:], g_out.zero_point))
    assert int((out[:, :2].to(torch.int64) - reference[:, :2].to(torch.int64)).abs().max()) <= 1
    assert torch.equal(out[:, 2], torch.full_like(out[:, 2], g_out.zero_point))  # float: NaN


def test_integer_softmax_at_its_row_bound():
    g_in, g_out = Grid(0.1, 0, -128, 127), Grid(1 / 255, 0, 0, 255)
    params = SoftmaxParams.build(g_in, g_out)
    row = torch.full((1, 2 ** 11 - 1), 127, dtype=torch.int8)  # every exp at 2^20: sum 2^31 - 2^20
    out = integer_softmax(row, params)
    assert out.unique().tolist() == [0]  # 1 / 2047 of a row: below half a step of 1/255
    one = integer_softmax(torch.tensor([[127, -128]], dtype=torch.int8), params)
    assert one.tolist() == [[255, 0]]
    # from 2^11 positions the row sum is int64: 2^11 exps at 2^20 sum to 2^31, one past int32's range
    # (it had been refused: the integer model stopped on a 41 s wav2vec 2.0 utterance)
    assert integer_softmax(torch.full((1, 2 ** 11), 127, dtype=torch.int8), params).unique().tolist() == [0]
    peak = torch.full((1, 2 ** 12), -128, dtype=torch.int8)
    peak[0, 5] = 127
    assert integer_softmax(peak, params)[0, 5].item() == 255


# -- LayerNorm ----------------------------------------------------------------------------------------

def layer_norm_case(n=64, seed=0, per_channel=False):
    torch.manual_seed(seed)
    x = torch.randn(50, n) * 2 + 0.5
    gamma, beta = torch.rand(n) + 0.5, torch.randn(n) * 0.1
    q_in = grid_of(x)
    wspec = QuantSpec(bits=8, granularity="per_channel", axis=0) if per_channel else QuantSpec(bits=8)
    q_gamma, q_beta = FakeQuantize(wspec, kind="weight"), FakeQuantize(QuantSpec(bits=8), kind="weight")
    g, b = q_gamma(gamma), q_beta(beta)
    q_out = grid_of(F.layer_norm(q_in(x), (n,), g, b, 1e-5))
    reference = Grid.of(q_out).quantize(q_out(F.layer_norm(q_in(x), (n,), g, b, 1e-5)))
    gamma_codes = torch.round(g / q_gamma.scale).to(torch.int32)
    gamma_scale = q_gamma.scale if per_channel else float(q_gamma.scale)
    params = LayerNormParams.build(n, 1e-5, Grid.of(q_in).scale, gamma_codes, gamma_scale, b, Grid.of(q_out))
    return Grid.of(q_in).quantize(x), params, reference


@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_layer_norm_agrees_with_the_fake_quant_layer_norm(per_channel):
    codes, params, reference = layer_norm_case(per_channel=per_channel)
    out = integer_layer_norm(codes, params)
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.97


def test_integer_layer_norm_constant_rows_give_beta():
    codes, params, _ = layer_norm_case(n=16)
    out = integer_layer_norm(torch.full((2, 16), 7, dtype=torch.uint8), params)
    expected = params.out(params.beta.expand(2, 16).contiguous())
    assert torch.equal(out, expected)


def test_integer_layer_norm_at_its_bound():
    n = 4096
    codes = torch.tensor([0, 255] * (n // 2), dtype=torch.uint8).reshape(1, n)  # largest |c| and variance
    gamma = torch.full((n,), 127, dtype=torch.int32)
    params = LayerNormParams.build(n, 1e-5, 0.05, gamma, 1 / 127, None, Grid(1 / 64, 0, -128, 127))
    out = integer_layer_norm(codes, params)
    assert out.tolist() == [[-64, 64] * (n // 2)]  # +-1 exactly (eps is negligible), times gamma 1
    with pytest.raises(IntegerizeError):
        LayerNormParams.build(n + 1, 1e-5, 0.05, gamma, 1 / 127, None, Grid(1 / 64, 0, -128, 127))


def test_integer_layer_norm_acc_is_what_it_requantizes():
    """Without an output grid the norm gives its int32 affine accumulator (a post-norm layer's
    stream, on ``acc_scale``); requantized, it is ``integer_layer_norm``'s output."""
    codes, params, _ = layer_norm_case()
    acc = integer_layer_norm_acc(codes, params)
    assert acc.dtype == torch.int32
    assert torch.equal(params.out(acc), integer_layer_norm(codes, params))
    bare = LayerNormParams(params.eps_int, params.gamma, params.beta, None, params.acc_scale)
    with pytest.raises(IntegerizeError, match="output grid"):
        integer_layer_norm(codes, bare)


# -- constant add -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_add_constant_agrees_with_the_fake_quant_add(seed):
    """``q + u`` (rel-pos attention's bias) onto an output grid: the constant folded 2^-16 of an
    input step, one rounding; off the fake-quant codes only within 1e-4 of a tie."""
    torch.manual_seed(seed)
    x, u = torch.randn(30, 16) * 2, torch.randn(16) * 0.7
    q_in = grid_of(x)
    q_out = grid_of(q_in(x) + u)
    params = ConstantAddParams.build(Grid.of(q_in), u, Grid.of(q_out))
    codes = add_constant(Grid.of(q_in).quantize(x), params)
    reference = Grid.of(q_out).quantize(q_out(q_in(x) + u))
    exact = (q_in(x).double() + u.double()) / Grid.of(q_out).scale
    diff = (codes.long() - reference.long()).abs()
    assert int(diff.max()) <= 1
    frac = (exact - exact.floor() - 0.5).abs()
    assert bool((frac[diff > 0] < 1e-4).all())


def test_add_constant_bound():
    """``|q - zp| << 16`` plus the folded constant must stay in int32: a constant of 2^15 input
    steps is refused."""
    grid = Grid(1.0, 0, -128, 127)
    ConstantAddParams.build(grid, torch.tensor([2.0 ** 14]), grid)
    with pytest.raises(IntegerizeError, match="constant add"):
        ConstantAddParams.build(grid, torch.tensor([2.0 ** 15]), grid)


# -- GroupNorm ----------------------------------------------------------------------------------------

def group_norm_case(groups, channels=8, steps=300, seed=0, per_channel=False):
    torch.manual_seed(seed)
    x = torch.randn(2, channels, steps) * torch.linspace(0.5, 3, channels).view(1, -1, 1) + 0.3
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels) * 0.1
    q_in = grid_of(x)
    wspec = QuantSpec(bits=8, granularity="per_channel", axis=0) if per_channel else QuantSpec(bits=8)
    q_gamma, q_beta = FakeQuantize(wspec, kind="weight"), FakeQuantize(QuantSpec(bits=8), kind="weight")
    g, b = q_gamma(gamma), q_beta(beta)
    y = F.group_norm(q_in(x), groups, g, b, 1e-5)
    q_out = grid_of(y)
    reference = Grid.of(q_out).quantize(q_out(y))
    gamma_scale = q_gamma.scale if per_channel else float(q_gamma.scale)
    params = GroupNormParams.build(groups, channels, 1e-5, Grid.of(q_in), torch.round(g / q_gamma.scale).to(torch.int32),
                                   gamma_scale, b, Grid.of(q_out))
    return Grid.of(q_in).quantize(x), params, reference


@pytest.mark.parametrize("groups,per_channel", [(8, False), (8, True), (2, False), (1, True)])
def test_integer_group_norm_agrees_with_the_fake_quant_group_norm(groups, per_channel):
    """Within one step on near-ties (float32 statistics in ``F.group_norm``), per channel and
    per tensor gamma, one channel per group (wav2vec 2.0's extractor) or several."""
    codes, params, reference = group_norm_case(groups, per_channel=per_channel)
    out = integer_group_norm(codes, params)
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.99


def test_integer_group_norm_of_one_group_per_row_is_the_layer_norm():
    """Over a few values both compute the same ``_normalized`` with 10 deviation fraction bits,
    and the same eps (rounded half to even): the same codes."""
    codes, params, _ = group_norm_case(8, steps=64)
    ln = LayerNormParams.build(64, 1e-5, 1.0, params.gamma[:1].expand(64), 1.0, None, None)
    gn = GroupNormParams(8, (ln.eps_int, 64 * 64), params.span, params.gamma[:1].expand(8).contiguous(),
                         torch.zeros(8, dtype=torch.int32), None, 1.0)
    assert torch.equal(integer_group_norm(codes, gn), integer_layer_norm_acc(codes, ln))


def test_integer_group_norm_at_its_bound():
    """2^22 values in one group at the largest variance of 8-bit codes: ``V = N^2 255^2 / 4``
    is 2^58, the deviation keeps 2 fraction bits, and every value is exactly +-1 (times gamma);
    one more value is refused."""
    n = GN_MAX = 2 ** 22
    codes = torch.tensor([0, 255], dtype=torch.uint8).repeat(n // 2).reshape(1, 1, n)
    params = GroupNormParams.build(1, 1, 1e-5, Grid(0.05, 128, 0, 255), torch.tensor([127], dtype=torch.int32),
                                   1 / 127, None, Grid(1 / 64, 0, -128, 127))
    out = integer_group_norm(codes, params)
    assert out[0, 0, :4].tolist() == [-64, 64, -64, 64] and int(out.to(torch.int64).abs().min()) == 64
    with pytest.raises(IntegerizeError, match="at most"):
        integer_group_norm(torch.zeros(1, 1, GN_MAX + 1, dtype=torch.uint8), params)


def test_integer_group_norm_needs_whole_groups():
    with pytest.raises(IntegerizeError, match="whole number"):
        GroupNormParams.build(3, 8, 1e-5, Grid(0.05, 0, -128, 127), torch.ones(8, dtype=torch.int32), 1.0, None, None)


# -- GLU ------------------------------------------------------------------------------------------------

def test_integer_glu_agrees_with_the_fake_quant_glu():
    torch.manual_seed(2)
    x = torch.randn(40, 64) * 3
    q_in = grid_of(x)
    q_out = grid_of(F.glu(q_in(x), dim=-1))
    g_in, g_out = Grid.of(q_in), Grid.of(q_out)
    out = integer_glu(g_in.quantize(x), GluParams.build(g_in, g_out))
    reference = g_out.quantize(q_out(F.glu(q_in(x), dim=-1)))
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99


def test_integer_glu_onto_a_grid_per_channel_agrees_with_the_fake_quant_glu():
    """The conv subsampler's last GLU onto a per-channel embed grid (``ChannelGrid``): one
    multiplier and zero point per output channel along the GLU's axis (``dim=1`` of (B, C, T))."""
    torch.manual_seed(3)
    x = torch.randn(2, 16, 30) * torch.linspace(0.2, 6, 8).repeat(2)[None, :, None]  # (B, 2C, T): channels differ
    q_in = grid_of(x)
    glu = F.glu(q_in(x), dim=1)  # (B, C, T)
    q_out = grid_of(glu.transpose(1, 2), QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1))
    g_in, g_out = Grid.of(q_in), stream_grid(q_out)
    assert isinstance(g_out, ChannelGrid) and len(set(g_out.scale.tolist())) > 1
    out = integer_glu(g_in.quantize(x), GluParams.build(g_in, g_out), dim=1)  # (B, C, T) codes
    reference = g_out.quantize(q_out(glu.transpose(1, 2))).transpose(1, 2)
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.99  # measured: max 0


def test_integer_glu_at_its_bound():
    # 16-bit inputs: |a - zp| = 65535 times a gate of 2^15 is 2^31 - 2^15, the largest product
    g_in = Grid(1.0, -32768, -32768, 32767)
    params = GluParams.build(g_in, Grid(1.0, 0, INT32_MIN, INT32_MAX))
    codes = torch.tensor([[32767, 32767]], dtype=torch.int16)  # a = b = 65535 steps above zp
    assert int(params.gate[-1]) == 2 ** 15
    assert integer_glu(codes, params).tolist() == [[65535]]


# -- per-channel residual stream (ChannelGrid): requantize, add, common grid, LayerNorm ----------------

CHANNEL_SPEC = QuantSpec(bits=4, symmetric=False, granularity="per_channel", axis=-1)


def channel_case(bits=4, seed=0, n=32):
    """Channels of very different ranges (outlier channels, as the residual stream has), their
    per-channel FakeQuantize (frozen) and ChannelGrid."""
    torch.manual_seed(seed)
    x = torch.randn(200, n) * torch.logspace(-2, 1, n) + torch.linspace(-1, 1, n)
    fq = grid_of(x, CHANNEL_SPEC.replace(bits=bits))
    return x, fq, stream_grid(fq)


def test_stream_grid_is_per_tensor_or_per_channel_of_the_last_axis():
    x, fq, grid = channel_case()
    assert isinstance(grid, ChannelGrid) and grid.scale.shape == (32,) and grid.zero_point.dtype == torch.int64
    assert torch.equal(grid.quantize(x).to(torch.int64), torch.round(fq(x) / fq.scale).to(torch.int64) + fq.zero_point)
    assert isinstance(stream_grid(grid_of(x)), Grid)
    with pytest.raises(IntegerizeError, match="axis: -1"):
        stream_grid(grid_of(x.T.contiguous(), CHANNEL_SPEC.replace(axis=0)))


def test_requantize_onto_a_channel_grid_agrees_with_its_quantizer():
    """An int32 stream (a fine per-tensor grid) onto per-channel codes with per-channel zero
    points: single rounding, so the fake-quant codes except within 2^-30 of a tie."""
    x, fq, grid = channel_case()
    fine = float(grid.scale.min()) * 2.0 ** -16
    stream = torch.round(x.double() / fine).to(torch.int32)
    codes = Requant.from_scales(fine / grid.scale, grid.zero_point, grid.qmin, grid.qmax)(stream)
    reference = grid.quantize((stream.double() * fine).float())
    assert codes.dtype == grid.dtype == torch.int8  # 4-bit affine codes in [-8, 7]
    diff = (codes.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.999


def test_per_channel_rescaled_sum_is_the_fake_quant_sum_in_grid_steps():
    """``s_a[c] (qa - zp_a[c]) + s_b[c] (qb - zp_b[c])`` per channel on ``sum_scale[c]``: within one
    step of the exact sum (two roundings per operand), and requantized onto the next per-channel
    grid, the fake-quant codes of that sum except at near-ties."""
    x, fq_a, ga = channel_case(seed=0)
    y, fq_b, gb = channel_case(seed=1)
    params = AddParams.build(ga.scale, gb.scale, input_bits=4)
    assert params.sum_scale.shape == (32,) and params.a[0].dtype == torch.int64
    qa, qb = ga.quantize(x), gb.quantize(y)
    total = rescaled_sum(qa, ga.zero_point, qb, gb.zero_point, params)
    assert total.dtype == torch.int32
    exact = (qa.double() - ga.zero_point) * ga.scale + (qb.double() - gb.zero_point) * gb.scale  # float64
    assert float((total.double() - exact / params.sum_scale).abs().max()) <= 1.0
    fq_out = grid_of(fq_a(x) + fq_b(y), CHANNEL_SPEC)
    g_out = stream_grid(fq_out)
    codes = Requant.from_scales(params.sum_scale / g_out.scale, g_out.zero_point, g_out.qmin, g_out.qmax)(total)
    diff = (codes.to(torch.int64) - g_out.quantize(fq_a(x) + fq_b(y)).to(torch.int64)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.99


def test_per_channel_rescaled_sum_at_its_bound():
    """The largest operands of 8-bit inputs, in each channel on its own scale: every channel's
    sum is ``(|qa - zp| + |qb - zp|) 2^19`` exactly, below 2^28."""
    scales = torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64)
    params = AddParams.build(scales, scales)
    zp = torch.tensor([0, 255, 0])
    qa = torch.tensor([[255, 0, 255]], dtype=torch.uint8)
    out = rescaled_sum(qa, zp, qa, zp, params)
    assert out.tolist() == [[510 * 2 ** 19, -510 * 2 ** 19, 510 * 2 ** 19]]
    assert int(out.abs().max()) < 2 ** 28


def test_common_grid_is_the_fake_quant_value_within_half_a_step():
    x, fq, grid = channel_case()
    params = CommonGridParams.build(grid)
    values = common_grid(grid.quantize(x), params)
    assert values.dtype == torch.int32
    err = (values.double() - fq(x).double() / params.scale).abs()
    assert float(err.max()) <= 0.5 + 1e-3  # float32 value of the fake-quant product: ~1e-7 relative


def test_common_grid_at_its_bound():
    """Each channel's extreme codes: the widest channel lands on +-2^16 (the bound), the others
    inside; ties of the single rounding go toward +inf."""
    grid = ChannelGrid(torch.tensor([0.5, 0.25, 2.0 ** -20], dtype=torch.float64), torch.tensor([0, 15, 8]), 0, 15)
    params = CommonGridParams.build(grid)
    assert params.scale == 0.5 * 15 * 2.0 ** -16
    values = common_grid(torch.tensor([[15, 0, 0], [0, 15, 15]], dtype=torch.uint8), params)
    assert values[0, 0] == 2 ** 16 and values[1, 1] == 0
    assert int(values.abs().max()) <= params.bound
    assert values[0, 2].item() == round(-8 * 2.0 ** -20 / params.scale)  # a far finer channel keeps its value


def per_channel_layer_norm_case(n=64, seed=0):
    """A LayerNorm reading per-channel codes (the stream recipe's norm input), 8-bit output."""
    torch.manual_seed(seed)
    x = torch.randn(50, n) * torch.logspace(-1, 1, n)
    gamma, beta = torch.rand(n) + 0.5, torch.randn(n) * 0.1
    q_in = grid_of(x, CHANNEL_SPEC)
    q_gamma, q_beta = FakeQuantize(QuantSpec(bits=8), kind="weight"), FakeQuantize(QuantSpec(bits=8), kind="weight")
    g, b = q_gamma(gamma), q_beta(beta)
    fake = F.layer_norm(q_in(x), (n,), g, b, 1e-5)
    q_out = grid_of(fake)
    grid = stream_grid(q_in)
    common = CommonGridParams.build(grid)
    params = LayerNormParams.build(n, 1e-5, common.scale, torch.round(g / q_gamma.scale).to(torch.int32),
                                   float(q_gamma.scale), b, Grid.of(q_out), input_bound=common.bound)
    return grid.quantize(x), common, params, Grid.of(q_out).quantize(q_out(fake))


def test_layer_norm_of_per_channel_codes_agrees_with_the_fake_quant_layer_norm():
    codes, common, params, reference = per_channel_layer_norm_case()
    assert params.sqrt_bits == 8  # N = 64 values of |v| <= 2^16: V + eps_int < 2^45, so (62 - 45) // 2
    out = integer_layer_norm(common_grid(codes, common), params)
    diff = (out.to(torch.int64) - reference.to(torch.int64)).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.97


def test_layer_norm_of_common_grid_values_at_its_bound():
    """4096 features at +-2^16 (the common grid's bound, the largest variance): the variance
    stays within int64 (sqrt_bits 2) and the result is +-1 exactly."""
    n = 4096
    values = torch.tensor([-(2 ** 16), 2 ** 16] * (n // 2), dtype=torch.int32).reshape(1, n)
    gamma = torch.full((n,), 127, dtype=torch.int32)
    params = LayerNormParams.build(n, 1e-5, 1e-3, gamma, 1 / 127, None, Grid(1 / 64, 0, -128, 127),
                                   input_bound=2 ** 16)
    assert params.sqrt_bits == 2
    assert integer_layer_norm(values, params).tolist() == [[-64, 64] * (n // 2)]
    with pytest.raises(IntegerizeError, match="int64"):
        LayerNormParams.build(n, 1e-5, 1e-3, gamma, 1 / 127, None, None, input_bound=2 ** 20)


# -- exact integer GEMMs on float kernels (the simulation's) and the short requantization ------------

def _int_op(op, a, b, bias=None, **kwargs):
    """The reference: ``op`` on int32 operands (torch's integer kernels), as the integer model runs it."""
    args = (a.to(torch.int32), b.to(torch.int32)) + (() if bias is None else (bias.to(torch.int32),))
    return op(*args, **kwargs)


@pytest.mark.parametrize("seed", range(3))
def test_exact_gemm_is_the_int32_gemm_on_random_codes(seed):
    from qswap.quant.integer import exact_gemm
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (3, 5, 96), generator=g).float()  # centered codes as floats
    w = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    bias = torch.randint(-2 ** 20, 2 ** 20, (40,), generator=g, dtype=torch.int32)
    out = exact_gemm(F.linear, x, w, 96, bias)
    assert out.dtype == torch.int32 and torch.equal(out, _int_op(F.linear, x, w, bias))
    a, b = torch.randint(-255, 256, (2, 7, 64), generator=g), torch.randint(-255, 256, (2, 64, 9), generator=g)
    assert torch.equal(exact_gemm(torch.bmm, a.float(), b.float(), 64), _int_op(torch.bmm, a, b))
    signal, kernel = torch.randint(-128, 128, (2, 6, 30), generator=g), torch.randint(-127, 128, (8, 6, 5), generator=g)
    assert torch.equal(exact_gemm(F.conv1d, signal.float(), kernel, 30, padding=2, stride=2),
                       _int_op(F.conv1d, signal, kernel, padding=2, stride=2))


@pytest.mark.parametrize("k, expected", [(256, torch.float32), (1040, torch.float32), (1041, torch.float64),
                                         (2 ** 16, torch.float64)])
def test_exact_gemm_at_extreme_codes_picks_float32_below_2_24_and_float64_above(k, expected):
    """Every code at its extreme (the largest partial sums: k * 127 * 127 = 2^24 - 1 at k = 1040,
    one more row crosses it): float32 rounds above 2^24, so the bound must send it to float64;
    the result is the int32 GEMM's, exactly, on both sides, with signs alternating and not."""
    from qswap.quant.integer import FLOAT32_EXACT, exact_float_dtype, exact_gemm
    assert (k * 127 * 127 < FLOAT32_EXACT) == (expected == torch.float32)
    assert exact_float_dtype(k * 127 * 127, torch.device("cpu")) == expected
    a = torch.full((2, k), 127.0)
    a[1, ::2] = -127.0
    w = torch.full((3, k), 127, dtype=torch.int8)
    w[1] = -127
    w[2, 1::3] = -127
    bias = torch.tensor([1, -1, 0], dtype=torch.int32)
    out = exact_gemm(F.linear, a, w, k, bias)
    assert torch.equal(out, _int_op(F.linear, a, w, bias))
    assert int(out[0, 0]) == k * 127 * 127 + 1
    if expected == torch.float64:  # the reason: float32 itself rounds this sum
        one_odd = torch.full((1, k), 127.0)
        one_odd[0, 0] = 1.0  # k 127^2 - 16128: odd, beyond 2^24 for large k
        exact = int(_int_op(F.linear, one_odd, w[:1]).item())
        assert int(exact_gemm(F.linear, one_odd, w[:1], k).item()) == exact
        if exact > FLOAT32_EXACT:
            assert int(F.linear(one_odd, w[:1].float()).item()) != exact


def test_exact_gemm_refuses_a_bound_beyond_float64():
    from qswap.quant.integer import exact_float_dtype
    with pytest.raises(IntegerizeError, match="2\\^53"):
        exact_float_dtype(2 ** 53, torch.device("cpu"))


@given(st.lists(INT32, min_size=1, max_size=40), st.floats(1e-6, 0.99), st.integers(-128, 127))
@settings(max_examples=200, deadline=None)
def test_short_single_rounding_requantize_is_the_general_one(accs, real, zero_point):
    """requantize's five-pass per-tensor path gives the general path's codes (per-tensor ints take the
    short path; the same multiplier as 1-element tensors takes the general one), and
    ``requantized_values`` their dequantized values, bit for bit."""
    from qswap.quant.integer import requantized_values
    m0, shift = quantize_multiplier(real)
    acc = torch.tensor(accs, dtype=torch.int32)
    short = requantize(acc, m0, shift, zero_point, -128, 127)
    general = requantize(acc, torch.tensor([m0]), torch.tensor([shift]), zero_point, -128, 127)
    assert short.dtype == general.dtype == torch.int8 and torch.equal(short, general)
    requant, scale = Requant(m0, shift, zero_point, -128, 127), 0.0371
    values = requantized_values(requant, acc, scale)
    assert torch.equal(values, (short.to(torch.int32) - zero_point).to(torch.float32) * scale)


def test_short_requantize_at_ties_and_saturation():
    from qswap.quant.integer import requantized_values
    m0, shift = quantize_multiplier(0.5)
    acc = i32(-3, -1, 1, 3, INT32_MIN, INT32_MAX, 255, 256)
    expected = requantize(acc, torch.tensor([m0]), torch.tensor([shift]), 3, 0, 255)  # general path
    assert torch.equal(requantize(acc, m0, shift, 3, 0, 255), expected)
    assert requantize(i32(1, 3, -1), m0, shift, 0, -128, 127).tolist() == [1, 2, 0]  # ties toward +inf
    values = requantized_values(Requant(m0, shift, 3, 0, 255), acc, 0.5)
    assert torch.equal(values, (expected.to(torch.int32) - 3).to(torch.float32) * 0.5)


def test_exact_gemm_leaves_float32_when_float32_matmuls_may_round():
    """A reduced-precision float32 matmul setting (TF32 / bf16 inside float32 GEMMs) would round
    the partial sums: then every bound goes to float64."""
    from qswap.quant.integer import exact_float_dtype
    cpu = torch.device("cpu")
    assert exact_float_dtype(1000, cpu) == torch.float32
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert exact_float_dtype(1000, cpu) == torch.float64
    finally:
        torch.set_float32_matmul_precision(saved)
    assert exact_float_dtype(1000, torch.device("meta")) == torch.float64


def test_one_multiplier_takes_the_same_integers_as_per_channel_multipliers():
    """``multiply_by_quantized_multiplier`` with Python-int M0 and shift (its scalar passes) equals
    the general path (one-value tensors), at the int32 extremes, on ties and for every shift."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([i32(INT32_MIN, INT32_MAX, 0, -1, 1, 2 ** 30, -(2 ** 30)),
                   torch.randint(-(2 ** 31), 2 ** 31 - 1, (500,), generator=g, dtype=torch.int64).to(torch.int32),
                   torch.arange(-300, 300, dtype=torch.int32)])
    for m0 in (0, 1, 2 ** 30, 2 ** 31 - 1, 1518500250, 1276901417):
        for shift in range(-31, 31):
            scalar = multiply_by_quantized_multiplier(x, m0, shift)
            general = multiply_by_quantized_multiplier(x, torch.tensor([m0]), torch.tensor([shift]))
            assert scalar.dtype == general.dtype == torch.int32 and torch.equal(scalar, general), (m0, shift)
    wide = torch.tensor([2 ** 40, -(2 ** 40), 3], dtype=torch.int64)  # int64 beyond int32: the saturating path
    assert torch.equal(multiply_by_quantized_multiplier(wide, 2 ** 30, 0),
                       multiply_by_quantized_multiplier(wide, torch.tensor([2 ** 30]), torch.tensor([0])))


def test_a_learned_scale_at_zero_is_an_integerize_error():
    """A calibrated quantizer whose (LSQ) scale was trained to 0: Grid.of and stream_grid refuse it
    with an IntegerizeError before a multiplier divides by it."""
    from qswap.errors import IntegerizeError
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.integer import Grid, stream_grid
    from qswap.quant.spec import QuantSpec

    for spec in (QuantSpec(bits=8), QuantSpec(bits=8, granularity="per_channel", axis=-1)):
        fq = FakeQuantize(spec)
        fq(torch.randn(4, 6))
        fq.freeze()
        fq.scale.data.zero_()  # what an optimizer step can write
        with pytest.raises(IntegerizeError, match="needs finite nonzero scales, got 0.0"):
            stream_grid(fq) if spec.granularity == "per_channel" else Grid.of(fq)


@pytest.mark.parametrize("m0, shift", [(2 ** 31, 0), (-1, 0), (2 ** 30, 31), (2 ** 30, -32),
                                       (torch.tensor([2 ** 30, 2 ** 33]), torch.tensor([0, 0]))])
def test_a_requant_outside_the_defined_ranges_is_an_integerize_error(m0, shift):
    """``requantize`` is defined for quantize_multiplier's ranges; a Requant made by hand outside
    them (M0 2^31 had wrapped the int64 product silently) is refused where it is made."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import Requant

    with pytest.raises(IntegerizeError, match="needs M0 in"):
        Requant(m0, shift, 0, -128, 127)
    Requant(2 ** 31 - 1, 30, 0, -128, 127)  # the ends of the ranges are fine
    Requant(0, -31, 0, -128, 127)


@pytest.mark.parametrize("m0, shift", [(2 ** 31, 0), (-1, 0), (2 ** 30, 31), (2 ** 30, -32),
                                       (torch.tensor([2 ** 30, 2 ** 33]), torch.tensor([0, 0]))])
def test_the_fixed_point_multiplies_refuse_a_multiplier_outside_the_defined_ranges(m0, shift):
    """Called directly (not through a Requant), both fixed-point multiplies refuse M0 or shift
    outside quantize_multiplier's ranges: M0 2^33 had wrapped the int64 product silently."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import multiply_by_quantized_multiplier_single

    x = i32(1000, -1000, 7)
    for multiply in (multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_single):
        with pytest.raises(IntegerizeError, match="needs M0 in"):
            multiply(x, m0, shift)


def test_the_single_rounding_multiply_refuses_values_beyond_int32():
    """Its int64 product ``x * M0`` is exact only for int32 ``x``: a wider int64 value (2^40 * M0
    wraps past 2^63) is refused; the double-rounding multiply saturates it (its left shift's clamp)."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import multiply_by_quantized_multiplier_single

    wide = torch.tensor([2 ** 40, 3], dtype=torch.int64)
    with pytest.raises(IntegerizeError, match="must hold int32 values"):
        multiply_by_quantized_multiplier_single(wide, 2 ** 30, 0)
    assert multiply_by_quantized_multiplier(wide, 2 ** 30, 0).tolist() == [2 ** 30, 2]


def test_a_layer_norm_epsilon_large_in_code_units_keeps_the_variance_in_int64():
    """8-bit codes on a grid far finer than the norm's epsilon (s_in 1.95e-7, eps 1e-5): the
    epsilon in code units is folded into the choice of square-root bits, as an input bound is,
    so the normalized values stay LayerNorm's (the int64 variance had wrapped: errors of 0.7
    where the output is below 0.01)."""
    from qswap.quant import integer as I

    torch.manual_seed(0)
    n, s_in = 256, 1.95e-7
    codes = torch.randint(-128, 128, (4, n), dtype=torch.int8)
    params = I.LayerNormParams.build(n, 1e-5, s_in, torch.full((n,), 127, dtype=torch.int32), 1 / 127, None, None)
    y = I.integer_layer_norm_acc(codes, params).double() * params.acc_scale
    reference = torch.nn.functional.layer_norm(codes.double() * s_in, (n,), eps=1e-5)
    assert float((y - reference).abs().max()) < 1e-4


def test_a_group_norm_whose_variance_leaves_int64_is_an_integerize_error():
    """A group of 160,000 values on a grid far finer than epsilon (wav2vec 2.0's first GroupNorm
    calibrated on silence): an IntegerizeError, not a raw OverflowError or a wrapped epsilon."""
    from qswap.errors import IntegerizeError
    from qswap.quant import integer as I

    params = I.GroupNormParams.build(1, 8, 1e-5, I.Grid(1.19e-7, 0, -128, 127), torch.full((8,), 127, dtype=torch.int32),
                                     1 / 127, None, None)
    with pytest.raises(IntegerizeError, match="leaves int64"):
        I.integer_group_norm(torch.randint(-128, 128, (1, 8, 20000), dtype=torch.int8), params)
