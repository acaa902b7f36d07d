"""Find the pieces the transforms fold into, by fairseq's attribute names (fairseq is not
imported): pre-norm transformer layers, their attentions, norms and FFN linears."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

_MHA = "fairseq.modules.multihead_attention.MultiheadAttention"


@dataclass
class Block:
    """A pre-norm sublayer: ``norm`` feeds ``linears`` (they all read its output)."""
    path: str
    norm: nn.Module
    linears: list[nn.Linear]


@dataclass
class Ffn:
    path: str
    fc1: nn.Linear
    fc2: nn.Module  # a Linear, or a RotatedLinear (qswap.transforms.hadamard)
    activation: str
    norm_inside: bool = False  # a LayerNorm between the activation and fc2 (NormFormer's ffn_layernorm)


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def plain_attentions(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """fairseq MultiheadAttention modules (no rotary or relative positions: a per-head rotation
    of q and k commutes with their dot product only then) with separate q/k/v projections."""
    for path, m in model.named_modules():
        if _qualname(m) == _MHA and all(isinstance(getattr(m, p, None), nn.Linear)
                                        for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
            yield path, m


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for path, m in model.named_modules():
        if all(hasattr(m, a) for a in ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")):
            yield path, m


# The attribute each fairseq layer class says it is pre-norm by (its norms feed only the sublayer's
# linears; post-norm, they feed the residual stream too). A layer with none of them is post-norm.
PRENORM_FLAGS = {
    "normalize_before": "fairseq.modules.transformer_layer's encoder and decoder layers (S2T, transformer)",
    "layer_norm_first": "wav2vec 2.0's TransformerSentenceEncoderLayer (and its adapter subclass)",
}


def is_prenorm(layer: nn.Module) -> bool:
    """Whether ``layer`` normalizes before its sublayers, by the flag its class declares it with."""
    return any(bool(getattr(layer, flag, False)) for flag in PRENORM_FLAGS)


def activation_name(layer: nn.Module) -> str:
    fn = getattr(layer, "activation_fn", None)
    return getattr(fn, "__name__", type(fn).__name__)


def prenorm_blocks(model: nn.Module) -> Iterator[Block]:
    """Each pre-norm layer's norms with the linears that read them: self-attention's q/k/v,
    cross-attention's q (its k/v read the encoder output), the FFN's fc1. Post-norm layers are
    skipped (their norms feed the residual stream too)."""
    for path, layer in _layers(model):
        if not is_prenorm(layer):
            continue
        sa = layer.self_attn
        yield Block(f"{path}.self_attn_layer_norm", layer.self_attn_layer_norm, [sa.q_proj, sa.k_proj, sa.v_proj])
        if getattr(layer, "encoder_attn", None) is not None:
            yield Block(f"{path}.encoder_attn_layer_norm", layer.encoder_attn_layer_norm, [layer.encoder_attn.q_proj])
        yield Block(f"{path}.final_layer_norm", layer.final_layer_norm, [layer.fc1])


def ffns(model: nn.Module) -> Iterator[Ffn]:
    for path, layer in _layers(model):
        if isinstance(layer.fc1, nn.Linear):
            yield Ffn(path, layer.fc1, layer.fc2, activation_name(layer),
                      getattr(layer, "ffn_layernorm", None) is not None)
