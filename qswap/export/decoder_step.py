"""The decoder of a calibrated qswap S2T transformer (or conformer: the same decoder) as two ONNX
QDQ graphs: the encoder-decoder attention's keys and values (computed once per utterance) and
one decoding step.

``cross_kv.onnx``: ``encoder_out`` (S, B, E) -> per decoder layer i ``cross_key_i`` / ``cross_value_i`` (B, H, S, D), the projections fairseq's
incremental decoder caches at its first step (``static_kv``).

``decoder_step.onnx``: ``tokens`` (B, t) int64 (every token so far; the step reads the last one
and its position t), ``encoder_padding_mask`` (B, S), per layer ``past_key_i`` / ``past_value_i``
(B, H, t-1, D) (empty at the first step) and ``cross_key_i`` / ``cross_value_i``. Outputs:
``logits`` (B, 1, V) on the model's logits grid and ``key_i`` / ``value_i`` (B, H, t, D), the
self-attention caches of the next step. A cache holds the quantized projections where qswap's
attention keeps a quantized cache (frozen per-tensor k/v grids), float projections otherwise:
the graph reads it as the fake-quant model does.

>>> export_cross_kv(qmodel, "cross_kv.onnx", encoder_out, encoder_padding_mask)
>>> export_decoder_step(qmodel, "decoder_step.onnx", encoder_out, encoder_padding_mask)
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from qswap.errors import ExportError
from qswap.export.onnx import OPSET, check_calibrated, trace_to_onnx

STEP_INPUTS = ("tokens", "encoder_padding_mask")


def _cache(attn: nn.Module, key: torch.Tensor, value: torch.Tensor, padding) -> dict:
    """A restored fairseq attention cache, marked quantized where the attention quantizes its own."""
    state = {"prev_key": key, "prev_value": value, "prev_key_padding_mask": padding}
    fresh: dict = {}
    if attn._quantized_cache(fresh):  # a new cache of this attention would be quantized: mark it
        state.update(fresh)
    return state


class CrossKVGraph(nn.Module):
    """Every decoder layer's encoder-decoder keys and values of ``encoder_out``: what fairseq's
    incremental decoder computes and caches at the first step (one query row runs through each
    attention to fill the cache; the export drops it, nothing reads it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.attentions = [layer.encoder_attn for layer in model.decoder.layers]
        self.layers = nn.ModuleList(self.attentions)

    def forward(self, encoder_out):
        query = encoder_out[:1]  # (1, B, E): any query fills the static cache the same way
        out = []
        for attn in self.attentions:  # the keys and values do not depend on the padding mask
            state: dict = {}
            attn(query, encoder_out, encoder_out, incremental_state=state, static_kv=True,
                 need_weights=False)
            saved = attn._get_input_buffer(state)
            out += [saved["prev_key"], saved["prev_value"]]  # (B, H, S, D)
        return tuple(out)


class DecoderStepGraph(nn.Module):
    """fairseq's incremental decoding step (``decoder(tokens, encoder_out, incremental_state)``)
    with the incremental state built from, and returned as, tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder
        self.logits_quant = model.logits_quant
        self.embed_dim = model.decoder.embed_dim
        self.self_attns = [layer.self_attn for layer in self.decoder.layers]
        self.cross_attns = [layer.encoder_attn for layer in self.decoder.layers]

    def forward(self, tokens, encoder_padding_mask, *caches):
        layers = len(self.self_attns)
        past, cross = caches[:2 * layers], caches[2 * layers:]
        state: dict = {}
        for i, (attn, cross_attn) in enumerate(zip(self.self_attns, self.cross_attns)):
            attn._set_input_buffer(state, _cache(attn, past[2 * i], past[2 * i + 1], None))
            cross_attn._set_input_buffer(state, _cache(cross_attn, cross[2 * i], cross[2 * i + 1],
                                                       encoder_padding_mask))
        # the encoder-decoder attentions read their cached keys and values (static_kv), never
        # encoder_out: a placeholder of its shape stands in for it
        placeholder = torch.zeros(encoder_padding_mask.shape[1], tokens.shape[0], self.embed_dim)
        encoder = {"encoder_out": [placeholder], "encoder_padding_mask": [encoder_padding_mask]}
        logits, _ = self.decoder(tokens, encoder_out=encoder, incremental_state=state)
        out = []
        for attn in self.self_attns:
            saved = attn._get_input_buffer(state)
            out += [saved["prev_key"], saved["prev_value"]]  # (B, H, t, D)
        return (self.logits_quant(logits), *out)


def names(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The step graph's input and output names for a decoder of ``layers`` layers."""
    past = tuple(f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value"))
    new = tuple(f"{kind}_{i}" for i in range(layers) for kind in ("key", "value"))
    return STEP_INPUTS + past + cross_names(layers), ("logits",) + new


def cross_names(layers: int) -> tuple[str, ...]:
    """The cross-attention graph's outputs (and the step graph's last inputs)."""
    return tuple(f"cross_{kind}_{i}" for i in range(layers) for kind in ("key", "value"))


def empty_cache(qmodel: nn.Module, batch: int, length: int = 0) -> list[torch.Tensor]:
    """Zero self-attention caches (B, H, length, D) for every decoder layer, keys then values."""
    caches = []
    for layer in qmodel.decoder.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_heads, length, attn.head_dim)
        caches += [torch.zeros(shape), torch.zeros(shape)]
    return caches


def _check_decoder(qmodel: nn.Module, allow_float: bool) -> None:
    if not allow_float:
        check_calibrated(qmodel)
    if not hasattr(qmodel, "logits_quant"):
        raise ExportError(f"exporting the decoder of a {type(qmodel).__name__} is not supported yet; "
                          f"the step graph covers qswap's S2T transformer and conformer models")


def export_cross_kv(qmodel: nn.Module, path: "str | os.PathLike[str]", encoder_out: torch.Tensor,
                    opset: int = OPSET, *, allow_float: bool = False) -> Path:
    """Write the encoder-decoder keys and values of every decoder layer of ``qmodel`` to ``path``
    (``encoder_out`` (S, B, E) is the traced example; batch and source length are dynamic)."""
    _check_decoder(qmodel, allow_float)
    outputs = cross_names(len(qmodel.decoder.layers))
    axes = {"encoder_out": {0: "src", 1: "batch"}}
    axes.update({n: {0: "batch", 2: "src"} for n in outputs})
    return trace_to_onnx(CrossKVGraph(copy.deepcopy(qmodel).eval()), (encoder_out,), path,
                         ("encoder_out",), outputs, axes, opset)


def export_decoder_step(qmodel: nn.Module, path: "str | os.PathLike[str]", encoder_out: torch.Tensor,
                        encoder_padding_mask: torch.Tensor, opset: int = OPSET, *,
                        allow_float: bool = False) -> Path:
    """Write one incremental decoding step of ``qmodel`` (a calibrated qswap S2T transformer or
    conformer) to ``path``. ``encoder_out`` (S, B, E) and ``encoder_padding_mask`` (B, S) are an example the
    trace runs on (with a two-token prefix); batch, source and cache lengths are dynamic.
    ``allow_float``: a conversion with identity quantizers (recipe fp32) exports too."""
    _check_decoder(qmodel, allow_float)
    model = copy.deepcopy(qmodel).eval()
    batch = encoder_out.shape[1]
    with torch.no_grad():
        cross = CrossKVGraph(model)(encoder_out)
        tokens = torch.full((batch, 2), model.decoder.dictionary.eos(), dtype=torch.long)
        # the caches after one step: the example traced is the second step
        first = DecoderStepGraph(model)(tokens[:, :1], encoder_padding_mask, *empty_cache(model, batch), *cross)
    inputs, outputs = names(len(model.decoder.layers))
    layers = len(model.decoder.layers)
    axes = {"tokens": {0: "batch", 1: "steps"}, "encoder_padding_mask": {0: "batch", 1: "src"},
            "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[2:2 + 2 * layers]})
    axes.update({n: {0: "batch", 2: "src"} for n in inputs[2 + 2 * layers:]})
    axes.update({n: {0: "batch", 2: "steps"} for n in outputs[1:]})
    graph = DecoderStepGraph(copy.deepcopy(qmodel).eval())
    return trace_to_onnx(graph, (tokens, encoder_padding_mask, *first[1:], *cross), path,
                         inputs, outputs, axes, opset)
