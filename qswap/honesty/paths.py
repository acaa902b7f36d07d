"""Which inference paths the audit runs, by kind of model.

==========  ==================================================================================
kind        paths (each is named in the report)
==========  ==================================================================================
seq2seq     a fairseq encoder-decoder with a ``prev_output_tokens`` net_input: the
            teacher-forced batch forward; ``get_normalized_probs`` on its output; incremental
            decoding as fairseq's SequenceGenerator does it (encoder output reused, decoder
            one token at a time with an ``incremental_state``, a beam reorder after the first
            step, the last step's logits divided by the temperature, ``get_normalized_probs``)
ctc         a fairseq model with a net_input dict and ``get_normalized_probs`` (wav2vec2 CTC,
            encoder-only models): the forward, then its output normalization
plain       anything else: ``model(*inputs)`` (a tuple), ``model(**inputs)`` (a dict) or
            ``model(inputs)`` (a tensor)
==========  ==================================================================================
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qswap.errors import AuditError

SEQ2SEQ, CTC, PLAIN = "seq2seq", "ctc", "plain"
# the net_input keys of fairseq's speech models that hold input features (S2T filterbanks, wav2vec
# 2.0 waveforms): finite numbers, where other float inputs (an attention mask) may hold -inf
FEATURE_KEYS = ("src_tokens", "source")
TEMPERATURE = 1.0  # SequenceGenerator's default; it always divides the last step's logits


def model_kind(model: nn.Module, inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        if "prev_output_tokens" in inputs and hasattr(model, "encoder") and hasattr(model, "decoder"):
            return SEQ2SEQ
        if callable(getattr(model, "get_normalized_probs", None)):
            return CTC
    return PLAIN


def check_inputs(inputs: Any, model: nn.Module | None = None) -> None:
    """An AuditError for inputs the audit cannot judge the model on: not a net_input dict, a tuple
    or a tensor; a float input holding NaN, or features (``FEATURE_KEYS``) holding inf (the audit
    would blame the first quantizer it reaches, off its grid; a float mask may hold -inf); a float
    input of another dtype than ``model``'s float parameters (a quantized model runs on float64
    features that its float model refuses, and every op then reads off-grid values)."""
    if isinstance(inputs, Mapping):
        if not all(isinstance(k, str) for k in inputs):
            raise AuditError("a net_input dict must have string keys (argument names)")
        named = list(inputs.items())
    elif isinstance(inputs, (tuple, list)):
        named = [(f"argument {i}", v) for i, v in enumerate(inputs)]
    elif isinstance(inputs, torch.Tensor):
        named = [("input", inputs)]
    else:
        raise AuditError(f"inputs must be a fairseq net_input dict, a tuple of arguments or a "
                         f"tensor; got {type(inputs).__name__}")
    dtype = None if model is None else next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for name, value in named:
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        if not bool(torch.isfinite(value).all()):  # one pass over a finite input (the audit's own cost)
            nan = bool(value.isnan().any())
            if nan or name in FEATURE_KEYS:
                raise AuditError(f"input {name!r} holds {'NaN' if nan else 'inf'} values; audit the model on "
                                 f"finite inputs (check the features)")
        if dtype is not None and value.dtype != dtype:
            raise AuditError(f"input {name!r} is {value.dtype}, the model's parameters are {dtype}; "
                             f"pass inputs of the model's dtype (e.g. x.to({dtype}))")


class _NoTracker:
    """Stands in for the tracker when the paths run unobserved (calibration, benchmarks)."""

    def path(self, name: str, scope: str = ""):
        return contextlib.nullcontext()


def run_paths(model: nn.Module, inputs: Any, tracker=None, decode_steps: int = 3) -> str:
    """Run every path of this kind of model (under ``tracker``, if given); returns the kind.

    >>> qswap.calibrate(qmodel, [net_input], forward=run_paths)  # incremental-only sites too
    """
    tracker = tracker if tracker is not None else _NoTracker()
    kind = model_kind(model, inputs)
    if kind == SEQ2SEQ:
        _seq2seq(model, inputs, tracker, decode_steps)
    elif kind == CTC:
        with tracker.path("encoder forward"):
            out = model(**inputs)
        with tracker.path("output normalization (get_normalized_probs)"):
            model.get_normalized_probs(out, log_probs=True)
    else:
        with tracker.path("forward"):
            _call(model, inputs)
    return kind


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _seq2seq(model: nn.Module, net_input: Mapping, tracker, steps: int) -> None:
    captured: list = []  # the batch forward's encoder output, reused as the generator would
    hook = model.encoder.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with tracker.path("batch forward (teacher-forced)"):
            out = model(**net_input)
    finally:
        hook.remove()
    with tracker.path("get_normalized_probs (batch)", scope="decoder"):
        model.get_normalized_probs(out, log_probs=True)
    del out
    prev = net_input["prev_output_tokens"]
    steps = max(1, min(steps, prev.size(1)))
    with tracker.path(f"incremental decoding ({steps} step{'s' if steps != 1 else ''})", scope="decoder"):
        encoder_out = captured[0] if len(captured) == 1 else None
        if encoder_out is None:
            encoder_input = {k: v for k, v in net_input.items() if k != "prev_output_tokens"}
            encoder_out = model.encoder(**encoder_input)
        _decode(model, encoder_out, prev, steps)


def _decode(model: nn.Module, encoder_out: Any, prev: torch.Tensor, steps: int) -> None:
    """What fairseq's SequenceGenerator does per step (beam reorders included: before the second
    step, or after the only one where the targets hold one token, so that a reorder is audited)."""
    state: dict = {}
    for t in range(steps):
        if t == 1:
            encoder_out = _reorder(model, state, encoder_out, prev)
        out = model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        last = (out[0][:, -1:, :].div_(TEMPERATURE), out[1] if len(out) > 1 else None)
        model.get_normalized_probs(last, log_probs=True, sample=None)
    if steps == 1:
        _reorder(model, state, encoder_out, prev)


def _reorder(model: nn.Module, state: dict, encoder_out: Any, prev: torch.Tensor) -> Any:
    """A beam reorder (the identity order) of the decoder's incremental state and the encoder output."""
    order = torch.arange(prev.size(0), device=prev.device)
    if hasattr(model.decoder, "reorder_incremental_state_scripting"):
        model.decoder.reorder_incremental_state_scripting(state, order)
    if hasattr(model.encoder, "reorder_encoder_out"):
        encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
    return encoder_out
