"""A deployable directory: the ONNX graphs of a qswap model and ``export.json``, what
``qswap eval DIR --backend onnxruntime`` and ``qswap audit DIR --onnx`` read.

===========  =================================  ============================================
kind         models                             graphs
===========  =================================  ============================================
seq2seq      S2T transformer, S2T conformer     encoder.onnx, cross_kv.onnx, decoder_step.onnx
ctc          wav2vec 2.0 CTC                    ctc.onnx (``qswap.export.wav2vec2``)
===========  =================================  ============================================

``export.json`` (format 4) records the kind, the recipe, whether the fake-quant model's honesty
audit called it honest, the fairseq task config (so the deployed directory decodes a data
directory without the checkpoint), the decoder's size (0 for CTC), the graph files and each one's
SHA-256, the target dictionary's facts (a seq2seq export always; a CTC export where it was given
one), and the SHA-256 of all of that (``manifest_sha256``, ``manifest_digest``): an edit of any
field (a recipe renamed, the audit's verdict changed) is refused as an edited manifest. A
manifest without ``kind`` (written before CTC exports existed) is seq2seq.

Writing: each graph is written under a temporary name beside its final one and loaded by
onnxruntime; only when every graph loads are they renamed into place, and ``export.json`` is
written last. An export that fails before the renames (a graph onnxruntime cannot load, an
uncalibrated quantizer) leaves the directory as it was; a directory it created is removed again,
also after a failure during the renames. Before the renames the old export's ``export.json`` and
the graphs of the other kind (a CTC export replaced by a seq2seq one) are removed: one that fails
during the renames or the manifest's write (a full disk, an interrupt) in a directory that held an
export leaves no manifest, which reading refuses (re-export). ``graph_paths`` checks every graph
against its digest, so a directory that mixes two exports (or holds a graph copied in by hand) is
refused too. A directory holding an integer model export (``model.json``, ``qswap export``
without ``--onnx``) is refused, and the integer writer refuses an ONNX export's: one directory,
one export. A non-empty directory that is no export of the kind being written is refused by both
(``check_export_directory``): its files are not qswap's to replace.

>>> export_model(qmodel, "deploy/", task_cfg=cfg.task)
>>> manifest = read_manifest("deploy/")
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qswap.errors import ExportError, expect_module
from qswap.io.atomic import atomic_write_text, make_directory, remove_made

MANIFEST = "export.json"
# 2: the decoder step reads the encoder-decoder keys, values and padding mask once per sentence
# (format 1's, once per hypothesis, would not run with this runtime); 3: each graph's SHA-256; 4: the
# manifest's own SHA-256 (format 3's recipe and audit verdict could be edited unnoticed) and a seq2seq
# export's dictionary facts always present
FORMAT = 4
GRAPHS = {"encoder": "encoder.onnx", "cross_kv": "cross_kv.onnx", "decoder_step": "decoder_step.onnx"}
CTC_GRAPHS = {"ctc": "ctc.onnx"}
KIND_GRAPHS = {"seq2seq": GRAPHS, "ctc": CTC_GRAPHS}
# the deploy audit's sites of a graph without qswap's site map (``qswap.export.sites``: an export
# written before it was recorded): the module path read from a node's name, after this prefix
SITE_PREFIX = {"encoder": "encoder.", "cross_kv": "decoder.", "decoder_step": "", "ctc": ""}
# a recipe with no quantizers: qswap's modules computing in float, the float graph of the same
# structure as a quantized export (the reference of speed and transcript comparisons)
NO_QUANT = {"version": 1, "name": "no_quant", "defaults": {"weight": None, "activation": None}}
EXAMPLE_FRAMES = 100  # the traced example's length; the graphs' batch and time axes are dynamic
EXAMPLE_SAMPLES = 16000  # the traced CTC example's length (1 s at 16 kHz), dynamic too


@dataclass
class Manifest:
    """What an export directory holds (``export.json``)."""

    recipe: str
    claims_honest: bool | None  # the fake-quant model's audit verdict (None: not audited)
    task: dict[str, Any]  # the fairseq task config, plain data
    decoder_layers: int
    max_target_positions: int
    graphs: dict[str, str] = field(default_factory=lambda: dict(GRAPHS))
    format: int = FORMAT
    kind: str = "seq2seq"  # a key of KIND_GRAPHS
    digests: dict[str, str] = field(default_factory=dict)  # graph name -> SHA-256 of its file
    # the target dictionary's facts (``qswap.io.dictionary.dictionary_facts``): a data directory whose
    # dictionary differs is refused ({}: not recorded: a CTC export given no dictionary; a seq2seq export
    # always records its decoder's, which reading checks)
    dictionary: dict[str, Any] = field(default_factory=dict)
    # ``manifest_digest`` of the other fields, set by ``write_manifest``
    manifest_sha256: str = ""


def export_model(qmodel: nn.Module, directory: "str | os.PathLike[str]", *, task_cfg: Any = None,
                 audit: bool = True, allow_float: bool = False, dictionary: Any = None) -> Manifest:
    """Write ``qmodel`` (a calibrated qswap S2T transformer or conformer, or wav2vec 2.0 CTC model)
    to ``directory`` as its encoder, cross-attention and decoder-step graphs (CTC: its one graph)
    plus ``export.json``. ``task_cfg``: the fairseq task
    config the model was loaded with (needed to decode with the export). ``audit``: run
    ``qswap.audit`` on the example batch and record its verdict. ``allow_float``: export a
    conversion with identity quantizers (recipe fp32, the float reference of the same graph).
    ``dictionary``: the task's target dictionary, recorded so that decoding refuses a data
    directory with another one (default: an S2T decoder's own; a CTC model has none).
    The graphs are traced with the float insides (``simulate: float``) whatever the recipe says: a
    QDQ graph computes each op in float between its DequantizeLinear and QuantizeLinear. (The ONNX
    stand-ins that replace the quantizers for the trace carry no grid the integer paths read, so
    they fall back to float anyway; the setting makes that explicit, and holds for the example
    forward and the audit too.)"""
    from qswap.nn.simulate import simulating

    from qswap.io.dictionary import dictionary_facts

    expect_module(qmodel, "export_model()", ExportError)
    if not isinstance(directory, (str, os.PathLike)):
        raise ExportError(f"export_model()'s directory is a path (a str or a pathlib.Path), got {type(directory).__name__}")
    for name, flag in (("audit", audit), ("allow_float", allow_float)):
        if not isinstance(flag, bool):  # a truthy string ("no", read from a config) had run the audit
            raise ExportError(f"export_model()'s {name} takes True or False, got {flag!r}")
    task = _plain_task(task_cfg)  # once: the manifest records it
    if not isinstance(task, dict):  # a number had been written into the manifest as the task
        raise ExportError(f"export_model()'s task_cfg is the fairseq task config the model was loaded with "
                          f"(cfg.task: a DictConfig, a dict or a Namespace) or None, got {type(task_cfg).__name__}")
    if dictionary is None:
        dictionary = getattr(getattr(qmodel, "decoder", None), "dictionary", None)
    _warn_power_of_two_grids(qmodel)
    with simulating(qmodel, "float"):
        return _export(qmodel, directory, task=task, audit=audit, allow_float=allow_float,
                       facts=dictionary_facts(dictionary) if dictionary is not None else {})


def _warn_power_of_two_grids(qmodel: nn.Module) -> None:
    """A QswapWarning where activation grids have power-of-two scales (``scale_type: pow2``):
    onnxruntime's ``QLinearAdd`` (a residual add between such grids) does not round exact ties half
    to even, and with such scales a sum of codes is a tie for a large share of values, so the
    deployment differs from the fake-quant model by a step at many codes (docs/deploy.md)."""
    import warnings

    from qswap.errors import QswapWarning
    from qswap.quant.fake_quantize import quantizes

    sites = [name for name, m in qmodel.named_modules()
             if quantizes(m) and m.kind == "activation" and m.spec.scale_type == "pow2"]
    if sites:
        warnings.warn(f"{len(sites)} activation grid(s) have power-of-two scales (scale_type: pow2; the first: "
                      f"{sites[0]}): onnxruntime's QLinearAdd does not round ties half to even, and sums on such "
                      f"grids are often ties, so the deployed graph will differ from the fake-quant model by a step "
                      f"at many codes of its residual adds; use scale_type: float for activations to deploy the "
                      f"model qswap evaluates (docs/deploy.md)", QswapWarning, stacklevel=3)


def _export(qmodel: nn.Module, directory: "str | os.PathLike[str]", *, task: dict, audit: bool,
            allow_float: bool, facts: dict) -> Manifest:
    """``export_model`` under the float insides."""
    from qswap.export.decoder_step import export_cross_kv, export_decoder_step
    from qswap.export.onnx import check_calibrated, export_encoder

    out = Path(directory)
    check_export_directory(out, onnx=True)
    made = make_directory(out)  # the folders this export made: a failed one takes them away again
    graphs = CTC_GRAPHS if _is_ctc(qmodel) else GRAPHS
    staged = {name: out / f".{file}.partial" for name, file in graphs.items()}
    published: list[Path] = []  # graphs renamed into place (a directory this export made loses them again)
    try:
        if graphs is CTC_GRAPHS:
            manifest = _export_ctc(qmodel, staged, task, audit, allow_float)
        else:
            if not allow_float:  # first: an uncalibrated or float model is told so, not that its encoder is float
                check_calibrated(qmodel)
            example = example_input(qmodel)
            export_encoder(qmodel, staged["encoder"], example, allow_float=allow_float)
            with torch.no_grad():
                encoded = qmodel.encoder(example["src_tokens"], example["src_lengths"])
            args = (encoded["encoder_out"][0], encoded["encoder_padding_mask"][0])
            export_cross_kv(qmodel, staged["cross_kv"], args[0], allow_float=allow_float)
            export_decoder_step(qmodel, staged["decoder_step"], *args, allow_float=allow_float)
            claims = _audit_verdict(qmodel, example) if audit else None
            manifest = Manifest(_recipe_name(qmodel), claims, task, len(qmodel.decoder.layers),
                                int(qmodel.decoder.max_positions()))
        manifest.digests = {name: _check_loads(path, graphs[name], out) for name, path in staged.items()}
        manifest.dictionary = facts
        # the export being replaced goes first: its manifest (an interrupted publish leaves no
        # directory that loads as the old export) and the graphs of the other kind
        (out / MANIFEST).unlink(missing_ok=True)
        _drop_optimized(out)
        for kind_graphs in KIND_GRAPHS.values():
            if kind_graphs is not graphs:
                for file in kind_graphs.values():
                    (out / file).unlink(missing_ok=True)
        for name, path in staged.items():
            os.replace(path, out / graphs[name])
            published.append(out / graphs[name])
        return write_manifest(out, manifest)
    except BaseException:
        for path in [*staged.values(), *(published if made else [])]:
            path.unlink(missing_ok=True)
        remove_made(made)  # each empty unless something else wrote into it meanwhile: then it stays
        raise


# what a stopped export leaves (killed before its clean-up ran): a staged graph, ``.encoder.onnx.partial``,
# or an atomic write's temporary file (qswap.io.atomic), ``.model.json.1f2e3d4c.tmp``; in a folder with
# nothing else, an integer export's tensor file written before its model.json (``integer_format.
# tensor_file_name``; beside a model.json it may be the one that JSON names)
_LEFTOVER = re.compile(r"\.[\w.-]+\.onnx\.partial|\.[\w.-]+\.[0-9a-f]{8}\.tmp")


def check_export_directory(directory: "str | os.PathLike[str]", *, onnx: bool, clear: bool = True) -> None:
    """OutputError unless ``directory`` may take an export (``onnx``: ONNX graphs, else the integer
    model): missing, empty, or a qswap export of that kind (its ``export.json`` / ``model.json``
    reads as qswap's), which the new export replaces. A folder of other files would lose the ones
    that share the export's names (a model.json, an encoder.onnx qswap did not write). ``clear``:
    remove what a stopped export of that kind left there (the export itself does, as it writes);
    False only checks (the command line, before it loads anything: a command that then fails
    removes nothing)."""
    from qswap.errors import OutputError
    from qswap.export.integer_format import HASHED_TENSOR_FILE

    out = Path(directory)
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    leftovers = [p for p in entries if _LEFTOVER.fullmatch(p.name) and p.is_file()]
    # an integer export's tensor file alone is what a stopped integer export left, not an ONNX export's
    if all(p in leftovers or (not onnx and HASHED_TENSOR_FILE.fullmatch(p.name) and p.is_file()) for p in entries):
        for path in entries if clear else ():  # empty, or what a stopped export of qswap's left
            path.unlink()
        return
    held = held_export(out)
    holds_onnx = held == "onnx" or (onnx and _stopped_publish(out))
    holds_integer = held == "integer"
    if onnx and holds_integer:
        raise OutputError(f"{out} holds an integer model export (model.json); one directory holds one export: "
                          f"write the ONNX graphs into another directory (or remove that one first)")
    if not onnx and holds_onnx:
        raise OutputError(f"{out} holds an ONNX export (export.json); one directory holds one export: "
                          f"write the integer model into another directory (or remove that one first)")
    if holds_onnx if onnx else holds_integer:
        for path in leftovers if clear else ():  # the files of an export of qswap's that was stopped over this one
            path.unlink()
        return
    what = "an ONNX export (an export.json qswap wrote)" if onnx else "an integer model export (a model.json qswap wrote)"
    raise OutputError(f"{out} is a folder with other files, not {what}; an export writes into a new or empty "
                      f"folder, or over an export of its kind, never over files qswap did not write: pass a new or "
                      f"empty folder")


def held_export(directory: "str | os.PathLike[str]") -> str | None:
    """Which export of qswap's ``directory`` holds: "onnx" (an export.json describing graphs),
    "integer" (a model.json of the integer format), or None."""
    from qswap.export.integer_format import FORMAT as INTEGER_FORMAT, JSON_FILE

    out = Path(directory)
    if not out.is_dir():
        return None
    if isinstance(_json_object(out / MANIFEST).get("graphs"), dict):
        return "onnx"
    return "integer" if _json_object(out / JSON_FILE).get("format") == INTEGER_FORMAT else None


def _stopped_publish(out: Path) -> bool:
    """Whether ``out`` is an ONNX export stopped while it published (``export_model`` removes the
    old export.json first, then renames the graphs in): no export.json, and nothing but graphs
    of qswap's names that record qswap's site map (``qswap.export.sites``: an encoder.onnx of
    another tool's records none), the deploy audit's ``optimized`` folder and a stopped export's
    leftovers. The next export replaces it."""
    import onnx

    from qswap.export.sites import METADATA_KEY

    names = {name for graphs in KIND_GRAPHS.values() for name in graphs.values()}
    entries = list(out.iterdir())
    graphs = [p for p in entries if p.name in names and p.is_file()]
    if (out / MANIFEST).exists() or not graphs or not all(
            p in graphs or _LEFTOVER.fullmatch(p.name) or (p.name == OPTIMIZED and p.is_dir()) for p in entries):
        return False
    for path in graphs:
        try:
            metadata = onnx.load(str(path), load_external_data=False).metadata_props
        except Exception:  # noqa: BLE001  (onnx raises its own error types: not a graph qswap wrote)
            return False
        if not any(prop.key == METADATA_KEY for prop in metadata):
            return False
    return True


def _json_object(path: Path) -> dict:
    """``path``'s JSON object; {} where it is missing, unreadable or not an object."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


OPTIMIZED = "optimized"  # where 'qswap audit DIR --onnx' saves the optimized graphs (its default)


def _drop_optimized(out: Path) -> None:
    """The optimized graphs ``qswap audit DIR --onnx`` saved of the export being replaced
    (``DIR/optimized/*.onnx``): they describe that export, which no digest would tell."""
    folder = out / OPTIMIZED
    if folder.is_dir():
        for graph in folder.glob("*.onnx"):
            graph.unlink(missing_ok=True)
        try:
            folder.rmdir()  # empty unless something else lives there: then it stays
        except OSError:
            pass


def _check_loads(path: Path, name: str, out: Path) -> str:
    """The SHA-256 of a staged graph that onnxruntime loads (optimizing it as ``qswap eval`` does);
    ExportError otherwise: the grids are ones onnxruntime cannot run, and nothing is written."""
    from qswap.export.onnx import load_session

    try:
        load_session(path)
    except ExportError as e:
        cause = str(e.__cause__ or e).splitlines()[0][:200]
        raise ExportError(f"{name}: onnxruntime cannot load the graph qswap made of this model ({cause}); its "
                          f"grids or ops are not ones onnxruntime runs (8-bit grids at the sites the cause names "
                          f"are; 'qswap export QCKPT' without --onnx writes the integer model instead); "
                          f"nothing was written to {out}") from None
    return graph_digest(path)


def _is_ctc(qmodel: nn.Module) -> bool:
    from qswap.integration.decode import is_ctc
    return is_ctc(qmodel)


def _export_ctc(qmodel: nn.Module, staged: dict[str, Path], task: dict, audit: bool,
                allow_float: bool) -> Manifest:
    from qswap.export.wav2vec2 import export_ctc
    from qswap.models import wav2vec2_net_input

    example = wav2vec2_net_input(2, EXAMPLE_SAMPLES)
    export_ctc(qmodel, staged["ctc"], example, allow_float=allow_float)
    claims = _audit_verdict(qmodel, example) if audit else None
    return Manifest(_recipe_name(qmodel), claims, task, 0, 0, dict(CTC_GRAPHS), kind="ctc")


def _recipe_name(qmodel: nn.Module) -> str:
    return getattr(getattr(qmodel, "qswap_recipe", None), "name", "float")


def write_manifest(out: Path, manifest: Manifest) -> Manifest:
    """``export.json`` of ``manifest`` in ``out`` (atomically), sealed with its ``manifest_sha256``. Its
    digests must be those of the graph files there (``graph_digest``), or loading the directory
    refuses it."""
    manifest.manifest_sha256 = manifest_digest(asdict(manifest))
    atomic_write_text(out / MANIFEST, json.dumps(asdict(manifest), indent=1, sort_keys=True) + "\n")
    return manifest


def manifest_digest(payload: dict) -> str:
    """The SHA-256 (hex) of a manifest's fields but ``manifest_sha256`` itself, as canonical JSON
    (sorted keys, no spaces): what ``export.json`` records as ``manifest_sha256``."""
    import hashlib

    fields = {key: value for key, value in payload.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def graph_digest(path: Path) -> str:
    """The SHA-256 (hex) of a graph file, as ``export.json`` records it."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(directory: "str | os.PathLike[str]") -> Manifest:
    """The manifest of an export directory; ExportError naming what is missing or malformed."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ExportError(f"an export directory is a path (a str or a pathlib.Path), got {type(directory).__name__}")
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise ExportError(f"{directory} is a file, not an export directory: pass the directory 'qswap export "
                          f"QCKPT --onnx -o DIR' wrote, or use the checkpoint without --backend onnxruntime / --onnx")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        from qswap.export.integer_format import JSON_FILE
        integer = (Path(directory) / JSON_FILE).is_file()  # 'qswap export' without --onnx
        raise ExportError(f"{directory}: no {MANIFEST} there; " + (
            "it holds an integer model ('qswap export' without --onnx), which 'qswap eval DIR --data D' decodes "
            "without --backend onnxruntime; write ONNX graphs with 'qswap export QCKPT --onnx -o DIR'"
            if integer else "write the directory with 'qswap export QCKPT --onnx -o DIR'")) from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({type(e).__name__}: {e}); re-export the directory") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != FORMAT:
        what = repr(found) if found is None or type(found) is int else f"{found!r} (a {type(found).__name__})"
        raise ExportError(f"{path}: export format {what}; this qswap reads format {FORMAT}, a number: re-export the "
                          f"directory")
    try:
        manifest = Manifest(**payload)
    except TypeError as e:
        raise ExportError(f"{path}: malformed manifest ({e}); re-export the directory") from None
    fields = ((isinstance(manifest.recipe, str), "recipe"),
              (manifest.claims_honest is None or isinstance(manifest.claims_honest, bool), "claims_honest"),
              (isinstance(manifest.graphs, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in manifest.graphs.items()), "graphs"),
              (isinstance(manifest.task, dict), "task"), (isinstance(manifest.dictionary, dict), "dictionary"),
              (_count(manifest.decoder_layers), "decoder_layers"),
              (_count(manifest.max_target_positions), "max_target_positions"))
    for ok, name in fields:
        if not ok:
            raise ExportError(f"{path}: malformed manifest ({name} is {getattr(manifest, name)!r}); re-export the "
                              f"directory")
    if not isinstance(manifest.kind, str) or manifest.kind not in KIND_GRAPHS:
        raise ExportError(f"{path}: kind {manifest.kind!r}; this qswap reads {', '.join(KIND_GRAPHS)}: "
                          f"re-export the directory")
    for graph in KIND_GRAPHS[manifest.kind]:
        if graph not in manifest.graphs:
            raise ExportError(f"{path}: names no {graph} graph; re-export the directory")
        if not isinstance(manifest.digests, dict) or not isinstance(manifest.digests.get(graph), str):
            raise ExportError(f"{path}: records no digest of the {graph} graph; re-export the directory")
        name = manifest.graphs[graph]
        if name in ("", ".", "..") or "/" in name or "\\" in name:  # one directory, one export
            raise ExportError(f"{path}: the {graph} graph is {name!r}, not a file name beside {MANIFEST} (an export "
                              f"keeps its graphs in its own directory); re-export the directory")
    if manifest.kind == "seq2seq" and not (manifest.decoder_layers > 0 and manifest.max_target_positions > 0):
        raise ExportError(f"{path}: malformed manifest (a seq2seq export with decoder_layers "
                          f"{manifest.decoder_layers} and max_target_positions {manifest.max_target_positions}); "
                          f"re-export the directory")
    if manifest.kind == "seq2seq" and not manifest.dictionary:  # an export always records its decoder's
        raise ExportError(f"{path}: malformed manifest (a seq2seq export that records no target dictionary); "
                          f"re-export the directory")
    if manifest.manifest_sha256 != manifest_digest(payload):
        raise ExportError(f"{path}: edited after export (its fields do not match the manifest_sha256 it was "
                          f"written with: a recipe, verdict, task or graph entry changed by hand); re-export the "
                          f"directory")
    return manifest


def _count(value: Any) -> bool:
    """A non-negative int (not a bool, not a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def graph_paths(directory: "str | os.PathLike[str]", manifest: Manifest) -> dict[str, Path]:
    """Each graph's file in the export directory, checked against its digest in the manifest:
    ExportError for a graph that is missing or not the one the manifest describes, before any of
    them is loaded (a command that writes per graph, the deploy audit's optimized graphs, writes
    nothing then)."""
    paths = {name: Path(directory) / manifest.graphs[name] for name in KIND_GRAPHS[manifest.kind]}
    for name, path in paths.items():
        if not _readable_file(path, name):
            raise ExportError(f"{path}: no ONNX graph there (the {name} graph {MANIFEST} names); the export is "
                              f"incomplete: re-export the directory with 'qswap export QCKPT --onnx -o {directory}'")
    for name, path in paths.items():
        try:
            digest = graph_digest(path)
        except OSError as e:  # a deploy directory copied with another owner's permissions
            raise ExportError(f"{path}: cannot read the {name} graph ({e.strerror or e}); make it readable to "
                              f"this user, or re-export the directory") from None
        if digest != manifest.digests[name]:
            raise ExportError(f"{path}: not the {name} graph {MANIFEST} describes (its SHA-256 differs): the "
                              f"directory mixes two exports (one interrupted, or a graph copied in); re-export "
                              f"it with 'qswap export QCKPT --onnx -o {directory}'")
    return paths


def _readable_file(path: Path, name: str) -> bool:
    """Whether ``path`` is a file; ExportError for a path the system cannot even look up (a name
    longer than the file system allows, in an edited manifest)."""
    try:
        return path.is_file()
    except OSError as e:
        raise ExportError(f"{path}: the {name} graph's file name cannot be looked up ({e.strerror or e}); "
                          f"re-export the directory") from None


def example_input(model) -> dict:
    """A padded two-utterance batch of the features the model's encoder reads; ExportError for an
    encoder the export does not cover (``check_encoder``)."""
    from qswap.export.encoders import check_encoder
    from qswap.models import s2t_net_input

    check_encoder(getattr(model, "encoder", None))
    conv = model.encoder.subsample.conv_layers[0]
    return s2t_net_input(2, EXAMPLE_FRAMES, conv.weight.shape[1] * conv.groups,
                         vocab=len(model.decoder.dictionary))


def _audit_verdict(qmodel: nn.Module, example: dict) -> bool | None:
    import warnings

    import qswap
    if getattr(qmodel, "qswap_recipe", None) is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(qswap.audit(qmodel, example, decode_steps=2).honest)


def _plain_task(task_cfg: Any) -> dict[str, Any]:
    if task_cfg is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    from qswap.io.checkpoint import to_plain
    if isinstance(task_cfg, DictConfig):
        task_cfg = OmegaConf.to_container(task_cfg, resolve=True)
    return to_plain(task_cfg, "task")
