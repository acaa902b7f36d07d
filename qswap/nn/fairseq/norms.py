"""fairseq's norm subclasses. ``Fp32LayerNorm`` / ``Fp32GroupNorm`` (wav2vec 2.0's feature
extractor) normalize in float32 and cast back; their counterparts do the same on the quantized
input. fairseq's ``LayerNorm(...)`` factory returns a plain ``torch.nn.LayerNorm`` (converted by
``qswap.nn.norm``) unless apex is importable and CUDA is available, when it returns
``FusedLayerNorm``, registered here in that case only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fairseq.modules import layer_norm as fairseq_layer_norm
from fairseq.modules.fp32_group_norm import Fp32GroupNorm
from fairseq.modules.layer_norm import Fp32LayerNorm

from qswap.nn.norm import QGroupNorm, QLayerNorm, layer_norm_bounded_grad, norm_ste
from qswap.nn.registry import register


@register(Fp32LayerNorm)
class QFp32LayerNorm(QLayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.affine()
        w, b = None if w is None else w.float(), None if b is None else b.float()
        xq = self.input_quant(x.float())
        y = F.layer_norm(xq, self.normalized_shape, w, b, self.eps)
        if y.requires_grad:  # QAT: QLayerNorm's gradient path
            y = norm_ste(y, layer_norm_bounded_grad(xq, self.normalized_shape, w, b, self.eps,
                                                    self.grad_std_floor))
        return y.type_as(x)


@register(Fp32GroupNorm)
class QFp32GroupNorm(QGroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.affine()
        y = F.group_norm(self.input_quant(x.float()), self.num_groups,
                         None if w is None else w.float(), None if b is None else b.float(), self.eps)
        return y.type_as(x)


if getattr(fairseq_layer_norm, "has_fused_layernorm", False):
    @register(fairseq_layer_norm.FusedLayerNorm)
    class QFusedLayerNorm(QLayerNorm):
        """apex's FusedLayerNorm computes what nn.LayerNorm computes; the counterpart is QLayerNorm's."""
