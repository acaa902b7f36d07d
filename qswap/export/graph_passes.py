"""Rewrites of an exported ONNX graph before it is written.

``fold_constant_scales``: ``DequantizeLinear(q, s, z) * c`` with a positive scalar constant
``c`` (attention's ``q_quant(q) * scaling``, the encoder's ``embed_scale * embed_quant(x)``)
becomes ``DequantizeLinear(q, s * c, z)``: the product stays on a grid, rescaled, as
``qswap.nn.attention`` says integer hardware folds it into the requantization multiplier. The
values differ from the fake-quant model's ``(q - z) * s * c`` only by float32 rounding of
``s * c`` (one ulp), and onnxruntime can then run the following matmul on integers.

``float_softmax``: a ``DequantizeLinear -> Softmax -> QuantizeLinear`` group (the decoder step's
self-attention, which has no padding mask between its scores and its softmax) would become
onnxruntime's ``QLinearSoftmax``, whose table-driven exp is not the softmax the fake-quant model
computes: it puts some of the probabilities one step away from float ``Softmax`` then
``QuantizeLinear`` on the same codes, far more often than rounding ties do (a few percent with
a handful of keys: ``tests/export/test_graph_passes.py``), and the decoder amplifies every such
step (``tools/onnx_sites.py`` finds the first). The pass stores the softmax output's codes as int8 (zero point ``z - 128``:
the same grid, the same values), which onnxruntime's QDQ fusion only leaves float when the
session allows int8 QDQ (``session.qdqisint8allowed``, set by ``qswap.export.load_session``;
without it onnxruntime turns the pair back into uint8 and fuses it).
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


def float_softmax(model) -> int:
    """Give the QuantizeLinear after every Softmax that reads a DequantizeLinear (and the
    DequantizeLinear nodes reading it) an int8 zero point ``z - 128`` in place of its uint8 ``z``:
    the same grid, which onnxruntime's QDQ fusion leaves to a float Softmax (module docstring).
    Returns the number of softmaxes kept float."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    producer, readers, values = _index(graph)
    kept = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        source = producer.get(softmax.input[0])
        quants = readers.get(softmax.output[0], [])
        if source is None or source.op_type != "DequantizeLinear" or not quants or any(
                q.op_type != "QuantizeLinear" or len(q.input) < 3 for q in quants):
            continue
        for q in quants:
            zero = values(q.input[2])
            if zero is None or zero.dtype != np.uint8 or zero.size != 1:
                continue
            signed = numpy_helper.from_array((zero.astype(np.int16) - 128).astype(np.int8),
                                             f"{q.name}/zero_point_int8")
            graph.initializer.append(signed)
            q.input[2] = signed.name
            for dq in readers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear" and dq.input[0] == q.output[0]:
                    dq.input[2] = signed.name
            for info in graph.value_info:  # an inferred uint8 type of the codes is stale now
                if info.name == q.output[0]:
                    info.type.tensor_type.elem_type = TensorProto.INT8
        kept += 1
    return kept
