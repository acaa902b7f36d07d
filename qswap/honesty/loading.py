"""Synthetic inputs for ``qswap audit``: a net_input shaped for the model (random fbank
features or a waveform), for auditing without a data directory.

The audit loads its checkpoint and reads data subsets through ``qswap.integration.data``, the
same path every other command uses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qswap.errors import AuditError

SYNTHETIC_FRAMES = 120  # fbank frames (1.2 s) of the longest synthetic utterance
SYNTHETIC_SAMPLES = 16000  # waveform samples (1 s at 16 kHz)
SYNTHETIC_TOKENS = 8


def synthetic_net_input(model: nn.Module, count: int, cfg: Any = None, seed: int = 0) -> dict:
    """Random inputs shaped for the model: fbank features for S2T models (``src_tokens``,
    ``src_lengths``, ``prev_output_tokens``), a waveform for wav2vec 2.0 CTC (``source``,
    ``padding_mask``). The second and later utterances are shorter, so padding is exercised."""
    if count < 1:
        raise AuditError(f"--synthetic needs at least 1 utterance, got {count}")
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "w2v_encoder"):
        return _waveform(count, g)
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "subsample"):
        raise AuditError(f"cannot make synthetic inputs for {type(model).__name__}; pass "
                         f"--data DIR --subset S instead")
    batch = _features(count, _feature_dim(encoder, cfg), g)
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "dictionary"):
        vocab = len(decoder.dictionary)
        prev = torch.randint(4, max(vocab, 5), (count, SYNTHETIC_TOKENS), generator=g)
        prev[:, 0] = decoder.dictionary.eos()
        batch["prev_output_tokens"] = prev
    return batch


def _lengths(count: int, longest: int) -> torch.Tensor:
    return torch.tensor([longest - (longest // 4) * min(i, 1) for i in range(count)])


def _features(count: int, dim: int, g: torch.Generator) -> dict:
    lengths = _lengths(count, SYNTHETIC_FRAMES)
    src = torch.randn(count, SYNTHETIC_FRAMES, dim, generator=g)
    for i, n in enumerate(lengths.tolist()):
        src[i, n:] = 0.0
    return {"src_tokens": src, "src_lengths": lengths}


def _waveform(count: int, g: torch.Generator) -> dict:
    lengths = _lengths(count, SYNTHETIC_SAMPLES)
    source = 0.1 * torch.randn(count, SYNTHETIC_SAMPLES, generator=g)
    padding = torch.arange(SYNTHETIC_SAMPLES)[None, :] >= lengths[:, None]  # (B, S) True = pad
    return {"source": source.masked_fill(padding, 0.0), "padding_mask": padding}


def _feature_dim(encoder: nn.Module, cfg: Any) -> int:
    model_cfg = getattr(cfg, "model", None)
    feat = getattr(model_cfg, "input_feat_per_channel", None)
    if feat is not None:
        return int(feat) * int(getattr(model_cfg, "input_channels", 1) or 1)
    conv = next((m for m in encoder.subsample.modules() if getattr(m, "weight", None) is not None
                 and getattr(m, "weight").dim() == 3), None)
    if conv is None:
        raise AuditError("cannot tell the model's input feature size; pass --data DIR --subset S")
    return int(conv.weight.shape[1]) * int(getattr(conv, "groups", 1))
