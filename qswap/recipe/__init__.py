from qswap.recipe.loader import load_recipe, parse_recipe, parse_yaml, shipped_recipe_names, with_simulate
from qswap.recipe.schema import Recipe, Rule

__all__ = ["Recipe", "Rule", "load_recipe", "parse_recipe", "parse_yaml", "shipped_recipe_names", "with_simulate"]
