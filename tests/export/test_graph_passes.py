"""fold_constant_scales: DequantizeLinear * positive scalar -> DequantizeLinear with the scale
times it (values to float32 rounding), and nothing else folded. quantize_by_inverse: every
QuantizeLinear that reads another grid gives torch's fake-quant codes bit for bit (``x * (1 / s)``
or a divisor that rounds the same on every grid value, not ONNX's ``x / s``), a Q/DQ-wrapped
Softmax stays float (not onnxruntime's QLinearSoftmax), and a quantizer of a computed value (a
group onnxruntime fuses into an integer kernel, a graph input) is left dividing.
shapes_of_codes, gather_codes, linear_as_gemm: the same values, fewer float passes. code_caches:
a cache of codes concatenated as codes and handed out as codes, the same values, its matmul on
integers. relu_lookups: the FFN's requantization through its ReLU as one table of codes, the
fake-quant codes bit for bit."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qswap.export.graph_passes import (UNIT_SCALE, code_caches, fold_constant_scales,  # noqa: E402
                                      gather_codes, integer_entry, linear_as_gemm, quantize_by_inverse,
                                      relu_lookups, shapes_of_codes)
from qswap.export.onnx import load_session  # noqa: E402


def graph(c: float, extra_reader: bool = False):
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
             helper.make_node("Mul", ["x", "c"], ["y"], name="mul")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None]))
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.uint8), "z"),
             numpy_helper.from_array(np.array(c, np.float32), "c")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8, [None])], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run(model, q):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"q": q})[0]


def test_positive_scalar_is_folded_into_the_scale():
    model = graph(0.25)
    q = np.arange(256, dtype=np.uint8)
    before = run(model, q)
    assert fold_constant_scales(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear"]
    np.testing.assert_allclose(run(model, q), before, rtol=2 ** -23, atol=0)


def test_a_folded_graph_output_that_other_nodes_read_keeps_its_readers():
    """The Mul's output is a graph output and a Relu reads it too: after the fold the
    DequantizeLinear writes that name, which both still read."""
    model = graph(0.25)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None]))
    q = np.arange(256, dtype=np.uint8)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y", "r"], {"q": q})
    assert fold_constant_scales(model) == 1
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y", "r"], {"q": q})
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("c,extra_reader", [(-0.5, False), (0.25, True)])
def test_negative_scalars_and_shared_dequantize_are_left(c, extra_reader):
    model = graph(c, extra_reader)
    assert fold_constant_scales(model) == 0
    assert "Mul" in [n.op_type for n in model.graph.node]


def qdq(name, x, s, z):
    return [helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"], name=f"{name}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [name], name=f"{name}/DequantizeLinear")]


def scalar(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype), name)


def one_input_model(nodes, inits, width):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def softmax_graph(keys: int):
    """x -> Q/DQ (a signed 8-bit grid as uint8 codes) -> Softmax -> Q/DQ (unsigned, zero point 0),
    the decoder step's self-attention without a padding mask."""
    nodes = qdq("scores", "x", "s_in", "z_in") + [helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm")]
    nodes += qdq("y", "p", "s_out", "z_out")
    inits = [scalar("s_in", 0.0777, np.float32), scalar("z_in", 102, np.uint8),
             scalar("s_out", 1 / 255, np.float32), scalar("z_out", 0, np.uint8)]
    return one_input_model(nodes, inits, keys)


# (s_a, z_a, s_b): fc2.input_quant reading ffn_act_quant, a grid 85/38 times finer (every 38th
# code of the first on a rounding tie of the second; a divisor a few ulps from s_b rounds them
# as x * (1 / s_b) does), and a grid pair 31/40 apart whose ties no such divisor rounds alike
GRID_PAIRS = {"divisor": (0.05088728293776512, 141, 0.022749608382582664),
              "no_divisor": (0.03728753328323364, 147, 0.04811294749379158)}


def requantize_graph(s_a, z_a, s_b):
    """x -> Q/DQ on one grid -> Q/DQ on another."""
    nodes = qdq("a", "x", "s_a", "z_a") + qdq("y", "a", "s_b", "z_b")
    inits = [scalar("s_a", s_a, np.float32), scalar("z_a", z_a, np.uint8),
             scalar("s_b", s_b, np.float32), scalar("z_b", 0, np.uint8)]
    return one_input_model(nodes, inits, 255)


def fake_quantize(x, s, z, signed=False):
    """torch's fake quantization of ``x`` (the fake-quant model's quantizer) on an 8-bit grid."""
    import torch

    lo, hi = (-128, 127) if signed else (0, 255)
    return torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(s), z, lo, hi).numpy()


def outputs(model, x, tmp_path, level):
    """The graph's output under qswap's session at ``level``, and the op types it ran."""
    path, optimized = tmp_path / "m.onnx", tmp_path / f"m.{level}.onnx"
    onnx.save(model, str(path))
    out = load_session(path, level=level, optimized_path=str(optimized)).run(["y"], {"x": x})[0]
    return out, {n.op_type for n in onnx.load(str(optimized)).graph.node}


@pytest.mark.parametrize("keys", [3, 12])
def test_softmax_kept_float_gives_the_fake_quant_codes(keys, tmp_path):
    import torch

    x = np.random.default_rng(keys).normal(0, 3, (4000, keys)).astype(np.float32)
    scores = fake_quantize(x, np.float32(0.0777), 102 - 128, signed=True)
    reference = fake_quantize(torch.softmax(torch.from_numpy(scores), -1).numpy(), np.float32(1 / 255), 0)
    model = softmax_graph(keys)
    fused, ops = outputs(model, x, tmp_path, "all")
    assert "QLinearSoftmax" in ops  # without the pass: onnxruntime's table-driven softmax ...
    assert 0 < np.mean(fused != reference) and np.abs(fused - reference).max() * 255 < 1.01  # ... steps off
    assert quantize_by_inverse(model) == 1  # the softmax's output quantizer (its input's reads x)
    kept, ops = outputs(model, x, tmp_path, "all")
    assert "QLinearSoftmax" not in ops and "Softmax" in ops
    np.testing.assert_array_equal(kept, reference)


@pytest.mark.parametrize("pair", sorted(GRID_PAIRS))
def test_a_grid_read_by_another_grid_gives_the_fake_quant_codes(pair, tmp_path):
    s_a, z_a, s_b = GRID_PAIRS[pair]
    x = np.tile((np.arange(256, dtype=np.float32) - z_a) * np.float32(s_a), (2, 1))[:, :255]
    a = fake_quantize(x, np.float32(s_a), z_a)
    reference = fake_quantize(a, np.float32(s_b), 0)
    model = requantize_graph(s_a, z_a, s_b)
    divided, _ = outputs(model, x, tmp_path, "all")
    assert np.any(divided != reference)  # ONNX's x / s and torch's x * (1 / s) break ties apart
    assert quantize_by_inverse(model) == (pair == "no_divisor")  # a Mul only where no divisor does it
    scale = {n.name: n.input[1] for n in model.graph.node}["y/QuantizeLinear"]
    assert scale == ("s_b/divisor" if pair == "divisor" else UNIT_SCALE)
    np.testing.assert_array_equal(outputs(model, x, tmp_path, "all")[0], reference)
    np.testing.assert_array_equal(outputs(model, x, tmp_path, "disabled")[0], reference)


@pytest.mark.parametrize("pair", sorted(GRID_PAIRS))
def test_a_relu_between_two_grids_runs_as_a_table_of_codes(pair, tmp_path):
    """x -> Q/DQ on the activation's grid -> Relu -> Q/DQ on fc2's input grid (the FFN): where the
    second quantizer divides, the Relu becomes a LeakyRelu that onnxruntime fuses into
    QLinearLeakyRelu (no float pass), and every code of the first grid (ties included) lands
    where torch's fake quantization puts it; where a Mul by 1 / s comes first, it stays."""
    s_a, z_a, s_b = GRID_PAIRS[pair]
    x = np.tile((np.arange(256, dtype=np.float32) - z_a) * np.float32(s_a), (2, 1))  # every code
    reference = fake_quantize(np.maximum(fake_quantize(x, np.float32(s_a), z_a), 0), np.float32(s_b), 0)
    nodes = qdq("a", "x", "s_a", "z_a") + [helper.make_node("Relu", ["a"], ["r"], name="relu")] + qdq("y", "r", "s_b", "z_b")
    model = one_input_model(nodes, [scalar("s_a", s_a, np.float32), scalar("z_a", z_a, np.uint8),
                                    scalar("s_b", s_b, np.float32), scalar("z_b", 0, np.uint8)], 256)
    quantize_by_inverse(model)
    assert relu_lookups(model) == (pair == "divisor")
    onnx.checker.check_model(model, full_check=True)
    for level in ("disabled", "all"):
        got, ops = outputs(model, x, tmp_path, level)
        np.testing.assert_array_equal(got, reference)
    assert ("QLinearLeakyRelu" in ops) == (pair == "divisor")


def test_a_relu_whose_input_another_node_reads_is_left():
    """onnxruntime would not fuse the chain: the Relu stays one it folds into its QuantizeLinear."""
    nodes = qdq("a", "x", "s", "z") + [helper.make_node("Relu", ["a"], ["r"], name="relu"),
                                       helper.make_node("Neg", ["a"], ["n"], name="neg")] + qdq("y", "r", "s", "z")
    model = one_input_model(nodes, [scalar("s", 0.05, np.float32), scalar("z", 0, np.uint8)], 4)
    assert relu_lookups(model) == 0
    assert "Relu" in [n.op_type for n in model.graph.node]


def test_a_group_onnxruntime_fuses_is_left():
    nodes = qdq("a", "x", "s", "z") + qdq("b", "x", "s2", "z") + [helper.make_node("Add", ["a", "b"], ["sum"], name="add")]
    nodes += [helper.make_node("QuantizeLinear", ["sum", "s", "z"], ["y_q"], name="out/QuantizeLinear"),
              helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"], name="out/DequantizeLinear")]
    inits = [scalar("s", 0.05, np.float32), scalar("s2", 0.03, np.float32), scalar("z", 128, np.uint8)]
    model = one_input_model(nodes, inits, 4)
    assert quantize_by_inverse(model) == 0  # the Add's quantizer (QLinearAdd), and two of a graph input
    assert "Mul" not in [n.op_type for n in model.graph.node]
    assert next(q for q in model.graph.node if q.name == "out/QuantizeLinear").input[:2] == ["sum", "s"]


def linear_graph(bias: bool):
    """(T, B, 6) input codes -> a linear layer traced as torch does (MatMul with the transposed
    weight, then the bias Add) -> Q/DQ; the attention-scores shape read from the dequantized input."""
    rng = np.random.default_rng(0)
    nodes = qdq("x_dq", "x", "s", "z") + [
        helper.make_node("DequantizeLinear", ["w_codes", "s_w", "z_w"], ["w"], name="fc/weight_quant/DequantizeLinear"),
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0], name="fc/Transpose"),
        helper.make_node("MatMul", ["x_dq", "w_t"], ["mm"], name="fc/MatMul")]
    inits = [scalar("s", 0.05, np.float32), scalar("z", 128, np.uint8), scalar("s_w", 0.01, np.float32),
             scalar("z_w", 0, np.int8),
             scalar("s_y", 0.04, np.float32), scalar("z_y", 120, np.uint8),
             numpy_helper.from_array(rng.integers(-127, 128, (5, 6)).astype(np.int8), "w_codes")]
    if bias:
        nodes += [helper.make_node("DequantizeLinear", ["b_codes", "s_b"], ["b"], name="fc/bias_quant/DequantizeLinear"),
                  helper.make_node("Add", ["b", "mm"], ["lin"], name="fc/Add")]
        inits += [numpy_helper.from_array(rng.integers(-3000, 3000, 5).astype(np.int32), "b_codes"),
                  scalar("s_b", 0.05 * 0.01, np.float32)]
    nodes += qdq("y", "lin" if bias else "mm", "s_y", "z_y")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_layer_becomes_one_integer_gemm(bias, tmp_path):
    x = np.random.default_rng(1).normal(0, 2, (7, 3, 6)).astype(np.float32)
    model = linear_graph(bias)
    before, ops = outputs(model, x, tmp_path, "all")
    assert "MatMulIntegerToFloat" in ops or "QLinearMatMul" in ops
    assert linear_as_gemm(model) == 1
    assert "MatMul" not in [n.op_type for n in model.graph.node]
    for level in ("disabled", "all"):
        after, ops = outputs(model, x, tmp_path, level)
        assert after.shape == (7, 3, 5)
        # the same products and bias; the output rounds from the int32 sum scaled once
        assert np.abs(after - before).max() <= np.float32(0.04) * 1.001 and np.mean(after != before) < 0.05
    assert "QGemm" in ops and not ops & {"MatMulIntegerToFloat", "QLinearMatMul", "MatMul", "Gemm"}


def test_shapes_read_codes_and_a_table_is_dequantized_after_its_gather(tmp_path):
    table = np.random.default_rng(2).integers(-128, 128, (50, 4)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["table", "s", "z"], ["table_dq"], name="pos/DequantizeLinear"),
             helper.make_node("Cast", ["x"], ["idx"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table_dq", "idx"], ["rows"], name="pos/Gather"),
             helper.make_node("Shape", ["rows"], ["shape"]),
             helper.make_node("Reshape", ["rows", "shape"], ["y"])]
    inits = [numpy_helper.from_array(table, "table"), scalar("s", 0.1, np.float32), scalar("z", 0, np.int8)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[0, 3, 49, 7, 7, 1]], np.float32)
    before, _ = outputs(model, x, tmp_path, "all")
    assert gather_codes(model) == 1 and shapes_of_codes(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.index("Gather") < ops.index("DequantizeLinear")  # the rows, not the table
    assert [n.input[0] for n in model.graph.node if n.op_type == "Shape"] == ["rows/codes"]
    for level in ("disabled", "all"):
        np.testing.assert_array_equal(outputs(model, x, tmp_path, level)[0], before)


def test_rewrite_nodes_replaces_exactly_the_nodes_it_is_given():
    """Nodes are matched by identity while held: the ids of unheld protobuf elements repeat."""
    from qswap.export.graph_passes import rewrite_nodes
    graph = helper.make_graph([helper.make_node("Identity", ["a"], [f"v{i}"], name=f"n{i}") for i in range(8)],
                              "g", [], [])
    nodes = list(graph.node)
    extra = helper.make_node("Neg", ["a"], ["w"], name="neg")
    rewrite_nodes(graph, [(nodes[1], ()), (nodes[4], (extra, nodes[4])), (nodes[6], ())])
    assert [n.name for n in graph.node] == ["n0", "n2", "n3", "neg", "n4", "n5", "n7"]
    rewrite_nodes(graph, [])
    assert len(graph.node) == 7


def cache_graph(s_new: float):
    """The decoder step's self-attention cache as torch traces it: past codes (B*H... as (B, H, t, D))
    -> DequantizeLinear -> Reshape (B*H, t, D) -> Concat with the new row's Q/DQ (on a grid of
    scale ``s_new``) -> Reshape (B, H, t+1, D) -> QuantizeLinear on the cache's grid: ``present``;
    and the scores ``q @ k^T`` read the concatenation."""
    nodes = [helper.make_node("DequantizeLinear", ["past", "s", "z"], ["past_dq"], name="attn/DequantizeLinear"),
             helper.make_node("Reshape", ["past_dq", "rows"], ["past_rows"], name="attn/Reshape"),
             *qdq("new", "x", "s_new", "z"),
             helper.make_node("Concat", ["past_rows", "new"], ["k"], axis=1, name="attn/Concat"),
             helper.make_node("Reshape", ["k", "heads"], ["k_heads"], name="attn/Reshape_1"),
             helper.make_node("QuantizeLinear", ["k_heads", "s", "z"], ["present"], name="attn/QuantizeLinear"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="attn/core/Transpose"),
             *qdq("q", "query", "s_q", "z"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attn/core/MatMul")]
    inits = [scalar("s", 0.05, np.float32), scalar("z", 131, np.uint8), scalar("s_new", s_new, np.float32),
             scalar("s_q", 0.03, np.float32), numpy_helper.from_array(np.array([6, -1, 4], np.int64), "rows"),
             numpy_helper.from_array(np.array([2, 3, -1, 4], np.int64), "heads")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("past", TensorProto.UINT8, [2, 3, None, 4]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 1, 4]),
                                       helper.make_tensor_value_info("query", TensorProto.FLOAT, [6, 1, 4])],
                          [helper.make_tensor_value_info("present", TensorProto.UINT8, [2, 3, None, 4]),
                           helper.make_tensor_value_info("scores", TensorProto.FLOAT, [6, 1, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run_cache(model, tmp_path, level):
    rng = np.random.default_rng(3)
    feeds = {"past": rng.integers(0, 256, (2, 3, 5, 4)).astype(np.uint8),
             "x": rng.normal(0, 3, (6, 1, 4)).astype(np.float32),
             "query": rng.normal(0, 2, (6, 1, 4)).astype(np.float32)}
    path, optimized = tmp_path / "m.onnx", tmp_path / f"m.{level}.onnx"
    onnx.save(model, str(path))
    out = load_session(path, level=level, optimized_path=str(optimized)).run(["present", "scores"], feeds)
    return out, [n.op_type for n in onnx.load(str(optimized)).graph.node]


def test_a_cache_of_codes_is_concatenated_as_codes_and_its_matmul_runs_on_integers(tmp_path):
    model = cache_graph(0.05)
    (present, scores), ops = run_cache(model, tmp_path, "disabled")
    assert code_caches(model) == 2  # the Concat and the cache's QuantizeLinear
    onnx.checker.check_model(model, full_check=True)
    rewritten = [n.op_type for n in model.graph.node]
    assert rewritten.count("QuantizeLinear") == 2  # the new row's and the query's: no requantized cache
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["present"].op_type == "Reshape" and producer["k"].op_type == "DequantizeLinear"
    for level in ("disabled", "all"):
        (present_after, scores_after), ops = run_cache(model, tmp_path, level)
        np.testing.assert_array_equal(present_after, present)  # the same codes
        if level == "disabled":
            np.testing.assert_array_equal(scores_after, scores)
    assert "MatMul" not in ops and ({"QLinearMatMul", "MatMulIntegerToFloat"} & set(ops))


def test_rows_on_another_grid_are_not_concatenated_as_codes(tmp_path):
    """The new row's grid differs from the cache's: concatenated codes would mean other values."""
    model = cache_graph(0.07)
    before = [n.op_type for n in model.graph.node]
    assert code_caches(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_a_concatenation_that_fails_halfway_leaves_no_codes_behind(tmp_path):
    """The Concat's first two parts have codes on the grid, its third is computed: no rewrite, and
    the QuantizeLinear after the second part's Reshape still finds codes that exist in the graph."""
    nodes = [helper.make_node("DequantizeLinear", ["a", "s", "z"], ["a_dq"], name="a/DequantizeLinear"),
             helper.make_node("DequantizeLinear", ["b", "s", "z"], ["b_dq"], name="b/DequantizeLinear"),
             helper.make_node("Reshape", ["b_dq", "shape"], ["b_rows"], name="b/Reshape"),
             helper.make_node("Relu", ["x"], ["x_relu"], name="relu"),
             helper.make_node("Concat", ["a_dq", "b_rows", "x_relu"], ["y"], axis=0, name="concat"),
             helper.make_node("QuantizeLinear", ["b_rows", "s", "z"], ["codes"], name="b/QuantizeLinear")]
    inits = [scalar("s", 0.05, np.float32), scalar("z", 7, np.uint8),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 4]),
                                       helper.make_tensor_value_info("b", TensorProto.UINT8, [None, 2]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4]),
                           helper.make_tensor_value_info("codes", TensorProto.UINT8, [None, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"a": np.arange(8, dtype=np.uint8).reshape(2, 4), "b": np.arange(8, dtype=np.uint8).reshape(4, 2) * 30,
             "x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["y", "codes"], feeds)
    before = run(model)
    assert code_caches(model) == 1  # the QuantizeLinear alone
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("Concat") == 1
    for got, want in zip(run(model), before):
        np.testing.assert_array_equal(got, want)


def entry_graph(codes_a, codes_b, s_a: float, s_b: float):
    """``Gather(a, i) -> DequantizeLinear`` plus ``Gather(b, j) -> DequantizeLinear -> Expand``,
    added: the decoder entry's shape (token rows times a folded scale, plus position rows)."""
    zero = np.uint8 if codes_a.dtype == np.uint8 else np.int8
    nodes = [helper.make_node("Gather", ["a", "i"], ["rows_a"], name="tokens/Gather"),
             helper.make_node("DequantizeLinear", ["rows_a", "s_a", "z"], ["x_a"], name="tokens/DequantizeLinear"),
             helper.make_node("Gather", ["b", "j"], ["rows_b"], name="positions/Gather"),
             helper.make_node("DequantizeLinear", ["rows_b", "s_b", "z"], ["x_b"], name="positions/DequantizeLinear"),
             helper.make_node("Expand", ["x_b", "shape"], ["x_b_wide"], name="positions/Expand"),
             helper.make_node("Add", ["x_a", "x_b_wide"], ["y"], name="entry/Add")]
    inits = [numpy_helper.from_array(codes_a, "a"), numpy_helper.from_array(codes_b, "b"),
             scalar("s_a", s_a, np.float32), scalar("s_b", s_b, np.float32), scalar("z", 0, zero),
             numpy_helper.from_array(np.array([3, codes_a.shape[1]], np.int64), "shape")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [3]),
                                       helper.make_tensor_value_info("j", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, codes_a.shape[1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def folded(codes, s: float, grid: float) -> np.ndarray:
    """Each code's value rounded half to even onto ``grid`` (what folded_tables computes)."""
    return np.round(codes.astype(np.float64) * np.float64(np.float32(s)) / grid).astype(np.int32)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_an_entry_of_two_lookups_is_added_in_int32_on_the_folded_grid(dtype, tmp_path):
    """The pass looks each code up in a 256-value table of its folded value (negative int8 codes
    index from the end, as ONNX's Gather does) and adds the rows in int32: the output is the
    folded rows' sum times the grid, exactly, at every optimization level."""
    rng = np.random.default_rng(5)
    low, high = (-128, 128) if dtype == np.int8 else (0, 256)
    codes_a, codes_b = (rng.integers(low, high, shape).astype(dtype) for shape in ((40, 6), (30, 6)))
    s_a, s_b, grid = 0.0371, 0.0113, 0.05 * 2.0 ** -16
    model = entry_graph(codes_a, codes_b, s_a, s_b)
    tables = {"a": folded(codes_a, s_a, grid), "b": folded(codes_b, s_b, grid)}
    assert integer_entry(model, tables, grid) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Cast") == 2 and ops.count("DequantizeLinear") == 1 and ops.index("Add") < ops.index(
        "DequantizeLinear")
    i, j = np.array([0, 17, 39]), np.array([29])
    expected = ((tables["a"][i].astype(np.int64) + tables["b"][j]) * np.float32(grid)).astype(np.float32)
    for level in ("disabled", "all"):
        path = tmp_path / f"entry_{level}.onnx"
        onnx.save(model, str(path))
        got = load_session(path, level=level).run(["y"], {"i": i, "j": j})[0]
        np.testing.assert_array_equal(got, expected)


def test_an_entry_whose_folded_table_is_not_a_function_of_its_codes_stays_float():
    """One code with two folded values (a table on per-row grids): no lookup can give them, so
    the pass leaves the float Add; a table of another shape, or a name the pass is not given,
    likewise."""
    rng = np.random.default_rng(6)
    codes_a, codes_b = rng.integers(-128, 128, (40, 6)).astype(np.int8), rng.integers(-128, 128, (30, 6)).astype(np.int8)
    grid = 2.0 ** -20
    per_row = folded(codes_a, 0.03, grid) * np.arange(1, 41, dtype=np.int32)[:, None]
    for tables in ({"a": per_row, "b": folded(codes_b, 0.01, grid)},
                   {"a": folded(codes_a, 0.03, grid)[:20], "b": folded(codes_b, 0.01, grid)},
                   {"a": folded(codes_a, 0.03, grid)}):
        model = entry_graph(codes_a, codes_b, 0.03, 0.01)
        assert integer_entry(model, tables, grid) == 0
        assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 2


def test_an_entry_whose_moved_rows_another_node_reads_stays_float():
    """The moved position rows (the Expand's output) also read by a float Mul: turning them int32
    would hand that reader integers, so the pass leaves the Add."""
    rng = np.random.default_rng(7)
    codes_a, codes_b = rng.integers(-128, 128, (40, 6)).astype(np.int8), rng.integers(-128, 128, (30, 6)).astype(np.int8)
    grid = 2.0 ** -20
    model = entry_graph(codes_a, codes_b, 0.03, 0.01)
    model.graph.node.append(helper.make_node("Mul", ["x_b_wide", "s_b"], ["other"], name="other/Mul"))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [3, 6]))
    assert integer_entry(model, {"a": folded(codes_a, 0.03, grid), "b": folded(codes_b, 0.01, grid)}, grid) == 0


def test_an_entry_drops_the_float_types_recorded_for_the_values_it_makes_int32(tmp_path):
    """A ``value_info`` naming the moved rows FLOAT would make onnxruntime refuse the rewritten
    graph (they hold int32 now): the pass drops it, keeps the others, and the graph runs."""
    rng = np.random.default_rng(8)
    codes_a, codes_b = rng.integers(-128, 128, (40, 6)).astype(np.int8), rng.integers(-128, 128, (30, 6)).astype(np.int8)
    grid = 2.0 ** -20
    model = entry_graph(codes_a, codes_b, 0.03, 0.01)
    model.graph.value_info.extend([helper.make_tensor_value_info("x_b_wide", TensorProto.FLOAT, [3, 6]),
                                   helper.make_tensor_value_info("x_a", TensorProto.FLOAT, [3, 6]),
                                   helper.make_tensor_value_info("rows_a", TensorProto.INT8, [3, 6])])
    tables = {"a": folded(codes_a, 0.03, grid), "b": folded(codes_b, 0.01, grid)}
    assert integer_entry(model, tables, grid) == 1
    assert [v.name for v in model.graph.value_info] == ["rows_a"]
    path = tmp_path / "entry.onnx"
    onnx.save(model, str(path))
    i, j = np.array([1, 2, 3]), np.array([4])
    expected = ((tables["a"][i].astype(np.int64) + tables["b"][j]) * np.float32(grid)).astype(np.float32)
    np.testing.assert_array_equal(load_session(path, level="all").run(["y"], {"i": i, "j": j})[0], expected)
