"""The counterpart of the online Walsh-Hadamard transform (``qswap.transforms.hadamard``), and its
integer form.

Integer definition (``IntegerHadamard``): the input codes ``c`` (the ``input`` grid: scale
``s_in``, zero point ``z_in``) centered as int32 ``c - z_in``, in blocks of ``block`` channels,
each output channel the sum of its block's centered codes times the ``matrix`` grid's codes (a
+-1 Hadamard matrix on a symmetric grid: each code +-k, ``k = 1`` on a 2-bit grid), accumulated
in int32: at most ``block * span(input) * k``, checked when built (far below 2^31: 64 * 255 * 7
for a 64-point transform on an 8-bit input). Its scale ``s_in * s_matrix``; requantized onto the
reader's grid (fc2's input) with gemmlowp's fixed-point multiplier, rounding ties toward +inf,
saturating to the reader's range (``qswap.quant.integer.requantize``): an ``IntegerLinear`` of
``block`` inputs and outputs applied to each block. The fake-quant counterpart with ``simulate:
integer``, told its reader, computes these codes' values (``onto_grid``); with ``simulate: float``
the float32 ``F.linear`` on the quantized operands, which the reader rounds.

A rotated linear (``qswap.transforms.hadamard.RotatedLinear``, fc2 after ``rotate_ffn``) is
converted to ``QRotatedLinear``: the transform writes onto the linear's input grid, the linear
onto its reader's; its integer form is an ``IntegerChain`` of the two, which the integer
transformer layers take as their fc2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.io.serializable import INT, Obj, serializable
from qswap.nn.base import QuantConfig, QuantModule, quantizer, told
from qswap.nn.linear import integer_linear, op_onto
from qswap.nn.registry import register
from qswap.transforms.hadamard import Hadamard, RotatedLinear


@register(Hadamard)
class QHadamard(QuantModule):
    """R x on integer codes: the quantized input (``input``) times the +-1 Hadamard matrix
    (``matrix``, a constant: a symmetric grid of 2 or more bits holds +-1/sqrt(b) exactly as
    codes +-1), in blocks of ``block`` channels: each output code is a sum and difference of
    ``block`` input codes, an int32 accumulator that the next op's input quantizer requantizes
    (module docstring: the integer definition)."""

    sites = {"input": "activation", "matrix": "weight"}
    takes_reader = True

    def __init__(self, module: Hadamard, config: QuantConfig):
        super().__init__()
        self.features, self.block = module.features, module.block
        self.register_buffer("matrix", module.matrix.clone())
        self.input_quant = quantizer(config, self.sites, "input")
        self.matrix_quant = quantizer(config, self.sites, "matrix")
        self.simulate = config.simulate

    @classmethod
    def from_float(cls, module: Hadamard, config: QuantConfig) -> "QHadamard":
        return cls(module, config)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.features // self.block, self.block)  # (..., F) -> (..., F//b, b)

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        """``R input_quant(x)``. ``out_quant``: the quantizer that reads the result (fc2's input);
        with ``simulate: integer`` the result is then the integer form's codes on its grid, as
        values, with the float op's gradient (``op_onto``, as a ``QLinear``'s)."""
        xq = self.input_quant(x)

        def op() -> torch.Tensor:
            return F.linear(self._blocks(xq), self.matrix_quant(self.matrix)).reshape(xq.shape)
        if out_quant is None:
            return op()
        return op_onto(self, xq, self.input_quant, out_quant, op,
                       lambda grid_in, grid_out, derived=False: self.to_integer(grid_out, derived=derived),
                       weights=(self.matrix, getattr(self.matrix_quant, "scale", None)))

    def to_integer(self, out, derived: bool = False) -> "IntegerHadamard":
        """The integer form writing codes of the grid ``out`` (its reader's, per tensor), or the
        int32 accumulator when ``out`` is None (module docstring)."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import Grid
        if out is not None and not isinstance(out.scale, float):
            raise IntegerizeError("an online Hadamard transform writes onto a per-tensor grid only; its reader "
                                  "(fc2's input) must be per tensor")
        return IntegerHadamard(self.features, self.block, integer_linear(
            self.matrix_quant, self.matrix, None, Grid.of(self.input_quant), out, derived=derived))

    def extra_repr(self) -> str:
        return f"features={self.features}, block={self.block}"


@serializable(features=INT, block=INT, linear=Obj("IntegerLinear"))
class IntegerHadamard(nn.Module):
    """The Walsh-Hadamard transform on codes (module docstring): ``linear``, an ``IntegerLinear``
    of ``block`` inputs and outputs (the matrix's codes, no bias), applied to each block of
    ``block`` channels of (..., ``features``) codes."""

    def __init__(self, features: int, block: int, linear):
        super().__init__()
        self.features, self.block, self.linear = features, block, linear

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.features // self.block, self.block)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.linear(self._blocks(codes)).flatten(-2)  # (..., F) codes, or the int32 accumulator

    def simulated(self, centered: torch.Tensor, scale: float | None = None, span: int | None = None) -> torch.Tensor:
        """``IntegerLinear.simulated`` on each block (the fake-quant simulation's exact float GEMM)."""
        return self.linear.simulated(self._blocks(centered), scale, span).flatten(-2)

    @property
    def stream_scale(self) -> float | torch.Tensor:
        """The accumulator's grid: a float, or (features,) float64 (a per-channel matrix grid repeats per block)."""
        scale = self.linear.stream_scale
        return scale if isinstance(scale, float) else scale.repeat(self.features // self.block)


@register(RotatedLinear)
class QRotatedLinear(QuantModule):
    """A rotated linear (``qswap.transforms.hadamard.RotatedLinear``: the online transform, then
    fc2), its two ops converted by their own rules (``QHadamard``, ``QLinear``). Told the
    quantizer that reads its result, it tells the transform the linear's input quantizer and the
    linear its own reader: with ``simulate: integer`` each writes onto the next grid, as the
    integer form (``to_integer``: an ``IntegerChain`` of the two) computes. Its input quantizer is
    the transform's (``input_quant``: what the FFN's activation table writes onto)."""

    converts_children = True
    takes_reader = True

    def __init__(self, module: RotatedLinear, config: QuantConfig):
        super().__init__()
        self.rotate, self.linear = module.rotate, module.linear

    @classmethod
    def from_float(cls, module: RotatedLinear, config: QuantConfig) -> "QRotatedLinear":
        return cls(module, config)

    @property
    def input_quant(self) -> nn.Module | None:
        """The quantizer that reads this op's input: the transform's (None where it is float)."""
        return getattr(self.rotate, "input_quant", None)

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        """``linear(rotate(x))``; with ``out_quant`` (the reader of the result) each op is told the
        quantizer that reads its own result."""
        return told(self.linear, told(self.rotate, x, getattr(self.linear, "input_quant", None)), out_quant)

    def to_integer(self, out):
        """The integer form writing onto ``out``: the transform onto the linear's input grid, then
        the linear (``IntegerChain``); ``IntegerizeError`` naming an op without one."""
        from qswap.nn.fairseq.chain import integer_chain
        return integer_chain(self, out)
