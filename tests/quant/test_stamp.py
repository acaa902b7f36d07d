"""The caches (a weight quantizer's eval output, a bias's int32 grid, a frozen grid read as Python
numbers, derived weights: weight norm and folded BatchNorm) are never stale: after each way a
model's tensors change, the cached model computes what an uncached copy computes."""
import copy

import pytest
import torch
from torch import nn

import qswap


class Net(nn.Module):
    """Every cached path: a weight-normed conv (derived weight), BatchNorm (derived fold), Linear
    (weight cache, bias grid), their activation quantizers (frozen grids)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.weight_norm(nn.Conv1d(4, 4, 3, padding=1), dim=2)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # (B, 4, L)
        return self.fc(self.bn(self.conv(x)).transpose(1, 2))  # (B, L, 3)


def _converted(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with pytest.warns(FutureWarning):  # weight_norm's deprecation
        model = Net()
    with torch.no_grad():
        model.bn(torch.randn(8, 4, 6) * 2 + 1)  # running statistics
    q = qswap.convert(model.eval(), "w8a8")
    qswap.calibrate(q, [torch.randn(2, 4, 6) * (seed + 1)])
    return q


def _uncached(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``q`` computes without any cache: a copy (quantizers copy without their caches) run
    with autograd (weights, biases and derived weights computed afresh)."""
    fresh = copy.deepcopy(q)
    with torch.enable_grad():
        return fresh(x).detach()


def _load_state_dict(q):
    q.load_state_dict(_converted(seed=1).state_dict())


def _copy_(q):
    with torch.no_grad():
        for t in (*q.parameters(), *q.buffers()):
            if t.is_floating_point():
                t.copy_(t * 1.5 + 0.1)


def _step(optimizer_class, **kwargs):
    def step(q):
        optimizer = optimizer_class(q.parameters(), **kwargs)
        with torch.enable_grad():  # a QAT step, in eval mode (no dropout), as fairseq validates
            q(torch.randn(2, 4, 6)).square().sum().backward()
        optimizer.step()
    return step


def _fairseq_adam_step(q):
    """fairseq's Adam writes the parameters through ``.data`` (no version counter bump)."""
    adam = pytest.importorskip("fairseq.optim.adam")
    _step(adam.Adam, lr=0.1)(q)


def _to(q):
    q.to(torch.float64).to(torch.float32)  # new storage, the same values
    with torch.no_grad():
        q.fc.weight.mul_(-1.0)


def _narrowed_view(q):
    """``.data`` set to a narrower view of the same storage (the tensor, its version and its
    storage address kept): the fc's weight and bias cut to fewer outputs, as pruning does."""
    with torch.no_grad():
        q.fc.weight.data = q.fc.weight.data[:2]
        q.fc.bias.data = q.fc.bias.data[:2]


def _square_transpose(q):
    """``.data`` set to a transposed view of a (4, 4, 3) weight: the same shape, new strides."""
    with torch.no_grad():
        q.conv.weight_v.data = q.conv.weight_v.data.transpose(0, 1)


def _new_storages_twice(q):
    """Two ``.data`` assignments in a row: the storage freed by the first may be handed to the
    second (the same address), unless the stamp holds it."""
    with torch.no_grad():
        for _ in range(2):
            q.fc.weight.data = torch.randn_like(q.fc.weight)


CHANGES = {"load_state_dict": _load_state_dict, "copy_": _copy_,
           "torch_sgd_step": _step(torch.optim.SGD, lr=0.5), "fairseq_adam_step": _fairseq_adam_step,
           "to": _to, "narrowed_view": _narrowed_view, "square_transpose": _square_transpose,
           "new_storages_twice": _new_storages_twice}


@pytest.mark.parametrize("change", CHANGES)
def test_cached_model_follows_every_change_of_its_tensors(change):
    q = _converted(seed=0)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        before = q(x)
        q(x)  # every cache filled and used
    CHANGES[change](q)
    with torch.no_grad():
        after = q(x)
    torch.testing.assert_close(after, _uncached(q, x), rtol=0, atol=1e-6)
    assert after.shape != before.shape or not torch.equal(after, before)


@pytest.mark.parametrize("size", [8, 64, 256])
def test_a_freed_storage_handed_back_at_the_same_address_is_not_taken_for_the_old_one(size):
    """``.data = new`` frees the old storage; the allocator may give its address to the next
    tensor of the same size, with the same id and version: the stamp holds the old storage, so
    the address cannot come back while the stamp lives (20 tries each; the old stamp missed most)."""
    from qswap.quant.stamp import stamp, unchanged
    w = nn.Parameter(torch.randn(size, size))
    for _ in range(20):
        kept = stamp(w)
        w.data = torch.empty_like(w).normal_()
        w.data = torch.empty_like(w).normal_()
        assert not unchanged(kept, w)


def test_the_fingerprint_of_three_tensors_is_the_general_one_and_sees_each_change():
    """Three tensors (a grid, a weight and its grid: checked per call) have their own unrolled
    fingerprint: the same list as the loop's, and it changes with a write, a new storage, a new
    tensor in any place."""
    from qswap.quant.stamp import fingerprint, stamp, unchanged

    a, b, c = torch.ones(2), torch.zeros(()), torch.ones(3, dtype=torch.int32)
    assert fingerprint(a, b, c) == fingerprint(a, b) + fingerprint(c)
    kept = stamp(a, b, c)
    assert unchanged(kept, a, b, c)
    b.add_(1.0)  # an in-place write
    assert not unchanged(kept, a, b, c)
    kept = stamp(a, b, c)
    c.data = torch.ones(3, dtype=torch.int32)  # a new storage, no version bump
    assert not unchanged(kept, a, b, c)
    kept = stamp(a, b, c)
    assert not unchanged(kept, a, b.clone(), c) and not unchanged(kept, a, b)


def test_a_model_with_filled_caches_pickles_and_copies():
    """Every cache filled (a frozen grid, a weight's output, a bias grid, derived weights): the
    model pickles and deep-copies (a stamp's held storages are left behind), and both compute
    what the original does."""
    import pickle

    q = _converted(seed=0)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        q(x)
        expected = q(x)
        for other in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
            assert torch.equal(other(x), expected)
