"""fairseq's ConformerEncoderLayer (s2t_conformer, wav2vec 2.0 conformer): the two half-step
feed-forward residuals ``0.5 * ffn(x) + x``, the attention and convolution residuals, all on
quantized operands. The convolution module (pointwise conv, GLU, depthwise conv, BatchNorm,
Swish) and the feed-forward modules are containers: their children are converted by their own
rules (``QConv1d``, ``QGLU``, ``QBatchNorm1d``, ``QSiLU``, ``QLinear``, ``QLayerNorm``).
"""
from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules.conformer_layer import ConformerEncoderLayer, ConformerWav2Vec2EncoderLayer

from qswap.io.serializable import ANY, List, Obj, Tuple, serializable
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register
from qswap.nn.fairseq.layers import ZERO_POINT, onto, onto_each, past, read_by, reader
from qswap.nn.simulate import add_onto
from qswap.quant.direct_call import with_own_hooks
from qswap.quant.fake_quantize import consume


def feed_forward(ffn: torch.nn.Module, x: torch.Tensor, out_quant: torch.nn.Module) -> torch.Tensor:
    """fairseq's ``FeedForwardModule.forward`` (LayerNorm, w_1, activation, dropout, w_2,
    dropout), each op told the quantizer that reads its result (``onto``: with ``simulate:
    integer`` each writes onto that grid as the integer chain does; otherwise each op as fairseq
    runs it). x: (T, B, C)."""
    x = onto(ffn.layer_norm, x, reader(ffn.w_1))
    x = ffn.dropout1(ffn.activation(onto(ffn.w_1, x, reader(ffn.activation))))
    return ffn.dropout2(onto(ffn.w_2, x, past(ffn.dropout2, out_quant)))


def convolution(conv: torch.nn.Module, x: torch.Tensor, out_quant: torch.nn.Module) -> torch.Tensor:
    """fairseq's ``ConvolutionModule.forward`` as ``feed_forward``: x (B, T, C) -> (B, T, C)."""
    x = onto(conv.layer_norm, x, reader(conv.pointwise_conv1)).transpose(1, 2)  # (B, C, T)
    x = onto(conv.pointwise_conv1, x, reader(conv.glu))
    x = onto(conv.glu, x, reader(conv.depthwise_conv))
    x = onto(conv.depthwise_conv, x, reader(conv.batch_norm))
    x = conv.activation(onto(conv.batch_norm, x, reader(conv.activation)))
    return conv.dropout(onto(conv.pointwise_conv2, x, past(conv.dropout, out_quant))).transpose(1, 2)


@register(ConformerEncoderLayer)
class QConformerEncoderLayer(QuantModule):
    converts_children = True
    sites = dict.fromkeys(("ffn1_residual", "ffn1_out", "attn_residual", "attn_out", "conv_residual",
                           "conv_out", "ffn2_residual", "ffn2_out"), "activation")

    def __init__(self, module: ConformerEncoderLayer, config: QuantConfig):
        super().__init__()
        self.pos_enc_type = module.pos_enc_type
        self.simulate = config.simulate
        for name in ("ffn1", "self_attn_layer_norm", "self_attn_dropout", "self_attn", "conv_module",
                     "ffn2", "final_layer_norm"):
            setattr(self, name, getattr(module, name))
        for site in self.sites:
            setattr(self, f"{site}_quant", quantizer(config, self.sites, site))

    @classmethod
    def from_float(cls, module: ConformerEncoderLayer, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: torch.Tensor, encoder_padding_mask: Optional[torch.Tensor],
                position_emb: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                next_readers: tuple = ()):
        """x: (T, B, C); encoder_padding_mask: (B, T); position_emb: (2T-1, 1, C) for rel_pos.
        Returns (T, B, C) and (None, the second feed-forward's output). For the S2T encoder's
        ``simulate: integer`` loop: ``residual``, what the first residual reads in place of ``x``
        (the stream on its grid; x: on the first norm's); ``next_readers``, the quantizers that
        read the layer's output: then the first value returned is a list, the final norm's
        integer accumulator requantized onto each (``QLayerNorm.onto_each``)."""
        residual = x if residual is None else residual
        ffn1 = with_own_hooks(self.ffn1, (x,), lambda x: feed_forward(self.ffn1, x, self.ffn1_out_quant))
        x, residual = self._add("ffn1", self.ffn1_out_quant(ffn1),
                                self.ffn1_residual_quant(residual),
                                (reader(self.self_attn_layer_norm), self.attn_residual_quant))
        x = onto(self.self_attn_layer_norm, x, reader(self.self_attn))
        extra = {"pos_emb": position_emb} if self.pos_enc_type == "rel_pos" else {}
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                                 need_weights=False, **extra,
                                 **read_by(self.self_attn, past(self.self_attn_dropout, self.attn_out_quant)))
        x, residual = self._add("attn", consume(self.attn_out_quant, self.self_attn_dropout(x)),
                                self.attn_residual_quant(residual),
                                (reader(self.conv_module.layer_norm), self.conv_residual_quant))
        x = with_own_hooks(self.conv_module, (x.transpose(0, 1),),  # (B, T, C) inside
                           lambda x: convolution(self.conv_module, x, self.conv_out_quant)).transpose(0, 1)
        x, residual = self._add("conv", self.conv_out_quant(x), self.conv_residual_quant(residual),
                                (reader(self.ffn2.layer_norm), self.ffn2_residual_quant))
        layer_result = with_own_hooks(self.ffn2, (x,), lambda x: feed_forward(self.ffn2, x, self.ffn2_out_quant))
        x, _ = self._add("ffn2", self.ffn2_out_quant(layer_result), self.ffn2_residual_quant(residual),
                         (reader(self.final_layer_norm),))
        if next_readers:
            return onto_each(self.final_layer_norm, x, next_readers), (attn, layer_result)
        return self.final_layer_norm(x), (attn, layer_result)

    def _add(self, block: str, out: torch.Tensor, residual: torch.Tensor, readers: tuple) -> tuple:
        """The residual add after ``block`` (``out`` and ``residual``: values of its ``<block>_out``
        and ``<block>_residual`` grids; the feed-forwards' halved), as (the value ``readers[0]``
        reads, the value ``readers[1]`` reads or the same): with ``simulate: integer`` at inference
        the integer layer's rescaled add onto each reader's grid (``add_onto``), else the float
        sum, which each reader rounds."""
        half = 0.5 if block in ("ffn1", "ffn2") else 1.0
        values = add_onto(self, f"_integer_{block}_add", out, getattr(self, f"{block}_out_quant"), residual,
                          getattr(self, f"{block}_residual_quant"), readers, weight_a=half)
        if values is None:  # the float sums as before: halved feed-forwards, conv's residual first
            x = out * half + residual if half != 1.0 else residual + out if block == "conv" else out + residual
            return x, x
        return values[0], values[-1]

    def to_integer(self, stream_scale, **attn_extra) -> "IntegerConformerLayer":
        """The integer form of this layer, inference only. The residual stream is int32 (``stream_scale``
        in: a float, or a (C,) tensor per channel); each of its readers (a block's first norm, the
        residual quantizer) requantizes it onto its own grid, as the fake-quant layer rounds the float
        value onto each. The blocks: feed-forward (LayerNorm, Linear, SiLU table, Linear), the
        attention (``attn_extra``: the rel-pos table for rel_pos attention), the convolution module
        (LayerNorm, pointwise conv, integer GLU, depthwise conv, folded BatchNorm, SiLU table,
        pointwise conv), the second feed-forward; the half-step residuals fold their 0.5 into the
        rescaled add's multiplier. The final LayerNorm's int32 accumulator is the output stream
        (``IntegerConformerLayer.stream_scale``)."""
        return _integer_conformer_layer(self, stream_scale, attn_extra)


@register(ConformerWav2Vec2EncoderLayer)
class QConformerWav2Vec2EncoderLayer(QConformerEncoderLayer):
    """The wav2vec 2.0 conformer layer: the same block behind wav2vec 2.0's layer signature."""

    def forward(self, x, self_attn_mask=None, self_attn_padding_mask=None, need_weights=False,
                att_args=None, position_emb=None, residual=None, next_readers: tuple = ()):
        """``residual`` / ``next_readers``: the wav2vec 2.0 encoder's ``simulate: integer`` stream
        (``QWav2Vec2TransformerEncoder._streams``), as the S2T conformer encoder passes them."""
        return super().forward(x, self_attn_padding_mask, position_emb, residual=residual, next_readers=next_readers)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

_FFN_OPS = ("layer_norm", "w_1", "activation", "w_2")  # FeedForwardModule's forward order
_CONV_OPS = ("pointwise_conv1", "glu", "depthwise_conv", "batch_norm", "activation", "pointwise_conv2")


def _integer_conformer_layer(layer: QConformerEncoderLayer, stream_scale, attn_extra: dict) -> "IntegerConformerLayer":
    """See ``QConformerEncoderLayer.to_integer``."""
    from qswap.nn.fairseq.attention import QFairseqMultiheadAttention
    from qswap.nn.fairseq.chain import IntegerChain, integer_chain
    from qswap.nn.fairseq.layers import site_grids
    from qswap.nn.simulate import stream_to
    from qswap.quant.integer import AddParams, Grid, add_input_bits
    grids = site_grids(layer, layer.sites)  # the residual adds' operands: per tensor or per channel
    halves = {"ffn1": 0.5, "attn": 1.0, "conv": 1.0, "ffn2": 0.5}  # the half-step feed-forward residuals
    adds = [AddParams.build(halves[p] * grids[f"{p}_out"].scale, grids[f"{p}_residual"].scale,
                            input_bits=add_input_bits(grids[f"{p}_out"], grids[f"{p}_residual"])) for p in halves]
    scales = [stream_scale] + [a.sum_scale for a in adds]
    readers = (layer.ffn1.layer_norm, layer.self_attn_layer_norm, layer.conv_module.layer_norm, layer.ffn2.layer_norm)
    conv = layer.conv_module
    if isinstance(layer.self_attn, QFairseqMultiheadAttention):  # called with key = value = query
        attn_extra = {**attn_extra, "key_is_query": True}
    blocks = [
        integer_chain([(n, getattr(layer.ffn1, n)) for n in _FFN_OPS], grids["ffn1_out"]),
        IntegerChain([layer.self_attn_layer_norm.to_integer(Grid.of(layer.self_attn.input_quant)),
                      layer.self_attn.to_integer(grids["attn_out"], **attn_extra)]),
        IntegerConvolutionModule(conv.layer_norm.to_integer(Grid.of(conv.pointwise_conv1.input_quant)),
                                 integer_chain([(n, getattr(conv, n)) for n in _CONV_OPS], grids["conv_out"])),
        integer_chain([(n, getattr(layer.ffn2, n)) for n in _FFN_OPS], grids["ffn2_out"]),
    ]
    return IntegerConformerLayer(
        readers=[stream_to(s, r.input_quant) for s, r in zip(scales, readers)], blocks=blocks,
        residuals=[stream_to(s, getattr(layer, f"{p}_residual_quant")) for s, p in zip(scales, halves)], adds=adds,
        zero_points=[(grids[f"{p}_out"].zero_point, grids[f"{p}_residual"].zero_point) for p in halves],
        norm_in=stream_to(scales[-1], layer.final_layer_norm.input_quant), norm=layer.final_layer_norm.to_integer(None))


@serializable(norm=Obj("IntegerLayerNorm"), convs=Obj("IntegerChain"))
class IntegerConvolutionModule(torch.nn.Module):
    """The conformer's convolution module on codes: LayerNorm over C on (T, B, C), then the convs
    on (B, C, T)."""

    def __init__(self, norm, convs):
        super().__init__()
        self.norm, self.convs = norm, convs

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (T, B, C) -> (T, B, C) conv_out codes."""
        return self.convs(self.norm(codes).permute(1, 2, 0)).permute(2, 0, 1)


@serializable(readers=List(Obj("Requant")), blocks=List(ANY), residuals=List(Obj("Requant")),
              adds=List(Obj("AddParams")), zero_points=List(Tuple(ZERO_POINT, ZERO_POINT)), norm_in=Obj("Requant"),
              norm=Obj("IntegerLayerNorm"))
class IntegerConformerLayer(torch.nn.Module):
    """A conformer layer on integers: int32 stream in, the final norm's int32 accumulator out."""

    def __init__(self, *, readers, blocks, residuals, adds, zero_points, norm_in, norm):
        super().__init__()
        self.readers, self.residuals, self.adds, self.zero_points = readers, residuals, adds, zero_points
        self.blocks, self.norm_in, self.norm = torch.nn.ModuleList(blocks), norm_in, norm
        self.stream_scale = norm.stream_scale

    def forward(self, stream: torch.Tensor, encoder_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """stream: (T, B, C) int32; encoder_padding_mask: (B, T) bool or None. Returns (T, B, C) int32."""
        from qswap.quant.integer import rescaled_sum
        for i, block in enumerate(self.blocks):
            x = self.readers[i](stream)
            if i == 1:
                x = block[1](block[0](x), encoder_padding_mask)  # norm, attention
            else:
                x = block(x)
            z_out, z_res = self.zero_points[i]
            stream = rescaled_sum(x, z_out, self.residuals[i](stream), z_res, self.adds[i])
        return self.norm(self.norm_in(stream))
