"""Embedding counterpart: the table is quantized; the lookup only moves (quantized) rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.errors import ConvertError
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register


@register(nn.Embedding)
class QEmbedding(QuantModule):
    sites = {"weight": "weight"}

    def __init__(self, weight: nn.Parameter, padding_idx: int | None, config: QuantConfig):
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight_quant = quantizer(config, self.sites, "weight")

    @classmethod
    def from_float(cls, module: nn.Embedding, config: QuantConfig) -> "QEmbedding":
        if module.max_norm is not None:
            raise ConvertError("nn.Embedding with max_norm renormalizes its float table in place "
                               "at every lookup; set max_norm=None before converting")
        return cls(module.weight, module.padding_idx, config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight_quant(self.weight), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
