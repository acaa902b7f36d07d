import warnings

import pytest
import torch
from torch import nn

import qswap
from helpers import Residual
from qswap.convert import QswapWarning
from qswap.errors import ConvertError, SpecError
from qswap.nn.base import QuantModule
from qswap.nn.linear import QLinear
from qswap.quant.fake_quantize import FakeQuantize


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.proj(self.embed(tokens)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_report_of_a_tied_weight_gives_the_spec_of_the_quantizer_it_shares():
    """The tied output projection reads the embedding's quantizer (the first owner's): its report
    row had given its own rule's spec (int4), which no quantizer of the model has."""
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "out"}, "weight": {"bits": 4}}]}
    with pytest.warns(QswapWarning, match="the first one wins"):
        converted = qswap.convert(TiedLM(), recipe)
    entries = {e.path: e for e in converted.qswap_report.entries}
    assert converted.out.weight_quant.spec.bits == 8
    assert entries["out"].weight == f"{converted.out.weight_quant.spec.short()}, tied to embed.weight"
    assert entries["embed"].weight == converted.embed.weight_quant.spec.short()


def test_caller_model_is_untouched_unless_inplace():
    model = TiedLM()
    before = _state(model)
    children = dict(model.named_children())
    converted = qswap.convert(model, "w8a8")
    converted(torch.randint(0, 20, (2, 5)))
    assert dict(model.named_children()) == children
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())
    for flag in ("no", 0, None):  # a string from a config ("no" is truthy) had converted in place
        with pytest.raises(ConvertError, match="inplace takes True or False"):
            qswap.convert(model, "w8a8", inplace=flag)
    with pytest.raises(ConvertError, match="strict takes True or False"):
        qswap.convert(model, "w8a8", strict="yes")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FakeQuantize) for m in model.modules())
    inplace = qswap.convert(model, "w8a8", inplace=True)
    assert inplace is model and isinstance(model.proj, QLinear)


def test_tied_weights_stay_tied_and_share_one_quantizer():
    converted = qswap.convert(TiedLM(), "w8a8")
    assert converted.out.weight is converted.embed.weight
    assert converted.out.weight_quant is converted.embed.weight_quant
    assert any("tied" in n for n in converted.qswap_report.notes)
    # counted once in the size: 20x8 embedding at 8 bits + proj weight 8 bits + proj bias float,
    # and a float32 scale for each of the two (symmetric per-tensor) weight grids
    assert converted.qswap_report.quantized_bytes == 160 + 64 + 8 * 4 + 2 * 4


def test_float_state_dict_loads_into_converted_model():
    model = TiedLM()
    converted = qswap.convert(TiedLM(), "w8a8")
    converted.load_state_dict(model.state_dict())  # strict: quantizer state may be absent
    assert torch.equal(converted.proj.weight, model.proj.weight)


def test_unmatched_class_only_rule_is_a_note_not_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", qswap.QswapWarning)
        converted = qswap.convert(TiedLM(), "w4a8")  # its LayerNorm rule has nothing to match
    assert any("matched no module" in n for n in converted.qswap_report.notes)


def test_unmatched_rule_warns_and_strict_raises():
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "encoder.nothing"}, "skip": True}]}
    with pytest.warns(qswap.QswapWarning, match="matched no module"):
        qswap.convert(TiedLM(), recipe)
    with pytest.raises(ConvertError, match="matched no module"):
        qswap.convert(TiedLM(), recipe, strict=True)


def test_a_class_rule_naming_no_known_class_warns_with_the_close_names_and_strict_raises():
    """A class-only rule that matches nothing is a note where it names a class qswap knows (a
    shipped recipe's norms: this model may have none); where none of its classes is a registered,
    passthrough, model or other module class it is most likely misspelled: a warning naming the
    closest known classes, a ConvertError in strict mode."""
    typo = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
            "rules": [{"match": {"class": ["LayerNrom"]}, "skip": True}]}
    with pytest.warns(qswap.QswapWarning, match=r"'LayerNrom' \(did you mean LayerNorm\b.*spelling"):
        converted = qswap.convert(TiedLM(), typo)
    assert converted.qswap_report.unmatched_rules == ["rule 0: class=LayerNrom"]
    with pytest.raises(ConvertError, match="strict mode: .*LayerNrom.*did you mean LayerNorm"):
        qswap.convert(TiedLM(), typo, strict=True)
    # a class qswap knows, or any module class defined (another architecture's: a recipe shared by
    # wav2vec 2.0 and S2T models keeping the former's feature extractor float): a note
    for known in (["torch.nn.modules.dropout.Dropout"], ["Dropout"], ["Bilinear"], ["torch.nn.modules.linear.Bilinear"]):
        rule = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
                "rules": [{"match": {"class": known}, "skip": True}]}
        with warnings.catch_warnings():
            warnings.simplefilter("error", qswap.QswapWarning)
            converted = qswap.convert(TiedLM(), rule, strict=True)
        assert any("matched no module" in n for n in converted.qswap_report.notes)


def test_a_misspelled_class_beside_known_ones_in_a_rule_warns_and_strict_raises():
    """Every class name of every rule is checked: a misspelled one in a list whose other class
    matches had never been reported, even in strict mode."""
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"class": ["Linear", "LayerNrom"]}, "weight": {"bits": 4}}]}
    with pytest.warns(qswap.QswapWarning, match=r"rule 0: class=Linear\|LayerNrom: no module class is named "
                                                r"'LayerNrom' \(did you mean LayerNorm\b"):
        qswap.convert(TiedLM(), recipe)
    with pytest.raises(ConvertError, match="strict mode: .*'LayerNrom' .*did you mean LayerNorm"):
        qswap.convert(TiedLM(), recipe, strict=True)
    recipe["rules"][0]["match"]["class"] = ["LayerNorm", "LayerNrom"]  # matching nothing in this model
    with pytest.raises(ConvertError, match="strict mode: .*'LayerNrom' .*did you mean LayerNorm"):
        qswap.convert(TiedLM(), recipe, strict=True)


@pytest.mark.parametrize("later", [{"class": "Linear"}, {"path": "proj"}])
def test_a_rule_whose_modules_an_earlier_rule_takes_warns_that_it_is_shadowed(later):
    """A rule after a catch-all gets none of its modules (first match wins): it had been reported
    as 'matched no module' (a note only, for a class rule), which reads as a typo and is false."""
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "re:.*"}, "weight": {"bits": 4}},
                        {"match": later, "weight": {"bits": 8}}]}
    shadowed = (r"recipe: rule 1: .* takes no module: shadowed by rule 0 \(first match wins\): rule 0: path=re:\.\* takes "
                r"proj, .*move this rule before rule 0, or narrow rule 0")
    with pytest.warns(qswap.QswapWarning, match=shadowed):
        converted = qswap.convert(TiedLM(), recipe)
    assert not any("matched no module" in n for n in converted.qswap_report.notes)
    with pytest.raises(ConvertError, match="strict mode: " + shadowed):
        qswap.convert(TiedLM(), recipe, strict=True)


class Doubler(nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("from_float, message", [
    (lambda cls, module, config: module.no_such_attribute,
     r"^0: .*QDoubler.from_float\(Doubler, config\) failed: AttributeError: .*no_such_attribute.*fix the counterpart"),
    (lambda cls, module, config: None, r"^0: .*QDoubler.from_float returned NoneType, neither a qswap.QuantModule"),
    # a plain module had stood in the model unquantized, the convert report calling it converted
    (lambda cls, module, config: nn.Linear(4, 4), r"^0: .*QDoubler.from_float returned Linear, neither a qswap.QuantModule nor the float module itself"),
])
def test_a_counterpart_whose_from_float_fails_or_returns_no_module_is_a_convert_error_naming_it(from_float, message):
    """A user's from_float that raised, or returned None, had surfaced as a raw AttributeError from
    inside convert (None: 'NoneType' object has no attribute 'named_parameters')."""
    from qswap.nn.registry import register, unregister

    class QDoubler(QuantModule):
        pass

    QDoubler.from_float = classmethod(from_float)
    register(Doubler)(QDoubler)  # registration checks that from_float is its own
    try:
        with pytest.raises(ConvertError, match=message):
            qswap.convert(nn.Sequential(Doubler()), "w8a8")
    finally:
        unregister(Doubler)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_asking_for_float(dtype):
    """A float16 / bfloat16 model had converted without complaint, then failed at its first
    forward (calibration blamed the batches)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    with pytest.raises(ConvertError, match=rf"parameter 0.weight is {dtype}; call model.float\(\) first"):
        qswap.convert(model, "w8a8", inplace=True)
    assert type(model[0]) is nn.Linear
    converted = qswap.convert(model.float(), "w8a8")
    qswap.calibrate(converted, [torch.randn(8, 16)])
    assert converted(torch.randn(2, 16)).dtype == torch.float32


def test_strict_fails_on_modules_left_float():
    class Odd(nn.Module):
        def forward(self, x):
            return x.exp()

    with pytest.raises(ConvertError, match="left float"):
        qswap.convert(nn.Sequential(nn.Linear(2, 2), Odd()), "w8a8", strict=True)


def test_skip_rule_and_inheritance_from_ancestor_rule():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "0"}, "weight": {"bits": 4}}, {"match": {"path": "1"}, "skip": True}]}
    converted = qswap.convert(model, recipe)
    assert converted[0][0].weight_quant.spec.bits == 4  # inherits rule 0 from its parent "0"
    assert isinstance(converted[1], nn.Linear)
    entry = {e.path: e for e in converted.qswap_report.entries}
    assert entry["1"].action == "skipped" and "rule 1" in entry["1"].rule
    assert entry["0.0"].rule.startswith("rule 0")


def test_converting_twice_is_an_error():
    converted = qswap.convert(TiedLM(), "w8a8")
    with pytest.raises(ConvertError, match="already contains qswap quantizers"):
        qswap.convert(converted, "w8a8")


def test_convert_rejects_non_modules():
    with pytest.raises(ConvertError, match="torch.nn.Module"):
        qswap.convert("model.pt", "w8a8")


def test_root_module_can_be_swapped():
    converted = qswap.convert(nn.Linear(3, 3), "w8a8")
    assert isinstance(converted, QLinear) and converted.qswap_recipe.name == "w8a8"


def test_s2t_transformer_converts_and_report_lists_every_module():
    from qswap.models import build_s2t_transformer, s2t_net_input
    model = build_s2t_transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", qswap.QswapWarning)
        converted = qswap.convert(model, "w8a8")
    report = converted.qswap_report
    paths = {e.path for e in report.entries}
    leaves = {n for n, m in model.named_modules() if n and not list(m.children())}
    assert leaves <= paths | {p for p in leaves if any(p.startswith(q + ".") for q in paths)}
    assert report.counts()["quantized"] >= 20
    assert report.quantized_bytes < report.float_bytes / 3
    net_input = s2t_net_input()
    with torch.no_grad():
        ref, out = model(**net_input)[0], converted(**net_input)[0]
    assert out.shape == ref.shape and torch.isfinite(out).all()


def _attention_model():
    return nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))


def test_a_site_name_no_converted_module_has_is_an_error_naming_key_rule_and_valid_sites():
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"class": "Linear"}, "sites": {"inptu": None}}]}
    with pytest.raises(ConvertError, match=r"rule 0: class=Linear: site 'inptu' .*QLinear: input, weight"):
        qswap.convert(TiedLM(), recipe)
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "sites": {"softmax_ot": None}}}
    with pytest.raises(ConvertError, match=r"defaults: site 'softmax_ot' .*registered counterparts: .*softmax_out"):
        qswap.convert(_attention_model(), recipe)


def test_a_site_is_valid_where_some_module_it_applies_to_has_it():
    # defaults: any registered counterpart; a rule: the modules it or an ancestor's match covers
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8},
                                         "sites": {"softmax_out": None}},
              "rules": [{"match": {"path": "0"}, "sites": {"input": None}}]}
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.MultiheadAttention(8, 2))
    converted = qswap.convert(model, recipe)
    assert isinstance(converted[0][0].input_quant, nn.Identity)
    assert isinstance(converted[1].core.softmax_out_quant, nn.Identity)
    with pytest.raises(ConvertError, match="site 'softmax_out'"):  # a Linear has no softmax
        qswap.convert(TiedLM(), recipe | {"rules": [{"match": {"path": "proj"}, "sites": {"softmax_out": None}}]})
    # one recipe for many architectures: a defaults site this model has no module for is fine
    assert isinstance(qswap.convert(TiedLM(), recipe | {"rules": []}).proj.input_quant, FakeQuantize)


def test_a_rule_that_matched_nothing_is_not_also_a_site_error():
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "encoder.nothing"}, "sites": {"softmax_out": None}},
                        {"match": {"class": "LayerNorm"}, "sites": {"norm_weight": None}}]}
    with pytest.warns(qswap.QswapWarning, match="matched no module"):
        qswap.convert(TiedLM(), recipe)


def test_defaults_sites_apply_under_a_rule_that_hits_the_module():
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8},
                                         "sites": {"softmax_out": None}},
              "rules": [{"match": {"class": "MultiheadAttention"}, "weight": {"bits": 4}}]}
    converted = qswap.convert(_attention_model(), recipe)
    assert converted[1].in_proj_weight_quant.spec.bits == 4
    assert isinstance(converted[1].core.softmax_out_quant, nn.Identity)
    assert isinstance(converted[1].core.softmax_in_quant, FakeQuantize)


def test_a_rule_float_ok_is_prefixed_once_with_the_path_it_matched():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "0"}, "float_ok": {"add": "a float residual"}},
                        {"match": {"path": "1"}, "skip": True, "float_ok": {"*": "a float head"}}]}
    converted = qswap.convert(model, recipe)
    assert converted.qswap_report.float_ok == {"0:add": "a float residual", "1:*": "a float head"}


def _failing_model():
    # the MultiheadAttention with kdim != embed_dim makes from_float raise after the Linear is built
    return nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.MultiheadAttention(4, 2, kdim=3))


def _modules(model):
    return [(name, id(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("case", ["strict", "from_float", "site"])
def test_a_failing_inplace_convert_leaves_the_model_untouched(case):
    model = _failing_model() if case == "from_float" else nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Softplus())
    recipe = ({"version": 1, "defaults": {"weight": {"bits": 8}, "sites": {"inptu": None}}}
              if case == "site" else "w8a8")
    before = _modules(model)
    with pytest.raises(ConvertError, match={"strict": "left float", "from_float": "kdim",
                                            "site": "inptu"}[case]):
        qswap.convert(model, recipe, inplace=True, strict=case == "strict")
    assert _modules(model) == before
    assert not any(isinstance(m, (FakeQuantize, QLinear)) for m in model.modules())


def test_a_weight_grid_that_does_not_fit_fails_an_inplace_convert_before_any_module_is_swapped():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 5},
                                         "activation": {"bits": 8}}}
    before = _modules(model)
    with pytest.raises(SpecError, match=r"0.weight \(shape \(32, 16\)\)"):
        qswap.convert(model, recipe, inplace=True)
    assert _modules(model) == before
    assert type(qswap.convert(model, "w8a8", inplace=True)[0]) is QLinear  # and it converts afterwards


def test_a_recipe_with_transforms_that_fails_a_check_leaves_the_inplace_models_weights():
    """smoothquant rescales weights before the rules are checked: a strict recipe with a rule that
    matches nothing fails, and the caller's weights are the ones it passed."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer, s2t_net_input

    model, x = build_s2t_transformer(seed=0), s2t_net_input()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _modules(model)
    recipe = qswap.load_recipe("w4a4_edges8_stream_smoothquant").to_dict()
    recipe["rules"] = [{"match": {"path": "encoder.no_such_module"}, "skip": True}] + recipe.get("rules", [])
    with pytest.raises(ConvertError, match="no_such_module"):
        qswap.convert(model, recipe, inplace=True, strict=True, data=[x])
    assert _modules(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_an_inplace_convert_with_transforms_reads_batches_given_as_an_iterator_once():
    """The trial on a copy and the conversion itself both see the batches of a one-pass iterator,
    and give what a conversion of a copy with the same batches gives."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer, s2t_net_input

    x = s2t_net_input()
    reference = qswap.convert(build_s2t_transformer(seed=0), "w4a4_edges8_stream_smoothquant", data=[x])
    converted = qswap.convert(build_s2t_transformer(seed=0), "w4a4_edges8_stream_smoothquant", inplace=True,
                              data=iter([x]))
    expected = reference.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in converted.state_dict().items())


@pytest.mark.parametrize("arch", ["s2t_transformer", "s2t_conformer", "wav2vec2_ctc", "linear", "gelu"])
def test_an_inplace_convert_of_a_model_whose_root_has_a_counterpart_converts_the_callers_object(arch):
    """The root's counterpart takes over the caller's object: ``convert(model, inplace=True)`` is
    ``model``, fully converted (its root's quantizers, its report), and computes what a converted
    copy computes. The root had been replaced by a new object, leaving the caller a float root
    whose children were partly swapped."""
    if arch == "linear":
        build, net_input = (lambda: torch.manual_seed(0) and nn.Linear(8, 8)), (lambda: torch.randn(2, 8))
    elif arch == "gelu":  # a counterpart that keeps the float module as its child (QGELU's op): not itself
        build, net_input = nn.GELU, (lambda: torch.randn(2, 8))
    else:
        pytest.importorskip("fairseq")
        from qswap import models
        build = getattr(models, f"build_{arch}")
        net_input = models.wav2vec2_net_input if arch == "wav2vec2_ctc" else models.s2t_net_input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QswapWarning)
        model = build().eval()
        reference = qswap.convert(build().eval(), "w8a8")
        converted = qswap.convert(model, "w8a8", inplace=True)
    assert converted is model and isinstance(model, QuantModule)
    assert model.qswap_report.entries == reference.qswap_report.entries
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    x = net_input()
    with torch.no_grad():
        out, expected = (model(**x), reference(**x)) if isinstance(x, dict) else (model(x), reference(x))
    out, expected = (out[0], expected[0]) if isinstance(out, tuple) else (out, expected)
    out, expected = (out["encoder_out"], expected["encoder_out"]) if isinstance(out, dict) else (out, expected)
    assert torch.equal(out, expected)


class Looped(nn.Module):
    """A weight-shared stack: one Linear applied three times, under the names layers.0-2."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8)] * 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Aliased(nn.Module):
    """One Linear under three names: ``shared``, ``alias`` (same parent) and ``blocks.0``."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.alias = self.shared
        self.blocks = nn.ModuleList([self.shared, nn.Linear(8, 8)])

    def forward(self, x):
        return self.blocks[1](self.alias(x) + self.shared(x))


@pytest.mark.parametrize("build, names", [(Looped, ["layers.0", "layers.1", "layers.2"]),
                                          (Aliased, ["shared", "alias", "blocks.0"])])
def test_a_module_reached_under_several_names_gets_one_counterpart_under_every_name(build, names):
    """The walk had visited one name only (``named_children`` drops repeats): the others stayed
    float, silently, even in strict mode."""
    converted = qswap.convert(build(), "w8a8", strict=True)
    counterparts = [converted.get_submodule(name) for name in names]
    assert isinstance(counterparts[0], QLinear) and all(c is counterparts[0] for c in counterparts)
    entries = {e.path: e for e in converted.qswap_report.entries}
    assert all(entries[name].action == "quantized" for name in names)
    assert all(f"the same module object as {names[0]}" in entries[name].reason for name in names[1:])
    converted(torch.randn(2, 8))


def test_a_module_reached_under_names_converted_differently_is_an_error_naming_both():
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "alias"}, "skip": True}]}
    with pytest.raises(ConvertError, match=r"shared and alias are one Linear object .* converted to QLinear by "
                                           r"defaults under the first and left float by rule 0: path=alias's skip"):
        qswap.convert(Aliased(), recipe)
    recipe["rules"] = [{"match": {"path": "blocks.0"}, "weight": {"bits": 4}}]
    with pytest.raises(ConvertError, match=r"shared and blocks.0 are one Linear object"):
        qswap.convert(Aliased(), recipe)
    recipe["rules"] = [{"match": {"path": "blocks"}, "skip": True}]  # leaves its subtree float
    with pytest.raises(ConvertError, match=r"shared and blocks.0 are one Linear object .* left float by rule 0: "
                                           r"path=blocks's skip of blocks"):
        qswap.convert(Aliased(), recipe)
    model = _attention_model()
    model.proj = model[1].out_proj  # a part of the attention, which is converted as one unit
    with pytest.raises(ConvertError, match=r"1.out_proj and proj are one NonDynamicallyQuantizableLinear object .* "
                                           r"a part of 1 \(MultiheadAttention\)"):
        qswap.convert(model, "w8a8")


def test_a_rule_for_a_part_of_a_unit_is_refused_naming_the_unit():
    """An attention is converted as one unit: a rule for its q_proj would be ignored (its quantizers
    follow the attention's specs), so it is a ConvertError naming the unit, not a 'matched no
    module' warning that reads as a typo."""
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "1.out_proj"}, "weight": {"bits": 4}}]}
    with pytest.raises(ConvertError, match=r"matches 1.out_proj, a part of 1 \(MultiheadAttention\), which is "
                                           r"converted as one unit .* write the rule for 1 instead"):
        qswap.convert(_attention_model(), recipe)


def test_a_class_rule_that_also_matches_parts_of_a_unit_warns_naming_them():
    """``class: Linear`` reaches the FFN linears and fairseq's attention projections; the
    projections follow their attention's rule (the defaults here), not the class rule: a warning
    naming the rule, the parts and the unit (a ConvertError in strict mode), not a silent 8-bit q_proj."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer

    model = build_s2t_transformer()
    projections = sum(isinstance(m, nn.Linear) for n, m in model.named_modules() if "attn." in n)
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"class": "Linear"}, "weight": {"bits": 4}}]}
    with pytest.warns(QswapWarning, match=rf"rule 0: class=Linear is the first rule of {projections} part\(s\) of modules "
                                          r"converted as one unit, such as encoder.transformer_layers.0.self_attn.k_proj "
                                          r"of encoder.transformer_layers.0.self_attn \(MultiheadAttention, by defaults\)"):
        q = qswap.convert(model, recipe)
    layer = q.encoder.transformer_layers[0]
    assert layer.fc1.weight_quant.spec.bits == 4 and layer.self_attn.q_proj.weight_quant.spec.bits == 8
    assert any("converted as one unit" in n for n in q.qswap_report.notes)
    with pytest.raises(ConvertError, match=f"strict mode: .* class=Linear is the first rule of {projections} part"):
        qswap.convert(model, recipe, strict=True)
    same = {**recipe, "rules": [{"match": {"class": "Linear"}, "weight": {"bits": 8}}]}  # the unit's specs: nothing lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qswap.convert(model, same)
    assert not [w for w in caught if "converted as one unit" in str(w.message)]
    unit = {**recipe, "rules": [{"match": {"class": "MultiheadAttention"}, "weight": {"bits": 4}}, *recipe["rules"]]}
    with warnings.catch_warnings(record=True) as caught:  # the units' own rule: their parts get 4 bits, as asked
        warnings.simplefilter("always")
        q = qswap.convert(model, unit)
    assert not [w for w in caught if "converted as one unit" in str(w.message)]
    assert q.encoder.transformer_layers[0].self_attn.q_proj.weight_quant.spec.bits == 4
    # the units' rule differs from the class rule only in a site no projection has: nothing overruled
    unit_site = {**recipe, "rules": [{"match": {"class": "MultiheadAttention"}, "weight": {"bits": 4},
                                      "sites": {"softmax_in": {"bits": 16}}}, *recipe["rules"]]}
    qswap.convert(model, unit_site, strict=True)


def test_a_pattern_rule_reaching_only_parts_of_units_gets_one_message():
    """``path: "*.q_proj"`` reaches only attention parts: the message says where it reached, not
    also that it 'matched no module'."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer

    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "*.q_proj"}, "weight": {"bits": 4}}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = qswap.convert(build_s2t_transformer(), recipe)
    messages = [str(w.message) for w in caught if issubclass(w.category, QswapWarning)]
    assert len(messages) == 1 and "is the first rule of" in messages[0] and "q_proj" in messages[0]
    assert q.qswap_report.unmatched_rules == []


def test_a_skip_rule_that_reaches_parts_of_a_unit_warns_that_they_stay_quantized():
    """``class: Linear, skip: true`` leaves the FFN linears float; the attention projections are
    quantized with their attention: said so. A skip rule for parts that quantize nothing (the
    attention's dropouts) says nothing."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer

    skip = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
            "rules": [{"match": {"class": "Linear"}, "skip": True}]}
    with pytest.warns(QswapWarning, match=r"rule 0: class=Linear is the first rule of .* they are quantized as "
                                          r"their unit is, not left float; to leave them float, skip the units"):
        q = qswap.convert(build_s2t_transformer(), skip)
    assert type(q.encoder.transformer_layers[0].fc1) is nn.Linear
    dropouts = {**skip, "rules": [{"match": {"class": ["Dropout", "FairseqDropout"]}, "skip": True}]}
    qswap.convert(build_s2t_transformer(), dropouts, strict=True)


def test_every_module_appears_in_the_report_containers_included():
    """A user's block with a residual add in its forward has no counterpart: its children are
    converted, the block itself is listed as a container (the audit checks its own ops)."""
    q = qswap.convert(nn.Sequential(Residual(), nn.Linear(8, 8)), "w8a8")
    actions = {e.path: e.action for e in q.qswap_report.entries}
    assert actions == {"": "passthrough", "0": "container", "0.fc": "quantized", "1": "quantized"}
    qswap.calibrate(q, [torch.randn(4, 8)])
    report = qswap.audit(q, torch.randn(4, 8))
    assert not report.honest and any(v.module == "0" and "add" in v.op for v in report.violations)


class Identity(nn.Module):
    """A user's own module that happens to share torch's name, and computes."""

    def forward(self, x):
        return x * 2.0


def test_passthrough_is_decided_by_class_identity_not_by_name():
    model = nn.Sequential(nn.Linear(4, 4), Identity(), nn.Identity())
    entries = {e.path: e for e in qswap.convert(model, "w8a8").qswap_report.entries}
    assert (entries["1"].action, entries["1"].reason) == ("float", "no counterpart registered for Identity")
    assert entries["2"].action == "passthrough"


def test_report_shows_the_specs_of_the_kinds_a_counterpart_declares():
    entries = {e.path: e for e in qswap.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "w8a8").qswap_report.entries}
    assert entries["0"].weight.startswith("int8") and entries["0"].activation.startswith("int8")
    assert entries["1"].weight == "" and entries["1"].activation.startswith("int8")  # a ReLU has no weight


def test_a_per_group_size_that_does_not_divide_a_weight_is_refused_at_convert():
    """``group_size: 7`` on weights whose input axis is not a multiple of 7: SpecError naming the
    weight and its shape when converting, not a model that fails at its first forward."""
    import pytest
    from torch import nn

    import qswap
    from qswap.errors import SpecError

    recipe = {"version": 1, "name": "g7", "defaults": {"weight": {"bits": 4, "granularity": "per_group",
                                                                  "group_size": 7}, "activation": None}}
    model = nn.Sequential(nn.Linear(14, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SpecError, match=r"^2\.weight \(shape \(4, 8\)\): per_group quantization needs axis 1 "
                                           r"\(size 8\) divisible by group_size 7"):
        qswap.convert(model, recipe)
    assert type(model[0]) is nn.Linear  # the caller's model is untouched


def test_a_per_group_size_that_does_not_fit_a_hadamard_matrix_is_refused_at_convert():
    """An online Hadamard transform's matrix (a buffer its ``matrix`` quantizer reads) is checked as
    a weight is: SpecError naming the module, not one at calibration that does not."""
    from qswap.transforms.hadamard import Hadamard

    recipe = {"version": 1, "name": "g32", "defaults": {"weight": {"bits": 4, "granularity": "per_group",
                                                                   "group_size": 32}, "activation": {"bits": 8}}}
    with pytest.raises(SpecError, match=r"^1\.matrix \(shape \(16, 16\)\): per_group quantization needs axis 1 "
                                           r"\(size 16\) divisible by group_size 32"):
        qswap.convert(nn.Sequential(nn.ReLU(), Hadamard(64, 16)), recipe)


def test_a_per_group_size_that_does_not_fit_a_weight_not_named_weight_is_refused_at_convert():
    """The check reads the counterparts' declared quantizers (``param_quantizer``), not parameter
    names: rel-pos attention's ``pos_bias_u`` (H, D), a weight site, is checked as a weight is (it
    converted, then failed at its first forward with a SpecError naming no tensor)."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_conformer

    recipe = {"version": 1, "name": "g32", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"class": "RelPositionMultiHeadedAttention"},
                         "weight": {"bits": 4, "granularity": "per_group", "group_size": 32}}]}
    with pytest.raises(SpecError, match=r"^encoder\.conformer_layers\.\d\.self_attn\.pos_bias_u \(shape \(4, 16\)\): "
                                           r"per_group quantization needs axis 1 \(size 16\) divisible by group_size 32"):
        qswap.convert(build_s2t_conformer(seed=0), recipe)


def test_per_channel_grids_along_an_input_axis_run_with_float_insides_and_have_no_integer_form():
    """Per-channel weights along ``axis: -1`` (the input of a linear, the kernel of a convolution)
    and per-channel activations into a linear vary their scale along the accumulated sum: no int32
    accumulator, bias grid or requantization carries that. The fake-quant model runs them (the op
    in float: the default ``simulate: integer`` crashed in the bias codes, and a per-channel input
    crashed in the bias grid, which now stays float and the audit names), and integerize refuses,
    naming the module and what to use."""
    import pytest
    import torch
    from torch import nn

    import qswap
    from qswap.errors import IntegerizeError

    torch.manual_seed(0)
    x = torch.randn(6, 16)
    weights = {"version": 1, "name": "axis_last", "defaults": {
        "weight": {"bits": 6, "granularity": "per_channel", "axis": -1}, "activation": {"bits": 8}}}
    q = qswap.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), weights)
    qswap.calibrate(q, [x])
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    with pytest.raises(IntegerizeError, match=r"0 \(QLinear\): .*vary their scale along an input axis.*use axis: 0"):
        qswap.integerize(q)
    inputs = {"version": 1, "name": "inputs_per_channel", "defaults": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "granularity": "per_channel", "axis": -1}}}
    q = qswap.convert(nn.Sequential(nn.Linear(16, 8)), inputs)
    qswap.calibrate(q, [x])
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()
    report = qswap.audit(q, x)
    assert not report.honest and any(v.module == "0" for v in report.violations)


NO_QUANT = {"version": 1, "name": "no_quant", "defaults": {"weight": None, "activation": None}}


def _assert_modes_kept(model, converted):
    """Every module of the float tree has its own flag at the same path in the converted one; a
    module the conversion created (a quantizer) has the flag of the counterpart that owns it."""
    for path, module in model.named_modules():
        assert converted.get_submodule(path).training == module.training, path
    float_ids = {id(m) for m in model.modules()}
    for path, module in converted.named_modules():
        if isinstance(module, QuantModule):
            for sub, part in module.named_modules():
                if isinstance(part, FakeQuantize):
                    assert part.training == module.training, f"{path}.{sub}"


def test_each_module_keeps_its_own_training_flag_dropouts_frozen_in_eval_stay_off():
    # fine-tuning with dropout switched off: a model in train() whose dropouts are in eval(); a
    # counterpart (a linear) in eval() inside a training container; a training linear inside it
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_conformer, s2t_net_input
    model = build_s2t_conformer(seed=0, dropout=0.3).train()
    dropouts = [m for m in model.modules() if "dropout" in type(m).__name__.lower()]
    assert len(dropouts) > 4
    for m in dropouts:
        m.eval()
    model.encoder.conformer_layers[0].ffn1.w_1.eval()
    converted = qswap.convert(model, NO_QUANT)
    _assert_modes_kept(model, converted)
    net_input = s2t_net_input()
    torch.manual_seed(0)
    ref = model(**net_input)[0]
    torch.manual_seed(0)
    out = converted(**net_input)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_root_counterpart_keeps_its_float_childrens_own_flags():
    pytest.importorskip("fairseq")
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 8, 16, 2
    cfg.dropout = cfg.activation_dropout = 0.5
    layer = TransformerEncoderLayerBase(cfg).eval()
    layer.dropout_module.train()  # an eval model with one dropout on: its counterpart too
    layer.fc1.train()
    converted = qswap.convert(layer, NO_QUANT)
    assert type(converted) is not type(layer)
    _assert_modes_kept(layer, converted)
    assert not converted.training and converted.dropout_module.training


def test_forward_hooks_of_a_replaced_module_move_to_its_counterpart_in_order_with_their_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []
    model[0].register_forward_hook(lambda mod, inp, out: calls.append("fwd 1"))
    model[0].register_forward_hook(lambda mod, inp, kw, out: calls.append(f"fwd 2 {sorted(kw)}"), with_kwargs=True)
    model[0].register_forward_hook(lambda mod, inp, out: calls.append("fwd always"), always_call=True)
    model[2].register_forward_pre_hook(lambda mod, inp: (inp[0] * 0,))  # the output ignores the input
    model[2].register_forward_pre_hook(lambda mod, args, kw: calls.append("pre kw") or None, with_kwargs=True)
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = model(x)
    expected, calls[:] = list(calls), []
    converted = qswap.convert(model, NO_QUANT)
    assert isinstance(converted[0], QLinear) and isinstance(converted[2], QLinear)
    with torch.no_grad():
        out = converted(x)
    assert calls == expected == ["fwd 1", "fwd 2 []", "fwd always", "pre kw"]
    torch.testing.assert_close(out, ref)
    assert len(model[0]._forward_hooks) == 3 and len(model[2]._forward_pre_hooks) == 2  # the caller's stay


def test_a_hook_handle_of_an_inplace_converted_module_still_removes_its_hook():
    model = nn.Sequential(nn.Linear(4, 4))
    calls = []
    handle = model[0].register_forward_hook(lambda mod, inp, out: calls.append(1))
    qswap.convert(model, NO_QUANT, inplace=True)
    model(torch.randn(2, 4))
    assert calls == [1]
    handle.remove()
    model(torch.randn(2, 4))
    assert calls == [1] and not model[0]._forward_hooks


def test_hooks_inside_a_fairseq_layer_move_and_a_hook_on_a_part_of_a_unit_is_refused():
    pytest.importorskip("fairseq")
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 8, 16, 2
    torch.manual_seed(0)
    layer = TransformerEncoderLayerBase(cfg).eval()
    seen = []
    layer.fc1.register_forward_hook(lambda mod, inp, out: seen.append("fc1"))
    layer.self_attn.register_forward_hook(lambda mod, inp, out: seen.append("attn"))
    layer.fc2.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0.5,))
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        ref = layer(x, None)
    expected, seen[:] = list(seen), []
    converted = qswap.convert(layer, NO_QUANT)
    with torch.no_grad():
        out = converted(x, None)
    assert seen == expected == ["attn", "fc1"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer.self_attn.q_proj.register_forward_hook(lambda mod, inp, out: None)
    with pytest.raises(ConvertError, match=r"self_attn\.q_proj \(Linear\) has a forward_hooks hook.*part of self_attn"):
        qswap.convert(layer, NO_QUANT)


def test_a_backward_hook_on_a_replaced_module_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_full_backward_hook(lambda mod, gin, gout: None)
    with pytest.raises(ConvertError, match=r"^0 \(Linear\) has a backward_hooks hook"):
        qswap.convert(model, NO_QUANT)


def test_copying_a_weight_normed_model_run_with_grad_does_not_write_the_callers_weight():
    # wav2vec 2.0's positional conv: after a forward with grad, ``weight`` is a non-leaf tensor
    conv = nn.utils.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), name="weight", dim=2)
    model = nn.Sequential(conv)
    x = torch.randn(2, 4, 7)
    ref = model(x).detach()
    weight = conv.weight
    assert weight.grad_fn is not None
    converted = qswap.convert(model, NO_QUANT)
    assert conv.weight is weight and conv.weight.grad_fn is not None  # the caller's tensor, as it was
    assert not any(p.data_ptr() == q.data_ptr() for p in converted.parameters() for q in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref)
    from qswap.convert import copy_model
    copy = copy_model(model)
    assert conv.weight is weight and copy[0].weight is not weight and copy[0].weight.grad_fn is None
    torch.testing.assert_close(copy[0].weight, weight.detach())


def test_a_rule_inside_a_subtree_an_ancestors_skip_leaves_float_is_reported_as_shadowed():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 4))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "0"}, "skip": True}, {"match": {"path": "0.1"}, "weight": {"bits": 4}}]}
    shadowed = r"rule 1: path=0\.1 matched no module: shadowed by rule 0's skip at 0 \(rule 0: path=0 leaves 0\.1 float"
    with pytest.warns(QswapWarning, match=shadowed):
        converted = qswap.convert(model, recipe)
    assert type(converted[0][1]) is nn.Linear
    with pytest.raises(ConvertError, match=shadowed):
        qswap.convert(model, recipe, strict=True)
    # a rule that matches nothing anywhere keeps the plain message
    recipe["rules"][1]["match"]["path"] = "5"
    with pytest.warns(QswapWarning, match=r"path=5 matched no module$"):
        qswap.convert(model, recipe)


@pytest.mark.parametrize("call", ["calibrate", "integerize", "sensitivity", "search", "export_model", "export_encoder",
                                  "convert", "audit"])
def test_every_api_function_taking_a_model_names_what_it_got_instead(call):
    """Not a model (a path string, as a caller might pass a checkpoint's): a typed error naming the
    function, where calibrate, integerize, sensitivity, search and the export functions raised
    AttributeError from their first use of the model."""
    import qswap.export

    calls = {"calibrate": lambda m: qswap.calibrate(m, [{}]), "integerize": qswap.integerize,
             "sensitivity": lambda m: qswap.sensitivity(m, "w4a8", [{}]),
             "search": lambda m: qswap.search(m, [{}], target_mb=1.0),
             "export_model": lambda m: qswap.export.export_model(m, "out"),
             "export_encoder": lambda m: qswap.export.export_encoder(m, "e.onnx", {}),
             "convert": lambda m: qswap.convert(m, "w8a8"), "audit": lambda m: qswap.audit(m, {})}
    with pytest.raises(qswap.QswapError, match=rf"{call}\(\) takes a torch.nn.Module, got str"):
        calls[call]("checkpoint.pt")


def test_an_unsigned_symmetric_weight_grid_refuses_a_weight_with_negative_values():
    """``signed: false, symmetric: true`` (zero point 0: values >= 0 only) had rounded every
    negative weight to 0 with no word (WER 100.9 %); a weight that is all >= 0 takes it."""
    torch.manual_seed(0)
    unsigned = {"version": 1, "defaults": {"weight": {"bits": 8, "signed": False, "symmetric": True}}}
    with pytest.raises(SpecError, match=r"^0\.weight: its grid \(uint8 sym per_tensor\) is unsigned and symmetric.*"
                                        r"negative values .*use signed: true, or symmetric: false"):
        qswap.convert(nn.Sequential(nn.Linear(4, 3)), unsigned)
    from qswap.transforms import STRUCTURE_ONLY
    qswap.convert(nn.Sequential(nn.Linear(4, 3)), unsigned, data=STRUCTURE_ONLY)  # a checkpoint's structure: its
    # weights (a fresh init) are replaced by the checkpoint's state, not checked
    positive = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        positive[0].weight.abs_()
    q = qswap.convert(positive, unsigned)
    assert torch.equal(q[0].weight_quant(q[0].weight) > 0, positive[0].weight > 0)


def test_a_recipe_that_quantizes_nothing_says_so_in_its_report():
    """Every spec null: the counterparts compute in float and the report had shown them all as
    quantized with no word; its notes say so now. (fp32, the shipped baseline, skips every module:
    its report says that already.)"""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    nothing = qswap.convert(model, {"version": 1, "name": "all_null", "defaults": {"weight": None, "activation": None}})
    assert any(n.startswith("recipe all_null quantizes nothing") for n in nothing.qswap_report.notes)
    baseline = qswap.convert(model, "fp32").qswap_report
    assert baseline.counts()["quantized"] == 0 and not any("quantizes nothing" in n for n in baseline.notes)
    assert not any("quantizes nothing" in n for n in qswap.convert(model, "w8a8").qswap_report.notes)


def test_the_report_labels_the_quantizers_each_site_gets():
    """A rule's `sites: {input: null}` had still been reported as the rule's int8 activation."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    recipe = {"version": 1, "name": "no_input", "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"path": "0"}, "sites": {"input": None}},
                        {"match": {"path": "2"}, "sites": {"input": {"bits": 4}}}]}
    q = qswap.convert(model, recipe)
    entries = {e.path: e for e in q.qswap_report.entries}
    assert entries["0"].activation == "float" and entries["0"].weight == "int8 sym per_tensor"
    assert isinstance(q[0].input_quant, nn.Identity)
    assert entries["2"].activation == q[2].input_quant.spec.short() == "int4 sym per_tensor"


def test_the_report_labels_a_softmax_outputs_unsigned_grid():
    """An attention's softmax_out quantizer gets an unsigned grid (its values are never negative):
    the label had shown only the rule's signed spec."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    q = qswap.convert(model, "w8a8")
    label = next(e for e in q.qswap_report.entries if e.path == "0").activation
    assert q[0].core.softmax_out_quant.spec.short() in label.split(" / ") and "uint8" in label
