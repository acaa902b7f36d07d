"""BiasQuantize: rounds a bias onto the int32 grid integer hardware adds it on.

The bias of ``y = x @ W.T + b`` is added to the int32 accumulator, whose scale is
``input_scale * weight_scale`` (per output channel for per-channel weights). It has no state of
its own; ``last_scale`` keeps the grid of the latest call for the honesty audit. Without autograd
and with a frozen input grid (inference) the result is reused while the bias and both quantizers'
grids are unchanged; a calibrating input grid changes with every call, so nothing is kept then.
"""
from __future__ import annotations

import torch
from torch import nn

from qswap.quant.direct_call import DirectCall, watched
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.stamp import LeavesCaches, fingerprint, stamp

QMIN, QMAX = -(2 ** 31), 2 ** 31 - 1


class BiasQuantize(LeavesCaches, DirectCall):
    qmin, qmax, bits = QMIN, QMAX, 32
    kind = "bias"  # no spec of its own: the grid of the accumulator it is added to

    _KEPT = ("_key", "_cached", "_pair")  # what a copy or a pickle leaves behind (rebuilt on use)

    def __init__(self) -> None:
        super().__init__()
        self.last_scale: torch.Tensor | None = None
        self._key: tuple | None = None
        self._cached: torch.Tensor | None = None
        self._pair: tuple | None = None  # quantized_pair's kept (weight, bias) of its op

    def forward(self, bias: torch.Tensor | None, input_quant: nn.Module, weight_quant: nn.Module,
                rows: slice | None = None) -> torch.Tensor | None:
        """``rows`` picks the weight-scale rows of this bias (a fused q/k/v projection)."""
        if bias is None or not (isinstance(input_quant, FakeQuantize) and input_quant.enabled
                                and isinstance(weight_quant, FakeQuantize) and weight_quant.enabled):
            return bias  # nothing to align to: the bias stays float, and the audit says so
        if not input_quant.initialized:  # an empty input: no grid yet
            return bias  # the bias stays float, and the audit says so
        if input_quant.scale.numel() != 1:  # a per-channel input grid: no one accumulator scale per output
            return bias  # the bias stays float, and the audit says so
        key = None  # a call with autograd (training) or a calibrating input grid clears the cache
        if not (bias.requires_grad and torch.is_grad_enabled()) and bool(input_quant.grid_tensors()[2]):
            which = (input_quant, weight_quant, None if rows is None else (rows.start, rows.stop, rows.step))
            sources = _sources(bias, input_quant, weight_quant)
            kept = self._key  # checked first: per call in a decoding step
            if kept is not None and which == kept[0] and kept[1][1] == fingerprint(*sources):
                return self._cached
            key = (which, stamp(*sources))  # what the result is computed from
        w_scale = weight_quant.scale.detach()
        if w_scale.dim() > 1:  # per-group: rows of the weight, finest group grid of each row
            w_scale = w_scale.reshape(weight_quant.observer.min_val.shape[0], -1).amin(dim=1)
        if rows is not None and w_scale.numel() > 1:
            w_scale = w_scale[rows]
        scale = (input_quant.scale.detach().reshape(()) * w_scale).reshape(-1)
        if scale.numel() not in (1, bias.numel()):
            scale = scale.amin().reshape(1)
        codes = torch.clamp(torch.round(bias / scale), QMIN, QMAX)
        out = bias + (codes * scale - bias).detach()  # straight-through for QAT
        # plain attributes written past Module.__setattr__ (per call while calibrating)
        self.__dict__.update(last_scale=scale, _key=key, _cached=None if key is None else out)
        return out


# the code a BiasQuantize runs, as this module defines it (``qswap.honesty.tracker._intact``)
OWN_CODE = (BiasQuantize.__call__, BiasQuantize.forward)


def _sources(bias: torch.Tensor, input_quant: FakeQuantize, weight_quant: FakeQuantize) -> tuple:
    """The tensors the bias grid depends on. A quantizer's grid changes with its ``zero_point``:
    ``_set_qparams`` and ``load_state_dict`` copy into it even when only the scale moves (a scale
    written through ``.data`` keeps its version)."""
    in_scale, in_zero_point, _ = input_quant.grid_tensors()
    w_scale, w_zero_point, _ = weight_quant.grid_tensors()
    return bias, in_scale, in_zero_point, w_scale, w_zero_point


def quantized_pair(weight: torch.Tensor, bias: torch.Tensor | None, input_quant: nn.Module,
                   weight_quant: nn.Module, bias_quant: BiasQuantize) -> tuple:
    """``(weight_quant(weight), bias_quant(bias, input_quant, weight_quant))`` of a weighted op (a
    linear, a projection: ``bias_quant`` is its own). Without autograd, with an eval-mode weight
    quantizer, a frozen input quantizer (a calibrating one's grid changes per call), and both quantizers unwatched (``watched``: no hook, as the honesty audit's, sees
    them skipped), the pair is kept in ``bias_quant`` and returned while the weight, the bias, both
    grids, both enabled flags and the weight's spec are what it was computed from (a forward with
    autograd drops it): one fingerprint per call instead of one per quantizer (a decoding step
    runs every linear on a few rows). A copy of the module does not copy it."""
    fast = not torch.is_grad_enabled() and isinstance(weight_quant, FakeQuantize) and isinstance(
        input_quant, FakeQuantize) and not weight_quant.training
    if fast:
        in_scale, in_zero_point, in_frozen = input_quant.grid_tensors()
        fast = bool(in_frozen) and not (watched(weight_quant) or watched(bias_quant))
    if fast:
        flags = (input_quant, input_quant.enabled, weight_quant.enabled, weight_quant.spec)  # a spec held
        # and compared (``qswap.search`` swaps weight specs, which changes no tensor)
        w_scale, w_zero_point, _ = weight_quant.grid_tensors()
        sources = (weight, w_scale, w_zero_point, in_scale, in_zero_point) + (() if bias is None else (bias,))
        kept = bias_quant.__dict__.get("_pair")
        if kept is not None and kept[1] == flags and kept[2][1] == fingerprint(*sources):
            return kept[0]
    pair = weight_quant(weight), bias_quant(bias, input_quant, weight_quant)
    bias_quant.__dict__["_pair"] = (pair, flags, stamp(*sources)) if fast else None
    return pair
