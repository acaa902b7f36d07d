import pytest
import torch

from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec
from qswap.quant.switch import enabled_only


def _frozen(seed):
    fq = FakeQuantize(QuantSpec(bits=4))
    fq(torch.randn(64, generator=torch.Generator().manual_seed(seed)))
    fq.freeze()
    return fq


def test_only_the_kept_quantizers_quantize_inside_the_block():
    a, b, c = (_frozen(s) for s in range(3))
    x = torch.linspace(-1, 1, 101)
    with enabled_only([a, b, c], keep=[b]):
        assert [q.enabled for q in (a, b, c)] == [False, True, False]
        torch.testing.assert_close(a(x), x)  # float passes through
        assert not torch.equal(b(x), x)  # 4-bit grid changes values
    assert [q.enabled for q in (a, b, c)] == [True, True, True]


def test_previous_flags_come_back_even_when_the_probe_raises():
    a, b = _frozen(0), _frozen(1)
    b.enabled = False  # someone else's probe state survives ours
    with pytest.raises(RuntimeError, match="probe failed"):
        with enabled_only([a, b], keep=[b]):
            raise RuntimeError("probe failed")
    assert (a.enabled, b.enabled) == (True, False)
