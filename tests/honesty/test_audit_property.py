"""Property: on random small graphs of quantizers, float ops, matmuls and data movement, the
tag-based audit and the value-level check reach the same verdict."""
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import qswap  # noqa: E402
from qswap import QuantSpec  # noqa: E402
from qswap.quant.fake_quantize import FakeQuantize  # noqa: E402

A8, W8 = QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8)
STEPS = {  # name: f(graph, x, i) for step i
    "quant": lambda g, x, i: g.quant[str(i)](x),
    "tanh": lambda g, x, i: torch.tanh(x),  # bounded: no step overflows
    "scale": lambda g, x, i: x * 0.37,
    "flip": lambda g, x, i: x.flip(0),
    "swap halves": lambda g, x, i: torch.cat([x[:, 4:], x[:, :4]], 1),
    "transpose twice": lambda g, x, i: x.t().contiguous().t(),
    "maximum with a rescaled copy": lambda g, x, i: torch.maximum(x, x.flip(0) * 0.37),
    "add a rescaled copy": lambda g, x, i: x + x.flip(0) * 0.37,
    "matmul": lambda g, x, i: x @ g.wq(g.w),
}


class _Graph(nn.Module):
    def __init__(self, steps: list[str]):
        super().__init__()
        self.steps = steps
        self.quant = nn.ModuleDict({str(i): FakeQuantize(A8) for i, n in enumerate(steps) if n == "quant"})
        self.w = nn.Parameter(torch.randn(8, 8))
        self.wq = FakeQuantize(W8, kind="weight")

    def forward(self, x):
        for i, name in enumerate(self.steps):
            x = STEPS[name](self, x, i)
        return x


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=6),
       seed=st.integers(0, 2 ** 16))
def test_the_audit_and_the_value_level_check_agree(steps, seed):
    torch.manual_seed(seed)
    x = torch.randn(6, 8)
    model = _Graph(steps)
    qswap.calibrate(model, [(x,)])
    report = qswap.audit(model, (x,), values=True)
    assert report.verdict in ("honest", "dishonest")
    assert report.values_verdict == report.verdict, (
        steps, [(v.op, v.operand) for v in report.violations + report.value_disagreements])
