"""Load and validate recipes from shipped names, YAML files, or dicts.

Every problem is a RecipeError naming the file, line and key; unknown keys are errors.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from qswap.errors import RecipeError, SpecError
from qswap.nn.base import QuantConfig, SiteSpecs
from qswap.nn.registry import site_kinds
from qswap.nn.simulate import SIMULATIONS
from qswap.quant.spec import WEIGHT_LSQ, QuantSpec
from qswap.recipe.match import Match, PatternError
from qswap.recipe.schema import OBSERVE, SCHEMA_VERSION, Recipe, Rule, float_ok_problem
from qswap.recipe.yaml_lines import LineDict, load as load_yaml
from qswap.transforms import Step, make_step

TOP_KEYS = {"version", "name", "description", "defaults", "rules", "float_ok", "strict",
            "dynamic_activations", "simulate", "observe", "transforms"}
DEFAULT_KEYS = {"weight", "activation", "sites"}
RULE_KEYS = {"match", "weight", "activation", "sites", "skip", "float_ok", "note"}
MATCH_KEYS = {"path", "class"}
MAX_RECIPE_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_UNSET = object()


def shipped_recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def _recipe_dir():
    """``qswap.recipes`` when installed; the checkout's top-level recipes/ folder otherwise."""
    try:
        return resources.files("qswap.recipes")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def with_simulate(recipe: "str | Path | Mapping[str, Any] | Recipe", simulate: str) -> Recipe:
    """``recipe`` (anything ``load_recipe`` takes) with its top-level ``simulate`` key set to
    ``simulate`` (``qswap.nn.simulate``: ``"float"`` or ``"integer"``; another value is a
    RecipeError), every rule taking it as a recipe file's key would give it."""
    return load_recipe(dict(load_recipe(recipe).to_dict(), simulate=simulate))


def load_stored_recipe(value: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """The recipe a checkpoint stores: its plain data parsed as ``parse_recipe(..., stored=True)``
    reads it; a name or path (an older qswap's checkpoint) or a Recipe as ``load_recipe`` does."""
    if isinstance(value, Mapping):
        return parse_recipe(value, source="<stored recipe>", stored=True)
    return load_recipe(value)


def load_recipe(name_or_path: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """A Recipe from a shipped name (``"w8a8"``), a YAML path, a dict, or a Recipe (returned)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return parse_recipe(name_or_path, source="<dict>")
    if not isinstance(name_or_path, (str, Path)):
        raise RecipeError(f"a recipe is a shipped name, a YAML path, a dict or a Recipe; "
                          f"got {type(name_or_path).__name__}")
    text = str(name_or_path)
    if not text.strip():
        raise RecipeError(f"a recipe name or path is empty; shipped recipes: {', '.join(shipped_recipe_names())}")
    path = Path(text)
    if isinstance(name_or_path, str) and _is_shipped(text):
        return _load_shipped(text, path)
    shipped = path.stem if not path.exists() and _is_shipped(path.stem) and path.parent == Path(".") else None
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in text:
        if shipped is not None and path.suffix in (".yaml", ".yml"):
            raise RecipeError(f"recipe file not found; did you mean the shipped recipe {shipped!r} (its name, "
                              f"without .yaml)?", source=str(path))
        return _load_file(path)
    if shipped is not None and isinstance(name_or_path, Path):  # a Path names a file: no shipped name
        raise RecipeError(f"no file {text!r}; a Path names a recipe file: for the shipped recipe {shipped!r} "
                          f"pass the string {shipped!r}")
    hint = f" (did you mean the shipped recipe {shipped!r}?)" if shipped is not None else ""
    raise RecipeError(f"no shipped recipe named {text!r} and no such file{hint}; shipped recipes: "
                      f"{', '.join(shipped_recipe_names())}")


def _is_shipped(text: str) -> bool:
    """Whether ``text`` is a bare name (no suffix, no folder) of a shipped recipe."""
    return bool(_NAME.match(text)) and "." not in text and (_recipe_dir() / f"{text}.yaml").is_file()


def _load_shipped(name: str, path: Path) -> Recipe:
    """The shipped recipe ``name``. A folder of that name in the working directory does not hide
    it; a file of that name is a RecipeError saying both exist (which did the caller mean?)."""
    if path.is_file():
        raise RecipeError(f"{name!r} is both a shipped recipe and a file in the working directory: pass "
                          f"'./{name}' for the file, or run elsewhere (or rename the file) for the shipped recipe")
    with resources.as_file(_recipe_dir() / f"{name}.yaml") as shipped:
        return _load_file(Path(shipped))


def _load_file(path: Path) -> Recipe:
    try:
        with open(path, "rb") as f:  # at most one byte past the limit: /dev/zero or a checkpoint is not read whole
            data = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError("recipe file not found", source=str(path)) from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file: {exc.strerror}", source=str(path)) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file is larger than {MAX_RECIPE_BYTES} bytes (the limit); is it a recipe?",
                          source=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file is not UTF-8 text (byte {exc.start})", source=str(path)) from None
    return parse_yaml(text, source=str(path))


def parse_yaml(text: str, source: str = "<string>") -> Recipe:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"invalid YAML: {problem}", source=source,
                          line=mark.line + 1 if mark else None) from None
    except RecursionError:
        raise RecipeError("YAML nests too deeply (recursive anchors?)", source=source) from None
    return parse_recipe(data, source=source)


def parse_recipe(data: Any, source: str = "<dict>", *, stored: bool = False) -> Recipe:
    """A Recipe from plain data; ``stored``: a recipe a checkpoint stores, read without the
    refusals of values that were merely ignored when it was written (``OBSERVER_OPTIONS``), so
    that a checkpoint an older qswap wrote keeps loading."""
    ctx = _Ctx(source, stored)
    if not isinstance(data, Mapping):
        raise ctx.error(data, None, f"a recipe is a mapping at the top level, got {_tname(data)}")
    ctx.check_keys(data, TOP_KEYS, "recipe")
    ctx.simulate = ctx.choice(data, "simulate", SIMULATIONS)
    if "version" not in data:
        raise ctx.error(data, None, f"missing 'version' (this qswap reads version {SCHEMA_VERSION})")
    version = data["version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ctx.error(data, "version", f"unsupported version {version!r}; this qswap reads "
                        f"version {SCHEMA_VERSION}")
    name = ctx.string(data, "name", default="recipe" if source.startswith("<") else Path(source).stem)
    defaults_raw = _given(data, "defaults", LineDict())
    if not isinstance(defaults_raw, Mapping):
        raise ctx.error(data, "defaults", f"must be a mapping, got {_tname(defaults_raw)}")
    ctx.check_keys(defaults_raw, DEFAULT_KEYS, "defaults")
    w_default = ctx.spec_dict(defaults_raw, "weight", base={})
    a_default = ctx.spec_dict(defaults_raw, "activation", base={})
    defaults = ctx.config(defaults_raw, w_default, a_default)
    rules_raw = _given(data, "rules", [])
    if not isinstance(rules_raw, list):
        raise ctx.error(data, "rules", f"must be a list of rules, got {_tname(rules_raw)}")
    default_sites = ctx.sites(defaults_raw)
    rules = tuple(ctx.rule(r, i, w_default, a_default, default_sites) for i, r in enumerate(rules_raw))
    return Recipe(name=name, defaults=defaults, rules=rules,
                  float_ok=ctx.float_ok(data), strict=ctx.boolean(data, "strict", False),
                  dynamic_activations=ctx.boolean(data, "dynamic_activations", False), simulate=ctx.simulate,
                  observe=ctx.choice(data, "observe", OBSERVE),
                  transforms=ctx.transforms(data),
                  description=ctx.string(data, "description", default=""),
                  version=version, source=source, raw=data)


# the spec options one observer reads (a percentile given to minmax had been ignored without a word)
OBSERVER_OPTIONS = {"percentile": "percentile", "momentum": "moving_average"}


class _Ctx:
    """Validation helpers that know the source file, to put file:line into every error."""

    def __init__(self, source: str, stored: bool = False):
        self.source, self.stored = source, stored
        self.simulate = SIMULATIONS[0]  # the recipe's ``simulate``, given to every config
        self._site_kinds: dict[str, set[str]] | None = None

    def error(self, node: Any, key: str | None, message: str) -> RecipeError:
        line = None
        if isinstance(node, LineDict):
            line = node.lines.get(key, node.line) if key is not None else node.line
        return RecipeError(message, source=self.source, line=line, key=key)

    def check_keys(self, node: Mapping, allowed: set[str], where: str) -> None:
        for key in node:
            if key not in allowed:
                raise self.error(node, str(key), f"unknown key in {where}; allowed: "
                                 f"{', '.join(sorted(allowed))}")

    def string(self, node: Mapping, key: str, default: str) -> str:
        value = node.get(key, default)
        if not isinstance(value, str):
            raise self.error(node, key, f"must be a string, got {_tname(value)}")
        return value

    def choice(self, node: Mapping, key: str, allowed: tuple[str, ...]) -> str:
        """node[key], one of ``allowed`` (the first when absent)."""
        value = node.get(key, allowed[0])
        if value not in allowed:
            raise self.error(node, key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def boolean(self, node: Mapping, key: str, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            raise self.error(node, key, f"must be true or false, got {value!r}")
        return value

    def spec_dict(self, node: Mapping, key: str, base: "dict | None") -> "dict | None":
        """Merge node[key] over base: absent -> base, null -> None (float), mapping -> merged."""
        value = node.get(key, _UNSET)
        if value is _UNSET:
            return base
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(node, key, f"must be a quantizer mapping or null, got {_tname(value)}")
        merged = {**(base or {}), **value}
        self.to_spec(node, key, merged, value)  # validate now, with the line of this mapping
        if key == "weight" and merged.get("learnable") is True:  # a weight's own, or its defaults' (refused there)
            raise self.error(value, "learnable", WEIGHT_LSQ)
        return merged

    def to_spec(self, node: Mapping, key: str, merged: "dict | None", own: Any = None) -> QuantSpec | None:
        if merged is None:
            return None
        try:
            spec = QuantSpec.from_dict(merged)
        except SpecError as exc:
            field_name = str(exc).split(" ")[0].removeprefix("QuantSpec.")
            where = own if isinstance(own, LineDict) and field_name in own else node
            message = str(exc)
            if isinstance(own, Mapping) and field_name not in own and merged.get(field_name) is not None:
                # a field this mapping inherits (from the defaults' spec of its kind) clashes with its own
                message += (f" ({field_name}: {merged[field_name]!r} is inherited from the spec this one is merged "
                            f"over; " + (f"set `{field_name}: null` here to drop it)" if _nullable(field_name) else
                                         f"set `{field_name}` here to the value this spec needs)"))
            raise self.error(where, field_name if where is own else key, message) from None
        except TypeError as exc:
            raise self.error(node, key, f"bad quantizer fields: {exc}") from None
        if isinstance(own, Mapping) and not self.stored:  # an option this mapping sets, which its observer never reads
            for option, reader in OBSERVER_OPTIONS.items():
                if own.get(option) is not None and spec.observer != reader:
                    raise self.error(own, option, f"{option} is read by observer {reader} only, and this spec's "
                                                  f"observer is {spec.observer}: set observer: {reader} here, or "
                                                  f"drop {option}")
        return spec

    def sites(self, node: Mapping) -> Mapping:
        """node's ``sites:`` mapping (empty when absent), its keys checked to be strings."""
        sites_raw = _given(node, "sites", {})
        if not isinstance(sites_raw, Mapping):
            raise self.error(node, "sites", f"must be a mapping of site -> quantizer, got {_tname(sites_raw)}")
        for site in sites_raw:
            if not isinstance(site, str):
                raise self.error(sites_raw, None, f"site names are strings, got {site!r}")
        return sites_raw

    def config(self, node: Mapping, w: "dict | None", a: "dict | None",
               default_sites: "Mapping | None" = None) -> QuantConfig:
        """node's config; ``default_sites`` (the defaults' ``sites:``) apply under node's own. A
        site's entry is merged over ``w`` and over ``a`` (node's merged specs): the counterpart
        that owns the site declares its kind, which picks one (``SiteSpecs``); null keeps it float.
        A kind node sets to null itself (``activation: null``: this subtree's activations float)
        stays float at the sites the defaults name: only node's own ``sites:`` entries quantize
        them again."""
        nulled = tuple(kind in node and node[kind] is None for kind in ("weight", "activation"))
        sites, declared = {}, self.site_kinds()
        for inherited, sites_raw in ((True, default_sites or {}), (False, self.sites(node))):
            for site in sites_raw:
                self.refuse_weight_lsq(sites_raw, site)
                if sites_raw[site] is None:
                    sites[site] = None
                    continue
                # merged over the kinds a registered counterpart declares the site as (both where
                # none does yet): an activation site's entry is not checked as a weight spec
                kinds = declared.get(site, {"weight", "activation"})
                sites[site] = SiteSpecs(*(None if (inherited and off) or kind not in kinds else self.to_spec(
                    sites_raw, site, self.spec_dict(sites_raw, site, base), sites_raw.get(site))
                    for base, off, kind in zip((w, a), nulled, ("weight", "activation"))))
        return QuantConfig(weight=self.to_spec(node, "weight", w), activation=self.to_spec(node, "activation", a),
                           sites=sites, simulate=self.simulate)

    def site_kinds(self) -> dict[str, set[str]]:
        """``qswap.nn.registry.site_kinds()``, read once per recipe load (it walks every registered
        counterpart)."""
        if self._site_kinds is None:
            self._site_kinds = site_kinds()
        return self._site_kinds

    def refuse_weight_lsq(self, sites_raw: Mapping, site: str) -> None:
        """``learnable: true`` in the entry of a site every registered counterpart declares a weight
        site (``norm_weight``, ``in_proj_weight``) is refused here, with its line, as on a rule's
        ``weight:``; a site some counterpart reads as an activation keeps it."""
        entry = sites_raw[site]
        if isinstance(entry, Mapping) and entry.get("learnable") is True and self.site_kinds().get(site) == {"weight"}:
            raise self.error(entry, "learnable", f"site {site!r} is a weight site: {WEIGHT_LSQ}")

    def transforms(self, node: Mapping) -> tuple[Step, ...]:
        """``transforms:``: a list of one-key mappings, ``{name: {parameter: value}}``."""
        value = _given(node, "transforms", [])
        if not isinstance(value, list):
            raise self.error(node, "transforms", f"must be a list of {{name: {{parameters}}}}, got {_tname(value)}")
        steps = []
        for item in value:
            if not isinstance(item, Mapping) or len(item) != 1:
                raise self.error(node, "transforms", "each transform is a mapping with one key, its name "
                                 "(e.g. {smoothquant: {alpha: 0.5}})")
            (name, params), = item.items()
            if any(step.name == name for step in steps):  # a second hadamard had undone the first
                raise self.error(item, str(name), f"transform {name} is listed twice; each transform folds into "
                                                  f"the weights once (a second rotation can undo the first): "
                                                  f"list it once, with the parameters it should have")
            try:
                steps.append(make_step(name, params))
            except RecipeError as exc:
                raise self.error(item, str(name), exc.args[0]) from None
        return tuple(steps)

    def float_ok(self, node: Mapping) -> dict[str, str]:
        value = _given(node, "float_ok", {})
        problem = float_ok_problem(value)
        if problem is not None:
            key, message = problem
            raise self.error(node, "float_ok", message) if key is None else self.error(value, key, message)
        return dict(value)

    def rule(self, raw: Any, index: int, w_default: "dict | None", a_default: "dict | None",
             default_sites: Mapping) -> Rule:
        if not isinstance(raw, Mapping):
            raise RecipeError(f"rule {index} must be a mapping, got {_tname(raw)}", source=self.source)
        self.check_keys(raw, RULE_KEYS, f"rule {index}")
        m = raw.get("match")
        if not isinstance(m, Mapping) or not m:
            raise self.error(raw, "match", f"rule {index} needs a 'match' mapping with 'path' and/or 'class'")
        self.check_keys(m, MATCH_KEYS, f"rule {index} match")
        classes = m.get("class", [])
        classes = [classes] if isinstance(classes, str) else classes
        if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
            raise self.error(m, "class", "must be a class name or a list of class names")
        path = m.get("path")
        if path is not None and not isinstance(path, str):
            raise self.error(m, "path", f"must be a string, got {_tname(path)}")
        if path is None and not classes:  # {class: []} or {path: null}: no condition, every module
            raise self.error(raw, "match", f"rule {index}'s match names no path and no class: give a 'path' "
                                           f"pattern and/or at least one 'class' (with neither it would match "
                                           f"every module)")
        try:
            match = Match(path=path, classes=tuple(classes))
        except PatternError as exc:
            raise self.error(m, "path", str(exc)) from None
        w = self.spec_dict(raw, "weight", w_default)
        a = self.spec_dict(raw, "activation", a_default)
        return Rule(match=match, config=self.config(raw, w, a, default_sites),
                    skip=self.boolean(raw, "skip", False), float_ok=self.float_ok(raw),
                    note=self.string(raw, "note", ""), index=index, own_sites=tuple(self.sites(raw)),
                    line=raw.line if isinstance(raw, LineDict) else None)


def _given(node: Mapping, key: str, default: Any) -> Any:
    """node[key], ``default`` where it is absent or null (``rules:`` with nothing after it); an
    empty value of the wrong type (``rules: {}``, ``defaults: false``) is returned for the caller's
    type check to refuse, not taken for the default."""
    value = node.get(key)
    return default if value is None else value


def _tname(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    return "null" if value is None else type(value).__name__


def _nullable(field_name: str) -> bool:
    """Whether a QuantSpec field takes ``null`` (its default is None: ``axis``, ``group_size``)."""
    import dataclasses
    return any(f.name == field_name and f.default is None for f in dataclasses.fields(QuantSpec))
