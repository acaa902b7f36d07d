"""The decoder of a calibrated qswap S2T transformer (or conformer: the same decoder) as two ONNX
QDQ graphs: the encoder-decoder attention's keys and values (computed once per utterance) and
one decoding step.

``cross_kv.onnx``: ``encoder_out`` (S, B, E) -> per decoder layer i ``cross_key_i`` / ``cross_value_i`` (B, H, S, D), the projections fairseq's
incremental decoder caches at its first step (``static_kv``).

``decoder_step.onnx``: ``tokens`` (B, t) int64 (every token so far; the step reads the last one
and its position t), per layer ``past_key_i`` / ``past_value_i`` (B, H, t-1, D) (empty at the
first step), and per SENTENCE (N of them, B = N x beam, rows grouped sentence by sentence as
fairseq's SequenceGenerator orders them) ``encoder_padding_mask`` (N, S) and ``cross_key_i`` /
``cross_value_i`` (N, H, S, D), what ``cross_kv.onnx`` writes: the beams of a sentence share its
keys and values, which are never copied per beam (``SentenceCrossAttention``). Outputs:
``logits`` (B, 1, V) on the model's logits grid and ``key_i`` / ``value_i`` (B, H, t, D), the
self-attention caches of the next step. A cache holds the quantized projections where qswap's
attention keeps a quantized cache (frozen per-tensor k/v grids), float projections otherwise:
the graph reads it as the fake-quant model does. A quantized cache goes in and out as its uint8
codes (``cache_grids``; cross_kv writes codes too): the step appends the new codes to the old
(``graph_passes.code_caches``) and its attention matmuls read codes, which onnxruntime runs as
integer kernels; a float cache would keep them float, and carry four bytes a value. The step
graph's metadata records the decoder's position limit (``POSITIONS_KEY``): its position table
ends there, and the loader holds export.json's ``max_target_positions`` to it.

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
from qswap.export.qdq import ActivationQDQ, activation_grid, activation_problem, from_codes, to_codes
from qswap.nn.fairseq.attention import QFairseqMultiheadAttention
from qswap.quant.fake_quantize import FakeQuantize, quantizes

STEP_INPUTS = ("tokens", "encoder_padding_mask")
POSITIONS_KEY = "qswap.max_target_positions"  # the step graph's metadata entry: its position limit


Grid = "tuple[torch.Tensor, torch.Tensor] | None"  # (scale, uint8 zero point) of codes; None: float


def _code_grid(quant: nn.Module) -> Grid:
    """The grid a cache quantized by ``quant`` is kept on as codes, or None (kept as floats): a
    frozen per-tensor activation grid the graph can hold (``ActivationQDQ``'s, or its stand-in's)."""
    if isinstance(quant, ActivationQDQ):
        ok = quant.source.enabled and quant.problem is None and quant.scale.dim() == 0
        return (quant.scale, quant.zero_point) if ok else None
    if (quantizes(quant) and quant.spec.granularity == "per_tensor"
            and activation_problem(quant, "") is None):
        return activation_grid(quant)
    return None


def cache_grids(attn: nn.Module) -> "tuple[Grid, Grid]":
    """(key grid, value grid) of the codes ``attn``'s decoding cache goes in and out of the graphs
    as, or (None, None): where the attention keeps a quantized cache (``_quantized_cache``) on
    grids ONNX holds, its codes; float values otherwise."""
    grids = (_code_grid(attn.core.k_quant), _code_grid(attn.core.v_quant))
    if None in grids or not attn._quantized_cache({}):
        return None, None
    return grids


def as_values(cache: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A cache tensor's values: its codes dequantized, or itself where it is float."""
    return cache if grid is None else from_codes(cache, grid)


def as_codes(values: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A cache tensor as the graphs carry it: codes on ``grid``, or the values where it is float."""
    return values if grid is None else to_codes(values, grid)


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
        self.grids = [cache_grids(attn) for attn in self.attentions]  # before the stand-ins come in

    def forward(self, encoder_out):
        query = encoder_out[:1]  # (1, B, E): any query fills the static cache the same way
        out = []
        for attn, (key_grid, value_grid) in zip(self.attentions, self.grids):
            state: dict = {}  # the keys and values do not depend on the padding mask
            attn(query, encoder_out, encoder_out, incremental_state=state, static_kv=True,
                 need_weights=False)
            saved = attn._get_input_buffer(state)
            out += [as_codes(saved["prev_key"], key_grid), as_codes(saved["prev_value"], value_grid)]  # (B, H, S, D)
        return tuple(out)


class SentenceCrossAttention(QFairseqMultiheadAttention):
    """An encoder-decoder attention whose cached keys and values hold one row per sentence while
    the query holds one per beam (B = N x beam rows, sentence by sentence): the beams of a
    sentence run as ``beam`` more query positions of that sentence, (T, B, E) -> (beam x T, N, E),
    so each sentence's keys meet all its beams' queries in one product and are never repeated
    per beam (fairseq's beamable attention repeats them: a copy of every layer's keys and values
    per step). Each query row meets the same keys, mask and quantizers, so it computes the values
    of the per-beam attention where its grids are per tensor (``beam_grouping_problem``)."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, **kwargs):
        saved = self._get_input_buffer(incremental_state) if incremental_state is not None else {}
        if "prev_key" not in saved or not kwargs.get("static_kv"):
            return super().forward(query, key, value, key_padding_mask, incremental_state, **kwargs)
        steps, rows, embed = query.shape
        sentences = saved["prev_key"].size(0)
        grouped = query.unflatten(1, (sentences, -1)).permute(2, 0, 1, 3).reshape(-1, sentences, embed)
        out, weights = super().forward(grouped, key, value, key_padding_mask, incremental_state, **kwargs)
        out = out.unflatten(0, (-1, steps)).permute(1, 2, 0, 3).reshape(steps, rows, embed)  # (T, B, E)
        if weights is not None:  # (..., N, beam x T, S) -> (..., B, T, S)
            weights = weights.unflatten(-2, (-1, steps)).flatten(-4, -3)
        return out, weights


def beam_grouping_problem(attn: nn.Module, site: str) -> str | None:
    """Why ``attn`` would not compute the same values with a sentence's beams as query positions
    (``SentenceCrossAttention``), or None: it must be qswap's fairseq attention, without a frozen
    grid other than per tensor (the rows' layout reaches no per-tensor grid). A quantizer that
    observes has no grid: it runs in no exported graph (there it is an ExportError), and the
    score terms' quantizers of an attention without masks or position biases never run."""
    if type(attn) not in (QFairseqMultiheadAttention, SentenceCrossAttention):  # the latter: a step graph's already
        return f"{site}: a {type(attn).__name__}; the step graph exports qswap's fairseq MultiheadAttention"
    for name, m in attn.named_modules():
        if isinstance(m, FakeQuantize) and m.kind == "activation" and m.enabled and bool(m.frozen) \
                and m.spec.granularity != "per_tensor":
            return (f"{site}.{name}: a {m.spec.granularity} activation grid; the step graph serves a "
                    f"sentence's beams as query positions of its keys and values, which needs per-tensor "
                    f"grids in the encoder-decoder attention: quantize this site per tensor")
    return None


class DecoderStepGraph(nn.Module):
    """fairseq's incremental decoding step (``decoder(tokens, encoder_out, incremental_state)``)
    with the incremental state built from, and returned as, tensors; the encoder-decoder keys,
    values and padding mask per sentence. Each encoder-decoder attention becomes a
    ``SentenceCrossAttention`` (its class swapped, in place: pass a copy of the model; a second
    step graph on the same model shares them); ExportError where that would change a value
    (``beam_grouping_problem``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder
        self.logits_quant = model.logits_quant
        self.embed_dim = model.decoder.embed_dim
        self.self_attns = [layer.self_attn for layer in self.decoder.layers]
        self.cross_attns = [layer.encoder_attn for layer in self.decoder.layers]
        self.self_grids = [cache_grids(attn) for attn in self.self_attns]  # before the stand-ins come in
        self.cross_grids = [cache_grids(attn) for attn in self.cross_attns]
        for i, attn in enumerate(self.cross_attns):
            problem = beam_grouping_problem(attn, f"decoder.layers.{i}.encoder_attn")
            if problem is not None:
                raise ExportError(problem)
            attn.__class__ = SentenceCrossAttention  # the same module, its forward groups beams

    def forward(self, tokens, encoder_padding_mask, *caches):
        layers = len(self.self_attns)
        past, cross = caches[:2 * layers], caches[2 * layers:]
        state: dict = {}
        for i, (attn, cross_attn) in enumerate(zip(self.self_attns, self.cross_attns)):
            (key, value), (cross_key, cross_value) = self.self_grids[i], self.cross_grids[i]
            attn._set_input_buffer(state, _cache(attn, as_values(past[2 * i], key),
                                                 as_values(past[2 * i + 1], value), None))
            cross_attn._set_input_buffer(state, _cache(cross_attn, as_values(cross[2 * i], cross_key),
                                                       as_values(cross[2 * i + 1], cross_value),
                                                       encoder_padding_mask))
        # the encoder-decoder attentions read their cached keys and values (static_kv), never
        # encoder_out: a placeholder of its shape stands in for it
        placeholder = torch.zeros(encoder_padding_mask.shape[1], tokens.shape[0], self.embed_dim)
        encoder = {"encoder_out": [placeholder], "encoder_padding_mask": [encoder_padding_mask]}
        logits, _ = self.decoder(tokens, encoder_out=encoder, incremental_state=state)
        out = []
        for attn, (key, value) in zip(self.self_attns, self.self_grids):
            saved = attn._get_input_buffer(state)
            out += [as_codes(saved["prev_key"], key), as_codes(saved["prev_value"], value)]  # (B, H, t, D)
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
    """Self-attention caches (B, H, length, D) of zeros for every decoder layer, keys then values,
    each as the step graph carries it (``cache_grids``): floats, or the codes of 0 (the zero point)."""
    caches = []
    for layer in qmodel.decoder.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_heads, length, attn.head_dim)
        caches += [torch.zeros(shape) if grid is None else torch.full(shape, int(grid[1]), dtype=torch.uint8)
                   for grid in cache_grids(attn)]
    return caches


def cache_values(qmodel: nn.Module, caches, cross: bool = False) -> list[torch.Tensor]:
    """The values of the caches a graph exchanges (``cross``: cross_kv's outputs; else the step
    graph's self-attention caches), per layer key then value: codes dequantized, floats as they are."""
    grids = [g for layer in qmodel.decoder.layers
             for g in cache_grids(layer.encoder_attn if cross else layer.self_attn)]
    return [as_values(torch.as_tensor(c), g) for c, g in zip(caches, grids)]


def _check_decoder(qmodel: nn.Module, allow_float: bool) -> None:
    if not allow_float:
        check_calibrated(qmodel)
    if not hasattr(qmodel, "logits_quant"):
        raise ExportError(f"exporting the decoder of a {type(qmodel).__name__} is not supported yet; "
                          f"the step graph covers qswap's S2T transformer and conformer models")
    for i, layer in enumerate(qmodel.decoder.layers):
        for name in ("self_attn", "encoder_attn"):
            attn = getattr(layer, name, None)
            if attn is not None and not hasattr(attn, "core"):  # a recipe's skip left fairseq's own attention
                raise ExportError(f"decoder.layers.{i}.{name} is fairseq's {type(attn).__name__}, not qswap's "
                                  f"counterpart (a recipe rule skips it): the step graph exports qswap's "
                                  f"attention only; to keep it float, give its rule 'weight: null' and "
                                  f"'activation: null' instead of 'skip: true'")


def export_cross_kv(qmodel: nn.Module, path: "str | os.PathLike[str]", encoder_out: torch.Tensor,
                    opset: int = OPSET, *, allow_float: bool = False) -> Path:
    """Write the encoder-decoder keys and values of every decoder layer of ``qmodel`` to ``path``
    (``encoder_out`` (S, B, E) is the traced example; batch and source length are dynamic)."""
    _check_decoder(qmodel, allow_float)
    outputs = cross_names(len(qmodel.decoder.layers))
    axes = {"encoder_out": {0: "src", 1: "batch"}}
    axes.update({n: {0: "batch", 2: "src"} for n in outputs})
    model = copy.deepcopy(qmodel).eval()
    return trace_to_onnx(CrossKVGraph(model), (encoder_out,), path, ("encoder_out",), outputs, axes, opset,
                         sites=(model, ""))


def export_decoder_step(qmodel: nn.Module, path: "str | os.PathLike[str]", encoder_out: torch.Tensor,
                        encoder_padding_mask: torch.Tensor, opset: int = OPSET, *,
                        allow_float: bool = False) -> Path:
    """Write one incremental decoding step of ``qmodel`` (a calibrated qswap S2T transformer or
    conformer) to ``path``. ``encoder_out`` (S, N, E) and ``encoder_padding_mask`` (N, S) are an
    example the trace runs on (N sentences, two beams each, a two-token prefix); sentences, beams,
    source and cache lengths are dynamic. ``allow_float``: a conversion with identity quantizers
    (recipe fp32) exports too."""
    _check_decoder(qmodel, allow_float)
    model = copy.deepcopy(qmodel).eval()
    rows = 2 * encoder_out.shape[1]  # two beams per sentence: the rows are not the sentences
    with torch.no_grad():
        cross = CrossKVGraph(model)(encoder_out)
        tokens = torch.full((rows, 2), model.decoder.dictionary.eos(), dtype=torch.long)
        # the caches after one step: the example traced is the second step
        first = DecoderStepGraph(model)(tokens[:, :1], encoder_padding_mask, *empty_cache(model, rows), *cross)
    inputs, outputs = names(len(model.decoder.layers))
    layers = len(model.decoder.layers)
    axes = {"tokens": {0: "batch", 1: "steps"}, "encoder_padding_mask": {0: "sentences", 1: "src"},
            "logits": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[2:2 + 2 * layers]})
    axes.update({n: {0: "sentences", 2: "src"} for n in inputs[2 + 2 * layers:]})
    axes.update({n: {0: "batch", 2: "steps"} for n in outputs[1:]})
    traced = copy.deepcopy(qmodel).eval()
    graph = DecoderStepGraph(traced)
    return trace_to_onnx(graph, (tokens, encoder_padding_mask, *first[1:], *cross), path,
                         inputs, outputs, axes, opset, entry=entry_tables(model.decoder), sites=(traced, ""),
                         facts={POSITIONS_KEY: str(int(model.decoder.max_positions()))})


def entry_tables(decoder: nn.Module) -> "tuple[dict, float] | None":
    """The integer model's folded token and position tables (``folded_tables``: int32, on the
    grid 2^-16 of the finest grid reading the decoder's entry) by the name of the code table each
    folds in the step graph, and that grid: what ``graph_passes.integer_entry`` adds in int32.
    None where the decoder's entry has no integer form (unquantized tables or readers, a
    structure or bound ``folded_tables`` refuses): the float ``Add`` stays, and the deploy audit
    lists it. A sum beyond 2^24 on that grid (256 steps of the finest reader: outside its 8-bit
    range) reaches the readers as a float32, rounded by a relative 2^-24: a coarser reader's code
    can differ from the integer model's only at such a value's near-tie."""
    from qswap.errors import QswapError

    if not hasattr(decoder, "folded_tables") or not decoder._has_integer_entry() or not decoder.layers:
        return None
    first = decoder.layers[0]
    quantizers = (decoder.embed_tokens.weight_quant, decoder.embed_positions.weights_quant,
                  first.self_attn_layer_norm.input_quant, getattr(first, "attn_residual_quant", None))
    if not all(isinstance(q, FakeQuantize) and q.initialized for q in quantizers):
        return None
    try:
        tokens, positions, scale = decoder.folded_tables()
    except QswapError:
        return None
    return ({"decoder.embed_tokens.weight_quant.codes": tokens.numpy(),
             "decoder.embed_positions.weights_quant.codes": positions.numpy()}, float(scale))
