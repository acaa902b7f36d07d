import warnings

import pytest
import yaml

import qswap
from qswap.cli import main
from qswap.errors import BudgetError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.search import search


def _tiny():
    return build_s2t_transformer(encoder_layers=1, decoder_layers=1, encoder_embed_dim=32,
                                 encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, conv_channels=32)


@pytest.fixture(scope="module")
def sizes():
    model = _tiny()
    return (qswap.convert(model, "w8a8_per_channel").qswap_report.quantized_bytes / 1e6,
            qswap.convert(model, "w4a8").qswap_report.quantized_bytes / 1e6)


def test_target_mb_is_met_with_the_fewest_low_bit_units(sizes):
    high, low = sizes
    target = (high + low) / 2
    model, batches = _tiny(), [s2t_net_input(batch=2, frames=32, num_tokens=5)]
    result = search(model, batches, target_mb=target)
    assert low <= result.weight_mb <= target
    assert 0 < len(result.low_units) < sum(len(c.paths) for c in result.candidates)
    costs = [c.cost / c.numel for c in result.candidates]
    assert costs == sorted(costs)  # least added noise per weight goes low-bit first
    assert all(c.cost >= 0 and c.loss_db >= 0 for c in result.candidates)
    assert any(c.cost > 0 for c in result.candidates)  # measured, not all zero
    with warnings.catch_warnings():
        warnings.simplefilter("error", qswap.QswapWarning)  # every rule hits a module
        qmodel = qswap.convert(model, qswap.load_recipe(yaml.safe_load(yaml.safe_dump(result.recipe))))
    assert qmodel.qswap_report.quantized_bytes / 1e6 == pytest.approx(result.weight_mb)
    qswap.calibrate(qmodel, batches)
    assert qswap.audit(qmodel, batches[0]).honest


def test_impossible_and_ambiguous_budgets_are_clear_errors(sizes):
    _, low = sizes
    batches = [s2t_net_input(batch=1, frames=24, num_tokens=4)]
    with pytest.raises(BudgetError, match=r"no recipe fits .* MB: with every unit at 4-bit"):
        search(_tiny(), batches, target_mb=low / 3)
    with pytest.raises(BudgetError, match="exactly one budget"):
        search(_tiny(), batches)
    with pytest.raises(BudgetError, match="exactly one budget"):
        search(_tiny(), batches, target_mb=1.0, max_delta_wer=1.0)
    with pytest.raises(BudgetError, match="evaluate"):
        search(_tiny(), batches, max_delta_wer=1.0)
    for budget in ({"target_mb": float("nan")}, {"max_delta_wer": float("inf")}, {"target_mb": "1"}):
        with pytest.raises(BudgetError, match="must be a finite number"):  # nan had given a recipe, "1" a TypeError
            search(_tiny(), batches, evaluate=lambda m: 0.0, **budget)


@pytest.mark.parametrize("low_bits", ["4", 1, 99, True])
def test_a_low_bits_that_is_no_weight_width_names_low_bits(low_bits):
    """A string had been a raw TypeError, 1 a RecipeError about a dict's QuantSpec, 99 a recipe of
    '0 units at 99-bit weights'."""
    with pytest.raises(BudgetError, match=f"low_bits is the weight width .* got {low_bits!r}"):
        search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], target_mb=1.0, low_bits=low_bits)


@pytest.mark.parametrize("api", ["search", "sensitivity"])
def test_one_batch_or_a_number_instead_of_batches_is_a_calibration_error(api):
    """One net_input dict (iterated it hands the model its key names) or a number: the error
    calibrate gives, naming the function, where both had raised TypeError."""
    from qswap.errors import CalibrationError

    run = {"search": lambda b: search(_tiny(), b, target_mb=1.0),
           "sensitivity": lambda b: qswap.sensitivity(_tiny(), "w4a8", b)}[api]
    for batches in (s2t_net_input(batch=1, frames=24, num_tokens=4), 3):
        with pytest.raises(CalibrationError, match=f"{api} takes an iterable of batches"):
            run(batches)


def test_max_delta_wer_search_with_a_measured_metric():
    # a stand-in WER that grows with the number of 4-bit weights: the search must stop at the budget
    def evaluate(model):
        return sum(q.spec.bits == 4 for q in model.modules() if isinstance(q, qswap.FakeQuantize)) * 1.0

    result = search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], max_delta_wer=3.0,
                    evaluate=evaluate)
    n_low = result.evaluations[-1][0]
    assert evaluate(qswap.convert(_tiny(), result.recipe)) <= 3.0
    assert any(wer > 3.0 for _, wer in result.evaluations) or n_low == len(result.candidates)


def test_search_cli_writes_a_valid_recipe_and_its_row(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    out = tmp_path / "searched.yaml"
    assert main(["search", str(ckpt), "--data", str(data), "--target-mb", "0.03", "--beam", "2",
                 "--calib-batches", "5", "--max-sentences", "4", "-o", str(out), "--subset", "test", "--batches", "9",
                 "--json", str(tmp_path / "row.json"), "--markdown", str(tmp_path / "row.md")]) == 0
    recipe = qswap.load_recipe(out)
    assert recipe.name == "searched" and recipe.rules
    import json
    payload = json.loads((tmp_path / "row.json").read_text())
    # what the rows ran with (the JSON had no settings): train's 12 utterances make 3 batches of 4, not 5
    settings = payload["settings"]
    assert (settings["calib_batches_used"], settings["calib_batches"], settings["max_sentences"]) == (3, 5, 4)
    assert settings["target_mb"] == 0.03 and settings["eval_subset"] == "test"
    # the probes' batches too: test's 6 utterances make fewer than 9 (it had been neither said nor recorded)
    assert settings["batches"] == 9 and 1 <= settings["batches_used"] < 9
    assert f"--batches 9: test makes {settings['batches_used']} batch(es)" in capsys.readouterr().err
    row = payload["row"]
    assert row["honest"] and row["weight_mb"] <= 0.03
    low, high = row["delta_wer_ci"]  # paired against the float row, on the same utterances
    assert low <= row["delta_wer"] <= high and row["significant"] == (not low <= 0 <= high)
    assert "| searched |" in (tmp_path / "row.md").read_text()


@pytest.mark.parametrize("option", ["--eval-subset", "--calib-subset"])
def test_search_cli_checks_its_subsets_before_it_writes(float_checkpoint, tmp_path, capsys, option):
    """A subset the final row reads that does not exist fails before the search, and -o is left as
    it was (it had been replaced by the searched recipe, then the command failed)."""
    _, data, ckpt = float_checkpoint
    out = tmp_path / "mine.yaml"
    out.write_text("# my hand-tuned recipe\n")
    assert main(["search", str(ckpt), "--data", str(data), "--target-mb", "0.03", "--calib-batches", "1",
                 "--max-sentences", "4", "-o", str(out), option, "nosuch"]) == 2
    assert "subset 'nosuch' not found" in capsys.readouterr().err
    assert out.read_text() == "# my hand-tuned recipe\n"


def test_added_noise_and_loss_are_ordered_numbers_for_broken_outputs():
    from qswap.search import _added_noise, _loss_db

    inf = float("inf")
    assert _added_noise(30.0, 20.0) == pytest.approx(10 ** -2 - 10 ** -3)
    assert _added_noise(30.0, -inf) == inf  # breaks the model at low bits: sorts last
    assert _added_noise(-inf, -inf) == inf
    assert _added_noise(inf, inf) == 0.0  # no noise either way
    assert _loss_db(-inf, -inf) == 0.0 and _loss_db(30.0, -inf) == inf


def test_low_bit_probe_regrids_the_weights_a_linear_keeps():
    """``_bits`` replaces weight specs, which changes no tensor: a linear that keeps its quantized
    (weight, bias) pair must compute the low-bit output, the same as a fresh conversion with the
    spec a searched rule declares (2 bits, mse observer); afterwards the high output again."""
    import torch
    from torch import nn

    from qswap.nn.base import QuantConfig
    from qswap.nn.linear import QLinear
    from qswap.quant.spec import QuantSpec
    from qswap.search import _bits

    def linear(weight):
        torch.manual_seed(0)
        q = QLinear.from_float(nn.Linear(64, 32), QuantConfig(weight, QuantSpec(bits=8, symmetric=False)))
        return q.eval()

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, fresh = linear(QuantSpec(bits=8)), linear(QuantSpec(bits=2, observer="mse"))
    spec, observer = q.weight_quant.spec, q.weight_quant.observer
    with torch.no_grad():
        for m in (q, fresh):
            m(x)
            m.input_quant.freeze()
        high = q(x)
        q(x)  # the pair kept
        with _bits([q.weight_quant], 2):
            low = q(x)
        back = q(x)
        assert torch.equal(low, fresh(x)) and not torch.equal(low, high)
        assert torch.equal(back, high)
        assert q.weight_quant.spec is spec and q.weight_quant.observer is observer


def test_a_search_starts_from_a_recipe_whose_transforms_read_the_batches():
    """smoothquant folds activation statistics into the weights: the search converts with its
    batches (and sizes the structure alone), and the searched recipe converts and audits honest."""
    model, batches = _tiny(), [s2t_net_input(batch=2, frames=32, num_tokens=5)]
    high = "w4a4_edges8_stream_smoothquant"
    largest = qswap.convert(model, high, data=batches).qswap_report.quantized_bytes / 1e6
    result = search(model, batches, high=high, low_bits=3, target_mb=largest * 0.95)
    assert result.low_units and result.weight_mb <= largest * 0.95
    qmodel = qswap.convert(model, result.recipe, data=batches)
    assert qmodel.qswap_report.quantized_bytes / 1e6 == pytest.approx(result.weight_mb)
    qswap.calibrate(qmodel, batches)
    assert qswap.audit(qmodel, batches[0]).honest


def test_a_unit_moved_to_low_bits_keeps_the_rest_of_the_high_recipes_rule():
    """Searching down from a recipe with path rules (w4a4_edges8 keeps its first and last layers
    at 8 bits): a moved unit's rule is the high recipe's rule for it with only the weight width
    changed, so its activations stay what the ranking measured."""
    from qswap.quant.fake_quantize import FakeQuantize

    model, batches = _tiny(), [s2t_net_input(batch=2, frames=32, num_tokens=5)]
    largest = qswap.convert(model, "w4a4_edges8").qswap_report.quantized_bytes / 1e6
    result = search(model, batches, high="w4a4_edges8", low_bits=3, target_mb=largest * 0.999)
    assert result.low_units

    def specs(qmodel, kind):
        return {n: q.spec for n, q in qmodel.named_modules() if isinstance(q, FakeQuantize) and q.kind == kind
                and any(n.startswith(f"{u}.") for u in result.low_units)}

    high, searched = qswap.convert(model, "w4a4_edges8"), qswap.convert(model, result.recipe)
    assert specs(searched, "activation") == specs(high, "activation") and specs(high, "activation")
    assert {s.bits for s in specs(searched, "weight").values()} == {3}


def test_a_search_from_a_recipe_with_a_hadamard_transform_names_the_rotated_linears():
    """The hadamard transform turns fc2 into a RotatedLinear: candidates name its ``.linear``, a
    module of the transformed tree only, which the searched rules are matched on."""
    high = dict(qswap.load_recipe("w8a8_per_channel").to_dict(), name="w8a8_pc_hadamard",
                transforms=[{"hadamard": {"block": 16}}])
    model, batches = _tiny(), [s2t_net_input(batch=2, frames=32, num_tokens=5)]
    largest = qswap.convert(model, high).qswap_report.quantized_bytes / 1e6
    result = search(model, batches, high=high, target_mb=largest * 0.9)
    assert result.low_units and result.weight_mb <= largest * 0.9
    qmodel = qswap.convert(model, result.recipe)
    assert qmodel.qswap_report.quantized_bytes / 1e6 == pytest.approx(result.weight_mb)


def test_a_units_ranked_loss_is_the_loss_of_the_rule_written_for_it():
    """The ranking probes a unit at low bits with the spec the written rule declares (its observer
    too: the rule says mse where the high recipe's weights use minmax): a unit's ranked loss is the
    loss of the one-unit recipe build_recipe writes, that unit's weights alone quantized."""
    import torch

    from qswap.convert import copy_model
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.switch import enabled_only
    from qswap.search import _units, build_recipe, rank_candidates
    from qswap.sensitivity import model_output, output_sqnr

    torch.manual_seed(0)
    model, batches = _tiny(), [s2t_net_input(batch=2, frames=32, num_tokens=5)]
    reference = [model_output(copy_model(model).eval(), b) for b in batches]

    def unit_alone_db(recipe, paths):
        qmodel = qswap.convert(model, recipe).eval()
        qswap.calibrate(qmodel, batches)
        keep = {tuple(p): qs for p, qs, _ in _units(qmodel)}[tuple(paths)]
        with enabled_only([m for m in qmodel.modules() if isinstance(m, FakeQuantize)], keep=keep):
            return output_sqnr(reference, qmodel, batches), keep

    candidates = rank_candidates(model, "w8a8_per_channel", batches, 4)
    assert candidates
    for c in candidates[:3]:
        high_db, _ = unit_alone_db("w8a8_per_channel", c.paths)
        low_db, kept = unit_alone_db(build_recipe("w8a8_per_channel", [c], 4, "one"), c.paths)
        assert {q.spec.observer for q in kept} == {"mse"} and {q.spec.bits for q in kept} == {4}
        assert c.loss_db == pytest.approx(high_db - low_db, abs=1e-4)


def test_search_cli_refuses_zero_calibration_batches_before_the_search(float_checkpoint, tmp_path, capsys,
                                                                      monkeypatch):
    """--calib-batches 0 with a --high recipe whose activations (or transforms) need calibration is
    refused before the search runs (it ran to its end, then the final row found zero batches), and
    -o is left as it was; a weight-only --high recipe needs no calibration and goes on to search."""
    import importlib

    search_module = importlib.import_module("qswap.search")  # qswap.search is also the function

    class Searched(Exception):
        pass

    def search_ran(*args, **kwargs):
        raise Searched

    monkeypatch.setattr(search_module, "search", search_ran)  # qswap's own search, not fairseq
    _, data, ckpt = float_checkpoint
    out = tmp_path / "mine.yaml"
    out.write_text("# my hand-tuned recipe\n")
    args = ["search", str(ckpt), "--data", str(data), "--target-mb", "0.03", "--calib-batches", "0",
            "--max-sentences", "4", "-o", str(out)]
    for high, need in (("w8a8_per_channel", "activation quantizers"),
                       ("w4a4_edges8_stream_smoothquant", "transforms that read activation statistics")):
        assert main(args + ["--high", high]) == 2
        err = capsys.readouterr().err
        assert f"--high {high}'s {need}" in err and "pass --calib-batches N (at least 1)" in err
        assert out.read_text() == "# my hand-tuned recipe\n"
    with pytest.raises(Searched):
        main(args + ["--high", "w8_weight_only"])


def test_an_impossible_target_mb_is_refused_before_the_ranking(sizes, monkeypatch):
    """The size check ran after every unit had been probed at both widths (minutes on a real model)."""
    import sys

    search_module = sys.modules["qswap.search"]  # (qswap.search is also the function)

    def ranked(*args, **kwargs):
        raise AssertionError("the units were ranked before the budget was checked")
    monkeypatch.setattr(search_module, "rank_candidates", ranked)
    _, low = sizes
    with pytest.raises(BudgetError, match=rf"no recipe fits .* MB: with every unit at 4-bit weights they take {low:.3f} MB"):
        search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], target_mb=low / 3)


@pytest.mark.parametrize("api", ["search", "sensitivity"])
def test_a_tensor_batch_runs_as_calibrate_runs_it(api):
    """calibrate takes a plain tensor as a batch (``model(x)``); search and sensitivity had unpacked it
    row by row as ``model(*x)`` (a raw TypeError). A batch of another kind is a CalibrationError."""
    import torch
    from torch import nn

    from qswap.errors import CalibrationError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    run = {"search": lambda b: search(model, b, target_mb=1.0),
           "sensitivity": lambda b: qswap.sensitivity(model, "w8a8", b)}[api]
    result = run([torch.randn(4, 16)])
    assert (result.candidates if api == "search" else result.sites)
    with pytest.raises(CalibrationError, match="a batch is a net_input dict, a tuple of arguments or a tensor, got str"):
        run(["not a batch"])


def test_low_count_counts_units_not_paths():
    """A tied embedding and output projection is one unit of two paths: the CLI had printed the paths'
    count as the units' (34 against the recipe's own 33)."""
    model = build_s2t_transformer(encoder_layers=1, decoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                  decoder_ffn_embed_dim=64, conv_channels=32, share_decoder_input_output_embed=True)
    result = search(model, [s2t_net_input(batch=1, frames=24, num_tokens=4)], max_delta_wer=1.0,
                    evaluate=lambda m: 0.0)  # nothing costs WER: every unit moves
    assert any(len(c.paths) == 2 for c in result.candidates)  # the tied pair
    assert result.low_count == len(result.candidates) == len(result.low_units) - 1
    assert result.recipe["description"].endswith(f": {result.low_count} units at 4-bit weights")


def test_a_high_recipe_that_quantizes_nothing_says_so():
    """Every unit skipped: calibrate's 'convert it first' had answered the float model the caller
    passed as asked."""
    skip_all = {"version": 1, "name": "skipall", "defaults": {"weight": {"bits": 8, "granularity": "per_channel"},
                                                              "activation": {"bits": 8}},
                "rules": [{"match": {"path": "*"}, "skip": True}]}
    with pytest.raises(BudgetError, match="the high recipe skipall .--high. quantizes the weights of no module of this model"):
        search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], target_mb=100.0, high=skip_all)


@pytest.mark.parametrize("option", [{"observer": "percentile", "percentile": 99.9},
                                    {"observer": "moving_average", "momentum": 0.1}], ids=["percentile", "momentum"])
def test_a_high_weight_spec_with_observer_options_moves_units_without_them(option):
    """The written low rule took the mse observer and kept the high spec's percentile / momentum,
    which the loader refuses: search had failed at its first size, blaming a rule nobody wrote."""
    high = {"version": 1, "name": "high", "defaults": {
        "weight": {"bits": 8, "granularity": "per_tensor", **option}, "activation": {"bits": 8}}}
    batches = [s2t_net_input(batch=1, frames=24, num_tokens=4)]
    result = search(_tiny(), batches, high=high, max_delta_wer=1.0, evaluate=lambda m: 0.0)
    moved = [r for r in result.recipe["rules"] if r["note"].startswith("searched")]
    assert moved
    assert all(r["weight"]["observer"] == "mse" and not set(option) - {"observer"} & set(r["weight"]) for r in moved)
    qswap.convert(_tiny(), qswap.load_recipe(yaml.safe_load(yaml.safe_dump(result.recipe))))


def test_wav2vec2s_weight_normed_positional_convolution_is_a_unit():
    """Its weight_g and weight_v are read by one declared quantizer (weight_quant), which the search
    had not found: that unit was never ranked or moved, and budgets it alone could meet refused."""
    from qswap.models import build_wav2vec2_ctc
    from qswap.search import _movable_units

    units = {p for c in _movable_units(build_wav2vec2_ctc(), "w8a8_per_channel", 4) for p in c.paths}
    assert "w2v_encoder.w2v_model.encoder.pos_conv.0" in units
    conv = next(c for c in _movable_units(build_wav2vec2_ctc(), "w8a8_per_channel", 4)
                if c.paths == ["w2v_encoder.w2v_model.encoder.pos_conv.0"])
    model = build_wav2vec2_ctc()
    pos_conv = model.w2v_encoder.w2v_model.encoder.pos_conv[0]
    assert conv.numel == max(p.numel() for p in pos_conv.parameters() if p.dim() > 1)


def test_a_strict_high_recipe_searches_and_the_written_recipe_shadows_no_rule():
    """Once a path rule's every module is moved, the moved exact-path rules shadowed it: with
    strict: true search had failed at any budget (a ConvertError about its own recipe), without it
    the written recipe warned at every convert."""
    high = dict(qswap.load_recipe("w4a8_edges8").to_dict(), strict=True, name="w4a8_edges8_strict")
    batches = [s2t_net_input(batch=1, frames=24, num_tokens=4)]
    result = search(_tiny(), batches, high=high, low_bits=3, max_delta_wer=1.0, evaluate=lambda m: 0.0)
    assert result.low_count == len(result.candidates) > 0  # every unit moved, the edges too
    with warnings.catch_warnings():
        warnings.simplefilter("error", qswap.QswapWarning)
        qswap.convert(_tiny(), qswap.load_recipe(yaml.safe_load(yaml.safe_dump(result.recipe))))
    assert search(_tiny(), batches, high=high, low_bits=3, target_mb=1e9).low_count == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, "12.5", True, complex(0.5, 2.0),
                                   __import__("numpy").bool_(True), __import__("torch").tensor([1.0, 2.0])],
                         ids=["nan", "inf", "none", "str", "bool", "complex", "np_bool", "two_elements"])
def test_an_evaluate_that_returns_no_finite_wer_is_a_budget_error(value):
    """NaN had made every comparison false (no unit moved, nothing said); None a raw TypeError."""
    with pytest.raises(BudgetError, match="evaluate\\(model\\) must return a finite WER"):
        search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], max_delta_wer=1.0,
               evaluate=lambda m: value)


def test_a_high_recipe_with_no_unit_above_the_low_bits_is_refused():
    """--high w4a8 --low-bits 4: no candidate (norms stay as recipes say); search had decoded both
    rows and written w4a8 unchanged as the searched recipe."""
    with pytest.raises(BudgetError, match="no unit of w4a8 .--high. has weights above 4 bits"):
        search(_tiny(), [s2t_net_input(batch=1, frames=24, num_tokens=4)], high="w4a8", low_bits=4, target_mb=1.0)


def test_a_rule_matching_a_container_is_kept_when_every_unit_inside_is_moved():
    """The pruning of shadowed rules had dropped a rule that matched a container (its converted
    children all moved), though the container still took it (its float_ok, say)."""
    from qswap.convert import rules_in_effect
    from qswap.search import _movable_units, build_recipe

    high = dict(qswap.load_recipe("w8a8_per_channel").to_dict(), name="high")
    high["rules"] = [{"match": {"path": "encoder"}, "note": "the encoder container"}, *high.get("rules", [])]
    model = _tiny()
    units = [c for c in _movable_units(model, high, 4) if all(p.startswith("encoder.") for p in c.paths)]
    written = build_recipe(high, units, 4, "searched", rules_in_effect(model, qswap.load_recipe(high)), model)
    assert {"match": {"path": "encoder"}, "note": "the encoder container"} in written["rules"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", qswap.QswapWarning)
        qswap.convert(model, qswap.load_recipe(yaml.safe_load(yaml.safe_dump(written))))


def test_an_evaluate_returning_a_tensor_or_numpy_number_is_taken():
    """The finite-WER check must not refuse what float() reads (a one-element tensor, a numpy number)."""
    import numpy as np
    import torch

    batches = [s2t_net_input(batch=1, frames=24, num_tokens=4)]
    for value in (torch.tensor(0.0), np.float32(0.0)):
        assert search(_tiny(), batches, max_delta_wer=1.0, evaluate=lambda m: value).low_count > 0


def test_norms_are_told_by_their_declaration_not_their_class_name():
    """Search had taken a unit for a norm when its float class's name held "Norm": a counterpart's
    ``normalizes`` declares it now (LayerNorm, GroupNorm, BatchNorm stay as the recipe says)."""
    from qswap.nn.base import QuantModule
    from qswap.search import _movable_units

    model = _tiny()
    qmodel = qswap.convert(model, "w8a8_per_channel")
    units = {p for c in _movable_units(model, "w8a8_per_channel", 4) for p in c.paths}
    norms = {path for path, m in qmodel.named_modules() if isinstance(m, QuantModule) and m.normalizes}
    assert norms and not norms & units
    assert {type(qmodel.get_submodule(p)).__name__ for p in norms} >= {"QLayerNorm"}
    assert any(isinstance(qmodel.get_submodule(p), QuantModule) and not qmodel.get_submodule(p).normalizes
               for p in units)


def test_a_units_probe_moves_what_its_written_rule_moves_the_rotary_tables_too():
    """A rope attention's written rule moves its rotary cos/sin table quantizers (weight sites of no
    parameter) to the low width; the unit's probe had moved only its parameters' quantizers."""
    from qswap.models import build_s2t_conformer
    from qswap.search import _units

    qmodel = qswap.convert(build_s2t_conformer(pos_enc_type="rope"), "w8a8_per_channel")
    attn = "encoder.conformer_layers.0.self_attn"
    quantizers = next(qs for paths, qs, _ in _units(qmodel) if paths == [attn])
    names = {n for n, m in qmodel.named_modules() if any(m is q for q in quantizers)}
    assert {f"{attn}.cos_quant", f"{attn}.sin_quant", f"{attn}.linear_q.weight_quant"} <= names
    assert all(numel > 0 for _, _, numel in _units(qmodel))
