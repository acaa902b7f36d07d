"""The conformer's ONNX export (qswap.export.encoders): fairseq's registered s2t_conformer with
each of its position encodings (abs, rel_pos, rope) exports its encoder, onnxruntime computes
what the fake-quant encoder computes on padded batches (in grid steps), the transformer's
cross_kv / decoder_step graphs decode its decoder, the deploy audit names its sites, and the
float export beam-searches to fairseq's own transcripts."""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

import qswap
from qswap.models import build_s2t_conformer

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from qswap.cli import main  # noqa: E402
from qswap.export import load_session  # noqa: E402
from qswap.export.agreement import agreement  # noqa: E402
from qswap.export.onnx_audit import audit_export  # noqa: E402
from qswap.export.package import GRAPHS, NO_QUANT, export_model  # noqa: E402
from qswap.export.runtime import load_exported  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402
from qswap.integration.decode import decode  # noqa: E402

from export_testkit import calibrated, encoder_feeds, output_steps, padded_batch, quantizer_inputs  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"
POSITIONS = ["abs", "rel_pos", "rope"]


@pytest.fixture(scope="module", params=POSITIONS)
def exported(request, tmp_path_factory):
    """A calibrated w8a8 s2t_conformer with ``pos_enc_type`` = the param, and its export directory."""
    torch.set_num_threads(1)
    qmodel = calibrated(build_s2t_conformer(pos_enc_type=request.param))
    out = tmp_path_factory.mktemp(f"conformer_{request.param}")
    export_model(qmodel, out)
    return qmodel, out


@pytest.mark.parametrize("batch,frames", [(3, 90), (1, 40), (4, 64)])
def test_onnxruntime_matches_the_fake_quant_conformer_encoder(exported, batch, frames):
    qmodel, out = exported
    steps, padding, ref_padding = output_steps(qmodel, load_session(out / GRAPHS["encoder"]),
                                               padded_batch(batch, frames, seed=batch))
    if batch > 1:
        assert padding.any() and torch.equal(padding, ref_padding[0])
        steps = steps.masked_select(~padding.T.unsqueeze(-1).expand_as(steps))  # padded frames: unread
    else:
        assert not padding.any() and ref_padding == []
    # measured: at most 1.2 steps (rope, one rounding flip), mean below 0.03 step
    assert steps.max() <= 4.0
    assert steps.mean() < 0.1


def test_every_graph_of_the_export_agrees_with_the_fake_quant_model(exported):
    qmodel, out = exported
    net = padded_batch(2, 80, seed=5)
    found = agreement(qmodel, out, net, net["prev_output_tokens"])
    assert found["padding_mask_equal"]
    assert found["cross_kv"]["max"] <= 1.0 and found["decoder_step"]["mean"] < 1.0
    assert found["encoder"]["max"] <= 4.0  # measured below 0.001 step


@pytest.mark.parametrize("pos_enc_type", ["rel_pos", "rope"])
def test_four_bit_activations_of_the_conformer_agree_in_every_graph(tmp_path, pos_enc_type):
    """w4a4: every activation code clipped to its 4-bit grid (qswap.export.qdq), the depthwise
    convolution, GLU and position terms included."""
    qmodel = calibrated(build_s2t_conformer(pos_enc_type=pos_enc_type), "w4a4")
    export_model(qmodel, tmp_path)
    net = padded_batch(2, 80, seed=5)
    found = agreement(qmodel, tmp_path, net, net["prev_output_tokens"])
    assert found["padding_mask_equal"]
    # measured: below 2e-6 step (encoder), 0 (cross_kv, decoder_step)
    assert max(found[g]["max"] for g in ("encoder", "cross_kv", "decoder_step")) <= 1.0


def test_no_quantizer_of_the_conformer_sees_infinity_with_padding(exported):
    _, out = exported
    values, input_types = quantizer_inputs(out / GRAPHS["encoder"], encoder_feeds(padded_batch(3, 80, seed=7)))
    assert len(values) >= 40 and all(np.isfinite(v).all() for v in values)
    assert input_types == [1, 7]  # float features, int64 lengths


def test_deploy_audit_names_the_conformer_sites(exported):
    _, out = exported
    report = audit_export(out)
    assert [g.graph for g in report.graphs] == list(GRAPHS.values())
    assert report.integer_count > 0 and report.claims_honest is not None
    sites = {n.site for g in report.graphs for n in g.float_nodes}
    assert any(s.startswith("encoder.conformer_layers.0.") for s in sites)
    assert any(s.startswith("decoder.layers.") for s in sites)
    # the modules a conformer layer runs through its feed-forward and convolution blocks (which it
    # calls itself, not through their containers' __call__): each node is its leaf's, not the layer's
    assert {"encoder.conformer_layers.0.ffn1.layer_norm", "encoder.conformer_layers.0.conv_module.glu",
            "encoder.conformer_layers.0.ffn2.layer_norm"} <= sites
    assert "encoder.conformer_layers.0" not in {n.site for n in report.graphs[0].float_nodes
                                                if n.op_type in ("LayerNormalization", "Sigmoid")}


W8A8 = {"version": 1, "defaults": {"weight": {"bits": 8},
                                   "activation": {"bits": 8, "symmetric": False, "observer": "minmax"}}}


def test_a_float_input_of_a_quantized_weight_deploys_as_the_fake_quant_model(tmp_path):
    """A weight-quantized linear whose input the recipe leaves float: onnxruntime fuses its weight's
    DequantizeLinear and the MatMul into MatMulNBits, whose default accuracy level quantized the
    float input to int8 at run time (up to 8 steps off at the encoder output, a mean of 0.8)."""
    recipe = {**W8A8, "name": "ffn1_input_float", "rules": [{"match": {"path": "re:.*layers\\.0\\.ffn1.*"},
                                                            "activation": None}]}
    qmodel = calibrated(build_s2t_conformer(), recipe)
    export_model(qmodel, tmp_path)
    ops = {n.op_type for g in audit_export(tmp_path).graphs for n in g.float_nodes}
    assert "MatMulNBits" in ops  # the fusion the session options are about
    net = padded_batch(3, 90, seed=3)
    steps, padding, _ = output_steps(qmodel, load_session(tmp_path / GRAPHS["encoder"]), net)
    steps = steps.masked_select(~padding.T.unsqueeze(-1).expand_as(steps))
    assert steps.max() <= 4.0 and steps.mean() < 0.1  # measured: 0 steps


def test_a_convolution_input_on_a_grid_per_channel_is_refused_at_export(tmp_path):
    """onnxruntime fuses it into a QLinearConv, which takes one input scale: the graph had been
    written, loaded, audited, and failed at every run with an error about the inputs."""
    from qswap.errors import ExportError

    recipe = {**W8A8, "name": "conv_input_per_channel", "rules": [
        {"match": {"class": ["Conv1d"]},
         "activation": {"bits": 8, "symmetric": False, "observer": "minmax", "granularity": "per_channel",
                        "axis": 1}}]}
    qmodel = calibrated(build_s2t_conformer(), recipe)
    with pytest.raises(ExportError, match="convolution's input is on a grid per channel.*QLinearConv.*per tensor"):
        export_model(qmodel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_power_of_two_activation_grids_are_warned_at_export(tmp_path):
    """onnxruntime's QLinearAdd does not round ties half to even; with power-of-two scales the
    residual adds' sums are often ties (docs/deploy.md)."""
    from qswap.errors import QswapWarning

    recipe = {"version": 1, "name": "a8_pow2", "defaults": {
        "weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False, "observer": "minmax",
                                              "scale_type": "pow2"}}}
    qmodel = calibrated(build_s2t_conformer(), recipe)
    with pytest.warns(QswapWarning, match=r"activation grid\(s\) have power-of-two scales.*QLinearAdd"):
        export_model(qmodel, tmp_path)


@pytest.fixture(scope="module")
def asset():
    return fdata.load_model_cfg_task(ASSET / "checkpoint.pt", ASSET)[1:]


@pytest.mark.parametrize("pos_enc_type", POSITIONS)
def test_float_export_beam_search_gives_fairseqs_conformer_transcripts(asset, tmp_path, pos_enc_type):
    cfg, task = asset
    model = build_s2t_conformer(task.target_dictionary, pos_enc_type=pos_enc_type, seed=1)
    export_model(qswap.convert(model, NO_QUANT), tmp_path, task_cfg=cfg.task, audit=False, allow_float=True)
    samples = list(itertools.islice(fdata.batches(task, "test", max_sentences=4), 2))  # padded batches
    ours = decode(task, load_exported(tmp_path, task.target_dictionary), samples, beam=3, max_len_b=12)
    fairseq = decode(task, model, samples, beam=3, max_len_b=12)
    assert len(ours.utterances) == 8
    assert [u.hyp for u in ours.utterances] == [u.hyp for u in fairseq.utterances]


def test_eval_with_onnxruntime_decodes_a_conformer_export(asset, tmp_path, capsys):
    cfg, task = asset
    qmodel = calibrated(build_s2t_conformer(task.target_dictionary))
    export_model(qmodel, tmp_path, task_cfg=cfg.task)
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime", "--data", str(ASSET), "--subset",
                 "train_calib", "--beam", "2"]) == 0
    assert "w8a8 (onnxruntime): 32 utterances of train_calib: WER" in capsys.readouterr().out


def test_a_conv2d_subsampler_is_a_typed_error(tmp_path):
    from qswap.errors import ExportError
    from qswap.export import export_encoder
    from qswap.models import s2t_net_input

    qmodel = calibrated(build_s2t_conformer(conv_version="convtransformer", conv_out_channels=64, input_channels=1))
    with pytest.raises(ExportError, match="Conv2dSubsampler subsampler is not supported"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert not (tmp_path / "e.onnx").exists()
    # the whole export ('qswap export --onnx'), which reads the subsampler for its example input
    # first (an AttributeError there)
    with pytest.raises(ExportError, match="Conv2dSubsampler subsampler is not supported"):
        export_model(qmodel, tmp_path / "new" / "deploy", audit=False)
    assert not (tmp_path / "new").exists()
    unconverted = calibrated(build_s2t_conformer())
    unconverted.encoder = build_s2t_conformer().encoder  # fairseq's own encoder, never converted
    with pytest.raises(ExportError, match="encoder is fairseq's float S2TConformerEncoder, not qswap's conversion"):
        export_model(unconverted, tmp_path / "deploy", audit=False)


def test_an_input_longer_than_the_rotary_table_is_a_typed_error(tmp_path):
    """The rope graph holds its tables for ROPE_POSITIONS subsampled frames (4x subsampling here)."""
    from qswap.errors import ExportError
    from qswap.export import export_encoder, run_encoder
    from qswap.models import s2t_net_input
    from qswap.nn.fairseq.espnet import ROPE_POSITIONS

    qmodel = calibrated(build_s2t_conformer(pos_enc_type="rope"))
    session = load_session(export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input()))
    net = s2t_net_input(1, 4 * ROPE_POSITIONS)
    assert run_encoder(session, net["src_tokens"], net["src_lengths"])[0].shape[0] == ROPE_POSITIONS
    net = s2t_net_input(1, 4 * ROPE_POSITIONS + 8)
    with pytest.raises(ExportError, match="onnxruntime cannot run the exported graph on these inputs"):
        run_encoder(session, net["src_tokens"], net["src_lengths"])
