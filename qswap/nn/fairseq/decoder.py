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

from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable
from torch import nn

from qswap.io.serializable import ANY, INT, List, Obj, Opt, Tensor, serializable
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
        """The integer form of this decoder for a batch (teacher-forced) forward. The token and
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
        from qswap.quant.integer import Grid, check_bound
        if not (isinstance(self.embed_tokens, QEmbedding) and isinstance(self.embed_positions,
                                                                        QSinusoidalPositionalEmbedding)) \
                or self.layer_norm is None or self.project_in_dim is not None or self.project_out_dim is not None \
                or self.layernorm_embedding is not None or self.adaptive_softmax is not None:
            raise IntegerizeError("only a decoder with quantized token and sinusoidal position tables, a "
                                  "final LayerNorm and no projections around it has an integer form so far")
        first = self.layers[0]
        scale = min(Grid.of(q).scale for q in (first.self_attn_layer_norm.input_quant, first.attn_residual_quant))
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
                                 self.layer_norm.to_integer(grid), self.output_projection.to_integer(out), out)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(tokens=Tensor("int32"), positions=Tensor("int32"), padding_idx=INT, layers=List(ANY),
              norm_in=Obj("Requant"), norm=Obj("IntegerLayerNorm"), output_projection=Obj("IntegerLinear"),
              out_grid=Opt(Obj("Grid")))
class IntegerS2TDecoder(nn.Module):
    """The S2T decoder on integers, batch (teacher-forced) forward: int32 logits accumulator out."""

    def __init__(self, tokens, positions, padding_idx: int, layers: list, norm_in, norm, output_projection,
                 out_grid=None):
        super().__init__()
        self.padding_idx, self.norm_in, self.norm, self.out_grid = padding_idx, norm_in, norm, out_grid
        self.layers, self.output_projection = nn.ModuleList(layers), output_projection
        self.register_buffer("tokens", tokens)  # (V, C) int32 on the stream grid
        self.register_buffer("positions", positions)  # (P, C) int32 on the stream grid

    def forward(self, prev_output_tokens, memory: list, encoder_padding_mask):
        """prev_output_tokens: (B, T); memory: per layer, encoder output codes (S, B, C) on its
        key_in grid; encoder_padding_mask: (B, S). Returns (B, T, V) logits codes on the output
        grid, or the int32 accumulator when built without one."""
        import torch
        from fairseq import utils
        from qswap.errors import IntegerizeError
        positions = utils.make_positions(prev_output_tokens, self.padding_idx)  # (B, T)
        if int(positions.max()) >= self.positions.shape[0]:
            raise IntegerizeError("the target is longer than the integer position table; rebuild it longer")
        stream = (self.tokens[prev_output_tokens] + self.positions[positions]).transpose(0, 1)  # (T, B, C)
        length = stream.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # (T, T), True = blocked
        pad = prev_output_tokens.eq(self.padding_idx)
        pad = pad if bool(pad.any()) else None
        for layer, mem in zip(self.layers, memory):
            stream = layer(stream, mem, encoder_padding_mask, causal, pad)
        return self.output_projection(self.norm(self.norm_in(stream))).transpose(0, 1)  # (B, T, V)

    def dequantize_output(self, out):
        """Declared float step: logits codes (or the accumulator) to float."""
        if self.out_grid is not None:
            return self.out_grid.dequantize(out)
        return out.to(self.output_projection.acc_scale.dtype) * self.output_projection.acc_scale
