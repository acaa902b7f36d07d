"""tools/strategies.py: every method x column recipe loads, converts a real fairseq model
(pre-norm s2t_transformer, small) and audits honest; the page is written from rows."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("strategies", REPO / "tools" / "strategies.py")
strategies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(strategies)


def _model():
    return build_s2t_transformer(encoder_normalize_before=True, decoder_normalize_before=True,
                                 encoder_embed_dim=64, decoder_embed_dim=64, encoder_ffn_embed_dim=256,
                                 decoder_ffn_embed_dim=256, encoder_attention_heads=4, decoder_attention_heads=4)


@pytest.mark.parametrize("column", ["w8a8", "w4a4_edges8"])
@pytest.mark.parametrize("method", list(strategies.METHODS))
def test_every_cell_is_a_recipe_that_converts_and_audits_honest(method, column):
    """... and has an integer form (issue 19: every method integer-implementable; the Hadamard
    methods' online rotation before fc2 included, qswap/nn/hadamard.py)."""
    picks = {"softmax_out": "minmax", "attn_residual": "percentile"} if method == "per_site" else None
    recipe = qswap.load_recipe(strategies.recipe_for(column, method, picks))
    assert recipe.name == (column if method == "shipped" else f"{column}_{method}")
    x = s2t_net_input(vocab=40, frames=48)
    qmodel = qswap.convert(_model(), recipe, data=[x])
    qswap.calibrate(qmodel, [x])
    assert qswap.audit(qmodel, x).honest
    assert strategies.integer_form(qmodel) == "yes"
    if method == "per_group":  # the attention projections too, not only the units' neighbours
        layer = qmodel.encoder.transformer_layers[0]
        assert layer.self_attn.q_proj.weight_quant.spec.granularity == layer.fc1.weight_quant.spec.granularity
        assert layer.fc1.weight_quant.spec.granularity == "per_group"
    notes = " ".join(qmodel.qswap_report.notes)
    assert "converted as one unit" not in notes  # no method asks a unit's parts for what they do not get


def test_per_site_sets_each_sites_observer():
    qmodel = qswap.convert(_model(), strategies.recipe_for("w4a4_edges8", "per_site", {"softmax_out": "minmax"}))
    core = qmodel.encoder.transformer_layers[0].self_attn.core
    assert core.softmax_out_quant.spec.observer == "minmax" and core.q_quant.spec.observer == "mse"
    assert core.softmax_out_quant.spec.bits == 4


def test_stream_per_channel_grids_are_per_embedding_channel():
    qmodel = qswap.convert(_model(), strategies.recipe_for("w4a4_edges8", "stream_per_channel"))
    layer = qmodel.encoder.transformer_layers[0]
    for q in (layer.attn_residual_quant, layer.ffn_out_quant, layer.final_layer_norm.input_quant):
        assert (q.spec.granularity, q.spec.axis, q.spec.bits) == ("per_channel", -1, 4)
    assert layer.fc1.input_quant.spec.granularity == "per_tensor"  # a matmul's input stays per tensor


def _cell(errors, words, honest=True, mb=1.0):
    wer = 100 * sum(errors) / sum(words)
    return {"wer": wer, "utterance_errors": errors, "utterance_words": words, "honest": honest,
            "weight_mb": mb, "utterances": len(words)}


def test_page_reads_the_intervals():
    words = [10] * 40
    cells = {"float/fp32": _cell([1] * 40, words), "shipped/w4a4_edges8": _cell([5] * 40, words),
             "smoothquant/w4a4_edges8": _cell([1] * 39 + [2], words)}
    payload = {"settings": {"calib_subset": "train_calib", "calib_batches": 4, "beam": 5, "batches": None},
               "cells": {s: cells for s in strategies.SUBSETS}}
    text = strategies.page(payload)
    assert "| smoothquant | +0.25 [+0.00, +0.75] |" in text
    assert "lowest mean ΔWER: `smoothquant`" in text and "(better)" in text
    assert "Target (within +2.0) met on both sets" in text


def test_the_observe_section_pairs_float_observation_with_the_shipped_cell():
    words = [10] * 40
    cells = {"float/fp32": _cell([1] * 40, words), "shipped/w8a8": _cell([2] * 40, words),
             "observe_float/w8a8": _cell([3] * 40, words)}
    payload = {"settings": {"calib_subset": "train_calib", "calib_batches": 4, "beam": 5, "batches": None},
               "cells": {s: cells for s in strategies.SUBSETS}}
    text = strategies.page(payload)
    assert "## What calibration observes" in text
    assert "| `test` | +10.00 [+10.00, +10.00] (worse) |" in text
    payload["cells"] = {s: dict(cells) for s in strategies.SUBSETS}
    del payload["cells"]["test_heldout"]["observe_float/w8a8"]  # one set decoded, the other not yet
    assert "## What calibration observes" not in strategies.page(payload)


def test_the_reading_names_other_cells_whose_point_estimates_meet_the_target():
    """w4a8's target (+0.5): the lowest mean ΔWER (``percentile``: far below on one set, above on the
    other) misses it; ``minmax`` meets it on both sets by its point estimates, not its intervals."""
    words = [10] * 40

    def errors(extra_words):  # one error per utterance (float), plus extra_words spread over utterances
        return [1 + (i < extra_words) for i in range(40)]
    sets = {"test": {"float/fp32": _cell(errors(0), words), "shipped/w4a8": _cell(errors(8), words),
                     "percentile/w4a8": _cell([0] * 40, words), "minmax/w4a8": _cell(errors(1), words)},
            "test_heldout": {"float/fp32": _cell(errors(0), words), "shipped/w4a8": _cell(errors(8), words),
                             "percentile/w4a8": _cell(errors(4), words), "minmax/w4a8": _cell(errors(1), words)}}
    payload = {"settings": {"calib_subset": "train_calib", "calib_batches": 4, "beam": 5, "batches": None},
               "cells": sets}
    text = strategies.page(payload)
    assert "lowest mean ΔWER: `percentile`" in text
    # percentile: +1.00 on test_heldout by its point estimate, an interval that reaches below +0.5
    assert ("Target (within +0.5): a point estimate lies above it, but no interval lies wholly above it: these "
            "sets cannot tell.") in text
    assert "meet it on both sets: `minmax` (an interval reaches beyond it)." in text
    for cells in sets.values():  # every method 30 words (+7.5 points) above float on both sets
        cells.update({k: _cell(errors(30), words) for k in cells if k != "float/fp32"})
    assert "Target (within +0.5) not met: on test and test_heldout the whole interval lies above it." in (
        strategies.page(payload))


def test_the_shipped_choice_is_the_study_cell():
    """recipes/w4a4_edges8_stream_smoothquant.yaml and w4a4_edges8_stream_embed_smoothquant.yaml are what the
    study evaluated as those cells."""
    def plain(recipe):
        d = {k: v for k, v in qswap.load_recipe(recipe).to_dict().items() if k not in ("name", "description")}
        d["rules"] = [{k: v for k, v in r.items() if k != "note"} for r in d["rules"]]
        return d
    study = strategies.recipe_for("w4a4_edges8", "stream_per_channel_smoothquant")
    assert plain(study) == plain("w4a4_edges8_stream_smoothquant")
    entry = strategies.recipe_for("w4a4_edges8", "stream_entry_smoothquant")
    assert plain(entry) == plain("w4a4_edges8_stream_embed_smoothquant")


def test_the_committed_page_is_its_json():
    """docs/strategies.md is what the tool writes from docs/strategies_<subset>.json."""
    payload = strategies.load(str(REPO / "docs" / "strategies"))
    assert set(payload["cells"]) == set(strategies.SUBSETS)
    assert (REPO / "docs" / "strategies.md").read_text() == strategies.page(payload)


def test_resuming_with_other_settings_is_a_typed_one_line_error(tmp_path, capsys):
    """--resume over JSON written with other decoding settings: a DataError saying what to change,
    printed as one ``error:`` line with exit status 2, and no cell decoded."""
    from qswap.errors import DataError

    payload = {"cells": {}, "settings": {"calib_subset": "train_calib", "calib_batches": 4, "beam": 1, "batches": None}}
    with pytest.raises(DataError, match="rerun without --resume"):
        strategies.run(payload, str(tmp_path / "s"), ["test"], ["shipped"], ["w8a8"], {}, None, 5)
    for subset in strategies.SUBSETS:
        (tmp_path / f"s_{subset}.json").write_text(json.dumps({"settings": payload["settings"], "cells": {subset: {}}}))
    assert strategies.main(["--resume", "--json", str(tmp_path / "s"), "--markdown", str(tmp_path / "s.md")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "s.md").exists()


def test_redo_needs_resume_and_drops_only_the_named_cells(tmp_path, monkeypatch):
    """--redo decodes again the cells of --methods x --columns (kept by --resume otherwise), and
    only those: the other cells stay as the JSON has them."""
    settings = {"calib_subset": "train_calib", "calib_batches": 4, "beam": 5, "batches": None}
    cells = {"hadamard/w8a8": {"wer": 1.0}, "shipped/w8a8": {"wer": 2.0}}
    for subset in strategies.SUBSETS:
        (tmp_path / f"s_{subset}.json").write_text(json.dumps({"settings": settings, "cells": {subset: dict(cells)}}))
    with pytest.raises(SystemExit):
        strategies.main(["--redo", "--json", str(tmp_path / "s")])
    seen = {}
    monkeypatch.setattr(strategies, "run", lambda payload, *args: seen.update(
        {s: sorted(payload["cells"][s]) for s in strategies.SUBSETS}))
    monkeypatch.setattr(strategies, "page", lambda payload: "page")
    assert strategies.main(["--resume", "--redo", "--methods", "hadamard", "--columns", "w8a8", "--subsets", "test",
                            "--json", str(tmp_path / "s"), "--markdown", str(tmp_path / "s.md")]) == 0
    assert seen == {"test": ["shipped/w8a8"], "test_heldout": ["hadamard/w8a8", "shipped/w8a8"]}


def test_a_set_of_one_utterance_renders_no_interval_instead_of_failing():
    """Below MIN_UTTERANCES utterances the bootstrap gives no interval: the cells say so."""
    from qswap.integration.bootstrap import NO_INTERVAL

    def cell(errors):
        return {"utterance_errors": [errors], "utterance_words": [6], "wer": 100 * errors / 6, "honest": True,
                "weight_mb": 1.0}

    payload = {"cells": {s: {"float/fp32": cell(0), "shipped/w8a8": cell(1)} for s in strategies.SUBSETS}}
    stats = strategies.with_intervals(payload)
    subset = next(iter(strategies.SUBSETS))
    assert stats[subset]["shipped/w8a8"]["delta_ci"] is None and stats[subset]["shipped/w8a8"]["wer_ci"] is None
    assert f"+16.67 ({NO_INTERVAL})" in strategies.table(payload, stats, subset)
    delta, ci = strategies.pair(payload, subset, "shipped/w8a8", "float/fp32")
    assert ci is None and strategies._verdict(ci) == "no verdict"
    assert "an interval reaches beyond it" in strategies._meeting(payload, stats, "w8a8", 20.0, exclude="")


def test_the_pick_says_so_where_the_lowest_method_is_worse_on_a_set():
    """Better than the shipped recipe on one set and worse (its interval above 0) on the other:
    the page had said 'No method is distinguishable from the shipped recipe'."""
    words = [10] * 50

    def cell(errors):
        return {"utterance_errors": errors, "utterance_words": words, "wer": 100 * sum(errors) / sum(words)}

    payload = {"cells": {"test": {"m/w4a8": cell([0] * 50), "shipped/w4a8": cell([2] * 50)},
                         "test_heldout": {"m/w4a8": cell([3] * 50), "shipped/w4a8": cell([2] * 50)}}}
    assert strategies._verdicts(payload, "m/w4a8", "shipped/w4a8") == ["better", "worse"]
    text = strategies._pick(payload, "w4a8", "m")
    assert "worse than the shipped recipe on test_heldout (better on test)" in text
    assert "distinguishable" not in text
