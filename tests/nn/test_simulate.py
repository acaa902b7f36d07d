"""The fake-quant counterparts compute what their integer forms compute (qswap.nn.simulate, issue 16
item 4) under the recipe's ``simulate: integer``: codes equal in every step where both define the
arithmetic the same way; the float insides under ``simulate: float`` (the fast option; the
default is ``integer``); QAT gets the float op's gradient."""
import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
from qswap.errors import IntegerizeError, RecipeError
from qswap.nn.attention import QuantAttentionCore
from qswap.nn.norm import QLayerNorm
from qswap.nn.simulate import SIMULATIONS, grid_of, simulating
from helpers import core_codes, recipe_with
from qswap.quant.integer import Grid, integer_softmax
from qswap.recipe import shipped_recipe_names

RECIPES = ["w8a8", "w8a8_per_channel", "w4a8"]


def calibrated(model: nn.Module, x: torch.Tensor, recipe: str, run=None) -> nn.Module:
    """``model`` converted by the shipped ``recipe`` with ``simulate: integer``, calibrated."""
    q = qswap.convert(model.eval(), recipe_with(recipe, "integer"))
    qswap.calibrate(q, [x, x.flip(0)], forward=run or (lambda m, b: m(b)))
    return q


def layer_norm_model(x: torch.Tensor, recipe) -> nn.Module:
    torch.manual_seed(0)
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.2)
    return calibrated(nn.Sequential(ln, nn.Linear(64, 8)), x, recipe)


def consumer_codes(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Codes of q[0]'s output on q[1]'s input grid."""
    grid = Grid.of(q[1].input_quant)
    with torch.no_grad():
        return grid.quantize(q[1].input_quant(q[0](x)))


def assert_integer_then_float(q: nn.Module, x: torch.Tensor, float_op) -> None:
    """q[0] writes the codes of its integer form onto q[1]'s input grid; under simulate: float it
    computes ``float_op(q[0], quantized input)`` instead, whose values differ."""
    form = q[0].to_integer(Grid.of(q[1].input_quant))
    integer = form(Grid.of(q[0].input_quant).quantize(x))
    assert torch.equal(consumer_codes(q, x), integer)
    with torch.no_grad():
        simulated = q[0](x)
        with simulating(q, "float"):
            float_insides = float_op(q[0], q[0].input_quant(x))
            assert torch.equal(q[0](x), float_insides)
        assert torch.equal(q[0](x), simulated)  # the block restored the setting
    assert not torch.equal(simulated, float_insides)


@pytest.mark.parametrize("recipe", RECIPES)
def test_layer_norm_codes_are_the_integer_forms(recipe):
    torch.manual_seed(1)
    x = torch.randn(16, 10, 64) * 3 + 1
    assert_integer_then_float(layer_norm_model(x, recipe), x,
                              lambda ln, xq: F.layer_norm(xq, (64,), *ln.affine(), ln.eps))


def _recipe(weight_bits: int, activation_bits: int) -> dict:
    return {"version": 1, "name": f"w{weight_bits}a{activation_bits}", "defaults": {
        "weight": {"bits": weight_bits, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
        "activation": {"bits": activation_bits, "symmetric": False, "granularity": "per_tensor",
                       "observer": "minmax"}}}


def test_16_bit_layer_norm_inputs_are_the_integer_form_with_fewer_root_bits():
    """16-bit input codes: the variance's square root keeps fewer fraction bits (the input bound
    of ``LayerNormParams.build``) instead of leaving isqrt's int64 domain mid-calibration."""
    torch.manual_seed(1)
    x = torch.randn(16, 10, 64) * 3 + 1
    q = layer_norm_model(x, _recipe(8, 16))  # calibrating it ran the simulation on 16-bit codes
    reader = q[1].input_quant
    assert q[0].input_quant.spec.bits == 16 and reader.spec.bits == 16
    form = q[0].to_integer(Grid.of(reader))
    assert form.params.sqrt_bits < 10
    with torch.no_grad():  # told its reader, the LayerNorm writes the integer form's codes onto its grid
        written = Grid.of(reader).quantize(reader(q[0](x, out_quant=reader)))
    assert torch.equal(written, form(Grid.of(q[0].input_quant).quantize(x)))


def test_a_layer_norms_kept_integer_form_follows_its_input_grid_through_calibration():
    """Calibration writes each scale through ``.data`` (no version counter moves) and fills the
    zero point: a form kept on the input scale alone kept the first batch's epsilon in code units
    (the shipped model's w4a4 decoded at 87.76 % WER with it, 89.00 % with forms built from its
    final grids). Batches of very different ranges move the input grid tenfold."""
    torch.manual_seed(3)
    ln = nn.LayerNorm(64)
    q = qswap.convert(nn.Sequential(ln, nn.Linear(64, 8)).eval(), recipe_with("w8a8", "integer"))
    x = torch.randn(8, 5, 64)
    qswap.calibrate(q, [x * 0.001, x * 0.01, x * 0.1])
    with torch.no_grad():
        q(x * 0.1)
    kept = q[0].__dict__.pop("_integer_ln")[0]
    with torch.no_grad():
        fresh = q[0]._integer_params(grid_of(q[0].input_quant), q[0].affine()[1])
    assert (kept.eps_int, kept.sqrt_bits) == (fresh.eps_int, fresh.sqrt_bits)
    assert torch.equal(kept.gamma, fresh.gamma) and torch.equal(kept.beta, fresh.beta)


def test_16_bit_norm_weights_have_no_integer_form_and_simulate_in_float():
    """Gamma's 16-bit codes would leave the int32 affine accumulator: no integer form (integerize
    says what to change), and the simulation computes the LayerNorm in float, as everywhere a
    form is missing."""
    torch.manual_seed(1)
    x = torch.randn(16, 10, 64) * 3 + 1
    q = layer_norm_model(x, _recipe(16, 8))
    with pytest.raises(IntegerizeError, match="norm_weight site with fewer bits"):
        q[0].to_integer(Grid.of(q[1].input_quant))
    with torch.no_grad():
        simulated = q[0](x)
        with simulating(q, "float"):
            assert torch.equal(q[0](x), simulated)
    assert torch.isfinite(simulated).all()


def test_glu_codes_are_the_integer_forms():
    torch.manual_seed(0)
    x = torch.randn(16, 10, 32) * 2
    q = calibrated(nn.Sequential(nn.GLU(), nn.Linear(16, 4)), x, "w8a8")
    assert_integer_then_float(q, x, lambda glu, xq: F.glu(xq))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_attention_probabilities_and_context_are_the_integer_forms(recipe):
    torch.manual_seed(0)
    x = torch.randn(9, 3, 32)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    run = lambda m, b: m(b, b, b, attn_mask=causal, key_padding_mask=padding)[0]  # noqa: E731
    mha = calibrated(nn.MultiheadAttention(32, 4), x, recipe, run=run)
    codes, scaling, seen = core_codes(mha, lambda: run(mha, x))
    grid_out = Grid.of(mha.out_proj.input_quant)
    blocked = causal.unsqueeze(0) | padding.repeat_interleave(4, 0).unsqueeze(1)  # (B*H, T, S)
    context, probs = mha.core.to_integer(scaling, grid_out)(*codes, blocked=blocked)
    assert torch.equal(Grid.of(mha.core.softmax_out_quant).quantize(seen["out"][1]), probs)
    with torch.no_grad():
        assert torch.equal(grid_out.quantize(mha.out_proj.input_quant(seen["out"][0])), context)


@pytest.mark.parametrize("masks", ["attn_mask", "padding", "both"])
def test_a_fully_blocked_row_gives_zero_probabilities_not_nan_in_both_simulations(masks):
    """The integer softmax's definition (a row blocked at every key: its zero point; the float
    softmax gives NaN there): ``simulate: float`` gives the same zero rows, a sentence of padding
    only as an attn_mask row, and every other row as without the blocked ones."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16)
    mha = calibrated(nn.MultiheadAttention(16, 2), x, "w8a8", run=lambda m, b: m(b, b, b)[0])
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    blocked[2] = True
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1] = True  # sentence 1: every key padded
    if masks == "both":
        padding[0, :2] = True
        blocked[3, 2:] = True  # row 3 of sentence 0: blocked by the two masks together
    kwargs = {"attn_mask": blocked if masks != "padding" else None,
              "key_padding_mask": padding if masks != "attn_mask" else None}
    results = {}
    for mode in SIMULATIONS:
        with torch.no_grad(), simulating(mha, mode):
            results[mode] = mha(x, x, x, average_attn_weights=False, **kwargs)
    for out, probs in results.values():  # probs: (B, H, T, S)
        assert torch.isfinite(out).all() and torch.isfinite(probs).all()
        if masks != "padding":
            assert probs[:, :, 2].abs().sum() == 0
        if masks != "attn_mask":
            assert probs[1].abs().sum() == 0
        if masks == "both":
            assert probs[0, :, 3].abs().sum() == 0
    if masks == "padding":  # sentence 0 gets what it gets beside a sentence with no padding
        for mode in SIMULATIONS:
            with torch.no_grad(), simulating(mha, mode):
                unpadded = mha(x, x, x, average_attn_weights=False)
            assert torch.equal(unpadded[0][:, 0], results[mode][0][:, 0])
            assert torch.equal(unpadded[1][0], results[mode][1][0])


@pytest.mark.parametrize("simulate", ["float", "integer"])
@pytest.mark.parametrize("masks", ["padding", "attn_mask"])
def test_a_fully_blocked_row_gives_a_learned_reader_scale_a_finite_gradient(simulate, masks):
    """QAT (LSQ scales): the float softmax that carries the gradient under ``simulate: integer``
    has the fully blocked rows zeroed as the integer softmax has them, so the softmax_out scale's
    gradient is finite (it was NaN from those rows)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    blocked = torch.zeros(5, 5, dtype=torch.bool)
    if masks == "padding":
        padding[1] = True
    else:
        blocked[2] = True
    run = lambda m, b: m(b, b, b, key_padding_mask=padding, attn_mask=blocked)[0]  # noqa: E731
    mha = qswap.convert(nn.MultiheadAttention(16, 2), recipe_with("w4a8_lsq", simulate))
    qswap.calibrate(mha, [x], forward=run)
    mha.train()
    out = run(mha, x)
    out.sum().backward()
    grad = mha.core.softmax_out_quant.scale.grad
    assert torch.isfinite(out).all() and grad is not None and torch.isfinite(grad).all()


def test_long_rows_are_summed_in_int64_beyond_the_int32_row_sum():
    """Rows of 2^11 positions or more (41 s of wav2vec 2.0 frames) had been refused by the integer
    model while its simulation ran them: both sum them in int64 now, exactly (the int32 sum of a
    shorter row is the same number)."""
    grid_in, grid_out = Grid(0.05, 0, -128, 127), Grid(1 / 255, 0, 0, 255)
    from qswap.quant.integer import SoftmaxParams
    params = SoftmaxParams.build(grid_in, grid_out)
    codes = torch.randint(-128, 128, (2, 3000), dtype=torch.int32)
    wide = integer_softmax(codes, params)
    assert wide.shape == codes.shape and int(wide.max()) > 0
    e = params.exp_table[(codes.amax(-1, keepdim=True) - codes).long()].long()  # the spec, written out
    total = e.sum(-1, keepdim=True)
    assert int(total.max()) >= 2 ** 31 or codes.shape[-1] >= 2 ** 11
    want = torch.div(e * params.out_mult + (total << 15), total << 16, rounding_mode="floor").clamp(0, 255)
    assert torch.equal(wide.long(), want)
    core = QuantAttentionCore(recipe_with("w8a8", "integer").defaults)
    q = torch.randn(1, 2, 4)
    k = torch.randn(1, 2100, 4)
    qswap_core = core.eval()
    with torch.no_grad():
        context, probs = qswap_core(q, k, k, 0.5)  # calibrates on the fly: observing quantizers
    assert torch.isfinite(context).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_small_s2t_transformer_logits_are_the_integer_models(recipe):
    """A whole fairseq model (2+2 layers, untrained), teacher-forced: every logit code equal."""
    from qswap.models import build_s2t_transformer, s2t_net_input
    net_input = s2t_net_input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(build_s2t_transformer(seed=0), recipe_with(recipe, "integer"))
        qswap.calibrate(q, [net_input])
    with torch.no_grad():
        reference = q(**net_input)[0]
    integer = qswap.integerize(q)(**net_input)[0]
    assert torch.equal(integer, reference)


def test_training_sees_the_simulated_value_and_the_float_gradient():
    """QAT: the forward value is the integer one (as in eval), the gradient is the float op's
    (straight through the integer insides), so it equals the gradient under simulate: float."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 32) * 2
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GLU(),
                          nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0))
    run = lambda m, b: m(b)  # noqa: E731
    q = calibrated(model, x, "w8a8", run=run)
    for quant in q.modules():
        if hasattr(quant, "freeze") and quant.initialized:
            quant.freeze()
    with torch.no_grad():
        expected = q(x)
    grads, values = {}, {}
    for simulate in ("integer", "float"):
        with simulating(q, simulate):
            q.train()
            xg = x.clone().requires_grad_()
            y = q(xg)
            y.pow(2).sum().backward()
            values[simulate], grads[simulate] = y.detach(), xg.grad
            q.zero_grad()
            q.eval()
    assert torch.equal(values["integer"], expected)
    assert not torch.equal(values["float"], expected)
    assert torch.isfinite(grads["integer"]).all() and grads["integer"].abs().sum() > 0
    torch.testing.assert_close(grads["integer"], grads["float"], rtol=0.05, atol=1e-3)


def test_recipe_key_selects_the_arithmetic_and_rejects_others():
    default = SIMULATIONS[0]
    assert {qswap.load_recipe(name).simulate for name in shipped_recipe_names()} == {default}  # no key: the default
    for mode in SIMULATIONS:
        q = qswap.convert(nn.Sequential(nn.LayerNorm(8)), recipe_with("w8a8", mode))
        assert q[0].simulate == mode and isinstance(q[0], QLayerNorm)
    assert qswap.convert(nn.Sequential(nn.LayerNorm(8)), "w8a8")[0].simulate == default
    one_of = "simulate.*must be one of " + ", ".join(SIMULATIONS)
    with pytest.raises(RecipeError, match=one_of):
        qswap.load_recipe({"version": 1, "simulate": "fixed_point"})
    with pytest.raises(RecipeError, match=one_of), simulating(q, "fixed_point"):
        pass


SIMULATING = {"QuantAttentionCore", "QLayerNorm", "QGLU", "QConv1dSubsampler"}  # the counterparts with insides


def _simulate_settings(recipe) -> dict[str, set[str]]:
    """class name -> the ``simulate`` settings of its counterparts, in a small fairseq S2T
    transformer and a LayerNorm -> GLU chain converted by ``recipe``."""
    from qswap.models import build_s2t_transformer, s2t_net_input
    found: dict[str, set[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, batch in ((build_s2t_transformer(seed=0), s2t_net_input()),
                             (nn.Sequential(nn.LayerNorm(16), nn.GLU()), torch.randn(2, 3, 16))):
            for m in qswap.convert(model, recipe, data=[batch]).modules():  # data: a recipe's transforms
                if hasattr(m, "simulate"):
                    found.setdefault(type(m).__name__, set()).add(m.simulate)
    return found


@pytest.mark.parametrize("name", [n for n in shipped_recipe_names() if n != "fp32"])
def test_shipped_recipes_run_the_default_and_a_yaml_key_reaches_every_counterpart(name, tmp_path):
    """Every shipped recipe, which has no ``simulate`` key, computes with the default
    (``SIMULATIONS[0]``); the other setting written in a recipe file reaches the defaults, every
    rule and every counterpart that has insides to simulate."""
    default, other = SIMULATIONS
    shipped = qswap.load_recipe(name)
    assert {shipped.simulate, shipped.defaults.simulate, *(r.config.simulate for r in shipped.rules)} == {default}
    defaults = _simulate_settings(name)
    assert SIMULATING <= set(defaults) and all(v == {default} for v in defaults.values()), defaults
    path = tmp_path / f"{name}_{other}.yaml"
    path.write_text(Path(shipped.source).read_text(encoding="utf-8") + f"simulate: {other}\n", encoding="utf-8")
    recipe = qswap.load_recipe(path)
    assert {recipe.simulate, recipe.defaults.simulate, *(r.config.simulate for r in recipe.rules)} == {other}
    found = _simulate_settings(path)
    assert set(found) == set(defaults) and all(v == {other} for v in found.values()), found


def test_row_isqrt_is_the_integer_isqrt():
    from qswap.errors import IntegerizeError
    from qswap.nn.simulate import row_isqrt
    from qswap.quant.integer import ISQRT_MAX, isqrt
    squares = torch.arange(0, 3000, dtype=torch.int64) ** 2
    n = torch.cat([squares, squares - 1, squares + 1, torch.randint(0, ISQRT_MAX, (2000,)),
                   torch.tensor([ISQRT_MAX, ISQRT_MAX - 1])]).clamp(min=0).view(-1, 1)
    assert torch.equal(row_isqrt(n), isqrt(n))
    with pytest.raises(IntegerizeError, match="2\\^62"):
        row_isqrt(torch.tensor([-1]))


# -- requantization onto the reader's grid (``out_quant``) ------------------------------

def _set_grid(quant, scale: float, zero_point: int = 0) -> None:
    with torch.no_grad():
        quant.scale.fill_(scale)
        quant.zero_point.fill_(zero_point)
    quant.freeze()


def test_a_linear_rounds_an_exact_tie_as_its_integer_form():
    """Scales in a ratio of 1/2 put every odd accumulator on a tie: the fixed-point requantization
    rounds it toward +inf, float32 ``x * (1 / s)`` half to even. Told its reader's
    quantizer (``out_quant``), it gives the integer form's codes; without it (or under simulate: float) the ties
    round to even."""
    q = calibrated(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2)), torch.randn(8, 4), "w8a8")
    with torch.no_grad():
        q[0].weight.copy_(torch.tensor([[63.5, 1.0, 0.5, -0.5], [0.5, 1.5, -2.0, 3.5], [-0.5, 0.0, 2.5, 1.0]]))
    _set_grid(q[0].input_quant, 0.25)  # weight scale 63.5 / 127 = 0.5: accumulator scale 1/8
    _set_grid(q[1].input_quant, 0.25)  # requantization by exactly 1/2
    codes = torch.randint(-20, 20, (64, 4))
    x = codes.float() * 0.25
    grid = Grid.of(q[1].input_quant)
    integer = q[0].to_integer(grid)(codes.to(torch.int8))
    with torch.no_grad():
        onto = grid.quantize(q[1].input_quant(q[0](x, out_quant=q[1].input_quant)))
        plain = grid.quantize(q[1].input_quant(q[0](x)))
        with simulating(q, "float"):
            float_onto = grid.quantize(q[1].input_quant(q[0](x, out_quant=q[1].input_quant)))
    assert torch.equal(onto, integer)
    assert torch.equal(float_onto, plain)  # simulate: float computes as before
    with torch.no_grad():
        tie = (codes.double() @ (q[0].weight.double().T * 2)) % 2 == 1  # odd accumulators (units of 1/8)
    assert (plain != integer).any() and not ((plain != integer) & ~tie).any()  # the old value flips ties only


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_conv_layer_norm_and_glu_write_their_integer_forms_codes_onto_the_reader(recipe):
    torch.manual_seed(2)
    x = torch.randn(16, 10, 48) * 2
    lin = calibrated(nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 4)), x, recipe)
    xc = torch.randn(4, 8, 30)
    conv = calibrated(nn.Sequential(nn.Conv1d(8, 12, 3, stride=2, padding=1), nn.Conv1d(12, 4, 1)), xc, recipe)
    xl = torch.randn(16, 10, 64) * 3 + 1
    norm = layer_norm_model(xl, recipe)
    xg = torch.randn(16, 10, 32) * 2
    glu = calibrated(nn.Sequential(nn.GLU(dim=-1), nn.Linear(16, 4)), xg, recipe)
    xn = torch.randn(4, 12, 30) * 2 + 0.5
    group, batch = nn.GroupNorm(4, 12), nn.BatchNorm1d(12).eval()
    with torch.no_grad():
        for m in (group, batch):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
        batch.running_mean.normal_(0.5, 0.3)
        batch.running_var.uniform_(2, 6)
    group = calibrated(nn.Sequential(group, nn.Conv1d(12, 4, 1)), xn, recipe)
    batch = calibrated(nn.Sequential(batch, nn.Conv1d(12, 4, 1)), xn, recipe)
    for q, data in ((lin, x), (conv, xc), (norm, xl), (glu, xg), (group, xn), (batch, xn)):
        assert q[0].takes_reader
        grid_in, grid = Grid.of(q[0].input_quant), Grid.of(q[1].input_quant)
        with torch.no_grad():
            value = q[0](data, out_quant=q[1].input_quant)
        assert torch.equal(grid.quantize(value), q[0].to_integer(grid)(grid_in.quantize(data))), type(q[0])
        assert torch.equal(grid.dequantize(grid.quantize(value)), value)  # on the reader's grid: kept as is


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_linear_told_several_readers_requantizes_its_accumulator_onto_each(recipe):
    """A list of readers (wav2vec 2.0's feature projection, read by the positional conv and its
    residual): the int32 accumulator computed once, requantized onto each grid as the integer
    model's readers do."""
    from qswap.nn.simulate import stream_to
    torch.manual_seed(3)
    x = torch.randn(16, 10, 48) * 2
    q = calibrated(nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 4), nn.Linear(32, 4)), x, recipe,
                   run=lambda m, b: (m[1](m[0](b)), m[2](m[0](b) * 3)))
    readers = [q[1].input_quant, q[2].input_quant]
    assert Grid.of(readers[0]).scale != Grid.of(readers[1]).scale
    with torch.no_grad():
        values = q[0](x, out_quant=readers)
    form = q[0].to_integer(None)
    acc = form(Grid.of(q[0].input_quant).quantize(x))  # int32 accumulator
    for value, quant in zip(values, readers):
        grid = Grid.of(quant)
        assert torch.equal(grid.quantize(value), stream_to(form.stream_scale, grid)(acc))
    with simulating(q, "float"), torch.no_grad():
        assert all(torch.equal(v, q[0](x)) for v in q[0](x, out_quant=readers))


def test_a_chain_runs_only_containers_that_run_their_children_in_order():
    """``run_chain`` tells each op of a Sequential its reader (as ``integer_chain`` builds the
    integer forms) and refuses a container with a forward of its own (None: run it as it is)."""
    from qswap.nn.fairseq.chain import run_chain

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.lin(x))

    torch.manual_seed(4)
    x = torch.randn(6, 8)
    q = calibrated(nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Linear(8, 2)), x, "w8a8")
    with torch.no_grad():
        chained = run_chain(q[0], x, q[1].input_quant)
        grid = Grid.of(q[1].input_quant)
        integer = q[0][1].to_integer(grid)(q[0][0].to_integer(Grid.of(q[0][1].input_quant))(
            Grid.of(q[0][0].input_quant).quantize(x)))
    assert torch.equal(grid.quantize(chained), integer)
    assert run_chain(qswap.convert(nn.Sequential(Twice()), "w8a8"), x, None) is None


def test_a_told_reader_trains_with_the_float_gradient():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 32) * 2
    q = calibrated(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4)), x, "w8a8")
    for quant in (q[0].input_quant, q[1].input_quant):
        quant.freeze()
    grads = {}
    for simulate in ("integer", "float"):
        with simulating(q, simulate):
            xg = x.clone().requires_grad_()
            out = q[0](xg, out_quant=q[1].input_quant)
            (out * torch.linspace(-1, 1, 32)).sum().backward()  # a gradient that does not depend on the value
            grads[simulate] = xg.grad
    assert grads["integer"].abs().sum() > 0
    torch.testing.assert_close(grads["integer"], grads["float"])


def test_calibration_observes_each_ops_own_result_not_one_clamped_onto_earlier_batches():
    """While a reader calibrates, an op does not write onto its grid: the reader observes the
    op's result (with the grid of its earlier batches it could never widen its range). A second
    batch four times larger gives the readers (min/max observers) the ranges that ``simulate:
    float`` gives them, within what the integer insides change (the LayerNorm's and GLU's
    accumulators, which run while the readers calibrate)."""
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.quant.fake_quantize import FakeQuantize
    net_input = s2t_net_input()
    big = dict(net_input, src_tokens=net_input["src_tokens"] * 4)
    scales = {}
    for simulate in ("float", "integer"):
        recipe = qswap.load_recipe(dict(qswap.load_recipe("w8a8").to_dict(), simulate=simulate, defaults={
            "weight": {"bits": 8, "symmetric": True, "observer": "minmax"},
            "activation": {"bits": 8, "symmetric": False, "observer": "minmax"}}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = qswap.convert(build_s2t_transformer(seed=0), recipe)
            qswap.calibrate(q, [net_input, big])
        scales[simulate] = {n: float(m.scale) for n, m in q.named_modules()
                            if isinstance(m, FakeQuantize) and m.kind == "activation" and m.initialized}
    assert scales["float"].keys() == scales["integer"].keys() and len(scales["float"]) > 50
    ratios = [scales["integer"][n] / scales["float"][n] for n in scales["float"]]
    assert 0.9 < min(ratios) and max(ratios) < 1.1, sorted(ratios)[:3]


def test_float_activation_sites_compute_as_simulate_float():
    """Where activations stay float (no input grid: an Identity quantizer), ``simulate: integer``
    has no integer form to run: the model computes what ``simulate: float`` computes (the
    encoder's final norm, read by every decoder layer, included)."""
    from qswap.models import build_s2t_transformer, s2t_net_input
    net_input = s2t_net_input()
    outs = []
    for simulate in ("integer", "float"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = qswap.convert(build_s2t_transformer(seed=0), recipe_with("w8_weight_only", simulate))
            qswap.calibrate(q, [net_input])
        with torch.no_grad():
            outs.append(q(**net_input)[0])
    assert torch.equal(outs[0], outs[1])


def test_a_learned_scale_in_training_is_read_as_the_optimizer_left_it():
    """fairseq's optimizers step a learned (LSQ) scale through ``.data``, which no stamp sees: in
    training the integer insides read the scale as it is now, not a grid kept from the last step."""
    from qswap.nn.simulate import grid_of
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.spec import QuantSpec
    quant = FakeQuantize(QuantSpec(bits=8, symmetric=False, learnable=True))
    quant(torch.randn(64) * 3)
    quant.freeze()
    quant.train()
    before = grid_of(quant).scale
    with torch.no_grad():
        quant(torch.randn(8))  # a no-grad call keeps the frozen grid
    quant.scale.data.mul_(2.0)  # an optimizer step
    assert grid_of(quant).scale == pytest.approx(2 * before)


def test_attention_dropout_in_training_keeps_the_float_context_product():
    """Dropout scales the kept probabilities by 1/(1-p): they leave the ``softmax_out`` grid, so
    the context matmul has no integer form there and stays the float product of what it got."""
    torch.manual_seed(0)
    x = torch.randn(9, 3, 32)
    mha = calibrated(nn.MultiheadAttention(32, 4), x, "w8a8", run=lambda m, b: m(b, b, b)[0])
    core = mha.core.train()
    q, k, v = (torch.randn(12, 9, 8) for _ in range(3))
    with torch.no_grad():
        context, probs = core(q, k, v, 0.35, num_heads=4, dropout_p=0.5, out_quant=mha.out_proj.input_quant)
        assert (probs == 0).any()  # dropout ran
        assert torch.equal(context, torch.bmm(probs, core.v_quant(v)))


def test_a_learned_scale_written_after_a_training_simulation_is_read_at_inference():
    """A QAT step: the training forward and the simulation read the learned (LSQ) scale, then the
    optimizer writes it through ``.data`` (no version bump, no stamp sees it): the next
    inference reads the written scale, not a grid kept from the training step."""
    from qswap.nn.simulate import grid_of
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.primitives import fake_quantize_passes
    from qswap.quant.spec import QuantSpec
    spec = QuantSpec(bits=8, symmetric=False, learnable=True)
    fq = FakeQuantize(spec)
    fq(torch.randn(256))
    fq.freeze()
    fq.train()
    fq(torch.randn(64, requires_grad=True))
    assert grid_of(fq).scale == float(fq.scale)
    fq.scale.data.mul_(1.5)  # the optimizer's step
    fq.eval()
    y = torch.randn(64) * 3
    with torch.no_grad():
        assert grid_of(fq).scale == float(fq.scale)
        assert torch.equal(fq(y), fake_quantize_passes(y, float(fq.scale), int(fq.zero_point), spec))


def _lsq_s2t_model():
    """A small fairseq S2T transformer converted with ``w4a8_lsq`` (learned activation scales) and
    calibrated on one batch, with that batch."""
    from qswap.models import build_s2t_transformer, s2t_net_input

    torch.manual_seed(0)
    net = s2t_net_input(2, 60, 80, 7, 40, seed=1)
    q = qswap.convert(build_s2t_transformer(), "w4a8_lsq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(q, [net])
    return q, net


def test_a_qat_step_leaves_no_form_kept_in_a_plain_module_of_a_counterpart():
    """fairseq-train validates in eval mode between updates: the attention core and the q/k/v
    projections (plain modules inside a counterpart) keep integer forms stamped with the learned
    scales, which the optimizer then writes through ``.data``. Entering training drops them with
    the counterpart's own: after a step that writes only learned scales, the validation forward
    equals that of a copy that never kept a form."""
    q, net = _lsq_s2t_model()
    q.eval()
    with torch.no_grad():
        q(**net)  # validation: forms kept everywhere
    assert any(k.startswith("_integer") for m in q.modules() for k in vars(m)
               if not isinstance(m, qswap.nn.base.QuantModule))
    q.train()
    for m in q.modules():  # attention dropout in training: the context product takes no integer form
        if hasattr(m, "dropout_module") and hasattr(m, "core"):
            m.dropout_module.p = 0.1
    q(**net)[0].float().sum().backward()
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("quant.scale") and p.grad is not None:
                p.data.mul_(1.25)  # the optimizer's write: no version counter moves
    q.eval()
    with torch.no_grad():
        after = q(**net)[0]
        fresh = copy.deepcopy(q)(**net)[0]  # a copy keeps no form: every one built afresh
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_learned_reader_scales_train_under_integer_simulation():
    """QAT of an LSQ recipe with ``simulate: integer``: where an op's integer form writes onto its
    reader's grid (linears, norms, attention's products and softmax, the conv subsampler's GLU),
    the reader's learned scale gets the gradient of the float result as the reader rounds it, the
    one ``simulate: float`` gives it. (The reader's own call on a grid value gives none: on the
    code before the fix, git 05791c5, 65 of the 93 learned scales of this model got less than 1e-3
    of their float gradient, 26 exactly zero, measured ad hoc; one more, the second decoder layer's
    key grid, read the first layer's grid values.) The
    forward value stays the integer one."""
    q, net = _lsq_s2t_model()
    for m in q.modules():  # no dropout: the training forward is the eval one
        if isinstance(getattr(m, "p", None), float):
            m.p = 0.0
    with torch.no_grad():
        expected = q.eval()(**net)[0]
    grads = {}
    for simulate in ("integer", "float"):
        with simulating(q, simulate):
            q.train()
            out = q(**net)[0]
            if simulate == "integer":
                assert torch.equal(out.detach(), expected)
            out.float().pow(2).mean().backward()
            grads[simulate] = {n: p.grad.clone() for n, p in q.named_parameters()
                               if n.endswith("_quant.scale") and p.grad is not None}
            q.zero_grad()
            q.eval()
    assert len(grads["float"]) == 93 and grads["integer"].keys() == grads["float"].keys()
    # each scale trains: not float rounding noise (a reader reading grid values gets ~1e-9)
    assert [n for n, g in grads["integer"].items() if not g.norm() > 1e-3 * grads["float"][n].norm()] == []
    flat = {k: torch.cat([g.flatten() for g in v.values()]) for k, v in grads.items()}
    assert F.cosine_similarity(flat["integer"], flat["float"], dim=0) > 0.8


def test_a_training_step_derives_each_weight_grid_once():
    """QAT under ``simulate: integer``: a linear, convolution or attention projection that writes
    onto its reader's grid runs its float op (which derives the weight's grid from the current
    weight: a whole observer pass, an MSE search for ``w4a8_lsq``'s weights) and then its integer
    form, which reads that grid rather than deriving it again: one observer pass per weight per
    training forward (two on the code before, git ed0663d, for each of them), with the values and
    gradients the two passes gave (a 3-step SGD run of the shipped model, its losses and all 1,110
    gradients, the same bits as on that code, ad hoc). A weight quantizer that two modules share
    (the decoder's tied embedding and output projection) runs once per use."""
    from collections import Counter

    from qswap.nn.fairseq.attention import Projection
    from qswap.nn.linear import _Weighted
    from qswap.quant.fake_quantize import FakeQuantize

    q, net = _lsq_s2t_model()
    users = Counter(id(m.weight_quant) for m in q.modules() if isinstance(getattr(m, "weight_quant", None), FakeQuantize))
    observed = {name: m.weight_quant.observer for name, m in q.named_modules()
                if isinstance(m, (_Weighted, Projection)) and isinstance(m.weight_quant, FakeQuantize)
                and m.weight_quant.enabled and users[id(m.weight_quant)] == 1}
    calls = Counter()
    hooks = [obs.register_forward_hook(lambda *_, name=name: calls.update([name])) for name, obs in observed.items()]
    try:
        with simulating(q, "integer"):
            q.train()
            q(**net)[0].float().pow(2).mean().backward()
    finally:
        for h in hooks:
            h.remove()
        q.eval()
    assert len(observed) > 20 and any(".subsample." in n for n in observed) and any("_proj" in n for n in observed)
    assert {n: c for n, c in calls.items() if c != 1} == {} and calls.keys() == observed.keys()


def test_a_weight_normed_conv_keeps_no_normed_weight_from_a_training_forward():
    """A weight-normed convolution's training forward (float op, then its integer form on the grid
    the op derived) keeps no ``g * v / ||v||``: an optimizer writes weight_g through ``.data``, which
    no stamp sees, and the next inference forward must compute it from the written weights. (With
    the integer form built after the op and reading the kept weight, it kept one: the inference
    output then differed from a fresh model's by 0.64, review of git 3e4ee1f.)"""
    torch.manual_seed(2)
    x = torch.randn(2, 8, 40)
    conv = nn.utils.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), name="weight", dim=2)
    q = qswap.convert(nn.Sequential(conv, nn.GELU()).eval(), recipe_with("w8a8", "integer"))
    qswap.calibrate(q, [x, x.flip(0)], forward=lambda m, b: m(b))
    c, reader = q[0], q[1].input_quant
    c.train()
    c(x, reader).sum().backward()
    assert "_normed_weight" not in c.__dict__
    c.weight_g.data.mul_(1.5)  # an optimizer's write through .data (fairseq's Adam)
    c.eval()
    with torch.no_grad():
        after = c(x, reader)
    fresh = copy.deepcopy(c)  # a copy keeps no caches (LeavesCaches)
    with torch.no_grad():
        assert torch.equal(after, fresh(x, reader))


def test_learned_reader_scales_trained_below_zero_fall_back_to_float():
    """Once reader scales train (above), one can train below zero, as fairseq-train's QAT of a
    tiny model with lr 1e-3 did to the subsampler GLU's reader: the integer forms of the GLU and
    of the attention's products then have no fixed-point multiplier, and the simulation computes
    those ops in float (as without ``simulate: integer``), in training and at inference, instead
    of raising ``IntegerizeError``. (The integer softmax takes such a grid as it is.)"""
    q, net = _lsq_s2t_model()
    layer = q.encoder.transformer_layers[0]
    readers = [q.encoder.subsample.conv_layers[1].input_quant,  # the first GLU's reader
               layer.self_attn.core.softmax_in_quant, layer.self_attn.core.softmax_out_quant,
               layer.self_attn.out_proj.input_quant]
    with torch.no_grad():
        for r in readers:
            r.scale.neg_()
    with torch.no_grad():
        assert torch.isfinite(q.eval()(**net)[0]).all()
    q.train()
    out = q(**net)[0]
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all() and all(r.scale.grad is not None for r in readers)


def test_an_ops_own_input_scale_below_zero_falls_back_to_float_too():
    """A LayerNorm whose own input quantizer's scale is below 0 (a learned scale loaded after
    ``eval()``, or set by hand): ``simulate: integer`` had raised IntegerizeError out of the forward
    where ``simulate: float`` runs; the op now runs in float, as for a reader's scale."""
    import qswap.nn.simulate

    torch.manual_seed(0)
    x = torch.randn(8, 32)
    q = qswap.convert(nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval(), "w8a8")
    qswap.calibrate(q, [x, x.flip(0)])
    with torch.no_grad():
        q[1].input_quant.scale.fill_(-0.05)
        for mode in ("float", "integer"):
            with qswap.nn.simulate.simulating(q, mode):
                assert torch.isfinite(q(x)).all(), mode


@pytest.mark.parametrize("recipe", ["w4a8_lsq", "w4a4_edges8_stream_smoothquant_lsq"])
def test_training_residual_adds_are_the_integer_layers_with_the_float_sums_gradient(recipe):
    """A pre-norm encoder layer's residual add in training (autograd) under ``simulate: integer``:
    the value each reader reads is the integer layer's rescaled add (as at inference), and each
    reader's learned scale gets the gradient of the float sum as it rounds it (per tensor, and per
    channel of a residual stream)."""
    from qswap.models import build_s2t_transformer, s2t_net_input

    torch.manual_seed(0)
    net = s2t_net_input(2, 60, 80, 7, 40, seed=1)
    model = build_s2t_transformer(encoder_normalize_before=True, decoder_normalize_before=True)
    data = [net] if "smoothquant" in recipe else None
    q = qswap.convert(model, recipe, data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(q, [net])
    layer, nxt = q.encoder.transformer_layers[0], q.encoder.transformer_layers[1]
    readers = (layer.final_layer_norm.input_quant, layer.ffn_residual_quant)
    torch.manual_seed(1)
    a = layer.attn_residual_quant(torch.randn(5, 2, layer.embed_dim))
    b = layer.attn_out_quant(torch.randn(5, 2, layer.embed_dim))
    with torch.no_grad():
        expected = layer._add("attn", a, b, readers)
    assert len(expected) == 2 and not torch.equal(expected[1], a + b)  # the integer add, one value per reader
    q.train()  # learned scales get their gradient in training
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    x, residual = layer._add("attn", a, b, readers)
    assert torch.equal(x.detach(), expected[0]) and torch.equal(residual.detach(), expected[1])
    assert not torch.equal(x.detach(), (a + b).detach())  # not the float sum
    (readers[0](x).pow(2).sum() + readers[1](residual).pow(2).sum()).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert all(r.scale.grad is not None and r.scale.grad.abs().sum() > 0 for r in readers)


def test_an_op_tells_its_reader_only_where_no_dropout_drops_between_them():
    """fairseq's layers run dropout between an op and its reader (attention or fc2, dropout, the
    residual operand's quantizer). While it drops (training, p > 0) the op is not told the reader:
    the dropped values are off the reader's grid, and a reader told would get the LSQ gradient of
    the op's result on top of its own."""
    from fairseq.modules import FairseqDropout

    from qswap.nn.fairseq.layers import past

    reader = nn.Identity()
    for dropout in (FairseqDropout(0.3), nn.Dropout(0.3)):
        assert past(dropout.train(), reader) is None
        assert past(dropout.eval(), reader) is reader
    assert past(FairseqDropout(0.0).train(), reader) is reader
    inference = FairseqDropout(0.3)
    inference.apply_during_inference = True
    assert past(inference.eval(), None) is None and past(inference.eval(), reader) is None
