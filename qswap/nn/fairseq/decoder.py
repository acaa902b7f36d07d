"""The S2T decoder counterpart: fairseq's decoder, with a beam reorder that does not walk the
module tree at every decoding step.

fairseq's ``reorder_incremental_state_scripting`` runs at every beam-search step and visits
every submodule with ``hasattr(module, "reorder_incremental_state")``. A converted decoder has
about six times the modules of the float one (each quantizer and its observer is a module; 788
against 127 in the shipped model's decoder), and ``hasattr`` on an ``nn.Module`` that lacks the
attribute goes through ``Module.__getattr__``'s error path: measured at a quarter of the
quantized model's extra decoding time. The counterpart visits the same modules in the same
order, found once (by their class, which is where fairseq defines the method) on its first
reorder. The decoder's own arithmetic is done by its converted children; it adds none.
"""
from __future__ import annotations

from fairseq.models import FairseqIncrementalDecoder
from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable
from torch import nn

from qswap.io.serializable import ANY, INT, NOT_STORED, List, Obj, Opt, Tensor, serializable
from qswap.nn.base import QuantConfig, QuantModule
from qswap.nn.registry import register


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

    def to_integer(self, out=None, stream_bits: int = 16) -> "IntegerS2TDecoder":
        """The integer form of this decoder (batch forward and incremental decoding inside fairseq's
        SequenceGenerator: a ``FairseqIncrementalDecoder`` whose cache holds codes). The token and
        position tables are folded once onto the int32 residual stream's grid (their quantized
        values times ``embed_scale``, rounded half to even; 2^-stream_bits of the finest grid
        that reads the stream): looking them up and adding is integer. Then the integer layers,
        the final norm onto the output projection's input grid, and the output projection onto
        ``out`` (the model's logits grid) or, without one, its int32 accumulator (its float scale:
        the declared end step)."""
        import torch

        from qswap.errors import IntegerizeError
        from qswap.nn.embedding import QEmbedding
        from qswap.nn.fairseq.layers import stream_to
        from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding
        from qswap.quant.integer import Grid, check_bound, stream_grid
        if not (isinstance(self.embed_tokens, QEmbedding) and isinstance(self.embed_positions,
                                                                        QSinusoidalPositionalEmbedding)) \
                or self.layer_norm is None or self.project_in_dim is not None or self.project_out_dim is not None \
                or self.layernorm_embedding is not None or self.adaptive_softmax is not None:
            raise IntegerizeError("only a decoder with quantized token and sinusoidal position tables, a "
                                  "final LayerNorm and no projections around it has an integer form so far")
        first = self.layers[0]
        scale = min(float(torch.as_tensor(stream_grid(q).scale).min())
                    for q in (first.self_attn_layer_norm.input_quant, first.attn_residual_quant))
        scale *= 2.0 ** -stream_bits
        with torch.no_grad():
            tokens = torch.round(self.embed_scale * self.embed_tokens.weight_quant(self.embed_tokens.weight).double()
                                 / scale)
            positions = torch.round(self.embed_positions.weights_quant(self.embed_positions.weights).double() / scale)
        check_bound("decoder token + position tables on the stream grid",
                    int(tokens.abs().max()) + int(positions.abs().max()))
        layers = []
        for layer in self.layers:
            layers.append(layer.to_integer(scale))
            scale = layers[-1].stream_scale
        grid = Grid.of(self.output_projection.input_quant)
        return IntegerS2TDecoder(tokens.to(torch.int32), positions.to(torch.int32), self.padding_idx,
                                 layers, stream_to(scale, self.layer_norm.input_quant),
                                 self.layer_norm.to_integer(grid), self.output_projection.to_integer(out), out,
                                 dictionary=self.dictionary)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

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
        import torch
        from fairseq import utils
        from qswap.errors import IntegerizeError
        if prev_output_tokens.shape[1] > self.max_positions():
            raise IntegerizeError(f"a target of {prev_output_tokens.shape[1]} tokens is longer than the integer "
                                  f"position table ({self.max_positions()}); rebuild it longer")
        causal = pad = None
        if incremental_state is not None:  # one step: fairseq's position of the last token
            tokens = prev_output_tokens[:, -1:]  # (B, 1)
            positions = torch.full_like(tokens, self.padding_idx + prev_output_tokens.shape[1])
        else:
            tokens, positions = prev_output_tokens, utils.make_positions(prev_output_tokens, self.padding_idx)
            length = tokens.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # (T, T), True = blocked
            pad = tokens.eq(self.padding_idx)
            pad = pad if bool(pad.any()) else None
        stream = (self.tokens[tokens] + self.positions[positions]).transpose(0, 1)  # (T', B, C)
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
