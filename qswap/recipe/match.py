"""Module matchers of recipe rules: a path (exact, glob, or ``re:`` regex) and/or class names."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import regex
from torch import nn

from qswap.errors import RecipeError
from qswap.nn.registry import class_names

MAX_PATTERN_LENGTH = 500
# Nested quantifiers are refused below, but overlapping alternatives such as (.|\w)*\d{3} also
# backtrack exponentially; ``re:`` patterns run on the `regex` engine, which can time out.
REGEX_TIMEOUT_S = 1.0
# A quantified group that itself contains a quantifier, e.g. (a+)+ or (\w*)*: the classic
# catastrophic-backtracking shape. Python's re has no timeout, so such patterns are refused.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)\s*(?:[+*]|\{\d*,)")


class PatternError(ValueError):
    pass


def compile_path(pattern: str) -> tuple[str, "re.Pattern[str] | regex.Pattern[str] | None"]:
    """('exact'|'glob'|'regex', compiled regex or None). Raises PatternError."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError(f"a path pattern must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH}")
    if pattern.startswith("re:"):
        body = pattern[3:]
        if _NESTED_QUANTIFIER.search(body):
            raise PatternError(f"regex {body!r} nests quantifiers (like (a+)+), which can take "
                               f"exponential time; rewrite it without a repeated repeated group")
        try:
            return "regex", regex.compile(body)
        except regex.error as exc:
            raise PatternError(f"invalid regex {body!r}: {exc}") from None
    if any(c in pattern for c in "*?["):
        return "glob", re.compile(fnmatch.translate(pattern))
    return "exact", None


@dataclass(frozen=True)
class Match:
    """``path`` and ``classes`` must both match when both are given."""

    path: str | None = None
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kind, regex = compile_path(self.path) if self.path is not None else (None, None)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_regex", regex)

    def matches(self, path: str, module: nn.Module) -> bool:
        if self.classes and not _class_matches(module, self.classes):
            return False
        if self.path is None:
            return True
        if not path:  # the root model has the empty path: only class-only rules match it
            return False
        if self._kind == "exact":
            return path == self.path
        if self._kind == "glob":
            return self._regex.fullmatch(path) is not None
        try:
            return self._regex.fullmatch(path, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise RecipeError(f"regex {self.path[3:]!r} took over {REGEX_TIMEOUT_S:g} s to match "
                              f"module path {path!r} (catastrophic backtracking); rewrite it "
                              f"without overlapping repeated alternatives like (.|\\w)*") from None

    @property
    def exact_path(self) -> bool:
        """Whether ``path`` names one module (no glob, no regex)."""
        return self._kind == "exact"

    def describe(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"path={self.path}")
        if self.classes:
            parts.append("class=" + "|".join(self.classes))
        return ", ".join(parts)


def _class_matches(module: nn.Module, names: tuple[str, ...]) -> bool:
    return any(name in names for name in class_names(type(module)))
