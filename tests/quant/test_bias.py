"""BiasQuantize: the bias on the int32 grid of input_scale * weight_scale, reused without autograd
until the bias or either quantizer's grid changes."""
import torch
from torch import nn

from qswap.nn.base import QuantConfig
from qswap.nn.linear import QLinear
from qswap.quant.bias import BiasQuantize
from qswap.quant.spec import QuantSpec


def _qlinear(seed=0):
    torch.manual_seed(seed)
    q = QLinear.from_float(nn.Linear(8, 4), QuantConfig(QuantSpec(), QuantSpec(symmetric=False))).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        q(x)  # the input quantizer observes: it has a grid
    return q, x


def _bias(q):
    return q.bias_quant(q.bias, q.input_quant, q.weight_quant)


def _fresh(q):
    return BiasQuantize()(q.bias, q.input_quant, q.weight_quant)


def test_bias_is_reused_until_a_grid_or_the_bias_changes():
    q, x = _qlinear()
    q.input_quant.freeze()
    with torch.no_grad():
        first = _bias(q)
        assert _bias(q) is first
        q.input_quant.unfreeze()
        q.input_quant(x * 5)  # observes a wider range: a new input grid
        wider = _bias(q)
        assert wider is not first and torch.equal(wider, _fresh(q))
        q.bias.add_(0.25)  # an optimizer step
        moved = _bias(q)
        assert moved is not wider and torch.equal(moved, _fresh(q))
        q.weight.mul_(3)
        q.weight_quant(q.weight)  # the weight quantizer re-derives its grid, as a forward does
        assert torch.equal(_bias(q), _fresh(q))


def test_loading_a_state_dict_changes_the_bias_grid():
    q, _ = _qlinear()
    other, x = _qlinear(seed=1)
    with torch.no_grad():
        other.input_quant(x * 7)
        _bias(q)
        q.load_state_dict(other.state_dict())
        assert torch.equal(_bias(q), _fresh(other))


def test_a_call_with_autograd_is_not_cached():
    q, _ = _qlinear()
    with torch.no_grad():
        _bias(q)
    out = _bias(q)
    assert out.requires_grad and q.bias_quant._cached is None
    out.sum().backward()
    assert torch.equal(q.bias.grad, torch.ones(4))  # straight-through


def _reference_linear(q, x):
    """F.linear on what the two quantizers compute afresh (no kept pair, no kept weight)."""
    wq = q.weight_quant
    saved, wq._cached, wq._weight_stamp = (wq._cached, wq._weight_stamp), None, None
    try:
        return torch.nn.functional.linear(q.input_quant(x), wq(q.weight), _fresh(q))
    finally:
        wq._cached, wq._weight_stamp = saved


def test_the_kept_weight_and_bias_pair_follows_flags_writes_and_hooks():
    """``quantized_pair``: a QLinear at inference keeps (weight, bias) and checks one fingerprint;
    a sensitivity probe's enabled flag, an in-place write of the weight, the bias or a grid, and a
    hook on either quantizer are each seen on the next call."""
    from qswap.quant.switch import enabled_only

    q, x = _qlinear()
    q.input_quant.freeze()
    with torch.no_grad():
        first = q(x)
        assert q.bias_quant._pair is not None and torch.equal(q(x), first)
        with enabled_only([q.weight_quant], keep=[]):  # the weight in float: the bias stays float too
            assert torch.equal(q(x), torch.nn.functional.linear(q.input_quant(x), q.weight, q.bias))
        assert torch.equal(q(x), first)
        for write in (lambda: q.weight.mul_(-1.0), lambda: q.bias.add_(0.5),
                      lambda: q.input_quant.scale.mul_(2.0), lambda: q.weight_quant.zero_point.add_(0)):
            write()
            assert torch.equal(q(x), _reference_linear(q, x))
        seen = []
        for quant in (q.weight_quant, q.bias_quant):
            handle = quant.register_forward_hook(lambda module, args, out: seen.append(module))
            q(x)
            handle.remove()
        assert seen == [q.weight_quant, q.bias_quant]


def test_a_copy_or_a_pickle_leaves_the_kept_values_behind():
    """The kept pair and bias grid are rebuilt on use: a deep copy (the export copies models) and
    a pickle do not carry them, and the copy computes what the original does."""
    import copy
    import pickle

    q, x = _qlinear()
    q.input_quant.freeze()
    with torch.no_grad():
        first = q(x)
    assert q.bias_quant._pair is not None and q.bias_quant._cached is not None
    for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert (other.bias_quant._pair, other.bias_quant._key, other.bias_quant._cached) == (None, None, None)
        with torch.no_grad():
            assert torch.equal(other(x), first)
