"""Property-based tests: the recipe parser and fake_quantize on inputs hypothesis makes up."""
from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qswap.errors import RecipeError
from qswap.quant import QuantSpec, choose_qparams, fake_quantize, quantize, reduce_min_max
from qswap.quant.primitives import MIN_SCALE
from qswap.recipe import parse_recipe, parse_yaml

# QSWAP_HYPOTHESIS_EXAMPLES=5000 for a longer hunt than CI's
SETTINGS = settings(max_examples=int(os.environ.get("QSWAP_HYPOTHESIS_EXAMPLES", 150)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- recipes -----------------------------------------------------------------------------------
SPEC_FIELDS = ["bits", "signed", "symmetric", "granularity", "axis", "group_size", "scale_type",
               "rounding", "narrow_range", "observer", "percentile", "momentum", "learnable"]
RECIPE_KEYS = ["version", "name", "description", "defaults", "rules", "float_ok", "strict",
               "weight", "activation", "sites", "match", "path", "class", "skip", "note"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["per_tensor", "per_channel", "per_group", "pow2", "floor",
                                     "minmax", "mse", "re:fc[0-9]+", "re:(a+)+", "re:([", "*.fc1",
                                     "Linear", ""]))
keys = st.one_of(st.sampled_from(RECIPE_KEYS + SPEC_FIELDS), st.text(max_size=8), st.integers(0, 3))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(keys, inner, max_size=5), max_leaves=30)
spec_value = {"bits": st.integers(-2, 20), "signed": st.booleans(), "symmetric": st.booleans(),
              "granularity": st.sampled_from(["per_tensor", "per_channel", "per_group", "per_row"]),
              "axis": st.one_of(st.none(), st.integers(-2, 1)),
              "group_size": st.one_of(st.none(), st.integers(-1, 64)),
              "scale_type": st.sampled_from(["float", "pow2"]),
              "rounding": st.sampled_from(["half_even", "half_away", "floor"]),
              "narrow_range": st.booleans(), "observer": st.sampled_from(["minmax", "moving_average",
                                                                          "percentile", "mse"]),
              "percentile": st.floats(40, 110), "momentum": st.floats(-0.5, 1.5), "learnable": st.booleans()}
spec_like = st.one_of(st.none(), anything, st.fixed_dictionaries(
    {}, optional={k: st.one_of(v, scalars) for k, v in spec_value.items()}))
rule_like = st.one_of(anything, st.fixed_dictionaries(
    {"match": st.one_of(anything, st.fixed_dictionaries({}, optional={
        "path": st.one_of(scalars, st.sampled_from(["fc1", "re:.*fc[12]", "encoder.*"])),
        "class": st.one_of(scalars, st.lists(st.sampled_from(["Linear", "Conv1d", ""]), max_size=3))}))},
    optional={"weight": spec_like, "activation": spec_like, "skip": scalars, "note": scalars,
              "sites": st.one_of(anything, st.dictionaries(st.sampled_from(["q", "softmax_in", "weight"]),
                                                           spec_like, max_size=2)),
              "float_ok": anything}))
recipe_like = st.fixed_dictionaries(
    {"version": st.one_of(st.just(1), scalars)},
    optional={"name": scalars, "description": scalars, "strict": scalars, "float_ok": anything,
              "defaults": st.one_of(anything, st.fixed_dictionaries({}, optional={
                  "weight": spec_like, "activation": spec_like, "sites": anything})),
              "rules": st.one_of(anything, st.lists(rule_like, max_size=3)), "extra": anything})


@SETTINGS
@given(recipe_like)
def test_parse_recipe_gives_a_recipe_or_a_recipe_error(data):
    try:
        recipe = parse_recipe(data)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    again = parse_recipe(recipe.to_dict())  # what a valid recipe dumps, it reads back the same
    assert (again.defaults, again.rules, again.float_ok, again.strict) == \
        (recipe.defaults, recipe.rules, recipe.float_ok, recipe.strict)


@SETTINGS
@given(recipe_like)
def test_yaml_text_and_dict_agree(data):
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        assume(False)
    outcomes = []
    for parse in (lambda: parse_recipe(yaml.safe_load(text)), lambda: parse_yaml(text)):
        try:
            r = parse()
            outcomes.append((r.defaults, r.rules))
        except RecipeError:
            outcomes.append("error")
    assert outcomes[0] == outcomes[1]


@SETTINGS
@given(st.text(max_size=300))
def test_parse_yaml_of_any_text_gives_a_recipe_or_a_recipe_error(text):
    try:
        parse_yaml("version: 1\n" + text)
        parse_yaml(text)
    except RecipeError as exc:
        assert "\n" not in str(exc)


# -- fake_quantize -----------------------------------------------------------------------------
@st.composite
def specs(draw):
    granularity = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    signed = draw(st.booleans())
    return QuantSpec(bits=draw(st.integers(2, 16)), signed=signed, symmetric=draw(st.booleans()),
                     granularity=granularity,
                     group_size=draw(st.sampled_from([1, 2, 4])) if granularity == "per_group" else None,
                     scale_type=draw(st.sampled_from(["float", "pow2"])),
                     rounding=draw(st.sampled_from(["half_even", "half_away", "floor"])),
                     narrow_range=signed and draw(st.booleans()))


def floats(limit: float):
    limit = float(torch.tensor(limit, dtype=torch.float32))  # representable in float32
    return st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensors(draw, limit: float = 3e38):
    rows, cols = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
    values = draw(st.lists(floats(limit), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


def _codes_ok(x, scale, zp, spec):
    codes = quantize(x, scale, zp, spec).to(torch.int64)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax


@SETTINGS
@given(specs(), tensors())
def test_fake_quantize_with_observed_qparams(spec, x):
    scale, zp = choose_qparams(*reduce_min_max(x, spec), spec)
    assert torch.isfinite(scale).all() and (scale >= MIN_SCALE).all()
    out = fake_quantize(x, scale, zp, spec)
    assert torch.isfinite(out).all()
    _codes_ok(x, scale, zp, spec)
    assert torch.equal(fake_quantize(out, scale, zp, spec), out), "not idempotent"


@SETTINGS
@given(specs(), tensors(limit=1e30), st.floats(MIN_SCALE, 1e6), st.floats(0, 1))
def test_fake_quantize_with_any_grid(spec, x, scale_value, zp_frac):
    spec = spec.replace(granularity="per_tensor", group_size=None)
    zp_value = 0 if spec.symmetric else spec.qmin + math.floor(zp_frac * (spec.qmax - spec.qmin))
    scale = torch.tensor(scale_value, dtype=torch.float32)
    zp = torch.tensor(zp_value, dtype=torch.int32)
    out = fake_quantize(x, scale, zp, spec)
    assert torch.isfinite(out).all()
    _codes_ok(x, scale, zp, spec)
    assert torch.equal(fake_quantize(out, scale, zp, spec), out), "not idempotent"


@pytest.mark.parametrize("rounding", ["half_even", "half_away", "floor"])
def test_idempotence_regression_floor_grid_values(rounding):
    """Found by the property test: floor moved grid values down a step on a second pass."""
    spec = QuantSpec(bits=5, symmetric=False, rounding=rounding)
    x = torch.linspace(-3, 3, 1001)
    scale, zp = choose_qparams(*reduce_min_max(x, spec), spec)
    once = fake_quantize(x, scale, zp, spec)
    assert torch.equal(fake_quantize(once, scale, zp, spec), once)
