"""Deploy honesty: which nodes of an exported graph still compute in float once onnxruntime has
optimized it for CPU (its QDQ fusions turn DequantizeLinear -> op -> QuantizeLinear groups into
integer kernels; whatever it cannot fuse runs on floats).

Every node of the optimized graph falls in one bucket:

===========  ===============================================================================
bucket       nodes
===========  ===============================================================================
integer      integer kernels (QLinear*, MatMulInteger, ConvInteger, MatMulIntegerToFloat...), and
             arithmetic (not a ``Cast``, not of constants alone) on integer tensors whose result a
             DequantizeLinear reads: codes computed in integers (the decoder step's int32
             entry, ``graph_passes.integer_entry``)
quantize     QuantizeLinear / DequantizeLinear (conversions between the grid and floats), and a
             ``Mul`` by a constant read only by QuantizeLinear nodes of unit scale (the
             quantizer's ``x * (1 / s)``: ``qswap.export.graph_passes.quantize_by_inverse``)
movement     data movement and selection (Reshape, Transpose, Gather, Concat, Where...), and an
             ``Add`` of a padding mask's additive form, ``Where(mask, -inf, 0)`` of constants:
             each value kept or set to -inf (``qswap.nn.attention.padding_bias``)
index        arithmetic on integer or boolean tensors only, not read as codes (shapes, lengths,
             masks, casts of codes)
float        everything else: compute on float tensors, or an op this audit has no rule for
===========  ===============================================================================

>>> report = audit_onnx("encoder.onnx", site_prefix="encoder.")
>>> report.integer_count, [n.site for n in report.float_nodes]
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qswap.errors import DependencyError
from qswap.export.graph_passes import index_graph
from qswap.export.onnx import load_session
from qswap.markdown import table as markdown_table
from qswap.io.atomic import atomic_write_bytes

REPORT_VERSION = 1
INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization", "QLinearGelu"})
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "Gather", "GatherElements", "GatherND", "Unsqueeze", "Squeeze", "Concat",
    "Split", "Slice", "Shape", "Size", "Identity", "Expand", "Flatten", "Constant", "ConstantOfShape",
    "Range", "Where", "Tile", "Pad", "MaxPool"})
_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass
class FloatNode:
    """One node of the optimized graph that computes on floats."""

    name: str
    op_type: str
    site: str  # the qswap module the node came from, read from its name ("" when unknown)
    reason: str  # "float tensors" or "no rule for this op"


@dataclass
class DeployReport:
    """What onnxruntime's CPU optimization of an exported graph computes in integers and in floats.

    ``claims_honest``: whether the fake-quant model's audit said honest (None: not given); a
    claim of honest with float nodes in the deployed graph is reported by ``verdict``.
    """

    graph: str
    optimization: str
    nodes: int
    buckets: dict[str, int] = field(default_factory=dict)
    integer_ops: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    float_nodes: list[FloatNode] = field(default_factory=list)
    claims_honest: bool | None = None
    version: int = REPORT_VERSION

    @property
    def integer_count(self) -> int:
        return self.buckets.get("integer", 0)

    @property
    def float_count(self) -> int:
        return len(self.float_nodes)

    @property
    def verdict(self) -> str:
        if not self.float_nodes:
            return "integer"
        if self.claims_honest:
            return f"claims honest, deploys {self.float_count} float nodes"
        return f"{self.float_count} float nodes"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict, "integer_count": self.integer_count,
                "float_count": self.float_count}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, max_rows: int | None = None, heading: str = "#") -> str:
        lines = [f"{heading} Deploy honesty: {self.graph}", "",
                 f"onnxruntime CPU, optimization {self.optimization}: **{self.verdict}**; "
                 f"{self.nodes} nodes, {self.integer_count} integer.", ""]
        lines += markdown_table(["bucket", "nodes"], [[k, v] for k, v in self.buckets.items()])
        lines += markdown_table(["float op", "nodes"], [[k, v] for k, v in sorted(self.float_ops.items())])
        rows = self.float_nodes if max_rows is None else self.float_nodes[:max_rows]
        lines += markdown_table(["float node", "op", "qswap site", "why"],
                                [[f"`{n.name}`", n.op_type, f"`{n.site}`" if n.site else "-", n.reason]
                                 for n in rows])
        if len(rows) < len(self.float_nodes):
            lines += [f"... {len(self.float_nodes) - len(rows)} more (see the JSON report)", ""]
        return "\n".join(lines) + "\n"


def audit_onnx(path: "str | os.PathLike[str]", *, level: str = "extended", site_prefix: str = "",
               claims_honest: bool | None = None,
               save_optimized: "str | os.PathLike[str] | None" = None) -> DeployReport:
    """Optimize the graph at ``path`` as an onnxruntime CPU session does (``level``: "basic",
    "extended" or "all"), and classify the optimized graph's nodes; ``save_optimized``: also
    write the optimized graph there (atomically). Each float node's site is read from the map of
    scope paths to module paths qswap's export records in the graph (``qswap.export.sites``); a
    graph without one (written before qswap recorded it) has the module path read from the node's
    name (``site_of``), with ``site_prefix`` put before it (``"encoder."`` for an exported encoder).
    Raises ExportError for a missing or unreadable graph file."""
    from qswap.export.sites import from_metadata, site_in

    onnx = _onnx()
    with tempfile.TemporaryDirectory(prefix="qswap-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = load_session(path, optimized_path=str(optimized), level=level)
        sites = from_metadata(session.get_modelmeta().custom_metadata_map)
        if save_optimized is not None:
            atomic_write_bytes(save_optimized, optimized.read_bytes())
        model = onnx.load(str(optimized))
    model = onnx.shape_inference.infer_shapes(model)  # dtypes of the standard ops' tensors
    dtypes = _tensor_types(model)
    report = DeployReport(graph=Path(path).name, optimization=level, nodes=len(model.graph.node),
                          claims_honest=claims_honest)
    buckets: Counter = Counter()
    integer_ops: Counter = Counter()
    float_ops: Counter = Counter()
    index = index_graph(model.graph)  # producers, readers, constants: shared by the two rules
    quantizer_muls, mask_adds = _quantizer_muls(model.graph, index), _mask_adds(model.graph, index)
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.output[0] in quantizer_muls:
            bucket, reason = "quantize", ""
        elif node.output[0] in mask_adds:
            bucket, reason = "movement", ""
        else:
            bucket, reason = _classify(node, dtypes)
        if (bucket == "index" and node.output[0] in dequantized and node.op_type != "Cast"
                and not all(name in constants for name in node.input if name)):
            bucket = "integer"  # arithmetic whose integer result a DequantizeLinear reads as codes
        buckets[bucket] += 1
        if bucket == "integer":
            integer_ops[node.op_type] += 1
        elif bucket == "float":
            float_ops[node.op_type] += 1
            site = site_of(node.name, site_prefix) if sites is None else site_in(node.name, sites)
            report.float_nodes.append(FloatNode(node.name, node.op_type, site, reason))
    report.buckets = {k: buckets.get(k, 0) for k in ("integer", "quantize", "movement", "index", "float")}
    report.integer_ops, report.float_ops = dict(integer_ops), dict(float_ops)
    return report


def _classify(node, dtypes: dict[str, int]) -> tuple[str, str]:
    if node.op_type in INTEGER_OPS:
        return "integer", ""
    if node.op_type in QUANTIZE_OPS:
        return "quantize", ""
    if node.op_type == "Clip" and _integer_typed(node, dtypes):
        return "quantize", ""  # codes saturated to a grid with fewer codes (qswap.export.qdq): the quantizer's
    if node.op_type in MOVEMENT_OPS:
        return "movement", ""
    types = [dtypes.get(name) for name in (*node.input, *node.output) if name]
    if any(t in _FLOAT_TYPES for t in types):
        return "float", "float tensors"
    if types and all(t is not None for t in types):
        return "index", ""
    return "float", "no rule for this op"  # an unknown op on tensors of unknown type: a finding


def _integer_typed(node, dtypes: dict[str, int]) -> bool:
    types = [dtypes.get(name) for name in (*node.input, *node.output) if name]
    return bool(types) and all(t is not None and t not in _FLOAT_TYPES for t in types)


def _quantizer_muls(graph, index) -> set[str]:
    """Outputs of the ``Mul`` nodes by a constant whose every reader is a QuantizeLinear of unit
    scale: the quantizer's multiplication by ``1 / s`` (``quantize_by_inverse``). ``index``:
    ``index_graph(graph)``."""
    _, readers, values = index

    def unit_quantize(node) -> bool:
        scale = values(node.input[1]) if node.op_type == "QuantizeLinear" and len(node.input) > 1 else None
        return scale is not None and scale.size == 1 and float(scale.reshape(())) == 1.0

    return {node.output[0] for node in graph.node if node.op_type == "Mul" and readers.get(node.output[0])
            and all(unit_quantize(r) for r in readers[node.output[0]]) and any(values(i) is not None for i in node.input)}


def _mask_adds(graph, index) -> set[str]:
    """Outputs of the ``Add`` nodes of a value and a ``Where(mask, -inf, 0)`` whose two branches
    are scalar constants: a padding mask added to the scores (``padding_bias``), which keeps each
    value or sets it to -inf, the selection a ``Where`` on the scores makes. ``index``:
    ``index_graph(graph)``."""
    values = index[2]

    def scalar(name: str) -> float | None:
        value = values(name)
        numeric = value is not None and value.size == 1 and value.dtype.kind == "f"
        return float(value.reshape(())) if numeric else None

    masks = {node.output[0] for node in graph.node if node.op_type == "Where" and len(node.input) == 3
             and scalar(node.input[1]) == float("-inf") and scalar(node.input[2]) == 0.0}
    return {node.output[0] for node in graph.node
            if node.op_type == "Add" and len(node.input) == 2 and sum(i in masks for i in node.input) == 1}


# ops whose inputs and output share one element type (ONNX's single type T), read from the one
# that shape inference knows: a Clip of the uint8 codes a fused integer kernel (a contrib op,
# which onnx's shape inference does not type) wrote, with uint8 bounds (a low-bit activation grid)
_ONE_TYPE_OPS = frozenset({"Clip"})


def _tensor_types(model) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in (*graph.input, *graph.output, *graph.value_info):
        elem = info.type.tensor_type.elem_type
        if elem:
            types[info.name] = elem
    for node in graph.node:
        if node.op_type in _ONE_TYPE_OPS:
            names = [name for name in (*node.input, *node.output) if name]
            known = {types[name] for name in names if name in types}
            if len(known) == 1:
                types.update(dict.fromkeys(names, known.pop()))
    return types


def site_of(node_name: str, prefix: str = "") -> str:
    """The qswap module path in a node name written by torch's exporter: the components before
    the first op name (capitalized), ``/transformer_layers.0/self_attn/core/MatMul/MatMulScaleFusion/``
    -> ``transformer_layers.0.self_attn.core``; onnxruntime names a fused node after the node the
    fusion starts from. "" when the name has no module path. Only right where the traced module
    called each module through its parent (torch names a node after the calls it ran in, each by
    the module's last attribute name): the audit's fallback for graphs without qswap's site map
    (``qswap.export.sites``)."""
    parts = []
    for part in (p for p in node_name.split("/") if p):
        if part[:1].isupper():
            break
        parts.append(part)
    return prefix + ".".join(parts) if parts else ""


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise DependencyError("the deploy audit needs onnx: pip install onnx==1.23.2") from e
    return onnx


@dataclass
class DeployAudit:
    """The deploy honesty of every graph of an export directory (``qswap audit DIR --onnx``)."""

    directory: str
    recipe: str
    claims_honest: bool | None
    graphs: list[DeployReport]
    version: int = REPORT_VERSION

    @property
    def float_count(self) -> int:
        return sum(g.float_count for g in self.graphs)

    @property
    def integer_count(self) -> int:
        return sum(g.integer_count for g in self.graphs)

    @property
    def integer_only(self) -> bool:
        return self.float_count == 0

    @property
    def verdict(self) -> str:
        if self.integer_only:
            return "INTEGER: every compute node runs an integer kernel"
        if self.claims_honest:
            return (f"CLAIMS HONEST, DEPLOYS FLOAT: the fake-quant audit says honest, the deployed "
                    f"graphs compute {self.float_count} nodes in float")
        return f"FLOAT NODES: the deployed graphs compute {self.float_count} nodes in float"

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "recipe": self.recipe, "claims_honest": self.claims_honest,
                "verdict": self.verdict, "integer_count": self.integer_count,
                "float_count": self.float_count, "version": self.version,
                "graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_markdown(self, max_rows: int | None = None) -> str:
        claims = {True: "honest", False: "not honest", None: "not audited"}[self.claims_honest]
        lines = [f"# qswap deploy audit: {self.directory}", "",
                 f"Verdict: **{self.verdict}** (recipe: {self.recipe}; fake-quant audit: {claims})", ""]
        lines += markdown_table(["graph", "nodes", "integer", "float"],
                                [[g.graph, g.nodes, g.integer_count, g.float_count] for g in self.graphs])
        return "\n".join(lines) + "\n" + "".join(g.to_markdown(max_rows, heading="##") for g in self.graphs)


def audit_export(directory: "str | os.PathLike[str]", *, level: str = "all",
                 save_optimized: "str | os.PathLike[str] | None" = None) -> DeployAudit:
    """``audit_onnx`` of every graph of an export directory (``qswap export --onnx``), with the
    recipe and the fake-quant audit's verdict recorded at export; ``save_optimized``: a folder to
    write each optimized graph into (``<graph>.<level>.onnx``)."""
    from qswap.export.package import SITE_PREFIX, graph_paths, read_manifest

    import tempfile

    manifest = read_manifest(directory)
    paths = graph_paths(directory, manifest)  # a missing graph, or a directory that mixes exports, is
    # refused before anything is made
    if save_optimized is not None:
        _check_optimized_dir(Path(save_optimized))
    with tempfile.TemporaryDirectory(prefix="qswap-optimized-") as staging:
        graphs = [audit_onnx(path, level=level, site_prefix=SITE_PREFIX[name], claims_honest=manifest.claims_honest,
                             save_optimized=None if save_optimized is None else Path(staging) / f"{name}.{level}.onnx")
                  for name, path in paths.items()]
        if save_optimized is not None:  # every graph audited: only now the folder and its files
            _publish(Path(staging), Path(save_optimized))
    return DeployAudit(str(directory), manifest.recipe, manifest.claims_honest, graphs)


def _check_optimized_dir(out: Path) -> None:
    """OutputError where ``out`` is an export's own folder (this one's or another's): the optimized
    graphs would lie among that export's files, which a later export over it keeps (they would then
    describe another model) and which no digest covers."""
    from qswap.errors import OutputError
    from qswap.export.package import OPTIMIZED, held_export

    kind = held_export(out)
    if kind is not None:
        what = "an ONNX export (export.json)" if kind == "onnx" else "an integer model export (model.json)"
        raise OutputError(f"--optimized-dir {out} holds {what}; the optimized graphs go into a folder of their "
                          f"own: pass another folder (the default is the audited export's {OPTIMIZED}/ folder)")


def _publish(staging: Path, out: Path) -> None:
    """Copy every optimized graph of ``staging`` into ``out`` (made where missing), each replacing
    its file atomically; OutputError where the folder cannot be made or written."""
    from qswap.errors import OutputError
    from qswap.io.atomic import atomic_write_bytes

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out} for the optimized graphs: {e.strerror}") from e
    for graph in sorted(staging.iterdir()):
        atomic_write_bytes(out / graph.name, graph.read_bytes())  # OutputError when it cannot be written
