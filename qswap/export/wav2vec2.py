"""A calibrated qswap wav2vec 2.0 CTC model as one ONNX QDQ graph: ``source`` (B, S) float
waveforms and ``padding_mask`` (B, S) bool (True = padding) -> ``logits`` (T, B, V) on the
``logits_quant`` grid and ``logits_padding_mask`` (B, T) bool; greedy CTC reads the argmax of
the unpadded frames (``qswap.export.runtime.OrtCtcModel``).

The steps are the inference path of ``QWav2VecCtc`` (``QWav2Vec2Model.forward`` with
``features_only``, no time masking, then the encoder's CTC projection), written out because
two of fairseq's steps do not trace: ``pad_to_multiple`` (a Python float test on a traced
length; here a pad by the traced remainder) and ``index_put`` with a boolean index (here
``masked_fill``, the same values). ``crop_seq_to_multiple`` other than 1 is refused. The
padding mask enters as booleans and is always computed (fairseq drops an all-False one: the
values are the same); padded frames are zeroed before the positional convolution and masked
as keys in attention, so -inf never reaches a quantizer.

An utterance shorter than the feature extractor's receptive field (400 samples with fairseq's
default extractor) has a frame count of 0 or less: in a padded batch the graph masks all its
frames (``logits_padding_mask`` all True: greedy CTC gives it an empty transcript). Here the
graph and the fake-quant model differ: fairseq's mask construction
(``qswap.nn.fairseq.wav2vec2.feature_padding_mask``) marks the frame at ``length - 1``, a
negative index that wraps around, and masks almost none of that utterance's frames. The graph
keeps what the length says; the fake-quant model is left as fairseq computes it.

>>> export_ctc(qmodel, "ctc.onnx", wav2vec2_net_input())
>>> logits, padding = run_ctc(load_session("ctc.onnx"), source, padding_mask)
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qswap.errors import ExportError
from qswap.export.onnx import OPSET, check_calibrated, run_graph, trace_to_onnx
from qswap.nn.base import check_finite_input

INPUTS = ("source", "padding_mask")
OUTPUTS = ("logits", "logits_padding_mask")


class CtcGraph(nn.Module):
    """``QWav2VecCtc``'s inference path as a graph of tensors (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor):
        from qswap.nn.fairseq.wav2vec2 import output_lengths

        w2v = self.model.w2v_encoder.w2v_model
        features = w2v.feature_extractor(source)  # (B, C, T)
        x = w2v.layer_norm(features.transpose(1, 2))  # (B, T, C)
        lengths = output_lengths(w2v.conv_strides, (~padding_mask).long().sum(-1))  # (B,)
        frames = torch.arange(x.shape[1], device=x.device)  # (T,)
        # (B, T) bool; a length <= 0 (an utterance shorter than the receptive field) masks every
        # frame, where fairseq's construction wraps its index around and masks almost none (module docstring)
        padding = frames.unsqueeze(0) >= lengths.unsqueeze(1)
        if w2v.post_extract_proj is not None:
            x = w2v.post_extract_proj(x)
        x = self._encoder(w2v.encoder, x, padding, lengths)  # (T, B, C)
        proj = self.model.w2v_encoder.proj
        if proj is not None:
            x = proj(x)  # (T, B, V)
        return self.model.logits_quant(x), padding

    @staticmethod
    def _encoder(encoder: nn.Module, x: torch.Tensor, padding: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``QWav2Vec2TransformerEncoder.forward`` (eval, every layer): (B, T, C) -> (T, B, C). The
        layers run on the frames padded with zeros to a multiple of ``required_seq_len_multiple``,
        the added frames masked, as fairseq's ``pad_to_multiple`` does."""
        x = x.masked_fill(padding.unsqueeze(-1), 0.0)  # fairseq's index_put(x, padding_mask, 0)
        conv = encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        x = encoder.pos_residual_quant(x) + encoder.pos_conv_out_quant(conv)
        if not encoder.layer_norm_first:
            x = encoder.layer_norm(x)
        frames, multiple = x.shape[1], encoder.required_seq_len_multiple
        x = F.pad(x, (0, 0, 0, (multiple - frames % multiple) % multiple))  # (B, T'', C), T'' >= T
        padded = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T'')
        x = x.transpose(0, 1)  # (T'', B, C)
        for layer in encoder.layers:
            x, _ = layer(x, self_attn_padding_mask=padded, need_weights=False)
        x = x[:frames]  # (T, B, C)
        return encoder.layer_norm(x) if encoder.layer_norm_first else x


def check_ctc(qmodel: nn.Module) -> None:
    """ExportError unless ``qmodel`` is a wav2vec 2.0 CTC model the graph covers, naming what differs."""
    from qswap.nn.fairseq.models import QWav2VecCtc
    from qswap.nn.fairseq.wav2vec2 import QWav2Vec2Model, QWav2Vec2TransformerEncoder

    if not isinstance(qmodel, QWav2VecCtc):
        raise ExportError(f"exporting a {type(qmodel).__name__} as a CTC graph is not supported; the CTC "
                          f"export covers qswap's conversion of fairseq's Wav2VecCtc (qswap.convert it first)")
    w2v = qmodel.w2v_encoder.w2v_model
    problems = []
    if not isinstance(w2v, QWav2Vec2Model) or not isinstance(w2v.encoder, QWav2Vec2TransformerEncoder):
        problems.append(f"its encoder is a {type(w2v).__name__}, not qswap's wav2vec 2.0 model with the "
                        f"transformer encoder (conformer wav2vec 2.0 is not exported yet)")
    elif w2v.crop_seq_to_multiple != 1:
        problems.append(f"crop_seq_to_multiple is {w2v.crop_seq_to_multiple} (cropping frames to a multiple "
                        f"is not in the graph: use 1)")
    if qmodel.blank_weight != 0:
        problems.append(f"blank_weight is {qmodel.blank_weight} (the graph exports blank_weight 0: set "
                        f"it to 0, or decode with qswap eval on the checkpoint)")
    if problems:
        raise ExportError("cannot export this wav2vec 2.0 CTC model: " + "; ".join(problems))


def export_ctc(qmodel: nn.Module, path: "str | os.PathLike[str]", example: dict, opset: int = OPSET, *,
               allow_float: bool = False) -> Path:
    """Write ``qmodel`` (a calibrated qswap wav2vec 2.0 CTC model) to ``path`` as one graph with
    dynamic batch and sample axes; ``example`` is a ``net_input`` (``source``, ``padding_mask``)
    the trace runs on. The caller's model is not modified. ``allow_float``: a conversion with
    identity quantizers exports too (the float graph of the same structure)."""
    check_ctc(qmodel)
    if not allow_float:
        check_calibrated(qmodel)
    graph = CtcGraph(copy.deepcopy(qmodel)).eval()
    return trace_to_onnx(graph, (example["source"], example["padding_mask"]), path, INPUTS, OUTPUTS,
                         {"source": {0: "batch", 1: "samples"}, "padding_mask": {0: "batch", 1: "samples"},
                          "logits": {0: "frames", 1: "batch"}, "logits_padding_mask": {0: "batch", 1: "frames"}},
                         opset, sites=(graph.model, ""))


def run_ctc(session, source: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CTC graph's outputs as torch tensors: (T, B, V) logits and the (B, T) padding mask.
    Audio holding NaN or +-inf: a DataError, as the model it was exported from gives
    (``check_finite_input``)."""
    check_finite_input(source, "the exported CTC model")
    logits, padding = run_graph(session, list(OUTPUTS), {
        "source": source.detach().float().contiguous().numpy(),
        "padding_mask": padding_mask.detach().bool().contiguous().numpy()})
    return torch.from_numpy(logits), torch.from_numpy(padding)
