"""QuantSpec: everything that defines one quantizer, as named fields in one frozen dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from qswap.errors import SpecError

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
SCALE_TYPES = ("float", "pow2")
ROUNDINGS = ("half_even", "half_away", "floor")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
MIN_BITS, MAX_BITS = 2, 16
# why a weight quantizer refuses a learnable spec (FakeQuantize; the recipe loader with file and line)
WEIGHT_LSQ = ("learnable: true on a weight spec: LSQ learns activation grids; a weight grid follows its "
              "weight (re-derived from it at every training step, so a learned weight scale would never "
              "train): remove learnable from the weight spec and keep it on the activation spec")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    >>> QuantSpec(bits=4, granularity="per_channel", axis=0)   # 4-bit per-output-channel weights
    >>> QuantSpec(bits=8, symmetric=False, observer="percentile")  # affine 8-bit activations

    ``axis`` is the channel axis (per_channel) or the axis split into blocks of ``group_size``
    (per_group); ``None`` means 0 for per_channel and -1 for per_group.
    ``narrow_range`` drops the most negative code so a signed symmetric grid is symmetric.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int | None = None
    group_size: int | None = None
    scale_type: str = "float"
    rounding: str = "half_even"
    narrow_range: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    momentum: float = 0.01
    learnable: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.bits, int) and not isinstance(self.bits, bool), "bits",
               f"must be an integer, got {self.bits!r}")
        _check(MIN_BITS <= self.bits <= MAX_BITS, "bits",
               f"must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        for name in ("signed", "symmetric", "narrow_range", "learnable"):
            _check(isinstance(getattr(self, name), bool), name,
                   f"must be true or false, got {getattr(self, name)!r}")
        _check(self.granularity in GRANULARITIES, "granularity",
               f"must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        _check(self.scale_type in SCALE_TYPES, "scale_type",
               f"must be one of {', '.join(SCALE_TYPES)}, got {self.scale_type!r}")
        _check(self.rounding in ROUNDINGS, "rounding",
               f"must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        _check(self.observer in OBSERVERS, "observer",
               f"must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")
        _check(self.axis is None or (isinstance(self.axis, int) and not isinstance(self.axis, bool)),
               "axis", f"must be an integer or null, got {self.axis!r}")
        if self.granularity == "per_group":
            _check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1,
                   "group_size",
                   f"per_group needs a positive integer group_size, got {self.group_size!r}")
        else:
            _check(self.group_size is None, "group_size", "is only allowed with granularity per_group")
        # a per-tensor grid has one scale: an axis there is a forgotten granularity, not a no-op
        _check(self.granularity != "per_tensor" or self.axis is None, "axis",
               "is only allowed with granularity per_channel or per_group (per_tensor has one scale): "
               "set the granularity, or axis: null")
        # the percentile observer takes one tensor's percentiles: per channel it had kept each
        # channel's extremes (minmax) whatever the percentile, and said nothing
        _check(self.observer != "percentile" or self.granularity == "per_tensor", "observer",
               f"percentile has no {self.granularity} form (it takes the percentiles of the whole tensor); "
               f"use observer: percentile with granularity: per_tensor, or observer: minmax or mse "
               f"{self.granularity}")
        _check(_number(self.percentile) and 50.0 < self.percentile <= 100.0,
               "percentile", f"must be in (50, 100], got {self.percentile!r}{_yaml_hint(self.percentile)}")
        _check(_number(self.momentum) and 0.0 < self.momentum <= 1.0, "momentum",
               f"must be a number in (0, 1], got {self.momentum!r}{_yaml_hint(self.momentum)}")
        _check(not (self.narrow_range and not self.signed), "narrow_range",
               "only applies to signed grids")
        # calibration rounds a pow2 scale to a power of two; a learned (LSQ) scale leaves it at the
        # first optimizer step, and shift-only hardware could not run what was trained
        _check(not (self.learnable and self.scale_type == "pow2"), "learnable",
               "cannot learn a pow2 scale (an optimizer step moves it off the powers of two): use "
               "scale_type: float with learnable: true, or learnable: false for a power-of-two grid")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def channel_axis(self) -> int | None:
        """The axis that carries separate scales, or None for per-tensor."""
        if self.granularity == "per_tensor":
            return None
        if self.axis is not None:
            return self.axis
        return 0 if self.granularity == "per_channel" else -1

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def unsigned(self) -> "QuantSpec":
        """The same spec on a non-negative grid (softmax outputs, ReLU outputs)."""
        return dataclasses.replace(self, signed=False, narrow_range=False)

    def short(self) -> str:
        """A compact label for reports, e.g. ``int8 sym per_channel(0)``."""
        kind = "int" if self.signed else "uint"
        gran = self.granularity
        if self.granularity == "per_channel":
            gran = f"per_channel({self.channel_axis})"
        elif self.granularity == "per_group":
            gran = f"per_group({self.group_size})"
        extra = [o for o, on in (("pow2", self.scale_type == "pow2"), ("lsq", self.learnable)) if on]
        return " ".join([f"{kind}{self.bits}", "sym" if self.symmetric else "affine", gran, *extra])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantSpec":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SpecError(f"unknown QuantSpec field(s) {sorted(map(str, unknown))}; known fields: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)


def _number(value: Any) -> bool:
    """An int or float; a bool is not a number here (``momentum: true`` is not 1.0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _yaml_hint(value) -> str:
    """Why a number arrived as a string: YAML 1.1 (PyYAML) reads ``1e-2`` (no dot) as one."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return (f" (YAML reads an exponent without a dot as a string: write {float(value)!r})"
            if isinstance(value, str) else "")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise SpecError(f"QuantSpec.{field} {message}")
