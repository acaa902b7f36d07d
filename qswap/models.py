"""Small real fairseq speech models, built from fairseq's own classes (random weights).

For tests, benchmarks and the demo: nothing here is a stand-in; ``build_s2t_transformer``
returns fairseq's ``S2TTransformerModel`` built by its own ``build_model`` and architecture
defaults, just with small dimensions. Imports fairseq (lazily, inside the functions).
"""
from __future__ import annotations

import argparse
import types
from typing import Any

import torch


def make_dictionary(num_symbols: int = 40):
    """A fairseq Dictionary with the 4 special symbols and ``num_symbols`` word pieces."""
    from fairseq.data import Dictionary
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"\u2581w{i}")
    return d


def build_s2t_transformer(dictionary=None, *, seed: int = 0, arch: str = "s2t_transformer",
                          **overrides: Any):
    """fairseq's S2TTransformerModel, small by default (2+2 layers, dim 64), in eval mode.

    ``overrides`` are fairseq architecture args (``encoder_layers=6``...); ``arch`` names one of
    fairseq's registered s2t_transformer architectures whose defaults fill the rest.
    """
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel

    small = dict(input_feat_per_channel=80, input_channels=1, conv_kernel_sizes="5,5",
                 conv_channels=64, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                 encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
                 decoder_attention_heads=4, decoder_ffn_embed_dim=128,
                 max_source_positions=6000, max_target_positions=1024,
                 share_decoder_input_output_embed=True, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0, load_pretrained_encoder_from=None)
    if arch != "s2t_transformer":  # let the named architecture choose its own sizes
        for key in ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers",
                    "encoder_attention_heads", "decoder_attention_heads", "decoder_ffn_embed_dim",
                    "decoder_layers", "conv_channels"):
            small.pop(key)
    args = argparse.Namespace(**{**small, **overrides})
    ARCH_CONFIG_REGISTRY[arch](args)
    dictionary = dictionary if dictionary is not None else make_dictionary()
    task = types.SimpleNamespace(target_dictionary=dictionary)  # all build_model reads of a task
    torch.manual_seed(seed)
    model = S2TTransformerModel.build_model(args, task)
    return model.eval()


def s2t_net_input(batch: int = 2, frames: int = 60, feat: int = 80, num_tokens: int = 7,
                  vocab: int = 44, seed: int = 0, ragged: bool = True) -> dict[str, torch.Tensor]:
    """A fairseq speech_to_text ``net_input``: features, lengths and teacher-forced tokens.

    With ``ragged`` the second utterance is shorter, so padding masks are exercised.
    """
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(batch, frames, feat, generator=g)
    lengths = torch.full((batch,), frames, dtype=torch.long)
    if ragged and batch > 1:
        lengths[1:] = frames - frames // 3
        src[1:, frames - frames // 3:] = 0.0
    prev = torch.randint(4, vocab, (batch, num_tokens), generator=g)
    prev[:, 0] = 2  # eos starts every target sequence in fairseq
    return {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}
