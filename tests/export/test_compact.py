"""qswap.export.compact: the compacted encoder graph (s2t_transformer; s2t_conformer with rel_pos)
computes exactly what torch's traced graph computes (onnxruntime, every optimization level, the same integer and float node counts), in
fewer bytes; 4-bit weight codes are stored as INT4 / UINT4 (per-channel and per-tensor grids),
each equal to the traced graph's int8 codes."""
import logging

import numpy as np
import pytest

from qswap.errors import ExportError
from qswap.models import build_s2t_conformer, build_s2t_transformer, s2t_net_input

pytest.importorskip("fairseq")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qswap.export import export_encoder, load_session  # noqa: E402
from qswap.export.compact import pack_int4  # noqa: E402
from qswap.export.onnx import OUTPUTS, run_graph  # noqa: E402
from qswap.export.onnx_audit import audit_onnx  # noqa: E402

from export_testkit import calibrated, encoder_feeds, padded_batch  # noqa: E402

# 4-bit weights on a per-tensor asymmetric grid (uint8 codes, nonzero zero points: UINT4)
PER_TENSOR_W4 = """version: 1
name: w4_per_tensor_asym
defaults:
  weight: {bits: 4, signed: false, symmetric: false, granularity: per_tensor, observer: minmax}
  activation: {bits: 8, symmetric: false, granularity: per_tensor, observer: moving_average}
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, qmodel):
    """Per recipe: (qmodel, traced graph path, compacted graph path)."""
    root = tmp_path_factory.mktemp("compact")
    (root / "w4pt.yaml").write_text(PER_TENSOR_W4)
    models = {"w8a8": qmodel, "w4a8": calibrated(build_s2t_transformer(), "w4a8"),
              "w4_per_tensor": calibrated(build_s2t_transformer(), str(root / "w4pt.yaml")),
              "w4a8_conformer_rel_pos": calibrated(build_s2t_conformer(pos_enc_type="rel_pos"), "w4a8")}
    out = {}
    for name, model in models.items():
        plain = export_encoder(model, root / f"{name}.plain.onnx", s2t_net_input(), compact=False)
        small = export_encoder(model, root / f"{name}.onnx", s2t_net_input())
        out[name] = (model, plain, small)
    return out


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4_per_tensor", "w4a8_conformer_rel_pos"])
@pytest.mark.parametrize("level", ["disabled", "all"])
def test_compacted_graph_computes_what_the_traced_graph_computes(exports, recipe, level):
    _, plain, small = exports[recipe]
    feeds = {k: v.numpy() for k, v in encoder_feeds(padded_batch(3, 90, seed=5)).items()}
    expected = run_graph(load_session(plain, level=level), list(OUTPUTS), feeds)
    got = run_graph(load_session(small, level=level), list(OUTPUTS), feeds)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4_per_tensor", "w4a8_conformer_rel_pos"])
def test_compacted_graph_runs_the_same_integer_kernels_in_fewer_bytes(exports, recipe):
    _, plain, small = exports[recipe]
    before, after = audit_onnx(plain, level="all"), audit_onnx(small, level="all")
    assert (after.integer_count, after.float_count) == (before.integer_count, before.float_count)
    assert after.integer_count > 0
    assert [n.site for n in after.float_nodes] == [n.site for n in before.float_nodes]  # sites kept
    ratio = small.stat().st_size / plain.stat().st_size
    assert ratio < {"w8a8": 0.97, "w4a8_conformer_rel_pos": 0.97}.get(recipe, 0.6)  # rel_pos: a float table


@pytest.mark.parametrize("recipe,packed_type,int_type", [("w4a8", TensorProto.INT4, TensorProto.INT8),
                                                         ("w4_per_tensor", TensorProto.UINT4, TensorProto.UINT8)])
def test_four_bit_weights_are_stored_as_int4_equal_to_the_traced_codes(exports, recipe, packed_type, int_type):
    qmodel, plain, small = exports[recipe]
    traced = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    model = onnx.load(str(small))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    packed = [t for t in model.graph.initializer if t.data_type == packed_type]
    four_bit = {f"encoder.{n}.codes" for n, m in qmodel.encoder.named_modules()
                if getattr(m, "kind", None) == "weight" and m.enabled and m.spec.bits == 4}
    # every 4-bit weight's codes the traced graph holds (equal codes share one initializer), nothing else
    assert sorted(t.name.rsplit(".", 1)[0] for t in packed) == sorted(four_bit & traced.keys())
    assert len(packed) >= 15
    assert all(len(t.raw_data) == (int(np.prod(t.dims)) + 1) // 2 for t in packed)  # two codes a byte
    casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for tensor in packed:
        original = tensor.name.rsplit(".", 1)[0]  # "<site>.codes.int4" -> "<site>.codes"
        codes = numpy_helper.to_array(tensor)
        assert np.array_equal(codes.astype(traced[original].dtype), traced[original])
        assert casts[tensor.name].attribute[0].i == int_type and casts[tensor.name].output[0] == original
    assert not any(t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) == 2
                   for t in model.graph.initializer)  # no int8 copy of a packed weight


def test_eight_bit_graph_keeps_its_opset_and_int8_codes(exports):
    _, _, small = exports["w8a8"]
    model = onnx.load(str(small))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer)


def test_codes_outside_four_bits_are_a_typed_error():
    codes = numpy_helper.from_array(np.array([[-9, 3], [0, 7]], np.int8), "w.codes")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "w.scale")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w.codes", "w.scale"], ["y"], name="dq")],
                              "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                              [codes, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match=r"w\.codes: codes outside \[-8, 7\]"):
        pack_int4(model, {"w.codes"})


def test_onnxruntime_does_not_fuse_an_int4_dequantize_which_is_why_a_cast_feeds_it(exports, tmp_path):
    """The same graph with each DequantizeLinear reading the INT4 codes (and INT4 zero points)
    directly: onnxruntime 1.32 runs it, with fewer integer nodes (its matmuls run in float). If
    this starts failing, onnxruntime fuses INT4 weights and the Cast can go."""
    _, _, small = exports["w4a8"]
    model = onnx.load(str(small))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    casts = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.input[0] in initializers
             and initializers[n.input[0]].data_type == TensorProto.INT4}
    for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in casts]:
        node.input[0] = casts[node.input[0]].input[0]
        if len(node.input) > 2:  # a zero point of the input's type
            zero = numpy_helper.to_array(initializers[node.input[2]])
            graph.initializer.append(numpy_helper.from_array(zero.astype(np.int8).astype(
                numpy_helper.to_array(initializers[node.input[0]]).dtype), f"{node.name}/zero_point_int4"))
            node.input[2] = f"{node.name}/zero_point_int4"
    for cast in casts.values():
        graph.node.remove(cast)
    direct = tmp_path / "direct_int4.onnx"
    onnx.save(model, str(direct))
    feeds = {k: v.numpy() for k, v in encoder_feeds(padded_batch(2, 60, seed=3)).items()}
    assert run_graph(load_session(direct, level="all"), list(OUTPUTS), feeds)[0].shape[1] == 2  # it runs
    assert audit_onnx(direct, level="all").integer_count < audit_onnx(small, level="all").integer_count


def test_a_packed_graph_onnxruntime_cannot_optimize_keeps_its_int8_codes(tmp_path, caplog):
    """w8a8 with the hadamard transform's 2-bit +-1 matrix: packing that matrix as INT4 needs
    opset 21, where onnxruntime 1.32's QDQ propagation breaks the int8 position table's rows
    (dequantized after their Gather, then reshaped) with a QuantizeLinear whose type and zero
    point disagree, and the graph would not load. The exporter then keeps every code int8 at
    opset 17 and says so in qswap's log: the graph loads and computes the traced graph's values (a
    w4a8 graph, which loads packed, stays packed:
    ``test_four_bit_weights_are_stored_as_int4_equal_to_the_traced_codes``)."""
    import qswap
    recipe = qswap.load_recipe("w8a8").to_dict()
    recipe.update(name="w8a8_hadamard", transforms=[{"hadamard": {"block": 16}}], rules=[
        *recipe.get("rules", []),
        {"match": {"class": "Hadamard"}, "weight": {"bits": 2, "granularity": "per_tensor", "axis": None}}])
    model = build_s2t_transformer(encoder_normalize_before=True, decoder_normalize_before=True)
    qmodel = calibrated(model, recipe)
    net = s2t_net_input(2, 60, seed=7)
    with caplog.at_level(logging.INFO, logger="qswap"):
        path = export_encoder(qmodel, tmp_path / "encoder.onnx", net)
    assert "4-bit weight codes kept as int8" in caplog.text and "output_dtype" in caplog.text
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert not any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in graph.graph.initializer)
    traced = export_encoder(qmodel, tmp_path / "traced.onnx", net, compact=False)  # torch's graph as traced
    feeds = {k: v.numpy() for k, v in encoder_feeds(padded_batch(3, 90, seed=5)).items()}
    out, reference = (run_graph(load_session(p, level="all"), list(OUTPUTS), feeds) for p in (path, traced))
    assert all(np.array_equal(a, b) for a, b in zip(out, reference))
    assert qmodel.encoder.transformer_layers[0].fc2.rotate.matrix_quant.spec.bits == 2


def test_two_bit_weights_export_as_int8_codes_onnxruntime_runs(tmp_path):
    """2-bit weights (codes -2..1) with 8-bit activations: the graph loads with every
    optimization and computes what torch's traced graph computes."""
    recipe = {"version": 1, "name": "w2a8", "defaults": {"weight": {"bits": 2}, "activation": {"bits": 8, "symmetric": False}}}
    qmodel = calibrated(build_s2t_transformer(), recipe)
    net = s2t_net_input(2, 60, seed=7)
    path = export_encoder(qmodel, tmp_path / "encoder.onnx", net)
    traced = export_encoder(qmodel, tmp_path / "traced.onnx", net, compact=False)
    feeds = {k: v.numpy() for k, v in encoder_feeds(padded_batch(3, 90, seed=5)).items()}
    out, reference = (run_graph(load_session(p, level="all"), list(OUTPUTS), feeds) for p in (path, traced))
    assert all(np.array_equal(a, b) for a, b in zip(out, reference))
