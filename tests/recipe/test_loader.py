import textwrap

import pytest

import qswap
from qswap.errors import RecipeError
from qswap.recipe import load_recipe, parse_recipe, parse_yaml, shipped_recipe_names

SHIPPED = ["fp32", "w8a8", "w8a8_per_channel", "w4a8", "w4a8_edges8", "w4a4", "w4a4_edges8",
           "w4a4_edges8_stream_smoothquant", "w8_weight_only"]


def test_every_required_recipe_is_shipped():
    assert set(SHIPPED) <= set(shipped_recipe_names())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.version == 1 and recipe.description
    again = parse_recipe(recipe.to_dict())
    assert again.defaults == recipe.defaults and again.rules == recipe.rules
    import yaml
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(path).rules == recipe.rules


def test_rule_fields_merge_over_defaults():
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: {bits: 8, granularity: per_channel}
          activation: {bits: 8, symmetric: false}
        rules:
          - match: {path: "encoder.*"}
            weight: {bits: 4}
          - match: {class: Softmax}
            activation: null
    """))
    w = recipe.rules[0].config.weight
    assert (w.bits, w.granularity) == (4, "per_channel")
    assert recipe.rules[1].config.activation is None
    assert recipe.rules[1].config.weight.bits == 8


BAD = {
    "unknown top key": ("version: 1\nmodel: x\n", "key 'model': unknown key in recipe", 2),
    "unknown rule key": ("version: 1\nrules:\n  - match: {path: a}\n    bitz: 4\n", "key 'bitz'", 4),
    "unknown spec field": ("version: 1\ndefaults:\n  weight: {bitz: 4}\n", "unknown QuantSpec field", 3),
    "bad bits": ("version: 1\ndefaults:\n  weight:\n    bits: 99\n", "key 'bits'.*between 2 and 16", 4),
    "zero bits": ("version: 1\ndefaults:\n  activation: {bits: 0}\n", "between 2 and 16", 3),
    "string bits": ("version: 1\ndefaults:\n  activation: {bits: eight}\n", "must be an integer", 3),
    "bad regex": ("version: 1\nrules:\n  - match: {path: 're:(['}\n", "invalid regex", 3),
    "catastrophic regex": ("version: 1\nrules:\n  - match: {path: 're:(a+)+$'}\n", "nests quantifiers", 3),
    "missing version": ("defaults: {}\n", "missing 'version'", 1),
    "future version": ("version: 7\n", "unsupported version 7", 1),
    "not a mapping": ("- 1\n- 2\n", "mapping at the top level", None),
    "rules not a list": ("version: 1\nrules: {a: 1}\n", "must be a list", 2),
    "rule without match": ("version: 1\nrules:\n  - skip: true\n", "needs a 'match'", 3),
    "match with an empty class list": ("version: 1\nrules:\n  - match: {class: []}\n    skip: true\n",
                                       "names no path and no class", 3),
    "match with a null path": ("version: 1\nrules:\n  - match: {path: null}\n    skip: true\n",
                               "names no path and no class", 3),
    "skip not bool": ("version: 1\nrules:\n  - match: {path: a}\n    skip: maybe\n", "true or false", 4),
    "float_ok without reason": ("version: 1\nfloat_ok: {aten.exp: ''}\n", "non-empty reason", 2),
    "duplicate key": ("version: 1\nversion: 1\n", "duplicate key", 2),
    "invalid yaml": ("version: 1\ndefaults: [\n", "invalid YAML", None),
    "axis without granularity": ("version: 1\ndefaults:\n  weight: {bits: 4, axis: 1}\n",
                                 "key 'axis'.*only allowed with granularity per_channel or per_group", 3),
    # an option its observer never reads had been accepted and ignored
    "percentile on minmax": ("version: 1\ndefaults:\n  activation:\n    observer: minmax\n    percentile: 99.0\n",
                             "key 'percentile': percentile is read by observer percentile only.*observer is minmax", 5),
    "momentum on mse": ("version: 1\ndefaults:\n  activation: {observer: mse, momentum: 0.5}\n",
                        "key 'momentum': momentum is read by observer moving_average only", 3),
    "momentum true": ("version: 1\ndefaults:\n  activation:\n    observer: moving_average\n    momentum: true\n",
                      "key 'momentum'.*must be a number", 5),
    # LSQ learns activation grids: a weight's grid is re-derived from it every step and never trained
    "learnable weight": ("version: 1\ndefaults:\n  weight:\n    bits: 4\n    learnable: true\n",
                         "key 'learnable'.*LSQ learns activation grids", 5),
    "learnable rule weight": ("version: 1\nrules:\n  - match: {path: a}\n    weight:\n      learnable: true\n",
                              "key 'learnable'.*weight grid follows its weight", 5),
    # ... and on a weight site's entry (had passed the loader, then failed at convert with no file or line)
    # empty values of the wrong type had been taken for the default, silently
    "defaults an empty list": ("version: 1\ndefaults: []\n", "key 'defaults': must be a mapping, got list", 2),
    "defaults false": ("version: 1\ndefaults: false\n", "key 'defaults': must be a mapping, got bool", 2),
    "rules an empty mapping": ("version: 1\nrules: {}\n", "key 'rules': must be a list of rules, got mapping", 2),
    "rules 0": ("version: 1\nrules: 0\n", "key 'rules': must be a list of rules, got int", 2),
    "transforms an empty mapping": ("version: 1\ntransforms: {}\n", "key 'transforms': must be a list", 2),
    "float_ok an empty list": ("version: 1\nfloat_ok: []\n", "key 'float_ok': must map an op or module", 2),
    "sites false": ("version: 1\ndefaults:\n  sites: false\n", "key 'sites': must be a mapping of site", 3),
    "group_size true": ("version: 1\ndefaults:\n  weight: {granularity: per_group, group_size: true}\n",
                        "key 'group_size': .*positive integer group_size, got True", 3),
    "smoothquant alpha 2": ("version: 1\ntransforms:\n  - smoothquant: {alpha: 2}\n",
                            r"key 'smoothquant': transform smoothquant: alpha must be in \[0, 1\]", 3),
    "learnable weight site": ("version: 1\ndefaults:\n  sites:\n    norm_weight:\n      bits: 8\n      learnable: true\n",
                              "key 'learnable': site 'norm_weight' is a weight site: .*LSQ learns activation grids", 6),
    "learnable rule weight site": ("version: 1\nrules:\n  - match: {path: a}\n    sites:\n      weight: {learnable: true}\n",
                                   "key 'learnable': site 'weight' is a weight site", 5),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_recipes_name_file_line_and_key(case, tmp_path):
    text, message, line = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    if line is not None:
        assert info.value.line == line and f"bad.yaml:{line}:" in str(info.value)


def test_learnable_on_a_site_some_counterpart_reads_as_an_activation_is_kept():
    recipe = parse_recipe({"version": 1, "defaults": {"sites": {"input": {"learnable": True}}}})
    assert recipe.defaults.spec("input", "activation").learnable


def test_a_key_written_beside_a_yaml_merge_overrides_the_merged_one():
    """``weight: {<<: *w, bits: 4}`` (YAML's merge key) had been refused as a duplicate key."""
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: &w {bits: 8, granularity: per_channel}
        rules:
          - match: {path: "encoder.*"}
            weight:
              <<: *w
              bits: 4
    """))
    weight = recipe.rules[0].config.weight
    assert (weight.bits, weight.granularity) == (4, "per_channel")
    with pytest.raises(RecipeError, match="duplicate key 'bits'") as info:  # two of the mapping's own: still refused
        parse_yaml("version: 1\ndefaults:\n  weight: &w {bits: 8}\n  activation:\n    <<: *w\n    bits: 4\n    bits: 6\n")
    assert info.value.line == 7


def test_unknown_name_lists_shipped_recipes():
    with pytest.raises(RecipeError, match="shipped recipes: .*w8a8"):
        load_recipe("w9a9")


def test_a_shipped_name_is_not_hidden_by_a_folder_of_that_name_and_is_ambiguous_with_a_file(tmp_path, monkeypatch):
    """A folder named w8a8 in the working directory had hidden the shipped recipe ('cannot read
    recipe file: Is a directory'); a file of that name is a RecipeError naming both; an empty
    name had read the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w8a8").mkdir()
    assert load_recipe("w8a8").name == "w8a8"
    (tmp_path / "w4a8").write_text("version: 1\nname: mine\n")
    with pytest.raises(RecipeError, match=r"'w4a8' is both a shipped recipe and a file .* pass './w4a8' for the file"):
        load_recipe("w4a8")
    assert load_recipe("./w4a8").name == "mine"
    for empty in ("", " "):
        with pytest.raises(RecipeError, match="a recipe name or path is empty; shipped recipes: .*w8a8"):
            load_recipe(empty)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(path)


def test_public_name():
    assert qswap.load_recipe is load_recipe


def test_defaults_sites_apply_under_each_rule_merged_over_its_specs():
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: {bits: 8}
          activation: {bits: 8, symmetric: false}
          sites: {softmax_out: null, softmax_in: {bits: 6}, norm_weight: {bits: 6}}
        rules:
          - match: {class: MultiheadAttention}
            activation: {bits: 4}
            sites: {softmax_out: {bits: 8}, q: null}
          - match: {class: LayerNorm}
            weight: {granularity: per_channel}
    """))
    attention, norm = (r.config for r in recipe.rules)
    assert recipe.defaults.sites["softmax_out"] is None
    assert attention.spec("softmax_out", "activation").bits == 8  # its own win
    assert attention.spec("q", "activation") is None
    softmax_in = attention.spec("softmax_in", "activation")
    assert (softmax_in.bits, softmax_in.symmetric) == (6, False)
    assert norm.spec("softmax_out", "activation") is None  # the defaults' null survives a rule without sites
    norm_weight = norm.spec("norm_weight", "weight")
    assert (norm_weight.bits, norm_weight.granularity) == (6, "per_channel")
    assert recipe.rules[0].own_sites == ("softmax_out", "q") and recipe.rules[1].own_sites == ()


def test_a_site_entry_is_merged_over_the_spec_of_the_kind_its_counterpart_declares():
    """The name does not decide: ``scores_bias`` is an activation, ``pos_bias_u`` a constant."""
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: {bits: 4, granularity: per_channel}
          activation: {bits: 8, symmetric: false}
          sites: {scores_bias: {rounding: floor}, pos_bias_u: {rounding: floor}}
    """))
    config = recipe.defaults
    scores_bias, pos_bias_u = config.spec("scores_bias", "activation"), config.spec("pos_bias_u", "weight")
    assert (scores_bias.bits, scores_bias.symmetric, scores_bias.rounding) == (8, False, "floor")
    assert (pos_bias_u.bits, pos_bias_u.granularity, pos_bias_u.rounding) == (4, "per_channel", "floor")


def test_with_simulate_sets_the_key_on_every_rule_and_refuses_other_values():
    from qswap.recipe import with_simulate
    recipe = with_simulate("w4a8_edges8", "integer")
    assert recipe.name == "w4a8_edges8" and recipe.rules
    assert {recipe.simulate, recipe.defaults.simulate, *(r.config.simulate for r in recipe.rules)} == {"integer"}
    assert with_simulate(recipe, "float").simulate == "float"
    with pytest.raises(RecipeError, match="simulate"):
        with_simulate("w8a8", "fixed_point")


def test_a_clash_with_an_inherited_field_says_how_to_drop_it(tmp_path):
    """A rule's ``granularity: per_channel`` merged over per_group defaults keeps their
    ``group_size``, which the rule never wrote: the error says it is inherited and that
    ``group_size: null`` drops it, which then loads."""
    import pytest

    from qswap.errors import RecipeError

    text = ("version: 1\ndefaults:\n  weight: {bits: 4, granularity: per_group, group_size: 16}\n"
            "  activation: {bits: 8}\nrules:\n  - match: {class: Linear}\n    weight: {granularity: per_channel%s}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text % "")
    with pytest.raises(RecipeError, match=r"r\.yaml:7: .*group_size: 16 is inherited .* set `group_size: null` here"):
        qswap.load_recipe(path)
    path.write_text(text % ", group_size: null")
    assert qswap.load_recipe(path).name
    # per_tensor over per_channel defaults: the inherited axis (ignored before) is refused the same way
    text = ("version: 1\ndefaults:\n  weight: {bits: 4, granularity: per_channel, axis: 0}\n"
            "rules:\n  - match: {class: Linear}\n    weight: {granularity: per_tensor%s}\n")
    path.write_text(text % "")
    with pytest.raises(RecipeError, match=r"r\.yaml:6: .*axis: 0 is inherited .* set `axis: null` here"):
        qswap.load_recipe(path)
    path.write_text(text % ", axis: null")
    assert qswap.load_recipe(path).rules[0].config.weight.channel_axis is None


def test_a_rule_that_nulls_a_kind_keeps_the_defaults_sites_of_that_kind_float():
    """``activation: null`` in a rule (a weight-only subtree) is not undone by the defaults' site
    entries, which refine a spec the rule no longer has; the rule's own entries still quantize."""
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: {bits: 4}
          activation: {bits: 4, symmetric: false}
          sites: {attn_residual: {granularity: per_channel, axis: -1}}
        rules:
          - match: {path: decoder}
            activation: null
          - match: {path: encoder}
            activation: null
            sites: {attn_out: {bits: 8}}
          - match: {class: LayerNorm}
            weight: {bits: 8}
    """))
    decoder, encoder, norm = (r.config for r in recipe.rules)
    assert decoder.spec("attn_residual", "activation") is None
    assert encoder.spec("attn_out", "activation").bits == 8
    residual = norm.spec("attn_residual", "activation")  # a rule that leaves the kind alone
    assert (residual.bits, residual.granularity) == (4, "per_channel")


def test_an_activation_sites_entry_is_not_checked_as_a_weight_spec():
    """A site every registered counterpart declares an activation site is merged over the
    activation spec only: ``observer: percentile`` there (per tensor, as the activation defaults
    are) is not refused for the per-channel weight defaults it would have made with the weight
    spec (tools/strategies.py's ``per_site`` picks did)."""
    pytest.importorskip("fairseq")
    import qswap.nn.fairseq  # noqa: F401  (registers the counterparts that declare attn_residual)
    recipe = parse_yaml(textwrap.dedent("""
        version: 1
        defaults:
          weight: {bits: 4, granularity: per_channel, axis: 0}
          activation: {bits: 4, symmetric: false}
          sites: {attn_residual: {observer: percentile}}
    """))
    assert recipe.defaults.spec("attn_residual", "activation").observer == "percentile"


def test_a_shipped_name_given_as_a_path_or_a_missing_yaml_file_points_to_the_shipped_recipe(tmp_path, monkeypatch):
    """``load_recipe(Path("w8a8"))`` had said 'no shipped recipe named w8a8' while listing it, and
    a missing ``w8a8.yaml`` only 'recipe file not found'."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="no file 'w8a8'; a Path names a recipe file: for the shipped recipe "
                                          "'w8a8' pass the string 'w8a8'"):
        load_recipe(Path("w8a8"))
    with pytest.raises(RecipeError, match=r"w8a8\.yaml: recipe file not found; did you mean the shipped recipe 'w8a8'"):
        load_recipe("w8a8.yaml")
    assert load_recipe("w8a8").name == "w8a8"


def test_a_stored_recipe_reads_without_the_refusals_of_options_it_ignored():
    """A checkpoint stores its recipe's plain data; one written before unread observer options were
    refused (``percentile`` beside ``observer: minmax``) keeps loading (it had been 'damaged')."""
    from qswap.recipe.loader import load_stored_recipe

    data = {"version": 1, "name": "old", "defaults": {"activation": {"observer": "minmax", "percentile": 99.0}}}
    with pytest.raises(RecipeError, match="percentile is read by observer percentile only"):
        load_recipe(data)
    assert load_stored_recipe(data).defaults.activation.observer == "minmax"
    assert load_stored_recipe("w8a8").name == "w8a8"


def test_a_file_larger_than_a_recipe_is_refused_without_reading_it_whole(tmp_path):
    """The whole file had been read before the size check: /dev/zero ran out of memory, a
    checkpoint passed as --recipe was read completely."""
    from pathlib import Path

    from qswap.recipe.loader import MAX_RECIPE_BYTES

    big = tmp_path / "checkpoint.pt"
    big.write_bytes(b"x" * (MAX_RECIPE_BYTES + 10))
    with pytest.raises(RecipeError, match=f"larger than {MAX_RECIPE_BYTES} bytes"):
        load_recipe(str(big))
    if Path("/dev/zero").exists():
        with pytest.raises(RecipeError, match="larger than"):
            load_recipe("/dev/zero")
