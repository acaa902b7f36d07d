"""The registry: float module class -> fake-quant counterpart class. One dict, one decorator.

>>> @qswap.register(MyConv)
... class QMyConv(QuantModule):
...     @classmethod
...     def from_float(cls, module, config): ...

The classes in PASSTHROUGH, by fully qualified name (a user's own class named ``Identity`` is
not torch's), do no arithmetic on their inputs at inference (dropout, identity, containers,
fairseq's ``TransposeLast``, ``SamePad`` and ``RelPositionalEncoding``, which slices a constant
table that the rel-pos attention's ``linear_pos`` quantizes); the convert report lists them as
such instead of as "left float". Names, not classes: fairseq need not be imported to list its own.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Callable, TypeVar

from torch import nn

from qswap.errors import RegistryError

REGISTRY: dict[type, type] = {}
PASSTHROUGH: frozenset[str] = frozenset({
    "torch.nn.modules.dropout.Dropout", "torch.nn.modules.dropout.Dropout1d",
    "torch.nn.modules.dropout.Dropout2d", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleDict",
    "fairseq.modules.fairseq_dropout.FairseqDropout", "fairseq.modules.layer_drop.LayerDropModuleList",
    "fairseq.modules.transpose_last.TransposeLast", "fairseq.modules.same_pad.SamePad",
    "fairseq.modules.positional_encoding.RelPositionalEncoding",
})

# Float classes whose counterparts register only where their library imports (fairseq's fp32
# norms; apex's FusedLayerNorm, which fairseq's LayerNorm returns with apex and CUDA): the shipped
# recipes' norm rules name them, and a rule naming one is not a misspelling where it is absent.
OPTIONAL: frozenset[str] = frozenset({
    "fairseq.modules.layer_norm.Fp32LayerNorm", "fairseq.modules.fp32_group_norm.Fp32GroupNorm",
    "apex.normalization.fused_layer_norm.FusedLayerNorm",
})

T = TypeVar("T", bound=type)


def register(float_class: type) -> Callable[[T], T]:
    """Class decorator: make the decorated QuantModule the counterpart of ``float_class``.

    A second counterpart for a registered class is a RegistryError (``unregister`` the first),
    except that qswap's own counterparts never replace a user's: a user's counterpart of a fairseq
    class, registered before ``qswap.convert`` imports qswap's fairseq counterparts, stays."""
    if not (isinstance(float_class, type) and issubclass(float_class, nn.Module)):
        raise RegistryError(f"register() takes an nn.Module subclass, got {float_class!r}")
    from qswap.nn.base import QuantModule
    if issubclass(float_class, QuantModule):  # a bare @register above a counterpart had swallowed it
        raise RegistryError(f"register() takes the float class a counterpart replaces, got the counterpart "
                            f"{_name(float_class)} (a QuantModule): write @qswap.register(FloatClass) above it")

    def decorate(counterpart: T) -> T:
        _check_counterpart(float_class, counterpart)
        existing = REGISTRY.get(float_class)
        if existing is not None and existing is not counterpart and not _same_definition(existing, counterpart):
            # (the same definition twice is the same module imported twice: a reload)
            if _is_builtin(counterpart) and not _is_builtin(existing):
                counterpart.float_class = float_class
                return counterpart  # the user's own counterpart wins
            raise RegistryError(f"{_name(float_class)} is already registered to {_name(existing)}; to replace it "
                                f"with {_name(counterpart)}, call qswap.nn.unregister({float_class.__name__}) first")
        REGISTRY[float_class] = counterpart
        counterpart.float_class = float_class
        return counterpart

    return decorate


def _check_counterpart(float_class: type, counterpart: object) -> None:
    """A counterpart is a QuantModule subclass whose ``from_float`` takes (module, config)."""
    from qswap.nn.base import QuantModule
    if not (isinstance(counterpart, type) and issubclass(counterpart, QuantModule)):
        raise RegistryError(f"the counterpart of {_name(float_class)} must be a subclass of qswap.QuantModule "
                            f"with a from_float(module, config) classmethod, got {counterpart!r}")
    if counterpart.from_float.__func__ is QuantModule.from_float.__func__:  # had failed at convert time only
        raise RegistryError(f"{_name(counterpart)} must implement from_float(module, config), the classmethod that "
                            f"builds it from the float module and its QuantConfig")
    try:
        inspect.signature(counterpart.from_float).bind(None, None)
    except TypeError:
        raise RegistryError(f"{_name(counterpart)}.from_float{inspect.signature(counterpart.from_float)} must take "
                            f"(module, config): the float module and its QuantConfig (a classmethod)") from None


def _is_builtin(counterpart: type) -> bool:
    return counterpart.__module__.split(".")[0] == "qswap"


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


def register_fairseq_counterparts() -> None:
    """A model can only hold fairseq modules if fairseq is imported: register its counterparts
    then (``import qswap`` alone never imports fairseq)."""
    if "fairseq" in sys.modules:
        importlib.import_module("qswap.nn.fairseq")


def site_kinds() -> dict[str, set[str]]:
    """Site name -> the kinds ("weight", "activation") the registered counterparts declare it as
    (fairseq's counterparts included where fairseq is imported)."""
    register_fairseq_counterparts()
    kinds: dict[str, set[str]] = {}
    for counterpart in list(REGISTRY.values()):
        for site, kind in counterpart.sites.items():
            kinds.setdefault(site, set()).add(kind)
    return kinds


def is_passthrough(module: nn.Module) -> bool:
    """Whether ``module``'s exact class is one of PASSTHROUGH (by qualified name)."""
    return _name(type(module)) in PASSTHROUGH


def known_class_names() -> frozenset[str]:
    """The float classes qswap knows, which a recipe rule's ``class`` may name: each registered
    float class and each PASSTHROUGH and OPTIONAL class, by its name and its qualified name (rules
    match the float model's modules, never a counterpart)."""
    names = set(PASSTHROUGH | OPTIONAL) | {name.rsplit(".", 1)[-1] for name in PASSTHROUGH | OPTIONAL}
    for cls in REGISTRY:
        names.update(class_names(cls))
    return frozenset(names)


def class_names(cls: type) -> tuple[str, str]:
    """The two names a recipe rule's ``class`` matches ``cls`` by: its name and its qualified name."""
    return cls.__name__, _name(cls)


def _same_definition(a: type, b: type) -> bool:
    return a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _missing_message(float_class: type) -> str:
    names = ", ".join(sorted(c.__name__ for c in REGISTRY)) or "nothing"
    return f"{_name(float_class)} has no registered counterpart; registered: {names}"
