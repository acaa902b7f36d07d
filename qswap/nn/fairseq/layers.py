"""fairseq's transformer encoder and decoder layers (``converts_children``: their attention,
linears and norms are converted by their own rules). The layer's own arithmetic is what the
counterpart quantizes: both operands of every residual add, the activation's input (fairseq
applies ``activation_fn`` as a function to ``fc1``'s output), and NormFormer's head and residual
scales when present.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayer,
    TransformerDecoderLayerBase,
    TransformerEncoderLayer,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from qswap.errors import ConvertError
from qswap.io.serializable import INT, Either, Obj, Tuple, serializable
from qswap.io.serializable import List as ListOf, Tensor as TensorOf
from qswap.nn.base import QuantConfig, QuantModule, quantizer, told
from qswap.nn.fairseq.attention import QFairseqMultiheadAttention
from qswap.nn.hadamard import QRotatedLinear
from qswap.nn.linear import QLinear
from qswap.nn.norm import QLayerNorm
from qswap.nn.registry import register
from qswap.nn.simulate import add_onto, simulates, stream_to
from qswap.quant.direct_call import watched
from qswap.quant.fake_quantize import consume, consume_twice

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]
ZERO_POINT = Either(INT, TensorOf("int64"))  # a residual add operand's: per tensor, or per channel


def onto(module: torch.nn.Module, x: Tensor, out_quant: Optional[torch.nn.Module], owned: bool = False,
         quantized: bool = False) -> Tensor:
    """``module(x)`` as ``out_quant`` reads it (a counterpart that ``takes_reader`` told its reader:
    the integer form's requantization with ``simulate: integer``); ``module(x)`` for another
    module, or without a reader. ``owned``: ``x`` is a temporary the caller hands over, which a
    ``QLinear``'s input quantizer may round in place (``consume``); ``quantized``: ``x`` is that
    quantizer's output already (``activated``)."""
    kwargs = {}
    if isinstance(module, QLinear):
        kwargs = {"quantized": True} if quantized else {"owned": True} if owned else {}
    return told(module, x, out_quant, **kwargs)


def activated(activation_fn, quant: torch.nn.Module, x: Tensor, fc2: torch.nn.Module,
              dropout: torch.nn.Module) -> tuple:
    """``activation_fn(consume(quant, x))``: the FFN's activation of its quantized input ``x``, a
    temporary (fc1's result) the caller hands over, as (the value, whether it is ``fc2``'s input
    quantizer's output already). A ReLU (fairseq's ``F.relu``) runs in the quantizer's own pass
    where that is in place (``FakeQuantize.consume(relu=True)``): the same values, one read and
    no new tensor; and where ``fc2``'s input quantizer would round it in place next, with
    ``dropout`` (run between the two) not dropping, that rounding joins the same pass
    (``consume_twice``): the caller then hands the value to fc2 as ``quantized``. Not where a
    hook watches fc2 or the dropout (a pre-hook of fc2 may change its input, which its input
    quantizer must then round). Only fairseq's ``F.relu`` is recognized as a ReLU."""
    if activation_fn is not F.relu:
        return activation_fn(consume(quant, x)), False
    fused = isinstance(fc2, QLinear) and not watched(fc2) and not watched(dropout)
    return consume_twice(quant, x, past(dropout, reader(fc2)) if fused else None, relu=True)


def onto_each(module: torch.nn.Module, x: Tensor, readers) -> list:
    """``module(x)`` as each of ``readers`` (quantizers) reads it: a ``QLayerNorm``'s or
    ``QLinear``'s ``onto_each`` (its integer accumulator requantized onto each grid with
    ``simulate: integer``), else ``module(x)`` once for each."""
    if isinstance(module, (QLayerNorm, QLinear)):
        return module(x, out_quant=list(readers))
    y = module(x)
    return [y for _ in readers]


def reader(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The quantizer that reads ``module``'s input (an attention's query: its ``input_quant``), or
    None (a float module)."""
    return getattr(module, "input_quant", None)


def past(dropout: torch.nn.Module, out_quant: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
    """``out_quant``, the reader an op may write onto when ``dropout`` runs between the two, or None
    while ``dropout`` drops (training, p > 0): its 1/(1-p) scaling takes the op's values off the
    reader's grid, so the op cannot compute what the reader reads, and a reader told would get
    the LSQ gradient of the op's result once more on top of its own (on the dropped values)."""
    p = getattr(dropout, "p", 0.0)
    dropping = p > 0 and (dropout.training or getattr(dropout, "apply_during_inference", False))
    return None if dropping else out_quant


def read_by(attention: torch.nn.Module, out_quant: Optional[torch.nn.Module]) -> dict:
    """The keyword telling an attention counterpart that ``takes_reader`` (fairseq's, ESPnet's) the
    quantizer that reads its output (``out_quant``, for ``simulate: integer``); none for another
    attention module."""
    told = out_quant is not None and getattr(attention, "takes_reader", False)
    return {"out_quant": out_quant} if told else {}


@register(TransformerEncoderLayerBase)
@register(TransformerEncoderLayer)
class QTransformerEncoderLayer(QuantModule):
    """fairseq's TransformerEncoderLayer(Base): residual adds and activation on quantized operands."""

    converts_children = True
    sites = dict.fromkeys(("attn_residual", "attn_out", "ffn_act", "ffn_residual", "ffn_out"), "activation")

    def __init__(self, module: TransformerEncoderLayerBase, config: QuantConfig):
        super().__init__()
        self.embed_dim, self.normalize_before = module.embed_dim, module.normalize_before
        self.return_fc, self.activation_fn = module.return_fc, module.activation_fn
        self.self_attn, self.self_attn_layer_norm = module.self_attn, module.self_attn_layer_norm
        self.dropout_module, self.activation_dropout_module = module.dropout_module, module.activation_dropout_module
        self.fc1, self.fc2, self.final_layer_norm = module.fc1, module.fc2, module.final_layer_norm
        for site in self.sites:
            setattr(self, f"{site}_quant", quantizer(config, self.sites, site))
        self.simulate = config.simulate

    @classmethod
    def from_float(cls, module: TransformerEncoderLayerBase, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: Tensor, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, next_readers: tuple = ()):
        """x: (T, B, C); encoder_padding_mask: (B, T), True = padding; attn_mask: (T, T), nonzero
        = blocked (fairseq fills those with -1e8: a block). Returns (T, B, C). ``residual``,
        ``next_readers``: see ``forward_onto`` (the S2T encoder's ``simulate: integer`` loop); with
        ``next_readers`` it returns a tuple of values, one each reader reads."""
        values, fc_result = self.forward_onto(x, encoder_padding_mask, attn_mask, residual, next_readers)
        if next_readers:
            return tuple(values)
        if self.return_fc and not torch.jit.is_scripting():
            return values[0], fc_result
        return values[0]

    def _attention_mask(self, attn_mask: Optional[Tensor], dtype: torch.dtype) -> tuple[Optional[Tensor], dict]:
        """fairseq's layer runs ``attn_mask.masked_fill(attn_mask.to(bool), -1e8)`` (-1e4 below
        float32): a float mask becomes an additive -1e8 at its nonzero positions, a block, and a
        row blocked everywhere near uniform; a bool mask stays bool, which torch's attention (no
        weights asked) gives zero probabilities in such a row. The attention counterpart gets the
        bool mask (a block: no -1e8 for a quantizer to read) and what fairseq's arithmetic gives
        such rows (``blocked_fill``: that value, or -inf for zero); another attention module
        fairseq's own mask. Returns (attn_mask, the keyword for the attention)."""
        if attn_mask is None:
            return None, {}
        value = -1e8 if dtype == torch.float32 else -1e4
        if not isinstance(self.self_attn, QFairseqMultiheadAttention):
            return attn_mask.masked_fill(attn_mask.to(torch.bool), value), {}
        if attn_mask.dtype == torch.bool:
            return attn_mask, {"blocked_fill": float("-inf")}
        return attn_mask.to(torch.bool), {"blocked_fill": value}

    def forward_onto(self, x: Tensor, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                     residual: Optional[Tensor] = None, next_readers: tuple = ()) -> tuple:
        """``forward``'s arithmetic, for a caller that knows the readers of the layer's residual
        stream (the S2T encoder with ``simulate: integer``): ``residual``: what the first residual
        add reads in place of ``x`` (x and residual: the stream requantized onto the grids of the
        layer's first reader, the first norm (pre-norm) or the attention (post-norm), and of its
        first residual); ``next_readers``: the quantizers that read the layer's output (the next
        layer's first reader and residual; the final norm, or after a post-norm last layer the
        decoder layers' ``key_in``). With ``simulate: integer`` each residual add of a layer with
        an integer form is then the integer layer's (``add_onto``: per tensor, or per channel of a
        per-channel stream) onto its readers' grids, and a post-norm layer's norms requantize their
        int32 accumulators onto theirs (``onto_each``), as ``integer_encoder_layer`` computes.
        Returns (a list of values, one for each of ``next_readers`` (one value without them), fc2's
        result)."""
        attn_mask, fill = self._attention_mask(attn_mask, x.dtype)
        residual = x if residual is None else residual
        post = not self.normalize_before
        if not post:
            x = onto(self.self_attn_layer_norm, x, reader(self.self_attn))
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask, **fill,
                              **read_by(self.self_attn, past(self.dropout_module, self.attn_out_quant)))
        readers = (reader(self.self_attn_layer_norm),) if post else (reader(self.final_layer_norm),
                                                                     self.ffn_residual_quant)
        values = self._add("attn", self.attn_residual_quant(residual), consume(self.attn_out_quant, self.dropout_module(x)),
                           readers)
        if post:  # the norm's result is read by fc1 and the second residual
            x, residual = self._post_norm(self.self_attn_layer_norm, values[0], (reader(self.fc1), self.ffn_residual_quant))
        else:
            x, residual = onto(self.final_layer_norm, values[0], reader(self.fc1)), values[-1]
        x, read = activated(self.activation_fn, self.ffn_act_quant, onto(self.fc1, x, self.ffn_act_quant), self.fc2,
                            self.activation_dropout_module)
        fc_result = x = onto(self.fc2, self.activation_dropout_module(x), past(self.dropout_module, self.ffn_out_quant),
                             owned=True, quantized=read)  # the activation's new tensor (or fc1's, a ReLU in place)
        values = self._add("ffn", self.ffn_residual_quant(residual), self.ffn_out_quant(self.dropout_module(x)),
                           (reader(self.final_layer_norm),) if post else tuple(next_readers))
        if post:
            values = self._post_norm(self.final_layer_norm, values[0], tuple(next_readers))
        return values, fc_result

    def integer_refusal(self) -> str | None:
        """Why this layer's residual adds are not the integer layer's under ``simulate: integer``
        (they stay fairseq's float sums, which each reader rounds), or None."""
        if not _integer_parts(self):
            return "the layer's norms and linears must be converted to have an integer form"
        return None

    def _add(self, part: str, a: Tensor, b: Tensor, readers: tuple) -> list:
        """The residual add ``part`` ("attn", "ffn") of ``a`` and ``b`` (values of the
        ``<part>_residual`` and ``<part>_out`` grids) as each of ``readers`` reads it (at least one
        value): ``residual_values``."""
        return residual_values(self, part, a, b, readers)

    def _post_norm(self, norm: torch.nn.Module, x: Tensor, readers: tuple) -> list:
        """A post-norm layer's ``norm(x)`` as each of ``readers`` reads it (one value without
        readers): with ``simulate: integer`` where the layer has an integer form, the integer norm's
        int32 accumulator requantized onto each reader's grid (``onto_each``); else the norm's
        value, which each reader rounds."""
        if readers and simulates(self) and self.integer_refusal() is None:
            return onto_each(norm, x, readers)
        y = norm(x)
        return [y] * max(len(readers), 1)

    def to_integer(self, stream_scale: float | torch.Tensor) -> torch.nn.Module:
        """The integer form of this layer, inference only (``integer_encoder_layer``)."""
        return integer_encoder_layer(self, stream_scale, self.normalize_before)


@register(TransformerDecoderLayerBase)
@register(TransformerDecoderLayer)
class QTransformerDecoderLayer(QuantModule):
    """fairseq's TransformerDecoderLayer(Base), incremental decoding included: residual adds,
    activation, and NormFormer's ``c_attn`` head scale / ``w_resid`` residual scale (weight-
    quantized) on quantized operands."""

    converts_children = True
    _always = ("attn_residual", "attn_out", "cross_residual", "cross_out", "ffn_act", "ffn_residual",
               "ffn_out")
    sites = {**dict.fromkeys(_always, "activation"), "head_scale_in": "activation", "c_attn": "weight",
             "scaled_residual": "activation", "w_resid": "weight"}

    def __init__(self, module: TransformerDecoderLayerBase, config: QuantConfig):
        super().__init__()
        self.embed_dim, self.nh, self.head_dim = module.embed_dim, module.nh, module.head_dim
        self.normalize_before, self.activation_fn = module.normalize_before, module.activation_fn
        self.need_attn, self.onnx_trace = module.need_attn, module.onnx_trace
        self.cross_self_attention = module.cross_self_attention
        self.simulate = config.simulate
        for name in ("dropout_module", "activation_dropout_module", "self_attn", "attn_ln",
                     "self_attn_layer_norm", "encoder_attn", "encoder_attn_layer_norm",
                     "ffn_layernorm", "fc1", "fc2", "final_layer_norm"):
            setattr(self, name, getattr(module, name))
        for site in self._always:
            setattr(self, f"{site}_quant", quantizer(config, self.sites, site))
        self.c_attn, self.w_resid = module.c_attn, module.w_resid  # NormFormer scales, or None
        if self.c_attn is not None:
            self.head_scale_in_quant = quantizer(config, self.sites, "head_scale_in")
            self.c_attn_quant = quantizer(config, self.sites, "c_attn")
        if self.w_resid is not None:
            self.scaled_residual_quant = quantizer(config, self.sites, "scaled_residual")
            self.w_resid_quant = quantizer(config, self.sites, "w_resid")

    @classmethod
    def from_float(cls, module: TransformerDecoderLayerBase, config: QuantConfig):
        if module.cross_self_attention:
            raise ConvertError("TransformerDecoderLayer with cross_self_attention is not supported yet")
        return cls(module, config)

    def prepare_for_onnx_export_(self):
        self.onnx_trace = True

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        self.need_attn = need_attn

    def _restore(self, attn, incremental_state: IncrementalState, prev_state: Optional[List[Tensor]]):
        """Load a cached (prev_key, prev_value[, prev_key_padding_mask]) into ``attn``'s buffer."""
        if prev_state is None:
            return
        saved: Dict[str, Optional[Tensor]] = {"prev_key": prev_state[0], "prev_value": prev_state[1]}
        if len(prev_state) >= 3:
            saved["prev_key_padding_mask"] = prev_state[2]
        attn._set_input_buffer(incremental_state, saved)

    def _scale_heads(self, x: Tensor) -> Tensor:
        """NormFormer head scale: x (T, B, C) * c_attn per head."""
        t, b = x.shape[:2]
        x = self.head_scale_in_quant(x).view(t, b, self.nh, self.head_dim)  # (T, B, H, D)
        return (x * self.c_attn_quant(self.c_attn).view(self.nh, 1)).reshape(t, b, self.embed_dim)

    def forward(self, x: Tensor, encoder_out: Optional[Tensor] = None,
                encoder_padding_mask: Optional[Tensor] = None, incremental_state: IncrementalState = None,
                prev_self_attn_state: Optional[List[Tensor]] = None,
                prev_attn_state: Optional[List[Tensor]] = None, self_attn_mask: Optional[Tensor] = None,
                self_attn_padding_mask: Optional[Tensor] = None, need_attn: bool = False,
                need_head_weights: bool = False, residual: Optional[Tensor] = None, next_readers: tuple = ()):
        """x: (T, B, C) (T = 1 when decoding incrementally); encoder_out: (S, B, C).
        Returns (x (T, B, C), encoder attention or None, cached self-attention state or None).
        ``residual``, ``next_readers``: see ``forward_onto`` (the S2T decoder's ``simulate:
        integer`` loop); with ``next_readers`` the third element is the value ``next_readers[1]``
        reads (or None)."""
        x, nxt, attn = self.forward_onto(x, encoder_out, encoder_padding_mask, incremental_state, prev_self_attn_state,
                                         prev_attn_state, self_attn_mask, self_attn_padding_mask, need_attn,
                                         need_head_weights, residual, next_readers)
        if next_readers:
            return x, attn, nxt
        if self.onnx_trace and incremental_state is not None:
            saved = self.self_attn._get_input_buffer(incremental_state)
            state = [saved["prev_key"], saved["prev_value"]]
            if self_attn_padding_mask is not None:
                state.append(saved["prev_key_padding_mask"])
            return x, attn, state
        return x, attn, None

    def forward_onto(self, x: Tensor, encoder_out: Optional[Tensor] = None,
                     encoder_padding_mask: Optional[Tensor] = None, incremental_state: IncrementalState = None,
                     prev_self_attn_state: Optional[List[Tensor]] = None,
                     prev_attn_state: Optional[List[Tensor]] = None, self_attn_mask: Optional[Tensor] = None,
                     self_attn_padding_mask: Optional[Tensor] = None, need_attn: bool = False,
                     need_head_weights: bool = False, residual: Optional[Tensor] = None,
                     next_readers: tuple = ()) -> tuple:
        """``forward``'s arithmetic, for a caller that knows the readers of the layer's residual
        stream (the S2T decoder with ``simulate: integer``): ``residual``: what the first residual
        add reads in place of ``x`` (x and residual: the stream requantized onto the first norm's
        and the first residual's grids); ``next_readers``: the quantizers that read the layer's
        output (the next layer's norm and residual, or the final norm). With ``simulate: integer``
        each residual add is then the integer layer's (``_stream_onto``). Returns (x, the value
        for ``next_readers[1]`` or None, encoder attention or None)."""
        need_attn = need_attn or need_head_weights
        residual = x if residual is None else residual
        if self.normalize_before:
            x = onto(self.self_attn_layer_norm, x, reader(self.self_attn))
        self._restore(self.self_attn, incremental_state, prev_self_attn_state)
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                                 incremental_state=incremental_state, need_weights=False,
                                 attn_mask=self_attn_mask, **read_by(self.self_attn, None if (
                                     self.c_attn is not None or self.attn_ln is not None) else past(
                                         self.dropout_module, self.attn_out_quant)))
        if self.c_attn is not None:
            x = self._scale_heads(x)
        if self.attn_ln is not None:
            x = self.attn_ln(x)
        cross = self.encoder_attn is not None and encoder_out is not None
        x, residual = self._stream_onto("attn", self.attn_residual_quant(residual),
                                        consume(self.attn_out_quant, self.dropout_module(x)),
                                        self._norm_and_residual("cross" if cross else "ffn"))
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if cross:
            residual = x if residual is None else residual
            if self.normalize_before:
                x = onto(self.encoder_attn_layer_norm, x, reader(self.encoder_attn))
            self._restore(self.encoder_attn, incremental_state, prev_attn_state)
            x, attn = self.encoder_attn(query=x, key=encoder_out, value=encoder_out,
                                        key_padding_mask=encoder_padding_mask,
                                        incremental_state=incremental_state, static_kv=True,
                                        need_weights=need_attn or (not self.training and self.need_attn),
                                        need_head_weights=need_head_weights,
                                        **read_by(self.encoder_attn, past(self.dropout_module, self.cross_out_quant)))
            x, residual = self._stream_onto("cross", self.cross_residual_quant(residual),
                                            consume(self.cross_out_quant, self.dropout_module(x)),
                                            self._norm_and_residual("ffn"))
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
        residual = x if residual is None else residual
        if self.normalize_before:
            x = onto(self.final_layer_norm, x, getattr(self.fc1, "input_quant", None))
        x, read = activated(self.activation_fn, self.ffn_act_quant, onto(self.fc1, x, self.ffn_act_quant),
                            None if self.ffn_layernorm is not None else self.fc2, self.activation_dropout_module)
        x = self.activation_dropout_module(x)
        if self.ffn_layernorm is not None:
            x = self.ffn_layernorm(x)
        x = consume(self.ffn_out_quant, self.dropout_module(onto(self.fc2, x, past(self.dropout_module, self.ffn_out_quant),
                                                                 owned=True, quantized=read)))  # new tensors: the activation's (or fc1's), fc2's
        residual = self.ffn_residual_quant(residual)
        if self.w_resid is not None:
            residual = self.scaled_residual_quant(self.w_resid_quant(self.w_resid) * residual)
        x, residual = self._stream_onto("ffn", residual, x, next_readers)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, residual, attn

    def integer_refusal(self) -> str | None:
        """Why this layer has no integer form (``to_integer`` raises it; the ``simulate: integer``
        residual adds then stay float), or None."""
        if not self.normalize_before or self.encoder_attn is None or any(
                m is not None for m in (self.c_attn, self.attn_ln, self.ffn_layernorm, self.w_resid)):
            return ("only pre-norm decoder layers with encoder attention and no NormFormer parts have an "
                    "integer form so far (issue 16)")
        return None

    def _norm_and_residual(self, part: str) -> tuple:
        """The two quantizers that read the residual stream entering ``part`` ("cross", "ffn")."""
        norm = self.encoder_attn_layer_norm if part == "cross" else self.final_layer_norm
        return getattr(norm, "input_quant", None), getattr(self, f"{part}_residual_quant")

    def _stream_onto(self, part: str, a: Tensor, b: Tensor, readers: tuple) -> tuple:
        """The residual add ``part`` of its operands ``a`` and ``b`` (values of the
        ``<part>_residual`` and ``<part>_out`` grids), as (the value ``readers[0]`` reads, the value
        ``readers[1]`` reads or None). With ``simulate: integer`` at inference, in a layer whose
        integer form is defined (pre-norm, per-tensor grids), as the integer layer computes it: the
        operands' codes rescaled into the int32 stream (``rescaled_sum``), requantized onto each
        reader's grid; elsewhere the float sum, which every reader rounds."""
        return residual_onto(self, part, a, b, readers)

    def to_integer(self, stream_scale: float) -> "IntegerTransformerDecoderLayer":
        """The integer form of this (pre-norm) layer (batch forward and incremental decoding): as
        ``QTransformerEncoderLayer.to_integer``, with the encoder-decoder attention between the
        two (its keys and values: encoder output codes on its ``key_in`` grid); incremental
        decoding keeps both attentions' keys and values as codes. No NormFormer scales yet (issue 16)."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import AddParams, Grid, add_input_bits, build_lut
        refusal = self.integer_refusal()
        if refusal is not None:
            raise IntegerizeError(refusal)
        grids = site_grids(self, ("attn_residual", "attn_out", "cross_residual", "cross_out", "ffn_act",
                                  "ffn_residual", "ffn_out"))
        adds = [AddParams.build(grids[f"{part}_residual"].scale, grids[f"{part}_out"].scale,
                                input_bits=add_input_bits(grids[f"{part}_residual"], grids[f"{part}_out"]))
                for part in ("attn", "cross", "ffn")]
        scales = [stream_scale] + [a.sum_scale for a in adds[:2]]
        norms = (self.self_attn_layer_norm, self.encoder_attn_layer_norm, self.final_layer_norm)
        consumers = (self.self_attn.input_quant, self.encoder_attn.input_quant, self.fc1.input_quant)
        with torch.no_grad():
            act = build_lut(self.activation_fn, grids["ffn_act"], Grid.of(self.fc2.input_quant))
        return IntegerTransformerDecoderLayer(
            norms_in=[stream_to(s, n.input_quant) for s, n in zip(scales, norms)],
            norms=[n.to_integer(Grid.of(c)) for n, c in zip(norms, consumers)],
            attns=[self.self_attn.to_integer(grids["attn_out"]), self.encoder_attn.to_integer(grids["cross_out"])],
            residuals=[stream_to(s, getattr(self, f"{p}_residual_quant")) for s, p in zip(scales, ("attn", "cross", "ffn"))],
            adds=adds, fc1=self.fc1.to_integer(grids["ffn_act"]), act=(act, grids["ffn_act"].qmin),
            fc2=self.fc2.to_integer(grids["ffn_out"]),
            zero_points=[(grids[f"{p}_residual"].zero_point, grids[f"{p}_out"].zero_point)
                         for p in ("attn", "cross", "ffn")])


def residual_values(layer: torch.nn.Module, part: str, a: Tensor, b: Tensor, readers: tuple) -> list:
    """A transformer layer's residual add ``part`` of ``a`` and ``b`` (values of its
    ``<part>_residual`` and ``<part>_out`` grids) as each of ``readers`` reads it: ``add_onto``
    (the integer layer's add, with ``simulate: integer``) unless the layer has no integer form
    (``layer.integer_refusal()``, asked only where the add would be simulated: it runs on every
    residual add), else the float sum for each (at least one value), which each reader rounds."""
    values = None
    if readers and simulates(layer) and layer.integer_refusal() is None:
        values = add_onto(layer, f"_integer_{part}_add", a, getattr(layer, f"{part}_residual_quant"), b,
                          getattr(layer, f"{part}_out_quant"), readers)
    return [a + b] * max(len(readers), 1) if values is None else values


def residual_onto(layer: torch.nn.Module, part: str, a: Tensor, b: Tensor, readers: tuple) -> tuple:
    """``residual_values`` as (the value ``readers[0]`` reads, the value ``readers[1]`` reads, or
    None where it is the float sum)."""
    values = residual_values(layer, part, a, b, readers)
    return values[0], (values[1] if len(values) > 1 and values[1] is not values[0] else None)


def site_grids(layer, sites) -> dict:
    """Grid of each ``<site>_quant`` of ``layer``: the residual adds' operands may be per channel
    (``stream_grid``), every other site per tensor."""
    from qswap.quant.integer import Grid, stream_grid
    return {site: (stream_grid if site.endswith(("_residual", "_out")) else Grid.of)(getattr(layer, f"{site}_quant"))
            for site in sites}


_ENCODER_SITES = ("attn_residual", "attn_out", "ffn_act", "ffn_residual", "ffn_out")
FC2 = Either(Obj("IntegerLinear"), Obj("IntegerChain"))  # a linear, or a rotated one (``QRotatedLinear``)


def _integer_parts(layer) -> bool:
    """Whether ``layer``'s norms and FFN linears are counterparts with an integer form (fc2: a
    ``QLinear``, or a rotated linear's ``QRotatedLinear``)."""
    return (isinstance(layer.self_attn_layer_norm, QLayerNorm) and isinstance(layer.final_layer_norm, QLayerNorm)
            and isinstance(layer.fc1, QLinear) and isinstance(layer.fc2, (QLinear, QRotatedLinear)))


def integer_encoder_layer(layer, stream_scale: float | torch.Tensor, pre_norm: bool) -> torch.nn.Module:
    """The integer form of an encoder layer counterpart with fairseq's transformer layout
    (``QTransformerEncoderLayer``, wav2vec 2.0's ``QTransformerSentenceEncoderLayer``: self_attn,
    self_attn_layer_norm, fc1, activation_fn, fc2, final_layer_norm and the five residual and
    activation sites), inference only. The residual stream between layers is int32 on a fine grid
    (``stream_scale`` in, the form's ``stream_scale`` out; a float, or a (C,) tensor per channel),
    requantized onto the grid of each of its consumers, as the fake-quant layer rounds the float
    value onto each. Pre-norm: the stream is the second residual add's sum
    (``IntegerTransformerEncoderLayer``). Post-norm: each norm's int32 affine accumulator is the
    stream its consumers read (``IntegerPostNormEncoderLayer``). The FFN activation is a table."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import AddParams, Grid, add_input_bits, build_lut
    if not _integer_parts(layer):
        raise IntegerizeError("the layer's norms and linears must be converted to have an integer form")
    grids = site_grids(layer, _ENCODER_SITES)
    add1 = AddParams.build(grids["attn_residual"].scale, grids["attn_out"].scale,
                           input_bits=add_input_bits(grids["attn_residual"], grids["attn_out"]))
    add2 = AddParams.build(grids["ffn_residual"].scale, grids["ffn_out"].scale,
                           input_bits=add_input_bits(grids["ffn_residual"], grids["ffn_out"]))
    with torch.no_grad():
        act = build_lut(layer.activation_fn, grids["ffn_act"], Grid.of(layer.fc2.input_quant))
    zero_points = tuple(grids[s].zero_point for s in ("attn_residual", "attn_out", "ffn_residual", "ffn_out"))
    common = dict(attn=layer.self_attn.to_integer(grids["attn_out"]), add1=add1,
                  fc1=layer.fc1.to_integer(grids["ffn_act"]), act=(act, grids["ffn_act"].qmin),
                  fc2=layer.fc2.to_integer(grids["ffn_out"]), add2=add2, zero_points=zero_points)
    norm1, norm2 = layer.self_attn_layer_norm, layer.final_layer_norm
    if pre_norm:
        return IntegerTransformerEncoderLayer(
            norm1_in=stream_to(stream_scale, norm1.input_quant),
            norm1=norm1.to_integer(Grid.of(layer.self_attn.input_quant)),
            residual1=stream_to(stream_scale, layer.attn_residual_quant),
            norm2_in=stream_to(add1.sum_scale, norm2.input_quant),
            norm2=norm2.to_integer(Grid.of(layer.fc1.input_quant)),
            residual2=stream_to(add1.sum_scale, layer.ffn_residual_quant), **common)
    norm1_int = norm1.to_integer(None)
    return IntegerPostNormEncoderLayer(
        attn_in=stream_to(stream_scale, layer.self_attn.input_quant),
        residual1=stream_to(stream_scale, layer.attn_residual_quant),
        norm1_in=stream_to(add1.sum_scale, norm1.input_quant), norm1=norm1_int,
        fc1_in=stream_to(norm1_int.stream_scale, layer.fc1.input_quant),
        residual2=stream_to(norm1_int.stream_scale, layer.ffn_residual_quant),
        norm2_in=stream_to(add2.sum_scale, norm2.input_quant), norm2=norm2.to_integer(None), **common)


@serializable(norm1_in=Obj("Requant"), norm1=Obj("IntegerLayerNorm"), attn=Obj("IntegerFairseqAttention"),
              residual1=Obj("Requant"), add1=Obj("AddParams"), norm2_in=Obj("Requant"), norm2=Obj("IntegerLayerNorm"),
              fc1=Obj("IntegerLinear"), act=Tuple(TensorOf("int8", "uint8", "int16", "int32"), INT),
              fc2=FC2, residual2=Obj("Requant"), add2=Obj("AddParams"),
              zero_points=Tuple(*[ZERO_POINT] * 4))
class IntegerTransformerEncoderLayer(torch.nn.Module):
    """A pre-norm encoder layer on integers: int32 residual stream in and out (``stream_scale``:
    the output stream's grid), int8/uint8 codes between the ops inside."""

    def __init__(self, *, norm1_in, norm1, attn, residual1, add1, norm2_in, norm2, fc1, act, fc2,
                 residual2, add2, zero_points):
        super().__init__()
        self.norm1_in, self.norm1, self.attn, self.residual1, self.add1 = norm1_in, norm1, attn, residual1, add1
        self.norm2_in, self.norm2, self.fc1, self.fc2 = norm2_in, norm2, fc1, fc2
        self.residual2, self.add2, self.zero_points = residual2, add2, zero_points
        self.act_qmin = act[1]
        self.register_buffer("act_table", act[0])
        self.stream_scale = add2.sum_scale

    @property
    def act(self) -> tuple:
        return self.act_table, self.act_qmin

    def forward(self, stream: Tensor, encoder_padding_mask: Optional[Tensor]) -> Tensor:
        """stream: (T, B, C) int32; encoder_padding_mask: (B, T) bool or None. Returns (T, B, C) int32."""
        from qswap.quant.integer import apply_lut, rescaled_sum
        z_res1, z_out1, z_res2, z_out2 = self.zero_points
        x = self.attn(self.norm1(self.norm1_in(stream)), encoder_padding_mask)  # (T, B, C) attn_out codes
        stream = rescaled_sum(self.residual1(stream), z_res1, x, z_out1, self.add1)
        x = self.fc1(self.norm2(self.norm2_in(stream)))  # (T, B, F) ffn_act codes
        x = self.fc2(apply_lut(x, self.act_table, self.act_qmin))  # (T, B, C) ffn_out codes
        return rescaled_sum(self.residual2(stream), z_res2, x, z_out2, self.add2)


@serializable(requant=Obj("Requant"))
class StreamOut(torch.nn.Module):
    """An int32 stream requantized onto one output grid (a stream's reader without an op of its own)."""

    def __init__(self, requant):
        super().__init__()
        self.requant = requant

    def forward(self, stream: Tensor) -> Tensor:
        return self.requant(stream)


@serializable(attn_in=Obj("Requant"), attn=Obj("IntegerFairseqAttention"), residual1=Obj("Requant"),
              add1=Obj("AddParams"), norm1_in=Obj("Requant"), norm1=Obj("IntegerLayerNorm"), fc1_in=Obj("Requant"),
              fc1=Obj("IntegerLinear"), act=Tuple(TensorOf("int8", "uint8", "int16", "int32"), INT),
              fc2=FC2, residual2=Obj("Requant"), add2=Obj("AddParams"), norm2_in=Obj("Requant"),
              norm2=Obj("IntegerLayerNorm"), zero_points=Tuple(*[ZERO_POINT] * 4))
class IntegerPostNormEncoderLayer(torch.nn.Module):
    """A post-norm encoder layer on integers: int32 stream in (read by the attention and the first
    residual), each norm writes its int32 affine accumulator (the stream read by the FFN and the
    second residual; the layer's output stream, ``stream_scale``: the last norm's accumulator grid)."""

    def __init__(self, *, attn_in, attn, residual1, add1, norm1_in, norm1, fc1_in, fc1, act, fc2, residual2,
                 add2, norm2_in, norm2, zero_points):
        super().__init__()
        self.attn_in, self.attn, self.residual1, self.add1 = attn_in, attn, residual1, add1
        self.norm1_in, self.norm1, self.fc1_in, self.fc1, self.fc2 = norm1_in, norm1, fc1_in, fc1, fc2
        self.residual2, self.add2, self.norm2_in, self.norm2 = residual2, add2, norm2_in, norm2
        self.zero_points, self.act_qmin = zero_points, act[1]
        self.register_buffer("act_table", act[0])
        self.stream_scale = norm2.stream_scale

    @property
    def act(self) -> tuple:
        return self.act_table, self.act_qmin

    def forward(self, stream: Tensor, encoder_padding_mask: Optional[Tensor]) -> Tensor:
        """stream: (T, B, C) int32; encoder_padding_mask: (B, T) bool or None. Returns (T, B, C) int32."""
        from qswap.quant.integer import apply_lut, rescaled_sum
        z_res1, z_out1, z_res2, z_out2 = self.zero_points
        x = self.attn(self.attn_in(stream), encoder_padding_mask)  # (T, B, C) attn_out codes
        stream = self.norm1(self.norm1_in(rescaled_sum(self.residual1(stream), z_res1, x, z_out1, self.add1)))
        x = self.fc1(self.fc1_in(stream))  # (T, B, F) ffn_act codes
        x = self.fc2(apply_lut(x, self.act_table, self.act_qmin))  # (T, B, C) ffn_out codes
        return self.norm2(self.norm2_in(rescaled_sum(self.residual2(stream), z_res2, x, z_out2, self.add2)))


@serializable(norms_in=ListOf(Obj("Requant")), norms=ListOf(Obj("IntegerLayerNorm")),
              attns=ListOf(Obj("IntegerFairseqAttention")), residuals=ListOf(Obj("Requant")),
              adds=ListOf(Obj("AddParams")), fc1=Obj("IntegerLinear"),
              act=Tuple(TensorOf("int8", "uint8", "int16", "int32"), INT), fc2=FC2,
              zero_points=ListOf(Tuple(ZERO_POINT, ZERO_POINT)))
class IntegerTransformerDecoderLayer(torch.nn.Module):
    """A pre-norm decoder layer on integers (batch forward, or one step of incremental decoding):
    int32 residual stream in and out."""

    def __init__(self, *, norms_in, norms, attns, residuals, adds, fc1, act, fc2, zero_points):
        super().__init__()
        self.norms_in, self.residuals, self.adds, self.zero_points = norms_in, residuals, adds, zero_points
        self.norms, self.attns = torch.nn.ModuleList(norms), torch.nn.ModuleList(attns)
        self.fc1, self.fc2, self.act_qmin = fc1, fc2, act[1]
        self.register_buffer("act_table", act[0])
        self.stream_scale = adds[-1].sum_scale

    @property
    def act(self) -> tuple:
        return self.act_table, self.act_qmin

    def forward(self, stream: Tensor, memory: Tensor, encoder_padding_mask: Optional[Tensor],
                self_attn_mask: Optional[Tensor] = None, self_attn_padding_mask: Optional[Tensor] = None,
                incremental_state=None) -> Tensor:
        """stream: (T, B, C) int32; memory: (S, B, C) encoder output codes on the cross-attention's
        key_in grid; masks bool (True = blocked / padding); incremental_state: fairseq's decoding
        cache (stream is then one step, T = 1; the attentions keep their keys and values as codes
        in it). Returns (T, B, C) int32."""
        from qswap.quant.integer import apply_lut, rescaled_sum
        for i in range(3):
            x = self.norms[i](self.norms_in[i](stream))
            if i == 0:
                x = self.attns[0](x, self_attn_padding_mask, attn_mask=self_attn_mask,
                                  incremental_state=incremental_state)  # attn_out codes
            elif i == 1:
                x = self.attns[1](x, encoder_padding_mask, memory=memory,
                                  incremental_state=incremental_state)  # cross_out codes
            else:
                x = self.fc2(apply_lut(self.fc1(x), self.act_table, self.act_qmin))  # ffn_out codes
            z_res, z_out = self.zero_points[i]
            stream = rescaled_sum(self.residuals[i](stream), z_res, x, z_out, self.adds[i])
        return stream
