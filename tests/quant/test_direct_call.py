"""DirectCall skips nn.Module.__call__'s frames only where that changes nothing: a hook of the
module, a global module hook (the honesty audit's) or a JIT trace still sees every call."""
import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from qswap.quant.bias import BiasQuantize
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.spec import QuantSpec


@pytest.fixture()
def frozen():
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False))
    fq(torch.randn(8, 16))
    fq.freeze()
    return fq


def _hook_calls(register, fq, x):
    seen = []
    handle = register(lambda module, *rest: seen.append(module) and None)
    try:
        out = fq(x)
    finally:
        handle.remove()
    return seen, out


@pytest.mark.parametrize("register", ["module_forward", "module_forward_pre", "global_forward",
                                      "global_forward_pre"])
def test_hooks_see_every_call_and_the_value_is_the_same(frozen, register):
    registers = {"module_forward": frozen.register_forward_hook,
                 "module_forward_pre": frozen.register_forward_pre_hook,
                 "global_forward": register_module_forward_hook,
                 "global_forward_pre": register_module_forward_pre_hook}
    x = torch.randn(4, 16) * 3
    with torch.no_grad():
        direct = frozen(x)
        seen, hooked = _hook_calls(registers[register], frozen, x)
    assert seen == [frozen]
    assert torch.equal(direct, hooked)
    assert torch.equal(direct, torch.fake_quantize_per_tensor_affine(
        x, frozen.scale.reshape(()), frozen.zero_point.reshape(()), frozen.spec.qmin, frozen.spec.qmax))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_jit_trace_records_the_quantizer_as_a_module(frozen):
    """Under a trace the call goes through nn.Module.__call__: the quantizer's ops carry its scope
    (what ONNX export names nodes by)."""
    traced = torch.jit.trace(torch.nn.Sequential(torch.nn.ReLU(), frozen), torch.randn(4, 16), check_trace=False)
    scopes = {n.scopeName() for n in traced.inlined_graph.nodes() if n.kind() == "aten::round_"}
    assert scopes == {"__module.1"}
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(traced(x), frozen(torch.relu(x)))


def test_bias_quantize_is_called_directly_and_through_hooks_alike(frozen):
    weight_quant = FakeQuantize(QuantSpec(bits=8), kind="weight")
    weight_quant(torch.randn(3, 16))
    bias, bq, seen = torch.randn(3), BiasQuantize(), []
    with torch.no_grad():
        direct = bq(bias, frozen, weight_quant)
        handle = register_module_forward_hook(lambda module, args, out: seen.append(module))
        try:
            hooked = bq(bias, frozen, weight_quant)
        finally:
            handle.remove()
    assert bq in seen
    assert torch.equal(direct, hooked)
