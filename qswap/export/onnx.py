"""Export a calibrated qswap speech-to-text encoder (transformer or conformer,
``qswap.export.encoders``) as an ONNX QDQ graph with qswap's own grids.

Every quantized operand of the fake-quant model becomes QuantizeLinear -> DequantizeLinear with the
frozen scale and zero point of its qswap quantizer (no re-calibration by onnxruntime); weights
are int8 initializers (INT4, two codes a byte, where the weight quantizer is 4-bit) and biases
int32 initializers, each read by a DequantizeLinear. The padding
mask enters the graph only through the source lengths: attention adds it to the scores after the
softmax input quantizer, as 0 or -inf (``qswap.nn.attention.padding_bias``: the masked fill's
values), so -inf never reaches a quantizer.

>>> export_encoder(qmodel, "encoder.onnx", example_net_input)
>>> session = load_session("encoder.onnx")
>>> encoder_out, padding_mask = run_encoder(session, src_tokens, src_lengths)
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from qswap.errors import DataError, DependencyError, ExportError, QswapError, expect_module
from qswap.export.compact import compact as compact_graph
from qswap.export.encoders import encoder_graph
from qswap.export.graph_passes import (code_caches, fold_constant_scales, gather_codes, integer_entry,
                                        linear_as_gemm, quantize_by_inverse, relu_lookups, shapes_of_codes)
from qswap.export.qdq import BiasDQ, WeightDQ, swap_in_stand_ins
from qswap.io.atomic import atomic_write_bytes
from qswap.nn.base import check_finite_input
from qswap.quant.fake_quantize import FakeQuantize

OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 20  # per-channel QuantizeLinear; torch's TorchScript exporter's highest
logger = logging.getLogger("qswap")
INPUTS = ("src_tokens", "src_lengths")
OUTPUTS = ("encoder_out", "encoder_padding_mask")


def calibrated(quantizers: list[FakeQuantize]) -> bool:
    """Whether any of the activation ``quantizers`` has a frozen grid (calibrated, or loaded so)."""
    return any(q.initialized and bool(q.frozen) for q in quantizers)


def check_calibrated(model: nn.Module) -> None:
    """A typed error unless at least one quantizer of ``model`` has a frozen grid (a model that
    was converted but never calibrated would export observer defaults); a conversion whose recipe
    quantizes weights alone (w8_weight_only) has its own error, naming what to do."""
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantize) and m.kind == "activation"]
    recipe = getattr(model, "qswap_recipe", None)
    if not quantizers and any(isinstance(m, FakeQuantize) for m in model.modules()):  # weight quantizers only
        name = f"recipe {recipe.name!r}" if getattr(recipe, "name", None) else "the model's recipe"
        raise ExportError(f"{name} quantizes no activations: a recipe without activation quantizers cannot be "
                          f"exported as QDQ graphs of qswap's scales (every quantized op reads its inputs on a "
                          f"calibrated activation grid); convert the model with a recipe that quantizes "
                          f"activations (w8a8, w4a8...) and calibrate it, or export its graphs with float "
                          f"activations with allow_float=True (qswap.export.export_model and the export_* "
                          f"functions; 'qswap export --onnx' has no such option)")
    if not quantizers:
        converted = f"recipe {recipe.name!r} quantizes nothing: " if getattr(recipe, "name", None) else ""
        raise ExportError(f"{converted}the model has no qswap activation quantizers; convert it with a recipe "
                          f"that quantizes activations (qswap.convert: w8a8, w4a8...) and calibrate it "
                          f"(qswap.calibrate) before exporting")
    if not calibrated(quantizers):
        raise ExportError("the model is not calibrated (no activation quantizer has a frozen grid); "
                          "run qswap.calibrate on it, or load a calibrated checkpoint, then export")


def export_encoder(qmodel: nn.Module, path: "str | os.PathLike[str]", example: dict,
                   opset: int = OPSET, *, allow_float: bool = False, compact: bool = True) -> Path:
    """Write ``qmodel.encoder`` (a calibrated qswap conversion of a fairseq s2t model) to ``path``
    as an ONNX QDQ graph with dynamic batch and time axes. ``example`` is a ``net_input`` (its
    ``src_tokens`` and ``src_lengths`` are traced). The caller's model is not modified. The
    sinusoidal position table is exported at its current size (``max_source_positions``): longer
    inputs are outside the graph, as they are outside the model's trained range.
    Raises ExportError naming the site for an uncalibrated quantizer on the encoder's path or
    a grid ONNX QDQ cannot express. ``allow_float`` exports a model without quantizers too (a
    conversion with identity quantizers gives the float graph of the same structure, the
    reference of speed comparisons). ``compact``: see ``trace_to_onnx``."""
    expect_module(qmodel, "export_encoder()", ExportError)
    if not isinstance(example, dict) or not all(isinstance(example.get(k), torch.Tensor) for k in INPUTS):
        got = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ExportError(f"export_encoder's example is a net_input dict with the tensors {' and '.join(INPUTS)} "
                          f"(a batch the encoder takes: qswap.models.s2t_net_input(), or one of the data), got {got}")
    if not allow_float:
        check_calibrated(qmodel)
    graph = encoder_graph(copy.deepcopy(qmodel.encoder)).eval()
    return trace_to_onnx(graph, tuple(example[k] for k in INPUTS), path, INPUTS, OUTPUTS,
                         {"src_tokens": {0: "batch", 1: "frames"}, "src_lengths": {0: "batch"},
                          "encoder_out": {0: "out_frames", 1: "batch"},
                          "encoder_padding_mask": {0: "batch", 1: "out_frames"}}, opset, compact=compact,
                         sites=(graph.encoder, "encoder."))


def trace_to_onnx(graph: nn.Module, args: tuple, path: "str | os.PathLike[str]", inputs: tuple,
                  outputs: tuple, dynamic_axes: dict, opset: int = OPSET, *, compact: bool = True,
                  entry: "tuple[dict, float] | None" = None,
                  sites: "tuple[nn.Module, str] | None" = None, facts: "dict[str, str] | None" = None) -> Path:
    """Swap ``graph``'s quantizers for their ONNX stand-ins (in place: pass a copy), record the
    weight and bias codes with one eager forward on ``args``, trace, compact the graph without
    changing its values (``qswap.export.compact``: 4-bit weight codes stored as INT4, opset 21)
    and write ``path`` atomically. ``compact=False`` writes torch's graph as traced (int8 codes,
    opset ``opset``): the reference the compaction is tested against. ``entry``: (code table
    initializer -> folded int32 table, their grid) for ``graph_passes.integer_entry``.
    ``sites``: (the module holding ``graph``'s modules at their paths in the quantized model, the
    prefix of those paths): the graph's metadata then maps each scope path of its node names to
    the module it came from (``qswap.export.sites``; the deploy audit's sites). ``facts``: further
    metadata entries the graph carries (key -> text: the step graph's position limit, which the
    loader holds export.json to)."""
    from qswap.export.sites import METADATA_KEY, ScopeRecorder, site_map, to_metadata

    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset is an ONNX opset version from {MIN_OPSET} (QuantizeLinear per channel) to "
                          f"{MAX_OPSET} (torch's exporter), got {opset!r}; the default is {OPSET}")
    stand_ins = swap_in_stand_ins(graph, *(() if sites is None else (sites[0],)))  # the same stand-ins at
    # the quantized model's paths: the site map finds each traced module there
    with torch.no_grad(), warnings.catch_warnings():
        # the Python booleans the trace fixes (beam size 1, the position table's size) are
        # constant for one graph: the tracer's warnings about them say nothing to act on
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _record(graph, stand_ins, args)
        buffer = io.BytesIO()
        with ScopeRecorder(graph) as recorder:
            torch.onnx.export(graph, args, buffer, dynamo=False, opset_version=opset,
                              input_names=list(inputs), output_names=list(outputs), dynamic_axes=dynamic_axes)
    model = _onnx_module().load_model_from_string(buffer.getvalue())
    scopes = None  # from torch's node names, before the passes add nodes named after them
    if sites is not None:
        scopes = site_map(graph, recorder.calls, sites[0], sites[1], [n.name for n in model.graph.node])
    code_caches(model)
    gather_codes(model)  # before the fold: a table's rows times a constant (embed_scale) fold into their scale
    fold_constant_scales(model)
    quantize_by_inverse(model)
    relu_lookups(model)
    shapes_of_codes(model)
    linear_as_gemm(model)
    if entry is not None:
        integer_entry(model, *entry)
    _refuse_channel_grid_convs(model)
    if compact:
        four_bit = {f"{name}.codes" for name, m in graph.named_modules(remove_duplicate=False)
                    if isinstance(m, WeightDQ) and m.four_bit}
        packed = copy.deepcopy(model) if four_bit else model
        compact_graph(packed, four_bit)
        refusal = _refusal(packed) if four_bit else None
        if refusal is not None:
            # INT4 needs opset 21, where onnxruntime 1.32's QDQ propagation can insert a
            # QuantizeLinear whose output type and zero point disagree (an int8 table's rows
            # dequantized after their Gather, then reshaped: docs/deploy.md, sizes); its codes then
            # stay int8, opset 17: the same values, a larger file
            logger.info(f"{path}: 4-bit weight codes kept as int8 (opset {opset}): onnxruntime cannot optimize "
                        f"the INT4-packed graph ({refusal})")
            compact_graph(model, set())
        else:
            model = packed
    if scopes is not None:  # after the passes: the opset upgrade of the compaction keeps no metadata
        prop = model.metadata_props.add()
        prop.key, prop.value = METADATA_KEY, to_metadata(scopes)
    for key, value in (facts or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path


def _refuse_channel_grid_convs(model) -> None:
    """ExportError for what onnxruntime fuses into a QLinearConv that fails at every run: a Conv of a
    dequantized weight whose output a QuantizeLinear reads and whose input is a DequantizeLinear of
    several scales (an activation grid per channel; through data movement too, which onnxruntime's
    QDQ propagation moves the DequantizeLinear across): QLinearConv's input takes one scale. A Conv
    whose output no QuantizeLinear reads stays a float Conv and runs."""
    # element counts from the tensors' declared dims (no initializer is read: they hold the weights)
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = math.prod(node.attribute[0].t.dims)
    made_by = {out: node for node in model.graph.node for out in node.output}
    quantized = {name for node in model.graph.node if node.op_type == "QuantizeLinear" for name in node.input[:1]}

    def source(name: str):
        node = made_by.get(name)
        while node is not None and node.op_type in _MOVEMENT and node.input:
            node = made_by.get(node.input[0])
        return node

    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or not set(node.output) & quantized:
            continue
        x, weight = source(node.input[0]), source(node.input[1])
        if (x is not None and x.op_type == "DequantizeLinear" and sizes.get(x.input[1], 1) > 1
                and weight is not None and weight.op_type == "DequantizeLinear"):
            raise ExportError(f"{node.name}: the convolution's input is on a grid per channel, which "
                              f"onnxruntime's QLinearConv cannot run (its input takes one scale); quantize "
                              f"this convolution's input per tensor (recipe: granularity per_tensor for its "
                              f"activation)")


# single-input data movement onnxruntime's QDQ propagation carries a DequantizeLinear across
_MOVEMENT = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"})


def _refusal(model) -> str | None:
    """Why onnxruntime's CPU provider does not load ``model`` with its extended optimizations (the
    QDQ fusions ``qswap eval`` and the deploy audit run; the first line of its error), or None
    where it does; None without a working onnxruntime too (nothing to ask: loading the written
    graph then says what is missing)."""
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001  (not installed, or a broken install: OSError from its libraries)
        return None
    options = session_options(ort, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, threads=1)
    data = model.SerializeToString()
    try:
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own error types)
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def session_options(ort, level, threads: int):
    """onnxruntime session options as qswap runs its graphs: ``level`` of optimization, ``threads``
    per pool, fatal messages only (qswap says a failure in its own words), and the float inputs of
    weight-quantized MatMuls kept float: at the extended level onnxruntime fuses a weight's
    DequantizeLinear and a MatMul whose input the recipe leaves float into ``MatMulNBits``, whose
    default accuracy level (4) quantizes that input to int8 at run time, a rounding neither the
    recipe nor the fake-quant model has (grid steps off); accuracy level 1 computes it in float32."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.graph_optimization_level = level
    options.log_severity_level = 4
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return options


def _record(graph: nn.Module, stand_ins: list[nn.Module], args: tuple) -> None:
    """One eager forward that records the integer codes of every weight and bias it uses. The
    model failing on ``args`` (another feature dimension, a wrong dtype): an ExportError, before
    torch's tracer would print the graph it could not trace."""
    recorders = [m for m in stand_ins if isinstance(m, (WeightDQ, BiasDQ))]
    for m in recorders:
        m.recording = True
    try:
        graph(*args)
    except QswapError:  # qswap's own message (a ValueError subclass among them) says what to change
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        shapes = ", ".join(f"{getattr(a, 'dtype', type(a).__name__)}{list(getattr(a, 'shape', []))}" for a in args)
        raise ExportError(f"the model does not run on the example inputs ({shapes}): {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}; pass a batch "
                          f"of the data the model takes") from None
    finally:
        for m in recorders:
            m.recording = False


def load_session(path: "str | os.PathLike[str]", threads: int = 1, optimized_path: str | None = None,
                 level: str = "extended", spinning: bool = False, profile_prefix: str | None = None):
    """An onnxruntime CPU session of the graph at ``path``; ExportError for a missing or
    unreadable graph file, DependencyError when onnxruntime is not installed. ``spinning``: the
    pool's threads spin between runs, waiting for the next (onnxruntime's default); off, they
    yield the cores, which a decode needs between its steps: fairseq's beam search runs torch's
    own threads there. ``profile_prefix``: onnxruntime's profiler on, its JSON (the time of every
    node of every run) written under this prefix by ``session.end_profiling()``."""
    ort = _onnxruntime()
    path = Path(path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ExportError(f"onnxruntime threads must be a whole number >= 1, got {threads!r}")
    if level not in _LEVELS:
        raise ExportError(f"onnxruntime's optimization level is one of {', '.join(map(repr, _LEVELS))}, got {level!r}")
    if not path.is_file():
        raise ExportError(f"{path}: no ONNX graph there; write the directory with 'qswap export QCKPT --onnx -o DIR' "
                          f"(qswap.export.export_model)")
    options = session_options(ort, _LEVELS[level](ort), threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException types
        raise ExportError(f"{path}: onnxruntime cannot load this graph ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); re-export it") from e


_LEVELS = {
    "disabled": lambda ort: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def run_graph(session, outputs: list[str], feeds: dict) -> list:
    """``session.run(outputs, feeds)``; ExportError with onnxruntime's reason when it rejects the
    inputs (a dtype or rank the graph does not take, an input longer than a position table the
    graph holds)."""
    if not callable(getattr(session, "run", None)):
        raise ExportError(f"expected an onnxruntime session (qswap.export.load_session(path)), got "
                          f"{type(session).__name__}")
    try:
        return session.run(outputs, feeds)
    except Exception as e:  # onnxruntime raises its own InvalidArgument / RuntimeException / Fail types
        shapes = ", ".join(f"{k} {getattr(v, 'dtype', '?')}{list(getattr(v, 'shape', []))}" for k, v in feeds.items())
        raise ExportError(f"onnxruntime cannot run the exported graph on these inputs ({shapes}): "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}; pass inputs of the dtypes "
                          f"and ranks the graph declares, no longer than its position tables") from None


def run_encoder(session, src_tokens: torch.Tensor, src_lengths: torch.Tensor):
    """The encoder graph's outputs as torch tensors: (T', B, E) floats and (B, T') booleans.
    Features holding NaN or +-inf: a DataError, as the model it was exported from gives
    (``check_finite_input``)."""
    check_finite_input(src_tokens, "the exported encoder")
    check_lengths(src_tokens, src_lengths)
    out, padding = run_graph(session, list(OUTPUTS), {"src_tokens": src_tokens.detach().cpu().numpy(),
                                                      "src_lengths": src_lengths.detach().cpu().numpy()})
    return torch.from_numpy(out), torch.from_numpy(padding)


def check_lengths(src_tokens: torch.Tensor, src_lengths: torch.Tensor) -> None:
    """DataError for a length beyond the (B, T, F) features' T frames: the graph sizes its padding
    mask by the features, so such a length unmasked another utterance's padding and changed its
    transcript (fairseq's model raises a size mismatch)."""
    if src_lengths.numel() and int(src_lengths.max()) > src_tokens.shape[1]:
        raise DataError(f"src_lengths up to {int(src_lengths.max())} for features of {src_tokens.shape[1]} frames: "
                        f"each length is its utterance's frames, at most the padded batch's")


def _onnx_module():
    try:
        import onnx
    except ImportError as e:
        raise DependencyError("exporting ONNX graphs needs onnx: pip install onnx==1.23.2") from e
    return onnx


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise DependencyError("running exported graphs needs onnxruntime: pip install "
                              "onnxruntime==1.32.0") from e
    return onnxruntime
