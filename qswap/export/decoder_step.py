"""One decoding step of a calibrated qswap S2T transformer decoder as an ONNX QDQ graph, its
self-attention keys and values as inputs and outputs.

Inputs: ``tokens`` (B, t) int64 (every token so far; the step reads the last one and its position
t), ``encoder_out`` (S, B, E), ``encoder_padding_mask`` (B, S) bool, and per decoder layer i
``past_key_i`` / ``past_value_i`` (B, H, t-1, D) (empty, t-1 = 0, at the first step).
Outputs: ``logits`` (B, 1, V) on the model's logits grid, and ``key_i`` / ``value_i``
(B, H, t, D), the caches of the next step. The cached keys and values are the quantized
projections (qswap's quantized cache: frozen per-tensor k/v grids). The encoder-decoder
attention projects ``encoder_out`` again at every step (its keys and values are not cached in
this graph yet).

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

QUANTIZED_CACHE = "qswap_quantized_kv"  # qswap.nn.fairseq.attention's mark of a quantized cache


class DecoderStepGraph(nn.Module):
    """fairseq's incremental decoding step (``decoder(tokens, encoder_out, incremental_state)``)
    with the incremental state built from, and returned as, tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder
        self.logits_quant = model.logits_quant
        self.attentions = [layer.self_attn for layer in self.decoder.layers]

    def forward(self, tokens, encoder_out, encoder_padding_mask, *past):
        state: dict = {}
        for i, attn in enumerate(self.attentions):  # past: (B, H, t-1, D) pairs
            attn._set_input_buffer(state, {"prev_key": past[2 * i], "prev_value": past[2 * i + 1],
                                           "prev_key_padding_mask": None, QUANTIZED_CACHE: None})
        encoder = {"encoder_out": [encoder_out], "encoder_padding_mask": [encoder_padding_mask]}
        logits, _ = self.decoder(tokens, encoder_out=encoder, incremental_state=state)
        caches = []
        for attn in self.attentions:
            saved = attn._get_input_buffer(state)
            caches += [saved["prev_key"], saved["prev_value"]]  # (B, H, t, D)
        return (self.logits_quant(logits), *caches)


def names(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The step graph's input and output names for a decoder of ``layers`` layers."""
    past = tuple(f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value"))
    new = tuple(f"{kind}_{i}" for i in range(layers) for kind in ("key", "value"))
    return ("tokens", "encoder_out", "encoder_padding_mask") + past, ("logits",) + new


def empty_cache(qmodel: nn.Module, batch: int, length: int = 0) -> list[torch.Tensor]:
    """Zero self-attention caches (B, H, length, D) for every decoder layer, keys then values."""
    caches = []
    for layer in qmodel.decoder.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_heads, length, attn.head_dim)
        caches += [torch.zeros(shape), torch.zeros(shape)]
    return caches


def export_decoder_step(qmodel: nn.Module, path: "str | os.PathLike[str]", encoder_out: torch.Tensor,
                        encoder_padding_mask: torch.Tensor, opset: int = OPSET) -> Path:
    """Write one incremental decoding step of ``qmodel`` (a calibrated qswap S2T transformer) to
    ``path``. ``encoder_out`` (S, B, E) and ``encoder_padding_mask`` (B, S) are an example the
    trace runs on (with a two-token prefix); batch, source and cache lengths are dynamic."""
    check_calibrated(qmodel)
    if not hasattr(qmodel, "logits_quant"):
        raise ExportError(f"exporting the decoder of a {type(qmodel).__name__} is not supported yet; "
                          f"the step graph covers qswap's S2T transformer model")
    model = copy.deepcopy(qmodel).eval()
    graph = DecoderStepGraph(model)
    batch = encoder_out.shape[1]
    tokens = torch.full((batch, 2), model.decoder.dictionary.eos(), dtype=torch.long)
    with torch.no_grad():  # the caches after one step: the example traced is the second step
        first = graph(tokens[:, :1], encoder_out, encoder_padding_mask, *empty_cache(model, batch))
    inputs, outputs = names(len(model.decoder.layers))
    axes = {"tokens": {0: "batch", 1: "steps"}, "encoder_out": {0: "src", 1: "batch"},
            "encoder_padding_mask": {0: "batch", 1: "src"}, "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "steps"} for n in outputs[1:]})
    graph = DecoderStepGraph(copy.deepcopy(qmodel).eval())
    return trace_to_onnx(graph, (tokens, encoder_out, encoder_padding_mask, *first[1:]), path,
                         inputs, outputs, axes, opset)
