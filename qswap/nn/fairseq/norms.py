"""fairseq's norm subclasses. ``Fp32LayerNorm`` / ``Fp32GroupNorm`` (wav2vec 2.0's feature
extractor) normalize in float32 and cast back; their counterparts do the same on the quantized
input. fairseq's ``LayerNorm(...)`` factory returns a plain ``torch.nn.LayerNorm`` (converted by
``qswap.nn.norm``) unless apex is importable and CUDA is available, when it returns
``FusedLayerNorm``, registered here in that case only.
"""
from __future__ import annotations

import torch
from torch import nn
from fairseq.modules import layer_norm as fairseq_layer_norm
from fairseq.modules.fp32_group_norm import Fp32GroupNorm
from fairseq.modules.layer_norm import Fp32LayerNorm

from qswap.nn.norm import QGroupNorm, QLayerNorm
from qswap.nn.registry import register


@register(Fp32LayerNorm)
class QFp32LayerNorm(QLayerNorm):
    """fairseq's Fp32LayerNorm: QLayerNorm's arithmetic (its integer insides and reader with
    ``simulate: integer``) on the input and affine parameters cast to float32; the result in the
    input's dtype."""

    def forward(self, x: torch.Tensor, out_quant: nn.Module | list | None = None) -> torch.Tensor | list:
        y = super().forward(x.float(), out_quant)
        return [v.type_as(x) for v in y] if isinstance(y, list) else y.type_as(x)

    def affine(self) -> tuple:
        w, b = super().affine()
        return None if w is None else w.float(), None if b is None else b.float()


@register(Fp32GroupNorm)
class QFp32GroupNorm(QGroupNorm):
    """fairseq's Fp32GroupNorm: QGroupNorm's arithmetic on the input and affine parameters cast to
    float32; the result in the input's dtype."""

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        return super().forward(x.float(), out_quant).type_as(x)

    def affine(self) -> tuple:
        w, b = super().affine()
        return None if w is None else w.float(), None if b is None else b.float()


if getattr(fairseq_layer_norm, "has_fused_layernorm", False):
    @register(fairseq_layer_norm.FusedLayerNorm)
    class QFusedLayerNorm(QLayerNorm):
        """apex's FusedLayerNorm computes what nn.LayerNorm computes; the counterpart is QLayerNorm's."""
