"""The counterpart of the online Walsh-Hadamard transform (``qswap.transforms.hadamard``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register
from qswap.transforms.hadamard import Hadamard


@register(Hadamard)
class QHadamard(QuantModule):
    """R x on integer codes: the quantized input (``input``) times the +-1 Hadamard matrix
    (``matrix``, a constant: a symmetric grid of 2 or more bits holds +-1/sqrt(b) exactly as
    codes +-1), in blocks of ``block`` channels: each output code is a sum and difference of
    ``block`` input codes, an int32 accumulator that the next op's input quantizer requantizes."""

    sites = {"input": "activation", "matrix": "weight"}

    def __init__(self, module: Hadamard, config: QuantConfig):
        super().__init__()
        self.features, self.block = module.features, module.block
        self.register_buffer("matrix", module.matrix.clone())
        self.input_quant = quantizer(config, self.sites, "input")
        self.matrix_quant = quantizer(config, self.sites, "matrix")

    @classmethod
    def from_float(cls, module: Hadamard, config: QuantConfig) -> "QHadamard":
        return cls(module, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., F)
        x = self.input_quant(x).reshape(*shape[:-1], self.features // self.block, self.block)
        return F.linear(x, self.matrix_quant(self.matrix)).reshape(shape)  # (..., F//b, b) -> (..., F)

    def extra_repr(self) -> str:
        return f"features={self.features}, block={self.block}"
