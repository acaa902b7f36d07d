"""Deploy honesty of an exported encoder: onnxruntime's CPU-optimized graph, every float node
listed with the qswap module it came from, the integer kernels counted."""
import json

import pytest
from qswap.errors import ExportError
from qswap.models import s2t_net_input

pytest.importorskip("fairseq")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qswap.export import export_encoder  # noqa: E402
from qswap.export.onnx_audit import audit_onnx, site_of  # noqa: E402


@pytest.fixture(scope="module")
def exported(qmodel, tmp_path_factory):
    path = export_encoder(qmodel, tmp_path_factory.mktemp("onnx") / "encoder.onnx", s2t_net_input())
    return qmodel, path


@pytest.fixture(scope="module")
def report(exported):
    return audit_onnx(exported[1], site_prefix="encoder.")


def test_buckets_cover_every_node_of_the_optimized_graph(report):
    assert sum(report.buckets.values()) == report.nodes
    assert report.buckets["float"] == report.float_count


def test_integer_kernels_are_counted(report):
    # onnxruntime fuses the QDQ convs into QLinearConv, the q/k/v/out projections, fc1 and fc2
    # with their int32 biases into QGemm (graph_passes.linear_as_gemm; 2 layers): uint8 activation
    # codes let it take the shared input quantizer of q, k and v
    assert report.integer_ops.get("QLinearConv") == 2
    assert report.integer_ops.get("QGemm") == 12
    # probs @ v and q @ k^T (once the constant `* scaling` is folded into q's DequantizeLinear
    # scale) into MatMulIntegerToFloat or, quantized right after, QLinearMatMul
    assert report.integer_ops.get("MatMulIntegerToFloat", 0) + report.integer_ops.get("QLinearMatMul", 0) == 4
    # the residual adds of two quantized operands onto the next grid, and the positions added to
    # the scaled features (the table's rows dequantized after their Gather: gather_codes)
    assert report.integer_ops.get("QLinearAdd") == 5
    assert report.integer_count == sum(report.integer_ops.values())


def test_float_nodes_name_existing_qswap_sites(exported, report):
    modules = dict(exported[0].named_modules())
    assert report.float_nodes  # LayerNorm and Softmax have no integer kernel in onnxruntime
    assert {"LayerNormalization", "Softmax"} <= set(report.float_ops)
    named = [n for n in report.float_nodes if n.site]
    assert len(named) >= len(report.float_nodes) - 4  # the encoder's own scale-and-add has no module
    assert all(n.site in modules for n in named)
    assert "encoder.transformer_layers.0.self_attn.core" in {n.site for n in named}


def test_a_claim_of_honest_with_float_nodes_is_reported(exported):
    report = audit_onnx(exported[1], site_prefix="encoder.", claims_honest=True)
    assert report.verdict == f"claims honest, deploys {report.float_count} float nodes"


def test_report_renders_as_json_and_markdown(report):
    data = json.loads(report.to_json())
    assert data["float_count"] == report.float_count and data["integer_count"] == report.integer_count
    assert len(data["float_nodes"]) == report.float_count
    md = report.to_markdown(max_rows=3)
    assert f"**{report.verdict}**" in md and f"{report.float_count - 3} more" in md


def test_levels_all_and_basic_are_audited_too(exported):
    basic, full = (audit_onnx(exported[1], level=level) for level in ("basic", "all"))
    assert basic.integer_count == 0  # QDQ fusions are onnxruntime's "extended" optimizations
    assert full.integer_count >= 8


def test_site_of_reads_the_module_path_of_torch_node_names():
    assert site_of("/transformer_layers.0/self_attn/core/MatMul/MatMulScaleFusion/", "encoder.") == \
        "encoder.transformer_layers.0.self_attn.core"
    assert site_of("/Add") == ""
    assert site_of("MatMul_token_12") == ""


def test_missing_graph_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match="no ONNX graph there"):
        audit_onnx(tmp_path / "absent.onnx")


def test_the_padding_mask_added_to_the_scores_is_a_selection(exported, report):
    """The encoder's attention masks padded keys with ``scores + Where(mask, -inf, 0)``
    (``qswap.nn.attention.padding_bias``): each score kept or set to -inf, counted with the data
    movement; the softmax after it stays a float node."""
    graph = onnx.load(str(exported[1])).graph
    producer = {out: n for n in graph.node for out in n.output}
    softmax_inputs = [producer[n.input[0]].op_type for n in graph.node if n.op_type == "Softmax"]
    assert softmax_inputs == ["Add", "Add"]  # 2 layers; no Where on the scores
    float_sites = [n.site for n in report.float_nodes if n.op_type == "Add"]
    assert not any(site.endswith("self_attn.core") for site in float_sites)
    assert report.float_ops.get("Softmax") == 2  # 2 layers


@pytest.mark.parametrize("branches, selection", [((float("-inf"), 0.0), True), ((0.0, float("-inf")), False),
                                                  ((-1e9, 0.0), False)])
def test_only_an_add_of_minus_inf_or_zero_is_a_selection(tmp_path, branches, selection):
    """``Add(x, Where(m, -inf, 0))`` keeps each value or sets it to -inf; a finite fill (-1e9
    moves values: a float sum) or the branches the other way round are float adds."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(b, np.float32), name) for b, name in zip(branches, ("a", "b"))]
    nodes = [helper.make_node("Where", ["m", "a", "b"], ["bias"], name="/core/Where"),
             helper.make_node("Add", ["x", "bias"], ["y"], name="/core/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    path = tmp_path / "mask.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    audited = audit_onnx(path, level="all")
    assert (audited.float_ops.get("Add", 0) == 0) is selection
    assert audited.buckets["movement"] >= (2 if selection else 1)
