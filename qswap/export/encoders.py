"""The S2T encoders qswap exports, as graphs of tensors: (B, T, F) features and (B,) lengths ->
the encoder output (T', B, E) and its padding mask (B, T') as booleans (True = padding).

==========================  =====================================================================
qswap encoder               graph
==========================  =====================================================================
QS2TTransformerEncoder      ``EncoderGraph``: subsampler, scaled features + sinusoidal positions,
                            transformer layers, final LayerNorm
QS2TConformerEncoder        ``ConformerEncoderGraph``: subsampler, scaled features (+ positions
                            for ``abs``), ``linear``, conformer layers; ``rel_pos`` hands its
                            constant table to every attention, ``rope`` rotates inside it
==========================  =====================================================================

The steps are the counterparts' ``_forward`` (eval mode, no intermediate states) but for the
padding mask, which fairseq sizes with ``max(lengths).item()`` (a constant in a trace): here it
is sized by the subsampled time axis, the same in every batch fairseq accepts (the longest
utterance fills the padded time axis). Sinusoidal and rel_pos tables are exported at their
current size (``max_source_positions``): longer inputs are outside the graph, as they are
outside the model's trained range.
"""
from __future__ import annotations

import torch
from torch import nn

from qswap.errors import ExportError


def _subsampled(encoder: nn.Module, src_tokens: torch.Tensor, src_lengths: torch.Tensor):
    """The subsampler's (T', B, C) output and the (B, T') boolean padding mask."""
    x, lengths = encoder.subsample(src_tokens, src_lengths)  # (T', B, C), (B,)
    frames = torch.arange(x.shape[0], device=x.device)  # (T',)
    return x, frames.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T') bool


class EncoderGraph(nn.Module):
    """qswap's S2T transformer encoder counterpart as a graph (``QS2TTransformerEncoder._forward``)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor):
        enc = self.encoder
        x, padding = _subsampled(enc, src_tokens, src_lengths)
        x = enc.embed_scale * enc.embed_quant(x)
        x = x + enc.embed_positions(padding).transpose(0, 1)  # (T', B, C)
        for layer in enc.transformer_layers:
            x = layer(x, padding)
        if enc.layer_norm is not None:
            x = enc.layer_norm(x)
        return x, padding


class ConformerEncoderGraph(nn.Module):
    """qswap's S2T conformer encoder counterpart as a graph (``QS2TConformerEncoder._forward``).

    ``rope``: fairseq's rotary attention caches its cos/sin tables for the longest input seen and
    quantizes the cached table; the graph holds them for ``ROPE_POSITIONS`` (2048) subsampled
    frames, as the integer form does: the fake-quant model after it has seen an input that long
    (onnxruntime rejects a longer input, the table slice coming out short: ``run_graph`` raises
    ExportError).
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        from qswap.nn.fairseq.espnet import ROPE_POSITIONS

        self.encoder = encoder
        if encoder.pos_enc_type == "rope":
            for layer in encoder.conformer_layers:  # fill each table cache once, on the copy
                layer.self_attn.rotary_emb(torch.zeros(1), seq_len=ROPE_POSITIONS)

    def forward(self, src_tokens: torch.Tensor, src_lengths: torch.Tensor):
        enc = self.encoder
        x, padding = _subsampled(enc, src_tokens, src_lengths)
        x = enc.embed_scale * enc.embed_quant(x)
        positions = None
        if enc.pos_enc_type == "rel_pos":
            positions = enc.embed_positions(x)  # (2T'-1, 1, C), a slice of the constant table
        elif enc.pos_enc_type != "rope":
            x = x + enc.embed_positions(padding).transpose(0, 1)  # (T', B, C)
        x = enc.linear(x)
        for layer in enc.conformer_layers:
            x, _ = layer(x, padding, positions)
        return x, padding


def check_encoder(encoder: "nn.Module | None") -> None:
    """ExportError for an encoder the export does not cover (None: the model has none), naming
    what to do; the check ``encoder_graph`` makes, for a caller that reads the encoder first."""
    from fairseq.models.speech_to_text.s2t_conformer import S2TConformerEncoder
    from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerEncoder

    from qswap.nn.fairseq.models import QS2TConformerEncoder, QS2TTransformerEncoder
    from qswap.nn.fairseq.subsample import QConv1dSubsampler

    if not isinstance(encoder, (QS2TTransformerEncoder, QS2TConformerEncoder)):
        if isinstance(encoder, (S2TTransformerEncoder, S2TConformerEncoder)):
            # fairseq's own, float: a recipe that converts nothing (fp32), or no conversion at all
            raise ExportError(f"the model's encoder is fairseq's float {type(encoder).__name__}, not qswap's "
                              f"conversion of it: convert the model with a recipe that quantizes it (qswap.convert: "
                              f"w8a8, w4a8...) and calibrate it, then export (the float graph of the same structure: "
                              f"a recipe whose defaults are 'weight: null' and 'activation: null', "
                              f"qswap.export.package.NO_QUANT, exported with allow_float=True)")
        what = "a model without an encoder" if encoder is None else f"a {type(encoder).__name__} encoder"
        raise ExportError(f"exporting {what} is not supported yet; the ONNX export covers qswap's conversions "
                          f"of fairseq's S2TTransformerEncoder and S2TConformerEncoder models and wav2vec 2.0 CTC "
                          f"(convert the model with qswap.convert first)")
    if not isinstance(encoder.subsample, QConv1dSubsampler):
        raise ExportError(f"exporting an encoder with a {type(encoder.subsample).__name__} subsampler is not "
                          f"supported; the export covers conv_version s2t_transformer (Conv1dSubsampler)")


def encoder_graph(encoder: nn.Module) -> nn.Module:
    """The graph of a converted S2T encoder (pass a copy: a rope encoder's table cache is filled);
    ExportError for an encoder the export does not cover, naming what to do (``check_encoder``)."""
    from qswap.nn.fairseq.models import QS2TTransformerEncoder

    check_encoder(encoder)
    if isinstance(encoder, QS2TTransformerEncoder):
        return EncoderGraph(encoder)
    return ConformerEncoderGraph(encoder)
