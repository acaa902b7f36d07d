import yaml

from qswap.recipe import load_recipe, parse_recipe


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
