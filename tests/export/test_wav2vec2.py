"""The wav2vec 2.0 CTC model as one ONNX QDQ graph (qswap.export.wav2vec2): a small real fairseq
Wav2VecCtc (post-norm with a group-norm extractor, and pre-norm with a layer-norm extractor),
calibrated w8a8; onnxruntime's logits against the fake-quant model's in steps of the logits grid
on padded batches, the padding mask, greedy CTC through ``qswap.export.runtime``, the deploy
audit, and typed errors for what the graph does not cover."""
import json

import numpy as np
import pytest
import torch

import qswap
from qswap.errors import ExportError
from qswap.models import build_wav2vec2_ctc, make_dictionary, wav2vec2_net_input
from qswap.nn.simulate import simulating

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from qswap.cli import main  # noqa: E402
from qswap.export import load_session  # noqa: E402
from qswap.export.onnx_audit import audit_export  # noqa: E402
from qswap.export.package import CTC_GRAPHS, MANIFEST, export_model, read_manifest  # noqa: E402
from qswap.export.runtime import OrtCtcModel, load_exported  # noqa: E402
from qswap.export.wav2vec2 import export_ctc, run_ctc  # noqa: E402
from qswap.integration.decode import _ctc_greedy  # noqa: E402

from export_testkit import calibrated_ctc, padded_waveforms as padded, quantizer_inputs  # noqa: E402

VARIANTS = {"post_norm": {}, "pre_norm": {"extractor_mode": "layer_norm", "layer_norm_first": True}}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    torch.set_num_threads(1)
    qmodel = calibrated_ctc(**VARIANTS[request.param])
    out = tmp_path_factory.mktemp(f"ctc_{request.param}")
    export_model(qmodel, out)
    return qmodel, out


@pytest.mark.parametrize("batch,samples", [(3, 5000), (1, 3000), (2, 4010), (1, 4010)])  # 249, 149, 200, 200 frames
def test_onnxruntime_logits_match_the_fake_quant_model_in_grid_steps(exported, batch, samples):
    qmodel, out = exported
    net = padded(batch, samples, seed=batch)
    with torch.no_grad(), simulating(qmodel, "float"):  # ONNX's LayerNorm, GroupNorm, Softmax are float
        ref = qmodel(**net)
    logits, padding = run_ctc(load_session(out / CTC_GRAPHS["ctc"]), net["source"], net["padding_mask"])
    assert logits.shape == ref["encoder_out"].shape
    if batch > 1:
        assert padding.any() and torch.equal(padding, ref["padding_mask"])
    else:
        assert not padding.any() and ref["padding_mask"] is None
    steps = (logits - ref["encoder_out"]).abs() / qmodel.logits_quant.scale
    steps = steps.masked_select(~padding.T.unsqueeze(-1).expand_as(steps))  # greedy CTC drops the rest
    # the torch graph before export computes exactly the fake-quant logits; onnxruntime's kernels
    # (another accumulation order) round a value at a grid boundary to the neighbouring code and
    # the flip spreads. Measured on these models: at most 2 steps, mean at most 0.019 step (one
    # unpadded utterance of the pre-norm model; 0 on most batches)
    assert steps.max() <= 4.0 and steps.mean() < 0.05
    same = logits.argmax(-1)[~padding.T] == ref["encoder_out"].argmax(-1)[~padding.T]
    assert same.float().mean() >= 0.99  # measured: 1 frame in 200 at worst (a random model's close logits)


def test_greedy_ctc_on_the_export_gives_the_fake_quant_transcripts(exported):
    qmodel, out = exported
    dictionary = make_dictionary()
    ort = load_exported(out, dictionary)
    assert isinstance(ort, OrtCtcModel) and ort.recipe == "w8a8"
    sample = {"net_input": padded(3, 5000, seed=11)}
    with torch.no_grad(), simulating(qmodel, "float"):
        ref = _ctc_greedy(qmodel, sample, dictionary)
    ours = _ctc_greedy(ort, sample, dictionary)
    assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_no_quantizer_sees_infinity_with_padding(exported):
    _, out = exported
    net = padded(3, 5000, seed=7)
    values, input_types = quantizer_inputs(out / CTC_GRAPHS["ctc"], net)
    assert len(values) >= 20 and all(np.isfinite(v).all() for v in values)
    assert input_types == [1, 9]  # float waveforms, bool padding mask


def test_manifest_and_deploy_audit_of_a_ctc_export(exported, tmp_path, capsys):
    qmodel, out = exported
    manifest = read_manifest(out)
    assert manifest.kind == "ctc" and manifest.graphs == CTC_GRAPHS and manifest.claims_honest is True
    report = audit_export(out)
    assert [g.graph for g in report.graphs] == ["ctc.onnx"] and report.integer_count > 0
    modules = dict(qmodel.named_modules())  # each float node's site is a module of the model (test_sites.py)
    assert [n.site for n in report.graphs[0].float_nodes if n.site and n.site not in modules] == []
    assert main(["audit", str(out), "--onnx", "--json", str(tmp_path / "a.json")]) == 1  # float nodes remain
    assert "CLAIMS HONEST, DEPLOYS FLOAT" in capsys.readouterr().out
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["recipe"] == "w8a8" and payload["graphs"][0]["integer_ops"]


def test_a_manifest_without_kind_reads_as_seq2seq_and_an_unknown_kind_is_a_typed_error(exported, tmp_path):
    _, out = exported
    payload = json.loads((out / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({k: v for k, v in payload.items() if k != "kind"}))
    with pytest.raises(ExportError, match="names no encoder graph"):
        read_manifest(tmp_path)  # an old manifest is seq2seq: it must name the three graphs
    (tmp_path / MANIFEST).write_text(json.dumps({**payload, "kind": "rnnt"}))
    with pytest.raises(ExportError, match="kind 'rnnt'"):
        read_manifest(tmp_path)


def test_uncalibrated_and_uncovered_ctc_models_are_typed_errors(tmp_path):
    example = wav2vec2_net_input(2, 4000)
    with pytest.raises(ExportError, match="not calibrated"):
        export_ctc(qswap.convert(build_wav2vec2_ctc(), "w8a8"), tmp_path / "a.onnx", example)
    qmodel = calibrated_ctc()
    qmodel.blank_weight = 1.5
    with pytest.raises(ExportError, match="blank_weight is 1.5"):
        export_ctc(qmodel, tmp_path / "b.onnx", example)
    qmodel = calibrated_ctc(crop_seq_to_multiple=2)
    with pytest.raises(ExportError, match="crop_seq_to_multiple"):
        export_ctc(qmodel, tmp_path / "c.onnx", example)
    with pytest.raises(ExportError, match="S2TTransformerModel as a CTC graph"):
        from qswap.models import build_s2t_transformer
        export_ctc(build_s2t_transformer(), tmp_path / "d.onnx", example)
    assert not any(tmp_path.iterdir())


def test_four_bit_activations_export_onto_their_grids(tmp_path):
    """w4a4 (every activation on a 4-bit grid): the graph's codes are clipped to each grid's 16
    (qswap.export.qdq), and onnxruntime's logits are the fake-quant model's."""
    qmodel = calibrated_ctc("w4a4")
    path = export_ctc(qmodel, tmp_path / "e.onnx", wav2vec2_net_input(2, 4000))
    net = padded(2, 4010, seed=2)
    with torch.no_grad(), simulating(qmodel, "float"):
        ref = qmodel(**net)
    logits, padding = run_ctc(load_session(path), net["source"], net["padding_mask"])
    steps = (logits - ref["encoder_out"]).abs() / qmodel.logits_quant.scale
    steps = steps.masked_select(~padding.T.unsqueeze(-1).expand_as(steps))
    assert steps.max() <= 1.0  # measured: 0 steps
    import onnx
    clips = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Clip"]
    assert len(clips) == sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear") > 20


def test_a_ctc_export_with_an_s2t_data_directory_is_a_typed_error(exported):
    """fairseq's audio_finetuning task reads its dictionary (dict.ltr.txt) only when asked: a data
    directory without one is a DataError, not fairseq's FileNotFoundError."""
    from pathlib import Path

    from qswap.errors import DataError
    from qswap.export.runtime import load_deployed

    qmodel, out = exported
    copy = out.parent / f"{out.name}_task"
    export_model(qmodel, copy, task_cfg={"_name": "audio_finetuning", "data": "/nonexistent", "labels": "ltr"},
                 audit=False)
    s2t_data = Path(qswap.__file__).parent / "assets" / "s2t_demo"
    with pytest.raises(DataError, match="point --data at the folder with the task's config and dictionary"):
        load_deployed(copy, s2t_data)


def test_inputs_the_graph_does_not_take_are_a_typed_error(exported):
    _, out = exported
    session = load_session(out / CTC_GRAPHS["ctc"])
    with pytest.raises(ExportError, match=r"cannot run the exported graph on these inputs \(source float32\[4000\]"):
        run_ctc(session, torch.zeros(4000), torch.zeros(4000, dtype=torch.bool))  # no batch axis


def test_nonfinite_audio_is_a_data_error_as_in_the_model(exported):
    from qswap.errors import DataError

    _, out = exported
    source = torch.randn(2, 4000)
    source[0, 10] = float("nan")
    with pytest.raises(DataError, match="the exported CTC model's input holds NaN or \\+-inf"):
        run_ctc(load_session(out / CTC_GRAPHS["ctc"]), source, torch.zeros(2, 4000, dtype=torch.bool))


def test_an_utterance_shorter_than_the_receptive_field_has_every_frame_masked(exported):
    """In a padded batch, an utterance with no frame (fewer samples than the extractor's receptive
    field): the graph masks all its frames (an empty transcript); fairseq's mask construction, the
    fake-quant model's, wraps its negative index around and masks almost none (the documented
    difference, qswap.export.wav2vec2)."""
    from qswap.nn.fairseq.wav2vec2 import feature_padding_mask, output_lengths

    qmodel, out = exported
    strides = qmodel.w2v_encoder.w2v_model.conv_strides
    net = padded(2, 5000, seed=4)
    net["padding_mask"][1, 5:], net["source"][1, 5:] = True, 0.0
    assert int(output_lengths(strides, torch.tensor([5]))) <= 0
    _, padding = run_ctc(load_session(out / "ctc.onnx"), net["source"], net["padding_mask"])
    assert padding[1].all() and not padding[0].any()  # no frame of it reaches greedy CTC: an empty transcript
    assert feature_padding_mask(strides, net["padding_mask"], padding.shape[1])[1].sum() <= 1
