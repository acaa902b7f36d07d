"""qswap.nn.base: what every counterpart shares."""
import pytest
import torch
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


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_input_reads_by_the_kernel_or_by_torch(monkeypatch, kernel, bad):
    """One read by qswap's C kernel where it can read the input, torch's predicates where it
    cannot (not built, not a dense float32 tensor): the same DataError either way, on any
    position of the input, and a finite or empty input passes."""
    from qswap.errors import DataError
    from qswap.nn.base import check_finite_input
    from qswap.quant import fused

    if kernel and not fused.AVAILABLE:
        pytest.skip("qswap's C kernel is not built")
    if not kernel:
        monkeypatch.setattr(fused, "min_max", lambda x: None)
    x = torch.randn(3, 7, 5)
    check_finite_input(x)
    check_finite_input(torch.empty(0, 5))
    for where in ((0, 0, 0), (2, 6, 4), (1, 3, 2)):
        y = x.clone()
        y[where] = bad
        with pytest.raises(DataError, match="holds NaN or \\+-inf"):
            check_finite_input(y)
        with pytest.raises(DataError, match="holds NaN or \\+-inf"):
            check_finite_input(y.transpose(0, 2))  # a permuted view: dense, read by the kernel too
