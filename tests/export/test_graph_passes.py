"""fold_constant_scales: DequantizeLinear * positive scalar -> DequantizeLinear with the scale
times it (values to float32 rounding), and nothing else folded. quantize_by_inverse: every
QuantizeLinear onnxruntime runs gives torch's fake-quant codes bit for bit (``x * (1 / s)``, not
ONNX's ``x / s``), a Q/DQ-wrapped Softmax stays float (not onnxruntime's QLinearSoftmax), and a
group onnxruntime fuses into an integer kernel is left to it."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qswap.export.graph_passes import fold_constant_scales, quantize_by_inverse  # noqa: E402
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


def requantize_graph():
    """x -> Q/DQ on one grid -> Q/DQ on a grid 85/38 times finer: every 38th code of the first
    lands on a rounding tie of the second (fc2.input_quant reading ffn_act_quant)."""
    nodes = qdq("a", "x", "s_a", "z_a") + qdq("y", "a", "s_b", "z_b")
    inits = [scalar("s_a", 0.05088728293776512, np.float32), scalar("z_a", 141, np.uint8),
             scalar("s_b", 0.022749608382582664, np.float32), scalar("z_b", 0, np.uint8)]
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
    assert quantize_by_inverse(model) == 2
    kept, ops = outputs(model, x, tmp_path, "all")
    assert "QLinearSoftmax" not in ops and "Softmax" in ops
    np.testing.assert_array_equal(kept, reference)


def test_a_grid_read_by_another_grid_gives_the_fake_quant_codes(tmp_path):
    x = np.tile((np.arange(255, dtype=np.float32) - 141) * np.float32(0.05088728293776512), (2, 1))
    a = fake_quantize(x, np.float32(0.05088728293776512), 141)
    reference = fake_quantize(a, np.float32(0.022749608382582664), 0)
    model = requantize_graph()
    divided, _ = outputs(model, x, tmp_path, "all")
    assert np.any(divided != reference)  # ONNX's x / s and torch's x * (1 / s) break ties apart
    assert quantize_by_inverse(model) == 2
    np.testing.assert_array_equal(outputs(model, x, tmp_path, "all")[0], reference)
    np.testing.assert_array_equal(outputs(model, x, tmp_path, "disabled")[0], reference)


def test_a_group_onnxruntime_fuses_is_left():
    nodes = qdq("a", "x", "s", "z") + qdq("b", "x", "s2", "z") + [helper.make_node("Add", ["a", "b"], ["sum"], name="add")]
    nodes += [helper.make_node("QuantizeLinear", ["sum", "s", "z"], ["y_q"], name="out/QuantizeLinear"),
              helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["y"], name="out/DequantizeLinear")]
    inits = [scalar("s", 0.05, np.float32), scalar("s2", 0.03, np.float32), scalar("z", 128, np.uint8)]
    model = one_input_model(nodes, inits, 4)
    assert quantize_by_inverse(model) == 2  # the two input quantizers, not the Add's (QLinearAdd)
    muls = [n.output[0] for n in model.graph.node if n.op_type == "Mul"]
    assert [q.input[0] for q in model.graph.node if q.name in ("a/QuantizeLinear", "b/QuantizeLinear")] == muls
    assert next(q for q in model.graph.node if q.name == "out/QuantizeLinear").input[:2] == ["sum", "s"]
