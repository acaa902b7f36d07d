"""The module each node of an exported graph came from (qswap.export.sites): the export records a
map from the scope paths of torch's node names to the module paths of the quantized model, by
identity of the modules the traced wrapper calls; the deploy audit reads its sites from it. The
wrappers call the model's modules directly (the CTC graph, the encoder-decoder keys and values),
which torch's names do not show."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qswap.export.onnx import trace_to_onnx  # noqa: E402
from qswap.export.onnx_audit import audit_export, audit_onnx  # noqa: E402
from qswap.export.sites import METADATA_KEY, site_in, unqualified  # noqa: E402

from export_testkit import calibrated, calibrated_ctc  # noqa: E402

WEIGHT_ONLY = "w8_weight_only"  # every activation float: the projections' MatMuls stay float nodes


def _sites(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[METADATA_KEY])


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer = nn.Module()
        self.outer.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)])
        self.outer.layer_norm = nn.LayerNorm(4)
        self.inner = nn.Module()
        self.inner.layer_norm = nn.LayerNorm(4)


class _Wrapper(nn.Module):
    """Calls the model's modules past their parents, as the CTC graph does: nested indexed
    children (torch repeats their prefix) and two LayerNorms both named ``layer_norm``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        for block in self.model.outer.blocks:
            x = block(x)
        x = self.model.outer.layer_norm(x)
        return self.model.inner.layer_norm(x.relu())


def test_the_map_names_the_called_modules_by_identity(tmp_path):
    model = _Model()
    wrapper = _Wrapper(model).eval()
    path = trace_to_onnx(wrapper, (torch.randn(3, 4),), tmp_path / "toy.onnx", ("x",), ("y",), {},
                         sites=(model, "net."))
    sites = _sites(path)
    modules = {f"net.{name}" for name, _ in model.named_modules()}
    assert sites and set(sites.values()) <= modules
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert "/blocks.0/blocks.0.0/Gemm" in names  # torch's name: no `outer.`, the prefix repeated
    assert site_in("/blocks.0/blocks.0.0/Gemm", sites) == "net.outer.blocks.0.0"
    assert site_in("/blocks.1/blocks.1.1/LayerNormalization", sites) == "net.outer.blocks.1.1"
    # two modules named layer_norm called from the wrapper: torch numbers the second scope
    assert site_in("/layer_norm/LayerNormalization", sites) == "net.outer.layer_norm"
    assert site_in("/layer_norm_1/LayerNormalization", sites) == "net.inner.layer_norm"
    assert site_in("/Relu", sites) == "" and site_in("Gelu_token_3", sites) == ""


def test_site_in_takes_the_longest_scope_path_of_a_fused_nodes_name():
    sites = {"a": "m.a", "a/b": "m.a.b"}
    assert site_in("/a/b/MatMul/MatmulTransposeFusion//MatMulScaleFusion/", sites) == "m.a.b"
    assert site_in("/a/c/Softmax", sites) == "m.a"
    assert site_in("/z/Softmax", sites) == ""
    assert unqualified("model.encoder.layers.0") == "layers.0"
    assert unqualified("model.conv_layers.0.2") == "conv_layers.0.2"
    assert unqualified("") == ""


@pytest.mark.parametrize("recipe", ["w8a8", WEIGHT_ONLY])
def test_every_site_of_a_ctc_export_is_a_module_of_the_quantized_model(recipe, tmp_path):
    from qswap.export.package import export_model

    torch.set_num_threads(1)
    qmodel = calibrated_ctc(recipe)
    export_model(qmodel, tmp_path / "ctc", audit=False, allow_float=recipe == WEIGHT_ONLY)
    modules = dict(qmodel.named_modules())
    (graph,) = audit_export(tmp_path / "ctc").graphs
    named = [n for n in graph.float_nodes if n.site]
    assert named and [n.site for n in named if n.site not in modules] == []
    sites = {n.site for n in named}
    assert {"w2v_encoder.w2v_model.layer_norm", "w2v_encoder.w2v_model.encoder.layer_norm",
            "w2v_encoder.w2v_model.encoder.layers.0.self_attn.core"} <= sites
    if recipe == WEIGHT_ONLY:
        assert {"w2v_encoder.w2v_model.feature_extractor.conv_layers.0.0", "w2v_encoder.proj",
                "w2v_encoder.w2v_model.encoder.layers.1.self_attn.k_proj"} <= sites
    # onnxruntime's own fused nodes (Gelu_token_...) and the wrapper's adds name no module
    assert len(named) >= len(graph.float_nodes) - 8


def test_every_site_of_a_cross_kv_graph_with_float_projections_is_a_module(tmp_path):
    from qswap.export.decoder_step import export_cross_kv
    from qswap.models import build_s2t_transformer, s2t_net_input

    torch.set_num_threads(1)
    qmodel = calibrated(build_s2t_transformer(), WEIGHT_ONLY)
    with torch.no_grad():
        encoded = qmodel.encoder(**{k: v for k, v in s2t_net_input().items() if k.startswith("src_")})
    path = export_cross_kv(qmodel, tmp_path / "cross_kv.onnx", encoded["encoder_out"][0], allow_float=True)
    report = audit_onnx(path, site_prefix="decoder.", level="all")
    modules = dict(qmodel.named_modules())
    assert report.float_nodes and all(n.site in modules for n in report.float_nodes)
    assert {n.site for n in report.float_nodes} == {f"decoder.layers.{i}.encoder_attn.{p}_proj"
                                                    for i in range(len(qmodel.decoder.layers)) for p in "kv"}


def test_a_graph_without_the_map_audits_with_the_prefix_read_from_node_names(qmodel, tmp_path):
    """A graph written before the export recorded the map: the module path read from each node's
    name, after the prefix the caller gives (the encoder's names show its full paths)."""
    from qswap.export import export_encoder
    from qswap.models import s2t_net_input

    path = export_encoder(qmodel, tmp_path / "encoder.onnx", s2t_net_input())
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    old = tmp_path / "old.onnx"
    onnx.save(graph, str(old))
    with_map, without = audit_onnx(path, site_prefix="encoder."), audit_onnx(old, site_prefix="encoder.")
    assert [n.site for n in without.float_nodes] == [n.site for n in with_map.float_nodes]
    assert "encoder.transformer_layers.0.self_attn.core" in {n.site for n in without.float_nodes}


def test_every_quantizer_of_a_step_graph_has_its_site_the_wrappers_own_calls_too(tmp_path):
    """The step wrapper calls the model's ``logits_quant`` as its own attribute: the stand-in the
    trace sees is at the model's path too, so the map names it (it named no site: the model still
    held the quantizer the stand-in replaced)."""
    from qswap.models import build_s2t_transformer
    from export_testkit import exported_step

    torch.set_num_threads(1)
    qmodel = calibrated(build_s2t_transformer())
    _, path = exported_step(qmodel, tmp_path, 2)
    sites = _sites(path)
    modules = dict(qmodel.named_modules())
    assert sites.get("logits_quant") == "logits_quant" and set(sites.values()) <= set(modules)
    quantizers = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and [n for n in quantizers if site_in(n, sites) not in modules] == []
