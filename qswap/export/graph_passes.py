"""Rewrites of an exported ONNX graph before it is written.

``fold_constant_scales``: ``DequantizeLinear(q, s, z) * c`` with a positive scalar constant
``c`` (attention's ``q_quant(q) * scaling``, the encoder's ``embed_scale * embed_quant(x)``, the
decoder's ``embed_scale`` times its token embedding's rows, dequantized after their ``Gather`` by
``gather_codes``, which runs first)
becomes ``DequantizeLinear(q, s * c, z)``: the product stays on a grid, rescaled, as
``qswap.nn.attention`` says integer hardware folds it into the requantization multiplier. The
values differ from the fake-quant model's ``(q - z) * s * c`` only by float32 rounding of
``s * c`` (one ulp), and onnxruntime can then run the following matmul on integers.

``quantize_by_inverse``: onnxruntime's ``QuantizeLinear`` divides by the scale (``x / s``,
ONNX's definition); the fake-quant model's quantizer multiplies by the float32 reciprocal
(``x * (1 / s)``, torch's ``fake_quantize_per_tensor_affine``). The two differ by an ulp now and
then, and a value on a rounding tie lands one step apart: frequent where a quantizer reads
another quantizer's grid values (``fc2.input_quant`` after ``ffn_act_quant``: with a scale ratio
of 85/38 every 38th code is an exact tie), next to never elsewhere (a continuous value falls
within an ulp of a tie about once in 10^5, and onnxruntime's integer kernels, int32 sums scaled
once, already differ from the fake-quant model's float sums by as much). The pass makes a
``QuantizeLinear`` that reads a grid (its input comes from a DequantizeLinear through data
movement, ``Relu`` or a constant ``Mul``) one ``Mul`` by ``float32(1 / s)`` and a
``QuantizeLinear`` of unit scale (``round(y / 1)`` is ``round(y)``): the fake-quant codes bit
for bit. One that quantizes a computed value (a matmul, a sum, a LayerNorm) is left dividing:
the ``Mul`` there would cost a float pass over the tensor and keep onnxruntime from fusing the
quantizer into the kernel before it, for codes that do not change. A ``Softmax`` is not left:
onnxruntime's ``QLinearSoftmax`` (a table-driven exp) is not the fake-quant softmax (it puts
some probabilities one step away on the same input codes, far more often than ties do), and
the ``Mul`` keeps the softmax float.

Two passes that move no value and save onnxruntime a float pass over a tensor on every run
(it keeps each DequantizeLinear where the graph puts it), and one that lets it fuse a linear layer
whole:

``shapes_of_codes``: a ``Shape`` that reads a DequantizeLinear's output reads its codes instead
(the same shape; torch's trace sizes attention's reshapes by the dequantized scores, and
onnxruntime gave each ``Shape`` its own copy of the DequantizeLinear).

``gather_codes``: ``Gather(DequantizeLinear(codes, s, z), i)`` of a constant table with a
per-tensor grid becomes ``DequantizeLinear(Gather(codes, i), s, z)``: the rows the input reads
are dequantized, not the whole table (the sinusoidal positions: 6002 rows on every run).

``code_caches``: a decoding cache kept as codes (``qswap.export.decoder_step``) enters as
``DequantizeLinear(codes)``, meets the new rows' ``DequantizeLinear(QuantizeLinear(k))`` in a
``Concat`` (through a ``Reshape`` or two) and leaves through a ``QuantizeLinear`` on the same grid.
The pass writes ``DequantizeLinear(Concat(codes, QuantizeLinear(k)))`` and the codes themselves
as the output: the same values (concatenating codes, then dequantizing, is dequantizing, then
concatenating; a grid value quantized on its own grid is its code), one dequantization of the
whole cache instead of a float copy, and attention matmuls that read a DequantizeLinear, which
onnxruntime runs on integers.

``relu_lookups``: the FFN's ``DequantizeLinear`` (the activation's grid) -> ``Relu`` ->
``QuantizeLinear`` (fc2's input grid) requantizes every hidden value from one grid to another in
two float passes. The ``Relu`` becomes ``LeakyRelu(alpha=0)``, which onnxruntime fuses with the
two into ``QLinearLeakyRelu``: a table of the 256 codes' results, built by the same dequantize,
max(x, 0) (``-0.0`` for a negative value, which quantizes as ``0.0`` does) and quantize
(division by the scale, as the ``QuantizeLinear`` did), one read of the codes and one write. Only
where the ``QuantizeLinear`` divides (``quantize_by_inverse`` found it a divisor, or left it
dividing): a ``Mul`` by ``1 / s`` before it keeps the float passes.

``integer_entry`` (the decoder step only: it needs the integer model's tables, which
``qswap.export.decoder_step`` passes): the decoder's entry, ``embed_scale`` times a token row
plus a position row, traces to a float ``Add`` of two ``DequantizeLinear`` outputs (their grids
differ, and the sum lands on neither). The integer model (``QTransformerDecoderScriptable.
folded_tables``) adds the two rows in int32 on a grid 2^-16 of the finest grid that reads the
sum, each table rounded onto it once. The pass adds exactly that int32 sum: each table's codes, looked
up as before, go through a ``Cast`` to int32 and a ``Gather`` from a table of 256 int32 values
(the folded value of each code: one per code, or the pass leaves the ``Add`` float), the two
are added in int32 and one ``DequantizeLinear`` of that grid hands the sum to its readers'
``QuantizeLinear`` nodes. Those round half to even where the integer model's requantization
rounds a tie up: the codes differ only where the sum lies exactly halfway between two of a
reader's steps. The lookup keeps the int8 (or INT4) codes in the file: the folded tables
themselves, int32, would add four bytes per table entry.

``linear_as_gemm``: a linear layer traces to ``MatMul(x, Transpose(W))`` and an ``Add`` of the
bias, on (T, B, C) inputs. onnxruntime fuses the QDQ MatMul alone (``MatMulIntegerToFloat``: a
float output, then the bias added and the output quantized in two more float passes); a 2-D
``Gemm`` with the int32 bias it fuses whole (``QGemm``: the bias added in int32, the output
requantized in the kernel), as it does itself when the shapes are static. The pass writes
``Reshape(Gemm(DequantizeLinear(Flatten(codes)), W, bias), (*leading, N))``: the same
products and bias on the same grids; the output rounds from the int32 sum scaled once, where
``MatMulIntegerToFloat`` scales it and adds the float bias before rounding (codes equal but
for near-ties, measured by ``tools/onnx_sites.py``).
"""
from __future__ import annotations

import numpy as np


def fold_constant_scales(model) -> int:
    """Fold every positive scalar ``Mul`` after a single-reader DequantizeLinear into its
    scale (in place). Returns the number of folds."""
    from onnx import numpy_helper

    graph = model.graph
    producer, readers, values = index_graph(graph)
    outputs = {out.name for out in graph.output}
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
            if mul.output[0] in outputs:  # keep the graph output's name: the DequantizeLinear (the Mul
                dq.output[0] = mul.output[0]  # its only reader) writes it, for every reader of it
            else:
                for reader in readers.get(mul.output[0], []):
                    for i, name in enumerate(reader.input):
                        if name == mul.output[0]:
                            reader.input[i] = dq.output[0]
            folded.append(mul)
            break
    rewrite_nodes(graph, [(mul, ()) for mul in folded])
    return len(folded)


def index_graph(graph):
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


MOVES_VALUES = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"})  # each value kept as is


def _per_tensor_grid(node, values) -> "tuple | None":
    """A (De)QuantizeLinear's constant per-tensor scale and zero point as a comparable key
    ((dtype, bytes) of each: equal keys, the same grid and code type), or None."""
    consts = [values(name) for name in node.input[1:3]]
    if len(consts) < 2 or any(c is None or c.size != 1 for c in consts):
        return None
    return tuple((c.dtype.str, c.reshape(()).tobytes()) for c in consts)


def code_caches(model) -> int:
    """Concatenate codes, not their values, and let a ``QuantizeLinear`` of values on its own grid
    read the codes they came from (in place; module docstring). Only per-tensor grids with
    constant scales and zero points, through ``MOVES_VALUES`` ops and ``Concat``. Returns the
    number of Concat and QuantizeLinear nodes rewritten."""
    from onnx import helper

    graph = model.graph
    producer, _, values = index_graph(graph)
    made: dict[tuple, str] = {}  # (value name, grid) -> the name of its codes

    def grid(node) -> "tuple | None":
        return _per_tensor_grid(node, values)

    def dequantized(name: str):
        """The DequantizeLinear whose values ``name`` moves or concatenates (its first part), or None."""
        node = producer.get(name)
        while node is not None and (node.op_type in MOVES_VALUES or node.op_type == "Concat"):
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def codes_of(name: str, key: tuple, new: list) -> "str | None":
        """The name of codes that dequantize on ``key`` to ``name``'s values, or None; the nodes
        that compute them are appended to ``new``."""
        node, codes = producer.get(name), None
        if (name, key) in made or node is None:
            return made.get((name, key))
        if node.op_type == "DequantizeLinear":
            codes = node.input[0] if grid(node) == key else None
        elif node.op_type in MOVES_VALUES or node.op_type == "Concat":
            moved = node.input[:1] if node.op_type in MOVES_VALUES else node.input  # the rest: shapes
            inner = [codes_of(i, key, new) for i in moved]
            if None not in inner:
                codes = f"{name}/codes"
                new.append(helper.make_node(node.op_type, [*inner, *node.input[len(moved):]], [codes],
                                            name=f"{node.name}/codes", **_attributes(node)))
        if codes is not None:
            made[(name, key)] = codes
        return codes

    instead: list[tuple] = []
    renames: dict[str, str] = {}  # codes a new node writes -> the QuantizeLinear output they replace
    for node in graph.node:
        if node.op_type not in ("Concat", "QuantizeLinear"):
            continue
        new: list = []
        known = dict(made)  # a failed attempt's codes are never written: forget them
        if node.op_type == "Concat":
            dq = dequantized(node.input[0])
            codes = codes_of(node.output[0], grid(dq), new) if dq is not None and grid(dq) else None
            if codes is not None:
                new.append(helper.make_node("DequantizeLinear", [codes, *dq.input[1:]], [node.output[0]],
                                            name=f"{node.name}/dequantize"))
                instead.append((node, tuple(new)))
        elif grid(node) is not None:
            codes = codes_of(node.input[0], grid(node), new)
            if codes is not None and new:
                renames[codes] = node.output[0]
                instead.append((node, tuple(new)))
            elif codes is not None:  # codes the graph has already: handed out as they are
                instead.append((node, (helper.make_node("Identity", [codes], [node.output[0]],
                                                        name=f"{node.name}/codes"),)))
        if not instead or instead[-1][0] is not node:
            made.clear()
            made.update(known)
    if instead:
        rewrite_nodes(graph, instead)
        for n in graph.node:
            n.input[:] = [renames.get(i, i) for i in n.input]
            n.output[:] = [renames.get(o, o) for o in n.output]
        _drop_unread(graph)
    return len(instead)


def relu_lookups(model) -> int:
    """Make each ``DequantizeLinear -> Relu -> QuantizeLinear`` (constant per-tensor grids, each
    value read by the next node alone) a ``LeakyRelu(alpha=0)`` between them (in place; module
    docstring). Returns the number rewritten."""
    from onnx import helper

    producer, readers, values = index_graph(model.graph)
    outputs = {o.name for o in model.graph.output}
    rewritten = 0
    for node in model.graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Relu" else None
        quantizers = readers.get(node.output[0], [])
        # onnxruntime fuses a chain whose values nothing else reads; elsewhere a LeakyRelu would
        # stay float where it folds a Relu into the QuantizeLinear after it
        if (dq is None or dq.op_type != "DequantizeLinear" or len(quantizers) != 1
                or len(readers.get(dq.output[0], [])) != 1 or node.output[0] in outputs
                or quantizers[0].op_type != "QuantizeLinear"):
            continue
        grids = _per_tensor_grid(dq, values), _per_tensor_grid(quantizers[0], values)
        if None in grids or grids[0][1][0] != grids[1][1][0]:  # fused: one code type (the zero points')
            continue
        node.op_type = "LeakyRelu"
        node.attribute.append(helper.make_attribute("alpha", 0.0))
        rewritten += 1
    return rewritten


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


FUSED_GROUPS = frozenset({"Add", "MatMul", "Conv", "Mul", "Gemm"})
# ops whose output holds values of their (first) input, or a fixed function of each one: a
# quantizer reading their output reads the grid of the DequantizeLinear before them
GRID_KEEPING = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice",
                          "Gather", "Expand", "Relu", "MaxPool", "Where", "Mul"})
READS_A_GRID = frozenset({"DequantizeLinear", "Softmax", "constant"})  # Softmax: see the module docstring
UNIT_SCALE = "unit_scale"


def quantize_by_inverse(model) -> int:
    """Rewrite every per-tensor ``QuantizeLinear(x, s, z)`` (a constant scalar scale) that reads
    a grid or a softmax as ``QuantizeLinear(x * float32(1 / s), 1, z)`` (in place; module
    docstring). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer, _, values = index_graph(graph)
    rewritten: list[tuple] = []
    inverses: dict[str, str] = {}  # scale initializer -> its inverse's (one per grid, short names)
    for q in graph.node:
        scale = values(q.input[1]) if q.op_type == "QuantizeLinear" and len(q.input) > 1 else None
        if (scale is None or scale.size != 1 or scale.dtype != np.float32 or _closes_fused_group(q, producer, values)
                or _source(q.input[0], producer, values) not in READS_A_GRID):
            continue
        divisor = _exact_divisor(q, scale.reshape(()), producer, values)
        if divisor is not None:  # x / divisor rounds as x * (1 / s) on every value the grid holds
            if divisor != scale.reshape(()):
                graph.initializer.append(numpy_helper.from_array(divisor, f"{q.input[1]}/divisor"))
                q.input[1] = f"{q.input[1]}/divisor"
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
    rewrite_nodes(graph, [(q, (mul, q)) for q, mul in rewritten])  # each Mul right before its
    return len(rewritten)  # QuantizeLinear: the graph stays sorted


def _closes_fused_group(q, producer: dict, values) -> bool:
    """Whether ``q`` quantizes the output of an op onnxruntime fuses with its DequantizeLinear
    inputs and ``q`` into one integer kernel."""
    op = producer.get(q.input[0])
    if op is None or op.op_type not in FUSED_GROUPS:
        return False
    inputs = [name for name in op.input if name and values(name) is None]
    return bool(inputs) and all(name in producer and producer[name].op_type == "DequantizeLinear" for name in inputs)


def _source(name: str, producer: dict, values) -> str:
    """The op a value comes from, looking through GRID_KEEPING ops with one computed data input
    (a ``Mul`` by a constant, a ``Where`` filling with a constant): ``DequantizeLinear`` for a
    grid, "constant" for a constant, "input" for a graph input."""
    if values(name) is not None:
        return "constant"
    node = producer.get(name)
    while node is not None and node.op_type in GRID_KEEPING:
        data = [i for i in _data_inputs(node) if i and values(i) is None]
        if len(data) != 1:
            break
        node = producer.get(data[0])
    return "input" if node is None else node.op_type


def _data_inputs(node) -> list[str]:
    if node.op_type == "Where":  # condition, then the two branches
        return list(node.input[1:])
    return list(node.input[:2] if node.op_type == "Mul" else node.input[:1])


def shapes_of_codes(model) -> int:
    """Point every ``Shape`` of a DequantizeLinear output at the DequantizeLinear's codes (in
    place; module docstring). Returns the number rewired."""
    producer, _, _ = index_graph(model.graph)
    rewired = 0
    for node in model.graph.node:
        dq = producer.get(node.input[0]) if node.op_type == "Shape" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            node.input[0] = dq.input[0]
            rewired += 1
    _drop_unread(model.graph)
    return rewired


def gather_codes(model) -> int:
    """Rewrite ``Gather(DequantizeLinear(codes, s, z), i)`` of a constant per-tensor table as
    ``DequantizeLinear(Gather(codes, i), s, z)`` (in place; module docstring). Returns the
    number rewritten."""
    from onnx import helper

    graph = model.graph
    producer, readers, values = index_graph(graph)
    after: list[tuple] = []  # (a Gather, (the Gather, the DequantizeLinear put after it))
    for gather in graph.node:
        dq = producer.get(gather.input[0]) if gather.op_type == "Gather" else None
        if (dq is None or dq.op_type != "DequantizeLinear" or values(dq.input[0]) is None
                or any(values(name) is None or values(name).size != 1 for name in dq.input[1:] if name)):
            continue
        codes = f"{gather.output[0]}/codes"
        name = dq.name if len(readers[dq.output[0]]) == 1 else f"{dq.name}/{gather.name}"
        new_dq = helper.make_node("DequantizeLinear", [codes, *dq.input[1:]], [gather.output[0]], name=name)
        gather.input[0], gather.output[0] = dq.input[0], codes
        after.append((gather, (gather, new_dq)))
    rewrite_nodes(graph, after)
    _drop_unread(graph)
    return len(after)


def _drop_unread(graph) -> None:
    """Remove the nodes no kept node and no graph output reads (a DequantizeLinear a rewrite
    bypassed, and what only it read): one sweep from the last node back, the graph being sorted."""
    read = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in read for out in node.output):
            kept.append(node)
            read.update(node.input)
    if len(kept) < len(graph.node):
        set_nodes(graph, kept[::-1])


def rewrite_nodes(graph, instead: list[tuple]) -> None:
    """For each ``(node, new)`` of ``instead``: put ``new`` (a tuple of nodes, ``node`` itself
    among them or not; ``()`` drops it) in the place of ``node``, a node of ``graph``, in one
    rebuild of the node list (``set_nodes``). Nodes are matched by identity: protobuf gives the
    same Python object for an element while one is alive (``instead`` holds them), and may reuse
    the id of one that is not."""
    if instead:
        by_id = {id(node): new for node, new in instead}
        set_nodes(graph, [n for node in graph.node for n in by_id.get(id(node), (node,))])


def set_nodes(graph, nodes: list) -> None:
    """Make ``graph.node`` the list ``nodes`` (messages of it, or new ones), in that order."""
    nodes = [_copy(node) for node in nodes]  # the repeated field's own messages go when it is cleared
    del graph.node[:]
    graph.node.extend(nodes)


def _copy(node):
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    return out


def linear_as_gemm(model) -> int:
    """Rewrite each ``MatMul(DequantizeLinear(codes), [Transpose] DequantizeLinear(W))`` of a
    constant 2-D weight, with the ``Add`` of a constant 1-D DequantizeLinear bias after it, as
    Flatten -> Gemm -> Reshape (in place; module docstring). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer, readers, values = index_graph(graph)
    replaced: list[tuple] = []
    rows: dict[str, str] = {}  # codes -> their flattened DequantizeLinear's output
    for mm in graph.node:
        linear = _linear(mm, producer, readers, values) if mm.op_type == "MatMul" else None
        if linear is None:
            continue
        x_dq, weight, trans_b, add, bias = linear
        codes, p = x_dq.input[0], mm.name  # (..., K) codes; p names the new values
        n_out = numpy_helper.from_array(np.array([values(weight.input[0]).shape[0 if trans_b else 1]], np.int64),
                                        f"{p}/out_features")
        graph.initializer.append(n_out)
        out = add.output[0] if add is not None else mm.output[0]
        nodes = []
        if codes not in rows:  # one flattened input for the layers that read the same codes (q, k, v)
            rows[codes] = f"{codes}/rows"
            nodes += [helper.make_node("Flatten", [codes], [f"{codes}/rows_codes"], axis=-1),  # (rows, K)
                      helper.make_node("DequantizeLinear", [f"{codes}/rows_codes", *x_dq.input[1:]], [rows[codes]],
                                       name=f"{x_dq.name}/rows")]
        nodes += [helper.make_node("Gemm", [rows[codes], weight.output[0]] + ([bias] if bias else []), [f"{p}/y"],
                                   name=f"{p}/Gemm", transB=int(trans_b)),  # (rows, N)
                  helper.make_node("Shape", [codes], [f"{p}/leading"], end=-1),
                  helper.make_node("Concat", [f"{p}/leading", n_out.name], [f"{p}/shape"], axis=0),
                  helper.make_node("Reshape", [f"{p}/y", f"{p}/shape"], [out], name=f"{p}/Reshape")]  # (..., N)
        replaced.append((add if add is not None else mm, nodes))
        mm.output[0] = f"{p}/unread"
    rewrite_nodes(graph, replaced)  # the new nodes in place of the Add (or
    _drop_unread(graph)  # MatMul): every input is computed before it
    return len(replaced)


def _linear(mm, producer: dict, readers: dict, values):
    """(input DequantizeLinear, weight DequantizeLinear, transB, bias Add or None, bias name) of
    a MatMul with a constant 2-D weight on a grid, or None."""
    x_dq, w = producer.get(mm.input[0]), producer.get(mm.input[1])
    trans_b = w is not None and w.op_type == "Transpose" and list(w.attribute[0].ints) == [1, 0]
    if trans_b:
        w = producer.get(w.input[0])
    if (x_dq is None or x_dq.op_type != "DequantizeLinear" or w is None or w.op_type != "DequantizeLinear"
            or values(w.input[0]) is None or values(w.input[0]).ndim != 2):
        return None
    add = readers.get(mm.output[0], [])
    add = add[0] if len(add) == 1 and add[0].op_type == "Add" else None
    bias = None if add is None else next(i for i in add.input if i != mm.output[0])
    b_dq = producer.get(bias) if bias else None
    if b_dq is None or b_dq.op_type != "DequantizeLinear" or values(b_dq.input[0]) is None or values(b_dq.input[0]).ndim != 1:
        add = bias = None
    return x_dq, w, trans_b, add, bias


def _exact_divisor(q, scale: np.float32, producer: dict, values) -> "np.float32 | None":
    """For a QuantizeLinear reading a grid: a divisor ``d`` (``s`` itself, else a float32 a few
    ulps away) with ``round(x / d) == round(x * float32(1 / s))`` for every value ``x`` the grid
    can bring it (its 256 codes through the ops between), so that onnxruntime's division gives
    the fake-quant codes without the ``Mul``; None when there is none or the values are unknown."""
    x = _grid_values(q.input[0], producer, values)
    if x is None:
        return None
    wanted = np.rint(x * (np.float32(1) / scale))
    candidates = [scale] + [np.float32(c) for k in range(1, 5)
                            for c in (_ulps(scale, k), _ulps(scale, -k))]
    return next((d for d in candidates if np.array_equal(np.rint(x / d), wanted)), None)


def _ulps(x: np.float32, k: int) -> np.float32:
    return (np.array(x, np.float32).view(np.int32) + np.int32(k)).view(np.float32)[()]


def _grid_values(name: str, producer: dict, values) -> "np.ndarray | None":
    """Every float32 value ``name`` can hold when it comes from a per-tensor DequantizeLinear
    through ``Relu``, a scalar constant ``Mul``, a constant-filling ``Where`` and data movement;
    None for anything else."""
    node = producer.get(name)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        scale, zero = values(node.input[1]), values(node.input[2]) if len(node.input) > 2 else np.uint8(0)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype not in (np.int8, np.uint8):
            return None
        info = np.iinfo(zero.dtype)
        codes = np.arange(info.min, info.max + 1, dtype=np.int32)
        return ((codes - np.int32(zero.reshape(()))).astype(np.float32) * np.float32(scale.reshape(())))
    if node.op_type not in GRID_KEEPING:
        return None
    data = [i for i in _data_inputs(node) if i and values(i) is None]
    constants = [values(i) for i in _data_inputs(node) if i and values(i) is not None]
    if len(data) != 1 or any(c.size != 1 for c in constants):
        return None
    x = _grid_values(data[0], producer, values)
    if x is None:
        return None
    if node.op_type == "Relu":
        return np.maximum(x, np.float32(0))
    if node.op_type == "Mul":
        return x * np.float32(constants[0].reshape(()))
    if node.op_type == "Where":
        return np.concatenate([x, np.float32(constants[0].reshape((1,)))]) if constants else x
    return x


ENTRY_MOVES = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Slice"})


def integer_entry(model, tables: dict, scale: float) -> int:
    """Add two table lookups in int32 (in place; module docstring). ``tables``: the name of a
    per-tensor code table's initializer -> its folded int32 table (same shape: each code's value
    on the grid ``scale``). An ``Add`` is rewritten where each of its inputs comes from a
    ``DequantizeLinear`` of a ``Gather`` from one of these tables, through ``ENTRY_MOVES`` ops
    only, every value between them read by the next node alone, and each folded table is a function of its codes (a value per
    code). Returns the number of ``Add`` nodes rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producer, readers, values = index_graph(graph)
    outputs = {out.name for out in graph.output}
    edits: list[tuple] = []
    retyped: set[str] = set()  # values that were float and are int32 now
    added: set[str] = set()  # the lookup tables written
    rewritten = 0
    for add in graph.node:
        if add.op_type != "Add":
            continue
        sides = [_table_lookup(name, tables, producer, readers, outputs) for name in add.input[:2]]
        if None in sides:
            continue
        luts = [_code_lut(values(gather.input[0]), tables[gather.input[0]]) for gather, _, _ in sides]
        if any(lut is None for lut in luts):
            continue
        for (gather, dq, chain), lut in zip(sides, luts):
            retyped.update(chain)
            lut_name, wide = f"{gather.input[0]}/folded_by_code", f"{dq.name}/codes_int32"
            if lut_name not in added:  # a table two entries read: one lookup table
                graph.initializer.append(numpy_helper.from_array(lut, lut_name))
                added.add(lut_name)
            cast = helper.make_node("Cast", [gather.output[0]], [wide], name=f"{dq.name}/to_int32",
                                    to=TensorProto.INT32)
            look = helper.make_node("Gather", [lut_name, wide], [dq.output[0]], name=f"{dq.name}/folded")
            edits.append((dq, (cast, look)))
        summed = f"{add.output[0]}/int32"
        scale_name, zero_name = f"{add.name}/entry_scale", f"{add.name}/entry_zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name),
                                  numpy_helper.from_array(np.array(0, dtype=np.int32), zero_name)])
        dq = helper.make_node("DequantizeLinear", [summed, scale_name, zero_name], [add.output[0]],
                              name=f"{add.name}/DequantizeLinear")
        add.output[0] = summed
        edits.append((add, (add, dq)))
        rewritten += 1
    rewrite_nodes(graph, edits)
    if retyped:  # a float type recorded for a value that now holds int32 would fail the load
        kept = [v for v in graph.value_info if v.name not in retyped]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return rewritten


def _table_lookup(name: str, tables: dict, producer: dict, readers: dict, outputs: set) -> "tuple | None":
    """(the Gather, the DequantizeLinear after it, the values from the DequantizeLinear's output
    to ``name``) where ``name`` is a lookup of one of ``tables``'s codes, dequantized and then
    only moved, each value of the chain read by the next node alone (the chain turns int32: no
    other reader, no graph output); else None."""
    chain = [name]
    node = producer.get(name)
    while node is not None and node.op_type in ENTRY_MOVES:
        chain.append(node.input[0])
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    if any(len(readers.get(value, [])) != 1 or value in outputs for value in chain):
        return None
    gather = producer.get(node.input[0])
    if gather is None or gather.op_type != "Gather" or gather.input[0] not in tables:
        return None
    return gather, node, chain


def _code_lut(codes, folded) -> "np.ndarray | None":
    """The 256 int32 values, indexed by an 8-bit code as ONNX's ``Gather`` indexes (a negative
    index counts from the end), that map ``codes`` onto ``folded``; None where one code has two
    folded values (a per-channel grid) or the shapes differ."""
    folded = np.asarray(folded)
    if codes is None or codes.shape != folded.shape or codes.dtype not in (np.int8, np.uint8):
        return None
    lut = np.zeros(256, dtype=np.int32)
    flat_codes, flat_folded = codes.reshape(-1).astype(np.int64), folded.reshape(-1).astype(np.int64)
    order = np.argsort(flat_codes, kind="stable")
    sorted_codes, sorted_folded = flat_codes[order], flat_folded[order]
    first = np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]
    group = np.cumsum(first) - 1
    if not np.array_equal(sorted_folded, sorted_folded[first][group]):
        return None  # a code with two folded values
    lut[sorted_codes[first] % 256] = sorted_folded[first]
    return lut
