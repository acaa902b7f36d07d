"""The declared float steps at the two ends of an integer model, as modules of their own so that
the integer audit (``qswap.honesty.integer``) can tell them from the integer compute by the module
that runs them: ``QuantizeStep`` (float input onto the first op's grid) and ``DequantizeStep``
(output codes, or an int32 accumulator, to the float scores beam search reads). Every other module
of an integer model computes on integer dtypes only.

>>> codes = QuantizeStep(grid)(features)      # float32 -> int8/uint8 codes
>>> logits = DequantizeStep(grid)(codes)      # codes -> float32
"""
from __future__ import annotations

import torch
from torch import nn

from qswap.nn.base import check_finite_input


class QuantizeStep(nn.Module):
    """Declared float step: float ``x`` onto ``grid`` (as the fake-quant model's first input
    quantizer rounds it: ``x * (1/scale)`` in float32, half to even, clamped), as codes."""

    declared_float_step = "quantize the input"

    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x``; DataError for NaN or +-inf (a NaN would become the zero point's code,
        an input read silently as silence)."""
        check_finite_input(x, "the integer model")
        return self.grid.quantize(x)

    def extra_repr(self) -> str:
        return f"scale={self.grid.scale:.4g}, zero_point={self.grid.zero_point}"


class DequantizeStep(nn.Module):
    """Declared float step: output codes of ``grid`` (or, built with ``acc_scale`` instead, an
    int32 accumulator) to float32 scores."""

    declared_float_step = "output codes to float scores"

    def __init__(self, grid=None, acc_scale: torch.Tensor | None = None):
        super().__init__()
        self.grid = grid
        self.register_buffer("acc_scale", acc_scale)  # () or (V,) float32, when grid is None

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            return self.grid.dequantize(codes)
        if self.acc_scale is None:
            from qswap.errors import IntegerizeError
            raise IntegerizeError("this integer model ends in neither an output grid nor a linear's accumulator: "
                                  "end it with an integer linear, or read its codes with forward_codes")
        return codes.to(self.acc_scale.dtype) * self.acc_scale
