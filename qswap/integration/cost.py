"""MACs and bit-operations (BOPs) of one forward pass, as the field reports them.

A dispatch mode counts multiply-accumulates of every matmul / convolution / attention kernel
with torch's own flop formulas (``torch.utils.flop_counter``), and weighs each by the bit widths
of its two operands: BOPs = MACs x bits(a) x bits(b). An operand's width is that of the qswap
quantizer that produced it, carried through views, copies, scalar rescaling and masking; any
other operand counts as 32-bit float.

``parameter_bytes`` sizes the weights: every parameter at the bit width of its quantizer
(``qswap.nn.base.param_quantizer``: ``{param}_quant``, or the counterpart's declared exception),
plus the grids that decode them (``grid_bits``): a float32 scale per tensor, per channel or per
group, and an affine grid's zero points at the codes' width. Per-group grids are not free: 4-bit
weights in groups of 16 store 6 bits a weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from qswap.nn.base import param_quantizer
from qswap.nn.simulate import simulating
from qswap.quant.fake_quantize import FakeQuantize, quantizes

FLOAT_BITS = 32
aten = torch.ops.aten
_CARRY = {aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.t, aten.permute,
          aten.expand, aten.clone, aten.contiguous, aten.slice, aten.select, aten.unsqueeze,
          aten.squeeze, aten.cat, aten.split, aten.chunk, aten.masked_fill, aten.alias,
          aten.detach, aten._to_copy, aten.index_select, aten.embedding, aten.split_with_sizes,
          aten.unbind, aten.repeat, aten.constant_pad_nd, aten.narrow}
_SCALAR_RESCALE = {aten.mul, aten.div}


def _sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


# fused attention kernels torch's flop_registry lacks: the CPU one fairseq's float self-attention
# reaches (F.multi_head_attention_forward -> scaled_dot_product_attention), and the backend-
# overridable one; counted with torch's formula for the others (the math one decomposes into bmm)
_FUSED_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
                    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_flops}


def _batch_norm_flops(x, *args, out_val=None, **kwargs) -> int:
    """An inference BatchNorm is one multiply-add per element (``x * a + b``, its statistics folded):
    counted as the quantized model's BatchNorm, a 1x1 depthwise convolution of the folded weights,
    is (the float conformer's had counted 0 MACs, the quantized one's C x T per layer)."""
    return 2 * x.numel()


_BATCH_NORM = {aten._native_batch_norm_legit_no_training: _batch_norm_flops,
               aten.native_batch_norm: _batch_norm_flops}


@dataclass(frozen=True)
class Cost:
    macs: float
    bops: float
    audio_seconds: float

    @property
    def macs_per_second(self) -> float:
        return self.macs / max(self.audio_seconds, 1e-9)

    @property
    def bops_per_second(self) -> float:
        return self.bops / max(self.audio_seconds, 1e-9)


class _CostMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bits = WeakIdKeyDictionary()  # tensor (by identity) -> bit width
        self.macs = 0.0
        self.bops = 0.0

    def width(self, t) -> int:
        return self.bits.get(t, FLOAT_BITS) if isinstance(t, torch.Tensor) else FLOAT_BITS

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        flops = flop_registry.get(packet) or _FUSED_ATTENTION.get(packet) or _BATCH_NORM.get(packet)
        if flops is not None:
            macs = flops(*args, **kwargs, out_val=out) / 2
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if packet in (aten.addmm, aten.baddbmm):
                tensors = tensors[1:]
            a, b = (tensors + [None, None])[:2]
            self.macs += macs
            self.bops += macs * self.width(a) * self.width(b)
        elif packet in _CARRY or (packet in _SCALAR_RESCALE and not isinstance(args[1], torch.Tensor)):
            widths = [self.width(a) for a in args if isinstance(a, torch.Tensor)]
            for a in args:
                if isinstance(a, (list, tuple)):
                    widths += [self.width(t) for t in a if isinstance(t, torch.Tensor)]
            if widths and max(widths) < FLOAT_BITS:
                for o in (out if isinstance(out, (list, tuple)) else [out]):
                    if isinstance(o, torch.Tensor):
                        self.bits[o] = max(widths)
        return out


def measure(model: torch.nn.Module, run, audio_seconds: float) -> Cost:
    """Count MACs and BOPs of ``run(model)`` (one forward), normalized to ``audio_seconds``.
    The forward runs with ``simulate: float`` (``qswap.nn.simulate``): the operand widths are the
    quantizers' whatever the simulation, and ``simulate: integer`` feeds its exact GEMMs codes it
    derives from the quantizers' outputs (which this count would read as float operands)."""
    mode = _CostMode()
    handles = [m.register_forward_hook(_tag(mode)) for m in model.modules() if isinstance(m, FakeQuantize)]
    try:  # the hooks live only for this measurement and are removed whatever happens
        with torch.no_grad(), simulating(model, "float"), mode:
            run(model)
    finally:
        for h in handles:
            h.remove()
    return Cost(mode.macs, mode.bops, audio_seconds)


def _tag(mode: _CostMode):
    def hook(module: FakeQuantize, inputs, output):
        if module.enabled and isinstance(output, torch.Tensor):
            mode.bits[output] = module.spec.bits
    return hook


SCALE_BITS = 32  # a stored scale: float32, as qswap's checkpoints and ONNX exports keep it


def grid_count(spec, shape: torch.Size) -> int:
    """How many grids (scales) a weight of ``shape`` has under ``spec``: 1 per tensor, one per
    slice along ``axis`` per channel, one per block of ``group_size`` along ``axis`` per group
    (convert refuses a group size that does not divide that axis)."""
    if spec.granularity == "per_tensor" or not len(shape):
        return 1
    dims = list(shape)
    if spec.granularity == "per_channel":
        return dims[spec.axis if spec.axis is not None else 0]
    axis = spec.axis if spec.axis is not None else -1
    length = dims[axis]
    rows = 1
    for i, d in enumerate(dims):
        if i != axis % len(dims):
            rows *= d
    return rows * -(-length // spec.group_size)


def grid_bits(spec, shape: torch.Size) -> int:
    """Bits that store the grids of one quantized weight: a float32 scale each, and for an affine
    (asymmetric) grid a zero point each at the codes' width."""
    per_grid = SCALE_BITS + (0 if spec.symmetric else spec.bits)
    return grid_count(spec, shape) * per_grid


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every unique parameter in float32, bytes as the quantized model stores them): a
    parameter with an enabled FakeQuantize at its quantizer's width, plus that quantizer's grids
    once (``grid_bits`` of the largest parameter it quantizes: a weight-normed convolution's
    ``weight_v``, not also its ``weight_g``); any other parameter as float32. A tensor shared by
    several modules (a tied embedding and output projection) is stored in float32 if any of them
    reads it without an enabled quantizer (a skipped owner computes with its float values). A
    buffer a weight quantizer reads and the state dict stores (an online Hadamard transform's
    ``matrix``; not a sinusoidal position table, recomputed when loaded) is sized as a weight. A
    quantizer's own parameters (LSQ's learned scales) are grids, not weights: a weight grid's are
    counted by ``grid_bits``, an activation grid's not at all (as before calibration sets them)."""
    bits: dict[int, int] = {}
    numel: dict[int, int] = {}
    grids: dict[int, tuple[int, int]] = {}  # quantizer id -> (numel it sized by, grid bits)
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            continue  # a learned (LSQ) scale is a grid: counted by grid_bits with the weight it decodes
        quantized_buffers = [(name, b) for name, b in module.named_buffers(recurse=False)
                             if name not in module._non_persistent_buffers_set  # noqa: SLF001
                             and _weight_quantizer(module, name) is not None]
        for pname, param in list(module.named_parameters(recurse=False)) + quantized_buffers:
            numel[id(param)] = param.numel()
            quant = param_quantizer(module, pname)
            width = FLOAT_BITS
            if quantizes(quant):
                width = quant.spec.bits
                if quant.kind == "weight" and param.numel() > grids.get(id(quant), (-1, 0))[0]:
                    # (an activation quantizer that also reads a parameter, fairseq's bias_k through the
                    # core's k_quant, keeps one grid for the activations: not the parameter's to store)
                    grids[id(quant)] = (param.numel(), grid_bits(quant.spec, param.shape))
            bits[id(param)] = max(bits.get(id(param), 0), width)  # a float reader keeps it float32
    float_bytes = sum(n * 4 for n in numel.values())
    stored = sum(numel[i] * bits[i] for i in numel) + sum(g for _, g in grids.values())
    return float_bytes, stored // 8


def _weight_quantizer(module: torch.nn.Module, name: str) -> FakeQuantize | None:
    quant = param_quantizer(module, name)
    return quant if quantizes(quant) and quant.kind == "weight" else None
