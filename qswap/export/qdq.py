"""Export-time stand-ins for qswap's quantizers: each one computes what the quantizer computes and
traces to ONNX QuantizeLinear / DequantizeLinear nodes that carry the quantizer's own grid.

=================  ==========================================  ===================================
qswap module       stand-in                                    ONNX nodes
=================  ==========================================  ===================================
FakeQuantize       ``ActivationQDQ`` (frozen grid of <= 8      QuantizeLinear -> DequantizeLinear
(activation)       bits, as uint8 codes: zero point + 128 if   (fewer codes: QuantizeLinear ->
                   signed)                                     Clip (uint8) -> DequantizeLinear)
FakeQuantize       ``WeightDQ`` (codes of the weight, <= 8     int8 initializer -> DequantizeLinear
(weight)           bits, per tensor or per channel)            (<= 4 bits: INT4 -> Cast -> DQ)
BiasQuantize       ``BiasDQ`` (int32 codes at s_in * s_w)      int32 initializer -> DequantizeLinear
=================  ==========================================  ===================================

Weight and bias codes are read once, by an eager ``record`` forward before tracing (the
stand-ins keep them as buffers, so the trace stores them as integer initializers).

An activation grid with fewer codes than uint8's 256 (4-bit activations: 16 codes; a narrow
range: 255) is the 8-bit QuantizeLinear followed by a ``Clip`` of its uint8 codes to the grid's
codes ``[qmin, qmax]`` (``qmin + 128`` on a signed grid). ONNX's QuantizeLinear rounds half to
even and saturates to 0..255; the clip then saturates to the grid, which together is the fake
quantizer's ``clamp(round_half_even(x / s) + z, qmin, qmax)``: the same codes, integer arithmetic
after the rounding. Why not ONNX's INT4 QuantizeLinear (opset 21): onnxruntime 1.32 runs it, but
its QDQ fusions take 8-bit codes only, so every matmul next to a 4-bit activation would run in
float; the clipped uint8 codes keep its integer kernels (QGemm, QLinearMatMul, QLinearConv,
QLinearAdd), which accumulate the 4-bit codes' products in int32 as they do 8-bit ones. The
graph's codes tensors then hold 4-bit values in 8-bit storage: activations take no less memory
than at 8 bits.
"""
from __future__ import annotations

import torch
from torch import nn

from qswap.errors import ExportError
from qswap.quant.bias import BiasQuantize
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.primitives import quantize
from qswap.quant.spec import QuantSpec


class _QDQFunction(torch.autograd.Function):
    """Fake quantization of ``x`` on a frozen grid; traces to QuantizeLinear + DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        if scale.dim() == 0:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        # torch's kernel takes an int32 zero point; the uint8 one is what QuantizeLinear reads
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis % x.dim(),
                                                      qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, axis):
        q = g.op("QuantizeLinear", x, scale, zero_point, axis_i=axis)
        if (qmin, qmax) != (0, 255):  # a grid with fewer codes: saturate the uint8 codes to it
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=torch.uint8)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8)))
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


class _DQFunction(torch.autograd.Function):
    """Floats of integer ``codes``: ``(codes - zero_point) * scale``; traces to DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):
        shape = [1] * codes.dim()
        if scale.dim() == 1 and codes.dim() > 0:
            shape[axis] = -1
        return (codes.float() - zero_point.float().reshape(shape or ())) * scale.reshape(shape or ())

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


UINT8_OFFSET = 128  # a signed 8-bit grid's codes as uint8: zero point + 128


class _CodesFunction(torch.autograd.Function):
    """uint8 codes of ``x``, values on the grid ``(scale, zero_point)`` (per tensor, uint8 zero
    point): ``round(x / scale) + zero_point``, exact for grid values whatever the rounding;
    traces to QuantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        return torch.clamp(torch.round(x / scale) + zero_point.float(), 0, 255).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("QuantizeLinear", x, scale, zero_point)


def to_codes(values: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The uint8 codes of ``values`` that lie on ``grid`` (``activation_grid``'s scale and zero
    point); a QuantizeLinear in a trace."""
    return _CodesFunction.apply(values, *grid)


def from_codes(codes: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The values of uint8 ``codes`` on ``grid``, as the fake-quant model computes them
    (``(codes - zero_point) * scale`` in float32); a DequantizeLinear in a trace."""
    return _DQFunction.apply(codes, *grid, 0)


def activation_grid(source: FakeQuantize) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen activation quantizer's grid as the graph holds it: its float32 scale and its zero
    point as uint8 (+ 128 on a signed grid: codes 0..255 hold the values of codes -128..127)."""
    offset = UINT8_OFFSET if source.spec.signed else 0
    scale = source.scale.detach().float().clone()
    scale = scale.reshape(()) if source.spec.granularity == "per_tensor" else scale
    return scale, (source.zero_point.detach() + offset).to(torch.uint8).reshape(scale.shape).clone()


def _zero_point_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.signed else torch.uint8


class ActivationQDQ(nn.Module):
    """A frozen activation FakeQuantize as QuantizeLinear -> DequantizeLinear (at most 8 bits,
    round half to even, as ONNX's QuantizeLinear rounds; a grid with fewer codes than uint8 has
    its codes clipped to the grid's between the two: see the module's docstring)."""

    def __init__(self, source: FakeQuantize, site: str):
        super().__init__()
        spec = source.spec
        self.source, self.site = source, site
        self.problem = activation_problem(source, site)  # raised if the stand-in runs
        if self.problem is not None:
            return
        # a signed grid as uint8 codes: scale s, zero point z + 128, codes 0..255 hold exactly the
        # values of codes -128..127 with zero point z (onnxruntime's x86 integer kernels take
        # uint8 activations; it would convert a shared int8 Q/DQ pair less often than not)
        offset = UINT8_OFFSET if spec.signed else 0
        self.qmin, self.qmax = spec.qmin + offset, spec.qmax + offset
        self.axis = spec.channel_axis if spec.channel_axis is not None else 1
        scale, zero_point = activation_grid(source)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.source.enabled:
            return x
        if self.problem is not None:
            raise ExportError(self.problem)
        return _QDQFunction.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)


class WeightDQ(nn.Module):
    """A weight FakeQuantize as int8 codes (a buffer, recorded from the weight by an eager forward)
    and DequantizeLinear with the quantizer's scale and zero point."""

    def __init__(self, source: FakeQuantize, site: str):
        super().__init__()
        spec = source.spec
        self.problem = None  # raised if the stand-in runs
        if spec.bits > 8:
            self.problem = (f"{site}: ONNX QDQ cannot express {spec.bits}-bit weights; int8 "
                            f"initializers hold at most 8 bits: use 8 bits or fewer for this site")
        elif spec.granularity == "per_group":
            self.problem = (f"{site}: ONNX QDQ cannot express a per_group weight grid yet (blocked "
                            f"DequantizeLinear needs opset 21): use per_channel or per_tensor")
        self.source, self.site, self.recording = source, site, False
        self.register_buffer("codes", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def four_bit(self) -> bool:
        """Whether the graph stores this weight's codes as INT4 / UINT4 (``qswap.export.compact``)."""
        return self.source.enabled and self.problem is None and self.source.spec.bits <= 4

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.source.enabled:
            return w
        if self.problem is not None:
            raise ExportError(self.problem)
        if self.recording:
            out = self.source(w)  # derives the grid from the weight, as inference does
            spec = self.source.spec
            codes = quantize(w.detach(), self.source.scale, self.source.zero_point, spec).to(
                _zero_point_dtype(spec))
            if self.codes is not None and not torch.equal(codes, self.codes):
                raise ExportError(f"{self.site}: one weight quantizer quantizes two different "
                                  f"weights in one forward; the graph stores one set of codes per "
                                  f"quantizer: give each weight its own quantizer")
            self.codes = codes
            self.scale = self.source.scale.detach().float().clone()
            self.zero_point = self.source.zero_point.detach().to(_zero_point_dtype(spec)).clone()
            return out
        if self.codes is None:
            raise ExportError(f"{self.site}: weight codes were not recorded; export through "
                              f"qswap.export.export_encoder, which records them first")
        axis = self.source.spec.channel_axis or 0
        return _DQFunction.apply(self.codes, self.scale, self.zero_point, axis % self.codes.dim())


class BiasDQ(nn.Module):
    """A BiasQuantize as int32 codes on the grid ``input_scale * weight_scale`` and
    DequantizeLinear (ONNX's int32 bias of QLinearConv / QLinearMatMul fusions)."""

    def __init__(self, source: BiasQuantize, site: str):
        super().__init__()
        self.source, self.site, self.recording = source, site, False
        self.float_bias = False
        self.register_buffer("codes", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def forward(self, bias, input_quant, weight_quant, rows=None):
        if self.recording:
            return self._record(bias, input_quant, weight_quant, rows)
        if self.float_bias or bias is None:
            return bias
        if self.codes is None:
            raise ExportError(f"{self.site}: bias codes were not recorded; export through "
                              f"qswap.export.export_encoder, which records them first")
        return _DQFunction.apply(self.codes, self.scale, self.zero_point, 0)

    def _record(self, bias, input_quant, weight_quant, rows):
        sources = [getattr(q, "source", q) for q in (input_quant, weight_quant)]
        out = self.source(bias, *sources, rows)
        if out is bias or bias is None:  # nothing to align to: the bias stays float
            self.float_bias = True
            return bias
        # one scale per tensor (a per-tensor weight) stays a scalar: the graph stores it once
        scale = self.source.last_scale.detach().float().clone()
        scale = scale.reshape(()) if scale.numel() == 1 else scale
        self.codes = torch.round(out.detach() / scale).to(torch.int32)
        self.scale, self.zero_point = scale, torch.zeros(scale.shape, dtype=torch.int32)
        return out


def activation_problem(source: FakeQuantize, site: str) -> str | None:
    """Why this activation quantizer cannot be exported, or None."""
    spec = source.spec
    if not (source.initialized and bool(source.frozen)):
        return (f"{site}: activation quantizer is not calibrated (no frozen grid); run "
                f"qswap.calibrate on the model (or load a calibrated checkpoint) first")
    checks = ((spec.bits <= 8, f"a {spec.bits}-bit activation grid; the graph's activation codes are "
               f"uint8: use 8 bits or fewer for this site"),
              (spec.rounding == "half_even", f"rounding '{spec.rounding}'; ONNX QuantizeLinear rounds "
               f"half to even: use rounding half_even for this site"),
              (spec.granularity != "per_group", "a per_group activation grid"))
    for ok, what in checks:
        if not ok:
            return f"{site}: ONNX QDQ cannot express {what}"
    return None


def swap_in_stand_ins(model: nn.Module, *beside: nn.Module) -> list[nn.Module]:
    """Replace every FakeQuantize and BiasQuantize of ``model`` (in place: pass a copy) by its
    stand-in; a quantizer shared by several parents gets one stand-in. ``beside``: trees holding
    some of the same quantizers at other paths (the quantized model a traced wrapper reads its
    modules from): their parents get the same stand-ins, and their other quantizers stand-ins
    too. Returns the stand-ins."""
    found: list[tuple[nn.Module, str, nn.Module, str]] = []
    for root in (model, *beside):
        for parent_name, parent in root.named_modules():
            for name, child in parent.named_children():
                if isinstance(child, (FakeQuantize, BiasQuantize)):
                    found.append((parent, name, child, f"{parent_name}.{name}".lstrip(".")))
    made: dict[int, nn.Module] = {}
    for parent, name, child, site in found:  # walk, collect, then replace
        if id(child) not in made:
            made[id(child)] = _stand_in(child, site)
        setattr(parent, name, made[id(child)])
    return list(made.values())


def _stand_in(module: nn.Module, site: str) -> nn.Module:
    if isinstance(module, BiasQuantize):
        return BiasDQ(module, site)
    if module.kind == "weight":
        return WeightDQ(module, site)
    if not module.enabled:
        return nn.Identity()
    return ActivationQDQ(module, site)
