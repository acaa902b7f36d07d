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


def assert_identity_counterparts_match(model, net_input) -> None:
    """The model converted with identity quantizers (``NO_QUANT``) computes what fairseq
    computes: same non-finite positions, finite values to 1e-5 (float32 rounding)."""
    exact = qswap.convert(model, NO_QUANT)
    for ref, out in zip(run(model, net_input), run(exact, net_input)):
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(out))
        torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


def _teacher_forced_log_probs(q, net_input, tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """log p(tokens[b, t] | tokens[b, :t]) (B, L), in one batch forward; tokens: (B, L)."""
    prev = torch.cat([torch.full_like(tokens[:, :1], eos), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        out = q(src_tokens=net_input["src_tokens"], src_lengths=net_input["src_lengths"],
                prev_output_tokens=prev)
        lprobs = q.get_normalized_probs(out, log_probs=True)  # (B, L, V)
    return lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def assert_scores_are_teacher_forced(q, net_input, hypos, atol: float = 1e-4) -> None:
    """Each of SequenceGenerator's hypotheses (``hypos``: per sentence, a list of beams) scores
    its tokens as one teacher-forced batch forward does (to ``atol``: float32 summation order)."""
    dictionary = q.decoder.dictionary
    for k in range(len(hypos[0])):  # the k-th hypothesis of every sentence, as one batch
        tokens = [h[k]["tokens"] for h in hypos]
        padded = torch.full((len(tokens), max(len(t) for t in tokens)), dictionary.pad())
        for b, t in enumerate(tokens):
            padded[b, : len(t)] = t
        expected = _teacher_forced_log_probs(q, net_input, padded, dictionary.eos())
        for b, h in enumerate(hypos):
            n = len(tokens[b])
            torch.testing.assert_close(h[k]["positional_scores"], expected[b, :n], rtol=0, atol=atol)


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


def assert_logits_codes_are_the_integer_models(qmodel, imodel, net_input) -> None:
    """Teacher-forced, and step by step with fairseq's incremental state: every logits code of the
    fake-quant model (on its logits grid) is the integer model's."""
    import torch
    from qswap.quant.integer import Grid
    grid, prev = Grid.of(qmodel.logits_quant), net_input["prev_output_tokens"]
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    memory, padding = imodel.encoder.forward_codes(imodel.encoder.quantize_input(src), lengths)
    forced = imodel.decoder.forward_codes(prev, memory, padding).to(torch.int64)  # (B, T, V)
    with torch.no_grad():
        assert torch.equal(grid.quantize(qmodel(**net_input)[0]).to(torch.int64), forced)
        encoder_out, state = qmodel.encoder(src, lengths), {}
        for t in range(prev.size(1)):
            step = qmodel.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
            assert torch.equal(grid.quantize(step).to(torch.int64), forced[:, t:t + 1]), f"step {t}"
