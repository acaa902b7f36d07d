"""wav2vec 2.0: the model's inference path, its transformer encoder and encoder layer.

* ``ConvFeatureExtractionModel`` is a container: its Conv1d / Fp32GroupNorm / Fp32LayerNorm /
  GELU children are converted by their own rules (``TransposeLast`` and ``SamePad`` only move
  data and are passthrough).
* The positional convolution is weight-normed: ``QConv1d`` computes ``g * v / ||v||`` from
  ``weight_g`` / ``weight_v`` and quantizes the result; ``x + pos_conv(x)`` adds quantized operands.
* ``Wav2Vec2Model``'s counterpart runs the fine-tuning/inference path (``features_only``):
  fairseq's forward also computes the feature penalty ``features.pow(2).mean()`` on float
  features even when it returns only features; the counterpart skips that unused value, and
  computes output lengths and the padding mask in integer arithmetic.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.models.wav2vec.wav2vec2 import (
    TransformerEncoder,
    TransformerSentenceEncoderLayer,
    TransformerSentenceEncoderWithAdapterLayer,
    Wav2Vec2Model,
)
from fairseq.modules import GradMultiply
from fairseq.models.wav2vec.utils import pad_to_multiple
from fairseq.utils import index_put

from qswap.errors import ConvertError
from qswap.io.serializable import ANY, INT, List, Obj, Opt, Tuple, serializable
from qswap.nn.base import QuantConfig, QuantModule, check_finite_input, quantizer, told
from qswap.nn.fairseq.config_expr import eval_config_expr
from qswap.nn.fairseq.conformer import QConformerWav2Vec2EncoderLayer
from qswap.nn.fairseq.chain import run_chain
from qswap.nn.fairseq.layers import activated, onto, onto_each, past, read_by, reader
from qswap.nn.simulate import add_onto, simulates
from qswap.nn.registry import register
from qswap.quant.direct_call import with_own_hooks
from qswap.quant.fake_quantize import consume

_MASK_ATTRS = ("mask_prob", "mask_selection", "mask_other", "mask_length", "no_mask_overlap",
               "mask_min_space", "mask_channel_prob", "mask_channel_before",
               "mask_channel_selection", "mask_channel_other", "mask_channel_length",
               "no_mask_channel_overlap", "mask_channel_min_space")


@register(TransformerSentenceEncoderLayer)
class QTransformerSentenceEncoderLayer(QuantModule):
    """wav2vec 2.0's encoder layer (post- or pre-norm): residual adds and activation on
    quantized operands."""

    converts_children = True
    sites = dict.fromkeys(("attn_residual", "attn_out", "ffn_act", "ffn_residual", "ffn_out"), "activation")

    def __init__(self, module: TransformerSentenceEncoderLayer, config: QuantConfig):
        super().__init__()
        self.embedding_dim, self.layer_norm_first = module.embedding_dim, module.layer_norm_first
        self.activation_fn = module.activation_fn
        for name in ("self_attn", "dropout1", "dropout2", "dropout3", "self_attn_layer_norm", "fc1",
                     "fc2", "final_layer_norm"):
            setattr(self, name, getattr(module, name))
        for site in self.sites:
            setattr(self, f"{site}_quant", quantizer(config, self.sites, site))
        self.simulate = config.simulate

    @classmethod
    def from_float(cls, module: TransformerSentenceEncoderLayer, config: QuantConfig):
        return cls(module, config)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x, read = activated(self.activation_fn, self.ffn_act_quant, onto(self.fc1, x, self.ffn_act_quant), self.fc2,
                            self.dropout2)
        return onto(self.fc2, self.dropout2(x), past(self.dropout3, self.ffn_out_quant), owned=True,
                    quantized=read)  # the activation's new tensor (or fc1's)

    def forward(self, x: torch.Tensor, self_attn_mask: Optional[torch.Tensor] = None,
                self_attn_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                att_args=None, residual: Optional[torch.Tensor] = None, next_readers: tuple = ()):
        """x: (T, B, C); self_attn_padding_mask: (B, T). Returns (T, B, C), (attn, ffn output).
        Each op is told the quantizer that reads its result, and the residual adds are the
        integer layer's onto their readers (``onto``, ``add_onto``: with ``simulate: integer``, as
        ``qswap.nn.fairseq.layers.integer_encoder_layer`` computes). For the encoder's loop:
        ``residual``: what the first residual add reads in place of ``x`` (the stream on its own
        grid); ``next_readers``: the quantizers that read the layer's output (the next layer's
        first reader and its ``attn_residual_quant``), which then gives a list of values, one each."""
        residual = x if residual is None else residual
        if self.layer_norm_first:
            x = onto(self.self_attn_layer_norm, x, reader(self.self_attn))
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                                 attn_mask=self_attn_mask if self.layer_norm_first else None,
                                 need_weights=False, **read_by(self.self_attn, past(self.dropout1, self.attn_out_quant)))
        readers = (reader(self.final_layer_norm), self.ffn_residual_quant) if self.layer_norm_first else (
            reader(self.self_attn_layer_norm),)
        x, residual = self._add("attn", self.attn_residual_quant(residual), consume(self.attn_out_quant, self.dropout1(x)),
                                readers)
        if not self.layer_norm_first:
            x, residual = onto_each(self.self_attn_layer_norm, x, (reader(self.fc1), self.ffn_residual_quant))
        layer_result = self._ffn(onto(self.final_layer_norm, x, reader(self.fc1)) if self.layer_norm_first else x)
        readers = tuple(next_readers) if self.layer_norm_first else (reader(self.final_layer_norm),)
        values = self._add("ffn", self.ffn_residual_quant(residual), self.ffn_out_quant(self.dropout3(layer_result)),
                           readers, every=True)
        if self.layer_norm_first:
            return (values if next_readers else values[0]), (attn, layer_result)
        x = values[0]
        if next_readers:
            return onto_each(self.final_layer_norm, x, next_readers), (attn, layer_result)
        return self.final_layer_norm(x), (attn, layer_result)

    def _add(self, part: str, residual: torch.Tensor, out: torch.Tensor, readers: tuple, every: bool = False):
        """The residual add ``part`` as (the value ``readers[0]`` reads, the value the last reader
        reads), or with ``every`` a list of one value per reader (at least one): the integer
        layer's rescaled add onto each reader's grid (``add_onto``), or the float sum, which each
        reader rounds."""
        values = add_onto(self, f"_integer_{part}_add", residual, getattr(self, f"{part}_residual_quant"), out,
                          getattr(self, f"{part}_out_quant"), readers)
        if values is None:
            values = [residual + out] * max(len(readers), 1)
        return values if every else (values[0], values[-1])

    def to_integer(self, stream_scale: float | torch.Tensor) -> torch.nn.Module:
        """The integer form of this (post- or pre-norm) layer, inference only
        (``qswap.nn.fairseq.layers.integer_encoder_layer``)."""
        from qswap.nn.fairseq.layers import integer_encoder_layer
        return integer_encoder_layer(self, stream_scale, self.layer_norm_first)


_STREAM_LAYERS = (QTransformerSentenceEncoderLayer, QConformerWav2Vec2EncoderLayer)  # layers that thread the stream


@register(TransformerEncoder)
class QWav2Vec2TransformerEncoder(QuantModule):
    """wav2vec 2.0's transformer encoder: ``x + pos_conv(x)`` on quantized operands."""

    converts_children = True
    sites = {"pos_residual": "activation", "pos_conv_out": "activation"}

    def __init__(self, module: TransformerEncoder, config: QuantConfig):
        super().__init__()
        self.dropout, self.embedding_dim = module.dropout, module.embedding_dim
        self.required_seq_len_multiple = module.required_seq_len_multiple
        self.layer_norm_first, self.layerdrop = module.layer_norm_first, module.layerdrop
        self.pos_conv, self.layers, self.layer_norm = module.pos_conv, module.layers, module.layer_norm
        self.pos_residual_quant = quantizer(config, self.sites, "pos_residual")
        self.pos_conv_out_quant = quantizer(config, self.sites, "pos_conv_out")
        self.simulate = config.simulate
        # the quantizer that reads the encoder's output where it lives outside it (the CTC
        # projection's input: ``QWav2VecCtc.bind_readers``); empty: none is known
        self.output_readers: list = []

    @classmethod
    def from_float(cls, module: TransformerEncoder, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, layer=None,
                corpus_key=None, conv_input: Optional[torch.Tensor] = None):
        """x: (B, T, C); ``conv_input``: what the positional conv reads in place of ``x`` (the input
        on its own grid: ``QWav2Vec2Model.encoder_readers``)."""
        x, layer_results = self.extract_features(x, padding_mask, layer, corpus_key=corpus_key, conv_input=conv_input)
        if self.layer_norm_first and layer is None:  # onto its reader's grid, as the integer form writes
            out = self.output_readers[0] if self.output_readers and self._streams(layer, corpus_key) is not None else None
            x = told(self.layer_norm, x, out)
        return x, layer_results

    def _pos_conv(self, x: torch.Tensor) -> torch.Tensor:
        """fairseq's positional conv on x (B, C, T), each op told the quantizer that reads its result
        (``run_chain``); another container as it is (its hooks: ``with_own_hooks``)."""
        y = run_chain(self.pos_conv, x, self.pos_conv_out_quant)
        return self.pos_conv.forward(x) if y is None else y

    def extract_features(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                         tgt_layer: Optional[int] = None, min_layer: int = 0, corpus_key=None,
                         conv_input: Optional[torch.Tensor] = None):
        """x: (B, T, C); padding_mask: (B, T). Returns (B, T, C) and per-layer results."""
        conv_input = x if conv_input is None else conv_input
        if padding_mask is not None:
            x, conv_input = index_put(x, padding_mask, 0), index_put(conv_input, padding_mask, 0)
        x_conv = with_own_hooks(self.pos_conv, (conv_input.transpose(1, 2),), self._pos_conv).transpose(1, 2)
        streams = self._streams(tgt_layer, corpus_key)  # the quantizers that read each layer's output, or None
        first = self._first_readers() if streams is not None else ()
        a, b = self.pos_residual_quant(x), self.pos_conv_out_quant(x_conv)
        values = add_onto(self, "_integer_pos_add", a, self.pos_residual_quant, b, self.pos_conv_out_quant,
                          first if self.layer_norm_first else (reader(self.layer_norm),))
        x = a + b if values is None else values[0]
        residual = values[-1] if values is not None and self.layer_norm_first else None
        if not self.layer_norm_first:
            if first:
                x, residual = onto_each(self.layer_norm, x, first)
            else:
                x = self.layer_norm(x)
        x, pad_length = pad_to_multiple(x, self.required_seq_len_multiple, dim=-2, value=0)
        if residual is not None:
            residual = pad_to_multiple(residual, self.required_seq_len_multiple, dim=-2, value=0)[0].transpose(0, 1)
        if pad_length > 0 and padding_mask is None:
            padding_mask = x.new_zeros((x.size(0), x.size(1)), dtype=torch.bool)
            padding_mask[:, -pad_length:] = True
        else:
            padding_mask, _ = pad_to_multiple(padding_mask, self.required_seq_len_multiple, dim=-1, value=True)
        x = F.dropout(x, p=self.dropout, training=self.training).transpose(0, 1)  # (T, B, C)
        layer_results, r = [], None
        for i, layer in enumerate(self.layers):
            if not self.training or self.layerdrop == 0 or np.random.random() > self.layerdrop:
                adapter = corpus_key is not None and isinstance(layer, TransformerSentenceEncoderWithAdapterLayer)
                extra = {"corpus_key": corpus_key} if adapter else {}
                if streams is not None:
                    extra.update(residual=residual, next_readers=streams[i])
                x, (z, lr) = layer(x, self_attn_padding_mask=padding_mask, need_weights=False, **extra)
                if streams is not None:  # the next layer's two inputs, or its plain x where a reader is missing
                    x, residual = (x[0], x[-1]) if streams[i] else (x, None)
                if i >= min_layer:
                    layer_results.append((x, z, lr))
            if i == tgt_layer:
                r = x
                break
        x = (r if r is not None else x).transpose(0, 1)  # (B, T, C)
        if pad_length > 0:
            x = x[:, :-pad_length]
            layer_results = [(a[:-pad_length], b if b is None else b[:-pad_length], c[:-pad_length])
                             for a, b, c in layer_results]
        return x, layer_results

    def _first_readers(self) -> tuple:
        """The two quantizers that read the first layer's input (``_input_readers``), or () where
        one is missing."""
        readers = _input_readers(self.layers[0])
        return readers if None not in readers else ()

    def _streams(self, tgt_layer: Optional[int], corpus_key) -> Optional[list]:
        """With ``simulate: integer`` at inference, every layer a ``QTransformerSentenceEncoderLayer``
        or a ``QConformerWav2Vec2EncoderLayer`` and all of them run: the quantizers that read each
        layer's output (the next layer's two, ``_input_readers``; after the last, pre-norm: the
        encoder's norm; post-norm: the encoder's output reader, the CTC projection's input,
        ``output_readers``), for the layers' ``next_readers``; else None."""
        layers = list(self.layers)
        if not (layers and simulates(self) and not self.training and not torch.is_grad_enabled() and tgt_layer is None
                and corpus_key is None and all(isinstance(m, _STREAM_LAYERS) for m in layers)):
            return None
        nexts = [_input_readers(layers[i + 1]) for i in range(len(layers) - 1)]
        last = (reader(self.layer_norm),) if self.layer_norm_first else tuple(self.output_readers[:1])
        return [readers if None not in readers else () for readers in nexts + [last]]

    def to_integer(self, stream_scale: float | torch.Tensor, out) -> "IntegerWav2Vec2TransformerEncoder":
        """The integer form reading an int32 stream (B, T, C) on ``stream_scale`` (the feature
        projection's accumulator) and writing codes of ``out`` (the CTC projection's input grid):
        padded frames zeroed, the positional conv chain (weight-normed conv, SamePad, GELU table)
        onto ``pos_conv_out``'s grid, ``x + pos_conv(x)`` as a rescaled sum, the encoder norm
        (post-norm: first, as the stream; pre-norm: last, onto ``out``), the layers."""
        from qswap.errors import IntegerizeError
        from qswap.nn.fairseq.chain import IntegerChain, integer_chain
        from qswap.nn.fairseq.layers import StreamOut
        from qswap.nn.simulate import stream_to
        from qswap.quant.integer import AddParams, Grid, add_input_bits
        if not (isinstance(self.pos_conv, torch.nn.Sequential) and len(self.pos_conv) == 3):
            raise IntegerizeError("only the single weight-normed positional conv (pos_conv_depth=1, no batch "
                                  "norm) has an integer form so far")
        first = next(m for m in self.pos_conv if hasattr(m, "input_quant"))
        residual, conv_out = Grid.of(self.pos_residual_quant), Grid.of(self.pos_conv_out_quant)
        add = AddParams.build(residual.scale, conv_out.scale, input_bits=add_input_bits(residual, conv_out))
        scale = add.sum_scale
        norm_in = norm = None
        if not self.layer_norm_first:
            norm_in, norm = stream_to(scale, self.layer_norm.input_quant), self.layer_norm.to_integer(None)
            scale = norm.stream_scale
        layers = []
        for layer in self.layers:
            layers.append(layer.to_integer(scale))
            scale = layers[-1].stream_scale
        if self.layer_norm_first:
            final = IntegerChain([StreamOut(stream_to(scale, self.layer_norm.input_quant)),
                                  self.layer_norm.to_integer(out)])
        else:
            final = StreamOut(stream_to(scale, out))
        return IntegerWav2Vec2TransformerEncoder(
            stream_to(stream_scale, self.pos_residual_quant), stream_to(stream_scale, first.input_quant),
            integer_chain(self.pos_conv, conv_out), add, (residual.zero_point, conv_out.zero_point), norm_in, norm,
            layers, final, self.required_seq_len_multiple)


def _input_readers(layer: torch.nn.Module) -> tuple:
    """The two quantizers that read a layer's input: a transformer layer's first reader (pre-norm:
    its attention norm's; post-norm: the attention's) and ``attn_residual_quant``; a conformer
    layer's first feed-forward norm and ``ffn1_residual_quant`` (the integer layers' readers)."""
    if isinstance(layer, QConformerWav2Vec2EncoderLayer):
        return reader(layer.ffn1.layer_norm), layer.ffn1_residual_quant
    return (reader(layer.self_attn_layer_norm if layer.layer_norm_first else layer.self_attn),
            layer.attn_residual_quant)


def _conv_strides(conv_feature_layers: str) -> tuple[tuple[int, int], ...]:
    """((kernel, stride), ...) of fairseq's ``conv_feature_layers`` expression [(dim, k, stride)]."""
    layers = eval_config_expr(conv_feature_layers, "conv_feature_layers")
    if not (isinstance(layers, list) and layers and all(
            isinstance(layer, (tuple, list)) and len(layer) == 3 and all(isinstance(v, int) for v in layer)
            for layer in layers)):
        raise ConvertError(f"config field 'conv_feature_layers' = {conv_feature_layers!r} must be a "
                           "non-empty list of (dim, kernel, stride) integer triples")
    return tuple((kernel, stride) for _, kernel, stride in layers)


@register(Wav2Vec2Model)
class QWav2Vec2Model(QuantModule):
    """wav2vec 2.0's inference path (what ``Wav2VecEncoder`` runs: ``extract_features``);
    time masking for fine-tuning is fairseq's own ``apply_mask``. The pretraining objective
    (quantizer targets, negatives, ``features_only=False``) is not converted."""

    converts_children = True
    param_quantizers = {"mask_emb": None}  # fills masked frames in fine-tuning only
    apply_mask = Wav2Vec2Model.apply_mask

    def __init__(self, module: Wav2Vec2Model, config: QuantConfig):
        super().__init__()
        self.cfg, self.embed = module.cfg, module.embed
        self.conv_strides = _conv_strides(module.cfg.conv_feature_layers)  # ((kernel, stride), ...)
        self.crop_seq_to_multiple, self.feature_grad_mult = module.crop_seq_to_multiple, module.feature_grad_mult
        for name in _MASK_ATTRS:
            setattr(self, name, getattr(module, name))
        self.mask_emb, self.post_extract_proj = module.mask_emb, module.post_extract_proj
        for name, child in module.named_children():  # every child, so state_dict keys are kept
            setattr(self, name, child)

    @classmethod
    def from_float(cls, module: Wav2Vec2Model, config: QuantConfig) -> "QWav2Vec2Model":
        if module.input_quantizer is not None:
            raise ConvertError("wav2vec 2.0 with quantize_input (a Gumbel input quantizer) is not supported")
        return cls(module, config)

    def _output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return output_lengths(self.conv_strides, input_lengths)

    def _feature_padding_mask(self, padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
        return feature_padding_mask(self.conv_strides, padding_mask, frames)

    def to_integer(self, out) -> "IntegerWav2Vec2Model":
        """The integer form of the inference path (``features_only``, no masking) writing codes of
        ``out`` (the CTC projection's input grid): the feature extractor's convs, norms and GELU
        tables (``integer_chain``), the feature LayerNorm onto the feature projection's input
        grid, the projection's int32 accumulator as the encoder's input stream (without a
        projection: the norm's accumulator, ``proj`` None), the encoder."""
        from qswap.nn.fairseq.chain import integer_chain
        from qswap.quant.integer import Grid
        if self.post_extract_proj is None:  # the norm's accumulator is the encoder's input stream
            norm = self.layer_norm.to_integer(None)
            proj, scale = None, norm.stream_scale
        else:
            norm = self.layer_norm.to_integer(Grid.of(self.post_extract_proj.input_quant))
            proj = self.post_extract_proj.to_integer(None)
            scale = proj.stream_scale
        features = integer_chain(self.feature_extractor.conv_layers, Grid.of(self.layer_norm.input_quant))
        first = next(m for m in self.feature_extractor.modules() if hasattr(m, "input_quant"))
        return IntegerWav2Vec2Model(Grid.of(first.input_quant), features, self.conv_strides, self.crop_seq_to_multiple,
                                    norm, proj, self.encoder.to_integer(scale, out))

    def encoder_readers(self) -> tuple:
        """With ``simulate: integer`` at inference: the two quantizers that read the encoder's input
        (its ``pos_residual_quant`` and the positional conv's first input quantizer), where the
        op before them (the feature projection, else the feature LayerNorm) writes onto each as
        the integer model requantizes its accumulator; else ()."""
        from qswap.nn.linear import QLinear
        from qswap.nn.norm import QLayerNorm
        encoder, source = self.encoder, self.post_extract_proj if self.post_extract_proj is not None else self.layer_norm
        if not (isinstance(encoder, QWav2Vec2TransformerEncoder) and isinstance(source, (QLinear, QLayerNorm))
                and simulates(encoder) and not self.training and not torch.is_grad_enabled()):
            return ()
        first = next((m.input_quant for m in encoder.pos_conv.modules() if hasattr(m, "input_quant")), None)
        return () if first is None else (encoder.pos_residual_quant, first)

    def _features(self, source: torch.Tensor) -> torch.Tensor:
        """fairseq's ``ConvFeatureExtractionModel.forward``: (B, samples) -> (B, C, T), each op told
        the quantizer that reads its result (``run_chain``, the last the feature LayerNorm's). Audio
        holding NaN or +-inf: a DataError, as the integer model's (``check_finite_input``)."""
        check_finite_input(source)
        return with_own_hooks(self.feature_extractor, (source,), self._extract)

    def _extract(self, source: torch.Tensor) -> torch.Tensor:
        x = run_chain(self.feature_extractor.conv_layers, source.unsqueeze(1), reader(self.layer_norm))
        return self.feature_extractor.forward(source) if x is None else x  # its hooks: ``with_own_hooks``

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                mask: bool = True, features_only: bool = False, layer=None, mask_indices=None,
                mask_channel_indices=None, padding_count=None, corpus_key=None):
        """source: (B, samples); padding_mask: (B, samples). Returns fairseq's features_only dict."""
        if not features_only:
            raise NotImplementedError("the converted wav2vec 2.0 model runs the features_only path "
                                      "(fine-tuning / inference); the pretraining objective is not converted")
        if self.feature_grad_mult > 0:
            features = self._features(source)  # (B, C, T)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
        else:
            with torch.no_grad():
                features = self._features(source)
        # the encoder's input as the positional conv and its residual each read it (``encoder_readers``):
        # written by the feature projection, else by the feature LayerNorm itself
        entry = () if mask else self.encoder_readers()
        conv_input = None
        if entry and self.post_extract_proj is None:
            features, conv_input = onto_each(self.layer_norm, features.transpose(1, 2), entry)  # (B, T, C)
        else:
            features = onto(self.layer_norm, features.transpose(1, 2), reader(self.post_extract_proj))
        unmasked_features = features.clone()
        if padding_mask is not None and padding_mask.any():
            padding_mask = self._feature_padding_mask(padding_mask, features.size(1))
        else:
            padding_mask = None
        drop = features.size(1) % self.crop_seq_to_multiple
        if drop != 0:
            features, unmasked_features = features[:, :-drop], unmasked_features[:, :-drop]
            conv_input = None if conv_input is None else conv_input[:, :-drop]
            padding_mask = None if padding_mask is None else padding_mask[:, :-drop]
        if self.post_extract_proj is not None:
            if entry:
                features, conv_input = onto_each(self.post_extract_proj, features, entry)
            else:
                features = self.post_extract_proj(features)
        features = self.dropout_input(features)
        unmasked_features = self.dropout_features(unmasked_features)
        x = features
        if mask:
            x, _ = self.apply_mask(features, padding_mask, mask_indices=mask_indices,
                                   mask_channel_indices=mask_channel_indices)
        extra = {} if conv_input is None else {"conv_input": conv_input}
        x, layer_results = self.encoder(x, padding_mask=padding_mask, layer=layer, corpus_key=corpus_key, **extra)
        return {"x": x, "padding_mask": padding_mask, "features": unmasked_features,
                "layer_results": layer_results}

    def extract_features(self, source, padding_mask, mask=False, layer=None, corpus_key=None):
        return self(source, padding_mask, mask=mask, features_only=True, layer=layer,
                    corpus_key=corpus_key)


def receptive_field(conv_strides: tuple) -> int:
    """The fewest samples the feature extractor turns into one frame ((kernel, stride), ...): a
    last layer's kernel, back through each stride (400 samples, 25 ms, for wav2vec 2.0 base)."""
    need = 1
    for kernel, stride in reversed(conv_strides):
        need = (need - 1) * stride + kernel
    return need


def check_receptive_field(source: torch.Tensor, conv_strides: tuple) -> None:
    """A DataError where a waveform batch (B, S) is shorter than the feature extractor's receptive
    field (every utterance in it shorter: a padded batch is as long as its longest), whose first
    convolution would fail with a raw RuntimeError. Not while an export traces the model."""
    if torch.jit.is_tracing() or source.dim() < 2:
        return
    need = receptive_field(conv_strides)
    if source.size(-1) < need:
        from qswap.errors import DataError
        raise DataError(f"audio of {source.size(-1)} samples is shorter than the model's feature extractor reads "
                        f"for one frame ({need} samples, {need / 16:.0f} ms at 16 kHz); drop clips that short from "
                        f"the manifest, or batch them with longer ones")


def output_lengths(conv_strides: tuple, input_lengths: torch.Tensor) -> torch.Tensor:
    """floor((L - k) / stride + 1) per conv layer ((kernel, stride), ...), in integers."""
    for kernel, stride in conv_strides:
        input_lengths = torch.div(input_lengths - kernel, stride, rounding_mode="floor") + 1
    return input_lengths


def feature_padding_mask(conv_strides: tuple, padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, samples) padding -> (B, frames) padding, as fairseq builds it."""
    lengths = output_lengths(conv_strides, (1 - padding_mask.long()).sum(-1))
    marks = torch.zeros((padding_mask.size(0), frames), dtype=torch.long, device=padding_mask.device)
    marks[torch.arange(marks.size(0), device=marks.device), lengths - 1] = 1
    return (1 - marks.flip([-1]).cumsum(-1).flip([-1])).bool()


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(residual_in=Obj("Requant"), conv_in=Obj("Requant"), pos_conv=Obj("IntegerChain"), add=Obj("AddParams"),
              zero_points=Tuple(INT, INT), norm_in=Opt(Obj("Requant")), norm=Opt(Obj("IntegerLayerNorm")),
              layers=List(ANY), final=ANY, seq_multiple=INT)
class IntegerWav2Vec2TransformerEncoder(torch.nn.Module):
    """wav2vec 2.0's transformer encoder on integers: int32 stream (B, T, C) in, codes out."""

    def __init__(self, residual_in, conv_in, pos_conv, add, zero_points: tuple, norm_in, norm, layers: list, final,
                 seq_multiple: int):
        super().__init__()
        self.residual_in, self.conv_in, self.pos_conv, self.add = residual_in, conv_in, pos_conv, add
        self.zero_points, self.seq_multiple, self.final = zero_points, seq_multiple, final
        self.norm_in, self.norm = norm_in, norm  # post-norm: the encoder norm before the layers; else None
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, stream: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """stream: (B, T, C) int32; padding_mask: (B, T) bool or None. Returns (B, T, C) codes."""
        from qswap.quant.integer import rescaled_sum
        if padding_mask is not None:
            stream = stream.masked_fill(padding_mask.unsqueeze(-1), 0)  # fairseq's index_put(x, mask, 0)
        conv = self.pos_conv(self.conv_in(stream).transpose(1, 2)).transpose(1, 2)  # (B, T, C) pos_conv_out codes
        stream = rescaled_sum(self.residual_in(stream), self.zero_points[0], conv, self.zero_points[1], self.add)
        if self.norm is not None:
            stream = self.norm(self.norm_in(stream))  # post-norm: the norm's accumulator
        frames = stream.size(1)
        pad = (-frames) % self.seq_multiple
        if pad:
            stream = torch.nn.functional.pad(stream, (0, 0, 0, pad))  # zeros: the value 0
            extra = torch.ones(stream.size(0), pad, dtype=torch.bool)
            padding_mask = torch.cat([torch.zeros(stream.size(0), frames, dtype=torch.bool)
                                      if padding_mask is None else padding_mask, extra], dim=1)
        stream = stream.transpose(0, 1)  # (T, B, C)
        for layer in self.layers:
            stream = layer(stream, padding_mask)
        return self.final(stream.transpose(0, 1)[:, :frames])  # (B, T, C)


@serializable(input_grid=Obj("Grid"), features=Obj("IntegerChain"), conv_strides=List(Tuple(INT, INT), tuple_=True),
              crop_multiple=INT, feature_norm=Obj("IntegerLayerNorm"), proj=Opt(Obj("IntegerLinear")),
              encoder=Obj("IntegerWav2Vec2TransformerEncoder"))
class IntegerWav2Vec2Model(torch.nn.Module):
    """wav2vec 2.0's inference path on integers: waveform codes (B, S) in, codes (B, T, C) out
    (``proj`` None: the feature norm's accumulator is the encoder's input stream)."""

    def __init__(self, input_grid, features, conv_strides: tuple, crop_multiple: int, feature_norm, proj, encoder):
        super().__init__()
        self.input_grid, self.features, self.conv_strides = input_grid, features, conv_strides
        self.crop_multiple, self.feature_norm, self.proj, self.encoder = crop_multiple, feature_norm, proj, encoder

    def forward(self, codes: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> tuple:
        """codes: (B, S) on ``input_grid``; padding_mask: (B, S) bool or None. Returns (codes (B, T, C),
        padding mask (B, T) or None)."""
        check_receptive_field(codes, self.conv_strides)
        x = self.features(codes.unsqueeze(1)).transpose(1, 2)  # (B, T, C) feature norm's input codes
        if padding_mask is not None and padding_mask.any():
            padding_mask = feature_padding_mask(self.conv_strides, padding_mask, x.size(1))
        else:
            padding_mask = None
        drop = x.size(1) % self.crop_multiple
        if drop:
            x = x[:, :-drop]
            padding_mask = None if padding_mask is None else padding_mask[:, :-drop]
        stream = self.feature_norm(x)  # (B, T, C) int32 accumulator without a projection
        if self.proj is not None:
            stream = self.proj(stream)  # (B, T, C) int32 accumulator
        return self.encoder(stream, padding_mask), padding_mask
