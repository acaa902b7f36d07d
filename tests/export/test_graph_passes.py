"""fold_constant_scales: DequantizeLinear * positive scalar -> DequantizeLinear with the scale
times it (values to float32 rounding), and nothing else folded. float_softmax: a Q/DQ-wrapped
Softmax stays onnxruntime's float Softmax (not its QLinearSoftmax) under qswap's session, and
gives float Softmax's codes exactly."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qswap.export.graph_passes import float_softmax, fold_constant_scales  # noqa: E402
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


@pytest.mark.parametrize("c,extra_reader", [(-0.5, False), (0.25, True)])
def test_negative_scalars_and_shared_dequantize_are_left(c, extra_reader):
    model = graph(c, extra_reader)
    assert fold_constant_scales(model) == 0
    assert "Mul" in [n.op_type for n in model.graph.node]


def softmax_graph(keys: int):
    """x -> Q/DQ (a signed 8-bit grid as uint8 codes) -> Softmax -> Q/DQ (unsigned, zero point 0),
    the decoder step's self-attention without a padding mask; the output is the softmax's codes."""
    def qdq(name, x, s, z):
        return [helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"], name=f"{name}/QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [name], name=f"{name}/DequantizeLinear")]
    nodes = qdq("scores", "x", "s_in", "z_in") + [helper.make_node("Softmax", ["scores"], ["p"], axis=-1, name="sm")]
    nodes += qdq("probs", "p", "s_out", "z_out")
    inits = [numpy_helper.from_array(np.array(0.0777, np.float32), "s_in"),
             numpy_helper.from_array(np.array(102, np.uint8), "z_in"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "s_out"),
             numpy_helper.from_array(np.array(0, np.uint8), "z_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, keys])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, keys])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def probabilities(model, x, tmp_path, level):
    """The graph's output under qswap's session at ``level``, and the op types it ran."""
    path, optimized = tmp_path / "m.onnx", tmp_path / f"m.{level}.onnx"
    onnx.save(model, str(path))
    out = load_session(path, level=level, optimized_path=str(optimized)).run(["probs"], {"x": x})[0]
    return out, {n.op_type for n in onnx.load(str(optimized)).graph.node}


@pytest.mark.parametrize("keys", [3, 12])
def test_softmax_kept_float_gives_float_softmax_codes(keys, tmp_path):
    x = np.random.default_rng(keys).normal(0, 3, (4000, keys)).astype(np.float32)
    model = softmax_graph(keys)
    reference, ops = probabilities(model, x, tmp_path, "disabled")  # float Softmax, then Q/DQ
    fused, ops = probabilities(model, x, tmp_path, "all")
    assert "QLinearSoftmax" in ops  # without the pass: onnxruntime's table-driven softmax ...
    assert 0 < np.mean(fused != reference) and np.abs(fused - reference).max() * 255 < 1.01  # ... steps off
    assert float_softmax(model) == 1
    kept, ops = probabilities(model, x, tmp_path, "all")
    assert "QLinearSoftmax" not in ops and "Softmax" in ops
    np.testing.assert_array_equal(kept, reference)


def test_softmax_after_anything_but_a_dequantize_is_left():
    model = softmax_graph(3)
    model.graph.node.insert(2, helper.make_node("Relu", ["scores"], ["scores_relu"], name="relu"))
    model.graph.node[3].input[0] = "scores_relu"
    assert float_softmax(model) == 0
