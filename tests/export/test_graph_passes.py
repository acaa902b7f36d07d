"""fold_constant_scales: DequantizeLinear * positive scalar -> DequantizeLinear with the scale
times it (values to float32 rounding), and nothing else folded."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qswap.export.graph_passes import fold_constant_scales  # noqa: E402


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
