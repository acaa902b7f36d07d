"""Rewrites of an exported ONNX graph before it is written.

``fold_constant_scales``: ``DequantizeLinear(q, s, z) * c`` with a positive scalar constant
``c`` (attention's ``q_quant(q) * scaling``, the encoder's ``embed_scale * embed_quant(x)``)
becomes ``DequantizeLinear(q, s * c, z)``: the product stays on a grid, rescaled, as
``qswap.nn.attention`` says integer hardware folds it into the requantization multiplier. The
values differ from the fake-quant model's ``(q - z) * s * c`` only by float32 rounding of
``s * c`` (one ulp), and onnxruntime can then run the following matmul on integers.

``quantize_by_inverse``: onnxruntime's ``QuantizeLinear`` divides by the scale (``x / s``,
ONNX's definition); the fake-quant model's quantizer multiplies by the float32 reciprocal
(``x * (1 / s)``, torch's ``fake_quantize_per_tensor_affine``). The two differ by an ulp now and
then, and a value on a rounding tie lands one step apart: rare for an arbitrary float, frequent
where a quantizer reads another quantizer's grid values (``fc2.input_quant`` after
``ffn_act_quant``: with a scale ratio of 85/38 every 38th code is an exact tie). The pass makes
every ``QuantizeLinear`` onnxruntime runs as one ``Mul`` by ``float32(1 / s)`` and a
``QuantizeLinear`` of unit scale (``round(y / 1)`` is ``round(y)``): the fake-quant codes bit for
bit. A ``QuantizeLinear`` that closes a group onnxruntime fuses into an integer kernel (an
``Add``, ``MatMul``, ``Conv`` or ``Mul`` all of whose inputs are DequantizeLinear outputs:
``QLinearAdd``, ``QLinearMatMul``, ``QLinearConv``, ``QLinearMul``) is left: the kernel
requantizes on its own. A ``Softmax`` is not left: onnxruntime's ``QLinearSoftmax`` (a
table-driven exp) is not the fake-quant softmax (it puts some probabilities one step away on the
same input codes, far more often than ties do), and the ``Mul`` keeps the softmax float.
"""
from __future__ import annotations

import numpy as np


def fold_constant_scales(model) -> int:
    """Fold every positive scalar ``Mul`` after a single-reader DequantizeLinear into its
    scale (in place). Returns the number of folds."""
    from onnx import numpy_helper

    graph = model.graph
    producer, readers, values = _index(graph)
    folded = []
    for mul in graph.node:
        if mul.op_type != "Mul":
            continue
        for a, b in ((0, 1), (1, 0)):
            dq, c = producer.get(mul.input[a]), values(mul.input[b])
            if not (dq is not None and dq.op_type == "DequantizeLinear" and _positive_scalar(c)
                    and len(readers.get(dq.output[0], [])) == 1 and values(dq.input[1]) is not None):
                continue
            scale = values(dq.input[1]).astype(np.float32)
            new = numpy_helper.from_array((scale * np.float32(c.reshape(()))).astype(np.float32),
                                          f"{dq.name}/scale_times_{mul.name}")
            graph.initializer.append(new)
            dq.input[1] = new.name
            for reader in readers.get(mul.output[0], []):
                for i, name in enumerate(reader.input):
                    if name == mul.output[0]:
                        reader.input[i] = dq.output[0]
            for i, out in enumerate(graph.output):
                if out.name == mul.output[0]:
                    dq.output[0] = out.name  # keep the graph output's name
            folded.append(mul)
            break
    for mul in folded:
        graph.node.remove(mul)
    return len(folded)


def _index(graph):
    """The node producing each value, the nodes reading each value, and the constant lookup."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return producer, readers, _constants(graph, producer)


def _positive_scalar(c) -> bool:
    return (c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating)
            and np.isfinite(c).all() and float(c.reshape(())) > 0)


def _constants(graph, producer):
    """A lookup of the constant value of a tensor name (initializer, Constant node, or an
    Identity of one; torch's exporter shares equal initializers through Identity), else None."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}

    def value(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":
            return value(node.input[0])
        return None
    return value



FUSED_GROUPS = frozenset({"Add", "MatMul", "Conv", "Mul", "Gemm"})
UNIT_SCALE = "unit_scale"


def quantize_by_inverse(model) -> int:
    """Rewrite every per-tensor ``QuantizeLinear(x, s, z)`` (a constant scalar scale) that does
    not close a fusable group as ``QuantizeLinear(x * float32(1 / s), 1, z)`` (in place; module
    docstring). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer, _, values = _index(graph)
    rewritten: list[tuple] = []
    inverses: dict[str, str] = {}  # scale initializer -> its inverse's (one per grid, short names)
    for q in graph.node:
        scale = values(q.input[1]) if q.op_type == "QuantizeLinear" and len(q.input) > 1 else None
        if scale is None or scale.size != 1 or scale.dtype != np.float32 or _closes_fused_group(q, producer, values):
            continue
        if not inverses:
            graph.initializer.append(numpy_helper.from_array(np.array(1, np.float32), UNIT_SCALE))
        if q.input[1] not in inverses:
            inverses[q.input[1]] = f"inverse_scale_{len(inverses)}"
            graph.initializer.append(numpy_helper.from_array(np.float32(1) / scale.reshape(()), inverses[q.input[1]]))
        # unnamed: the file stays small; the QuantizeLinear it feeds carries the site
        mul = helper.make_node("Mul", [q.input[0], inverses[q.input[1]]], [f"{q.output[0]}/times_inverse_scale"])
        q.input[0], q.input[1] = mul.output[0], UNIT_SCALE
        rewritten.append((q, mul))
    for q, mul in rewritten:  # each Mul right before its QuantizeLinear: the graph stays sorted
        graph.node.insert(list(graph.node).index(q), mul)
    return len(rewritten)


def _closes_fused_group(q, producer: dict, values) -> bool:
    """Whether ``q`` quantizes the output of an op onnxruntime fuses with its DequantizeLinear
    inputs and ``q`` into one integer kernel."""
    op = producer.get(q.input[0])
    if op is None or op.op_type not in FUSED_GROUPS:
        return False
    inputs = [name for name in op.input if name and values(name) is None]
    return bool(inputs) and all(name in producer and producer[name].op_type == "DequantizeLinear" for name in inputs)
