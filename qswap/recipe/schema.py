"""Recipes as frozen dataclasses.

A module's rule is: the first rule (in file order) that matches the module, else the rule that
hit its nearest ancestor, else the recipe's defaults. Within a rule, ``weight`` / ``activation``
are merged over the defaults field by field (``weight: {bits: 4}`` keeps the default
granularity), ``null`` means "leave float", and ``sites`` override single quantizer sites (a
rule's own over the defaults', each merged over the rule's weight or activation spec).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from qswap.nn.base import QuantConfig
from qswap.recipe.match import Match
from qswap.transforms import Step

OBSERVE = ("quantized", "float")  # a recipe's ``observe`` values (qswap.calibrate); the first is the default

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Rule:
    match: Match
    config: QuantConfig
    skip: bool = False
    float_ok: Mapping[str, str] = field(default_factory=dict)
    note: str = ""
    index: int = 0
    own_sites: tuple[str, ...] = ()  # the sites this rule names; config.sites adds the defaults'
    line: int | None = field(default=None, compare=False)

    def label(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"rule {self.index}{where}: {self.match.describe()}"


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe. ``qswap.load_recipe("w8a8")`` or ``load_recipe("my.yaml")`` make one."""

    name: str
    defaults: QuantConfig
    rules: tuple[Rule, ...] = ()
    float_ok: Mapping[str, str] = field(default_factory=dict)
    strict: bool = False
    description: str = ""
    dynamic_activations: bool = False  # activation ranges computed at run time, declared (audit)
    simulate: str = "integer"  # the insides of softmax/LayerNorm/GLU: "float" or "integer" (qswap.nn.simulate)
    observe: str = OBSERVE[0]  # what calibration observes: one of OBSERVE (qswap.calibrate)
    transforms: tuple[Step, ...] = ()  # offline transforms convert applies first, in order
    version: int = SCHEMA_VERSION
    source: str = "<dict>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        """A RecipeError naming the field where a Recipe built by hand (not by ``load_recipe``,
        which checks the YAML's keys) holds something of another kind: ``convert`` would fail on
        it with an AttributeError from deep inside."""
        from qswap.errors import RecipeError
        from qswap.nn.simulate import SIMULATIONS

        kinds = {"name": str, "defaults": QuantConfig, "rules": tuple, "strict": bool, "description": str,
                 "dynamic_activations": bool, "transforms": tuple, "source": str}
        for key, kind in kinds.items():
            value = getattr(self, key)
            if not isinstance(value, kind):
                raise RecipeError(f"Recipe.{key} must be a {kind.__name__}, got {type(value).__name__} (build "
                                  f"recipes with qswap.load_recipe from a name, a YAML file or a dict)", key=key)
        for key, items, kind in (("rules", self.rules, Rule), ("transforms", self.transforms, Step)):
            wrong = next((type(item).__name__ for item in items if not isinstance(item, kind)), None)
            if wrong is not None:
                raise RecipeError(f"Recipe.{key} holds {kind.__name__}s, got a {wrong}", key=key)
        for key, value, allowed in (("simulate", self.simulate, SIMULATIONS), ("observe", self.observe, OBSERVE)):
            if value not in allowed:
                raise RecipeError(f"must be one of {', '.join(allowed)}, got {value!r}", key=key)
        problem = float_ok_problem(self.float_ok)
        if problem is not None:
            raise RecipeError(f"float_ok{'' if problem[0] is None else f' entry {problem[0]!r}'}: {problem[1]}",
                              key="float_ok")

    def first_rule(self, path: str, module: nn.Module) -> Rule | None:
        for rule in self.rules:
            if rule.match.matches(path, module):
                return rule
        return None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what it was loaded from, with its resolved name and version:
        a file without ``name:`` is named after its stem); ``load_recipe`` accepts it back."""
        return {**_plain(self.raw), "version": self.version, "name": self.name}


def float_ok_problem(value: Any) -> "tuple[str | None, str] | None":
    """What makes ``value`` no float_ok mapping (an op or module name -> the reason it may stay
    float): (the entry at fault, None for the value itself; the message), or None where it is one.
    The recipe loader and ``qswap.audit(float_ok=...)`` hold declared exceptions to this rule."""
    if not isinstance(value, Mapping):
        kind = "null" if value is None else type(value).__name__
        return None, f"must map an op or module to its reason, got {kind}"
    for key, reason in value.items():
        if not isinstance(key, str) or not isinstance(reason, str) or not reason.strip():
            return str(key), "each float_ok entry needs a string key and a non-empty reason"
    return None


def same_recipe(a: Recipe, b: Recipe) -> bool:
    """Recipe equality as qswap checks it (a checkpoint's stored recipe against the one asked for):
    the same plain data (``to_dict``: what each was loaded from, name and version), not the same file
    or object."""
    return a.to_dict() == b.to_dict()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
