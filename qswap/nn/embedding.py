"""Embedding counterpart: the table is quantized; the lookup only moves (quantized) rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.errors import ConvertError
from qswap.io.serializable import Obj, Tensor, serializable
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

    def to_integer(self, out: "Grid") -> "IntegerEmbedding":
        """The integer form writing codes of ``out`` (its consumer's input grid): the table's codes
        (per tensor or per row), each looked-up row requantized by ``s_w / s_out`` (its row's)."""
        from qswap.quant.integer import Requant, weight_codes
        codes, scale = weight_codes(self.weight_quant, self.weight, symmetric=False)
        zero_point = self.weight_quant.zero_point.detach().to(torch.int32).reshape(-1)
        requant = Requant.from_scales(scale.double() / out.scale, out.zero_point, out.qmin, out.qmax)
        return IntegerEmbedding(codes, zero_point, requant)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(codes=Tensor("int8", "uint8", "int16"), zero_point=Tensor("int32"), requant=Obj("Requant"))
class IntegerEmbedding(nn.Module):
    """A lookup of code rows, each requantized to the output grid with its row's multiplier
    (per-row grids) or the table's (per tensor). int32 operand ``code - zero_point`` (< 2^16)."""

    def __init__(self, codes: torch.Tensor, zero_point: torch.Tensor, requant):
        super().__init__()
        self.requant = requant
        self.register_buffer("codes", codes)  # (V, E) int8
        self.register_buffer("zero_point", zero_point)  # (1,) or (V,) int32

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from qswap.quant.integer import requantize
        rows = self.codes[tokens].to(torch.int32)  # (..., E)
        per_row = self.zero_point.numel() > 1
        zp = self.zero_point[tokens].unsqueeze(-1) if per_row else self.zero_point
        m0, shift = self.requant.m0, self.requant.shift
        if per_row:
            m0, shift = m0[tokens].unsqueeze(-1), shift[tokens].unsqueeze(-1)
        return requantize(rows - zp, m0, shift, self.requant.zero_point, self.requant.qmin, self.requant.qmax)
