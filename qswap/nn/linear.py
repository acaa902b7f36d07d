"""Linear and convolution counterparts: quantized input, weight and (int32-grid) bias."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qswap.errors import ConvertError
from qswap.io.serializable import INT, STR, Either, List, Named, Obj, Opt, Tensor, serializable
from qswap.nn.base import QuantConfig, QuantModule, derived_weight, own, quantizer
from qswap.nn.registry import register
from qswap.nn.simulate import (cached, centered_codes, forget, form_or_none, grid_of, onto_grid, reader_grid,
                                requants_to, simulates, straight_through, stream_grid_of, values_onto)
from qswap.quant.bias import BiasQuantize, quantized_pair
from qswap.quant.fake_quantize import consume, quantizes


class _Weighted(QuantModule):
    """Shared shape of a weighted op: input_quant -> op(x, weight_quant(W), bias_quant(b))."""

    sites = {"input": "activation", "weight": "weight"}
    takes_reader = True
    # whether the output's channels are its last axis (a linear's, not a convolution's (B, C, T)):
    # the integer form then requantizes onto a reader's grid per channel of that axis too
    channels_last = False

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, config: QuantConfig,
                 quantize_input: bool = True):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.input_quant = quantizer(config, self.sites, "input") if quantize_input else nn.Identity()
        self.weight_quant = quantizer(config, self.sites, "weight")
        self.bias_quant = BiasQuantize()
        self.simulate = config.simulate
        # the quantizer reading the result where the caller is fairseq's code, which passes no
        # out_quant (wav2vec 2.0's CTC projection, read by the model's logits_quant): a plain
        # list, set by the parent's bind_readers, so the reader stays the parent's child only
        self.bound_readers: list = []

    def quantized_params(self, input_quant: nn.Module | None = None) -> tuple:
        weight, bias, own_input, weight_quant, bias_quant = own(self, "weight", "bias", "input_quant", "weight_quant",
                                                                "bias_quant")
        return quantized_pair(weight, bias, input_quant or own_input, weight_quant, bias_quant)

    def float_weight(self) -> torch.Tensor:
        """The float weight ``weight_quant`` quantizes (a weight-normed conv's is derived)."""
        return self.weight

    def forward(self, x: torch.Tensor, out_quant: nn.Module | list | None = None, *,
                owned: bool = False, quantized: bool = False) -> torch.Tensor | list:
        """``op(input_quant(x))``. ``out_quant``: the quantizer that reads the result; with
        ``simulate: integer`` the result is then the integer form's output codes on its grid
        (exact int32 accumulation, its fixed-point requantization: ``onto_grid``) as values, with
        the op's gradient. A list of quantizers: a list of results, one each (``onto_each``).
        ``owned``: ``x`` is a temporary the caller hands over, which the input quantizer may round
        in place (``consume``). ``quantized``: ``x`` is the input quantizer's output already (the
        layer rounded it onto both its grid and the one before in one pass: ``consume_twice``)."""
        if out_quant is None and getattr(self, "bound_readers", None):
            out_quant = self.bound_readers[0]  # a caller outside qswap (fairseq's) passes none
        if isinstance(out_quant, list):
            return self.onto_each(x, out_quant)
        xq = x if quantized else consume(self.input_quant, x) if owned else self.input_quant(x)
        if out_quant is None or not simulates(self):  # op_onto's answer without integer insides
            return self.op(xq)
        if not torch.is_grad_enabled():
            self.float_weight()  # a derived weight computed here, in the forward (the audit sees it derived)
        return op_onto(self, xq, self.input_quant, out_quant, lambda: self.op(xq),
                       lambda grid_in, grid_out, derived=False: self.to_integer(grid_out, derived=derived),
                       channels=self.channels_last)

    def onto_each(self, x: torch.Tensor, readers) -> list:
        """``op(input_quant(x))`` as each of ``readers`` (quantizers) reads it: with ``simulate:
        integer`` at inference, the integer form's int32 accumulator (``to_integer(None)``) computed
        once and requantized onto each reader's grid in fixed point, as values (what the integer
        model computes for a result several grids read: wav2vec 2.0's feature projection, read by
        the positional conv and its residual); else the op's result for each."""
        xq = self.input_quant(x)
        grid_in = grid_of(self.input_quant) if simulates(self) and not forget(self, "_integer_onto_each") else None
        # a linear's readers may be per channel of its output axis (a conformer's per-channel stream)
        grids = [stream_grid_of(r, frozen_only=True) if self.channels_last else reader_grid(r) for r in readers] \
            if grid_in is not None else [None]
        built = None
        if None not in grids:
            def build():
                form = form_or_none(self.to_integer, None)
                requants = None if form is None else requants_to(form.stream_scale, grids)
                return None if requants is None else (form, requants)
            weights = [t for t in (getattr(self, n, None) for n in ("weight", "weight_v", "weight_g", "bias"))
                       if t is not None]
            if getattr(self.weight_quant, "scale", None) is not None:
                weights.append(self.weight_quant.scale)
            built = cached(self, "_integer_onto_each", build, self.input_quant.scale, self.input_quant.zero_point,
                           *weights, *(r.scale for r in readers), *(r.zero_point for r in readers))
        if built is None:
            y = self.op(xq)
            return [y for _ in readers]
        form, requants = built
        with torch.no_grad():
            acc = form.simulated(centered_codes(xq, grid_in), None, grid_in.span)  # int32 accumulator
            return [values_onto(q, r, acc, g, form._channel_axis) for q, r, g in zip(readers, requants, grids)]


@register(nn.Linear)
class QLinear(_Weighted):
    """``F.linear`` on a quantized input and weight.

    >>> QLinear.from_float(nn.Linear(4, 8), QuantConfig(QuantSpec(), QuantSpec()))
    """

    channels_last = True

    def __init__(self, weight, bias, config, quantize_input=True):
        super().__init__(weight, bias, config, quantize_input)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_float(cls, module: nn.Linear, config: QuantConfig) -> "QLinear":
        return cls(module.weight, module.bias, config)

    def op(self, xq: torch.Tensor) -> torch.Tensor:
        """The op on an input ``input_quant`` has quantized."""
        return F.linear(xq, *self.quantized_params())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def to_integer(self, out: "Grid | None", derived: bool = False) -> "IntegerLinear":
        """The integer form of this QLinear writing codes of the grid ``out`` (its consumer's input
        grid): int8 weight codes (per-group weights: their codes times each group's multiplier,
        int16, on a per-channel grid: ``group_weight_codes``), int32 bias codes at ``s_in * s_w``
        (the BiasQuantize rounding),
        requantization by ``s_in * s_w / s_out`` per tensor or per output channel. With ``out``
        None (a model's last op) it returns the int32 accumulator, whose scale is
        ``IntegerLinear.acc_scale``. ``derived``: this forward has just derived the weight's grid
        (``integer_linear``)."""
        from qswap.quant.integer import Grid
        return integer_linear(self.weight_quant, self.weight, self.bias, Grid.of(self.input_quant), out,
                              derived=derived)


def _weight_norm_dim(module: nn.Module) -> int | None:
    """The ``dim`` of a ``torch.nn.utils.weight_norm`` hook on ``module.weight``, else None."""
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook.dim
    return None


class _QConvNd(_Weighted):
    """A weight-normed conv (``nn.utils.weight_norm``, e.g. wav2vec 2.0's positional conv) keeps
    ``weight_g`` and ``weight_v``; ``g * v / ||v||`` is computed from them (weight preprocessing)
    and the result goes through ``weight_quant``."""

    conv_fn = None
    param_quantizers = {"weight_g": "weight_quant", "weight_v": "weight_quant"}

    def __init__(self, module, config):
        norm_dim = _weight_norm_dim(module)
        super().__init__(module.weight if norm_dim is None else None, module.bias, config)
        if norm_dim is not None:
            self.weight_g, self.weight_v, self.weight_norm_dim = module.weight_g, module.weight_v, norm_dim
        if isinstance(module.padding, str) and module.padding_mode != "zeros":
            raise ConvertError(f"{type(module).__name__} with padding='{module.padding}' and "
                               f"padding_mode='{module.padding_mode}' is not supported")
        self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        self.groups, self.padding_mode = module.groups, module.padding_mode
        self._pad = getattr(module, "_reversed_padding_repeated_twice", None)

    def quantized_params(self, input_quant: nn.Module | None = None) -> tuple:
        if self.weight is not None:
            return super().quantized_params(input_quant)
        w = self.weight_quant(self.float_weight())
        return w, self.bias_quant(self.bias, input_quant or self.input_quant, self.weight_quant)

    def float_weight(self) -> torch.Tensor:
        """``weight``, or a weight-normed conv's ``g * v / ||v||`` (a derived weight, kept while
        ``weight_g`` and ``weight_v`` are unchanged: ``derived_weight``)."""
        if self.weight is not None:
            return self.weight
        return derived_weight(self, "_normed_weight", self._normed, self.weight_g, self.weight_v)

    def _normed(self) -> torch.Tensor:
        """A weight-normed conv's ``g * v / ||v||``, computed now."""
        return torch._weight_norm(self.weight_v, self.weight_g, self.weight_norm_dim)

    @classmethod
    def from_float(cls, module, config):
        return cls(module, config)

    def op(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of an input ``input_quant`` has quantized."""
        w, b = self.quantized_params()
        padding = self.padding
        if self.padding_mode != "zeros":  # reflect/replicate/circular padding only moves data
            x, padding = F.pad(x, self._pad, mode=self.padding_mode), 0
        return type(self).conv_fn(x, w, b, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        shape = (self.weight if self.weight is not None else self.weight_v).shape
        norm = "" if self.weight is not None else f", weight_norm(dim={self.weight_norm_dim})"
        return (f"{shape[1] * self.groups}, {shape[0]}, kernel_size={tuple(shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}{norm}")

    def to_integer(self, out: "Grid | None", derived: bool = False) -> "IntegerConv":
        """The integer form writing codes of ``out`` (its consumer's input grid): as
        ``QLinear.to_integer``, the convolution itself on int32 (``torch`` convolves int32 on
        CPU). A weight-normed conv's codes are those of ``g * v / ||v||`` (its weight
        preprocessing, constant at inference). Zero padding only. ``derived``: as
        ``QLinear.to_integer``."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import Grid
        if self.padding_mode != "zeros":
            raise IntegerizeError(f"a convolution with padding_mode={self.padding_mode!r} has no integer form yet")
        with torch.no_grad():
            # a training forward (``derived``) keeps no derived weight: its optimizer may write
            # weight_g / weight_v through ``.data``, which no stamp sees (``derived_weight``)
            weight = self._normed() if derived and self.weight is None else self.float_weight()
        return integer_linear(self.weight_quant, weight, self.bias, Grid.of(self.input_quant), out,
                              IntegerConv, derived=derived, conv_fn=type(self).conv_fn, stride=self.stride,
                              padding=self.padding, dilation=self.dilation, groups=self.groups)


@register(nn.Conv1d)
class QConv1d(_QConvNd):
    conv_fn = staticmethod(F.conv1d)


@register(nn.Conv2d)
class QConv2d(_QConvNd):
    conv_fn = staticmethod(F.conv2d)


def op_onto(owner: nn.Module, xq: torch.Tensor, input_quant: nn.Module, out_quant: nn.Module, op,
            to_integer, channels: bool = False, weights: tuple | None = None) -> torch.Tensor:
    """A weighted op on ``xq`` (``op()``: its float result) as ``out_quant`` reads it: the integer
    form's values (``onto_linear``; ``to_integer(grid_in, grid_out, derived=...)`` builds it) where
    there is one, else ``op()``. Under autograd (a training step) ``op()`` runs first, deriving the
    weight's grid from the current weight, and the form is built on that grid (``derived=True``,
    not derived a second time); the result is the form's values with ``op()``'s gradient."""
    if torch.is_grad_enabled():
        y = op()
        value = onto_linear(owner, xq, input_quant, out_quant, functools.partial(to_integer, derived=True),
                            channels=channels, weights=weights)
        return y if value is None else straight_through(value, y, out_quant)
    value = onto_linear(owner, xq, input_quant, out_quant, to_integer, channels=channels, weights=weights)
    return op() if value is None else value


def onto_linear(owner: nn.Module, xq: torch.Tensor, input_quant: nn.Module, out_quant: nn.Module,
                to_integer, channels: bool = False, weights: tuple | None = None) -> torch.Tensor | None:
    """The integer form ``to_integer(grid_in, grid_out)`` of ``owner``, a weighted op (its
    ``weight`` or ``weight_v`` and ``weight_g``, ``weight_quant`` and ``bias``), on ``xq``, the
    output of ``input_quant``, writing onto ``out_quant``'s grid, as values (``onto_grid``); None
    without integer simulation, per-tensor grids or an integer form (e.g. a convolution's
    per-group weights; a Linear's have one, ``qswap.quant.integer.group_weight_codes``).
    ``channels``: ``out_quant``'s grid may be per channel of the last axis (the op's output
    channels: a linear's). Under autograd (a training step) the callers run the float op first,
    which derives the weight's grid from the current weight, and build the form with
    ``derived=True``, reading that grid rather than deriving it again (``integer_linear``).
    ``weights``: the tensors the form is built from besides the input grid, by whose stamp it is
    kept (default: ``owner``'s, above, and ``weight_quant``'s scale)."""
    grid_in = grid_of(input_quant) if simulates(owner) else None
    if grid_in is None:
        return None
    if weights is None:
        named = (getattr(owner, name, None) for name in ("weight", "weight_v", "weight_g", "bias"))
        weights = (*(t for t in named if t is not None), getattr(owner.weight_quant, "scale", None))
    sources = [input_quant.scale, input_quant.zero_point, *(t for t in weights if t is not None)]
    return onto_grid(owner, "_integer_onto", functools.partial(to_integer, grid_in), out_quant,
                     lambda form, out: form.simulated(centered_codes(xq, grid_in),
                                                      out.scale if isinstance(out.scale, float) else None, grid_in.span),
                     *sources, channels=channels)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

def integer_linear(weight_quant: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, grid_in,
                   out, form: type | None = None, weight_shape: tuple | None = None, derived: bool = False,
                   **conv) -> "IntegerLinear":
    """``IntegerLinear`` of ``F.linear(x, weight_quant(weight), bias)`` with ``x`` on ``grid_in``
    writing onto ``out`` (or the int32 accumulator when ``out`` is None); ``form=IntegerConv``
    and the conv's arguments for a convolution (the fan-in is ``weight[0].numel()``).
    ``weight_shape``: the codes' shape in the form where ``weight`` is quantized in another one
    (a folded BatchNorm's (C,) scale, quantized as the fake-quant forward quantizes it, as a
    depthwise 1x1 convolution's (C, 1, 1) weight). ``derived``: the caller's forward has just run
    ``weight_quant(weight)`` on this weight (a training step's float op, before its integer form),
    so the weight's grid is read, not derived a second time (``qswap.quant.integer._grid_codes``)."""
    from qswap.errors import IntegerizeError
    from qswap.quant.integer import Requant, bias_codes, check_bound, group_weight_codes, weight_codes
    span = max(grid_in.qmax - grid_in.zero_point, grid_in.zero_point - grid_in.qmin)
    row_bound = None
    if quantizes(weight_quant) and weight_quant.spec.granularity == "per_group":
        if form is not None or weight_shape is not None:
            raise IntegerizeError(f"{weight_quant.spec.short()} weights have an integer form in a Linear "
                                  f"only; use per_tensor or per_channel here")
        w_codes, w_scale, row_bound = group_weight_codes(weight_quant, weight, span=span, in_scale=grid_in.scale,
                                                         bias=bias, derived=derived)
    else:
        if quantizes(weight_quant) and \
                weight_quant.spec.granularity == "per_channel" and weight_quant.spec.channel_axis % weight.dim() != 0:
            raise IntegerizeError(f"{weight_quant.spec.short()} weights vary their scale along an input axis, the "
                                  f"sum of the product: the int32 accumulator, its bias and its requantization need "
                                  f"one scale per output channel; use axis: 0 (or per_group along the input) for "
                                  f"integer execution (the fake-quant model computes this op in float)")
        w_codes, w_scale = weight_codes(weight_quant, weight, derived=derived)
    if weight_shape is not None:
        w_codes, weight = w_codes.reshape(weight_shape), weight.reshape(weight_shape)
    acc_scale = torch.tensor(grid_in.scale, dtype=torch.float32) * w_scale  # float32, as BiasQuantize
    codes = bias_codes(bias, acc_scale)
    bias_max = 0 if codes is None else int(codes.to(torch.int64).abs().max())
    # per-group weights: the rows' exact worst case (their k was chosen under it); else the
    # coarser in_features * span * max|w| + max|b|
    check_bound(f"{'Conv' if conv else 'Linear'} of fan-in {weight[0].numel()} -> {weight.shape[0]}",
                row_bound if row_bound is not None
                else weight[0].numel() * span * int(w_codes.to(torch.int64).abs().max()) + bias_max)
    requant = None if out is None else Requant.from_scales(acc_scale.double() / out.scale, out.zero_point,
                                                           out.qmin, out.qmax)
    return (form or IntegerLinear)(grid_in.zero_point, w_codes, codes, requant, acc_scale, **conv)


# an input grid's zero point: one of its codes, of at most 16 bits (signed or unsigned)
ZERO_POINT_RANGE = (-(2 ** 15), 2 ** 16 - 1)


@serializable(zero_point_in=INT, weight=Tensor("int8", "int16"), bias=Opt(Tensor("int32")),
              requant=Opt(Obj("Requant")), acc_scale=Tensor("float32"))
class IntegerLinear(nn.Module):
    """``y = requant(sum_k (x_k - zp_in) w_k + b)``: int8 weights (int16 above 8 bits, and a
    Linear's per-group weights times their multipliers: ``group_weight_codes``), int32 accumulation and bias
    (bound checked when built: in_features * max|x - zp| * max|w| + max|b| < 2^31), gemmlowp
    requantization (see ``qswap.quant.integer.requantize``), saturating to the output grid; or the
    int32 accumulator itself when built without an output grid (``acc_scale``: its float scale,
    for the declared float step at a model's end)."""

    def __init__(self, zero_point_in: int, weight: torch.Tensor, bias: torch.Tensor | None, requant,
                 acc_scale: torch.Tensor):
        super().__init__()
        if not ZERO_POINT_RANGE[0] <= zero_point_in <= ZERO_POINT_RANGE[1]:  # made by hand, or an edited file
            from qswap.errors import IntegerizeError
            raise IntegerizeError(f"an integer linear's input zero point is a code of its input grid (at most 16 "
                                  f"bits: {ZERO_POINT_RANGE[0]}..{ZERO_POINT_RANGE[1]}), got {zero_point_in}")
        self.zero_point_in, self.requant = zero_point_in, requant
        self.register_buffer("weight", weight)  # (out, in) int8 (int16 above 8 bits)
        self.register_buffer("bias", bias)  # (out,) int32 or None
        self.register_buffer("acc_scale", acc_scale)  # () or (out,) float32: build/output use only

    @property
    def stream_scale(self) -> float | torch.Tensor:
        """The accumulator's grid as a stream's scale: a float, or (out,) float64 per channel."""
        return float(self.acc_scale) if self.acc_scale.numel() == 1 else self.acc_scale.double()

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = codes.to(torch.int32) - self.zero_point_in  # (..., in)
        acc = F.linear(x, self.weight.to(torch.int32), self.bias)  # (..., out) int32
        return acc if self.requant is None else self.requant(acc, axis=-1)

    def simulated(self, centered: torch.Tensor, scale: float | None = None, span: int | None = None) -> torch.Tensor:
        """``forward(centered + zero_point_in)``, the same integers, for the fake-quant simulation
        (``simulate: integer`` runs it: ``onto_linear``): ``centered`` holds the input's
        ``code - zp`` (a float tensor of integers), and the op runs on the float kernel, exactly
        (the bound of ``qswap.quant.integer.exact_gemm`` from ``span`` where that is below 2^24,
        else from the input's actual largest magnitude; the weights kept as floats of each dtype
        used), which the honesty audit
        proves per call (``qswap.honesty.gemm``). With the output grid's ``scale``: the output
        codes' values (``requantized_values``, from the accumulator cast to int32: the audit
        follows integer data through integer ops, not float arithmetic on an accumulator).
        ``span``: a bound of ``|centered|`` (the input grid's ``Grid.span``), which spares
        measuring the input where it already bounds the GEMM below 2^24."""
        from qswap.quant.integer import requantized_values
        acc = self._exact_acc(centered, span).to(torch.int32)
        if self.requant is None or scale is None:
            return acc if self.requant is None else self.requant(acc, axis=self._channel_axis)
        return requantized_values(self.requant, acc, scale, self._channel_axis)

    _channel_axis = -1
    _max_parts = 8  # split-K: at most this many float32 GEMMs before float64

    def _exact_acc(self, centered: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """The accumulator of ``centered`` (int32, or floats holding it exactly), by
        exact float GEMMs: one float32 GEMM where the
        bound of ``exact_gemm`` is below 2^24; else the reduction split into 2, 4 or 8 equal parts
        (split-K) that each stay below 2^24 (each part exact, their int32 sum exact: the build-time
        bound keeps it below 2^31), a float32 GEMM each; else one float64 GEMM."""
        from qswap.quant.integer import FLOAT32_EXACT, exact_float_dtype, magnitude
        k, w_max, bias_max = self.weight[0].numel(), self._weight_max(), self._bias_max()
        small = span is not None and k * span * w_max + bias_max < FLOAT32_EXACT  # no need to measure
        per_product = (span if small else magnitude(centered)) * w_max
        f32 = self._float32_exact(centered)  # else float64 whatever the bound
        dtype = exact_float_dtype(k * per_product + bias_max if f32 else FLOAT32_EXACT, centered.device)
        parts = 1
        if dtype == torch.float64 and f32:
            while parts < self._max_parts and -(-k // parts) * per_product + bias_max >= FLOAT32_EXACT:
                parts *= 2
            chunk = -(-k // parts)
            if chunk * per_product + bias_max < FLOAT32_EXACT and exact_float_dtype(
                    chunk * per_product + bias_max, centered.device) == torch.float32:
                dtype = torch.float32
            else:
                parts = 1
        kept = self.__dict__.setdefault("_float_params", {})
        if (dtype, parts) not in kept:
            w, b = self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
            chunk = -(-k // parts)
            kept[(dtype, parts)] = [(w[:, i:i + chunk].contiguous(), b if i == 0 else None)
                                    for i in range(0, k, chunk)]
        x = centered.to(dtype)
        if parts == 1:
            return self._op(x, *kept[(dtype, parts)][0])
        chunk, acc = -(-k // parts), None
        for i, (w, b) in zip(range(0, k, chunk), kept[(dtype, parts)]):
            part = self._op(x[..., i:i + chunk], w, b).to(torch.int32)
            acc = part if acc is None else acc + part  # out of place: the audit follows integer data
        return acc

    @staticmethod
    def _op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear`` as one GEMM with its bias (``addmm``): on a non-contiguous input of more than
        two dims ``F.linear`` runs a matmul and then adds the bias apart, a float add on integers
        the audit does not cover."""
        if x.dim() == 2:
            return F.linear(x, w, b)
        return F.linear(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])  # (..., out)

    @staticmethod
    def _float32_exact(x: torch.Tensor) -> bool:
        """Whether the float32 kernel of ``_op`` sums products on ``x`` (a GEMM always does)."""
        return True

    def _weight_max(self) -> int:
        """max |weight code|, kept (the form's weights are constants)."""
        if "_w_max" not in self.__dict__:
            self.__dict__["_w_max"] = int(self.weight.to(torch.int64).abs().max()) if self.weight.numel() else 0
        return self.__dict__["_w_max"]

    def _bias_max(self) -> int:
        if "_b_max" not in self.__dict__:
            self.__dict__["_b_max"] = 0 if self.bias is None or not self.bias.numel() else int(
                self.bias.to(torch.int64).abs().max())
        return self.__dict__["_b_max"]


@serializable(zero_point_in=INT, weight=Tensor("int8", "int16"), bias=Opt(Tensor("int32")),
              requant=Opt(Obj("Requant")), acc_scale=Tensor("float32"),
              conv_fn=Named({"conv1d": F.conv1d, "conv2d": F.conv2d}), stride=List(INT, tuple_=True),
              padding=Either(List(INT, tuple_=True), STR), dilation=List(INT, tuple_=True), groups=INT)
class IntegerConv(IntegerLinear):
    """A convolution on codes: ``conv_fn`` on ``codes - zp_in`` (zero padding is then the input's
    zero point, as the fake-quant conv pads its quantized input with 0.0), int32 accumulation,
    requantized per output channel (axis 1)."""

    def __init__(self, zero_point_in, weight, bias, requant, acc_scale, *, conv_fn, stride, padding,
                 dilation, groups):
        from qswap.errors import IntegerizeError

        # a read-back file edited so had loaded, and the first forward raised torch's RuntimeError
        if not (isinstance(groups, int) and groups >= 1 and weight.shape[0] % groups == 0):
            raise IntegerizeError(f"a convolution's groups must divide its {weight.shape[0]} output channels, "
                                  f"got {groups}")
        if not all(isinstance(v, int) and v >= 1 for v in (*stride, *dilation)):
            raise IntegerizeError(f"a convolution's stride and dilation are 1 or more, got {stride} and {dilation}")
        if not isinstance(padding, str) and not all(isinstance(v, int) and v >= 0 for v in padding):
            raise IntegerizeError(f"a convolution's padding is 0 or more, got {padding}")
        super().__init__(zero_point_in, weight, bias, requant, acc_scale)
        self.conv_fn, self.conv_args = conv_fn, (stride, padding, dilation, groups)
        self.stride, self.padding, self.dilation, self.groups = self.conv_args

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = codes.to(torch.int32) - self.zero_point_in  # (B, C, ...)
        acc = self.conv_fn(x, self.weight.to(torch.int32), self.bias, *self.conv_args)  # (B, O, ...) int32
        return acc if self.requant is None else self.requant(acc, axis=1)

    _channel_axis = 1
    _max_parts = 1  # no split-K: one GEMM, float32 or float64

    def simulated(self, centered: torch.Tensor, scale: float | None = None, span: int | None = None) -> torch.Tensor:
        """As ``IntegerLinear.simulated`` on CPU (a direct or im2col convolution: sums of products);
        elsewhere ``forward`` on the codes (cuDNN may pick FFT or Winograd algorithms, which round)."""
        if centered.device.type != "cpu":
            return self.forward(centered.to(torch.int32) + self.zero_point_in)
        return super().simulated(centered, scale, span)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_fn(x, w, b, *self.conv_args)

    @staticmethod
    def _float32_exact(x: torch.Tensor) -> bool:
        """Not where torch may pick a Winograd or FFT convolution in float32 (then float64)."""
        from qswap.quant.integer import winograd_may_run
        return not winograd_may_run(x)
