"""Shared pieces of the fairseq architecture tests: the three small models, their inputs, and
calibrated conversions (fairseq is imported here; the test modules skip without it)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import qswap
from qswap.models import (
    build_s2t_conformer,
    build_s2t_transformer,
    build_wav2vec2_ctc,
    s2t_net_input,
    wav2vec2_net_input,
)

# Every swapped module, identity quantizers: the counterparts must compute what fairseq computes.
NO_QUANT = {"version": 1, "name": "no_quant", "defaults": {"weight": None, "activation": None}}

ARCHS = {
    "s2t_transformer": (build_s2t_transformer, s2t_net_input),
    "s2t_conformer": (build_s2t_conformer, s2t_net_input),
    "wav2vec2_ctc": (build_wav2vec2_ctc, wav2vec2_net_input),
}
SEQ2SEQ = ("s2t_transformer", "s2t_conformer")


def build(arch: str, seed: int = 0, **overrides):
    builder, make_input = ARCHS[arch]
    return builder(seed=seed, **overrides), make_input()


def convert_calibrated(model, net_input, recipe="w8a8"):
    """The model converted and calibrated on ``net_input`` (every used quantizer frozen)."""
    qmodel = qswap.convert(model, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batch never takes keep observing
        qswap.calibrate(qmodel, [net_input])
    return qmodel


def logits(model, net_input) -> torch.Tensor:
    """Output logits on valid positions only: (B, T, V) for seq2seq, CTC frames that are not
    padding for wav2vec 2.0 (padded frames' features are ~constant vectors that LayerNorm
    blows up; they are masked out of every output)."""
    with torch.no_grad():
        out = model(**net_input)
    if isinstance(out, tuple):
        return out[0]
    x, padding = out["encoder_out"], out["padding_mask"]  # (T, B, V), (B, T)
    return x if padding is None else x[~padding.T]


def log_probs(model, net_input) -> torch.Tensor:
    with torch.no_grad():
        out = model(**net_input)
        lp = model.get_normalized_probs(out, log_probs=True)
    return lp[torch.isfinite(lp)]


def run(model, net_input):
    """Everything a state_dict test compares: the forward output and the normalized output."""
    with torch.no_grad():
        out = model(**net_input)
        first = (out[0] if isinstance(out, tuple) else out["encoder_out"]).clone()
        lp = model.get_normalized_probs(out, log_probs=True)  # fairseq's CTC masks out in place
    return first, lp


class Call(nn.Module):
    """Calls a module with the audit's keyword inputs (as positional arguments, in order, with
    ``positional``); returns its first output."""

    def __init__(self, module, positional=False):
        super().__init__()
        self.module, self.positional = module, positional

    def forward(self, **inputs):
        out = self.module(*inputs.values()) if self.positional else self.module(**inputs)
        return out[0] if isinstance(out, tuple) else out


E = 32  # the embedding width of single-module tests


def transformer_config(**extra):
    """fairseq's TransformerConfig at width E, 4 heads, no dropout; ``extra`` set on top."""
    from fairseq.models.transformer import TransformerConfig
    cfg = TransformerConfig()
    for part in (cfg.encoder, cfg.decoder):
        part.embed_dim, part.ffn_embed_dim, part.attention_heads = E, 2 * E, 4
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg
