"""Softmax and elementwise activations: one kernel on a quantized input (a lookup table on
integer hardware). Their outputs are quantized by whatever consumes them. With ``simulate:
integer`` GLU computes its gate as its integer form does (``glu_value``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qswap.io.serializable import INT, Obj, Opt, Tensor, serializable
from qswap.nn.base import QuantConfig, QuantModule, quantizer
from qswap.nn.registry import register
from qswap.nn.simulate import (carries_grad, cached, codes_of, form_or_none, grid_of, onto_grid, simulates,
                                straight_through, value_of)


class _QElementwise(QuantModule):
    sites = {"input": "activation"}

    def __init__(self, float_module: nn.Module, config: QuantConfig):
        super().__init__()
        self.simulate = config.simulate
        self.input_quant = quantizer(config, self.sites, "input")
        self.op = float_module  # the float module is stateless: keep it to call its own forward

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig):
        return cls(module, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.input_quant(x))

    def to_integer(self, out: "Grid") -> nn.Module:
        """The integer form writing codes of ``out`` (its consumer's input grid): a lookup table
        over every input code, bit-exact with this module followed by the consumer's quantizer
        (``qswap.quant.integer.build_lut``). Softmax: ``integer_softmax`` (along its explicit dim:
        ``nn.Softmax()`` is refused); GLU: ``integer_glu``. LogSoftmax has no integer form yet."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import GluParams, Grid, SoftmaxParams, build_lut
        if isinstance(self.op, nn.Softmax) and self.op.dim is None:
            # torch's implicit axis depends on the input's rank (0 for 1-D and 3-D inputs): the fake-quant
            # model computes that one, and an integer form along -1 would compute another
            raise IntegerizeError("nn.Softmax() without dim: torch picks its axis from the input's rank "
                                  "(dim 0 for a 1-D or 3-D input) and the integer softmax needs a fixed "
                                  "one; construct it with an explicit dim (nn.Softmax(dim=-1))")
        grid_in = Grid.of(self.input_quant)
        if isinstance(self.op, nn.Softmax):
            return IntegerSoftmax(SoftmaxParams.build(grid_in, out), self.op.dim)
        if isinstance(self.op, nn.GLU):
            return IntegerGLU(GluParams.build(grid_in, out), self.op.dim)
        if isinstance(self.op, nn.LogSoftmax):
            raise IntegerizeError(f"{type(self.op).__name__} has no integer form yet (issue 16)")
        with torch.no_grad():
            return IntegerLookup(build_lut(self.op, grid_in, out), grid_in.qmin)


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
    takes_reader = True

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        """GLU of ``input_quant(x)``; ``out_quant``: the quantizer that reads the result
        (``glu_value``)."""
        xq = self.input_quant(x)
        return glu_value(self, "_integer_glu", xq, self.input_quant, self.op.dim, out_quant)


def glu_value(owner: nn.Module, slot: str, xq: torch.Tensor, quant: nn.Module, dim: int,
              out_quant: nn.Module | None = None, reader_axis: int | None = None) -> torch.Tensor:
    """GLU of ``xq`` (the output of ``quant``) along ``dim``: with ``owner`` simulating integers
    and ``quant`` a per-tensor grid, the integer GLU's accumulator ``(a - zp) * gate[b]``
    (``qswap.quant.integer.glu_accumulator``, 2^-15 gate table kept in ``owner.<slot>``) as its
    value, or with ``out_quant`` (the quantizer that reads the result) the integer GLU's codes
    on its grid (``integer_glu``: the fixed-point requantization, ``onto_grid``), with the float
    GLU's gradient; otherwise ``F.glu``. ``reader_axis``: the axis of the result that becomes
    ``out_quant``'s last axis (the conv subsampler's channels, which the encoder's embed quantizer
    reads after a transpose): with it, a reader grid per channel of its last axis is requantized
    onto per channel of that axis; without it only a per-tensor reader grid is."""
    from qswap.quant.integer import ChannelGrid, GluParams, glu_acc_scale, glu_accumulator, requantized_values
    grid = grid_of(quant) if simulates(owner) else None
    if grid is None:
        return F.glu(xq, dim=dim)

    def run(params, out):
        acc = glu_accumulator(codes_of(xq, grid), params, dim)
        if isinstance(out, ChannelGrid):
            codes = params.out(acc, axis=reader_axis).movedim(reader_axis, -1)
            return out_quant.values(codes).movedim(-1, reader_axis)
        return requantized_values(params.out, acc, out.scale, axis=dim)
    value = None if out_quant is None else onto_grid(
        owner, f"{slot}_onto", lambda out: GluParams.build(grid, out), out_quant, run, quant.scale,
        quant.zero_point, channels=reader_axis is not None)
    if value is not None:
        if not carries_grad(out_quant, xq):
            return value
        if reader_axis is None:
            return straight_through(value, F.glu(xq, dim=dim), out_quant)
        # the reader rounds the float GLU for the gradient in its own layout (channels last)
        moved = straight_through(value.movedim(reader_axis, -1), F.glu(xq, dim=dim).movedim(reader_axis, -1),
                                 out_quant)
        return moved.movedim(-1, reader_axis)
    params = cached(owner, slot, lambda: form_or_none(GluParams.build, grid, None), quant.scale, quant.zero_point)
    if params is None:  # e.g. a learned scale trained to zero or below: no integer form
        return F.glu(xq, dim=dim)
    with torch.no_grad():
        value = value_of(glu_accumulator(codes_of(xq, grid), params, dim), glu_acc_scale(grid), xq.dtype)
    return straight_through(value, F.glu(xq, dim=dim)) if xq.requires_grad else value


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


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(table=Tensor("int8", "uint8", "int16", "int32"), qmin=INT)
class IntegerLookup(nn.Module):
    """An elementwise op on codes: ``table[codes - qmin]`` (no arithmetic on values)."""

    def __init__(self, table: torch.Tensor, qmin: int):
        super().__init__()
        self.qmin = qmin
        self.register_buffer("table", table)  # (2^bits,) output codes

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        from qswap.quant.integer import apply_lut
        return apply_lut(codes, self.table, self.qmin)


@serializable(params=Obj("SoftmaxParams"), dim=Opt(INT))
class IntegerSoftmax(nn.Module):
    """Softmax on codes: ``qswap.quant.integer.integer_softmax`` along ``dim``."""

    def __init__(self, params, dim: int | None):
        super().__init__()
        self.params, self.dim = params, -1 if dim is None else dim

    def forward(self, codes: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        from qswap.quant.integer import integer_softmax
        return integer_softmax(codes, self.params, blocked, self.dim)


@serializable(params=Obj("GluParams"), dim=INT)
class IntegerGLU(nn.Module):
    """GLU on codes: ``qswap.quant.integer.integer_glu`` along ``dim``."""

    def __init__(self, params, dim: int):
        super().__init__()
        self.params, self.dim = params, dim

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        from qswap.quant.integer import integer_glu
        return integer_glu(codes, self.params, self.dim)
