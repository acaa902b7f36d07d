"""The four holes of issue 20's "Why": each small model hides a float op; the audit must report
it, naming the op and the module. All four passed as honest before the audit read arguments,
propagated grids by rule and failed closed on tensors it never saw made."""
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import qswap
from qswap import QuantSpec
from qswap.quant.fake_quantize import FakeQuantize

torch.manual_seed(0)
A8, W8 = QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8)


def _audit(model, x):
    qmodel = qswap.convert(model, "w8a8") if not isinstance(model, _MaxOfTwoGrids) else model
    qswap.calibrate(qmodel, [(x,)])
    return qswap.audit(qmodel, (x,))


def _hits(report):
    return {(v.module, v.op, v.kind) for v in report.violations}


class _AccumulatingIndexPut(nn.Module):
    """index_put with accumulate=True adds two accumulators: an add, not data movement."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        rows = torch.arange(a.size(0))
        return self.out(a.index_put((rows,), b, accumulate=True))


def test_index_put_with_accumulate_is_an_add():
    report = _audit(_AccumulatingIndexPut(), torch.randn(4, 8))
    assert ("", "aten.index_put", "float_operand") in _hits(report)


class _RoundTrip(nn.Module):
    """(h * 20).long().float() * 0.05: rounding to integers by a cast is not a qswap quantizer;
    the softmax and the matmul after it run on float values."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        h = self.lin(x)
        q = (h * 20).long().float() * 0.05
        return torch.softmax(q, dim=-1) @ self.w


def test_a_cast_to_integers_and_back_does_not_make_index_math():
    hits = _hits(_audit(_RoundTrip(), torch.randn(4, 8)))
    assert ("", "aten._softmax", "float_operand") in hits
    assert ("", "aten.mm", "raw_parameter") in hits or ("", "aten.mm", "float_operand") in hits


class _MaxOfTwoGrids(nn.Module):
    """maximum of two tensors quantized on different grids lies on neither: the matmul that
    consumes it directly computes on float values."""

    def __init__(self):
        super().__init__()
        self.qa, self.qb = FakeQuantize(A8), FakeQuantize(A8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.wq = FakeQuantize(W8, kind="weight")

    def forward(self, x):
        m = torch.maximum(self.qa(x), self.qb(3 * x + 1))
        return m @ self.wq(self.w)


def test_maximum_of_two_grids_keeps_neither():
    report = _audit(_MaxOfTwoGrids(), torch.randn(4, 8))
    assert ("", "aten.mm", "float_operand") in _hits(report)
    v = next(v for v in report.violations if v.op == "aten.mm")
    assert "aten.maximum" in v.operand


class _ThreadedExp(nn.Module):
    """A float exp computed on a worker thread (as threaded ensembles or parallel_apply do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        with ThreadPoolExecutor(1) as pool:
            y = pool.submit(torch.exp, h).result()
        return self.b(y)


def test_a_float_op_on_another_thread_is_reported():
    report = _audit(_ThreadedExp(), torch.randn(4, 8))
    assert ("", "aten.exp", "float_operand") in _hits(report)
    v = next(v for v in report.violations if v.op == "aten.exp")
    assert "thread" in v.operand


class _PoolMadeBefore(_ThreadedExp):
    """A worker thread started before the audit: its ops are not seen, so its result is a tensor
    of unseen origin, reported where it entered the audited path."""

    def forward(self, x):
        return self.b(_POOL[0].submit(torch.exp, self.a(x)).result())


_POOL: list = []  # a pool is not part of a module (convert copies the model)


def test_a_tensor_from_a_thread_the_audit_did_not_watch_is_an_unseen_origin():
    x = torch.randn(4, 8)
    qmodel = qswap.convert(_PoolMadeBefore(), "w8a8")
    with ThreadPoolExecutor(1) as pool:
        _POOL[:] = [pool]
        qswap.calibrate(qmodel, [(x,)])  # the worker thread exists before the audit starts
        report = qswap.audit(qmodel, (x,))
    assert ("b.input_quant", "<quantizer input>", "unseen_origin") in _hits(report)


class _ParallelBranches(nn.Module):
    """Four quantized branches run on four threads (as a threaded ensemble does): honest."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)) for _ in range(4)])
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        import threading

        ys = [None] * 4

        def run(i):
            ys[i] = self.branches[i](x)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.out(torch.cat(ys, -1))


def test_quantized_branches_on_threads_are_honest_in_every_audit():
    """The tracker's module stack and quantizer depth were one for all threads: one thread inside a
    quantizer hid the other threads' ops (14 of 15 audits of this honest model were not honest, and
    float math could pass unseen the same way). They are per thread now."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    qmodel = qswap.convert(_ParallelBranches(), "w8a8")
    qswap.calibrate(qmodel, [(x,)])
    for _ in range(8):
        report = qswap.audit(qmodel, (x,))
        assert report.honest, [(v.module, v.op, v.kind) for v in report.violations]
