"""qswap.nn.base: what every counterpart shares."""
import pytest
from torch import nn

import qswap
from qswap.nn.base import own

NAMES = ("weight", "bias", "input_quant", "weight_quant", "bias_quant", "simulate", "takes_reader")


def test_own_reads_the_objects_getattr_reads():
    """Parameters, a bias that is None, submodules, a plain attribute and a class attribute: the
    very objects ``getattr`` gives, for counterparts with and without a bias."""
    q = qswap.convert(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2)), "w8a8")
    for layer in q:
        assert all(got is expected for got, expected in zip(own(layer, *NAMES), (getattr(layer, n) for n in NAMES)))
    assert own(q[0], "bias") == [None] and own(q[1], "bias")[0] is q[1].bias


def test_own_of_a_missing_name_raises_as_getattr_does():
    q = qswap.convert(nn.Sequential(nn.Linear(4, 3)), "w8a8")
    with pytest.raises(AttributeError, match="no_such_part"):
        own(q[0], "weight", "no_such_part")
