"""tools/onnx_sites.py: every activation site of an exported graph against the fake-quant model
(small real fairseq s2t_transformer, w8a8). The step graph as exported gives the fake-quant codes
at every site under onnxruntime's optimizations; exported without ``quantize_by_inverse`` (ONNX's
``x / s`` quantizers, the softmaxes fused into QLinearSoftmax) its sites differ."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qswap.export.decoder_step import export_decoder_step  # noqa: E402
from qswap.export.onnx import export_encoder  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "export"))
sys.path.insert(0, str(REPO / "tools"))
import onnx_sites  # noqa: E402
from export_testkit import calibrated, exported_step  # noqa: E402

TOKENS = torch.tensor([[2, 5, 9, 11, 7, 4, 8, 8], [2, 6, 6, 30, 8, 9, 3, 12]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qswap.models import build_s2t_transformer

    torch.set_num_threads(1)
    qmodel = calibrated(build_s2t_transformer())
    encoder_out, path = exported_step(qmodel, tmp_path_factory.mktemp("onnx"), 2)
    return qmodel, encoder_out, path


def test_step_graph_gives_the_fake_quant_codes_at_every_site(setup):
    qmodel, encoder_out, path = setup
    table = onnx_sites.decoder_step_table(qmodel, path, encoder_out, TOKENS, "all")
    layers = len(qmodel.decoder.layers)
    assert len(table.sites) >= 20 * layers and all(s.codes > 0 for s in table.sites)
    names = [s.name for s in table.sites]
    assert "logits_quant" in names  # called by the step wrapper, at the model's path (the site map)
    # the self-attention cache quantizers (their codes go into the caches: graph_passes.code_caches)
    # run inside the attention, named after it in the graph's node names: the graph's site map
    # (qswap.export.sites) names their modules, the fake-quant sites compared with
    assert table.missing == []
    assert all(f"decoder.layers.{i}.self_attn.core.{k}_quant" in names for i in range(layers) for k in "kv")
    assert table.first_beyond(1.0) is None
    assert sum(s.different for s in table.sites) <= 2  # measured: 0 (near-ties of the integer kernels)


def test_the_export_without_quantize_by_inverse_differs(setup, tmp_path, monkeypatch):
    import qswap.export.onnx as export_onnx

    qmodel, encoder_out, _ = setup
    monkeypatch.setattr(export_onnx, "quantize_by_inverse", lambda model: 0)  # the export before the pass
    path = export_decoder_step(qmodel, tmp_path / "decoder_step.onnx", encoder_out["encoder_out"][0],
                               encoder_out["encoder_padding_mask"][0])
    table = onnx_sites.decoder_step_table(qmodel, path, encoder_out, TOKENS, "all")
    assert sum(s.different for s in table.sites) > 2


def test_encoder_sites_in_node_order(setup, tmp_path):
    qmodel, _, _ = setup
    net = s2t_net_input(1, 64, seed=7)
    path = export_encoder(qmodel, tmp_path / "encoder.onnx", net)
    table = onnx_sites.encoder_table(qmodel, path, net, "disabled")
    assert table.sites[0].name == "encoder.subsample.conv_layers.0.input_quant"
    assert not table.missing and table.first_beyond(1.0) is None
    assert "first site more than one step away: none" in table.render("title")


def test_four_bit_sites_read_their_clipped_codes(tmp_path):
    """w4a4: each site's codes are the Clip's after its QuantizeLinear (qswap.export.qdq), every
    site is found and gives the fake-quant codes."""
    from qswap.models import build_s2t_transformer

    qmodel = calibrated(build_s2t_transformer(), "w4a4")
    net = s2t_net_input(1, 64, seed=7)
    path = export_encoder(qmodel, tmp_path / "encoder.onnx", net)
    clips = {n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Clip"}
    assert {codes for _, codes, _ in onnx_sites.graph_sites(path)} == clips
    table = onnx_sites.encoder_table(qmodel, path, net, "all")
    assert len(table.sites) >= 30 and not table.missing
    assert table.first_beyond(1.0) is None and sum(s.different for s in table.sites) == 0  # measured: 0
