"""Bookkeeping of the audit: totals, per-path coverage, aggregated violations (with the source
line that issued the op), declared ``float_ok`` exceptions, and the ops counted apart."""
from __future__ import annotations

import fnmatch
import linecache
import os
import sys
import threading
from collections import Counter
from typing import NamedTuple

import torch

from qswap.honesty import classify as C
from qswap.honesty.kinds import (DYNAMIC_RANGE, FUSED, INEXACT_GEMM, KINDS, NOT_EXECUTED, OFF_GRID,
                                 RAW_PARAMETER, UNCLASSIFIED, UNSEEN_ORIGIN, UNTRUSTED_QUANTIZER, VALUES_DISAGREE)
from qswap.honesty.ops import aliases, family
from qswap.honesty.report import OpCount, PathCoverage, Violation
from qswap.honesty.tags import QUANT, Tag
from qswap.recipe.match import PatternError, compile_path

REASONS = {kind: k.reason for kind, k in KINDS.items()}
# Findings about the model's integrity rather than one op staying float (a bypassed quantizer, a
# tensor made out of view, a quantizer off its grid or of an untrusted class, a module that never
# ran): a float_ok key naming an op or a family never declares them; a module key (a path, or
# PATH:*) still does, as it declares that module whole
NOT_BY_OP = frozenset({RAW_PARAMETER, UNSEEN_ORIGIN, OFF_GRID, NOT_EXECUTED, UNTRUSTED_QUANTIZER})
FAMILY = "family:"  # the prefix of a float_ok key naming an op family (``family:matmul``)
_TORCH = os.path.dirname(torch.__file__) + os.sep
_AUDIT = os.path.dirname(__file__) + os.sep
_PATHS_PY = os.path.join(_AUDIT, "paths.py")  # issues ops itself, as fairseq's generator would
_MODULES = os.path.join(_TORCH, "nn", "modules") + os.sep  # torch.nn forwards are call sites
_MODULE_PY = os.path.join(_MODULES, "module.py")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


class Findings:
    def __init__(self, float_ok: dict[str, str]):
        self.totals: Counter = Counter()
        self.bits: Counter = Counter()
        self.violations: dict[tuple, Violation] = {}
        self.kernel_internal: dict[tuple, OpCount] = {}
        self.constant_fold: dict[tuple, OpCount] = {}
        self.integer_gemm: dict[tuple, OpCount] = {}
        self.paths: list[PathCoverage] = []
        self.current: PathCoverage | None = None
        self.float_ok = FloatOk(float_ok)
        self.dynamic: list[Violation] = []  # quantizers still observing at inference
        self.disagreements: list[Violation] = []  # value-level check vs tags
        self.values_off = 0  # operands the value-level check found off every grid
        self.thread = threading.get_ident()  # ops seen on other threads are marked as such

    # -- paths and counters --------------------------------------------------------------------
    def start_path(self, name: str) -> None:
        self.current = PathCoverage(name)
        self.paths.append(self.current)

    def end_path(self) -> None:
        self.current = None

    def _path_name(self) -> str:
        return self.current.name if self.current else ""

    def count(self, key: str) -> None:
        self.totals[key] += 1
        if key == "ops" and self.current is not None:
            self.current.ops += 1

    def _compute(self) -> None:
        self.totals["compute"] += 1
        if self.current is not None:
            self.current.compute += 1

    def bucket(self, bucket: str, module: str, op: str, bits: list[int]) -> None:
        if bucket == C.IGNORED:
            self.totals["ignored"] += 1
            return
        self._compute()
        self.totals[bucket] += 1
        self.bits.update(bits)
        if bucket == C.QUANTIZED:
            return  # counted only: the other buckets are tabled by (module, op)
        table = {C.KERNEL_INTERNAL: self.kernel_internal, C.CONSTANT_FOLD: self.constant_fold,
                 C.INTEGER_GEMM: self.integer_gemm}.get(bucket)
        if table is not None:
            row = table.setdefault((module, op), OpCount(module, op))
            row.count += 1
            if self._path_name() not in row.paths:
                row.paths.append(self._path_name())

    # -- findings ------------------------------------------------------------------------------
    def operand_findings(self, module, op, func, operands, tags: list[Tag], findings) -> None:
        """A compute op with float operands: one finding per offending operand."""
        self._compute()
        declared = [self.record(module, op, func, operands[i], tags[i], kind) for i, kind in findings]
        self.totals["declared" if all(declared) else "float"] += 1

    def inexact_gemm(self, module, op, t: torch.Tensor, why: str) -> None:
        """A float GEMM on integer data not proven exact (``qswap.honesty.gemm``)."""
        self._compute()
        self.totals["declared" if self._add(module, op, why, INEXACT_GEMM, t) else "float"] += 1

    def fused(self, module, op, func, operands, tags: list[Tag]) -> None:
        self._compute()
        names = ", ".join(_label(func, pos) for pos, _ in operands)
        declared = [self._add(module, op, names or "-", FUSED, operands[0][1] if operands else None)]
        for (pos, t), tag in zip(operands, tags):
            if not (tag.kind == QUANT and tag.grid.on_grid):
                declared.append(self.record(module, op, func, (pos, t), tag, C.finding_kind(tag)
                                            if tag.kind != QUANT else C.OFF_GRID))
        self.totals["declared" if all(declared) else "float"] += 1

    def unclassified(self, module, op, func, operands) -> None:
        self.totals["unclassified"] += 1
        names = ", ".join(_label(func, pos) for pos, _ in operands)
        self._add(module, op, names or "-", UNCLASSIFIED, operands[0][1] if operands else None)

    def unseen(self, module, op, func, operands, tags: list[Tag]) -> None:
        """Float tensors the audit never saw made, consumed by ``op`` (a quantizer's input when
        ``func`` is None): where they entered the audited path."""
        for (pos, t), tag in zip(operands, tags):
            label = _label(func, pos) if func is not None else "input"
            self._add(module, op, f"{label}: {tag.where}", UNSEEN_ORIGIN, t)

    def reinterpreted(self, module, op, func, operand, tag: Tag) -> None:
        """A tensor of data whose bits ``view(dtype)`` reads as another kind of number (float as
        integer, integer as float): bit-level float arithmetic, not a cast or a quantizer."""
        self._compute()
        pos, t = operand
        declared = self._add(module, op, f"{_label(func, pos)}: {tag.describe()}, its bits reinterpreted "
                                          f"(view as another dtype kind)", C.FLOAT_OPERAND, t)
        self.totals["declared" if declared else "float"] += 1

    def input_math(self, path: str, t: torch.Tensor, tag: Tag) -> None:
        """A quantizer reading the model's integer input data after float math on it that is not
        index math ending in integers (an int16 waveform normalized: float math on data, as the
        same math on a float waveform is)."""
        self._add(path, "<quantizer input>", f"input: {tag.describe()}: float math on the model's integer input "
                                             f"data, not integers", C.FLOAT_OPERAND, t)

    def untrusted_quantizer(self, path: str, cls: type, trusted: tuple, altered: bool = False) -> None:
        """A call of a quantizer whose class is not one of ``trusted`` (a subclass of one), or one of
        them ``altered`` (its ``forward`` / ``__call__`` replaced on the class or the instance, or a
        hook registered on it): the ops it runs are only counted, never classified."""
        names = " or ".join(c.__name__ for c in trusted)
        what = (f"{cls.__module__}.{cls.__qualname__} with its forward or __call__ replaced, or a hook on it"
                if altered else f"{cls.__module__}.{cls.__qualname__}, not exactly {names}")
        self._add(path, "<quantizer>", f"{what}: its ops are not audited", UNTRUSTED_QUANTIZER, None,
                  (_class_source(cls), ""))

    def quantizer_off_grid(self, path: str, last_op, out: torch.Tensor, off: int, label: str) -> None:
        op = (f"{last_op.namespace}.{last_op.overloadpacket.__name__}" if last_op
              else "<quantizer output>")
        self._add(path, op, f"output: {off} of {out.numel()} values off the {label} grid",
                  C.OFF_GRID, out)

    def not_executed(self, path: str, module) -> None:
        cls = type(module)
        source = _class_source(cls)
        key = (path, "<not executed>", cls.__name__, NOT_EXECUTED)
        self.violations[key] = self._declare(Violation(
            path, "<not executed>", f"{cls.__name__} (swapped module)", REASONS[NOT_EXECUTED],
            source, NOT_EXECUTED, count=0))

    def dynamic_range(self, path: str, q, declared: str | None) -> None:
        """A quantizer still observing at inference; its state is restored after the audit."""
        self.dynamic.append(Violation(
            path, "<observing quantizer>", f"{q.spec.short()}: range from each input",
            REASONS[DYNAMIC_RANGE], _class_source(type(q)), DYNAMIC_RANGE, count=0, declared=declared))

    def value_checked(self, on_grid: bool) -> None:
        self.totals["values_checked"] += 1
        self.values_off += not on_grid

    def values_disagree(self, module, op, func, operand, tag: Tag, on_grid: bool, bits: int) -> None:
        """The tags and the values disagree on one operand. Values off every grid under a clean
        tag is a violation; a flagged operand whose values happen to lie on a grid is noted."""
        pos, t = operand
        said = (f"values on a uniform grid of at most 2^{bits} levels, but the tags call it "
                f"{tag.describe()}" if on_grid else
                f"values on no uniform grid of at most 2^{bits} levels, but the tags call it "
                f"{tag.describe()}")
        label = f"{_label(func, pos)}: {said}"
        if not on_grid:
            self._add(module, op, label, VALUES_DISAGREE, t)
        if all(v.operand != label or v.module != module for v in self.disagreements):
            self.disagreements.append(Violation(module, op, label, REASONS[VALUES_DISAGREE], "",
                                                VALUES_DISAGREE, shape=list(t.shape)))

    def record(self, module, op, func, operand, tag: Tag, kind: str) -> bool:
        pos, t = operand
        return self._add(module, op, f"{_label(func, pos)}: {tag.describe()}", kind, t)

    def _add(self, module: str, op: str, operand: str, kind: str, t: torch.Tensor | None,
             where: tuple[str, str] | None = None) -> bool:
        """Record one occurrence; returns whether it is a declared exception. ``where``: its
        (source, code), when not the call site (a class's definition)."""
        if threading.get_ident() != self.thread:
            operand = f"{operand} [on thread {threading.current_thread().name}]"
        key = (module, op, operand, kind)
        v = self.violations.get(key)
        if v is None:
            source, code = where or call_site()
            v = self.violations[key] = self._declare(Violation(
                module, op, operand, REASONS[kind], source, kind,
                shape=list(t.shape) if t is not None else None,
                dtype=str(t.dtype).removeprefix("torch.") if t is not None else "",
                count=0, code=code))
        v.count += 1
        if self._path_name() and self._path_name() not in v.paths:
            v.paths.append(self._path_name())
        if self.current is not None and v.declared is None:
            self.current.violations += 1
        return v.declared is not None

    def _declare(self, v: Violation) -> Violation:
        v.declared = self.float_ok.match(v.module, v.op, v.kind)
        return v


class FloatOk:
    """``float_ok`` keys: an op name (``softmax``, ``aten._softmax``), an op family
    (``family:norm``, ``family:matmul``), a module path (exact = that module and its submodules,
    glob, or ``re:`` regex), or ``PATH:OP`` (``OP`` an op name, ``family:NAME`` or ``*``;
    ``re:dec.*:softmax``). A key naming an op or a family never declares a finding of
    ``NOT_BY_OP``."""

    def __init__(self, entries: dict[str, str]):
        self.entries = dict(entries)
        self.used: set[str] = set()

    def match(self, module: str, op: str, kind: str) -> str | None:
        names = _OpNames(aliases(op), family(op), kind in NOT_BY_OP)
        for key, reason in self.entries.items():
            if _key_matches(key, module, names):
                self.used.add(key)
                return f"{key}: {reason}"
        return None

    def unused(self) -> list[str]:
        return [k for k in self.entries if k not in self.used]


class _OpNames(NamedTuple):
    """What a finding's op answers to: its names (``aliases``), its family, and whether the
    finding is of a kind no op key declares (``NOT_BY_OP``)."""

    names: set[str]
    family: str | None
    by_module_only: bool

    def matched_by(self, op_key: str) -> bool:
        """Whether the op part of a key (an op name, ``family:NAME`` or ``*``) covers the finding."""
        if op_key == "*":
            return True
        if self.by_module_only:
            return False
        if op_key.startswith(FAMILY):
            return self.family is not None and op_key[len(FAMILY):] == self.family
        return op_key in self.names


def _key_matches(key: str, module: str, names: _OpNames) -> bool:
    """``re:REGEX`` is a path regex, ``re:REGEX:OP`` one with an op; the regex may hold a ':'
    of its own (``(?:...)``), so both readings are tried (module paths never contain ':')."""
    if key.startswith("re:"):
        regex, op_key = _split_op(key[3:])
        with_op = op_key is not None and bool(regex) and names.matched_by(op_key)
        return _path_matches(key, module) or (with_op and _path_matches("re:" + regex, module))
    if key.startswith(FAMILY):
        return names.matched_by(key)
    mod, op_key = _split_op(key)
    if op_key is not None and mod:
        return _path_matches(mod, module) and names.matched_by(op_key)
    return (names.matched_by(key) and key != "*") or _path_matches(key, module)


def _split_op(key: str) -> tuple[str, str | None]:
    """(path, op) of ``PATH:OP``, where ``OP`` may be ``family:NAME``; (key, None) without a ':'."""
    rest, sep, op_key = key.rpartition(":")
    if not sep:
        return key, None
    head, _, word = rest.rpartition(":")
    if word == "family":  # PATH:family:NAME
        return head, FAMILY + op_key
    return rest, op_key


def _path_matches(pattern: str, path: str) -> bool:
    try:
        kind, regex = compile_path(pattern)
    except PatternError:
        return False
    if kind == "exact":
        return path == pattern or path.startswith(pattern + ".")
    if kind == "glob":
        return fnmatch.fnmatchcase(path, pattern)
    return regex.fullmatch(path) is not None


def _label(func, pos) -> str:
    if isinstance(pos, str):
        return pos
    index, sub = pos if isinstance(pos, tuple) else (pos, None)
    arguments = func._schema.arguments
    name = arguments[index].name if index < len(arguments) else f"arg{index}"
    return name if sub is None else f"{name}[{sub}]"


def call_site() -> tuple[str, str]:
    """``file:line`` and the code of the innermost frame outside torch and the audit."""
    f = sys._getframe(1)
    while f is not None and _skipped(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return "", ""
    filename, line = f.f_code.co_filename, f.f_lineno
    return f"{short_path(filename)}:{line}", linecache.getline(filename, line).strip()


def _skipped(filename: str) -> bool:
    if filename.startswith(_AUDIT):
        return filename != _PATHS_PY
    if not filename.startswith(_TORCH):
        return False
    return not filename.startswith(_MODULES) or filename == _MODULE_PY


def short_path(filename: str) -> str:
    if "site-packages" + os.sep in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    if filename.startswith(_REPO):
        return filename[len(_REPO):]
    return filename


def _class_source(cls: type) -> str:
    import inspect
    try:
        lines = inspect.getsourcelines(cls)[1]
        return f"{short_path(inspect.getsourcefile(cls))}:{lines}"
    except (OSError, TypeError):
        return cls.__module__
