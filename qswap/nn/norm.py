"""Normalization counterparts: quantized input and affine parameters, one norm kernel.

The statistics and normalization run inside one kernel on quantized operands: LayerNorm as its
integer form computes them (``qswap.quant.integer.integer_layer_norm_acc``, the recipe's
``simulate: integer``, the default, see ``qswap.nn.simulate``) or as ``native_layer_norm`` does
in float32 (``simulate: float``); GroupNorm in ``native_group_norm``, or, told its reader under
``simulate: integer`` at inference, as its integer form (``integer_group_norm``) onto the reader's
grid. BatchNorm1d folds into a depthwise 1x1 convolution (its integer form likewise, told its
reader).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from qswap.errors import ConvertError
from qswap.io.serializable import Obj, Opt, serializable
from qswap.nn.base import QuantConfig, QuantModule, derived_weight, own, quantizer
from qswap.nn.registry import register
from qswap.nn.simulate import (cached, centered_codes, channel_codes, codes_of, forget, forget_all, form_or_none,
                                grid_of, onto_grid, requants_to, row_isqrt, simulates, straight_through,
                                stream_grid_of, value_of, values_onto)
from qswap.quant.bias import BiasQuantize
from qswap.quant.fake_quantize import FakeQuantize, quantizes


def norm_ste(exact_out: torch.Tensor, bounded_out: torch.Tensor) -> torch.Tensor:
    """The value of ``exact_out`` (the norm kernel inference runs), the gradient of
    ``bounded_out`` (``layer_norm_bounded_grad`` of the same quantized input).

    Both are computed from the output of the norm's input quantizer, so the gradient reaches that
    quantizer (straight through to its input, and to its scale when it is learned, LSQ); only the
    norm's own Jacobian is replaced, by one that stays bounded where quantization made a row
    (nearly) constant: there LayerNorm's Jacobian is 1/sqrt(eps), and chained over a dozen layers
    it overflows the gradient in QAT (``tools/qat_gradients.py`` measures it).
    The forward value is exactly the quantized one, so training sees what inference computes.
    """
    return bounded_out + (exact_out - bounded_out).detach()


# A row whose standard deviation is below this fraction of the batch's median row deviation gets
# the gradient of a row with that floor deviation (see ``layer_norm_bounded_grad``). Each
# QLayerNorm copies it into its ``grad_std_floor`` attribute (0 gives LayerNorm's exact gradient).
STD_FLOOR_RATIO = 0.1


def layer_norm_bounded_grad(x: torch.Tensor, normalized_shape: tuple, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float,
                            std_floor_ratio: float = STD_FLOOR_RATIO) -> torch.Tensor:
    """LayerNorm whose Jacobian is bounded for (nearly) constant rows: the gradient path of
    ``QLayerNorm`` in training (its value is replaced by the quantized norm's, ``norm_ste``).

    LayerNorm's Jacobian scales with 1/std of the row. A quantized model makes rows constant
    that are not constant in float: an input frame that is all zeros (a SpecAugment time mask,
    silence) quantizes to one code, and adding the positional embedding, which is small next to
    the grid step of the sum, rounds away, so the frame stays constant through every layer and
    each LayerNorm multiplies its gradient by up to 1/sqrt(eps) = 316 (``tools/qat_gradients.py``
    measures the shipped model's gradient norm both ways; docs/fairseq.md has the numbers).
    Here a row's variance is floored at ``(std_floor_ratio * median row std)^2`` of the batch:
    ordinary rows get the exact LayerNorm gradient, collapsed rows the gradient of a row with the
    floor deviation.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = centered.pow(2).mean(dim=dims, keepdim=True)
    with torch.no_grad():
        floor = (std_floor_ratio ** 2) * var.flatten().median()
    y = centered * torch.rsqrt(torch.maximum(var, floor) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _QNorm(QuantModule):
    normalizes = True
    sites = {"input": "activation", "norm_weight": "weight", "norm_bias": "weight"}

    def __init__(self, weight, bias, eps: float, config: QuantConfig):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps
        self.simulate = config.simulate
        self.input_quant = quantizer(config, self.sites, "input")
        self.weight_quant = quantizer(config, self.sites, "norm_weight")
        self.bias_quant = quantizer(config, self.sites, "norm_bias")

    def affine(self) -> tuple:
        weight, bias, weight_quant, bias_quant = own(self, "weight", "bias", "weight_quant", "bias_quant")
        return (weight_quant(weight) if weight is not None else None, bias_quant(bias) if bias is not None else None)

    def integer_affine(self, channels: int) -> tuple:
        """(gamma codes (C,), gamma scale (float or (C,)), beta values on their grid or None) for an
        integer form: gamma 1 (scale 1) without a weight; a float bias is refused."""
        from qswap.errors import IntegerizeError
        from qswap.quant.fake_quantize import FakeQuantize
        from qswap.quant.integer import weight_codes
        if self.weight is None:
            gamma, gamma_scale = torch.ones(channels, dtype=torch.int32), 1.0
        else:
            gamma, gamma_scale = weight_codes(self.weight_quant, self.weight)
            gamma_scale = gamma_scale if gamma_scale.numel() > 1 else float(gamma_scale)
        beta = None
        if self.bias is not None:
            if not isinstance(self.bias_quant, FakeQuantize):
                raise IntegerizeError(f"{type(self).__name__} bias (site norm_bias) is float; quantize it in the recipe")
            beta = self.bias_quant(self.bias).detach()
        return gamma, gamma_scale, beta


@register(nn.LayerNorm)
class QLayerNorm(_QNorm):
    takes_reader = True

    def __init__(self, normalized_shape, weight, bias, eps, config):
        super().__init__(weight, bias, eps, config)
        self.normalized_shape = tuple(normalized_shape)
        self.grad_std_floor = STD_FLOOR_RATIO  # QAT gradient bound (layer_norm_bounded_grad)

    @classmethod
    def from_float(cls, module: nn.LayerNorm, config: QuantConfig) -> "QLayerNorm":
        return cls(module.normalized_shape, module.weight, module.bias, module.eps, config)

    def forward(self, x: torch.Tensor, out_quant: nn.Module | list | None = None) -> torch.Tensor | list:
        """The norm of ``input_quant(x)``. ``out_quant``: the quantizer that reads the result;
        with ``simulate: integer`` the result is then the integer LayerNorm's output codes on its
        grid (its fixed-point requantization of the affine accumulator: ``onto_grid``) as values,
        with the norm's gradient. A list of quantizers: a list of results, one each (``onto_each``)."""
        if isinstance(out_quant, list):
            return self.onto_each(x, out_quant)  # which forgets the kept forms itself
        forget_all(self)  # with autograd, whichever path this call takes
        xq = self.input_quant(x)
        grid = stream_grid_of(self.input_quant) if simulates(self) and out_quant is not None else None
        if grid is None:
            return self._normed(xq)
        value = onto_grid(self, "_integer_onto", self.to_integer, out_quant,
                          lambda form, out: form.simulated(channel_codes(self.input_quant, xq, grid), out.scale),
                          *self._form_sources())
        if value is not None and not torch.is_grad_enabled():
            return value
        y = self._normed(xq)
        return y if value is None else straight_through(value, y, out_quant)

    def onto_each(self, x: torch.Tensor, readers: list) -> list:
        """The norm of ``input_quant(x)`` as each of ``readers`` (quantizers) reads it: with
        ``simulate: integer``, the integer LayerNorm's int32 affine accumulator computed once and
        requantized onto each reader's grid (what the integer model computes for a norm whose
        result several grids read: the S2T encoder's final norm, read by every decoder layer's
        ``key_in``), as values with the norm's gradient; else the norm's value for each."""
        forget_all(self)
        xq = self.input_quant(x)
        grids = [stream_grid_of(r, frozen_only=True) for r in readers]
        grid = stream_grid_of(self.input_quant) if simulates(self) and None not in grids else None
        form = None if grid is None else self._common_form()  # in the caller's grad mode: see ``cached``
        requants = None if form is None else cached(
            self, "_integer_onto_each", lambda: requants_to(form.stream_scale, grids),
            *self._form_sources(), *(r.scale for r in readers), *(r.zero_point for r in readers))
        y = self._normed(xq) if requants is None or torch.is_grad_enabled() else None
        if requants is None:
            return [y for _ in readers]
        with torch.no_grad():
            acc = form.simulated_acc(channel_codes(self.input_quant, xq, grid))  # (..., C) int32
            values = [values_onto(r, requant, acc, g) for r, requant, g in zip(readers, requants, grids)]
        return values if y is None else [straight_through(v, y, r) for v, r in zip(values, readers)]

    def _common_form(self):
        """The integer form that puts the input codes on one common grid and keeps the int32
        affine accumulator (``to_integer(None)``), kept in ``_integer_form``; None where it has
        none. Read by a per-channel input's simulation and by ``onto_each``."""
        return cached(self, "_integer_form", lambda: form_or_none(self.to_integer, None), *self._form_sources())

    def _form_sources(self) -> list:
        """What the integer form is built from: the input grid, the affine parameters and their
        grids (a cached form is rebuilt when one of them changes)."""
        return [self.input_quant.scale, self.input_quant.zero_point] + [
            t for t in (self.weight, self.bias) if t is not None] + [
            q.scale for q in (self.weight_quant, self.bias_quant) if isinstance(q, FakeQuantize)]

    def _normed(self, xq: torch.Tensor) -> torch.Tensor:
        """The norm of an input ``input_quant`` has quantized."""
        w, b = self.affine()
        y = self._integer_value(xq, b) if simulates(self) else None
        if y is None:
            y = F.layer_norm(xq, self.normalized_shape, w, b, self.eps)
            if not y.requires_grad:
                return y  # inference (and the audit): one norm kernel on the quantized input
        if not (xq.requires_grad or any(p is not None and p.requires_grad for p in (w, b))):
            return y
        return norm_ste(y, layer_norm_bounded_grad(xq, self.normalized_shape, w, b, self.eps,
                                                   self.grad_std_floor))

    def _integer_value(self, xq: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor | None:
        """The integer LayerNorm's affine accumulator of ``xq``'s codes, as its value (float32);
        ``beta``: the quantized bias. None where the integer form is not defined
        (``_integer_params``)."""
        from qswap.quant.integer import ChannelGrid, integer_layer_norm_acc
        grid = stream_grid_of(self.input_quant)
        if isinstance(grid, ChannelGrid):  # per-channel input codes: the form puts them on a common grid
            form = self._common_form()
            if form is None:
                return None
            with torch.no_grad():
                return value_of(form.simulated_acc(channel_codes(self.input_quant, xq, grid)), form.stream_scale,
                                xq.dtype)
        params = None if grid is None else self._integer_params(grid, beta)
        if params is None:
            return None
        with torch.no_grad():
            acc = integer_layer_norm_acc(codes_of(xq, grid), params, row_isqrt)
            return value_of(acc, params.acc_scale, xq.dtype)

    def _integer_params(self, grid, beta: torch.Tensor | None):
        """``LayerNormParams`` (no output grid) for input ``grid``, kept while the grid and the
        parameters are unchanged; None unless one axis of at most 4096 features, gamma
        quantized symmetric (per tensor or channel) and beta quantized, as ``to_integer`` needs,
        and grids the integer form admits (``LayerNormParams.build``: gamma's codes and beta within
        the int32 affine accumulator). Gamma's codes come from its quantizer's current grid
        (``affine`` ran it)."""
        from qswap.quant.integer import LN_MAX_DIM, LayerNormParams
        from qswap.quant.primitives import quantize
        n = self.normalized_shape[0]
        quants = [q for q, p in ((self.weight_quant, self.weight), (self.bias_quant, self.bias)) if p is not None]
        if len(self.normalized_shape) != 1 or n > LN_MAX_DIM or not all(
                quantizes(q) and q.spec.granularity != "per_group" for q in quants):
            return None
        if self.weight is not None and not (self.weight_quant.spec.symmetric and self.weight_quant.initialized):
            return None

        def build():
            with torch.no_grad():
                if self.weight is None:
                    gamma, gamma_scale = torch.ones(n, dtype=torch.int32), 1.0
                else:
                    wq = self.weight_quant
                    gamma = quantize(self.weight, wq.scale, wq.zero_point, wq.spec)
                    gamma_scale = wq.scale.reshape(-1) if wq.scale.numel() > 1 else float(wq.scale)
                return LayerNormParams.build(n, self.eps, grid.scale, gamma, gamma_scale,
                                             None if beta is None else beta.detach(), None, input_bound=grid.span)
        sources = [self.input_quant.scale, self.input_quant.zero_point, *(q.scale for q in quants)] + [
            t for t in (self.weight, self.bias) if t is not None]  # the zero point: the input bound (grid.span)
        # grids the integer form does not admit (16-bit norm weights: ``to_integer`` says why): float
        return cached(self, "_integer_ln", lambda: form_or_none(build), *sources)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"

    def to_integer(self, out: "Grid | None") -> "IntegerLayerNorm":
        """The integer form writing codes of ``out`` (its consumer's input grid; None: the int32
        affine accumulator on ``IntegerLayerNorm.stream_scale``, for several consumers): integer
        mean and variance, Newton isqrt, fixed-point gamma (its codes) and beta (on the affine
        accumulator's grid); see ``qswap.quant.integer.integer_layer_norm``. One normalized axis;
        gamma and beta quantized (norm_weight / norm_bias sites). An input grid per channel (of the
        normalized axis, ``qswap.quant.integer.ChannelGrid``) is first put on one int32 grid
        (``common_grid``), which the integer LayerNorm then normalizes."""
        from qswap.errors import IntegerizeError
        from qswap.quant.integer import ChannelGrid, CommonGridParams, LayerNormParams, stream_grid
        if len(self.normalized_shape) != 1:
            raise IntegerizeError(f"LayerNorm over {self.normalized_shape}: integer form normalizes one axis")
        n = self.normalized_shape[0]
        grid = stream_grid(self.input_quant)
        if not isinstance(grid, ChannelGrid):
            return IntegerLayerNorm(LayerNormParams.build(n, self.eps, grid.scale, *self.integer_affine(n), out,
                                                          input_bound=grid.span))
        common = CommonGridParams.build(grid)
        params = LayerNormParams.build(n, self.eps, common.scale, *self.integer_affine(n), out,
                                       input_bound=common.bound)
        return IntegerLayerNorm(params, common)

@register(nn.GroupNorm)
class QGroupNorm(_QNorm):
    takes_reader = True

    def __init__(self, num_groups, weight, bias, eps, config):
        super().__init__(weight, bias, eps, config)
        self.num_groups = num_groups

    @classmethod
    def from_float(cls, module: nn.GroupNorm, config: QuantConfig) -> "QGroupNorm":
        return cls(module.num_groups, module.weight, module.bias, module.eps, config)

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        """The group norm of ``input_quant(x)``. ``out_quant``: the quantizer that reads the
        result; with ``simulate: integer`` at inference the integer GroupNorm's codes on its grid
        (``to_integer``: integer statistics and isqrt, fixed-point requantization; ``onto_grid``)
        as values; otherwise (and in training) ``F.group_norm`` in float32."""
        xq = self.input_quant(x)
        grid = grid_of(self.input_quant) if simulates(self) and out_quant is not None else None
        if grid is not None and not forget(self, "_integer_onto"):
            quants = [q for q in (self.weight_quant, self.bias_quant) if getattr(q, "scale", None) is not None]
            value = onto_grid(self, "_integer_onto", self.to_integer, out_quant,
                              lambda form, out: form(codes_of(xq, grid)), self.input_quant.scale,
                              self.input_quant.zero_point, *(q.scale for q in quants),
                              *(t for t in (self.weight, self.bias) if t is not None))
            if value is not None:
                return value
        w, b = self.affine()
        return F.group_norm(xq, self.num_groups, w, b, self.eps)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, eps={self.eps}"

    def to_integer(self, out: "Grid | None") -> "IntegerGroupNorm":
        """The integer form on (B, C, ...) codes writing codes of ``out`` (its consumer's input
        grid): ``qswap.quant.integer.integer_group_norm`` (integer mean and variance over each
        group, Newton isqrt, fixed-point gamma and beta per channel)."""
        from qswap.quant.integer import GroupNormParams, Grid
        channels = self.weight.numel() if self.weight is not None else None
        if channels is None:
            from qswap.errors import IntegerizeError
            raise IntegerizeError("a GroupNorm without affine parameters has no integer form yet")
        params = GroupNormParams.build(self.num_groups, channels, self.eps, Grid.of(self.input_quant),
                                       *self.integer_affine(channels), out)
        return IntegerGroupNorm(params)


@register(nn.BatchNorm1d)
class QBatchNorm1d(QuantModule):
    """BatchNorm1d at inference is a per-channel affine map: folded into scale
    ``w = gamma / sqrt(var + eps)`` (weight-quantized) and shift ``b = beta - mean * w`` (on the
    int32 grid of ``input_scale * w_scale``), it runs as a depthwise 1x1 convolution on the
    quantized input. In training mode the same folded, quantized convolution runs with the batch's
    mean and variance in place of the running ones (batch-statistics folding, Jacob et al. 2018,
    arXiv 1712.05877 section 3.2), which it also updates as nn.BatchNorm1d does; the gradient
    reaches gamma, beta and the input through the fold.
    """

    normalizes = True
    sites = {"input": "activation", "weight": "weight"}
    takes_reader = True

    def __init__(self, module: nn.BatchNorm1d, config: QuantConfig):
        super().__init__()
        self.num_features, self.eps, self.momentum = module.num_features, module.eps, module.momentum
        self.weight, self.bias = module.weight, module.bias
        self.register_buffer("running_mean", module.running_mean)
        self.register_buffer("running_var", module.running_var)
        self.register_buffer("num_batches_tracked", module.num_batches_tracked)
        self.input_quant = quantizer(config, self.sites, "input")
        self.weight_quant = quantizer(config, self.sites, "weight")
        self.bias_quant = BiasQuantize()
        self.simulate = config.simulate

    @classmethod
    def from_float(cls, module: nn.BatchNorm1d, config: QuantConfig) -> "QBatchNorm1d":
        if not module.track_running_stats:
            raise ConvertError("BatchNorm1d with track_running_stats=False normalizes with batch "
                               "statistics at inference and cannot be folded; it is not supported")
        return cls(module, config)

    def folded(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the affine map that normalizes with ``mean`` and ``var``, each (C,)."""
        inv_std = torch.rsqrt(var + self.eps)
        w = inv_std if self.weight is None else self.weight * inv_std
        b = -mean * w if self.bias is None else self.bias - mean * w
        return w, b

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's per-channel mean and (biased) variance; the running ones updated."""
        dims = (0, 2) if x.dim() == 3 else (0,)
        var, mean = torch.var_mean(x, dim=dims, correction=0)  # (C,)
        n = x.numel() // x.shape[1]
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        with torch.no_grad():
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * n / max(n - 1, 1), factor)  # unbiased, as torch keeps it
        return mean, var

    def forward(self, x: torch.Tensor, out_quant: nn.Module | None = None) -> torch.Tensor:
        """The folded BatchNorm of ``input_quant(x)``. ``out_quant``: the quantizer that reads the
        result; with ``simulate: integer`` in eval mode (running statistics), the integer form's
        codes on its grid (``to_integer``, ``onto_grid``) as values, with the op's gradient."""
        x = self.input_quant(x)  # (B, C) or (B, C, L)
        skip = forget(self, "_integer_onto") or self.training or out_quant is None or x.dim() != 3
        value = None if skip else self._onto(x, out_quant)
        if value is not None and not torch.is_grad_enabled():
            return value
        y = self._folded_conv(x)
        return y if value is None else straight_through(value, y, out_quant)

    def _onto(self, xq: torch.Tensor, out_quant: nn.Module) -> torch.Tensor | None:
        """The integer form on ``xq`` (B, C, L) writing onto ``out_quant``'s grid (``onto_grid``),
        kept while the input grid, the statistics, the affine parameters and the weight grid are
        unchanged; None without integer simulation or per-tensor grids."""
        grid_in = grid_of(self.input_quant) if simulates(self) else None
        if grid_in is None:
            return None
        self._running_fold()  # the folded weight computed here, in the forward (the audit sees it derived)
        sources = [self.input_quant.scale, self.input_quant.zero_point, self.running_mean, self.running_var,
                   *(t for t in (self.weight, self.bias) if t is not None)]
        if getattr(self.weight_quant, "scale", None) is not None:
            sources.append(self.weight_quant.scale)
        return onto_grid(self, "_integer_onto", self.to_integer, out_quant,
                         lambda form, out: form.simulated(centered_codes(xq, grid_in), out.scale, grid_in.span),
                         *sources)

    def _running_fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``folded`` with the running statistics: a derived weight, kept while its sources are
        unchanged (``derived_weight``: the honesty audit reads the kept one as a constant)."""
        sources = [t for t in (self.weight, self.bias, self.running_mean, self.running_var) if t is not None]
        return derived_weight(self, "_folded", lambda: self.folded(self.running_mean, self.running_var), *sources)

    def _folded_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The folded affine map of quantized ``x`` (batch statistics in training)."""
        w, b = self.folded(*self._batch_statistics(x)) if self.training else self._running_fold()
        wq = self.weight_quant(w)
        bq = self.bias_quant(b, self.input_quant, self.weight_quant)
        x3 = x.unsqueeze(-1) if x.dim() == 2 else x  # (B, C, L)
        y = F.conv1d(x3, wq.view(-1, 1, 1), bq, groups=self.num_features)  # (B, C, L)
        return y.squeeze(-1) if x.dim() == 2 else y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, folded"

    def to_integer(self, out: "Grid | None") -> "IntegerConv":
        """The integer form of the folded inference BatchNorm: a depthwise 1x1 ``IntegerConv`` on
        (B, C, L) codes with the folded scale's codes and the shift on the int32 grid of
        ``s_in * s_w`` (``BiasQuantize``'s rounding), requantized per channel onto ``out``."""
        from qswap.nn.linear import IntegerConv, integer_linear
        from qswap.quant.integer import Grid
        w, b = self._running_fold()
        with torch.no_grad():
            return integer_linear(self.weight_quant, w, b.detach(), Grid.of(self.input_quant), out, IntegerConv,
                                  weight_shape=(-1, 1, 1), conv_fn=F.conv1d, stride=(1,), padding=(0,),
                                  dilation=(1,), groups=self.num_features)


# -- integer execution (issue 16, work in progress) ----------------------------------------------------

@serializable(params=Obj("LayerNormParams"), common=Opt(Obj("CommonGridParams")))
class IntegerLayerNorm(nn.Module):
    """LayerNorm on codes: ``qswap.quant.integer.integer_layer_norm`` with built constants (the
    int32 affine accumulator on ``stream_scale`` when built without an output grid). ``common``:
    codes per channel (an input ``ChannelGrid``) first put on one int32 grid (``common_grid``)."""

    def __init__(self, params, common=None):
        super().__init__()
        self.params, self.common, self.stream_scale = params, common, params.acc_scale

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        from qswap.quant.integer import common_grid, integer_layer_norm, integer_layer_norm_acc
        if self.common is not None:
            codes = common_grid(codes, self.common)  # (..., N) int32, |value| <= 2^16
        if self.params.out is None:
            return integer_layer_norm_acc(codes, self.params)
        return integer_layer_norm(codes, self.params)

    def simulated_acc(self, codes: torch.Tensor) -> torch.Tensor:
        """The int32 affine accumulator ``forward`` computes without an output grid, for the
        fake-quant simulation (per-channel input codes put on the common grid first, as ``forward``;
        the exact per-row square root ``row_isqrt``, the same integers as the Newton iteration)."""
        from qswap.quant.integer import common_grid, integer_layer_norm_acc
        if self.common is not None:
            codes = common_grid(codes, self.common)  # (..., N) int32, as forward
        return integer_layer_norm_acc(codes, self.params, row_isqrt)

    def simulated(self, codes: torch.Tensor, scale: float) -> torch.Tensor:
        """``forward``'s output codes' values on the output grid of ``scale``, for the fake-quant
        simulation (``simulated_acc`` requantized: ``requantized_values``)."""
        from qswap.quant.integer import requantized_values
        return requantized_values(self.params.out, self.simulated_acc(codes), scale)


@serializable(params=Obj("GroupNormParams"))
class IntegerGroupNorm(nn.Module):
    """GroupNorm on (B, C, ...) codes: ``qswap.quant.integer.integer_group_norm``."""

    def __init__(self, params):
        super().__init__()
        self.params, self.stream_scale = params, params.acc_scale

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        from qswap.quant.integer import integer_group_norm
        return integer_group_norm(codes, self.params)
