"""Post-training calibration: run observers over batches, then freeze every quantizer."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from qswap.errors import CalibrationError, DataError, QswapError, SpecError, expect_module
from qswap.honesty.paths import SEQ2SEQ, model_kind, run_paths
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.lazy_state import load_state_back, ordinary_tensors
from qswap.recipe.schema import OBSERVE  # what a recipe's observe key may say; the first is the default

logger = logging.getLogger("qswap")


def activation_quantizers(model: nn.Module) -> list[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize) and m.kind == "activation"]




def calibrate(model: nn.Module, batches: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None,
              progress: Callable[[int], None] | None = None, max_batches: int | None = None,
              observe: str | None = None, quantizers: Iterable[FakeQuantize] | None = None) -> int:
    """Reset and run every activation observer over ``batches``, then freeze all quantizers.

    A batch is a fairseq ``net_input`` dict (called as ``model(**batch)``), a tuple (``model(*batch)``)
    or a tensor; ``forward(model, batch)`` overrides how a batch is run. Returns the number of
    batches used. Runs in eval mode under ``torch.no_grad`` and restores each module's training
    flag. An error leaves every activation quantizer as it was. A quantizer the batches never
    reach keeps the grid (and frozen flag) of an earlier calibration, if it had one, and is named
    in the log; an error where none of them sees data, as on a fresh model.

    ``observe`` says what each activation quantizer observes (None: the recipe's top-level
    ``observe`` key, whose default is ``"quantized"``):

    * ``"quantized"`` (the default, what every shipped recipe's numbers use): the quantized model's
      own activations. Each quantizer fake-quantizes on the grid of what it has seen so far, so a
      site observes values computed from quantized inputs, as at inference.
    * ``"float"``: the activations of the model with its activation sites in float (weights stay
      quantized; biases, aligned to their input's grid, stay float meanwhile), as torch.ao's
      observers and Brevitas's calibration mode see them. Each
      quantizer passes its input through unquantized (``FakeQuantize.passthrough``) and takes
      its grid from the observed range at the end. Faster (no rounding while observing:
      docs/benchmarks.md), and the grids can differ slightly, since no site sees its inputs'
      rounding.

    ``quantizers``: calibrate only these activation quantizers of ``model`` (the fresh sites of
    ``qswap.regrid``); every other quantizer keeps its grid, learned scale and frozen flag (one
    still observing computes its range from each batch while they observe, and its state is put
    back after).

    >>> qswap.calibrate(qmodel, (s["net_input"] for s in itertools.islice(loader, 16)))
    """
    expect_module(model, "calibrate()", CalibrationError)
    if torch.is_inference_mode_enabled():  # its ranges would be inference tensors no later update may write
        raise CalibrationError("qswap.calibrate was called under torch.inference_mode: call it outside that "
                               "mode (it runs under torch.no_grad itself)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise CalibrationError(f"calibrate()'s max_batches is a whole number of batches, 1 or more (None: every "
                               f"batch), got {max_batches!r}")
    for name, fn in (("forward", forward), ("progress", progress)):
        if fn is not None and not callable(fn):
            raise CalibrationError(f"calibrate()'s {name} is a function (or None), got {type(fn).__name__}")
    if observe is None:
        observe = recipe_observe(model)
    check_observe(observe)
    check_batches(batches)
    if not any(isinstance(m, FakeQuantize) for m in model.modules()):
        raise CalibrationError("the model has no qswap quantizers to calibrate; convert it first "
                               "(qswap.convert(model, recipe)) with a recipe that quantizes something")
    partial = quantizers is not None
    quantizers = _chosen(model, quantizers)  # weight quantizers follow their weights
    run = forward or _default_forward
    saved = [(q, {k: v.clone() for k, v in q.state_dict().items()}) for q in quantizers]
    # with quantizers=, the others still observing (uncalibrated) would move with these batches: put back after
    chosen = {id(q) for q in quantizers}
    others = [(q, {k: v.clone() for k, v in q.state_dict().items()}) for q in activation_quantizers(model)
              if id(q) not in chosen and not bool(q.frozen)]
    try:
        for q in quantizers:
            q.unfreeze()
            q.observer.reset()
        count = 0
        with eval_mode(model), torch.no_grad(), observing(quantizers, observe):
            # no batch is drawn past the last one used (the caller's iterator keeps it)
            for batch in (batches if max_batches is None or max_batches > 0 else ()):
                if partial:
                    _check_finite(batch, count)
                _run_batch(run, model, batch, count)
                count += 1
                if progress is not None:
                    progress(count)
                if max_batches is not None and count >= max_batches:
                    break
        if count == 0:
            raise CalibrationError("calibration got zero batches; pass at least one batch of "
                                   "representative inputs")
        _freeze_observed(quantizers)
        # unseen: no range observed in this calibration (a grid of an earlier one does not count)
        unseen = [q for q in quantizers if not q.observer.has_range]
        if unseen and len(unseen) == len(quantizers):
            raise CalibrationError(f"none of the {len(quantizers)} activation quantizers saw data: the "
                                   f"{count} batch(es) were empty; pass batches with real inputs")
    except BaseException:
        # a failed calibration leaves every activation quantizer as it found it (its grid, frozen
        # flag and observed range): not observing afresh at inference, with ranges of a part-run
        ordinary_tensors(model)
        for q, state in saved + others:
            load_state_back(q, state)
        raise
    for q, state in others:
        q.load_state_dict(state)
    # an unseen quantizer calibrated before keeps that grid, frozen as it was (reset and
    # unfrozen, it would observe at inference and drift)
    unseen_ids, kept = {id(q) for q in unseen}, []
    for q, state in saved:
        if id(q) in unseen_ids and state["scale"].numel() > 0:
            q.load_state_dict(state)
            kept.append(q)
    if unseen and logger.isEnabledFor(logging.INFO):
        # sites the batches never reach (an additive-mask path, say) keep observing if they ever run
        logger.info(f"{len(unseen)} activation quantizer(s) saw no data during calibration (the "
                    f"calibrated paths never run them; an input that reached one would make it "
                    f"compute its range at run time, which the audit reports"
                    + (f"; {len(kept)} of them keep the grid of their previous calibration" if kept else "")
                    + f"): {', '.join(_names(model, unseen)[:6])}")
    _warn_clipped_negatives(model, quantizers)
    return count


def _warn_clipped_negatives(model: nn.Module, quantizers: list[FakeQuantize]) -> None:
    """A QswapWarning naming the activation quantizers on an unsigned symmetric grid (zero point 0:
    values >= 0 only) whose calibration saw negative values, which they round to 0 (a recipe's
    ``signed: false, symmetric: true`` meant for a ReLU's output, set where the values are not
    all >= 0)."""
    clipped = [q for q in quantizers if q.spec.symmetric and not q.spec.signed and q.observer.has_range
               and bool((q.observer.min_val < 0).any())]
    if clipped:
        import warnings

        from qswap.errors import QswapWarning
        names = _names(model, clipped)
        warnings.warn(f"{len(clipped)} activation quantizer(s) on unsigned symmetric grids (values >= 0 only) saw "
                      f"negative values in calibration, which they round to 0: {', '.join(names[:6])}"
                      f"{' ...' if len(names) > 6 else ''}; use signed: true, or symmetric: false (an affine grid), "
                      f"for these sites in the recipe", QswapWarning, stacklevel=3)


def _chosen(model: nn.Module, only: Iterable[FakeQuantize] | None) -> list[FakeQuantize]:
    """The activation quantizers to calibrate: all of ``model``'s, or ``only`` (each checked to be
    one of them: a CalibrationError names what to pass)."""
    every = activation_quantizers(model)
    if only is None:
        return every
    if isinstance(only, (FakeQuantize, str)) or not isinstance(only, Iterable):
        raise CalibrationError(f"quantizers= takes a list of the model's activation quantizers (FakeQuantize "
                               f"modules), got {type(only).__name__}")
    ids, chosen = {id(q) for q in every}, list(only)
    for q in chosen:
        if id(q) not in ids:
            what = (f"a {q.kind} quantizer" if isinstance(q, FakeQuantize) else type(q).__name__)
            raise CalibrationError(f"quantizers= holds {what} that is not one of the model's activation "
                                   f"quantizers; pass modules of this model (Regridded.fresh_activations())")
    if not chosen:
        raise CalibrationError("quantizers= is empty: nothing to calibrate; pass None to calibrate them all")
    return chosen


def check_batches(batches: Any, who: str = "calibrate") -> None:
    """A CalibrationError unless ``batches`` is an iterable of batches: a number had been a raw
    TypeError from the loop, and one net_input dict, iterated, hands the model its key names.
    ``who``: the function that takes them (calibrate, sensitivity, search)."""
    import collections.abc

    if isinstance(batches, collections.abc.Mapping) or not isinstance(batches, collections.abc.Iterable):
        raise CalibrationError(f"{who} takes an iterable of batches (a list, a generator, a DataLoader), got "
                               f"{'one dict' if isinstance(batches, collections.abc.Mapping) else type(batches).__name__}; "
                               f"pass [batch] for a single batch")


def recipe_observe(model: nn.Module) -> str:
    """What the model's recipe says calibration observes (its ``observe`` key; ``"quantized"``
    for a model without a recipe)."""
    return getattr(getattr(model, "qswap_recipe", None), "observe", OBSERVE[0])


def observed_note(observe: str) -> str:
    """What a calibration message adds for ``observe``: nothing for the default."""
    return " (observing float activation sites)" if observe == "float" else ""


def check_observe(observe: str) -> None:
    if observe not in OBSERVE:
        raise CalibrationError(f"observe must be one of {', '.join(OBSERVE)}, got {observe!r}")


@contextlib.contextmanager
def observing(quantizers: list[FakeQuantize], observe: str) -> Iterator[None]:
    """Calibration forwards inside this block observe what ``observe`` says (``calibrate``). For
    ``"float"``, each enabled activation quantizer passes its input through unquantized while
    observing it (``enabled`` False, ``passthrough`` True: its site computes in float), and
    takes its grid from the observed range when the block ends (however it ends); a site a
    sensitivity probe keeps in float (``enabled`` already False) and a frozen quantizer stay out,
    as they are out of a quantized calibration. ``"quantized"`` changes nothing: each quantizer
    observes and rounds as it goes."""
    check_observe(observe)
    passing = [q for q in quantizers if q.enabled and not bool(q.frozen)] if observe == "float" else []
    for q in passing:
        q.enabled, q.passthrough = False, True
    try:
        yield
    finally:
        for q in passing:
            q.enabled, q.passthrough = True, False
            q.grid_from_observer()  # also after a failed batch: grid and range in step, as when quantized


def _check_finite(batch: Any, index: int) -> None:
    """With ``quantizers=``, the chosen sites may sit behind frozen grids, which round NaN and inf
    to finite codes: their inputs, checked here, are where such a batch shows (a full calibration's
    first quantizer observes them and says the same)."""
    tensors = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else (batch,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            from qswap.quant.observers import NONFINITE_INPUT

            raise CalibrationError(f"calibration batch {index}: {NONFINITE_INPUT}")


def _run_batch(run: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any, index: int,
               error: type[QswapError] = CalibrationError, who: str = "") -> None:
    """Run one batch; a model that cannot take it is the caller's input error (``error``, its
    message after ``who``), said in one line: also a model refusing the batch's data (NaN or inf
    features: ``check_finite_input``'s DataError), named by the batch."""
    try:
        run(model, batch)
    except DataError as exc:
        raise error(f"{who}calibration batch {index}: {exc}") from exc
    except SpecError as exc:  # a quantizer's grid that cannot take the batch: named by its site
        site = _site_of(model, getattr(exc, "quantizer", None))
        if site is None:
            raise
        raise SpecError(f"{who}calibration batch {index}: quantizer {site}: {exc}") from exc
    except QswapError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        advice = ("the model runs part of its forward under torch.inference_mode, whose tensors no observer "
                  "may keep: run it under torch.no_grad instead" if "inference tensor" in reason.lower() else
                  "check that the batches are what the model takes")
        raise error(f"{who}calibration batch {index}: the model raised {type(exc).__name__}: "
                    f"{reason}; {advice}") from exc


def _site_of(model: nn.Module, quantizer: nn.Module | None) -> str | None:
    """The qualified name of ``quantizer`` in ``model`` (None: not one of its modules)."""
    if quantizer is None:
        return None
    return next((name for name, module in model.named_modules() if module is quantizer), None)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)``; a seq2seq net_input also runs the incremental decoding path, as
    inference does (``qswap.honesty.paths.run_paths``), so its quantizers are calibrated too."""
    if isinstance(batch, dict):
        if model_kind(model, batch) == SEQ2SEQ:
            return run_paths(model, batch)
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise CalibrationError(f"a calibration batch is a net_input dict, a tuple or a tensor, got "
                           f"{type(batch).__name__}; pass forward=... to run other batch types")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; after it each module's own training flag as it was
    (a model training with some module kept in eval, a frozen feature extractor, keeps it so), set
    after ``model.train(True)``: entering training drops kept forms (``QuantModule.train``). A
    model all in eval is left alone."""
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)
        keep = {id(m) for m in training}
        for m in model.modules():
            m.training = id(m) in keep


def run_observed(model: nn.Module, batches: Iterable[Any], handles: list,
                 error: type[QswapError] = CalibrationError, who: str = "") -> None:
    """Run ``batches`` as calibration runs them (eval mode, no grad), then remove ``handles``
    (the hooks that observed the run) and restore each module's training flag. A batch the model
    cannot take raises ``error`` (its message after ``who``: the step that ran the batches)."""
    try:
        with eval_mode(model), torch.no_grad():
            for index, batch in enumerate(batches):
                _run_batch(_default_forward, model, batch, index, error, who)
    finally:
        for h in handles:
            h.remove()


def freeze_observed(model: nn.Module) -> int:
    """Freeze every activation quantizer that has observed data; returns how many.

    Under torch.distributed, observer ranges are first reduced across workers (min of minima,
    max of maxima), so every DDP worker freezes the same grid.
    """
    return _freeze_observed(activation_quantizers(model))


def _freeze_observed(quantizers: list[FakeQuantize]) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _reduce_ranges(quantizers)
    count = 0
    for q in quantizers:
        if q.observer.has_range:
            q.freeze()
            count += 1
    return count


def _reduce_ranges(quantizers: list[FakeQuantize]) -> None:
    """Min of minima and max of maxima across workers, quantizer by quantizer, so every worker
    freezes the same grid. Every worker makes the same collective calls whatever its own batches
    showed: a quantizer one worker never saw data for (an empty batch, a path only some
    utterances take) joins with an empty range and gets the others' grid."""
    dist = torch.distributed
    # NCCL reduces CUDA tensors only, gloo CPU ones: ranges travel on the backend's device
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    seen = torch.tensor([q.observer.has_range for q in quantizers], dtype=torch.int32, device=device)
    anyone, everyone = seen.clone(), seen.clone()
    dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
    partial = [q for q, a, e in zip(quantizers, anyone.tolist(), everyone.tolist())
               if a and not e and q.spec.granularity != "per_tensor"]
    if partial:  # raised on every worker alike (no worker is left waiting in a collective)
        raise CalibrationError(
            f"{len(partial)} {partial[0].spec.granularity} activation quantizer(s) saw calibration "
            f"data on some workers only; calibrate with more batches per worker")
    for q, a in zip(quantizers, anyone.tolist()):
        if not a:
            continue
        obs = q.observer
        home = q.scale.device
        if obs.has_range:
            lo, hi = obs.min_val.to(device), obs.max_val.to(device)
        else:  # per-tensor: an empty range joins the others'
            lo, hi = torch.tensor(float("inf"), device=device), torch.tensor(float("-inf"), device=device)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        obs.min_val, obs.max_val = lo.to(home), hi.to(home)
        q.grid_from_observer()  # the grid one calibrating call would set for the joined range


def _names(model: nn.Module, quantizers: list[FakeQuantize]) -> list[str]:
    wanted = {id(q) for q in quantizers}
    return [name for name, m in model.named_modules() if id(m) in wanted]
