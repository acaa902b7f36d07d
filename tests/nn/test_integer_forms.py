"""Integer forms of the counterparts (issue 16): each one, on codes, against its fake-quant
forward followed by the consumer's quantizer, in output grid steps."""
import pytest
import torch
from torch import nn

import qswap
from helpers import assert_only_near_ties_differ, core_codes
from qswap.errors import IntegerizeError
from qswap.nn.norm import IntegerGroupNorm, IntegerLayerNorm
from qswap.quant.integer import Grid, stream_grid

RECIPES = ["w8a8", "w8a8_per_channel", "w4a8"]


def converted(model: nn.Module, x: torch.Tensor, recipe: str, run=None) -> nn.Module:
    run = run or (lambda m, b: m(b))
    q = qswap.convert(model.eval(), recipe)
    qswap.calibrate(q, [x, x.flip(0)], forward=run)
    return q


def steps(integer: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    assert integer.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)
    assert integer.dtype == reference.dtype
    return (integer.to(torch.int64) - reference.to(torch.int64)).abs()


def agreement(counterpart: nn.Module, consumer_quant: nn.Module, x: torch.Tensor, out=None):
    """(integer codes, fake-quant codes) of ``counterpart`` writing onto ``consumer_quant``'s grid."""
    grid_out = Grid.of(consumer_quant)
    form = counterpart.to_integer(grid_out)
    with torch.no_grad():
        reference = grid_out.quantize(consumer_quant(counterpart(x) if out is None else out))
        integer = form(Grid.of(counterpart.input_quant).quantize(x))
    return integer, reference


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear(recipe):
    torch.manual_seed(0)
    x = torch.randn(8, 10, 48)
    q = converted(nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 8)), x, recipe)
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1  # exact ties: half up here, half to even in the fake-quant grid
    assert float((diff == 0).float().mean()) > 0.999
    assert q[0].to_integer(Grid.of(q[1].input_quant)).weight.dtype == torch.int8


def test_linear_refuses_an_unquantized_weight_and_an_overflowing_reduction():
    x = torch.randn(4, 16)
    q = converted(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)), x, "w8a8")
    q[0].weight_quant.enabled = False
    with pytest.raises(IntegerizeError, match="float"):
        q[0].to_integer(Grid.of(q[1].input_quant))
    wide = converted(nn.Sequential(nn.Linear(200000, 2), nn.Linear(2, 2)), torch.randn(2, 200000), "w8a8")
    with pytest.raises(IntegerizeError, match="accumulator"):
        wide[0].to_integer(Grid.of(wide[1].input_quant))


@pytest.mark.parametrize("recipe", RECIPES)
def test_layer_norm(recipe):
    torch.manual_seed(0)
    x = torch.randn(8, 10, 64) * 3 + 1
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.2)
    q = converted(nn.Sequential(ln, nn.Linear(64, 8)), x, recipe)
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.97


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.Sigmoid()],
                         ids=lambda m: type(m).__name__)
def test_elementwise_tables_are_bit_exact(act):
    torch.manual_seed(0)
    x = torch.randn(8, 10, 16) * 2
    q = converted(nn.Sequential(act, nn.Linear(16, 4)), x, "w8a8")
    integer, reference = agreement(q[0], q[1].input_quant, x)
    assert torch.equal(integer, reference)


def test_softmax():
    torch.manual_seed(0)
    x = torch.randn(8, 10, 30) * 3
    q = converted(nn.Sequential(nn.Softmax(dim=-1), nn.Linear(30, 4)), x, "w8a8")
    integer, reference = agreement(q[0], q[1].input_quant, x)
    assert int(steps(integer, reference).max()) <= 1


def test_a_softmax_without_dim_has_no_integer_form():
    """nn.Softmax() (dim None): torch computes along dim 0 for a 3-D input, which the fake-quant
    model does, while the integer form took -1. Refused, asking for an explicit dim."""
    import warnings
    x = torch.randn(4, 6, 10) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's implicit-dim deprecation warning
        q = converted(nn.Sequential(nn.Linear(10, 10), nn.Softmax(), nn.Linear(10, 4)), x, "w8a8")
        with torch.no_grad():
            torch.testing.assert_close(q[1](x).sum(0), torch.ones(6, 10))  # torch's axis: dim 0
    with pytest.raises(IntegerizeError, match=r"explicit dim \(nn.Softmax\(dim=-1\)\)"):
        q[1].to_integer(Grid.of(q[2].input_quant))
    with pytest.raises(IntegerizeError, match="nn.Softmax.. without dim"):
        qswap.integerize(q)


def test_glu():
    torch.manual_seed(0)
    x = torch.randn(8, 10, 32) * 2
    q = converted(nn.Sequential(nn.GLU(), nn.Linear(16, 4)), x, "w8a8")
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1  # the gate is 2^-15 fixed point: a near-tie can move one step
    assert float((diff == 0).float().mean()) > 0.99


def test_log_softmax_has_no_integer_form_yet():
    x = torch.randn(4, 16)
    q = converted(nn.Sequential(nn.LogSoftmax(dim=-1), nn.Linear(16, 4)), x, "w8a8")
    with pytest.raises(IntegerizeError, match="LogSoftmax"):
        q[0].to_integer(Grid.of(q[1].input_quant))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_conv1d(recipe):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 30)
    q = converted(nn.Sequential(nn.Conv1d(8, 12, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(12 * 15, 4)),
                  x, recipe)
    grid_out = Grid.of(q[2].input_quant)
    form = q[0].to_integer(grid_out)
    with torch.no_grad():
        reference = grid_out.quantize(q[2].input_quant(q[0](x)))
    integer = form(Grid.of(q[0].input_quant).quantize(x))  # padding: the input's zero point
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.999


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel"])
def test_embedding(recipe):
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (4, 9))
    model = nn.Sequential(nn.Embedding(40, 16, padding_idx=1), nn.Linear(16, 4))
    q = converted(model, tokens, recipe, run=lambda m, b: m(b))
    grid_out = Grid.of(q[1].input_quant)
    with torch.no_grad():
        reference = grid_out.quantize(q[1].input_quant(q[0](tokens)))
    form = q[0].to_integer(grid_out)
    integer = form(tokens)
    assert int(steps(integer, reference).max()) <= 1
    w_scale = q[0].weight_quant.scale.reshape(-1, 1)[tokens if recipe.endswith("per_channel") else 0]
    w_zero = q[0].weight_quant.zero_point.reshape(-1, 1)[tokens if recipe.endswith("per_channel") else 0]
    exact = (form.codes[tokens].double() - w_zero) * w_scale.double() / grid_out.scale
    assert_only_near_ties_differ(integer, reference, exact)


def test_attention_core():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 32)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    run = lambda m, b: m(b, b, b, attn_mask=causal)[0]  # noqa: E731
    mha = converted(nn.MultiheadAttention(32, 4), x, "w8a8", run=run)
    codes, scaling, seen = core_codes(mha, lambda: run(mha, x))
    grid_out = Grid.of(mha.out_proj.input_quant)
    form = mha.core.to_integer(scaling, grid_out)
    context, probs = form(*codes, blocked=causal)
    with torch.no_grad():
        reference = grid_out.quantize(mha.out_proj.input_quant(seen["out"][0]))
        ref_probs = Grid.of(mha.core.softmax_out_quant).quantize(seen["out"][1])
    assert int(steps(probs, ref_probs).max()) <= 1
    diff = steps(context, reference)
    assert int(diff.max()) <= 2
    assert float((diff == 0).float().mean()) > 0.9


# -- GroupNorm, folded BatchNorm1d, weight-normed conv, LayerNorm accumulator -------------------------

@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_group_norm(recipe, groups):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 50) * torch.linspace(0.5, 2, 16).view(1, -1, 1)
    norm = nn.GroupNorm(groups, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.2, 0.2)
    q = converted(nn.Sequential(norm, nn.GELU()), x, recipe)
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1  # near-ties: float32 statistics in F.group_norm
    assert float((diff == 0).float().mean()) > 0.99
    assert isinstance(q[0].to_integer(None), IntegerGroupNorm)


@pytest.mark.parametrize("recipe", RECIPES)
def test_folded_batch_norm(recipe):
    """The inference BatchNorm folded into a depthwise 1x1 conv: the same weight codes and int32
    shift as the fake-quant fold, so it differs only on requantization near-ties."""
    torch.manual_seed(1)
    x = torch.randn(4, 12, 30) * 2 + 0.5
    bn = nn.BatchNorm1d(12)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 3), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    q = converted(nn.Sequential(bn, nn.SiLU()), x, recipe)
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.99


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # fairseq's own positional conv uses it
@pytest.mark.parametrize("recipe", RECIPES)
def test_weight_normed_conv(recipe):
    """``g * v / ||v||`` is constant at inference: its codes are the fake-quant conv's."""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 40)
    conv = nn.utils.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), name="weight", dim=2)
    q = converted(nn.Sequential(conv, nn.GELU()), x, recipe)
    assert q[0].weight is None
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.99


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_norm_of_a_per_channel_input_grid(bits):
    """A LayerNorm whose input grid is per channel (the residual stream's, recipe
    w4a4_edges8_stream_smoothquant): channels of very different ranges put on one int32 grid
    (``CommonGridParams``), then the integer LayerNorm; the fake-quant codes up to near-ties."""
    torch.manual_seed(1)
    x = torch.randn(8, 10, 64) * torch.logspace(-1.5, 1, 64) + 0.3
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.2)
    recipe = {"version": 1, "name": "ln_per_channel",
              "defaults": {"weight": {"bits": 8, "symmetric": True, "observer": "minmax"},
                           "activation": {"bits": 8, "symmetric": False, "observer": "minmax"}},
              "rules": [{"match": {"class": "LayerNorm"},
                         "activation": {"bits": bits, "granularity": "per_channel", "axis": -1}}]}
    q = converted(nn.Sequential(ln, nn.Linear(64, 8)), x, recipe)
    grid_out = Grid.of(q[1].input_quant)
    form = q[0].to_integer(grid_out)
    assert form.common is not None
    with torch.no_grad():
        reference = grid_out.quantize(q[1].input_quant(q[0](x)))
        integer = form(stream_grid(q[0].input_quant).quantize(x))
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.97


def test_layer_norm_without_an_output_grid_gives_its_accumulator():
    torch.manual_seed(3)
    x = torch.randn(6, 32)
    q = converted(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 4)), x, "w8a8")
    form = q[0].to_integer(None)
    assert isinstance(form, IntegerLayerNorm)
    acc = form(Grid.of(q[0].input_quant).quantize(x))
    assert acc.dtype == torch.int32
    with torch.no_grad():
        exact = q[0](x)
    assert float((acc.double() * form.stream_scale - exact.double()).abs().max()) < 0.02


def test_group_norm_without_affine_is_refused():
    x = torch.randn(2, 4, 10)
    q = converted(nn.Sequential(nn.GroupNorm(2, 4, affine=False), nn.GELU()), x, "w8a8")
    with pytest.raises(IntegerizeError, match="affine"):
        q[0].to_integer(Grid.of(q[1].input_quant))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("width", [48, 2048])  # float32 GEMMs; partial sums beyond 2^24: float64
def test_simulated_linear_and_conv_are_their_integer_forms(recipe, width):
    """``IntegerLinear.simulated`` / ``IntegerConv.simulated`` (the fake-quant simulation's exact
    float GEMMs on centered codes) give ``forward``'s int32 results: the codes, and their values."""
    from qswap.nn.simulate import dequantized
    from qswap.quant.integer import exact_float_dtype
    torch.manual_seed(0)
    x = torch.randn(4, 6, width) * 3
    q = converted(nn.Sequential(nn.Linear(width, 16), nn.Linear(16, 4)), x, recipe)
    grid_in, grid_out = Grid.of(q[0].input_quant), Grid.of(q[1].input_quant)
    codes = grid_in.quantize(x)
    centered = (codes.to(torch.int32) - grid_in.zero_point).float()
    form = q[0].to_integer(grid_out)
    bound = width * int(centered.abs().max()) * int(form.weight.to(torch.int64).abs().max())
    wide = width == 2048 and recipe != "w4a8"  # 8-bit weights: partial sums beyond 2^24
    assert exact_float_dtype(bound, x.device) == (torch.float64 if wide else torch.float32)
    assert torch.equal(form.simulated(centered), form(codes))
    assert torch.equal(form.simulated(centered, grid_out.scale), dequantized(form(codes), grid_out))
    accumulator = q[0].to_integer(None)
    assert torch.equal(accumulator.simulated(centered), accumulator(codes))
    signal = torch.randn(2, 8, 30)
    conv = converted(nn.Sequential(nn.Conv1d(8, 12, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(12 * 15, 4)),
                     signal, recipe)
    grid_in, grid_out = Grid.of(conv[0].input_quant), Grid.of(conv[2].input_quant)
    codes, form = grid_in.quantize(signal), conv[0].to_integer(grid_out)
    centered = (codes.to(torch.int32) - grid_in.zero_point).float()  # zero padding: the input's zero point
    assert torch.equal(form.simulated(centered), form(codes))
    assert torch.equal(form.simulated(centered, grid_out.scale), dequantized(form(codes), grid_out))


def per_group_recipe(bits: int, symmetric: bool = True) -> dict:
    return {"version": 1, "name": f"w{bits}a8_per_group",
            "defaults": {"weight": {"bits": bits, "symmetric": symmetric, "granularity": "per_group", "axis": -1,
                                    "group_size": 16},
                         "activation": {"bits": 8, "symmetric": False}}}


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_with_per_group_weights(bits):
    """A Linear's per-group weights have an integer form (``group_weight_codes``: each group's
    scale a multiplier of its row's largest, k fraction bits): its codes against the fake-quant
    counterpart's (float insides, the exact group scales) differ by at most a step, rarely;
    the simulation's exact GEMMs give the same integers."""
    from qswap.nn.simulate import dequantized
    torch.manual_seed(0)
    x = torch.randn(8, 10, 64)
    q = converted(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), x, qswap.load_recipe(per_group_recipe(bits)))
    assert q[0].weight_quant.spec.granularity == "per_group"
    integer, reference = agreement(q[0], q[1].input_quant, x)
    diff = steps(integer, reference)
    assert int(diff.max()) <= 1
    # the multipliers keep k fraction bits, as many as int16 products allow: 11 or 12 for 4-bit
    # codes, 8 for 8-bit ones, whose rounding moves a few outputs across a rounding boundary
    assert float((diff == 0).float().mean()) > (0.99 if bits == 4 else 0.95)
    grid_in, grid_out = Grid.of(q[0].input_quant), Grid.of(q[1].input_quant)
    form = q[0].to_integer(grid_out)
    assert form.weight.dtype == torch.int16 and form.acc_scale.shape == (32,)
    codes = grid_in.quantize(x)
    centered = (codes.to(torch.int32) - grid_in.zero_point).float()
    assert torch.equal(form.simulated(centered), form(codes))
    assert torch.equal(form.simulated(centered, grid_out.scale), dequantized(form(codes), grid_out))


def group_k(wide: torch.Tensor, scale: torch.Tensor, row: torch.Tensor) -> int:
    """The k of a per-group form: its grid is the row's largest group scale times 2^-k."""
    return round(float(torch.log2(row / scale.double()).mean()))


def row_bound(codes, group_scale, row, shift, span, bias, in_scale):
    """The rows' exact accumulator bound at ``shift`` (and its widest integer weight), computed
    here from the definition: span * sum |code m| + |bias code|."""
    from qswap.quant.integer import bias_codes
    multipliers = torch.round(group_scale / row[:, None] * 2.0 ** shift).to(torch.int64)
    wide = codes.reshape(codes.shape[0], multipliers.shape[1], -1) * multipliers[:, :, None]
    acc_scale = torch.tensor(in_scale, dtype=torch.float32) * (row * 2.0 ** -shift).float()
    biases = bias_codes(bias, acc_scale).to(torch.int64).abs()
    return int((span * wide.abs().sum(dim=(1, 2)) + biases).max()), int(wide.abs().max())


@pytest.mark.parametrize("bits,fan_in,bias_scale,limit", [
    (4, 64, 1.0, "int16"), (8, 64, 1.0, "int16"),  # the products' int16
    (8, 16384, 1.0, "int32"),  # a wide fan-in: the rows' accumulator
    (4, 64, 1e6, "int32")])  # a large bias: its codes in the accumulator
def test_per_group_weights_are_their_codes_times_whole_multipliers(bits, fan_in, bias_scale, limit):
    """The definition of ``group_weight_codes``: int16 weights ``code * m`` with ``m`` in [0, 2^k]
    per (row, group), on ``S * 2^-k`` (S: the row's largest group scale); each effective weight
    within ``|code| * S * 2^-(k+1)`` of the fake-quant weight; k the largest that keeps the
    products in int16 and every row's accumulator (span * sum |code m| + |bias code|) in int32,
    whichever binds (a wide fan-in, a large bias); the Linear builds with it."""
    from qswap.quant.integer import GROUP_SHIFT_MAX, INT32_MAX, group_weight_codes
    from qswap.quant.primitives import quantize
    torch.manual_seed(1)
    x = torch.relu(torch.randn(8, 10, fan_in)) * 3  # a ReLU input: the uint8 grid's full span
    lin = nn.Linear(fan_in, 32)
    with torch.no_grad():
        lin.weight[:, :16] *= 20  # one group far coarser than the rest of its row
        lin.bias.mul_(bias_scale)
    q = converted(nn.Sequential(lin, nn.Linear(32, 8)), x, qswap.load_recipe(per_group_recipe(bits)))
    wq, grid_in = q[0].weight_quant, Grid.of(q[0].input_quant)
    span = max(grid_in.qmax - grid_in.zero_point, grid_in.zero_point - grid_in.qmin)
    wide, scale, bound = group_weight_codes(wq, q[0].weight, span=span, in_scale=grid_in.scale, bias=q[0].bias)
    codes = quantize(q[0].weight, wq.scale, wq.zero_point, wq.spec).to(torch.int64)  # (32, fan_in)
    groups = fan_in // 16
    group_scale = wq.scale.detach().reshape(32, groups).double()
    row = group_scale.amax(dim=1)
    shift = group_k(wide, scale, row)
    assert torch.equal(scale.double(), row * 2.0 ** -shift)
    multipliers = torch.round(group_scale / row[:, None] * 2.0 ** shift).to(torch.int64)
    assert int(multipliers.min()) >= 0 and int(multipliers.max()) == 2 ** shift
    assert torch.equal(wide.to(torch.int64), (codes.reshape(32, groups, 16) * multipliers[:, :, None]).reshape(32, -1))
    effective = wide.double() * scale.double()[:, None]
    fake = wq(q[0].weight).detach().double()
    assert bool(((effective - fake).abs() <= codes.abs().double() * row[:, None] * 2.0 ** -(shift + 1) + 1e-12).all())
    assert (bound, int(wide.abs().max())) == row_bound(codes, group_scale, row, shift, span, q[0].bias, grid_in.scale)
    assert bound <= INT32_MAX
    assert shift < GROUP_SHIFT_MAX  # one more fraction bit breaks the limit this case is built for
    wider_bound, wider_max = row_bound(codes, group_scale, row, shift + 1, span, q[0].bias, grid_in.scale)
    assert (wider_max > 32767) if limit == "int16" else (wider_bound > INT32_MAX and wider_max <= 32767)
    form = q[0].to_integer(Grid.of(q[1].input_quant))  # integer_linear's own bound check passes
    assert torch.equal(form.weight, wide)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_per_group_scale_trained_to_zero_or_below_has_no_integer_form(bad):
    """A group scale at 0, negative or not finite (one set by hand or loaded): IntegerizeError, so
    the fake-quant model computes that Linear in float (``form_or_none``) instead of building
    wrapped weights."""
    from qswap.quant.integer import group_weight_codes
    x = torch.randn(8, 64)
    q = converted(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), x, qswap.load_recipe(per_group_recipe(4)))
    wq = q[0].weight_quant
    with torch.no_grad():
        wq.scale.view(-1)[5] = bad
    grid_in = Grid.of(q[0].input_quant)
    with pytest.raises(IntegerizeError, match="finite positive"):
        group_weight_codes(wq, q[0].weight, span=255, in_scale=grid_in.scale, bias=q[0].bias)


def test_per_group_weights_without_an_integer_form_are_refused():
    """A per-group convolution weight, and a per-group weight with zero points: IntegerizeError."""
    recipe = per_group_recipe(4)
    conv = converted(nn.Sequential(nn.Conv1d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32, 4)),
                     torch.randn(2, 16, 32), qswap.load_recipe({**recipe, "defaults": {
                         **recipe["defaults"], "weight": {**recipe["defaults"]["weight"], "axis": 1}}}))
    with pytest.raises(IntegerizeError, match="Linear"):
        conv[0].to_integer(Grid.of(conv[2].input_quant))
    x = torch.randn(8, 64)
    q = converted(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), x,
                  qswap.load_recipe(per_group_recipe(4, symmetric=False)))
    with pytest.raises(IntegerizeError, match="zero point"):
        q[0].to_integer(Grid.of(q[1].input_quant))
