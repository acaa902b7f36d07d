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


def test_a_hook_on_fc2_sees_and_changes_what_its_input_quantizer_reads():
    """The FFN's ReLU and fc2's input rounding share one pass only where nothing watches fc2: a
    pre-hook of fc2 that scales its input gets the activation's values, and fc2's input
    quantizer then rounds what the hook returned, as with every module called through
    ``nn.Module.__call__``."""
    model, net_input = build("s2t_transformer")
    q = convert_calibrated(model, net_input, recipe_with("w8a8", "float"))
    run(q, net_input)
    fc2 = q.encoder.transformer_layers[0].fc2
    seen = []

    def scale_input(module, args):
        seen.append(args[0].clone())
        return (args[0] * 1.3,)
    handle = fc2.register_forward_pre_hook(scale_input)
    try:
        ours = run(q, net_input)
        reference = _reference(q, net_input)
    finally:
        handle.remove()
    assert all(_same_bits(a, b) for a, b in zip(ours, reference))
    ffn_act = q.encoder.transformer_layers[0].ffn_act_quant
    assert _same_bits(seen[0], seen[-1])  # the hook saw the same input on both runs
    assert bool((seen[0] >= 0).all()) and torch.equal(ffn_act(seen[0]), seen[0])  # ReLU of the ffn_act grid


@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_wav2vec2_with_relu_gives_the_reference_bits(simulate):
    """wav2vec 2.0's FFN with a ReLU (its default is GELU): the ReLU and fc2's input rounding run in
    the activation quantizer's pass, with the reference's bits."""
    model, net_input = build("wav2vec2_ctc", activation_fn="relu")
    q = convert_calibrated(model, net_input, recipe_with("w8a8", simulate))
    assert q.w2v_encoder.w2v_model.encoder.layers[0].activation_fn is torch.nn.functional.relu
    run(q, net_input)
    ours = run(q, net_input)
    reference = _reference(q, net_input)
    assert all(_same_bits(a, b) for a, b in zip(ours, reference))
