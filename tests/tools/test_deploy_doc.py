"""tools/deploy_doc.py's comparison system: onnxruntime's own static quantization of qswap's float
export, calibrated on the feeds each graph sees while the float export beam-decodes."""
import sys
from pathlib import Path

import pytest
import torch

import qswap

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import deploy_doc  # noqa: E402

from qswap.export.onnx_audit import audit_export  # noqa: E402
from qswap.export.package import NO_QUANT, export_model  # noqa: E402
from qswap.export.runtime import load_exported  # noqa: E402
from qswap.models import build_s2t_transformer, s2t_net_input  # noqa: E402


def test_onnxruntime_static_quantization_of_the_float_export_decodes(tmp_path):
    torch.set_num_threads(1)
    model = build_s2t_transformer()
    dictionary = model.decoder.dictionary
    export_model(qswap.convert(model, NO_QUANT), tmp_path / "float", audit=False, allow_float=True)
    calib = [s2t_net_input(2, 60, seed=s) for s in range(2)]
    out = deploy_doc.ort_static(tmp_path / "float", dictionary, calib, tmp_path / "static", threads=1)
    audit = audit_export(out)
    assert audit.integer_count > 0 and audit.float_count > 0  # MatMul/Conv only: the rest stays float
    ort = load_exported(out, dictionary)
    from fairseq.sequence_generator import SequenceGenerator
    net = s2t_net_input(2, 60, seed=5)
    hyps = SequenceGenerator([ort], dictionary, beam_size=2, max_len_a=0, max_len_b=5).generate(
        [ort], {"net_input": {k: net[k] for k in ("src_tokens", "src_lengths")}})
    assert len(hyps) == 2 and all(h[0]["tokens"].numel() >= 1 for h in hyps)


def test_docs_deploy_md_is_its_json_rendered():
    import json
    docs = Path(__file__).resolve().parents[2] / "docs"
    result = json.loads((docs / "deploy.json").read_text())
    assert deploy_doc.render(result) == (docs / "deploy.md").read_text()


def test_byte_breakdown_accounts_for_every_byte_of_a_w4a8_export(tmp_path):
    import warnings

    torch.set_num_threads(1)
    model = build_s2t_transformer()
    export_model(qswap.convert(model, NO_QUANT), tmp_path / "float", audit=False, allow_float=True)
    qmodel = qswap.convert(model, "w4a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [s2t_net_input(2, 60, seed=s) for s in range(2)])
    export_model(qmodel, tmp_path / "w4a8", audit=False)
    sizes = deploy_doc.shipped_sizes(model, tmp_path / "float", {"w4a8": tmp_path / "w4a8"})
    row = sizes["recipes"]["w4a8"]
    assert sum(row["breakdown"].values()) == row["total"] == sum(row[g] for g in ("encoder", "cross_kv", "decoder_step"))
    assert sum(sizes["fp32_breakdown"].values()) == sizes["fp32_onnx"]["total"]
    assert row["breakdown"]["4-bit weight codes (INT4)"] > row["breakdown"].get("8-bit weight codes", 0)
    assert row["ratio"] == row["total"] / sizes["fp32_onnx"]["total"] < 0.25


def test_ulp_moved_moves_each_activation_scale_by_at_most_one_ulp_on_a_copy():
    import warnings

    from qswap.quant.fake_quantize import FakeQuantize

    torch.set_num_threads(1)
    qmodel = qswap.convert(build_s2t_transformer(), "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [s2t_net_input(2, 60, seed=0)])
    before = {n: m.scale.clone() for n, m in qmodel.named_modules()
              if isinstance(m, FakeQuantize) and m.kind == "activation" and m.initialized}
    moved = dict(deploy_doc.ulp_moved(qmodel, seed=0).named_modules())
    ulps = []
    for name, scale in before.items():
        assert torch.equal(dict(qmodel.named_modules())[name].scale, scale)  # the caller's model untouched
        new = moved[name].scale
        up, down = torch.nextafter(scale, scale * 2), torch.nextafter(scale, scale * 0)
        assert bool(((new == scale) | (new == up) | (new == down)).all()), name
        ulps.append(bool((new != scale).any()))
    assert any(ulps) and not all(ulps)  # up, down or kept at random


def test_the_page_says_what_the_machine_was_doing_when_the_speed_run_started():
    """The speed paragraphs follow the run's own sample of busy processes and decode times, not a
    fixed sentence: an idle start is said as such, a busy one names the processes."""
    sp = {"decode": {"ort_int8": {"seconds": 3.0}, "ort_fp32": {"seconds": 2.0}}}
    idle, busy = {"busy_at_start": []}, {"busy_at_start": ["python at 95% of a core"]}
    assert deploy_doc.machine_state(idle).startswith("No other process")
    assert "python at 95% of a core" in deploy_doc.machine_state(busy)
    assert "not sampled" in deploy_doc.machine_state({})
    assert "idle when it started" in deploy_doc.trust_note(idle, sp)
    assert "oversubscription" in deploy_doc.trust_note(busy, sp)
    assert "not faster" in deploy_doc.trust_note(idle, sp)
    sp["decode"]["ort_int8"]["seconds"] = 1.0
    assert "not faster" not in deploy_doc.trust_note(idle, sp)
    # sampled again when the timings end: a job that started meanwhile is said too
    busy_later = {"busy_at_start": [], "busy_at_end": ["python at 99% of a core"]}
    assert "ended: python at 99% of a core" in deploy_doc.machine_state(busy_later)
    assert "oversubscription" in deploy_doc.trust_note(busy_later, sp)
    assert "idle when it started and when its timings ended" in deploy_doc.trust_note({**idle, "busy_at_end": []}, sp)


def test_the_large_sets_rows_render_with_the_target_and_the_intervals_that_hold_it():
    """``--wer-large``'s rows: one table row each, the target judged on |ΔWER|, and the closing
    count of rows whose whole interval lies within the target (not only their point)."""
    import copy
    import json
    docs = Path(__file__).resolve().parents[2] / "docs"
    result = json.loads((docs / "deploy.json").read_text())
    assert "Measured by `cmd-large`" not in deploy_doc.render(result)

    def row(recipe, subset, delta, lo, hi):
        return {"recipe": recipe, "subset": subset, "wer_fake_quant": 5.0, "wer_onnxruntime": 5.0 + delta,
                "delta": delta, "delta_ci": [lo, hi], "utterances": 1000, "same_transcripts": 900}

    large = copy.deepcopy(result)
    large["wer_large"] = {"command": "cmd-large", "rows": [
        row("w8a8", "test_large", 0.1, -0.2, 0.25), row("w8a8", "test_heldout_large", -0.2, -0.6, 0.2),
        row("w4a8", "test_large", 0.5, 0.1, 0.9), {"recipe": "searched", "error": "no export"}]}
    page = deploy_doc.render(large)
    assert "| w8a8 | test_large | 5.00 | 5.10 | +0.10 [-0.20, +0.25] | 900/1000 | met |" in page
    # met only where the whole interval lies within ±0.3 (the point estimate had decided alone)
    assert "| w8a8 | test_heldout_large | 5.00 | 4.80 | -0.20 [-0.60, +0.20] | 900/1000 | undecided |" in page
    assert "| w4a8 | test_large | 5.00 | 5.50 | +0.50 [+0.10, +0.90] | 900/1000 | undecided |" in page
    assert ("2 of 3 rows are within ±0.3 by their ΔWER; the 95 % interval lies within it (the target met) in 1 of "
            "them") in page
    assert "Measured by `cmd-large`" in page
    assert page.index("cmd-large") < page.index("Agreement of each graph")  # beside the 100-utterance rows
    assert "own rounding spread on the same sets" not in page  # measured without --ulp-seeds: no such table
    large["wer_large"]["ulp"] = [
        {"recipe": "w8a8", "subset": "test_large", "wer_fake_quant": 5.0, "wer_moved": [4.9, 5.2, 5.0],
         "same_transcripts": [990, 980, 1000]},  # range -0.10 to +0.20: holds w8a8 test_large's +0.10
        {"recipe": "w8a8", "subset": "test_heldout_large", "wer_fake_quant": 5.0, "wer_moved": [4.9, 5.1, 5.0],
         "same_transcripts": [590, 595, 600]},  # -0.10 to +0.10: not w8a8 held-out's -0.20
        {"recipe": "w4a8", "subset": "test_large", "wer_fake_quant": 5.0, "wer_moved": [4.5, 5.6, 5.0],
         "same_transcripts": [900, 910, 1000]}]  # -0.50 to +0.60: holds w4a8's +0.50
    page = deploy_doc.render(large)
    assert "| w4a8 | test_large | 5.00 | 4.50, 5.60, 5.00 | -0.50 to +0.60 | 900, 910, 1000 |" in page
    assert "In 2 of 3 rows onnxruntime's ΔWER lies within the range the fake-quant model moves by" in page
    assert page.index("own rounding spread on the same sets") < page.index("Measured by `cmd-large`")


def test_the_qat_checkpoints_rows_render_beside_its_deploy_audit():
    """``--low-bit``'s QAT section: one row per subset with the three WERs, the target judged on
    onnxruntime against the fake-quant model with float insides, and the export's audit."""
    import copy
    import json
    docs = Path(__file__).resolve().parents[2] / "docs"
    result = copy.deepcopy(json.loads((docs / "deploy.json").read_text()))
    result["qat"] = {"command": "cmd-low-bit", "checkpoint": "ckpt.pt", "recipe": "w4a4_x",
                     "audit": {"claims_honest": True, "verdict": "V", "integer": 7, "float": 3,
                               "float_ops": {"LayerNormalization": 2, "Softmax": 1}, "bytes": 1234567},
                     "rows": [{"subset": "test", "wer_integer": 10.0, "wer_fake_quant": 11.0, "wer_onnxruntime": 11.5,
                               "delta": 0.5, "delta_ci": [0.1, 0.9], "utterances": 100, "same_transcripts": 97}]}
    page = deploy_doc.render(result)
    assert "| test | 10.00 | 11.00 | 11.50 | +0.50 [+0.10, +0.90] | 97/100 | undecided |" in page
    assert "7 integer nodes, 3 float nodes (LayerNormalization 2, Softmax 1); 1,234,567 bytes" in page
    assert "`ckpt.pt` (recipe `w4a4_x`" in page and "Measured by `cmd-low-bit`" in page
    assert page.index("cmd-low-bit") < page.index("## Deploy honesty of each shipped recipe")
    del result["qat"]
    assert "## The 4-bit-activation QAT checkpoint, deployed" not in deploy_doc.render(result)


def test_one_utterance_pairs_and_renders_without_an_interval():
    """``paired`` on one utterance: no interval (the bootstrap needs two), and the rows say so."""
    from types import SimpleNamespace

    from qswap.integration.bootstrap import NO_INTERVAL

    base = [SimpleNamespace(ref="a b c d", hyp="a b c d")]
    row = {**deploy_doc.paired(base, [SimpleNamespace(ref="a b c d", hyp="a b c x")]), "recipe": "w8a8",
           "subset": "test_large"}
    assert row["delta_ci"] is None and row["significant"] is None and row["delta"] == 25.0
    assert f"| +25.00 ({NO_INTERVAL}) | 0/1 |" in deploy_doc.wer_row_line(row, 0.3)
    lines = deploy_doc.large_wer_lines({"wer_large": {"rows": [row], "command": "cmd"}, "targets": {"wer_gap": 0.3}})
    assert ("0 of 1 rows are within ±0.3 by their ΔWER; the 95 % interval lies within it (the target met) in 0 of "
            "them") in "\n".join(lines)


@pytest.mark.parametrize("ci, verdict", [([-0.2, 0.25], "met"), ([0.35, 0.9], "**not met**"),
                                         ([-0.9, -0.31], "**not met**"), ([0.1, 0.9], "undecided"), (None, "undecided")])
def test_a_wer_gap_is_met_only_where_its_whole_interval_is_within_it(ci, verdict):
    """|ΔWER| <= 0.3 had been judged on the point estimate: +0.14 [-0.66, +0.99] read 'met'."""
    assert deploy_doc.gap_verdict({"delta": 0.14, "delta_ci": ci}, 0.3) == verdict


@pytest.mark.parametrize("argv, said", [
    (["--render-only", "--wer-only"], "not allowed with argument --render-only"),
    (["--sizes-only", "--wer-only"], "not allowed with argument --sizes-only"),
    (["--render-only", "--wait-idle", "5"], "--wait-idle applies to --speed-only"),
    (["--speed-only", "--repeats", "0"], "expected 1 or more, got 0"),
])
def test_one_section_a_run_and_its_options_are_checked_before_measuring(argv, said, capsys):
    """--render-only --wer-only had measured the WER section (minutes) and rewritten it; a second
    section flag had been ignored; --wait-idle outside --speed-only too."""
    with pytest.raises(SystemExit) as stop:
        deploy_doc.main(argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err
