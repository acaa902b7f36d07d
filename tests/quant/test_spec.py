import pytest

from qswap.errors import SpecError
from qswap.quant.spec import QuantSpec


@pytest.mark.parametrize("bits,signed,narrow,qmin,qmax", [
    (8, True, False, -128, 127), (8, True, True, -127, 127), (8, False, False, 0, 255),
    (4, True, False, -8, 7), (2, False, False, 0, 3), (16, True, False, -32768, 32767),
])
def test_integer_range(bits, signed, narrow, qmin, qmax):
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 1}, "bits"), ({"bits": 17}, "bits"), ({"bits": 0}, "bits"), ({"bits": -4}, "bits"),
    ({"bits": 8.0}, "bits"), ({"bits": True}, "bits"), ({"granularity": "per_row"}, "granularity"),
    ({"granularity": "per_group"}, "group_size"), ({"group_size": 4}, "group_size"),
    ({"scale_type": "log"}, "scale_type"), ({"rounding": "up"}, "rounding"),
    ({"observer": "kl"}, "observer"), ({"percentile": 30}, "percentile"), ({"momentum": 0}, "momentum"),
    ({"signed": "yes"}, "signed"), ({"narrow_range": True, "signed": False}, "narrow_range"),
    # an axis with per_tensor was ignored (one scale: a forgotten granularity); true was momentum 1.0
    ({"axis": 1}, "axis"), ({"axis": 0, "granularity": "per_tensor"}, "axis"),
    ({"momentum": True}, "momentum"), ({"percentile": True}, "percentile"),
    # percentile per channel or per group had kept each channel's extremes (minmax), silently
    ({"granularity": "per_channel", "axis": 0, "observer": "percentile"}, "observer"),
    ({"granularity": "per_group", "group_size": 8, "observer": "percentile"}, "observer"),
])
def test_bad_fields_raise_spec_error_naming_the_field(kwargs, field):
    with pytest.raises(SpecError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


def test_channel_axis_defaults():
    assert QuantSpec().channel_axis is None
    assert QuantSpec(granularity="per_channel").channel_axis == 0
    assert QuantSpec(granularity="per_group", group_size=8).channel_axis == -1
    assert QuantSpec(granularity="per_channel", axis=1).channel_axis == 1


def test_dict_round_trip_and_unknown_field():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=16, learnable=True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown QuantSpec field"):
        QuantSpec.from_dict({"bitz": 8})


def test_unsigned_variant_and_label():
    spec = QuantSpec(bits=8, narrow_range=True).unsigned()
    assert (spec.signed, spec.narrow_range, spec.qmin, spec.qmax) == (False, False, 0, 255)
    assert QuantSpec(bits=4, granularity="per_channel").short() == "int4 sym per_channel(0)"


def test_percentile_per_channel_in_a_recipe_says_what_to_use_instead():
    from qswap.errors import RecipeError
    from qswap.recipe import parse_yaml

    with pytest.raises(RecipeError) as exc:
        parse_yaml("version: 1\nname: r\ndefaults:\n  weight: {bits: 4, granularity: per_channel, axis: 0, "
                   "observer: percentile, percentile: 90}\n")
    message = str(exc.value)
    assert "percentile has no per_channel form" in message
    assert "granularity: per_tensor" in message and "minmax or mse per_channel" in message


def test_a_learned_pow2_scale_is_refused():
    """Calibration rounds a pow2 scale to a power of two; LSQ's first Adam step had moved it off
    (0.125 -> 0.124), and nothing put it back."""
    import pytest

    from qswap.errors import SpecError
    from qswap.quant.spec import QuantSpec

    with pytest.raises(SpecError, match="cannot learn a pow2 scale"):
        QuantSpec(bits=4, scale_type="pow2", learnable=True)
    assert QuantSpec(bits=4, scale_type="pow2").scale_type == "pow2"
    assert QuantSpec(bits=4, learnable=True).learnable
