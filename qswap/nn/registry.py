"""The registry: float module class -> fake-quant counterpart class. One dict, one decorator.

>>> @qswap.register(MyConv)
... class QMyConv(QuantModule):
...     @classmethod
...     def from_float(cls, module, config): ...

Classes in PASSTHROUGH do no arithmetic on their inputs at inference (dropout, identity); the
convert report lists them as such instead of as "left float".
"""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from qswap.errors import RegistryError

REGISTRY: dict[type, type] = {}
PASSTHROUGH: set[str] = {"Dropout", "Dropout1d", "Dropout2d", "FairseqDropout", "Identity",
                         "LayerDropModuleList", "ModuleList", "Sequential", "ModuleDict"}

T = TypeVar("T", bound=type)


def register(float_class: type) -> Callable[[T], T]:
    """Class decorator: make the decorated QuantModule the counterpart of ``float_class``."""
    if not (isinstance(float_class, type) and issubclass(float_class, nn.Module)):
        raise RegistryError(f"register() takes an nn.Module subclass, got {float_class!r}")

    def decorate(counterpart: T) -> T:
        existing = REGISTRY.get(float_class)
        if existing is not None and existing is not counterpart:
            if _same_definition(existing, counterpart):
                REGISTRY[float_class] = counterpart  # the same module imported twice (a reload)
                return counterpart
            raise RegistryError(f"{_name(float_class)} is already registered to {_name(existing)}; "
                                f"unregister it first to replace it with {_name(counterpart)}")
        REGISTRY[float_class] = counterpart
        counterpart.float_class = float_class
        return counterpart

    return decorate


def unregister(float_class: type) -> type:
    try:
        return REGISTRY.pop(float_class)
    except KeyError:
        raise RegistryError(_missing_message(float_class)) from None


def lookup(float_class: type) -> type:
    """The counterpart of ``float_class``; a RegistryError lists what is registered."""
    try:
        return REGISTRY[float_class]
    except KeyError:
        raise RegistryError(_missing_message(float_class)) from None


def find(module: nn.Module) -> type | None:
    """The counterpart for this module's exact class, or None (subclasses are not matched:
    a subclass may override forward, and a counterpart of its parent would silently drop that)."""
    return REGISTRY.get(type(module))


def _same_definition(a: type, b: type) -> bool:
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _missing_message(float_class: type) -> str:
    names = ", ".join(sorted(c.__name__ for c in REGISTRY)) or "nothing"
    return f"{_name(float_class)} has no registered counterpart; registered: {names}"
