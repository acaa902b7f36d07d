"""Model-level counterparts: the arithmetic fairseq's encoders and models do themselves.

* S2T encoders (transformer, conformer) scale the subsampler's float output by ``embed_scale``
  before adding positions: the counterpart quantizes it first (site ``embed``); the positions
  come quantized from ``QSinusoidalPositionalEmbedding``. (The S2T *decoder* needs no
  counterpart: ``embed_scale`` multiplies rows of the quantized embedding table, and the positions
  it adds are quantized.)
* The models' ``get_normalized_probs`` (a log-softmax, or CTC's masked log-softmax) runs on
  logits quantized by ``logits_quant`` (site ``logits``).

These counterparts subclass the fairseq classes they replace, so fairseq's generator, criteria
and checkpoint code see the classes they expect; they are built explicitly from the float
module's children and settings, never by re-running the fairseq constructors.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.data.data_utils import lengths_to_padding_mask
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel
from fairseq.models.speech_to_text.s2t_conformer import S2TConformerEncoder, S2TConformerModel
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerEncoder, S2TTransformerModel
from fairseq.models.wav2vec.wav2vec2_asr import Wav2VecCtc
from torch import Tensor, nn

from qswap.errors import ConvertError, SpecError
from qswap.io.serializable import ANY, INT, Either, Obj, Opt, serializable
from qswap.io.serializable import List as ListOf, Tensor as TensorOf
from qswap.nn.base import QuantConfig, QuantModule, check_finite_input, quantizer
from qswap.nn.norm import QLayerNorm
from qswap.nn.registry import register
from qswap.nn.simulate import simulates
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.integer import STREAM_BITS


_S2T_ENCODER_ATTRS = ("encoder_freezing_updates", "num_updates", "embed_scale", "padding_idx",
                      "conv_version")


def _encoder_out(x: Tensor, padding_mask: Tensor, states: List[Tensor]) -> Dict[str, List[Tensor]]:
    return {"encoder_out": [x], "encoder_padding_mask": [padding_mask] if padding_mask.any() else [],
            "encoder_embedding": [], "encoder_states": states, "src_tokens": [], "src_lengths": []}


def subsample(module: nn.Module, src_tokens: Tensor, src_lengths: Tensor, out_quant: nn.Module) -> tuple:
    """``module(src_tokens, src_lengths)``; a ``QConv1dSubsampler`` is told its reader ``out_quant``
    (its last GLU then writes onto that grid with ``simulate: integer``). Features holding NaN or
    +-inf: a DataError, as the integer model's (``check_finite_input``)."""
    from qswap.nn.fairseq.subsample import QConv1dSubsampler
    check_finite_input(src_tokens)
    if isinstance(module, QConv1dSubsampler):
        return module(src_tokens, src_lengths, out_quant)
    return module(src_tokens, src_lengths)


@register(S2TTransformerEncoder)
class QS2TTransformerEncoder(QuantModule, S2TTransformerEncoder):
    """S2T transformer encoder: ``embed_scale * embed_quant(subsample(x)) + positions``."""

    converts_children = True
    sites = {"embed": "activation"}

    def __init__(self, module: S2TTransformerEncoder, config: QuantConfig):
        FairseqEncoder.__init__(self, module.dictionary)
        for name in _S2T_ENCODER_ATTRS:
            setattr(self, name, getattr(module, name))
        for name in ("dropout_module", "subsample", "embed_positions", "transformer_layers",
                     "layer_norm", "ctc_proj"):
            setattr(self, name, getattr(module, name))
        self.embed_quant = quantizer(config, self.sites, "embed")
        self.simulate = config.simulate
        self.out_readers: List[nn.Module] = []  # told by the model (bind_readers): each decoder layer's key_in

    @classmethod
    def from_float(cls, module: S2TTransformerEncoder, config: QuantConfig):
        return cls(module, config)

    def _forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False):
        """src_tokens: (B, T, C*D) features, src_lengths: (B,) -> fairseq's encoder_out dict.
        With ``simulate: integer`` at inference the layers run onto their readers
        (``_threads_stream``): each layer is called with ``residual`` and ``next_readers`` and
        returns (x, residual), the stream requantized onto the next layer's norm and residual
        grids, and ``encoder_states`` (``return_all_hiddens``) hold the values the next norm reads
        (the integer model's stream on that grid), not fairseq's float sums."""
        x, input_lengths = subsample(self.subsample, src_tokens, src_lengths, self.embed_quant)  # (T', B, C)
        embedded = self.embed_quant(x)
        x = self.embed_scale * embedded
        padding_mask = lengths_to_padding_mask(input_lengths)  # (B, T')
        positions = self.embed_positions(padding_mask).transpose(0, 1)  # (T', B, C)
        layers = list(self.transformer_layers)
        threaded = bool(layers) and self._threads_stream(layers)
        entry = entry_values(self, embedded, positions, _first_readers(layers[0]), padding_mask) if threaded else None
        x, residual = entry if entry is not None else (self.dropout_module(x + positions), None)
        states, outs = [], None
        for i, layer in enumerate(layers):
            if threaded:  # each layer's output onto the next layer's first reader and residual grids
                readers = self._next_readers(layers, i)
                values = layer(x, padding_mask, residual=residual, next_readers=readers) if readers else (
                    layer(x, padding_mask, residual=residual),)  # no reader told: the layer's float output
                x, residual = values[0], (values[1] if len(values) > 1 else None)
                outs = values if i + 1 == len(layers) and self.layer_norm is None and self.out_readers else None
            else:
                x = layer(x, padding_mask)
            if return_all_hiddens:
                states.append(x)
        if outs is not None:  # a post-norm last layer's norm wrote one output per decoder layer's key_in grid
            return dict(_encoder_out(outs[0], padding_mask, states), encoder_out=list(outs))
        if self.out_readers and simulates(self) and isinstance(self.layer_norm, QLayerNorm) \
                and not torch.is_grad_enabled():
            # one output per decoder layer, on its key_in grid (the integer encoder's outputs); not
            # in training, where the decoder's integer entry is off and fairseq's loop hands every
            # layer encoder_out[0]: a layer's key_in would round the first layer's grid values
            outs = self.layer_norm(x, out_quant=list(self.out_readers))
            return dict(_encoder_out(outs[0], padding_mask, states), encoder_out=outs)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return _encoder_out(x, padding_mask, states)

    def _threads_stream(self, layers: list) -> bool:
        """Whether the layers run onto their readers (``simulate: integer`` at inference, every
        layer a ``QTransformerEncoderLayer`` with an integer form): each layer's output is then the
        integer layer's stream (a pre-norm layer's last residual add, a post-norm layer's last
        norm) onto the next layer's first reader and residual grids
        (``QTransformerEncoderLayer.forward_onto``) instead of a float value each reader rounds."""
        from qswap.nn.fairseq.layers import QTransformerEncoderLayer
        return (simulates(self) and not self.training and not torch.is_grad_enabled() and all(
            isinstance(layer, QTransformerEncoderLayer) and layer.integer_refusal() is None for layer in layers))

    def _next_readers(self, layers: list, i: int) -> tuple:
        """The quantizers that read layer ``i``'s output: the next layer's first reader and first
        residual (``_first_readers``); after the last, the final norm's input, or without a final
        norm (post-norm) the decoder layers' ``key_in`` (``out_readers``, the integer encoder's
        outputs); none without either."""
        if i + 1 < len(layers):
            return _first_readers(layers[i + 1])
        if isinstance(self.layer_norm, QLayerNorm):
            return (self.layer_norm.input_quant,)
        return tuple(self.out_readers) if self.layer_norm is None else ()

    def to_integer(self, out, stream_bits: int = STREAM_BITS) -> "IntegerS2TTransformerEncoder":
        """The integer form of this encoder writing codes of ``out`` (the grid its output is read
        on, e.g. a decoder layer's ``key_in`` grid; a list of grids gives a list of codes, one per
        reader, each normalized and rounded onto its grid as the fake-quant readers do). The residual stream is int32 on the grid
        ``embed_scale * s_embed * 2^-stream_bits``: the embedded features enter it exactly
        (``(q - zp) << stream_bits``) and the quantized position table is folded onto it once
        (constant, rounded half to even). Its two declared float steps: quantizing the features,
        dequantizing the output codes."""
        from qswap.errors import IntegerizeError
        from qswap.nn.fairseq.layers import StreamOut
        from qswap.nn.simulate import stream_to
        from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding
        from qswap.quant.integer import stream_grid
        if not isinstance(self.embed_positions, QSinusoidalPositionalEmbedding):
            raise IntegerizeError("only sinusoidal positions have integer forms so far")
        embed = stream_grid(self.embed_quant)  # per tensor, or per channel: the stream's grid is then per channel
        scale = self.embed_scale * embed.scale * 2.0 ** -stream_bits
        with torch.no_grad():
            positions = torch.round(self.embed_positions.weights_quant(self.embed_positions.weights).double()
                                    / scale).to(torch.int32)  # (P, C)
        check_entry(embed, positions, stream_bits)
        layers = []
        for layer in self.transformer_layers:
            layers.append(layer.to_integer(scale))
            scale = layers[-1].stream_scale
        outs = out if isinstance(out, list) else [out]
        if self.layer_norm is None:  # post-norm: the last layer's norm accumulator is read directly
            norm_in, norms = None, [StreamOut(stream_to(scale, o)) for o in outs]
        else:
            norm_in = stream_to(scale, self.layer_norm.input_quant)
            norms = [self.layer_norm.to_integer(o) for o in outs]
        return IntegerS2TTransformerEncoder(self.subsample.to_integer(embed), embed.zero_point, stream_bits,
                                            positions, self.embed_positions.padding_idx, layers, norm_in,
                                            norms, out)


def _first_readers(layer: nn.Module) -> tuple:
    """The quantizers that read an S2T encoder layer's input stream: its first norm (pre-norm) or its
    attention (post-norm), and its first residual, as its integer layer requantizes the stream."""
    first = layer.self_attn_layer_norm if layer.normalize_before else layer.self_attn
    return first.input_quant, layer.attn_residual_quant


def check_entry(embed, positions: Optional[Tensor], stream_bits: int) -> None:
    """IntegerizeError where an integer encoder's entry stream could leave int32: each embedded code
    (``embed``'s grid) shifted left by ``stream_bits`` plus a folded position entry (``positions``,
    int32 (P, C), or None), summed in int32. The bound ``entry_values`` tests before it simulates
    that sum (a 16-bit embed grid reaches it)."""
    from qswap.quant.integer import check_bound
    table = int(positions.abs().max()) if positions is not None and positions.numel() else 0
    check_bound(f"the encoder's entry stream (embedded codes shifted by {stream_bits} bits plus the position "
                f"table's entries)", (embed.span << stream_bits) + table, 2 ** 31 - 2 ** 8 - 1)


def _check_entry_codes(embed_zero_point, stream_bits) -> None:
    """IntegerizeError for an entry shift or embed zero point no export writes (``check_entry``
    bounds the stream at export: a stream of at most 31 bits, codes of at most 16): a read-back
    file edited so had decoded at 97.8 % WER with no error."""
    from qswap.errors import IntegerizeError

    if not (isinstance(stream_bits, int) and 0 <= stream_bits <= 30):
        raise IntegerizeError(f"the encoder's entry shift must be 0 to 30 bits, got {stream_bits}")
    zp = embed_zero_point if isinstance(embed_zero_point, Tensor) else torch.tensor([embed_zero_point])
    if zp.numel() and int(zp.abs().max()) > 2 ** 16:
        raise IntegerizeError(f"the encoder's embed zero point must be a code of at most 16 bits, got "
                              f"{int(zp.abs().max())}")


def entry_values(encoder: nn.Module, embedded: Tensor, positions: Optional[Tensor], readers: tuple,
                 padding_mask: Optional[Tensor]) -> Optional[tuple]:
    """An S2T encoder's entry stream as each of ``readers`` (quantizers) reads it, with
    ``simulate: integer``, as the integer encoder computes it: the embedded features' codes
    shifted onto the int32 stream grid (``embed_scale * s_embed * 2^-STREAM_BITS``, exactly),
    plus the quantized position rows rounded onto that grid half to even (the integer encoder's
    folded table entries), requantized onto each reader's grid (per tensor, or per channel of a
    per-channel stream). ``embedded``: ``embed_quant``'s output (T', B, C); ``positions``: the
    sinusoidal position rows (T', B, C), or None (no positions added: a conformer's rel_pos and
    rope). With an embed grid per channel the stream's grid is per channel, and the position
    table is folded onto it once (int32 (P, C), as the integer encoder folds it), whose rows
    ``padding_mask`` (B, T') selects as fairseq numbers the positions. None where that is not
    defined (a reader still calibrating, a sum that could overflow int32, a grid without integer
    form): fairseq's float add then runs and each reader rounds it."""
    from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding
    from qswap.nn.simulate import cached_entry, channel_codes, forget, requants_to, stream_grid_of, values_onto
    if forget(encoder, "_integer_entry") or (
            positions is not None and not isinstance(encoder.embed_positions, QSinusoidalPositionalEmbedding)):
        return None
    embed = stream_grid_of(encoder.embed_quant)  # per tensor, or per channel (then so is the stream's grid)
    grids = [stream_grid_of(r, frozen_only=True) for r in readers]
    per_channel = isinstance(getattr(embed, "scale", None), Tensor)
    if per_channel and positions is not None and padding_mask is None:
        # the folded (P, C) table's rows are selected as fairseq numbers the positions, from the mask
        raise SpecError("entry_values: a per-channel entry grid with positions needs the padding mask (B, T') "
                        "the encoder computed; pass padding_mask")
    if embed is None or None in grids:
        return None
    table_quant = getattr(encoder.embed_positions, "weights_quant", None) if positions is not None else None

    def build():
        scale = encoder.embed_scale * embed.scale * 2.0 ** -STREAM_BITS
        table_max = 0.0
        if positions is not None:
            with torch.no_grad():
                table_max = float(table_quant(encoder.embed_positions.weights).abs().max())
        finest = float(scale.min()) if isinstance(scale, Tensor) else scale
        bound = table_max / finest + 2.0 ** STREAM_BITS * embed.span
        fits = bound < 2.0 ** 31 - 2 ** 8  # the rounded table entry and the shifted code add in int32
        requants = requants_to(scale, grids) if fits else None
        folded = None
        if per_channel and positions is not None:  # the integer encoder's table: (P, C) on the stream grid
            folded = torch.round(table_quant(encoder.embed_positions.weights).double() / scale).to(torch.int32)
        return encoder.embed_scale, None if requants is None else (scale, requants, folded)
    tables = () if positions is None else (encoder.embed_positions.weights, *(
        (table_quant.scale,) if isinstance(table_quant, FakeQuantize) else ()))
    sources = (encoder.embed_quant.scale, encoder.embed_quant.zero_point, *(r.scale for r in readers),
               *(r.zero_point for r in readers), *tables)
    built = cached_entry(encoder, build, *sources)
    if built is None:
        return None
    scale, requants, folded = built
    with torch.no_grad():
        stream = ((channel_codes(encoder.embed_quant, embedded, embed) - embed.zero_point)
                  << STREAM_BITS).to(torch.int32)  # (T', B, C)
        if folded is not None:
            stream = stream + folded[utils.make_positions(padding_mask, encoder.embed_positions.padding_idx).T]
        elif positions is not None:
            stream = stream + torch.round(positions.double() / scale).to(torch.int32)
        return tuple(values_onto(r, requant, stream, g) for r, requant, g in zip(readers, requants, grids))


@register(S2TConformerEncoder)
class QS2TConformerEncoder(QuantModule, S2TConformerEncoder):
    """S2T conformer encoder: ``embed_scale * embed_quant(subsample(x))`` (+ quantized absolute
    positions; rel_pos hands its constant table to the attention's ``linear_pos``)."""

    converts_children = True
    sites = {"embed": "activation"}

    def __init__(self, module: S2TConformerEncoder, config: QuantConfig):
        FairseqEncoder.__init__(self, module.dictionary)
        for name in _S2T_ENCODER_ATTRS + ("pos_enc_type",):
            setattr(self, name, getattr(module, name))
        for name in ("subsample", "embed_positions", "linear", "dropout", "conformer_layers"):
            setattr(self, name, getattr(module, name))
        self.embed_quant = quantizer(config, self.sites, "embed")
        self.simulate = config.simulate
        self.out_readers: List[nn.Module] = []  # told by the model (bind_readers): each decoder layer's key_in

    @classmethod
    def from_float(cls, module: S2TConformerEncoder, config: QuantConfig):
        return cls(module, config)

    def _forward(self, src_tokens: Tensor, src_lengths: Tensor, return_all_hiddens: bool = False):
        """src_tokens: (B, T, C*D) features, src_lengths: (B,) -> fairseq's encoder_out dict."""
        x, input_lengths = subsample(self.subsample, src_tokens, src_lengths, self.embed_quant)  # (T', B, C)
        padding_mask = lengths_to_padding_mask(input_lengths)  # (B, T')
        embedded = self.embed_quant(x)
        x = self.embed_scale * embedded
        positions, rows = None, None
        if self.pos_enc_type == "rel_pos":
            positions = self.embed_positions(x)  # (2T'-1, 1, C)
        elif self.pos_enc_type != "rope":
            rows = self.embed_positions(padding_mask).transpose(0, 1)  # (T', B, C)
        layers = list(self.conformer_layers)
        if not (layers and self._threads_stream(layers)):
            x = self.dropout(self.linear(x if rows is None else x + rows))
            states = []
            for layer in layers:
                x, _ = layer(x, padding_mask, positions)
                if return_all_hiddens:
                    states.append(x)
            return _encoder_out(x, padding_mask, states)
        # simulate: integer at inference: the integer encoder's stream, each value onto its readers
        entry = entry_values(self, embedded, rows, (self.linear.input_quant,), padding_mask)
        x = entry[0] if entry is not None else x if rows is None else x + rows
        x, residual = self.linear(x, out_quant=list(_conformer_readers(layers[0])))
        states = []
        for i, layer in enumerate(layers):
            last = i + 1 == len(layers)
            nxt = tuple(self.out_readers) if last else _conformer_readers(layers[i + 1])
            result, _ = layer(x, padding_mask, positions, residual=residual, next_readers=nxt)
            outs = list(result) if nxt else [result]
            x, residual = outs[0], (None if last else outs[1])
            if return_all_hiddens:
                states.append(x)
        if len(outs) > 1:  # one output per decoder layer, on its key_in grid (the integer encoder's outputs)
            return dict(_encoder_out(outs[0], padding_mask, states), encoder_out=list(outs))
        return _encoder_out(x, padding_mask, states)

    def _threads_stream(self, layers: list) -> bool:
        """Whether the entry, the layers and the output run onto their readers (``simulate:
        integer`` at inference, a converted ``linear`` and conformer layers): each writes the
        integer encoder's stream onto the grids that read it, instead of a float value each reader
        rounds; with per-channel stream grids the two differ on exact ties. Then each layer returns
        a list (its output on the next layer's two grids, or on each decoder layer's ``key_in``),
        ``encoder_states`` hold the values the next layer's norm reads, and ``encoder_out`` holds
        one output per decoder layer."""
        from qswap.nn.fairseq.conformer import QConformerEncoderLayer
        from qswap.nn.linear import QLinear
        return (simulates(self) and not self.training and not torch.is_grad_enabled()
                and isinstance(self.linear, QLinear) and all(isinstance(l, QConformerEncoderLayer) for l in layers))

    def to_integer(self, out, stream_bits: int = STREAM_BITS) -> "IntegerS2TTransformerEncoder":
        """The integer form of this encoder writing codes of ``out`` (a grid, or a list of grids:
        one per decoder layer's ``key_in``). As the transformer encoder's: the embedded features
        enter an int32 stream exactly, absolute positions folded onto it (rel_pos: none; the table
        goes to each layer's attention), then ``linear`` (its int32 accumulator is the stream the
        first layer reads), the conformer layers, each reader requantizing the last layer's norm
        accumulator. Rotary attention: no positions added, each attention rotates its input."""
        from qswap.errors import IntegerizeError
        from qswap.nn.fairseq.chain import IntegerChain
        from qswap.nn.fairseq.layers import StreamOut
        from qswap.nn.simulate import stream_to
        from qswap.nn.fairseq.positional import QSinusoidalPositionalEmbedding
        from qswap.quant.integer import stream_grid
        if self.pos_enc_type == "abs" and not isinstance(self.embed_positions, QSinusoidalPositionalEmbedding):
            raise IntegerizeError("conformer abs positions other than sinusoidal have no integer form yet")
        if not callable(getattr(self.subsample, "to_integer", None)):
            raise IntegerizeError(f"subsample ({type(self.subsample).__name__}): no integer form yet")
        embed = stream_grid(self.embed_quant)  # per tensor, or per channel: the stream's grid is then per channel
        scale = self.embed_scale * embed.scale * 2.0 ** -stream_bits
        positions, extra = None, {}
        with torch.no_grad():
            if self.pos_enc_type == "abs":
                table = self.embed_positions.weights_quant(self.embed_positions.weights)
                positions = torch.round(table.double() / scale).to(torch.int32)  # (P, C)
            elif self.pos_enc_type == "rel_pos":
                extra = {"pos_table": self.embed_positions.pe}
        check_entry(embed, positions, stream_bits)
        linear = self.linear.to_integer(None)
        entry = IntegerChain([StreamOut(stream_to(scale, self.linear.input_quant)), linear])
        scale, layers = linear.stream_scale, []
        for layer in self.conformer_layers:
            layers.append(layer.to_integer(scale, **extra))
            scale = layers[-1].stream_scale
        outs = [StreamOut(stream_to(scale, o)) for o in (out if isinstance(out, list) else [out])]
        return IntegerS2TTransformerEncoder(self.subsample.to_integer(embed), embed.zero_point, stream_bits, positions,
                                            self.padding_idx, layers, None, outs, out, entry=entry)


def _conformer_readers(layer: nn.Module) -> tuple:
    """The quantizers that read a conformer layer's input: its first feed-forward's norm and its
    first residual."""
    return getattr(layer.ffn1.layer_norm, "input_quant", None), layer.ffn1_residual_quant


def bind_s2t_readers(model: nn.Module) -> None:
    """Tell an S2T model's converted decoder its logits reader (``model.logits_quant``) and its
    converted transformer or conformer encoder the quantizers that read its output (each decoder
    layer's ``key_in``): both are outside the module that computes the value. Only a decoder whose
    entry has an integer form runs its own layer loop, which hands layer i the encoder's output i;
    fairseq's loop would hand every layer the first one, rounded again by each other layer's grid."""
    from qswap.nn.fairseq.decoder import QTransformerDecoderScriptable
    from qswap.nn.fairseq.layers import QTransformerDecoderLayer
    if isinstance(model.decoder, QTransformerDecoderScriptable):
        model.decoder.logits_readers = [model.logits_quant]
    layers = list(getattr(model.decoder, "layers", []))
    own_loop = isinstance(model.decoder, QTransformerDecoderScriptable) and model.decoder._has_integer_entry()
    if isinstance(model.encoder, (QS2TTransformerEncoder, QS2TConformerEncoder)) and own_loop and layers and all(
            isinstance(layer, QTransformerDecoderLayer) and hasattr(layer.encoder_attn, "key_quant")
            for layer in layers):
        model.encoder.out_readers = [layer.encoder_attn.key_quant for layer in layers]


class _QuantizedLogits:
    """``get_normalized_probs`` on logits quantized by ``self.logits_quant``. ``forward``
    returns them quantized too, so calibrating with the plain forward sets their grid (fairseq's
    generator calls the decoder, then ``get_normalized_probs``, which quantizes them; a
    quantized tensor passes the same frozen quantizer unchanged)."""

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor):
        """Returns ((B, T, V) quantized logits, the decoder's extra dict)."""
        logits, extra = super().forward(src_tokens, src_lengths, prev_output_tokens)
        return self.logits_quant(logits), extra

    def get_normalized_probs(self, net_output, log_probs: bool, sample: Optional[Dict[str, Tensor]] = None):
        net_output = (self.logits_quant(net_output[0]),) + tuple(net_output[1:])
        return super().get_normalized_probs(net_output, log_probs, sample)


@register(S2TTransformerModel)
class QS2TTransformerModel(QuantModule, _QuantizedLogits, S2TTransformerModel):
    """S2T transformer model; the decoder's log-softmax runs on quantized logits.

    >>> qmodel = qswap.convert(build_s2t_transformer(), "w8a8")
    """

    converts_children = True
    sites = {"logits": "activation"}

    def __init__(self, module: S2TTransformerModel, config: QuantConfig):
        S2TTransformerModel.__init__(self, module.encoder, module.decoder)
        self.logits_quant = quantizer(config, self.sites, "logits")

    @classmethod
    def from_float(cls, module: S2TTransformerModel, config: QuantConfig):
        return cls(module, config)

    def bind_readers(self) -> None:
        """The decoder's logits are read by ``logits_quant``; the encoder's output by every decoder
        layer's ``key_in`` quantizer (``simulate: integer`` then requantizes onto each)."""
        bind_s2t_readers(self)

    def to_integer_model(self) -> "IntegerS2TTransformerModel":
        """The integer form of this model for a batch (teacher-forced) forward: the integer
        encoder writing onto every decoder layer's ``key_in`` grid, the integer decoder. Declared
        float steps: the features in, the logits codes out (on ``logits_quant``'s grid, when the
        recipe quantizes logits; log-softmax, what beam search needs, stays float)."""
        from qswap.quant.integer import Grid
        keys = [layer.encoder_attn.key_quant for layer in self.decoder.layers]
        logits = Grid.of(self.logits_quant) if isinstance(self.logits_quant, FakeQuantize) else None
        return IntegerS2TTransformerModel(self.encoder.to_integer([Grid.of(k) for k in keys]),
                                          self.decoder.to_integer(logits))


@register(S2TConformerModel)
class QS2TConformerModel(QuantModule, _QuantizedLogits, S2TConformerModel):
    """S2T conformer model; the decoder's log-softmax runs on quantized logits."""

    converts_children = True
    sites = {"logits": "activation"}

    def __init__(self, module: S2TConformerModel, config: QuantConfig):
        S2TConformerModel.__init__(self, module.encoder, module.decoder)
        self.logits_quant = quantizer(config, self.sites, "logits")

    @classmethod
    def from_float(cls, module: S2TConformerModel, config: QuantConfig):
        return cls(module, config)

    bind_readers = QS2TTransformerModel.bind_readers  # the decoder's logits reader (a transformer encoder's too)
    to_integer_model = QS2TTransformerModel.to_integer_model  # integer conformer encoder, the same decoder


def _feature_strides(w2v_encoder) -> tuple | None:
    """((kernel, stride), ...) of the wav2vec 2.0 feature extractor a ``Wav2VecEncoder`` runs (its
    float or converted model's), or None where it has none."""
    from qswap.nn.fairseq.wav2vec2 import _conv_strides
    w2v = getattr(w2v_encoder, "w2v_model", None)
    strides = getattr(w2v, "conv_strides", None)
    layers = getattr(getattr(w2v, "cfg", None), "conv_feature_layers", None)
    return strides if strides is not None else _conv_strides(layers) if isinstance(layers, str) else None


@register(Wav2VecCtc)
class QWav2VecCtc(QuantModule, Wav2VecCtc):
    """wav2vec 2.0 CTC model: blank weighting, padding masking and the log-softmax run on
    logits quantized by ``logits_quant`` (and ``blank_logits_quant`` after an added blank
    weight). Padded frames are masked with ``masked_fill`` (blank 0, others -inf), as fairseq's
    ``get_logits`` masks them with a constant row."""

    converts_children = True
    sites = {"logits": "activation", "blank_logits": "activation"}

    def __init__(self, module: Wav2VecCtc, config: QuantConfig):
        Wav2VecCtc.__init__(self, module.cfg, module.w2v_encoder)
        self.blank_weight, self.blank_mode = module.blank_weight, module.blank_mode  # may differ from cfg
        self.logits_quant = quantizer(config, self.sites, "logits")
        self.conv_strides = _feature_strides(module.w2v_encoder)  # read once: the receptive-field check's
        if self.blank_weight != 0 and self.blank_mode == "add":
            self.blank_logits_quant = quantizer(config, self.sites, "blank_logits")

    @classmethod
    def from_float(cls, module: Wav2VecCtc, config: QuantConfig) -> "QWav2VecCtc":
        if module.blank_weight != 0 and module.blank_mode not in ("add", "set"):
            raise ConvertError(f"invalid blank mode {module.blank_mode}")
        return cls(module, config)

    def bind_readers(self) -> None:
        """The CTC projection's result is read by ``logits_quant``; fairseq's ``Wav2VecEncoder``
        calls the projection without a reader, so it is bound to it (``simulate: integer`` then
        requantizes the int32 accumulator onto the logits grid, as the integer model does); and the
        encoder's output is read by the projection's input quantizer, bound as the encoder's output
        reader (its last norm writes onto that grid, as the integer encoder does)."""
        from qswap.nn.fairseq.wav2vec2 import QWav2Vec2TransformerEncoder
        from qswap.nn.linear import QLinear

        proj = getattr(self.w2v_encoder, "proj", None)
        if isinstance(proj, QLinear):
            proj.bound_readers = [self.logits_quant]
            encoder = getattr(getattr(self.w2v_encoder, "w2v_model", None), "encoder", None)
            if isinstance(encoder, QWav2Vec2TransformerEncoder):
                encoder.output_readers = [proj.input_quant]

    def forward(self, **kwargs):
        """Wav2VecEncoder's output dict, its "encoder_out" (T, B, V) logits quantized (see
        ``_QuantizedLogits``: calibrating with the plain forward sets their grid). A batch shorter
        than the feature extractor's receptive field is a DataError (``check_receptive_field``),
        its float or quantized extractor alike."""
        from qswap.nn.fairseq.wav2vec2 import check_receptive_field
        if self.conv_strides is not None and isinstance(kwargs.get("source"), Tensor):
            check_receptive_field(kwargs["source"], self.conv_strides)
        out = super().forward(**kwargs)
        return {**out, "encoder_out": self.logits_quant(out["encoder_out"])}

    def to_integer_model(self) -> "IntegerWav2VecCtc":
        """The integer form of this CTC model (inference path): the integer wav2vec 2.0 model
        writing onto the CTC projection's input grid, the projection onto ``logits_quant``'s grid.
        Declared float steps: the waveform in, the logits codes out (greedy CTC takes their
        argmax; the log-softmax stays float)."""
        from qswap.errors import IntegerizeError
        from qswap.nn.fairseq.wav2vec2 import QWav2Vec2Model
        from qswap.quant.integer import Grid
        encoder = self.w2v_encoder
        if self.blank_weight != 0 or encoder.proj is None or not isinstance(encoder.w2v_model, QWav2Vec2Model):
            raise IntegerizeError("only a wav2vec 2.0 CTC model with a CTC projection and blank_weight 0 has an "
                                  "integer form so far")
        logits = Grid.of(self.logits_quant)
        return IntegerWav2VecCtc(encoder.w2v_model.to_integer(Grid.of(encoder.proj.input_quant)),
                                 encoder.proj.to_integer(logits), logits)

    def get_logits(self, net_output, normalize: bool = False) -> Tensor:
        """net_output["encoder_out"]: (T, B, V) -> (T, B, V) logits (log-probs if normalize)."""
        logits = self.logits_quant(net_output["encoder_out"])
        if self.blank_weight != 0:
            logits = logits.clone()
            if self.blank_mode == "add":
                logits[..., 0] += self.blank_weight
                logits = self.blank_logits_quant(logits)
            else:
                logits[..., 0] = self.blank_weight
        padding_mask = net_output["padding_mask"]  # (B, T)
        if padding_mask is not None and padding_mask.any():
            if logits.size(0) > padding_mask.size(1):
                net_output["padding_mask"] = padding_mask = F.pad(padding_mask, (1, 0), value=False)
            padded = padding_mask.T.unsqueeze(-1)  # (T, B, 1)
            blank = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
            blank[0] = True
            logits = logits.masked_fill(padded & ~blank, float("-inf")).masked_fill(padded & blank, 0.0)
        if normalize:
            logits = utils.log_softmax(logits.float(), dim=-1)
        return logits


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(subsample=ANY, embed_zero_point=Either(INT, TensorOf("int64")), stream_bits=INT,
              positions=Opt(TensorOf("int32")), padding_idx=INT,
              layers=ListOf(ANY), norm_in=Opt(Obj("Requant")), norms=ListOf(ANY),
              out_grid=Either(Obj("Grid"), ListOf(Obj("Grid"))), entry=Opt(ANY))
class IntegerS2TTransformerEncoder(FairseqEncoder):
    """An S2T encoder on integers: subsampler, positions, (the conformer's ``linear``: ``entry``),
    layers, final norm (or the readers of the last layer's stream). ``input`` (a ``QuantizeStep``)
    is its declared float step; ``forward`` is fairseq's encoder interface (float features in, an
    encoder_out dict of codes out), ``forward_codes`` the integer part."""

    def __init__(self, subsample, embed_zero_point: int | Tensor, stream_bits: int, positions: Optional[Tensor],
                 padding_idx: int, layers: list, norm_in, norms: list, out_grid, entry=None):
        super().__init__(None)
        from qswap.nn.fairseq.decoder import check_padding_idx
        from qswap.nn.integer_steps import QuantizeStep
        check_padding_idx(padding_idx, positions)
        _check_entry_codes(embed_zero_point, stream_bits)
        self.input = QuantizeStep(subsample.input_grid)
        self.subsample, self.layers, self.norms = subsample, torch.nn.ModuleList(layers), torch.nn.ModuleList(norms)
        self.embed_zero_point, self.stream_bits, self.padding_idx = embed_zero_point, stream_bits, padding_idx
        self.norm_in, self.out_grid, self.entry = norm_in, out_grid, entry  # entry: the conformer's linear
        self.register_buffer("positions", positions)  # (P, C) int32 on the stream grid, or None (rel_pos)

    def quantize_input(self, src_tokens: Tensor) -> Tensor:
        """Declared float step: features (B, T, C*D) onto the first conv's input grid."""
        return self.input(src_tokens)

    def forward_codes(self, codes: Tensor, src_lengths: Tensor) -> tuple:
        """codes (B, T, C*D) -> (output codes (T', B, C) (a list of them, one per output grid,
        when built with a list), padding mask (B, T'))."""
        from qswap.errors import IntegerizeError
        x, lengths = self.subsample(codes, src_lengths)  # (T', B, C) embed codes
        padding_mask = lengths_to_padding_mask(lengths)  # (B, T')
        stream = ((x.to(torch.int32) - self.embed_zero_point) << self.stream_bits).to(torch.int32)
        if self.positions is not None:
            positions = utils.make_positions(padding_mask, self.padding_idx)  # (B, T')
            if int(positions.max()) >= self.positions.shape[0]:
                raise IntegerizeError(f"{x.shape[0]} frames after subsampling exceed the integer position table "
                                      f"({self.positions.shape[0] - self.padding_idx - 1}); rebuild it longer")
            stream = stream + self.positions[positions.T]
        if self.entry is not None:
            stream = self.entry(stream)
        for layer in self.layers:
            stream = layer(stream, padding_mask)  # (T', B, C) int32
        normed = stream if self.norm_in is None else self.norm_in(stream)  # None: the last layer's norm
        outs = [norm(normed) for norm in self.norms]
        return (outs if isinstance(self.out_grid, list) else outs[0]), padding_mask

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, **unused) -> Dict[str, List[Tensor]]:
        """fairseq's encoder interface: {"encoder_out": codes (T', B, C) per decoder layer (its
        key_in grid), "encoder_padding_mask": [(B, T') bool]}."""
        outs, padding_mask = self.forward_codes(self.input(src_tokens), src_lengths)
        return {"encoder_out": outs if isinstance(outs, list) else [outs], "encoder_padding_mask": [padding_mask]}

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """Select beams (``new_order``: int64 batch indices) of the codes and the mask."""
        return {"encoder_out": [codes.index_select(1, new_order) for codes in encoder_out["encoder_out"]],
                "encoder_padding_mask": [m.index_select(0, new_order) for m in encoder_out["encoder_padding_mask"]]}

    def max_positions(self) -> int:
        return sys.maxsize  # the subsampled length is checked against the position table per call

    def dequantize_output(self, codes: Tensor) -> Tensor:
        """Build-time and test use: output codes (of a single output grid) to float."""
        return self.out_grid.dequantize(codes)


@serializable(encoder=ANY, decoder=ANY, float_steps={
    "quantize_input": "features (B, T, C*D) onto the first conv's input grid (encoder.subsample.input_grid)",
    "dequantize_output": "logits codes on decoder.out_grid to float, or without one the int32 accumulator times "
                         "decoder.output_projection.acc_scale (what beam search's log-softmax reads)"})
class IntegerS2TTransformerModel(FairseqEncoderDecoderModel):
    """An S2T transformer on integers, with fairseq's encoder-decoder interface: fairseq's
    SequenceGenerator decodes it (batch forward, incremental decoding with integer caches, beam
    reorder). ``forward`` returns (float logits, None) through the declared end step;
    ``get_normalized_probs`` is the float log-softmax on them (the declared step beam search
    needs); ``quantize_input`` / ``forward_codes`` / ``dequantize_output`` split the batch forward
    for ``qswap.honesty.integer.check_integer``.

    >>> imodel = qswap.integerize(qmodel)
    >>> SequenceGenerator([imodel], tgt_dict, beam_size=5).generate([imodel], sample)
    """

    def quantize_input(self, net_input: dict) -> dict:
        return dict(net_input, src_tokens=self.encoder.quantize_input(net_input["src_tokens"]))

    def forward_codes(self, net_input: dict) -> Tensor:
        memory, padding = self.encoder.forward_codes(net_input["src_tokens"], net_input["src_lengths"])
        return self.decoder.forward_codes(net_input["prev_output_tokens"], memory, padding)  # (B, T, V) codes

    def dequantize_output(self, acc: Tensor) -> Tensor:
        return self.decoder.dequantize_output(acc)

    def max_decoder_positions(self) -> int:
        return self.decoder.max_positions()


@serializable(w2v_model=Obj("IntegerWav2Vec2Model"), proj=Obj("IntegerLinear"), logits_grid=Obj("Grid"), float_steps={
    "quantize_input": "the waveform (B, S) onto the first conv's input grid (w2v_model.input_grid)",
    "dequantize_output": "the logits codes on logits_grid to float (what greedy CTC's argmax reads)"})
class IntegerWav2VecCtc(torch.nn.Module):
    """A wav2vec 2.0 CTC model on integers. ``forward`` takes fairseq's ``net_input`` and returns
    what the fake-quant model's forward returns for greedy CTC: ``{"encoder_out": (T, B, V) float
    logits, "padding_mask": (B, T) or None}`` (``qswap.integration.decode`` decodes it);
    ``quantize_input`` / ``forward_codes`` / ``dequantize_output`` split it for
    ``qswap.honesty.integer.check_integer``. Its declared float steps are the modules ``input``
    (a ``QuantizeStep``) and ``output`` (a ``DequantizeStep``), which the integer audit tells
    apart from the integer compute."""

    def __init__(self, w2v_model, proj, logits_grid):
        super().__init__()
        from qswap.nn.integer_steps import DequantizeStep, QuantizeStep
        self.w2v_model, self.proj, self.logits_grid = w2v_model, proj, logits_grid
        self.input, self.output = QuantizeStep(w2v_model.input_grid), DequantizeStep(logits_grid)

    def quantize_input(self, net_input: dict) -> dict:
        """Declared float step: the waveform (B, S) onto the first conv's input grid."""
        return dict(net_input, source=self.input(net_input["source"]))

    def forward_codes(self, net_input: dict) -> dict:
        x, padding_mask = self.w2v_model(net_input["source"], net_input.get("padding_mask"))  # (B, T, C)
        return {"encoder_out": self.proj(x.transpose(0, 1)), "padding_mask": padding_mask}  # (T, B, V) codes

    def dequantize_output(self, out: dict) -> dict:
        """Declared float step: the logits codes to float."""
        return dict(out, encoder_out=self.output(out["encoder_out"]))

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, **kwargs) -> dict:
        net_input = {"source": source, "padding_mask": padding_mask}
        return self.dequantize_output(self.forward_codes(self.quantize_input(net_input)))
