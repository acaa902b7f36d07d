from qswap.recipe.loader import load_recipe, parse_recipe, parse_yaml, shipped_recipe_names, with_simulate
from qswap.recipe.schema import Recipe, Rule, same_recipe

__all__ = ["Recipe", "Rule", "load_recipe", "parse_recipe", "parse_yaml", "same_recipe", "shipped_recipe_names",
           "with_simulate"]
