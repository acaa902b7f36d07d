"""What the audit keeps and how it is hooked never hides a change: a kept weight output is read
again by every audit (even one written through ``.data``); a forward hook of the user's on a
quantizer runs watched; observing quantizers the run never reached keep their state; a second
audit reports what the first did."""
import pytest
import torch
from torch import nn

import qswap
from qswap.honesty.kinds import OFF_GRID
from qswap.quant.fake_quantize import FakeQuantize


def _calibrated(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "w8a8")
    x = torch.randn(6, 8)
    qswap.calibrate(qmodel, [(x,)])
    return qmodel.eval(), x


@pytest.mark.parametrize("through_data", [False, True], ids=["in_place", "through_data"])
def test_a_kept_weight_output_written_after_an_audit_is_caught_by_the_next(through_data):
    """Each audit reads every kept weight output again: a write through ``.data`` bumps no
    version counter, so no proof from an earlier audit may stand in for the values."""
    qmodel, x = _calibrated()
    assert qswap.audit(qmodel, (x,)).honest
    wq = qmodel[0].weight_quant
    with torch.no_grad():
        kept = wq(qmodel[0].weight)
        target = kept.data if through_data else kept
        target[0, :3] += wq.scale * 0.3  # the kept output, off its grid
        assert wq(qmodel[0].weight) is kept  # the model itself still uses it
    report = qswap.audit(qmodel, (x,))
    assert not report.honest
    assert any(v.kind == OFF_GRID and v.module == "0.weight_quant" for v in report.violations)


def test_a_users_forward_hook_on_a_quantizer_runs_watched():
    """The audit's hooks are global module hooks: they run before a module's own forward hooks,
    so float compute a hook of the user's adds to a quantizer's output runs as ops the audit
    classifies (not inside the quantizer, where dispatch is off), and its result reaches the
    matmul unrequantized."""
    qmodel, x = _calibrated()
    handle = qmodel[2].input_quant.register_forward_hook(lambda m, args, out: out + torch.exp(out))
    try:
        report = qswap.audit(qmodel, (x,))
    finally:
        handle.remove()
    assert not report.honest  # exp and add inside the counterpart's call: one unrequantized kernel
    # and the hooked quantizer is not trusted (a pre-hook would run unwatched inside it)
    assert sorted((v.module, v.op) for v in report.violations) == [("2", "aten.addmm"),
                                                                   ("2.input_quant", "<quantizer>")]


@pytest.mark.parametrize("how", ["pre-hook", "instance forward", "class forward"])
def test_a_quantizer_whose_code_is_replaced_or_pre_hooked_is_untrusted(how, monkeypatch):
    """Its ops run with the audit's watching off (it trusts qswap's own quantizer code): a pre-hook,
    or a forward replaced on the instance or on FakeQuantize itself, had computed a softmax of the raw
    accumulator unseen, honest. Such a quantizer is an untrusted_quantizer now."""
    from qswap.quant.fake_quantize import FakeQuantize as FQ

    qmodel, x = _calibrated()
    quant = qmodel[2].input_quant
    if how == "pre-hook":
        quant.register_forward_pre_hook(lambda m, args: (torch.softmax(args[0], -1),))
    elif how == "instance forward":
        original = quant.forward
        quant.forward = lambda t: original(torch.softmax(t, -1))
    else:
        original = FQ.forward
        monkeypatch.setattr(FQ, "forward", lambda self, t, *a, **k: original(self, torch.softmax(t, -1), *a, **k))
    report = qswap.audit(qmodel, (x,))
    assert not report.honest
    untrusted = {v.module for v in report.violations if v.kind == "untrusted_quantizer"}
    assert "2.input_quant" in untrusted and all("replaced, or a hook" in v.operand for v in report.violations
                                                  if v.kind == "untrusted_quantizer")


def test_quantizers_the_run_never_reached_are_left_as_they_were():
    """Only quantizers that ran are restored (an observing one the paths never reach, like an
    attention core's score quantizers without an additive mask, is never written)."""
    qmodel, x = _calibrated()
    unused = FakeQuantize(qmodel[0].input_quant.spec)
    qmodel[1].add_module("unused_quant", unused)  # a child no forward calls
    before = {k: v.clone() for k, v in unused.state_dict().items()}
    assert qswap.audit(qmodel, (x,)).honest
    after = unused.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not unused.initialized


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel"])
def test_a_second_audit_gives_the_first_ones_report(recipe):
    torch.manual_seed(1)
    qmodel = qswap.convert(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), recipe)
    x = torch.randn(6, 8)
    qswap.calibrate(qmodel, [(x,)])
    first, second = qswap.audit(qmodel, (x,)), qswap.audit(qmodel, (x,))
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_audit_leaves_the_garbage_collector_as_it_found_it(enabled):
    """The collector is paused for the run only (``_collector_paused``), also when the run fails."""
    import gc

    qmodel, x = _calibrated()
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        assert qswap.audit(qmodel, (x,)).honest
        assert gc.isenabled() == enabled
        with pytest.raises(qswap.errors.AuditError):
            qswap.audit(qmodel, (torch.randn(6, 3),))  # the wrong width: the run fails
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_overlapping_audits_in_two_threads_keep_the_collector_paused_until_the_last_ends():
    """Audit A pauses the collector, audit B (another thread) starts, A ends: the collector
    stays off until B ends, and then is back on as A found it."""
    import gc
    import threading

    from qswap.honesty.api import _collector_paused

    was = gc.isenabled()
    b_inside, a_done, seen = threading.Event(), threading.Event(), {}

    def audit_b():
        with _collector_paused():
            b_inside.set()
            a_done.wait(10)
            seen["after A ended, inside B"] = gc.isenabled()

    try:
        gc.enable()
        worker = threading.Thread(target=audit_b)
        with _collector_paused():
            worker.start()
            assert b_inside.wait(10)
        a_done.set()
        worker.join(10)
        assert seen == {"after A ended, inside B": False}
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
