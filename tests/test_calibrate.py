"""qswap.calibrate on a real fairseq S2T transformer (small): what each observe mode observes, the
recipe's ``observe`` key, and the quantizers' state after a calibration, finished or not."""
import warnings

import pytest
import torch

import qswap
from qswap.calibrate import activation_quantizers
from qswap.errors import CalibrationError, RecipeError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.quant.observers import make_observer
from qswap.quant.primitives import choose_qparams


def recipe(observer="moving_average", **top):
    base = qswap.load_recipe("w8a8").to_dict()
    base["defaults"] = dict(base["defaults"], activation={"bits": 8, "symmetric": False, "observer": observer})
    return qswap.load_recipe(dict(base, **top))


def batches():
    first = s2t_net_input(batch=2, frames=40, seed=1)
    return [first, dict(first, src_tokens=first["src_tokens"] * 3)]  # the second widens every range


def calibrated(rec, **kwargs):
    model = qswap.convert(build_s2t_transformer(seed=0), rec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(model, batches(), **kwargs)
    return model


def grids(model):
    return {n: (m.scale.clone(), m.zero_point.clone()) for n, m in model.named_modules()
            if m in set(activation_quantizers(model)) and m.initialized}


def float_site_inputs(rec):
    """Each activation quantizer's inputs, in call order, over the calibration paths of the model
    with every activation site in float (quantizers disabled: they return their input; passing,
    so that a caller hands each the whole tensor an observing quantizer is handed)."""
    model = qswap.convert(build_s2t_transformer(seed=0), rec)
    seen, handles = {}, []
    for name, q in model.named_modules():
        if q in set(activation_quantizers(model)):
            q.enabled, q.passthrough = False, True
            handles.append(q.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone())))
    from qswap.calibrate import run_observed
    run_observed(model, batches(), handles)
    return model, seen


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile"])
def test_float_observation_grids_are_the_float_sites_ranges(observer):
    """observe="float": each quantizer's grid is its observer's range over exactly the inputs the
    float-site model gives it, in the same order (a fresh observer fed those inputs, then
    choose_qparams): bit for bit, the scalar fast path included."""
    rec = recipe(observer)
    model = calibrated(rec, observe="float")
    reference_model, seen = float_site_inputs(rec)
    got = grids(model)
    assert len(got) > 50 and got.keys() == seen.keys()
    for name, inputs in seen.items():
        spec = dict(reference_model.named_modules())[name].spec
        observer_ = make_observer(spec)
        for x in inputs:
            observer_(x)
        scale, zero_point = choose_qparams(observer_.min_val, observer_.max_val, spec)
        assert torch.equal(got[name][0], scale) and torch.equal(got[name][1], zero_point), name


def test_passing_quantizers_leave_the_float_sites_values():
    """While quantizers pass through, the model computes what it computes with its activation
    sites in float (the quantizers disabled), observing or not."""
    model = qswap.convert(build_s2t_transformer(seed=0), recipe())
    net_input = batches()[0]
    outs = []
    for passing in (True, False):
        for q in activation_quantizers(model):
            q.enabled, q.passthrough = False, passing
        with torch.no_grad():
            outs.append(model(**net_input)[0])
    assert torch.equal(outs[0], outs[1])
    assert any(q.observer.has_range for q in activation_quantizers(model))


def test_the_two_modes_observe_different_activations_and_restore_every_quantizer():
    quantized, floating = calibrated(recipe(), observe="quantized"), calibrated(recipe(), observe="float")
    a, b = grids(quantized), grids(floating)
    assert a.keys() == b.keys()
    differ = [n for n in a if not torch.equal(a[n][0], b[n][0])]
    assert differ  # downstream sites see rounded inputs in one mode only
    ratios = [float(a[n][0] / b[n][0]) for n in a]
    assert 0.8 < min(ratios) and max(ratios) < 1.25  # the same activations, give or take the rounding
    for q in activation_quantizers(floating):
        assert q.enabled and not q.passthrough
        assert bool(q.frozen) == q.initialized
    net_input = batches()[0]
    with torch.no_grad():
        out = floating(**net_input)[0]
    assert torch.isfinite(out).all()


def test_the_recipe_key_picks_the_mode_and_an_argument_overrides_it():
    rec = recipe(observe="float")
    assert rec.observe == "float" and recipe().observe == "quantized"
    by_key, by_argument = calibrated(rec), calibrated(recipe(), observe="float")
    overridden = calibrated(rec, observe="quantized")
    a, b, c = grids(by_key), grids(by_argument), grids(calibrated(recipe()))
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert all(torch.equal(grids(overridden)[n][0], c[n][0]) for n in c)
    with pytest.raises(RecipeError, match="observe.*must be one of quantized, float"):
        recipe(observe="both")


def test_a_site_kept_in_float_stays_out_of_a_float_observation():
    model = qswap.convert(build_s2t_transformer(seed=0), recipe())
    kept = activation_quantizers(model)[3]
    kept.enabled = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(model, batches(), observe="float")
    assert not kept.enabled and not kept.passthrough and not kept.initialized


def _states(model):
    return [{k: v.clone() for k, v in q.state_dict().items()} for q in activation_quantizers(model)]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("observe", ["quantized", "float"])
def test_a_bad_mode_or_a_failing_batch_is_a_typed_error_that_leaves_every_quantizer_as_it_was(observe):
    """A calibration that fails part-way (a batch the model cannot take, a batch of NaNs) leaves each
    activation quantizer as it found it: a fresh model unobserved, a calibrated one frozen on its
    grids, computing what it computed, not observing afresh at inference with a part-run's ranges."""
    model = qswap.convert(build_s2t_transformer(seed=0), recipe("minmax"))
    with pytest.raises(CalibrationError, match="observe must be one of quantized, float, got 'floats'"):
        qswap.calibrate(model, batches(), observe="floats")
    fresh = _states(model)
    bad = dict(batches()[0], src_tokens=torch.randn(2, 40, 7))  # the wrong feature count
    with pytest.raises(CalibrationError, match="calibration batch 1: the model raised"):
        qswap.calibrate(model, [batches()[0], bad], observe=observe)
    assert _same(_states(model), fresh)
    for q in activation_quantizers(model):
        assert q.enabled and not q.passthrough and not bool(q.frozen) and not q.observer.has_range

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(model, batches(), observe=observe)
    calibrated = _states(model)
    with torch.no_grad():
        before = model.eval()(**batches()[0])[0]
    nan = dict(batches()[0], src_tokens=torch.full((2, 40, 80), float("nan")))
    for failing in ([batches()[1], bad], [batches()[1], nan], []):
        with pytest.raises(CalibrationError):
            qswap.calibrate(model, failing, observe=observe)
        assert _same(_states(model), calibrated)
        assert all(bool(q.frozen) for q in activation_quantizers(model) if q.initialized)
        with torch.no_grad():
            assert torch.equal(model(**batches()[0])[0], before)


def test_calibration_restores_each_modules_own_training_flag():
    """A model training with one module held in eval (a frozen part) gets both back as they were."""
    model = qswap.convert(build_s2t_transformer(seed=0), recipe("minmax")).train()
    held = model.encoder.transformer_layers[0]
    held.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    assert not all(flags.values()) and any(flags.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(model, batches())
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_a_frozen_quantizer_keeps_its_grid_through_a_float_observation():
    """``observing`` (what fairseq-train's calibration steps run) leaves a frozen quantizer out,
    as a quantized calibration does: it neither observes nor changes its grid."""
    from qswap.calibrate import observing
    model = calibrated(recipe())
    quantizers = activation_quantizers(model)
    frozen = [q for q in quantizers if bool(q.frozen)][:5]
    for q in quantizers:
        if q not in frozen:
            q.unfreeze()
    before = [(q.scale.clone(), q.zero_point.clone(), int(q.observer.num_batches)) for q in frozen]
    others = [q for q in quantizers if q not in frozen and q.initialized]
    scales = [q.scale.clone() for q in others]
    big = dict(batches()[0], src_tokens=batches()[0]["src_tokens"] * 10)
    with torch.no_grad(), observing(quantizers, "float"):
        model.eval()(**big)
    for q, (scale, zero_point, seen) in zip(frozen, before):
        assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zero_point)
        assert int(q.observer.num_batches) == seen and q.enabled and not q.passthrough
    assert sum(not torch.equal(q.scale, s) for q, s in zip(others, scales)) > len(others) // 2  # they observed


def test_a_recalibration_keeps_the_earlier_grid_of_a_quantizer_its_batches_never_reach(caplog):
    """Re-calibrating reset and unfroze every activation quantizer: one the new batches never
    reached kept its old grid, counted as calibrated (no log, no error even when none saw data)
    and was left observing, its grid drifting at inference. It now keeps its earlier grid and
    frozen flag and is named in the log; a run where no quantizer sees data is an error."""
    model = calibrated(recipe("minmax"))
    quantizers = activation_quantizers(model)
    names = {id(m): n for n, m in model.named_modules()}
    decoder = [q for q in quantizers if names[id(q)].startswith("decoder.") and bool(q.frozen)]
    assert decoder
    before = {id(q): (q.scale.clone(), q.zero_point.clone()) for q in decoder}
    big = dict(batches()[0], src_tokens=batches()[0]["src_tokens"] * 10)
    with caplog.at_level("INFO", logger="qswap"):
        qswap.calibrate(model, [big], forward=lambda m, b: m.encoder(b["src_tokens"], b["src_lengths"]))
    for q in decoder:
        assert bool(q.frozen) and torch.equal(q.scale, before[id(q)][0])
        assert torch.equal(q.zero_point, before[id(q)][1])
    assert names[id(decoder[0])] in caplog.text and "keep the grid of their previous calibration" in caplog.text
    states = _states(model)
    with pytest.raises(CalibrationError, match="none of the .* activation quantizers saw data"):
        qswap.calibrate(model, [big], forward=lambda m, b: None)
    assert _same(_states(model), states)
    assert all(bool(q.frozen) for q in quantizers if q.initialized)


def test_max_batches_draws_no_batch_past_the_last_one_used():
    drawn = []

    def source():
        for i, b in enumerate(batches() * 2):
            drawn.append(i)
            yield b

    model = qswap.convert(build_s2t_transformer(seed=0), recipe("minmax"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert qswap.calibrate(model, source(), max_batches=2) == 2
    assert drawn == [0, 1]
    for bad in (0, -1, 1.5, "2", True):  # 1.5 had calibrated on 2 batches, "2" had been a raw TypeError
        with pytest.raises(CalibrationError, match=f"max_batches is a whole number of batches, 1 or more .* got {bad!r}"):
            qswap.calibrate(model, source(), max_batches=bad)
    assert drawn == [0, 1]
    for name in ("forward", "progress"):  # 1 had been a raw TypeError ('int' object is not callable)
        with pytest.raises(CalibrationError, match=f"calibrate\\(\\)'s {name} is a function \\(or None\\), got int"):
            qswap.calibrate(model, batches(), **{name: 1})


@pytest.mark.parametrize("given, named", [(5, "got int"), (None, "got NoneType"), ("batches", None)])
def test_batches_that_are_not_an_iterable_of_batches_are_a_calibration_error(given, named):
    """qswap.calibrate(model, 5) had been a raw TypeError ('int' object is not iterable); one
    net_input dict, iterated, handed the model its key names."""
    model = qswap.convert(build_s2t_transformer(seed=0), recipe("minmax"))
    given = batches()[0] if given == "batches" else given
    with pytest.raises(CalibrationError, match="calibrate takes an iterable of batches") as exc:
        qswap.calibrate(model, given)
    assert (named or "got one dict") in str(exc.value) and "pass [batch]" in str(exc.value)


def test_unsigned_symmetric_activation_grids_that_saw_negatives_are_named_in_a_warning():
    """An activation grid of ``signed: false, symmetric: true`` rounds every negative value to 0:
    calibration that saw some names the sites in a QswapWarning; a grid that saw none is quiet."""
    from qswap.errors import QswapWarning

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    recipe = {"version": 1, "defaults": {"weight": {"bits": 8}},
              "rules": [{"match": {"path": "2"}, "activation": {"bits": 8, "signed": False, "symmetric": True}}]}
    q = qswap.convert(model, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qswap.calibrate(q, [torch.randn(8, 4)])  # fc2 reads the ReLU's output: nothing negative
    recipe["rules"][0]["match"]["path"] = "0"
    q = qswap.convert(model, recipe)
    with pytest.warns(QswapWarning, match=r"1 activation quantizer\(s\) on unsigned symmetric grids .* saw negative "
                                          r"values .*: 0\.input_quant; use signed: true"):
        qswap.calibrate(q, [torch.randn(8, 4)])


def test_a_per_channel_activation_grid_on_a_changing_axis_names_its_quantizer():
    """Per-channel activation ranges along the batch axis (the defaults' axis 0 on a linear's input)
    cannot make one grid: the SpecError had named no quantizer (the observer does not know its site);
    calibrate names the first one that raised, by its path in the model, and the batch."""
    from qswap.errors import SpecError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    recipe = {"version": 1, "name": "batch_axis", "defaults": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "granularity": "per_channel", "axis": 0,
                                              "observer": "minmax"}}}
    qmodel = qswap.convert(model, recipe)
    with pytest.raises(SpecError, match=r"calibration batch 1: quantizer 0\.input_quant: per_channel ranges of "
                                        r"shape \(5,\) after ranges of shape \(3,\)"):
        qswap.calibrate(qmodel, [torch.randn(3, 8), torch.randn(5, 8)])
