"""Positional embeddings. A position table is a constant (computed from its size, or learned):
it goes through a weight quantizer, and the lookup only moves its quantized rows, so
``embed_scale * x + positions`` in the S2T encoder and decoder adds two quantized operands.

``RelPositionalEncoding`` (conformer rel_pos) only slices its constant table; the slice is the
input of ``linear_pos`` inside the rel-pos attention, which quantizes it: it is passthrough.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules.learned_positional_embedding import LearnedPositionalEmbedding
from fairseq.modules.sinusoidal_positional_embedding import SinusoidalPositionalEmbedding

from qswap.errors import ConvertError
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register


@register(SinusoidalPositionalEmbedding)
class QSinusoidalPositionalEmbedding(QuantModule):
    """The sinusoidal table (the non-persistent buffer ``weights``) through ``weights_quant``.

    >>> QSinusoidalPositionalEmbedding.from_float(PositionalEmbedding(1024, 64, 1), config)
    """

    sites = {"weight": "weight"}

    def __init__(self, module: SinusoidalPositionalEmbedding, config: QuantConfig):
        super().__init__()
        self.embedding_dim, self.padding_idx = module.embedding_dim, module.padding_idx
        self.max_positions = module.max_positions
        self.register_buffer("weights", module.weights, persistent=False)
        self.weights_quant = quantizer(config, self.sites, "weight")

    @classmethod
    def from_float(cls, module: SinusoidalPositionalEmbedding, config: QuantConfig):
        if module.onnx_trace:
            raise ConvertError("SinusoidalPositionalEmbedding prepared for ONNX export is not "
                               "supported; convert before prepare_for_onnx_export_()")
        return cls(module, config)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("weights", "_float_tensor"):  # keys of old fairseq versions, as fairseq drops them
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: torch.Tensor, incremental_state: Optional[Any] = None,
                timestep: Optional[torch.Tensor] = None, positions: Optional[Any] = None):
        """input: (B, T) tokens (or a padding mask); returns (B, T, C), or (B, 1, C) when decoding
        one step."""
        bsz, seq_len = input.shape[:2]
        if self.padding_idx + 1 + seq_len > self.weights.size(0):
            self.weights = SinusoidalPositionalEmbedding.get_embedding(
                self.padding_idx + 1 + seq_len, self.embedding_dim, self.padding_idx).to(self.weights)
        table = self.weights_quant(self.weights)  # (P, C)
        if incremental_state is not None:
            pos = timestep.view(-1)[0] + 1 if timestep is not None else seq_len
            return table[self.padding_idx + pos, :].expand(bsz, 1, -1)
        positions = utils.make_positions(input, self.padding_idx)  # (B, T) int
        return table.index_select(0, positions.view(-1)).view(bsz, seq_len, -1).detach()

    def extra_repr(self) -> str:
        return f"{self.embedding_dim}, padding_idx={self.padding_idx}"


@register(LearnedPositionalEmbedding)
class QLearnedPositionalEmbedding(QuantModule):
    """A learned position table: ``weight`` through ``weight_quant``, positions as fairseq
    computes them."""

    sites = {"weight": "weight"}

    def __init__(self, module: LearnedPositionalEmbedding, config: QuantConfig):
        super().__init__()
        self.weight, self.padding_idx = module.weight, module.padding_idx
        self.max_positions = module.max_positions
        self.weight_quant = quantizer(config, self.sites, "weight")

    @classmethod
    def from_float(cls, module: LearnedPositionalEmbedding, config: QuantConfig):
        if module.onnx_trace or module.max_norm is not None:
            raise ConvertError("LearnedPositionalEmbedding with max_norm or ONNX tracing is not supported")
        return cls(module, config)

    def forward(self, input: torch.Tensor, incremental_state=None, positions=None):
        """input: (B, T) tokens; returns (B, T, C) (one step: (B, 1, C))."""
        if positions is None:
            if incremental_state is not None:  # fairseq's position of the step, padding_idx + T, kept
                # an expression of the input's length: a trace (the exported decoder step) reads each
                # step's own (fairseq's int(...) is a constant there: every step one position)
                positions = torch.zeros((1, 1), device=input.device, dtype=input.dtype) + (
                    self.padding_idx + input.size(1))
            else:
                positions = utils.make_positions(input, self.padding_idx)
        return F.embedding(positions, self.weight_quant(self.weight), self.padding_idx)
