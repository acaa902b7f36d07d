"""``qswap.audit(model, inputs)``: run the inference paths under the tracker, return a report."""
from __future__ import annotations

import contextlib
import copy
import gc
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qswap.honesty.ops import FAMILIES
from qswap.honesty.paths import check_inputs, run_paths
from qswap.recipe.schema import float_ok_problem
from qswap.honesty.report import TOTAL_KEYS, HonestyReport
from qswap.honesty.threads import watch_threads
from qswap.honesty.tracker import Tracker
from qswap.honesty.values import MAX_CHECKED_BITS
from qswap.errors import AuditError, QswapError, expect_module
from qswap.nn.base import QuantModule
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.lazy_state import load_state_back, ordinary_tensors

if TYPE_CHECKING:
    from qswap.honesty.integer import IntegerAuditReport

# what a model raises on inputs it cannot run on: fairseq checks its inputs with ``assert``
# (MultiheadAttention's shapes, the decoder's incremental state)
_MODEL_ERRORS = (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError,
                 ArithmeticError)


def audit(model: nn.Module, inputs: Any, *, float_ok: dict[str, str] | None = None,
          decode_steps: int = 3, values: bool = False, integer: bool = False
          ) -> "HonestyReport | IntegerAuditReport":
    """Check that every op on the executed inference path ran on quantized values.

    ``inputs`` is a fairseq ``net_input`` dict (encoder-decoder models also get incremental
    decoding of ``decode_steps`` steps audited, at least 1; CTC models their output normalization), a tuple
    of arguments, or a tensor. ``float_ok`` adds declared exceptions to the recipe's own.
    ``values=True`` also runs the value-level check (``qswap.honesty.values``): every float
    operand of a compute op must lie on a uniform grid of at most 2^bits levels; where it and
    the tags disagree, the report says so (``value_disagreements``, ``values_verdict``).
    The model runs in eval mode under ``torch.no_grad``; its modes and any still-observing
    quantizer's state are restored afterwards.

    ``integer=True`` is the integer audit level instead (``qswap.honesty.integer.audit_integer``):
    the model is integerized and every path proven to compute on integer dtypes outside its
    declared float steps; it returns an ``IntegerAuditReport`` (``float_ok`` and ``values`` do not
    apply to it).

    >>> report = qswap.audit(qmodel, net_input)
    >>> report.honest, [(v.module, v.op) for v in report.violations][:3]
    """
    with torch.inference_mode(False):  # a caller's inference mode: its tensors carry no version counter
        inputs = _normal(inputs)
        if not isinstance(decode_steps, int) or isinstance(decode_steps, bool) or decode_steps < 1:
            raise AuditError(f"decode_steps is a number of incremental decoding steps (an int, 1 or more: an "
                             f"encoder-decoder's incremental decoding is always audited, as the CLI's "
                             f"--decode-steps), got {decode_steps!r}")
        expect_module(model, "audit()", AuditError)
        check_inputs(inputs, model)
        if integer:
            if float_ok or values:
                raise AuditError("float_ok and values apply to the honesty audit, not to integer=True")
            from qswap.honesty.integer import audit_integer
            try:
                return audit_integer(model, inputs, decode_steps=decode_steps)
            except QswapError:
                raise
            except _MODEL_ERRORS as exc:  # as the honesty audit's run (``_run``): the inputs do not fit the model
                raise AuditError(f"the integer model failed with these inputs: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        problem = None if float_ok is None else float_ok_problem(float_ok)
        if problem is not None:
            key, message = problem
            raise AuditError(f"float_ok{'' if key is None else f' entry {key!r}'}: {message}")
        declared = {**getattr(getattr(model, "qswap_report", None), "float_ok", {}), **(float_ok or {})}
        with _collector_paused():  # the tracker and its tags die inside, before a collection sees them
            return _audited(model, inputs, Tracker(declared, _values_bits(model) if values else None),
                            decode_steps)


def _normal(inputs: Any) -> Any:
    """``inputs`` with each inference tensor (made under ``torch.inference_mode``) copied into a
    normal one: the audit tracks every tensor's version counter, which inference tensors lack."""
    if isinstance(inputs, torch.Tensor):
        return inputs.clone() if inputs.is_inference() else inputs
    if isinstance(inputs, dict):
        return {k: _normal(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)) and not hasattr(inputs, "_fields"):
        return type(inputs)(_normal(v) for v in inputs)
    return inputs


def _audited(model: nn.Module, inputs: Any, tracker: Tracker, decode_steps: int) -> HonestyReport:
    named = list(model.named_modules())  # one walk for the set-up (checks after the run walk again)
    restore, observing = _prepare(model, [m for _, m in named])
    try:
        tracker.attach(model, named)
        tracker.tag_inputs(inputs)
        with torch.no_grad(), tracker, watch_threads(tracker):
            kind = _run(model, inputs, tracker, decode_steps)
    except BaseException:
        ordinary_tensors(model)  # a model that entered torch.inference_mode left its grids as inference tensors
        raise
    finally:
        tracker.detach()
        restore(tracker.ran_quantizers, tracker.hooked)
    named = list(model.named_modules())  # the run may have changed the tree (checks walk it again)
    _check_executed(named, tracker)
    _check_dynamic(model, named, tracker, {id(q) for q in observing})
    return _report(model, tracker, kind, [m for _, m in named])


def _run(model: nn.Module, inputs: Any, tracker: Tracker, decode_steps: int) -> str:
    try:
        return run_paths(model, inputs, tracker, decode_steps)
    except QswapError:
        raise
    except _MODEL_ERRORS as exc:
        where = tracker.findings.paths[-1].name if tracker.findings.paths else "setup"
        hint = ("; the model runs part of its forward under torch.inference_mode, whose tensors carry no "
                "version counter, which the audit reads for every tensor: audit it with that mode off "
                "(torch.no_grad keeps the counters)") if "Inference tensors" in str(exc) else ""
        raise AuditError(f"the model failed on the '{where}' path with these inputs: "
                         f"{type(exc).__name__}: {exc}{hint}") from exc


class _CollectorPause:
    """Python's cyclic garbage collector off while at least one audit runs (set-up, run, checks
    and report), and back as the first of them found it when the last one ends. The audit keeps a
    tag per parameter and per tensor the run makes, alive until it returns: thousands of objects
    that would survive the young collections and so trigger, every few audits, a full one, which
    walks every object of the process (a fairseq model's thousands of modules too) and can cost a
    large share of an audit. Paused for the whole audit, they are freed (by reference counting)
    before any collection sees them. Garbage in reference cycles the audit makes waits for the
    first collection after it.

    The collector's switch is one per process, so the pause counts the audits running (in any
    thread, nested or overlapping) under a lock: the collector resumes only when the last one
    ends, not when the first one that paused it does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._running == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and self._was_enabled:
                    gc.enable()


_collector_paused = _CollectorPause()  # the process's one collector switch, counted


def _prepare(model: nn.Module, modules: list[nn.Module]):
    """Eval mode, and a snapshot of quantizers that would observe (and so change) on the run."""
    training = [m for m in modules if m.training]  # eval() and restore touch only these
    observing = [q for q in modules if isinstance(q, FakeQuantize) and q.kind == "activation"
                 and q.enabled and not bool(q.frozen)]
    saved = [(q, {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                  for k, v in q.state_dict().items()}) for q in observing]
    if training:
        model.eval()

    def restore(ran: set[int], hooked: dict[int, tuple]) -> None:
        """``ran``: id() of every hooked quantizer that ran (only those, and quantizers the audit
        did not hook, can have observed)."""
        for q, state in saved:
            if id(q) in ran or id(q) not in hooked:
                load_state_back(q, state)
        for m in training:
            m.training = True

    return restore, observing


def _check_executed(named: list, tracker: Tracker) -> None:
    """Every swapped module must have run; report the outermost ones that did not."""
    reported: list[str] = []
    for path, module in named:
        if not isinstance(module, QuantModule) or tracker.call_counts[id(module)]:
            continue
        if any(path.startswith(p + ".") for p in reported) or "" in reported:
            continue
        reported.append(path)
        tracker.findings.not_executed(path, module)


def _values_bits(model: nn.Module) -> int:
    """The value check's bound for operands no quantizer claims: the widest checked width."""
    return max((q.spec.bits for q in model.modules() if isinstance(q, FakeQuantize)
                and q.spec.bits <= MAX_CHECKED_BITS), default=8)


def _check_dynamic(model: nn.Module, named: list, tracker: Tracker, observing: set[int]) -> None:
    """An activation quantizer that was still observing when it ran computed its range from
    that very input: dynamic quantization, a finding unless the recipe declares it."""
    recipe = getattr(model, "qswap_recipe", None)
    declared = ("the recipe declares dynamic activation quantization (dynamic_activations: true)"
                if getattr(recipe, "dynamic_activations", False) else None)
    for path, q in named:
        if id(q) in observing and id(q) in tracker.ran_quantizers:
            tracker.findings.dynamic_range(path, q, declared)


def _report(model: nn.Module, tracker: Tracker, kind: str, modules: list[nn.Module]) -> HonestyReport:
    f = tracker.findings
    violations = list(f.violations.values())
    recipe = getattr(model, "qswap_recipe", None)
    report = HonestyReport(
        model=type(model).__name__, recipe=getattr(recipe, "name", None),
        paths=[p.name for p in f.paths], coverage=f.paths,
        totals={k: f.totals.get(k, 0) for k in TOTAL_KEYS},
        bits_histogram=dict(sorted(f.bits.items())),
        violations=[v for v in violations if v.declared is None],
        declared=[v for v in violations if v.declared is not None], dynamic=f.dynamic,
        values_verdict=None if tracker.values_bits is None else ("dishonest" if f.values_off else "honest"),
        value_disagreements=f.disagreements,
        kernel_internal=sorted(f.kernel_internal.values(), key=lambda r: -r.count),
        constant_fold=sorted(f.constant_fold.values(), key=lambda r: -r.count),
        integer_gemm=sorted(f.integer_gemm.values(), key=lambda r: -r.count),
        float_ok=dict(f.float_ok.entries), notes=_notes(modules, f, kind))
    return report


def _notes(modules: list[nn.Module], f, kind: str) -> list[str]:
    notes = [f"model kind: {kind}; paths audited: {', '.join(p.name for p in f.paths)}"]
    if not any(isinstance(m, FakeQuantize) for m in modules):
        notes.append("the model has no qswap quantizers: every compute op runs on float values")
    notes += [f"float_ok key {k!r} matched no finding" + (f" (an op family is keyed 'family:{k}')"
                                                           if k in FAMILIES else "") for k in f.float_ok.unused()]
    return notes
