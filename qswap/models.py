"""Small real fairseq speech models, built from fairseq's own classes (random weights).

For tests, benchmarks and the demo: nothing here is a stand-in; ``build_s2t_transformer``,
``build_s2t_conformer`` and ``build_wav2vec2_ctc`` return fairseq's ``S2TTransformerModel``,
``S2TConformerModel`` and ``Wav2VecCtc`` built by their own ``build_model`` and defaults, just
with small dimensions; ``build_s2t_registered`` and ``build_wav2vec2_ctc_registered`` build
fairseq's registered architectures and shipped configs with fairseq's own dimensions and
defaults; ``s2t_net_input`` / ``wav2vec2_net_input`` make matching inputs.
Imports fairseq (lazily, inside the functions).
"""
from __future__ import annotations

import argparse
import types
import warnings
from typing import Any

import torch


def make_dictionary(num_symbols: int = 40):
    """A fairseq Dictionary with the 4 special symbols and ``num_symbols`` word pieces."""
    from fairseq.data import Dictionary
    d = Dictionary()
    for i in range(num_symbols):
        d.add_symbol(f"\u2581w{i}")
    return d


_S2T_SMALL = dict(input_feat_per_channel=80, input_channels=1, conv_kernel_sizes="5,5",
                  conv_channels=64, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                  encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
                  decoder_attention_heads=4, decoder_ffn_embed_dim=128,
                  max_source_positions=6000, max_target_positions=1024,
                  share_decoder_input_output_embed=True, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, load_pretrained_encoder_from=None)
_SIZE_KEYS = ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "decoder_ffn_embed_dim", "decoder_layers", "conv_channels")


def _build_s2t(model_cls, arch: str, default_arch: str, small: dict, dictionary, seed: int,
               overrides: dict):
    from fairseq.models import ARCH_CONFIG_REGISTRY

    small = dict(small)
    if arch != default_arch:  # let the named architecture choose its own sizes
        for key in _SIZE_KEYS:
            small.pop(key, None)
    args = argparse.Namespace(**{**small, **overrides})
    ARCH_CONFIG_REGISTRY[arch](args)
    dictionary = dictionary if dictionary is not None else make_dictionary()
    task = types.SimpleNamespace(target_dictionary=dictionary)  # all build_model reads of a task
    torch.manual_seed(seed)
    return model_cls.build_model(args, task).eval()


# What fairseq's speech_to_text task and common config supply to an s2t model's args (80-dim
# filterbanks, the task's default position limits, fp32); the architecture function does the rest.
_S2T_TASK_ARGS = dict(input_feat_per_channel=80, max_source_positions=6000,
                      max_target_positions=1024, fp16=False)


def build_s2t_registered(arch: str, dictionary=None, *, seed: int = 0, **overrides: Any):
    """fairseq's registered speech-to-text architecture ``arch`` (``s2t_transformer_s``,
    ``s2t_conformer``...) with fairseq's own defaults, as ``fairseq-train --arch ARCH`` builds it,
    in eval mode. ``overrides`` are architecture args (``encoder_layers=1``,
    ``pos_enc_type="rope"``...); nothing else is changed.
    """
    from fairseq.models import ARCH_MODEL_REGISTRY

    return _build_s2t(ARCH_MODEL_REGISTRY[arch], arch, arch, _S2T_TASK_ARGS, dictionary, seed, overrides)


def build_s2t_transformer(dictionary=None, *, seed: int = 0, arch: str = "s2t_transformer",
                          **overrides: Any):
    """fairseq's S2TTransformerModel, small by default (2+2 layers, dim 64), in eval mode.

    ``overrides`` are fairseq architecture args (``encoder_layers=6``...); ``arch`` names one of
    fairseq's registered s2t_transformer architectures whose defaults fill the rest.
    """
    from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerModel

    return _build_s2t(S2TTransformerModel, arch, "s2t_transformer", _S2T_SMALL, dictionary, seed,
                      overrides)


def build_s2t_conformer(dictionary=None, *, seed: int = 0, arch: str = "s2t_conformer",
                        **overrides: Any):
    """fairseq's S2TConformerModel, small by default (2 conformer layers + 2 decoder layers,
    dim 64, depthwise kernel 7), rel-pos ESPnet attention, in eval mode.

    ``pos_enc_type`` is "rel_pos" (default), "abs" or "rope"; fairseq needs ``attn_type="espnet"``
    for rel_pos and rope (with its default attention it passes ``pos_emb`` to fairseq's
    MultiheadAttention and crashes). ``overrides`` are fairseq architecture args.
    """
    from fairseq.models.speech_to_text.s2t_conformer import S2TConformerModel

    small = {**_S2T_SMALL, "attn_type": "espnet", "pos_enc_type": "rel_pos",
             "depthwise_conv_kernel_size": 7, "fp16": False}
    return _build_s2t(S2TConformerModel, arch, "s2t_conformer", small, dictionary, seed, overrides)


def build_wav2vec2_ctc(dictionary=None, *, seed: int = 0, **overrides: Any):
    """fairseq's Wav2VecCtc (wav2vec 2.0 encoder + CTC projection), random weights, small by
    default (3 conv feature layers of 32 channels, 2 transformer layers of dim 32), in eval mode.

    ``overrides`` are Wav2Vec2Config fields (``extractor_mode="layer_norm"``,
    ``layer_norm_first=True``, ``layer_type="conformer"``...).
    """
    small = dict(conv_feature_layers="[(32, 10, 5), (32, 3, 2), (32, 2, 2)]", encoder_embed_dim=32,
                 encoder_ffn_embed_dim=64, encoder_layers=2, encoder_attention_heads=4, conv_pos=16,
                 conv_pos_groups=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return build_wav2vec2_ctc_registered(None, dictionary, seed=seed, **{**small, **overrides})


# Wav2Vec2Config fields fairseq's Wav2VecEncoder overwrites with the Wav2Vec2CtcConfig's own values
# (wav2vec2_asr.py, ``args_replacement``): the builder hands the CTC config the model's values, or
# ``layer_type="conformer"`` would build the CTC config's default transformer layers.
_CTC_REPLACED = ("checkpoint_activations", "layer_type", "adp_num", "adp_dim", "adp_act_fn", "adp_trf_idx")


def build_wav2vec2_ctc_registered(config: str | None = None, dictionary=None, *, seed: int = 0,
                                  finetuning: str | None = None, **overrides: Any):
    """fairseq's Wav2VecCtc fine-tuning wrapper (``Wav2Vec2CtcConfig`` defaults) around a
    wav2vec 2.0 model with fairseq's own defaults: ``Wav2Vec2Config()`` (base) for ``config=None``,
    or a model config shipped with fairseq, ``"wav2vec2_large"`` (fairseq/config/model/wav2vec2/,
    the large / XLS-R settings: layer_norm extractor, pre-norm layers, conv biases), merged
    over it. ``finetuning`` names one of fairseq's wav2vec 2.0 fine-tuning configs
    (``"base_100h"``, ``"vox_100h"``: examples/wav2vec/config/finetuning/), whose model section
    (masking, layerdrop, feature_grad_mult...) sets the Wav2Vec2CtcConfig. ``overrides`` are
    Wav2Vec2Config fields (``encoder_layers=1``). Random weights, in eval mode.

    Builds without a pretrained checkpoint: ``w2v_args`` is a full FairseqConfig whose model is
    the Wav2Vec2Config and whose task is an AudioPretrainingConfig (``tpu``, ``seed`` and
    ``normalize`` set explicitly: they are interpolations otherwise). The fields fairseq's
    Wav2VecEncoder replaces with the CTC config's (``layer_type``, ``adp_*``,
    ``checkpoint_activations``) are passed to the CTC config: ``overrides`` first, then the
    fine-tuning config's, then the model config's.
    """
    from pathlib import Path

    import fairseq
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2Vec2CtcConfig, Wav2VecCtc
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
    from omegaconf import OmegaConf

    root = Path(fairseq.__file__).parent
    model_cfg = OmegaConf.structured(Wav2Vec2Config)
    if config is not None:
        model_cfg = OmegaConf.merge(model_cfg, OmegaConf.load(root / "config/model/wav2vec2" / f"{config}.yaml"))
    ctc_fields = {}
    if finetuning is not None:
        shipped = OmegaConf.load(root / "examples/wav2vec/config/finetuning" / f"{finetuning}.yaml")
        ctc_fields = OmegaConf.to_container(shipped.model)
        del ctc_fields["_name"], ctc_fields["w2v_path"]  # "wav2vec_ctc"; "???" (no checkpoint here)
    model_cfg = OmegaConf.merge(model_cfg, overrides)
    model_cfg._name = "wav2vec2"
    ctc_fields.update({key: model_cfg[key] for key in _CTC_REPLACED if key in Wav2Vec2CtcConfig.__dataclass_fields__
                       and (key in overrides or key not in ctc_fields)})
    task_cfg = AudioPretrainingConfig(data=".", normalize=False, tpu=False, seed=seed)
    task_cfg._name = "audio_pretraining"
    w2v_args = OmegaConf.structured(FairseqConfig(model=model_cfg, task=task_cfg))
    cfg = Wav2Vec2CtcConfig(w2v_args=w2v_args, w2v_path="", no_pretrained_weights=True,
                            normalize=False, data=".", ddp_backend="c10d", **ctc_fields)
    dictionary = dictionary if dictionary is not None else make_dictionary()
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # fairseq's positional conv uses the deprecated weight_norm
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        model = Wav2VecCtc.build_model(cfg, types.SimpleNamespace(target_dictionary=dictionary))
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


def wav2vec2_net_input(batch: int = 2, samples: int = 2000, seed: int = 0,
                       ragged: bool = True) -> dict[str, torch.Tensor]:
    """A fairseq audio ``net_input`` for Wav2VecCtc: raw waveforms and their padding mask.

    With ``ragged`` the second utterance is a quarter shorter (zero-padded, mask True there).
    """
    g = torch.Generator().manual_seed(seed)
    source = 0.1 * torch.randn(batch, samples, generator=g)
    padding_mask = torch.zeros(batch, samples, dtype=torch.bool)
    if ragged and batch > 1:
        padding_mask[1:, samples - samples // 4:] = True
        source[1:, samples - samples // 4:] = 0.0
    return {"source": source, "padding_mask": padding_mask}


s2t_conformer_net_input = s2t_net_input  # the S2T conformer reads the same features
