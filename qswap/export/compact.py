"""Passes that make an exported graph's file smaller without changing a value it computes.

================================  ===============================================================
pass                              what it removes
================================  ===============================================================
``inline_identities``             torch's ``Identity`` nodes that share one initializer under
                                  several names: readers read the initializer itself
``shared_constants``              ``Constant`` nodes (torch's shape arithmetic: indices, axes):
                                  initializers, each distinct value stored once
``drop_zero_points``              an all-zero zero point of a bias (int32) DequantizeLinear:
                                  0 is the default of the optional input
``short_value_names``             the intermediate values' names (torch's repeat the node's
                                  name plus ``_output_0``): an index. Node names, which carry
                                  the qswap site (``qswap.export.onnx_audit.site_of``), graph
                                  inputs, outputs and initializers keep theirs
``pack_int4``                     the high half of each byte of 4-bit weight codes: the codes
                                  are stored as ONNX INT4 (UINT4), two per byte, and a ``Cast``
                                  to int8 (uint8) feeds the DequantizeLinear that read them
================================  ===============================================================

Why a ``Cast`` and not an INT4 DequantizeLinear: onnxruntime 1.32's CPU provider folds the
constant ``Cast`` at load (graph optimization ``basic`` and up), so its DequantizeLinear reads
the same int8 initializer as in the int8-stored graph and its QDQ fusions run the same integer
kernels (``MatMulIntegerToFloat``, ``QLinearConv``) on the same codes: the outputs are equal. An
INT4 input to DequantizeLinear it runs too, but it does not fuse it: the matmuls and
convolutions of such a graph run in float, a different computation from the int8-stored graph's
(``tests/export/test_compact.py`` checks both).

INT4 needs opset 21: ``pack_int4`` upgrades the model with ONNX's version converter (the
operators qswap's graphs use keep their semantics from opset 17 to 21) and drops the
``value_info`` the converter adds.

>>> compact(model, {"encoder.transformer_layers.0.fc1.weight_quant.codes"})  # every pass, in order
"""
from __future__ import annotations

import numpy as np

from qswap.errors import ExportError
from qswap.export.graph_passes import rewrite_nodes

INT4_OPSET = 21
_RANGES = {"int8": (-8, 7, "int4"), "uint8": (0, 15, "uint4")}


def compact(model, four_bit: "set[str]") -> None:
    """Every pass, in an order where each sees what the previous left (in place); ``four_bit``:
    the initializers of 4-bit weight codes (``pack_int4``)."""
    short_value_names(model)
    shared_constants(model)
    inline_identities(model)
    drop_zero_points(model)
    pack_int4(model, four_bit)


def inline_identities(model) -> int:
    """Point every reader of ``Identity(initializer)`` at the initializer and drop the node (in
    place; an Identity that is a graph output stays). Returns the number of nodes dropped."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    _rename_inputs(graph, alias)
    dropped = [(n, ()) for n in graph.node if n.op_type == "Identity" and n.output and n.output[0] in alias]
    rewrite_nodes(graph, dropped)
    return len(dropped)


def shared_constants(model) -> int:
    """Replace every ``Constant`` node that holds a tensor by an initializer, one per distinct
    value (dtype, shape and bytes), its readers reading that initializer (in place; a Constant
    that is a graph output stays). Returns the number of nodes replaced."""
    from onnx import numpy_helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    stored: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    replaced = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in outputs
                and len(n.attribute) == 1 and n.attribute[0].name == "value"]
    for node in replaced:
        value = numpy_helper.to_array(node.attribute[0].t)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in stored:
            stored[key] = node.output[0]
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        alias[node.output[0]] = stored[key]
    rewrite_nodes(graph, [(node, ()) for node in replaced])
    _rename_inputs(graph, alias)
    return len(alias)


def drop_zero_points(model) -> int:
    """Drop the zero point of every int32 DequantizeLinear (a bias) whose input is a constant (an
    initializer, or a Cast of one) and whose zero point is an all-zero initializer (in place).
    Weights keep theirs: onnxruntime's QDQ fusions read the int8 / uint8 zero point's type, and
    without it they leave the matmul in float. Returns the number dropped."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        source, zero = casts.get(node.input[0], node.input[0]), initializers.get(node.input[2])
        if (source in initializers and zero is not None and zero.data_type == TensorProto.INT32
                and not numpy_helper.to_array(zero).any()):
            del node.input[2]
            dropped += 1
    used = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)  # the zero points no node reads any more
    return dropped


def _rename_inputs(graph, alias: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]


def short_value_names(model) -> int:
    """Rename every value computed inside the graph (not a graph input or output, not an
    initializer) to ``v<index>`` in node order (in place). Returns the number renamed."""
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    names: dict[str, str] = {}
    for node in graph.node:
        for name in node.output:
            if name and name not in keep and name not in names:
                names[name] = f"v{len(names)}"
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name in names:
                    field[i] = names[name]
    for info in graph.value_info:
        info.name = names.get(info.name, info.name)
    return len(names)


def pack_int4(model, names: "set[str]") -> int:
    """Store the int8 (uint8) initializers ``names`` (4-bit weight codes, each read only by
    DequantizeLinear as its input, or by a Gather of rows before one: ``graph_passes.gather_codes``) as INT4 (UINT4) with a ``Cast`` back to int8 (uint8) before
    their readers; upgrade the model to opset 21 when one is packed (in place). ExportError for a
    code outside the 4-bit range. Returns the number packed."""
    from onnx import TensorProto, helper, numpy_helper

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append(node.op_type if i == 0 else "")
    chosen = {t.name for t in model.graph.initializer
              if t.name in names and readers.get(t.name) and set(readers[t.name]) <= {"DequantizeLinear", "Gather"}}
    if not chosen:
        return 0
    _upgrade(model)  # replaces the model's messages: read the graph after it
    graph = model.graph
    casts = []
    for tensor in [t for t in graph.initializer if t.name in chosen]:
        codes = numpy_helper.to_array(tensor)
        if codes.dtype.name not in _RANGES:
            raise ExportError(f"{tensor.name}: {codes.dtype} codes cannot be stored as 4-bit; only int8 "
                              f"and uint8 weight codes of a 4-bit quantizer are packed")
        low, high, packed = _RANGES[codes.dtype.name]
        if codes.size and (codes.min() < low or codes.max() > high):
            raise ExportError(f"{tensor.name}: codes outside [{low}, {high}] cannot be stored as {packed}; "
                              f"the weight quantizer of this site is not 4-bit")
        stored = numpy_helper.from_array(codes.astype(_ml_dtype(packed)), f"{tensor.name}.{packed}")
        graph.initializer.remove(tensor)
        graph.initializer.append(stored)
        target = TensorProto.INT8 if packed == "int4" else TensorProto.UINT8
        casts.append(helper.make_node("Cast", [stored.name], [tensor.name], to=target,
                                      name=f"{tensor.name}/Cast"))
    for node in reversed(casts):  # ahead of every reader: the graph stays topologically sorted
        graph.node.insert(0, node)
    return len(casts)


def _upgrade(model) -> None:
    from onnx import version_converter

    version = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version >= INT4_OPSET:
        return
    upgraded = version_converter.convert_version(model, INT4_OPSET)
    del upgraded.graph.value_info[:]  # shape annotations the converter infers: onnxruntime infers them
    model.CopyFrom(upgraded)


def _ml_dtype(name: str):
    import ml_dtypes  # onnx's own dependency for its 4-bit types

    return np.dtype(getattr(ml_dtypes, name))
