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
    for col in ("rule", "skip", "weight", "activation", "note"):
        table.add_column(col)
    table.add_row("defaults", "", _spec(recipe.defaults.weight), _spec(recipe.defaults.activation), "")
    for rule in recipe.rules:
        table.add_row(rule.label(), "yes" if rule.skip else "", _spec(rule.config.weight),
                      _spec(rule.config.activation), rule.note)
    console().print(table)
    return 0


def _spec(spec) -> str:
    return spec.short() if spec is not None else "float"
