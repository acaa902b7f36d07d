"""qswap.regrid on a real fairseq S2T transformer (small): a quantized model moved onto another
recipe's grids keeps its weights and every unchanged grid, and only the changed sites are
calibrated (``qswap.calibrate(..., quantizers=)``); the CLI does it for a quantized checkpoint."""
import warnings

import pytest
import torch

import qswap
from qswap.errors import CalibrationError, ConvertError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.quant import FakeQuantize

OLD, NEW = "w4a4_edges8_stream_smoothquant", "w4a4_edges8_stream_embed_smoothquant"


def batches():
    return [s2t_net_input(batch=2, frames=40, seed=s) for s in (1, 2)]


def quantized(recipe=OLD):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qswap.convert(build_s2t_transformer(seed=0), recipe, data=batches())
        qswap.calibrate(model, batches())
    return model


def quantizer_states(model):
    return {n: {k: v.clone() for k, v in m.state_dict().items()}
            for n, m in model.named_modules() if isinstance(m, FakeQuantize)}


def weights(model):
    return {k: v for k, v in model.state_dict().items() if not any(
        k.startswith(f"{n}.") for n in quantizer_states(model))}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch)[0]


@pytest.fixture(scope="module")
def old():
    return quantized()


def test_moves_only_the_changed_site_and_keeps_every_weight_and_other_grid(old):
    before = quantizer_states(old)
    moved = qswap.regrid(old, NEW, build_s2t_transformer(seed=5))  # other weights: replaced
    assert moved.model.qswap_recipe.name == NEW
    assert moved.fresh == ["encoder.embed_quant"] and not moved.dropped
    assert len(moved.kept) == len(before) - 1
    fresh = moved.fresh_activations()
    assert [q.spec.granularity for q in fresh] == ["per_channel"]
    assert fresh[0].scale.numel() == 0  # no state from the old per-tensor grid
    for k, v in weights(old).items():
        assert torch.equal(moved.model.state_dict()[k], v), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(moved.model, batches(), quantizers=fresh)
    after = quantizer_states(moved.model)
    for name in moved.kept:  # calibrating the fresh site left every other grid as it was
        for k, v in before[name].items():
            assert torch.equal(after[name][k], v), (name, k)
    embed = fresh[0]
    assert bool(embed.frozen) and embed.scale.shape == (old.encoder.transformer_layers[0].fc1.in_features,)
    out = logits(moved.model, batches()[0])
    assert torch.isfinite(out).all() and not torch.equal(out, logits(old, batches()[0]))
    assert qswap.audit(moved.model, batches()[0]).honest


def test_the_same_recipe_moves_nothing_and_computes_the_same_logits(old):
    moved = qswap.regrid(old, OLD, build_s2t_transformer(seed=5))
    assert moved.fresh == [] and moved.dropped == []
    assert torch.equal(logits(moved.model, batches()[1]), logits(old, batches()[1]))


def test_the_callers_model_is_untouched(old):
    before, out = quantizer_states(old), logits(old, batches()[0])
    qswap.regrid(old, NEW, build_s2t_transformer(seed=5))
    assert all(torch.equal(quantizer_states(old)[n][k], v) for n, s in before.items() for k, v in s.items())
    assert torch.equal(logits(old, batches()[0]), out)


def test_other_transforms_are_refused_naming_the_float_checkpoint(old):
    with pytest.raises(ConvertError, match="recipe w8a8 folds the transforms none.*smoothquant.*FLOAT_CHECKPOINT"):
        qswap.regrid(old, "w8a8", build_s2t_transformer(seed=5))


def test_a_float_model_or_another_architecture_is_refused(old):
    flt = build_s2t_transformer(seed=0)
    with pytest.raises(ConvertError, match="takes a model qswap.convert made"):
        qswap.regrid(flt, NEW, build_s2t_transformer(seed=5))
    with pytest.raises(ConvertError, match="float_model already contains qswap quantizers"):
        qswap.regrid(old, NEW, quantized())
    with pytest.raises(ConvertError, match="not the same architecture"):
        qswap.regrid(old, OLD, build_s2t_transformer(seed=5, encoder_layers=1))


def test_a_model_of_a_recipe_without_quantizers_moves_with_every_site_fresh():
    fp32 = qswap.convert(build_s2t_transformer(seed=0), "fp32")
    moved = qswap.regrid(fp32, "w8a8", build_s2t_transformer(seed=5))
    assert not moved.kept and moved.fresh and len(moved.fresh_activations()) > 0
    for k, v in fp32.state_dict().items():
        assert torch.equal(moved.model.state_dict()[k], v), k
    assert qswap.calibrate(moved.model, batches(), quantizers=moved.fresh_activations()) == 2
    assert all(bool(q.frozen) for q in moved.fresh_activations() if q.initialized)


def test_strict_refuses_a_rule_that_matches_nothing_as_convert_does(old):
    recipe = qswap.load_recipe(OLD).to_dict()
    recipe["rules"] = [*recipe["rules"], {"match": {"path": "encoder.transformer_layer.*"}, "weight": {"bits": 8}}]
    with pytest.raises(ConvertError, match="strict.*matched no module"):
        qswap.regrid(old, recipe, build_s2t_transformer(seed=5), strict=True)


def test_calibrate_quantizers_must_be_the_models_activation_quantizers(old):
    other = quantized()
    weight_q = next(m for m in old.modules() if isinstance(m, FakeQuantize) and m.kind == "weight")
    for bad, match in ((other.encoder.embed_quant, "takes a list.*got FakeQuantize"),
                       ([other.encoder.embed_quant], "not one of the model's activation quantizers"),
                       ([weight_q], "a weight quantizer that is not"), ([], "is empty"),
                       ("encoder.embed_quant", "takes a list")):
        with pytest.raises(CalibrationError, match=match):
            qswap.calibrate(old, batches(), quantizers=bad)


def test_the_cli_moves_a_quantized_checkpoint_and_qat_starts_from_it(float_checkpoint, tmp_path):
    from qswap.cli import main
    from qswap.integration.data import load_model_and_task
    from qswap.integration.qat_start import converted_start
    from qswap.transforms import STRUCTURE_ONLY

    _, data, float_ckpt = float_checkpoint
    common = ["--data", str(data), "--max-sentences", "4"]
    assert main(["convert", str(float_ckpt), "--recipe", OLD, "--calib-batches", "2", *common,
                 "-o", str(tmp_path / "old.pt")]) == 0
    # a changed activation grid needs calibration batches: refused, nothing written
    assert main(["convert", str(tmp_path / "old.pt"), "--recipe", NEW, *common, "-o", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
    assert main(["convert", str(tmp_path / "old.pt"), "--recipe", NEW, "--calib-batches", "1", *common,
                 "-o", str(tmp_path / "new.pt")]) == 0
    old_model, _ = load_model_and_task(tmp_path / "old.pt", data)
    new_model, _ = load_model_and_task(tmp_path / "new.pt", data)
    assert new_model.qswap_recipe.name == NEW
    assert new_model.encoder.embed_quant.scale.ndim == 1 and bool(new_model.encoder.embed_quant.frozen)
    for k, v in weights(old_model).items():
        assert torch.equal(new_model.state_dict()[k], v), k
    assert converted_start(qswap.load_recipe(NEW), tmp_path / "new.pt") is STRUCTURE_ONLY


def test_a_site_the_old_model_never_calibrated_is_fresh_and_calibrate_leaves_the_others_observing():
    """A kept site still observing (a --no-calibrate model) has no grid to keep: it is fresh, and
    qswap.calibrate(quantizers=) of some sites puts the state of the others still observing back."""
    dynamic = qswap.convert(build_s2t_transformer(seed=0), "w8a8")  # never calibrated
    moved = qswap.regrid(dynamic, "w8a8", build_s2t_transformer(seed=5))
    acts = [n for n, q in moved.model.named_modules() if isinstance(q, FakeQuantize) and q.kind == "activation"]
    assert set(acts) <= set(moved.fresh) and len(moved.fresh_activations()) == len(acts)
    first, rest = moved.fresh_activations()[:3], moved.fresh_activations()[3:]
    before = [{k: v.clone() for k, v in q.state_dict().items()} for q in rest]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(moved.model, batches(), quantizers=first)
    assert all(bool(q.frozen) for q in first)
    for q, state in zip(rest, before):
        assert not bool(q.frozen) and all(torch.equal(q.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_calibrating_fresh_sites_behind_frozen_grids_refuses_a_batch_that_is_not_finite(old, bad):
    """The kept grids round NaN and inf to finite codes before the fresh site sees them: the
    batch itself is checked, as a full calibration's first quantizer does."""
    moved = qswap.regrid(old, NEW, build_s2t_transformer(seed=5))
    fresh = moved.fresh_activations()
    batch = batches()[0]
    batch["src_tokens"] = batch["src_tokens"].clone()
    batch["src_tokens"][0, 3, 5] = bad
    with pytest.raises(CalibrationError, match="calibration batch 1: observed a tensor with NaN or inf"):
        qswap.calibrate(moved.model, [batches()[1], batch], quantizers=fresh)
    assert fresh[0].scale.numel() == 0 and not bool(fresh[0].frozen)  # as it was


def test_a_tied_quantizer_whose_spec_changes_keeps_no_old_state_under_any_name():
    """The decoder's embedding and output projection share one weight quantizer: fresh in
    w8a8_per_channel (per-channel weights), it carries no per-tensor state through its other name."""
    old = quantized("w8a8")
    moved = qswap.regrid(old, "w8a8_per_channel", build_s2t_transformer(seed=5))
    assert "decoder.embed_tokens.weight_quant" in moved.fresh
    mods = dict(moved.model.named_modules(remove_duplicate=False))
    assert mods["decoder.output_projection.weight_quant"] is mods["decoder.embed_tokens.weight_quant"]
    assert all(mods[n].scale.numel() == 0 for n in moved.fresh)  # nothing of the old grids
    assert torch.isfinite(logits(moved.model, batches()[0])).all()


def test_the_same_transforms_with_their_defaults_written_out_are_the_same(old):
    spelled = qswap.load_recipe(NEW).to_dict()
    spelled["transforms"] = [{"smoothquant": {"alpha": 0.5, "norms": True, "ffn": True}}]
    assert qswap.regrid(old, spelled, build_s2t_transformer(seed=5)).fresh == ["encoder.embed_quant"]
    spelled["transforms"] = [{"smoothquant": {"alpha": 0.25}}]
    with pytest.raises(ConvertError, match="folds the transforms"):
        qswap.regrid(old, spelled, build_s2t_transformer(seed=5))


def test_a_wider_model_or_no_model_is_a_convert_error(old):
    with pytest.raises(ConvertError, match="not the same architecture.*size mismatch"):
        qswap.regrid(old, OLD, build_s2t_transformer(seed=5, encoder_ffn_embed_dim=256))
    with pytest.raises(ConvertError, match="self_attn.num_heads is 4 in the quantized model and 8 in float_model"):
        qswap.regrid(old, OLD, build_s2t_transformer(seed=5, encoder_attention_heads=8))  # weights of the same shapes
    with pytest.raises(ConvertError, match="float_model is a torch.nn.Module, got NoneType"):
        qswap.regrid(old, OLD, None)


def test_a_failed_regrid_leaves_the_float_model_float_and_unchanged(old):
    """Another architecture (fewer layers, other heads): a ConvertError, and ``float_model`` is the
    float model it was, weights included, which a second try with it refuses for the same reason."""
    for other in ({"encoder_layers": 1}, {"encoder_attention_heads": 8}):
        float_model = build_s2t_transformer(seed=5, **other)
        state = {k: v.clone() for k, v in float_model.state_dict().items()}
        for _ in range(2):
            with pytest.raises(ConvertError, match="not the same architecture"):
                qswap.regrid(old, OLD, float_model)
            assert type(float_model) is type(build_s2t_transformer(seed=5)) and not quantizer_states(float_model)
            assert float_model.state_dict().keys() == state.keys()
            assert all(torch.equal(float_model.state_dict()[k], v) for k, v in state.items())


def test_the_cli_moves_a_checkpoint_fairseq_train_wrote_with_the_plugin(float_checkpoint, tmp_path):
    """A QAT checkpoint as fairseq-train saves it (no qswap entry; the recipe in its cfg)."""
    from fairseq_run import SMALL, TRAIN, run_tool
    from qswap.cli import main
    from qswap.integration.data import load_model_and_task

    root, data, float_ckpt = float_checkpoint
    run_tool("fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
             "--qswap-recipe", "w4a8_lsq", "--qswap-calib-batches", "1", *SMALL, *TRAIN, "--batch-size", "3",
             "--max-update", "1", "--finetune-from-model", float_ckpt, "--save-dir", tmp_path / "qat", cwd=root)
    qat = tmp_path / "qat" / "checkpoint_last.pt"
    assert main(["convert", str(qat), "--recipe", "w4a4_edges8_lsq", "--data", str(data), "--calib-batches", "1",
                 "--max-sentences", "4", "-o", str(tmp_path / "moved.pt")]) == 0
    trained, _ = load_model_and_task(qat, data)
    moved, _ = load_model_and_task(tmp_path / "moved.pt", data)
    assert moved.qswap_recipe.name == "w4a4_edges8_lsq"
    w = "encoder.transformer_layers.0.fc1.weight"
    assert torch.equal(moved.state_dict()[w], trained.state_dict()[w])
    assert all(bool(q.frozen) for q in moved.modules() if isinstance(q, FakeQuantize) and q.kind == "activation"
               and q.initialized)


def test_regrid_onto_a_recipe_that_leaves_one_owner_of_a_tied_weight_float():
    """The output projection's weight is tied to the token embedding: one quantizer, listed under
    the embedding's name. A recipe that skips the projection had been refused as 'not the same
    architecture' (the projection's name of that quantizer had no place in the new model)."""
    from qswap.regrid import regrid

    old = quantized("w8a8")
    skip = {"version": 1, "name": "w8a8_outproj_float", "defaults": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False}},
        "rules": [{"match": {"path": "decoder.output_projection"}, "skip": True}]}
    moved = regrid(old, skip, build_s2t_transformer(seed=1))
    assert "decoder.output_projection.weight_quant" in moved.dropped
    assert type(moved.model.decoder.output_projection) is torch.nn.Linear
    old_embed = dict(old.named_modules())["decoder.embed_tokens.weight_quant"]
    new_embed = dict(moved.model.named_modules())["decoder.embed_tokens.weight_quant"]
    assert torch.equal(new_embed.scale, old_embed.scale)  # the kept quantizer's state is the old one's
    qswap.calibrate(moved.model, batches(), quantizers=moved.fresh_activations() or None)
    assert torch.isfinite(logits(moved.model, batches()[0])).all()
