"""Read an integer model written by ``qswap.export.integer_format``: JSON and safetensors only (no
pickle, no eval, no import named by the file). Only declared classes are rebuilt, every value is
checked against its declaration, every tensor's dtype and shape against the JSON, the tensor
file against its recorded size and sha256, the format against ``FORMAT_VERSION``. Anything else
is a ``LoadError`` whose ``kind`` says what is wrong: missing, truncated, corrupted, version, edited.

>>> exported = load_integer_model("out/")      # or "out/model.json"
>>> logits = exported.model(**net_input)        # the integer model, as qswap.integerize made it
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from qswap.errors import LoadError
from qswap.export.integer_format import FORMAT, FORMAT_VERSION, JSON_FILE, model_digest
from qswap.io.serializable import ANY, SERIALIZABLE, Codec, SpecMismatch

# qswap's own modules that declare integer forms (imported on demand, never a name from a file);
# the fairseq ones only when the file names a class the others do not declare
DECLARING = (("qswap.quant.integer", "qswap.nn", "qswap.integerize"), ("qswap.nn.fairseq",))
TOP_LEVEL = ("format", "format_version", "qswap_version", "tensor_file", "float_steps", "model", "model_sha256",
             "task", "decoding", "source")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ExportedModel:
    """A loaded integer model and what its JSON says besides the model."""

    model: torch.nn.Module
    float_steps: dict
    task: dict | None
    decoding: dict | None
    source: str
    path: Path


def is_integer_export(path: str | Path) -> bool:
    """Whether ``path`` is an export directory (holding model.json) or an export's JSON file."""
    p = Path(path)
    return (p / JSON_FILE).is_file() if p.is_dir() else p.suffix == ".json"


def load_integer_model(path: str | Path) -> ExportedModel:
    """The integer model exported at ``path`` (a directory or its model.json)."""
    json_path = Path(path) / JSON_FILE if Path(path).is_dir() else Path(path)
    meta = _read_json(json_path)
    blob = _read_tensor_file(json_path, meta["tensor_file"])
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except SafetensorError as exc:
        raise LoadError(f"{json_path.parent / meta['tensor_file']['name']}: not a readable safetensors file "
                        f"({exc}); export the model again", kind="corrupted") from None
    try:
        digest = model_digest(meta["model"], meta["tensor_file"]["sha256"])
    except (ValueError, TypeError):  # what canonical JSON cannot hold
        digest = None
    if digest != meta["model_sha256"]:
        raise LoadError(f"{json_path}: its model description does not match the sha256 it was written with (a "
                        f"multiplier, shift, size or class edited after the export); export the model again",
                        kind="edited")
    _import_declaring(meta["model"])
    take = _Take(tensors)
    try:
        model = ANY.decode(meta["model"], "model", take)
    except SpecMismatch as exc:
        raise _edited(json_path, str(exc)) from None
    if take.tensors:
        raise _edited(json_path, f"the tensor file holds tensors no field uses: {', '.join(sorted(take.tensors))}")
    if not isinstance(model, torch.nn.Module) or not hasattr(SERIALIZABLE[meta["model"]["class"]], "float_steps"):
        raise _edited(json_path, f"its model is a {type(model).__name__}, not a whole integer model")
    declared = SERIALIZABLE[meta["model"]["class"]].float_steps
    if meta["float_steps"] != declared:
        raise _edited(json_path, f"float_steps are {meta['float_steps']!r}, but {meta['model']['class']} declares "
                                 f"{declared!r}")
    return ExportedModel(model.eval(), meta["float_steps"], meta["task"], meta["decoding"], meta["source"], json_path)


class _Take(Codec):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def take(self, key: str, where: str) -> torch.Tensor:
        if key not in self.tensors:
            raise SpecMismatch(where, f"tensor {key!r} is not in the tensor file (or is used twice)")
        return self.tensors.pop(key)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(f"{path} does not exist; pass the directory 'qswap export' wrote (or its {JSON_FILE})",
                        kind="missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: cannot read it as UTF-8 text ({exc})", kind="corrupted") from None
    try:
        meta = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        truncated = not text.rstrip().endswith("}")  # the exporter writes one object, ending in }
        raise LoadError(f"{path}: {'truncated' if truncated else 'not valid'} JSON ({exc.msg} at line {exc.lineno} "
                        f"column {exc.colno}); export the model again", kind="truncated" if truncated else "edited") \
            from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than any export writes
        raise _edited(path, str(exc) or type(exc).__name__) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise LoadError(f"{path}: not a qswap integer model (format {found!r}, expected {FORMAT!r})", kind="edited")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _edited(path, f"format_version must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise LoadError(f"{path}: format version {version} (written by qswap {meta.get('qswap_version')!r}); this "
                        f"qswap reads version {FORMAT_VERSION}: export the model again with this qswap",
                        kind="version")
    missing, extra = [k for k in TOP_LEVEL if k not in meta], sorted(set(meta) - set(TOP_LEVEL))
    if missing or extra:
        raise _edited(path, (f"missing field(s) {', '.join(missing)}" if missing else "")
                      + ("; " if missing and extra else "") + (f"unknown field(s) {', '.join(extra)}" if extra else ""))
    _check_types(path, meta)
    return meta


def _check_types(path: Path, meta: dict) -> None:
    tf = meta["tensor_file"]
    if not (isinstance(tf, dict) and set(tf) == {"name", "bytes", "sha256"} and isinstance(tf["name"], str)
            and re.fullmatch(r"[A-Za-z0-9_.-]+", tf["name"]) and tf["name"] not in (".", "..")
            and isinstance(tf["bytes"], int) and isinstance(tf["sha256"], str) and _SHA256.fullmatch(tf["sha256"])):
        raise _edited(path, f"tensor_file must be {{\"name\": a file name beside the JSON, \"bytes\": int, "
                            f"\"sha256\": 64 hex digits}}, got {tf!r}")
    if not (isinstance(meta["model_sha256"], str) and _SHA256.fullmatch(meta["model_sha256"])):
        raise _edited(path, f"model_sha256 must be 64 hex digits, got {meta['model_sha256']!r}")
    steps = meta["float_steps"]
    if not (isinstance(steps, dict) and all(isinstance(v, str) for v in steps.values())):
        raise _edited(path, f"float_steps must map names to descriptions, got {steps!r}")
    for key in ("task", "decoding"):
        if meta[key] is not None and not isinstance(meta[key], dict):
            raise _edited(path, f"{key} must be an object or null, got {type(meta[key]).__name__}")
    if not isinstance(meta["source"], str):
        raise _edited(path, f"source must be a string, got {meta['source']!r}")


def _read_tensor_file(json_path: Path, entry: dict) -> bytes:
    path = json_path.parent / entry["name"]
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise LoadError(f"{path} does not exist; {json_path.name} names it as its tensor file",
                        kind="missing") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read it ({exc.strerror})", kind="corrupted") from None
    if len(blob) < entry["bytes"]:
        raise LoadError(f"{path} is truncated: {len(blob)} bytes of the {entry['bytes']} recorded in {json_path.name}",
                        kind="truncated")
    if len(blob) != entry["bytes"]:
        raise LoadError(f"{path} has {len(blob)} bytes, {json_path.name} records {entry['bytes']}; export the "
                        f"model again", kind="corrupted")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry["sha256"]:
        raise LoadError(f"{path} is corrupted: its sha256 is {digest}, {json_path.name} records {entry['sha256']}",
                        kind="corrupted")
    return blob


def _import_declaring(entry: Any) -> None:
    for group in DECLARING:
        if all(name in SERIALIZABLE for name in _class_names(entry)):
            return
        for module in group:
            importlib.import_module(module)


def _class_names(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        if isinstance(obj.get("class"), str):
            yield obj["class"]
        for value in obj.values():
            yield from _class_names(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _class_names(value)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows; the exporter writes finite numbers only")


def _finite(text: str) -> float:
    """A JSON number as a float: one beyond the float range (``1e999``, read as inf) refused."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the float range; the exporter writes finite numbers only")
    return value


def _edited(path: Path, what: str) -> LoadError:
    return LoadError(f"{path}: {what} (was the file edited? export the model again)", kind="edited")

