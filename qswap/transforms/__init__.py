"""Offline model transforms a recipe declares (``transforms:``), applied by ``qswap.convert``
to the float model before its modules are swapped: each changes the weights (and, for an online
rotation, inserts a module) so that the float model computes the same function, and the
quantized one loses less. One dict, one decorator:

>>> @transform("my_fold")
... def my_fold(model, data, *, alpha: float = 0.5) -> list[str]: ...

A transform takes the model, the calibration batches (``data``: None when the caller gave none,
``STRUCTURE_ONLY`` when a stored checkpoint's state will overwrite the folded weights) and its
keyword parameters (their defaults give their types); it returns notes for the convert report.
``check(params)`` (optional) returns what is wrong with a value the types allow, or None: a
RecipeError when the recipe loads. A transform that finds nothing to change in the model (a
model without the blocks it folds into, or parameters that switch every part off) raises
``NothingToTransform`` before it changes anything: a QswapWarning naming the step, a ConvertError
under ``strict`` (the recipe then claims a transform the model does not have).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from qswap.errors import ConvertError, RecipeError, RegistryError


class _StructureOnly:
    def __repr__(self) -> str:
        return "STRUCTURE_ONLY"


STRUCTURE_ONLY = _StructureOnly()  # `data` when only module insertions matter (checkpoint load)


class NothingToTransform(Exception):
    """Raised by a transform, before it changes anything, where the model has nothing it applies to;
    the message says why (``apply_transforms`` turns it into a warning, or a ConvertError)."""


@dataclass(frozen=True)
class Transform:
    name: str
    fn: Callable[..., list[str]]
    needs_data: bool
    params: Mapping[str, Any] = field(default_factory=dict)  # parameter -> default
    check: Callable[[Mapping[str, Any]], str | None] | None = None


@dataclass(frozen=True)
class Step:
    """One entry of a recipe's ``transforms:`` list: a registered transform and its parameters."""
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"

    def filled(self) -> dict[str, Any]:
        """The parameters with each one the recipe left out at its declared default: the same fold
        whether a recipe writes ``smoothquant: {alpha: 0.5}`` or ``smoothquant: {}``."""
        return {**_registered()[self.name].params, **self.params}


TRANSFORMS: dict[str, Transform] = {}


def transform(name: str, *, needs_data: bool = False, check=None):
    """Register ``fn(model, data, **params) -> notes`` as the transform ``name``; ``check``: see
    the module docstring."""
    def decorate(fn):
        if name in TRANSFORMS and TRANSFORMS[name].fn.__qualname__ != fn.__qualname__:
            raise RegistryError(f"transform {name!r} is already registered")
        params = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}
        TRANSFORMS[name] = Transform(name, fn, needs_data, params, check)
        return fn
    return decorate


def _registered() -> dict[str, Transform]:
    from qswap.transforms import hadamard, smoothquant  # noqa: F401  (registration)
    return TRANSFORMS


def make_step(name: Any, params: Any) -> Step:
    """A validated Step; a RecipeError says what to change (the loader adds file and line)."""
    known = _registered()
    if name not in known:
        raise RecipeError(f"unknown transform {name!r}; registered: {', '.join(sorted(known))}")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise RecipeError(f"transform {name}: parameters are a mapping, got {type(params).__name__}")
    allowed = known[name].params
    for key, value in params.items():
        if key not in allowed:
            raise RecipeError(f"transform {name}: unknown parameter {key!r}; allowed: "
                              f"{', '.join(sorted(allowed)) or 'none'}")
        want = type(allowed[key])
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise RecipeError(f"transform {name}: {key} must be {want.__name__}, got {value!r}")
    problem = known[name].check({**allowed, **params}) if known[name].check else None
    if problem:
        raise RecipeError(f"transform {name}: {problem}")
    return Step(name, dict(params))


def needs_data(steps: Iterable[Step]) -> bool:
    known = _registered()
    return any(known[s.name].needs_data for s in steps)


def apply_transforms(model: nn.Module, steps: Iterable[Step], data: Any = None, strict: bool = False) -> list[str]:
    """Apply ``steps`` in order to ``model`` in place; returns the notes for the convert report. A
    step that finds nothing to change (``NothingToTransform``) is a QswapWarning, with ``strict`` a
    ConvertError; the notes say so too."""
    import warnings

    from qswap.errors import QswapWarning

    known = _registered()
    notes: list[str] = []
    for step in steps:
        t = known[step.name]
        if t.needs_data and data is None:
            raise ConvertError(f"transform {step.name} needs calibration batches (activation statistics): "
                               f"pass qswap.convert(model, recipe, data=batches)")
        if t.needs_data and data is not STRUCTURE_ONLY and not isinstance(data, (list, tuple)):
            data = list(data)  # several transforms may read the batches
        try:
            notes += [f"transform {step.describe()}: {n}" for n in t.fn(model, data, **step.params)]
        except NothingToTransform as nothing:
            message = f"transform {step.describe()} changes nothing in this model: {nothing}"
            if strict:
                raise ConvertError(f"{message} (strict: a recipe's transforms must apply; remove it from the "
                                   f"recipe's transforms, or convert without strict)") from None
            warnings.warn(QswapWarning(f"{message}; the model is converted without it"), stacklevel=3)
            notes.append(f"{message} (not applied)")
    return notes
