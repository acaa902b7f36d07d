"""A batch forward's fast paths give the reference bits, for the three architectures.

At inference a frozen activation quantizer rounds with the one-pass C kernel
(``qswap.quant.fused``), and the layers hand the quantizers the temporaries nothing else reads
(the attention scores and probabilities, fc1's result, the attention output: ``consume``), which
are then rounded in place. The reference is the same model with every module called through
``nn.Module.__call__`` (a global forward hook: nothing is consumed) under a dispatch mode (torch's
four passes, no kernel): the outputs must be the same bits, and the caller's inputs untouched.
"""
import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("fairseq")

from fairseq_testkit import ARCHS, build, convert_calibrated, run  # noqa: E402
from helpers import recipe_with  # noqa: E402


class _Watching(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _reference(q, net_input):
    handle = register_module_forward_hook(lambda module, args, output: None)
    try:
        with _Watching():
            return run(q, net_input)
    finally:
        handle.remove()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("simulate", ["float", "integer"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_batch_forward_gives_the_reference_bits(arch, simulate):
    model, net_input = build(arch)
    q = convert_calibrated(model, net_input, recipe_with("w8a8", simulate))
    run(q, net_input)  # the first forward after calibration keeps each frozen grid: the fast paths run next
    kept = {k: v.clone() for k, v in net_input.items() if torch.is_tensor(v)}
    ours = run(q, net_input)
    assert all(torch.equal(net_input[k], v) for k, v in kept.items())
    reference = _reference(q, net_input)
    assert all(_same_bits(a, b) for a, b in zip(ours, reference))
