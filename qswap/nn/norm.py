"""Normalization counterparts: quantized input and affine parameters, one norm kernel.

The statistics and normalization run inside one ``native_layer_norm`` / ``native_group_norm``
kernel on quantized operands, the way an integer LayerNorm kernel does them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.nn.base import QuantConfig, QuantModule, act_quantizer, weight_quantizer
from qswap.nn.registry import register


class _QNorm(QuantModule):
    sites = ("input", "norm_weight", "norm_bias")

    def __init__(self, weight, bias, eps: float, config: QuantConfig):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps
        self.input_quant = act_quantizer(config, "input")
        self.weight_quant = weight_quantizer(config, "norm_weight")
        self.bias_quant = weight_quantizer(config, "norm_bias")

    def affine(self) -> tuple:
        w = self.weight_quant(self.weight) if self.weight is not None else None
        b = self.bias_quant(self.bias) if self.bias is not None else None
        return w, b


@register(nn.LayerNorm)
class QLayerNorm(_QNorm):
    def __init__(self, normalized_shape, weight, bias, eps, config):
        super().__init__(weight, bias, eps, config)
        self.normalized_shape = tuple(normalized_shape)

    @classmethod
    def from_float(cls, module: nn.LayerNorm, config: QuantConfig) -> "QLayerNorm":
        return cls(module.normalized_shape, module.weight, module.bias, module.eps, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.affine()
        return F.layer_norm(self.input_quant(x), self.normalized_shape, w, b, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


@register(nn.GroupNorm)
class QGroupNorm(_QNorm):
    def __init__(self, num_groups, weight, bias, eps, config):
        super().__init__(weight, bias, eps, config)
        self.num_groups = num_groups

    @classmethod
    def from_float(cls, module: nn.GroupNorm, config: QuantConfig) -> "QGroupNorm":
        return cls(module.num_groups, module.weight, module.bias, module.eps, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.affine()
        return F.group_norm(self.input_quant(x), self.num_groups, w, b, self.eps)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, eps={self.eps}"
