"""FakeQuantize: the visible quantizer module every qswap counterpart is built from.

A FakeQuantize is a child module (it shows in ``print(model)``), never a hook. Its state lives
in buffers, so it is saved, loaded and synchronized with the model:

* ``scale`` / ``zero_point``: the grid (a Parameter ``scale`` when the spec is learnable, LSQ);
* ``frozen``: False while calibrating (the observer watches every input and the grid follows
  it), True after ``freeze()`` (the grid is fixed).

Weight quantizers (``kind="weight"``) derive their grid from the weight itself, whenever the
weight changes (a QAT step, a loaded state_dict); without autograd their output is kept until
the weight or the grid changes (``qswap.quant.stamp``). A frozen activation grid (per tensor, or
per channel of the last axis) is kept ready the same way. The stamps see every write through the
buffers themselves (``copy_``, ``fill_``, ``load_state_dict``, an optimizer step on a learned
scale) and a new storage (``.data = t``); an in-place write through ``.data`` bumps no version
counter: after one, call ``model.eval()`` (or ``train()``) again, which drops the kept grids.

>>> fq = FakeQuantize(QuantSpec(bits=8, symmetric=False))
>>> y = fq(torch.randn(4, 16))          # observes, then fake-quantizes
>>> fq.freeze()                          # the grid is fixed from now on
"""
from __future__ import annotations

import math

import torch
from torch import nn

from qswap.errors import CalibrationError, SpecError
from qswap.quant.direct_call import DirectCall, watched
from qswap.quant import fused
from qswap.quant.fused import dense
from qswap.quant.lazy_state import LazyStateModule
from qswap.quant.observers import make_observer
from qswap.quant.primitives import (MIN_SCALE, ChannelGrid, PassGrid, channel_axis, channel_grid, choose_qparams,
                                    choose_qparams_scalar, fake_quantize, fake_quantize_channel_grid, fake_quantize_grid,
                                    fake_quantize_grid_, groups_view, observed_grid, pass_grid, passes_apply)
from qswap.quant.spec import WEIGHT_LSQ, QuantSpec
from qswap.quant.stamp import LeavesCaches, fingerprint, stamp, unchanged

KINDS = ("weight", "activation")


class FakeQuantize(LeavesCaches, DirectCall, LazyStateModule):
    _KEPT = ("_cached", "_weight_stamp", "_state_stamp", "_channels")  # a copy or a pickle rebuilds them on use
    # True only while ``qswap.calibrate(..., observe="float")`` runs (with ``enabled`` False): the
    # quantizer observes its input and returns it unquantized, its site computing in float. A class
    # default, so a quantizer pickled before it existed reads False.
    passthrough = False
    # a frozen per-channel activation grid of the last axis, made ready (``frozen_grid``, beside
    # ``_state``); a class default, so a quantizer pickled before it existed reads None
    _channels: ChannelGrid | None = None

    def __init__(self, spec: QuantSpec, kind: str = "activation"):
        super().__init__()
        if kind not in KINDS:
            raise SpecError(f"a quantizer's kind says what it holds and must be one of {', '.join(KINDS)}, "
                            f"got {kind!r}")
        if kind == "activation" and spec.granularity == "per_group":
            raise SpecError("an activation quantizer keeps one static grid, and per_group grids of an "
                            "activation would change with its number of rows (frames, batch): use "
                            "per_tensor, or per_channel with axis -1 (the feature axis)")
        if kind == "weight" and spec.learnable:
            raise SpecError(WEIGHT_LSQ)
        self.spec, self.kind = spec, kind
        self.observer = make_observer(spec)
        if spec.learnable:
            self.scale = nn.Parameter(torch.empty(0))
        else:
            self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.enabled = True  # False only while a sensitivity probe keeps this site in float
        self._weight_stamp: tuple | None = None  # the weight the current grid was derived from
        self._cached: tuple | None = None  # (eval-mode output, stamp of the weight and grid it used)
        self._state_stamp: tuple | None = None
        self._state: tuple = (False, None)

    def __setattr__(self, name: str, value) -> None:
        """``nn.Module.__setattr__``; a change of ``enabled`` (turning the site on or off: a
        sensitivity or search probe keeps it float, ``qswap.quant.switch``) also marks the grid
        written: the integer forms a module keeps (``qswap.nn.simulate.cached``) are stamped with
        its grid tensors, and a form built with this site quantized must not be read with it off,
        nor the other way round. Reading ``enabled`` stays a plain attribute read (the
        quantizer's call reads it on every tensor)."""
        if name != "enabled" or "enabled" not in self.__dict__:
            return super().__setattr__(name, value)
        enabled = bool(value)
        if enabled == self.__dict__["enabled"]:
            return None
        self.__dict__["enabled"] = enabled
        self._mark_written()
        return None

    # -- state ---------------------------------------------------------------------------------
    @property
    def spec(self) -> QuantSpec:
        return self.__dict__["_spec"]

    @spec.setter
    def spec(self, spec: QuantSpec) -> None:
        """A new spec (``qswap.search`` re-grids weights at other widths) drops what the old one
        computed: the weight's grid and output and the frozen activation grid, re-derived at the
        next call (their stamps see tensors, not the spec). A change also marks the grid written,
        as a change of ``enabled`` does: the integer forms a module keeps are stamped with its
        grid tensors and must not be read with the old spec's codes."""
        changed = "_spec" in self.__dict__ and spec != self.__dict__["_spec"]
        self.__dict__.update(_spec=spec, _cached=None, _weight_stamp=None, _state_stamp=None)
        if changed:
            self._mark_written()

    def _mark_written(self) -> None:
        """Bump the grid tensors' version counters (in-place no-ops), so that every kept form
        stamped with them is rebuilt."""
        with torch.no_grad():
            self.scale.add_(0)
            self.zero_point.add_(0)

    def train(self, mode: bool = True) -> "FakeQuantize":
        """``nn.Module.train``; a change of mode also drops the kept frozen grid (read again at the
        next call): an optimizer writes a learned scale through ``.data``, which no stamp sees.
        A learned scale is kept positive here too (``keep_scale_positive``): the last optimizer
        step before evaluation or saving may have driven it below zero."""
        self.__dict__["_state_stamp"] = None
        self.keep_scale_positive()
        return super().train(mode)

    def keep_scale_positive(self) -> bool:
        """Project a learned (LSQ) scale back onto the positive scales: each element ``s`` becomes
        ``max(|s|, MIN_SCALE)``. An optimizer step moves a scale by about its learning rate whatever
        the gradient's size (Adam), so a small scale can cross zero; a grid with a negative or zero
        scale has no integer form (no fixed-point multiplier, ``integerize`` refuses it). The
        reflection keeps a symmetric grid's values (``-s`` and ``s`` give the same grid, mirrored)
        where a floor would collapse the channel onto zero. Written in place with its version
        counter bumped (kept forms stamped with the old grid are rebuilt), and only where an element
        needs it: the first training call of a forward projects, before autograd keeps the scale.
        True where it wrote."""
        scale = self._parameters.get("scale")
        if scale is None or scale.numel() == 0:
            return False
        with torch.no_grad():
            if not bool((scale < MIN_SCALE).any()):  # NaN compares False: pass_grid refuses it
                return False
            scale.copy_(scale.abs().clamp_min(MIN_SCALE))
        self._cached = None
        return True

    @property
    def initialized(self) -> bool:
        return self.scale.numel() > 0

    def state_problem(self) -> str | None:
        """What is wrong with the grid this quantizer holds (after a ``load_state_dict``, which
        resizes its buffers to whatever a file holds), or None: a scale whose shape its granularity
        cannot have (per tensor: one number, ``()``; per channel: one axis; per group: (rows,
        groups)), or a zero point of another shape. An empty scale (no grid yet) is fine."""
        scale, zero_point = self.grid_tensors()[:2]
        if scale.numel() == 0:
            return None
        ranks = {"per_tensor": (0,), "per_channel": (1,), "per_group": (2,)}[self.spec.granularity]
        if scale.dim() not in ranks:
            return f"a scale of shape {tuple(scale.shape)} for a {self.spec.granularity} grid"
        if zero_point.shape != scale.shape:
            return f"a zero point of shape {tuple(zero_point.shape)} beside a scale of shape {tuple(scale.shape)}"
        return None

    @torch.no_grad()
    def _set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if self.scale.shape != scale.shape:
            self.scale.data = torch.empty_like(scale, device=self.scale.device)
            self.zero_point = torch.empty_like(zero_point, device=self.zero_point.device)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zero_point)
        self._cached = None

    def _passes_ok(self, x: torch.Tensor) -> bool:
        """The grid may be applied without autograd: no gradient to ``x`` and none to a learned
        scale (LSQ in training)."""
        return passes_apply(x, self.spec) and not (self.spec.learnable and self.training
                                                   and torch.is_grad_enabled())

    def _scalar_calibration(self) -> bool:
        """Calibration on Python numbers: a per-tensor grid (not power-of-two) from a
        min/max-family observer (``Observer.observe_scalar`` + ``choose_qparams_scalar``)."""
        spec = self.spec
        return (spec.granularity == "per_tensor" and spec.scale_type != "pow2"
                and self.observer.scalar_path)

    def _set_scalar_qparams(self, scale: float, zero_point: int) -> None:
        """Per calibration call: writes through ``.data`` and into a buffer need no ``no_grad``, and
        an activation quantizer keeps no output to drop."""
        buffers = self._buffers
        own_scale = buffers.get("scale")
        if own_scale is None:
            own_scale = self._parameters["scale"]
        if own_scale.shape != ():
            own_scale.data = torch.empty((), dtype=torch.float32, device=own_scale.device)
            self.zero_point = torch.empty((), dtype=torch.int32, device=buffers["zero_point"].device)
        own_scale.data.fill_(scale)
        buffers["zero_point"].fill_(zero_point)
        if self._cached is not None:
            self._cached = None

    def _observe_passing(self, x: torch.Tensor) -> None:
        """Record ``x``'s range without quantizing it (a float-observation calibration): the
        observer's range only; the grid follows once, at the end (``grid_from_observer``)."""
        if self._scalar_calibration():
            self.observer.observe_scalar(x)
        else:
            self.observer(x)

    def grid_from_observer(self) -> bool:
        """Set the grid from the observer's range, as a calibrating call sets it after observing
        (``choose_qparams_scalar`` where ``forward`` uses it, else ``choose_qparams``): the same
        scale and zero point for the same range. False where the observer has no range."""
        obs = self.observer
        if not obs.has_range:
            return False
        if self._scalar_calibration():
            self._set_scalar_qparams(*choose_qparams_scalar(float(obs.min_val), float(obs.max_val), self.spec))
        else:
            self._set_qparams(*choose_qparams(obs.min_val, obs.max_val, self.spec))
        return True

    def freeze(self) -> None:
        """Stop observing; the current grid is used from now on."""
        if not self.initialized:
            raise CalibrationError("cannot freeze a quantizer that has seen no data; run "
                                   "calibration batches through the model first")
        self.frozen.fill_(True)

    def unfreeze(self) -> None:
        """Observe again (the observer's range is kept; call ``observer.reset()`` to restart)."""
        self.frozen.fill_(False)
        self._cached = None

    def grid_tensors(self) -> tuple:
        """(scale, zero_point, frozen) read from the module's own tables: per call, three
        ``Module.__getattr__`` calls cost more than the checks they feed."""
        buffers = self._buffers
        scale = buffers.get("scale")
        if scale is None:  # a learnable (LSQ) scale is a Parameter
            scale = self._parameters["scale"]
        return scale, buffers["zero_point"], buffers["frozen"]

    def frozen_grid(self) -> tuple:
        """(frozen, the grid as a ``PassGrid`` or None): the buffers read once per change
        (``qswap.quant.stamp``: freeze, calibration and load_state_dict write in place, and every
        write of the scale writes the zero point too), not per call. The grid is given for a
        frozen per-tensor quantizer that rounds half to even (what ``fake_quantize_grid`` does)."""
        buffers = self._buffers  # ``grid_tensors`` and ``unchanged`` inlined: called on every activation
        scale = buffers.get("scale")
        if scale is None:
            scale = self._parameters["scale"]
        zero_point, frozen = buffers["zero_point"], buffers["frozen"]
        kept = self._state_stamp
        if kept is None or kept[1] != fingerprint(frozen, scale, zero_point):
            is_frozen = bool(frozen)
            spec = self.spec
            passes = (is_frozen and scale.numel() == 1 and spec.granularity == "per_tensor"
                      and spec.rounding == "half_even")
            grid = pass_grid(scale.item(), int(zero_point), spec) if passes else None
            channels = (channel_grid(scale, zero_point, spec) if is_frozen and self.kind == "activation"
                        and spec.granularity == "per_channel" and spec.channel_axis == -1
                        and spec.rounding == "half_even" and scale.numel() > 0 else None)
            state = (is_frozen, grid)  # written past Module.__setattr__ (rebuilt per calibration call)
            self.__dict__.update(_state_stamp=stamp(frozen, scale, zero_point), _state=state, _channels=channels)
            return state
        return self._state

    @property
    def kept_grid(self):
        """The ``PassGrid`` the last ``frozen_grid`` read (None: none), without re-reading the
        buffers: for a reader that checks its values itself (the honesty audit's grid proof)."""
        return self._state[1]

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` (``DirectCall``). Unwatched, an enabled quantizer at inference first
        takes what it kept, checked as ``forward`` checks it, without its frames (a decoding step
        calls a quantizer on every tensor it makes): an activation quantizer its frozen grid
        (``frozen_grid``), a weight quantizer its output (``_forward_weight``)."""
        if watched(self):
            return nn.Module.__call__(self, x)
        if self.enabled:
            buffers = self._buffers
            scale = buffers.get("scale")
            if scale is None:  # a learnable (LSQ) scale is a Parameter
                scale = self._parameters["scale"]
            if self.kind == "weight":
                cached = self._cached
                if (cached is not None and not self.training and not (x.requires_grad and torch.is_grad_enabled())
                        and cached[1][1] == fingerprint(x, scale, buffers["zero_point"])):
                    return cached[0]
            else:
                grid = self._state[1]  # ``_fast_grid`` inlined, and the kernel called as ``fake_quantize_grid``
                kept = self._state_stamp  # calls it: a decoding step makes this call on every tensor
                if (grid is not None and kept is not None
                        and kept[1] == fingerprint(buffers["frozen"], scale, buffers["zero_point"])):
                    if fused.applies(x) and not (self.training and self.spec.learnable and torch.is_grad_enabled()):
                        return fused.fake_quantize_into(x, torch.empty_like(x), grid.inverse_value, grid.lo, grid.hi,
                                                        grid.scale)  # with the scale's test: ``_grid_applies``
                    if self._grid_applies(x):
                        return fake_quantize_grid(x, grid)
                channels = self._fast_channels(x, buffers, scale)
                if channels is not None:
                    return fake_quantize_channel_grid(x, channels)
        return self.forward(x)

    def consume(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """``self(x)`` for a temporary ``x`` the caller hands over (the result of an op that nothing
        else reads): on ``__call__``'s fast path (an activation quantizer at inference, unwatched,
        its grid frozen per tensor), and while it calibrates on Python numbers (``_calibrating_grid``:
        observed, then rounded onto its new grid), the result is written into ``x`` itself, a float32
        tensor whose elements fill one block of memory (``qswap.quant.fused.dense``), and no new
        tensor is allocated (at a batch's sizes the allocation costs more than the four passes:
        docs/benchmarks.md). Everywhere else exactly ``self(x)``: the same values either way,
        ``fake_quantize_grid_``. Only a hook of the quantizer itself or a global one sees the call
        (it then does not write in place): a hook of the module that made ``x``, if it keeps its
        output, finds it rounded afterwards (by ``consume_twice``: onto the next quantizer's grid too).

        ``relu``: ``F.relu(self(x))`` (a ReLU that reads this quantizer's output, as fairseq's FFN
        does). On the fast path in the same pass (``relu_folded``), so the ReLU neither reads the
        tensor again nor allocates one (``tests/quant/test_fake_quantize.py``)."""
        grid = self._consumable(x)
        if grid is None:
            grid = self._calibrating_grid(x)
        if grid is not None:
            if not relu:
                return fake_quantize_grid_(x, grid)
            folded = relu_folded(grid)
            if folded is not None:
                return fake_quantize_grid_(x, folded)
            return torch.relu_(fake_quantize_grid_(x, grid))
        y = self(x)
        return torch.relu(y) if relu else y

    def _consumable(self, x: torch.Tensor) -> PassGrid | None:
        """The grid ``consume`` rounds ``x`` onto in place (an enabled activation quantizer,
        unwatched, ``x`` dense, and ``_fast_grid``'s conditions), or None: not in place."""
        if self.enabled and self.kind == "activation" and not watched(self) and dense(x):
            buffers = self._buffers
            scale = buffers.get("scale")
            return self._fast_grid(x, buffers, scale if scale is not None else self._parameters["scale"])
        return None

    def _calibrating_grid(self, x: torch.Tensor) -> PassGrid | None:
        """For ``consume`` while this quantizer calibrates on Python numbers (an enabled activation
        quantizer, unwatched, not frozen, ``_scalar_calibration``, ``x`` dense and rounded without
        autograd): what ``forward`` does before it rounds (observe ``x``, set the grid), and that
        grid, which ``consume`` rounds ``x`` onto in place (the same values as ``forward``'s new
        tensor). None: not here (``consume`` calls ``self(x)``)."""
        if not (self.enabled and self.kind == "activation" and not watched(self) and dense(x)
                and self._scalar_calibration() and self._passes_ok(x) and not bool(self._buffers["frozen"])):
            return None
        return self._observe_scalar(x)  # None: an empty tensor, forward's

    def _observe_scalar(self, x: torch.Tensor) -> PassGrid | None:
        """A calibrating call's observation on Python numbers: ``x``'s range into the observer, the
        grid set from the new range; returns that grid ready to round ``x`` onto (``observed_grid``),
        None for an empty ``x``."""
        observed = self.observer.observe_scalar(x, self.spec)
        if observed is None:
            return None
        _, _, scale, zero_point, inverse = observed
        self._set_scalar_qparams(scale, zero_point)
        return observed_grid(scale, zero_point, inverse, self.spec, x)

    def _fast_grid(self, x: torch.Tensor, buffers: dict, scale: torch.Tensor) -> PassGrid | None:
        """The kept ``PassGrid`` ``consume`` rounds ``x`` onto (``frozen_grid``'s: frozen, per tensor,
        half to even) where ``_kept_fits`` holds; else None. (``__call__`` makes the same test inline.)"""
        grid = self._state[1]
        return grid if grid is not None and self._kept_fits(x, buffers, scale) else None

    def _fast_channels(self, x: torch.Tensor, buffers: dict, scale: torch.Tensor) -> ChannelGrid | None:
        """``_fast_grid`` for a frozen per-channel activation grid of the last axis (the
        ``ChannelGrid`` ``frozen_grid`` kept), where ``x``'s last axis has its channels; else None
        (``forward`` then computes the same values from the buffers)."""
        channels = self._channels
        if (channels is not None and x.dim() > 0 and x.shape[-1] == channels.channels
                and self._kept_fits(x, buffers, scale)):
            return channels
        return None

    def _kept_fits(self, x: torch.Tensor, buffers: dict, scale: torch.Tensor) -> bool:
        """Whether the grid ``frozen_grid`` kept is current (its stamp unchanged) and applies to ``x``:
        float32 on the CPU, no gradient to carry through it or into a learned scale."""
        kept = self._state_stamp
        return (kept is not None and kept[1] == fingerprint(buffers["frozen"], scale, buffers["zero_point"])
                and self._grid_applies(x))

    def _grid_applies(self, x: torch.Tensor) -> bool:
        """Whether a prepared grid may round ``x``: float32 on the CPU, no gradient to carry through
        it or into a learned scale."""
        return x.dtype == torch.float32 and x.is_cpu and not (
            torch.is_grad_enabled() and (x.requires_grad or (self.spec.learnable and self.training)))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 codes of ``x``, a tensor on this quantizer's grid (its output): ``round(x *
        (1 / scale)) + zero_point``, per tensor, channel or group, exact for values of the grid. A call
        of the quantizer (``forward(x, "codes")``): hooks and the honesty audit see it, which
        checks its input's origin; its output is integers."""
        return nn.Module.__call__(self, x, "codes") if watched(self) else self.forward(x, "codes")

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 values ``(codes - zero_point) * scale`` of integer ``codes`` of this
        quantizer's grid (per tensor, channel or group): its own dequantization, a call of the
        quantizer (``forward(codes, "values")``) whose output the honesty audit checks on its grid,
        as every quantizer output. For a fake-quant simulation that computed integer codes (an
        integer form's requantization onto this grid)."""
        return nn.Module.__call__(self, codes, "values") if watched(self) else self.forward(codes, "values")

    def _converted(self, x: torch.Tensor, to: str) -> torch.Tensor:
        if to not in ("codes", "values"):
            raise SpecError(f"a quantizer converts to 'codes' or 'values', got {to!r}")
        if to == "values" and x.is_floating_point():
            raise SpecError(f"a quantizer's values come from integer codes, got {x.dtype}")
        if not self.initialized:
            raise CalibrationError("a quantizer without a grid has no codes; calibrate the model first")
        scale, zero_point, _ = self.grid_tensors()
        scale, zero_point = scale.detach().float(), zero_point.to(torch.int32)  # a .half()'d grid: float32's codes
        given = x
        if self.spec.granularity == "per_group":  # (rows, G, group_size): one scale per (row, group)
            x = groups_view(x, self.spec)
            if scale.shape != x.shape[:2]:
                raise SpecError(f"per_group grid of shape {tuple(scale.shape)} for a tensor of shape "
                                f"{tuple(given.shape)} ({tuple(x.shape[:2])} groups): convert codes of "
                                f"the tensor this quantizer's grid was derived from")
            scale, zero_point = scale[..., None], zero_point[..., None]
        elif scale.numel() > 1:
            shape = [1] * x.dim()
            shape[channel_axis(x, self.spec)] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        if to == "codes":
            with torch.no_grad():
                wide = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
                out = torch.round(wide * (1.0 / scale)).to(torch.int32) + zero_point
        else:
            out = (x.to(torch.int32) - zero_point).to(torch.float32) * scale
        if x is given:
            return out
        axis = channel_axis(given, self.spec)  # the groups back in the tensor's own layout
        return out.reshape(given.movedim(axis, -1).shape).movedim(-1, axis)

    def forward(self, x: torch.Tensor, to: str | None = None) -> torch.Tensor:
        """``x`` fake-quantized (observed first while calibrating); ``to``: ``codes`` and
        ``values``, what they say. A SpecError of its grid and ``x`` (per-channel ranges on an axis
        whose size changes) leaves carrying this quantizer as ``.quantizer`` (the first one to
        raise it), so that a caller holding the model names its site (``qswap.calibrate`` does)."""
        try:
            return self._forward(x, to)
        except SpecError as exc:
            if getattr(exc, "quantizer", None) is None:
                exc.quantizer = self
            raise

    def _forward(self, x: torch.Tensor, to: str | None) -> torch.Tensor:
        if to is not None:
            return self._converted(x, to)
        if not self.enabled:
            if self.passthrough:
                self._observe_passing(x)
            return x
        if self.kind == "weight":
            return self._forward_weight(x)
        # a calibrating quantizer's grid changes with every call: no kept grid to check or restamp
        frozen = bool(self._buffers["frozen"])
        grid = self.frozen_grid()[1] if frozen else None
        if self.spec.learnable and self.training and torch.is_grad_enabled():
            # a training step's optimizer may write the learned scale through ``.data`` (fairseq's
            # Adam), which no stamp sees: the next inference call re-reads the grid
            self.__dict__["_state_stamp"] = None
        if grid is not None and self._grid_applies(x):
            return fake_quantize_grid(x, grid)  # frozen inference: _passes_ok, spec-level parts in frozen_grid
        if not frozen and self._scalar_calibration():
            grid = self._observe_scalar(x)
            if grid is not None and self._passes_ok(x):
                return fake_quantize_grid(x, grid)
        elif not frozen:
            self.observer(x)
            if self.observer.has_range:
                self._set_qparams(*choose_qparams(self.observer.min_val, self.observer.max_val, self.spec))
        if not self.initialized:
            if x.numel() == 0:
                return x
            raise CalibrationError("a frozen activation quantizer has no grid; calibrate the model "
                                   "or load a calibrated checkpoint")
        return fake_quantize(x, self._scale_for_forward(x), self.zero_point, self.spec)

    def _forward_weight(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() == 0:  # a layer of 0 outputs or inputs: no values, no grid
            return w
        training = self.training or (torch.is_grad_enabled() and w.requires_grad)
        # optimizers may update p.data in place without bumping the version counter (fairseq's
        # Adam): a training forward always re-derives the grid and drops the eval cache
        if training or not unchanged(self._weight_stamp, w):
            self.observer.reset()
            self.observer(w)
            self._set_qparams(*choose_qparams(self.observer.min_val, self.observer.max_val, self.spec))
            self._weight_stamp, self._cached = None if training else stamp(w), None
        if training:
            return fake_quantize(w, self._scale_for_forward(w), self.zero_point, self.spec)
        cached = self._cached
        scale, zero_point, _ = self.grid_tensors()
        if cached is None or not unchanged(cached[1], w, scale, zero_point):
            cached = self._cached = (fake_quantize(w, scale, zero_point, self.spec).detach(),
                                     stamp(w, scale, zero_point))
        return cached[0]

    def _scale_for_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.spec.learnable and self.training):
            return self.scale.detach() if self.spec.learnable else self.scale
        self.keep_scale_positive()  # the last optimizer step may have driven it below zero
        # LSQ gradient scaling: g = 1 / sqrt(numel * qmax). The value is the scale itself, exactly
        # (s * g + (s - s * g) is an ulp off for some s: a grid other than evaluation's)
        g = 1.0 / math.sqrt(max(x.numel() * self.spec.qmax, 1))
        scaled = self.scale * g
        return (scaled - scaled.detach()) + self.scale.detach()

    # -- reporting ---------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        state = "frozen" if bool(self.frozen) else "observing"
        if self.kind == "weight":
            state = "from weight"
        if not self.enabled:
            state = "disabled"
        return f"{self.kind}, {self.spec.short()}, observer={self.spec.observer}, {state}"


def quantizes(quant) -> bool:
    """Whether ``quant`` (a site's quantizer: a FakeQuantize, or the Identity a null spec gives)
    puts values on a grid: an enabled FakeQuantize."""
    return isinstance(quant, FakeQuantize) and quant.enabled


# the code a FakeQuantize runs, as this module defines it: the honesty audit trusts a quantizer's
# unwatched ops only while its class runs this code (``qswap.honesty.tracker._intact``)
OWN_CODE = (FakeQuantize.__call__, FakeQuantize.forward)


def relu_folded(grid: PassGrid) -> PassGrid | None:
    """``grid`` with a ReLU after it folded into its clamp: its codes clamped from 0 (relative to
    the zero point) instead of ``lo``, which gives ``F.relu`` of its values bit for bit (a
    negative code becomes code 0, whose value is +0.0; NaN stays NaN). None where its codes do
    not reach zero (``lo > 0`` or ``hi < 0``): the ReLU then runs after the rounding."""
    return grid._replace(lo=0) if grid.lo <= 0 <= grid.hi else None


def consume(quant: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``quant(x)`` for a temporary ``x`` the caller gives up: ``FakeQuantize.consume`` (the result
    written into ``x`` where it can); any other module at a quantizer site (an ``Identity``: the
    recipe leaves the site in float) is called as it is. ``relu``: ``F.relu(quant(x))``, on the
    fast path in the quantizer's own pass."""
    if isinstance(quant, FakeQuantize):
        return quant.consume(x, relu)
    y = quant(x)
    return torch.relu(y) if relu else y


def consume_twice(first: nn.Module, x: torch.Tensor, second: nn.Module | None, relu: bool = False) -> tuple:
    """``second(relu(first(x)))`` for a temporary ``x`` the caller gives up (``relu``: the ReLU
    between the two; without it ``second(first(x))``), where both quantizers take
    ``consume``'s fast path and the kernel is built: rounded onto both grids in one pass of the
    kernel (``qswap.quant.fused.fake_quantize_twice_into``, the same bits as two passes), written
    into ``x``. Returns (the value, True) then: ``second``'s output, which the caller hands on
    without calling ``second`` again. Else (``consume(first, x, relu)``, False): the caller lets
    ``second`` read it as usual (a watched quantizer, autograd, observing, no kernel)."""
    if isinstance(first, FakeQuantize) and isinstance(second, FakeQuantize) and fused.TWICE and fused.applies(x):
        grid = first._consumable(x)
        then = second._consumable(x) if grid is not None else None  # its input has x's dtype, layout, grad
        if then is not None and relu:
            grid = relu_folded(grid)
        if then is not None and grid is not None:
            return fused.fake_quantize_twice_into(x, x, (grid.inverse_value, grid.lo, grid.hi, grid.scale),
                                                  (then.inverse_value, then.lo, then.hi, then.scale)), True
    return consume(first, x, relu), False
