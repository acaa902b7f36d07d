"""Softmax and elementwise activations: one kernel on a quantized input (a lookup table on
integer hardware). Their outputs are quantized by whatever consumes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register


class _QElementwise(QuantModule):
    sites = {"input": "activation"}

    def __init__(self, float_module: nn.Module, config: QuantConfig):
        super().__init__()
        self.input_quant = quantizer(config, self.sites, "input")
        self.op = float_module  # the float module is stateless: keep it to call its own forward

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.input_quant(x))


@register(nn.ReLU)
class QReLU(_QElementwise):
    pass


@register(nn.GELU)
class QGELU(_QElementwise):
    pass


@register(nn.SiLU)
class QSiLU(_QElementwise):
    pass


@register(nn.GLU)
class QGLU(_QElementwise):
    pass


@register(nn.Tanh)
class QTanh(_QElementwise):
    pass


@register(nn.Sigmoid)
class QSigmoid(_QElementwise):
    pass


@register(nn.Softmax)
class QSoftmax(_QElementwise):
    pass


@register(nn.LogSoftmax)
class QLogSoftmax(_QElementwise):
    pass
