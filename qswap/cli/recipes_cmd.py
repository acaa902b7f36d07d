"""List the shipped recipes, or show one recipe's rules."""
from __future__ import annotations

import argparse

from qswap.cli.render import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="a shipped recipe name or a YAML path to show")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from qswap.recipe import load_recipe, shipped_recipe_names

    if args.recipe is None:
        table = Table(title="shipped recipes")
        table.add_column("name")
        table.add_column("description")
        for name in shipped_recipe_names():
            table.add_row(name, load_recipe(name).description)
        console().print(table)
        return 0
    recipe = load_recipe(args.recipe)
    table = Table(title=f"{recipe.name} ({recipe.source})")
    for col in ("rule", "skip", "weight", "activation", "sites", "note"):
        table.add_column(col, overflow="fold")  # a rule's pattern has no space to wrap at: folded, not cut with '…'
    table.add_row("defaults", "", _spec(recipe.defaults.weight), _spec(recipe.defaults.activation),
                  _sites(recipe.defaults.sites, recipe.defaults.sites), "")
    for rule in recipe.rules:
        table.add_row(rule.label(), "yes" if rule.skip else "", _spec(rule.config.weight),
                      _spec(rule.config.activation), _sites(rule.config.sites, rule.own_sites), rule.note)
    out = console()
    out.print(table)
    for line in _settings(recipe):
        out.print(line)
    return 0


def _spec(spec) -> str:
    return spec.short() if spec is not None else "float"


def _sites(sites, names) -> str:
    """``site: spec`` for each of ``names`` (a rule's own entries; the defaults': all): the weight
    or the activation spec, as the counterparts that own the site declare its kind (both where
    no registered counterpart has it)."""
    kinds = _site_kinds()
    shown = []
    for name in names:
        entry = sites.get(name)
        if entry is None:
            shown.append(f"{name}: float")
            continue
        w, a = _spec(entry.weight), _spec(entry.activation)
        kind = kinds.get(name)
        shown.append(f"{name}: {a if kind == 'activation' else w if kind == 'weight' or w == a else f'{a} (a constant: {w})'}")
    return ", ".join(shown)


def _site_kinds() -> dict[str, str]:
    """site name -> its kind, from every registered counterpart (fairseq's too, where fairseq imports)."""
    import importlib
    import warnings

    from qswap.nn.registry import REGISTRY
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("qswap.nn.fairseq")
    except Exception:  # noqa: BLE001  (no fairseq, or a broken one: torch's own counterparts only)
        pass
    return {site: kind for cls in REGISTRY.values() for site, kind in cls.sites.items()}


def _settings(recipe) -> list[str]:
    """What the recipe sets besides its rules: transforms, the integer or float insides, what
    calibration observes, declared float ops and dynamic ranges."""
    lines = [f"transforms (in order, before converting): {', '.join(t.describe() for t in recipe.transforms)}"
             if recipe.transforms else "transforms: none",
             f"simulate: {recipe.simulate}; observe: {recipe.observe}; strict: {str(recipe.strict).lower()}"]
    if recipe.dynamic_activations:
        lines.append("dynamic_activations: true (activation ranges computed at run time, declared)")
    lines += [f"float_ok {key}: {why}" for key, why in recipe.float_ok.items()]
    return lines
