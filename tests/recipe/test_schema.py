import yaml

from qswap.recipe import load_recipe, parse_recipe, same_recipe


def test_to_dict_keeps_the_name_taken_from_the_file_stem(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("version: 1\ndefaults:\n  weight: {bits: 8}\n")
    recipe = load_recipe(path)
    assert recipe.name == "my"
    data = recipe.to_dict()
    assert (data["name"], data["version"]) == ("my", 1)
    assert parse_recipe(data).name == "my"
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(data))
    again = load_recipe(saved)
    assert again.name == "my" and again.defaults == recipe.defaults


def test_same_recipe_compares_what_the_recipes_were_loaded_from(tmp_path):
    """One recipe equality for the checks that a checkpoint's stored recipe is the one asked for:
    the same data from another file or a dict is the same recipe; another name or grid is not."""
    w8a8 = load_recipe("w8a8")
    assert same_recipe(w8a8, load_recipe(w8a8.to_dict())) and same_recipe(w8a8, w8a8)
    copy = tmp_path / "w8a8.yaml"
    copy.write_text(yaml.safe_dump(w8a8.to_dict()))
    assert same_recipe(load_recipe(copy), w8a8)
    assert not same_recipe(w8a8, load_recipe("w4a8"))
    assert not same_recipe(w8a8, load_recipe({**w8a8.to_dict(), "name": "other"}))



def test_a_recipe_built_by_hand_with_a_field_of_another_kind_is_a_recipe_error_naming_it():
    """``qswap.Recipe(name="x", defaults=None)`` had converted into an AttributeError from deep
    inside ``convert``; the loaded recipes build as before."""
    import dataclasses

    import pytest

    import qswap
    from qswap.errors import RecipeError

    good = load_recipe("w8a8")
    cases = [({"defaults": None}, "key 'defaults': Recipe.defaults must be a QuantConfig, got NoneType"),
             ({"rules": [good.rules]}, "key 'rules': Recipe.rules must be a tuple, got list"),
             ({"rules": ("r",)}, "key 'rules': Recipe.rules holds Rules"),
             ({"simulate": "fast"}, "key 'simulate': must be one of integer, float, got 'fast'"),
             ({"observe": None}, "key 'observe': must be one of quantized, float"),
             ({"float_ok": {"softmax": ""}}, "key 'float_ok': float_ok entry 'softmax'"),
             ({"strict": "no"}, "key 'strict': Recipe.strict must be a bool, got str")]
    for change, message in cases:
        with pytest.raises(RecipeError, match=message):
            dataclasses.replace(good, **change)
    with pytest.raises(RecipeError, match="defaults must be a QuantConfig"):
        qswap.Recipe(name="x", defaults="x")
    assert dataclasses.replace(good, name="copy").defaults == good.defaults
