"""Declared serialization: a class says which constructor arguments rebuild it, and of what kind.

One dict (``SERIALIZABLE``: class name -> ``Declaration``) and one decorator. A class declares
every argument of its constructor with a field spec, read back from the attribute of the same
name (a property where the class stores it otherwise). ``qswap.export`` writes a declared
object as ``{"class": name, "args": {...}}`` with its tensors in a safetensors file, and rebuilds
only declared classes from it, checking every value against its spec (no pickle, no eval, no
import named by a file).

>>> @serializable(zero_point=INT, table=Tensor("int8", "uint8"), out=Opt(Obj("Requant")))
... class IntegerThing(nn.Module):
...     def __init__(self, zero_point, table, out): ...

Field specs: ``INT``, ``FLOAT``, ``BOOL``, ``STR`` (JSON scalars; a float is finite), ``Tensor(*dtypes)``
(a tensor of one of those dtypes, stored by name), ``Obj(name)`` (a declared object, ``None``: of
any declared class), ``Opt(spec)`` (None or spec), ``List(spec)`` / ``List(spec, tuple_=True)``,
``Tuple(*specs)`` (fixed length), ``Either(*specs)`` (the first that fits), ``Choice(*values)``
(one of a few scalars), ``Named(table)`` (one of a fixed table of objects, e.g. functions, stored
by key), ``NOT_STORED`` (a runtime object, written as null and rebuilt as None).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch

from qswap.errors import RegistryError

DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float32", "float64")  # what a Tensor spec may allow
T = TypeVar("T", bound=type)


class SpecMismatch(Exception):
    """A value does not fit its spec (``where``: the path of the value); the export and load
    modules turn it into their typed errors."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


class Codec:
    """Where a spec's tensors go: ``put`` by key when writing, ``take`` by key when reading."""

    def put(self, key: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def take(self, key: str, where: str) -> torch.Tensor:
        raise NotImplementedError


class Spec:
    """A field's kind: ``encode`` a value into JSON data (tensors through the codec), ``decode``
    JSON data back, each raising ``SpecMismatch`` for what does not fit."""

    def encode(self, value: Any, where: str, codec: Codec) -> Any:
        raise NotImplementedError

    def decode(self, obj: Any, where: str, codec: Codec) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(Spec):
    kind: type

    def _fits(self, value: Any) -> bool:
        if isinstance(value, bool) or self.kind is bool:
            return isinstance(value, bool) and self.kind is bool
        return isinstance(value, self.kind) and (self.kind is not float or math.isfinite(value))

    def encode(self, value, where, codec):
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not self._fits(value):
            raise SpecMismatch(where, f"expected {_kind(self.kind)}, got {_shown(value)}")
        return value

    def decode(self, obj, where, codec):
        if not self._fits(obj):
            raise SpecMismatch(where, f"expected {_kind(self.kind)}, got {_shown(obj)}")
        return obj


INT, FLOAT, BOOL, STR = Scalar(int), Scalar(float), Scalar(bool), Scalar(str)


class Tensor(Spec):
    """A tensor of one of ``dtypes``, written as ``{"tensor": key, "dtype": ..., "shape": [...]}``."""

    def __init__(self, *dtypes: str):
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown or not dtypes:
            raise RegistryError(f"Tensor spec dtypes must be some of {', '.join(DTYPES)}, got {dtypes}")
        self.dtypes = dtypes

    def encode(self, value, where, codec):
        if not isinstance(value, torch.Tensor) or dtype_name(value.dtype) not in self.dtypes:
            raise SpecMismatch(where, f"expected a tensor of {'/'.join(self.dtypes)}, got {_shown(value)}")
        codec.put(where, value)
        return {"tensor": where, "dtype": dtype_name(value.dtype), "shape": list(value.shape)}

    def decode(self, obj, where, codec):
        if not (isinstance(obj, dict) and set(obj) == {"tensor", "dtype", "shape"} and isinstance(obj["tensor"], str)
                and isinstance(obj["shape"], list) and all(_is_int(n) and n >= 0 for n in obj["shape"])):
            raise SpecMismatch(where, f"expected a tensor entry {{\"tensor\": key, \"dtype\": ..., \"shape\": "
                                      f"[...]}}, got {_shown(obj)}")
        if obj["dtype"] not in self.dtypes:
            raise SpecMismatch(where, f"dtype {obj['dtype']!r} is not allowed here (allowed: {', '.join(self.dtypes)})")
        tensor = codec.take(obj["tensor"], where)
        if dtype_name(tensor.dtype) != obj["dtype"] or list(tensor.shape) != obj["shape"]:
            raise SpecMismatch(where, f"tensor {obj['tensor']!r} is {dtype_name(tensor.dtype)} "
                                      f"{list(tensor.shape)} in the tensor file, but the JSON says "
                                      f"{obj['dtype']} {obj['shape']}")
        return tensor


@dataclass(frozen=True)
class Opt(Spec):
    spec: Spec

    def encode(self, value, where, codec):
        return None if value is None else self.spec.encode(value, where, codec)

    def decode(self, obj, where, codec):
        return None if obj is None else self.spec.decode(obj, where, codec)


@dataclass(frozen=True)
class List(Spec):
    spec: Spec
    tuple_: bool = False

    def encode(self, value, where, codec):
        if not isinstance(value, (list, tuple, torch.nn.ModuleList)):
            raise SpecMismatch(where, f"expected a list, got {_shown(value)}")
        return [self.spec.encode(v, f"{where}.{i}", codec) for i, v in enumerate(value)]

    def decode(self, obj, where, codec):
        if not isinstance(obj, list):
            raise SpecMismatch(where, f"expected a list, got {_shown(obj)}")
        items = [self.spec.decode(v, f"{where}.{i}", codec) for i, v in enumerate(obj)]
        return tuple(items) if self.tuple_ else items


class Tuple(Spec):
    def __init__(self, *specs: Spec):
        self.specs = specs

    def _check(self, value, where, what):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.specs):
            raise SpecMismatch(where, f"expected {what} of {len(self.specs)}, got {_shown(value)}")

    def encode(self, value, where, codec):
        self._check(value, where, "a tuple")
        return [s.encode(v, f"{where}.{i}", codec) for i, (s, v) in enumerate(zip(self.specs, value))]

    def decode(self, obj, where, codec):
        self._check(obj, where, "a list")
        return tuple(s.decode(v, f"{where}.{i}", codec) for i, (s, v) in enumerate(zip(self.specs, obj)))


class Either(Spec):
    """The first of ``specs`` that fits (each tried in order)."""

    def __init__(self, *specs: Spec):
        self.specs = specs

    def _first(self, method: str, value, where, codec):
        reasons = []
        for spec in self.specs:
            try:
                return getattr(spec, method)(value, where, codec)
            except SpecMismatch as exc:
                reasons.append(str(exc).split(": ", 1)[-1])
        raise SpecMismatch(where, "fits none of its alternatives: " + "; ".join(reasons))

    def encode(self, value, where, codec):
        return self._first("encode", value, where, codec)

    def decode(self, obj, where, codec):
        return self._first("decode", obj, where, codec)


class Named(Spec):
    """One of a fixed table of objects (functions), stored by its key."""

    def __init__(self, table: Mapping[str, Any]):
        self.table = dict(table)

    def encode(self, value, where, codec):
        for key, item in self.table.items():
            if item is value:
                return key
        raise SpecMismatch(where, f"{_shown(value)} is none of {', '.join(self.table)}")

    def decode(self, obj, where, codec):
        if not isinstance(obj, str) or obj not in self.table:
            raise SpecMismatch(where, f"expected one of {', '.join(map(repr, self.table))}, got {_shown(obj)}")
        return self.table[obj]


class Choice(Spec):
    """One of a few JSON scalars (e.g. a mode name)."""

    def __init__(self, *values: Any):
        self.values = values

    def encode(self, value, where, codec):
        return self.decode(value, where, codec)

    def decode(self, obj, where, codec):
        if not any(type(obj) is type(v) and obj == v for v in self.values):
            raise SpecMismatch(where, f"expected one of {', '.join(map(repr, self.values))}, got {_shown(obj)}")
        return obj


@dataclass(frozen=True)
class Obj(Spec):
    """A declared object (of class ``name`` or a subclass; any declared class when None),
    written as ``{"class": name, "args": {field: value}}``."""

    name: str | None = None

    def encode(self, value, where, codec):
        decl = SERIALIZABLE.get(type(value).__name__)
        if decl is None or decl.cls is not type(value):
            raise SpecMismatch(where, f"{type(value).__name__} is not declared @serializable")
        self._check_kind(decl, where)
        args = {}
        for field, spec in decl.fields.items():
            if not hasattr(value, field):
                raise SpecMismatch(f"{where}.{field}", f"{decl.name} declares {field} but keeps no attribute of that "
                                                       f"name; store it or add a property returning it")
            args[field] = spec.encode(getattr(value, field), f"{where}.{field}", codec)
        return {"class": decl.name, "args": args}

    def decode(self, obj, where, codec):
        if not (isinstance(obj, dict) and set(obj) == {"class", "args"} and isinstance(obj["args"], dict)):
            raise SpecMismatch(where, f"expected an object {{\"class\": name, \"args\": {{...}}}}, got {_shown(obj)}")
        decl = SERIALIZABLE.get(obj["class"]) if isinstance(obj["class"], str) else None
        if decl is None:
            raise SpecMismatch(where, f"unknown class {obj['class']!r}; declared classes: "
                                      f"{', '.join(sorted(SERIALIZABLE))}")
        self._check_kind(decl, where)
        missing, extra = sorted(set(decl.fields) - set(obj["args"])), sorted(set(obj["args"]) - set(decl.fields))
        if missing or extra:
            raise SpecMismatch(where, f"{decl.name} takes the fields {', '.join(decl.fields)}"
                                      + (f"; missing: {', '.join(missing)}" if missing else "")
                                      + (f"; unknown: {', '.join(extra)}" if extra else ""))
        kwargs = {f: spec.decode(obj["args"][f], f"{where}.{f}", codec) for f, spec in decl.fields.items()}
        try:
            return decl.cls(**kwargs)
        except Exception as exc:  # a constructor's own checks (IntegerizeError, TypeError...)
            raise SpecMismatch(where, f"{decl.name} cannot be rebuilt from these values "
                                      f"({type(exc).__name__}: {exc})") from None

    def _check_kind(self, decl: "Declaration", where: str) -> None:
        if self.name is not None and not any(c.__name__ == self.name for c in decl.cls.__mro__):
            raise SpecMismatch(where, f"expected a {self.name}, got a {decl.name}")


ANY = Obj()


class NotStored(Spec):
    """A runtime object the file does not carry (fairseq's target ``Dictionary``: decoding does
    not read it, the export keeps the dictionary file beside): written as null, read back as None."""

    def encode(self, value, where, codec):
        return None

    def decode(self, obj, where, codec):
        if obj is not None:
            raise SpecMismatch(where, f"expected null (a value that is not stored), got {_shown(obj)}")
        return None


NOT_STORED = NotStored()


@dataclass(frozen=True)
class Declaration:
    name: str
    cls: type
    fields: dict[str, Spec]
    float_steps: dict[str, str]


SERIALIZABLE: dict[str, Declaration] = {}


def serializable(*, float_steps: Mapping[str, str] | None = None, **fields: Spec) -> Callable[[T], T]:
    """Class decorator: declare the decorated class's constructor arguments (all of them, by
    keyword) with their specs. ``float_steps`` (a whole model's class): its declared float
    steps, method name -> what it does; written into the export's description."""
    bad = [f for f, s in fields.items() if not isinstance(s, Spec)]
    if bad:
        raise RegistryError(f"serializable fields need a field spec (INT, Tensor(...), Obj(...)...): {', '.join(bad)}")

    def decorate(cls: T) -> T:
        params = [p for p in list(inspect.signature(cls.__init__).parameters)[1:]]
        if sorted(params) != sorted(fields):
            raise RegistryError(f"@serializable on {cls.__name__} declares {', '.join(fields) or 'nothing'} but its "
                                f"constructor takes {', '.join(params) or 'nothing'}; declare each argument once")
        existing = SERIALIZABLE.get(cls.__name__)
        if existing is not None and f"{existing.cls.__module__}.{existing.cls.__qualname__}" != \
                f"{cls.__module__}.{cls.__qualname__}":
            raise RegistryError(f"a serializable class named {cls.__name__} is already declared "
                                f"({existing.cls.__module__}); class names are the file format's keys: rename one")
        SERIALIZABLE[cls.__name__] = Declaration(cls.__name__, cls, dict(fields), dict(float_steps or {}))
        return cls

    return decorate


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(kind: type) -> str:
    return {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}[kind]


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {dtype_name(value.dtype)} tensor {list(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
