"""The S2T decoder counterpart: fairseq's decoder, with a beam reorder that does not walk the
module tree at every decoding step.

fairseq's ``reorder_incremental_state_scripting`` runs at every beam-search step and visits
every submodule with ``hasattr(module, "reorder_incremental_state")``. A converted decoder has
about six times the modules of the float one (each quantizer and its observer is a module; 788
against 127 in the shipped model's decoder), and ``hasattr`` on an ``nn.Module`` that lacks the
attribute goes through ``Module.__getattr__``'s error path: measured at a quarter of the
quantized model's extra decoding time. The counterpart visits the same modules in the same
order, found once (by their class, which is where fairseq defines the method) on its first
reorder. The decoder's own arithmetic is done by its converted children; it adds none, except
with ``simulate: integer`` (``extract_features_scriptable``): there it computes the entry stream
(token and position tables added) and each residual add as the integer decoder does, requantized
onto the grids of their readers, and the output projection writes onto the model's logits grid.
"""
from __future__ import annotations

import torch
from fairseq import utils
from fairseq.models import FairseqIncrementalDecoder
from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable
from torch import nn

from qswap.io.serializable import ANY, INT, NOT_STORED, List, Obj, Opt, Tensor, serializable
from qswap.nn.base import QuantConfig, QuantModule
from qswap.nn.norm import QLayerNorm
from qswap.nn.registry import register
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.integer import STREAM_BITS


@register(TransformerDecoderScriptable)
class QTransformerDecoderScriptable(QuantModule, TransformerDecoderScriptable):
    """fairseq's S2T ``TransformerDecoderScriptable`` (its forward, its children) with a cached
    list of the modules a beam reorder visits."""

    converts_children = True

    @classmethod
    def from_float(cls, module: TransformerDecoderScriptable, config: QuantConfig):
        """The same decoder object's state under this class: every attribute fairseq's
        constructor set, with the module, parameter and buffer tables copied (not shared)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._modules, new._parameters, new._buffers = (
            dict(module._modules), dict(module._parameters), dict(module._buffers))
        new._qswap_reorderable = None
        new.simulate = config.simulate
        new.logits_readers = []  # told by the model (bind_readers): its logits_quant
        return new

    def reorderable_modules(self) -> list[nn.Module]:
        """The modules fairseq's reorder visits (``self.modules()`` order), found on first use."""
        if self._qswap_reorderable is None:
            self._qswap_reorderable = [m for m in self.modules()
                                       if getattr(type(m), "reorder_incremental_state", None) is not None]
        return self._qswap_reorderable

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        for module in self.reorderable_modules():
            result = module.reorder_incremental_state(incremental_state, new_order)
            if result is not None:
                incremental_state = result

    def output_layer(self, features):
        """(B, T, C) -> (B, T, V) logits; with ``simulate: integer`` the output projection's
        integer form onto the logits reader's grid (``onto``)."""
        if self.logits_readers and self.adaptive_softmax is None:
            from qswap.nn.fairseq.layers import onto
            return onto(self.output_projection, features, self.logits_readers[0])
        return super().output_layer(features)

    def extract_features_scriptable(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                                    full_context_alignment: bool = False, alignment_layer=None,
                                    alignment_heads=None):
        """fairseq's, except with ``simulate: integer`` at inference (where the integer form is
        defined: ``to_integer``): the token and position tables folded onto the int32 stream and
        their sum requantized onto the first layer's two readers, as the integer decoder does
        (``entry_values``); each residual add requantized onto its readers' grids
        (``QTransformerDecoderLayer.forward`` told its ``next_readers``); each layer reads its own encoder output (the
        encoder writes one per decoder layer's key_in grid); the final norm writes onto the
        output projection's grid. Where the entry has no integer form, fairseq's loop runs and gives
        every layer ``encoder_out[0]`` (the model then binds no per-layer encoder outputs:
        ``bind_s2t_readers``; at run time, e.g. readers still calibrating, the encoder's outputs
        are one float value for every layer)."""
        from qswap.nn.fairseq.layers import onto
        entry = self.entry_values(prev_output_tokens, incremental_state)
        if entry is None:
            return super().extract_features_scriptable(prev_output_tokens, encoder_out, incremental_state,
                                                       full_context_alignment, alignment_layer, alignment_heads)
        x, residual = entry  # (T', B, C) each
        tokens = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        alignment_layer = self.num_layers - 1 if alignment_layer is None else alignment_layer
        memory = [] if encoder_out is None else encoder_out["encoder_out"]  # (S, B, C) one, or one per layer
        padding = encoder_out["encoder_padding_mask"][0] if encoder_out is not None and len(
            encoder_out["encoder_padding_mask"]) > 0 else None
        self_attn_padding_mask = tokens.eq(self.padding_idx) if bool(tokens.eq(self.padding_idx).any()) else None
        attn, inner_states = None, [x]
        for idx, layer in enumerate(self.layers):
            mask = self.buffered_future_mask(x) if incremental_state is None and not full_context_alignment else None
            enc = memory[idx] if len(memory) == len(self.layers) else (memory[0] if memory else None)
            nxt = self.layers[idx + 1] if idx + 1 < len(self.layers) else None
            readers = (getattr(self.layer_norm, "input_quant", None),) if nxt is None else (
                getattr(nxt.self_attn_layer_norm, "input_quant", None), nxt.attn_residual_quant)
            x, layer_attn, residual = layer(
                x, enc, padding, incremental_state, self_attn_mask=mask, self_attn_padding_mask=self_attn_padding_mask,
                need_attn=idx == alignment_layer, need_head_weights=idx == alignment_layer, residual=residual,
                next_readers=readers)  # x, residual: the stream as the next layer's norm and residual read it
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)
        if attn is not None:
            attn = (attn if alignment_heads is None else attn[:alignment_heads]).mean(dim=0)  # over heads
        if self.layer_norm is not None:  # read by the output projection's input quantizer, where it has one
            x = onto(self.layer_norm, x, getattr(self.output_projection, "input_quant", None))  # (a skipped
            # projection is fairseq's float Linear: a recipe may leave it float)
        x = x.transpose(0, 1)  # (B, T', C)
        return x, {"attn": [attn], "inner_states": inner_states}

    def entry_values(self, prev_output_tokens, incremental_state=None):
        """With ``simulate: integer`` at inference: (the value the first layer's norm reads, the
        value its residual reads), (T', B, C) each, as the integer decoder computes them: the
        quantized token rows (times ``embed_scale``) and position rows, looked up by the modules as
        fairseq does, rounded half to even onto the int32 stream grid (each the integer decoder's
        folded table entry, ``folded_tables``, whose bound check covers every sum), added in
        int32, the sum requantized onto each reader's grid. None where that is not defined (float
        simulation, training, a structure ``to_integer`` refuses, tables whose sum could overflow
        int32): then fairseq's float add runs. A reader per channel of the last axis (a
        per-channel stream) gets the codes of its channels (``values_onto``)."""
        from qswap.nn.fairseq.layers import QTransformerDecoderLayer
        from qswap.nn.simulate import cached_entry, forget, form_or_none, requants_to, simulates, stream_grid_of, values_onto
        if forget(self, "_integer_entry") or not simulates(self) or self.training or not self._has_integer_entry() \
                or not all(isinstance(layer, QTransformerDecoderLayer) for layer in self.layers):
            return None
        first = self.layers[0]
        readers = (getattr(first.self_attn_layer_norm, "input_quant", None), first.attn_residual_quant)
        grids = [None if r is None else stream_grid_of(r, frozen_only=True) for r in readers]
        if None in grids:  # a float reader (a skipped norm) or one not calibrated
            return None

        def build():  # the folded tables bound the int32 sum of any token row and position row
            folded = form_or_none(self.folded_tables)
            requants = None if folded is None else requants_to(folded[2], grids)
            return self.embed_scale, None if requants is None else (folded[2], requants)
        tables = (self.embed_tokens.weight, self.embed_positions.weights, *(
            q.scale for q in (self.embed_tokens.weight_quant, self.embed_positions.weights_quant)
            if isinstance(q, FakeQuantize)))
        sources = (*(r.scale for r in readers), *(r.zero_point for r in readers), *tables)
        built = cached_entry(self, build, *sources)
        if built is None:
            return None
        scale, requants = built
        tokens = prev_output_tokens[:, -1:] if incremental_state is not None else prev_output_tokens
        rows = self.embed_tokens(tokens)  # (B, T', C) quantized rows
        positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)  # (B, T', C)
        stream = (torch.round(self.embed_scale * rows.double() / scale).to(torch.int32)
                  + torch.round(positions.double() / scale).to(torch.int32)).transpose(0, 1)  # (T', B, C)
        return tuple(values_onto(r, requant, stream, g) for r, requant, g in zip(readers, requants, grids))

    def _has_integer_entry(self) -> bool:
        """Whether the decoder's entry has an integer form: quantized token and sinusoidal position
        tables, a final LayerNorm, no projections or norm around them (``to_integer``)."""
        from qswap.nn.embedding import QEmbedding
        from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding
        return (len(self.layers) > 0 and isinstance(self.embed_tokens, QEmbedding)
                and isinstance(self.embed_positions, QSinusoidalPositionalEmbedding)
                and isinstance(self.layer_norm, QLayerNorm) and self.project_in_dim is None
                and self.project_out_dim is None and self.layernorm_embedding is None
                and self.adaptive_softmax is None and self.quant_noise is None)

    def entry_scale(self, stream_bits: int = STREAM_BITS) -> float:
        """The int32 residual stream's grid at the decoder's entry: 2^-stream_bits of the finest
        grid of the first layer's two readers."""
        from qswap.quant.integer import stream_grid
        first = self.layers[0]
        scale = min(float(torch.as_tensor(stream_grid(q).scale).min())
                    for q in (first.self_attn_layer_norm.input_quant, first.attn_residual_quant))
        return scale * 2.0 ** -stream_bits

    def folded_tables(self, stream_bits: int = STREAM_BITS) -> tuple:
        """(token table (V, C) int32, position table (P, C) int32, their grid ``entry_scale``): the
        quantized tables (tokens times ``embed_scale``) rounded half to even onto the int32
        residual stream's grid. IntegerizeError where the decoder has no integer form."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import check_bound
        if not self._has_integer_entry():
            raise IntegerizeError("only a decoder with quantized token and sinusoidal position tables, a "
                                  "final LayerNorm and no projections around it has an integer form so far")
        scale = self.entry_scale(stream_bits)
        with torch.no_grad():
            tokens = torch.round(self.embed_scale * self.embed_tokens.weight_quant(self.embed_tokens.weight).double()
                                 / scale)
            positions = torch.round(self.embed_positions.weights_quant(self.embed_positions.weights).double() / scale)
        check_bound("decoder token + position tables on the stream grid",
                    int(tokens.abs().max()) + int(positions.abs().max()))
        return tokens.to(torch.int32), positions.to(torch.int32), scale

    def to_integer(self, out=None, stream_bits: int = STREAM_BITS) -> "IntegerS2TDecoder":
        """The integer form of this decoder (batch forward and incremental decoding inside fairseq's
        SequenceGenerator: a ``FairseqIncrementalDecoder`` whose cache holds codes). The token and
        position tables are folded once onto the int32 residual stream's grid (their quantized
        values times ``embed_scale``, rounded half to even; 2^-stream_bits of the finest grid
        that reads the stream): looking them up and adding is integer. Then the integer layers,
        the final norm onto the output projection's input grid, and the output projection onto
        ``out`` (the model's logits grid) or, without one, its int32 accumulator (its float scale:
        the declared end step)."""
        from qswap.errors import IntegerizeError
        from qswap.nn.simulate import stream_to
        from qswap.quant.integer import Grid
        if not len(self.layers):
            raise IntegerizeError("a decoder without layers (decoder_layers 0) has no integer form: its entry's "
                                  "integer add is defined onto the first layer's readers")
        tokens, positions, scale = self.folded_tables(stream_bits)
        layers = []
        for layer in self.layers:
            layers.append(layer.to_integer(scale))
            scale = layers[-1].stream_scale
        grid = Grid.of(self.output_projection.input_quant)
        return IntegerS2TDecoder(tokens, positions, self.padding_idx,
                                 layers, stream_to(scale, self.layer_norm.input_quant),
                                 self.layer_norm.to_integer(grid), self.output_projection.to_integer(out), out,
                                 dictionary=self.dictionary)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

def decoder_stream(tokens: torch.Tensor, positions: torch.Tensor, padding_idx: int, prev_output_tokens: torch.Tensor,
                   incremental: bool) -> torch.Tensor:
    """The int32 residual stream entering the first decoder layer: rows of the folded token and
    position tables (``folded_tables``) added. prev_output_tokens: (B, T); ``incremental``: only
    the last token, at fairseq's position of it (then T' = 1). Returns (T', B, C) int32."""
    if incremental:
        tokens_now = prev_output_tokens[:, -1:]  # (B, 1)
        where = torch.full_like(tokens_now, padding_idx + prev_output_tokens.shape[1])
    else:
        tokens_now, where = prev_output_tokens, utils.make_positions(prev_output_tokens, padding_idx)
    return (tokens[tokens_now] + positions[where]).transpose(0, 1)


def check_padding_idx(padding_idx: int, positions: torch.Tensor | None, vocabulary: int | None = None) -> None:
    """IntegerizeError unless ``padding_idx`` is a token index (below ``vocabulary`` where given)
    whose position table ``positions`` (fairseq's: rows from ``padding_idx + 1`` on) holds at least
    one position: an edited export had reached fairseq's generator with no positions (its raw
    AssertionError "min_len cannot be larger than max_len")."""
    from qswap.errors import IntegerizeError

    top = vocabulary if vocabulary is not None else padding_idx + 1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not 0 <= padding_idx < top:
        raise IntegerizeError(f"padding_idx {padding_idx!r} is no token index"
                              + (f" of the {vocabulary} tokens" if vocabulary is not None else ""))
    if positions is not None and positions.shape[0] <= padding_idx + 1:
        raise IntegerizeError(f"a position table of {positions.shape[0]} rows holds no position after padding_idx "
                              f"{padding_idx} (fairseq's positions start at padding_idx + 1)")


@serializable(tokens=Tensor("int32"), positions=Tensor("int32"), padding_idx=INT, layers=List(ANY),
              norm_in=Obj("Requant"), norm=Obj("IntegerLayerNorm"), output_projection=Obj("IntegerLinear"),
              out_grid=Opt(Obj("Grid")), dictionary=NOT_STORED)
class IntegerS2TDecoder(FairseqIncrementalDecoder):
    """The S2T decoder on integers, as fairseq's SequenceGenerator drives it: ``forward`` (batch,
    or one step with an ``incremental_state`` whose attention caches hold codes) returns float
    logits through the declared end step ``output`` (a ``DequantizeStep``); ``forward_codes`` is
    the integer part (logits codes, or the int32 accumulator when built without a logits grid);
    the inherited ``get_normalized_probs`` is the float log-softmax beam search reads."""

    def __init__(self, tokens, positions, padding_idx: int, layers: list, norm_in, norm, output_projection,
                 out_grid=None, dictionary=None):
        super().__init__(dictionary)  # the target dictionary (fairseq's decoders carry it; decoding does not read it)
        from qswap.nn.integer_steps import DequantizeStep
        check_padding_idx(padding_idx, positions, tokens.shape[0])
        self.padding_idx, self.norm_in, self.norm, self.out_grid = padding_idx, norm_in, norm, out_grid
        self.layers, self.output_projection = nn.ModuleList(layers), output_projection
        self.output = DequantizeStep(out_grid, None if out_grid is not None else output_projection.acc_scale)
        self.register_buffer("tokens", tokens)  # (V, C) int32 on the stream grid
        self.register_buffer("positions", positions)  # (P, C) int32 on the stream grid

    def max_positions(self) -> int:
        """Target positions the position table holds."""
        return self.positions.shape[0] - self.padding_idx - 1

    def forward_codes(self, prev_output_tokens, memory: list, encoder_padding_mask, incremental_state=None):
        """prev_output_tokens: (B, T); memory: per layer, encoder output codes (S, B, C) on its
        key_in grid; encoder_padding_mask: (B, S) or None; incremental_state: fairseq's decoding
        cache (then only the last token is decoded, at position T, and T' below is 1). Returns
        (B, T', V) logits codes on the output grid, or the int32 accumulator when built without one."""
        from qswap.errors import IntegerizeError
        if prev_output_tokens.shape[1] > self.max_positions():
            raise IntegerizeError(f"a target of {prev_output_tokens.shape[1]} tokens is longer than the integer "
                                  f"position table ({self.max_positions()}); rebuild it longer")
        causal = pad = None
        if incremental_state is None:
            length = prev_output_tokens.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # (T, T), True = blocked
            pad = prev_output_tokens.eq(self.padding_idx)
            pad = pad if bool(pad.any()) else None
        stream = decoder_stream(self.tokens, self.positions, self.padding_idx, prev_output_tokens,
                                incremental_state is not None)  # (T', B, C)
        for layer, mem in zip(self.layers, memory):
            stream = layer(stream, mem, encoder_padding_mask, causal, pad, incremental_state=incremental_state)
        return self.output_projection(self.norm(self.norm_in(stream))).transpose(0, 1)  # (B, T', V)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **unused):
        """fairseq's decoder interface: encoder_out is the integer encoder's dict (codes per
        layer). Returns ((B, T', V) float logits, None)."""
        padding = encoder_out["encoder_padding_mask"]
        codes = self.forward_codes(prev_output_tokens, encoder_out["encoder_out"], padding[0] if padding else None,
                                   incremental_state)
        return self.output(codes), None

    def reorder_incremental_state_scripting(self, incremental_state, new_order) -> None:
        """Beam reorder: every attention selects its cached codes' beams."""
        for layer in self.layers:
            for attn in layer.attns:
                attn.reorder_incremental_state(incremental_state, new_order)

    def dequantize_output(self, out):
        """Declared float step: logits codes (or the accumulator) to float."""
        return self.output(out)
