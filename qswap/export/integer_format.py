"""Write an integer model (what ``qswap.integerize`` returns) as safetensors tensors plus a JSON
description: the declared object tree (``qswap.io.serializable``), its declared float steps, a
format version and the sha256 of the tensor file and of the object tree. ``qswap.export.integer_load`` reads it back.

>>> write_integer_model(qswap.integerize(qmodel), "out/")   # out/model.json, out/model.<hash>.safetensors

JSON fields: ``format`` ("qswap-integer-model"), ``format_version`` (``FORMAT_VERSION``),
``qswap_version``, ``tensor_file`` (``name``, ``bytes``, ``sha256``), ``float_steps`` (method ->
what it does), ``model`` (``{"class": name, "args": {...}}``; a tensor is
``{"tensor": key, "dtype": ..., "shape": [...]}``), ``model_sha256`` (of ``model_digest``'s text of
``model`` and the tensor file's sha256: an edited multiplier, shift or head count is found, as an edited
tensor is, and so is another export's tensor file named in ``tensor_file``), ``task`` (the fairseq task config, plain
data, or null) and ``decoding`` (target dictionary facts, or null), ``source`` (free text).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Mapping

import torch

from qswap.errors import ExportError
from qswap.io.atomic import atomic_write_bytes, atomic_write_text, make_directory, remove_made
from qswap.io.serializable import ANY, Codec, SpecMismatch

FORMAT = "qswap-integer-model"
FORMAT_VERSION = 3  # 2: model_sha256; 3: it covers the tensor file's sha256 too
JSON_FILE = "model.json"
# the tensor file: its content's hash in its name (``tensor_file_name``), so a re-export writes a new
# file beside the old one and replaces model.json last; exports before that named it model.safetensors
HASHED_TENSOR_FILE = re.compile(r"model\.[0-9a-f]{16}\.safetensors")  # what tensor_file_name names
TENSOR_FILES = re.compile(rf"{HASHED_TENSOR_FILE.pattern}|model\.safetensors")


def tensor_file_name(sha256: str) -> str:
    """The tensor file's name for content of this SHA-256 (hex)."""
    return f"model.{sha256[:16]}.safetensors"


def tensor_path(directory: "str | Path") -> Path:
    """The tensor file an integer export's model.json names (ExportError where it names none)."""
    try:
        name = json.loads((Path(directory) / JSON_FILE).read_text(encoding="utf-8"))["tensor_file"]["name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{directory}: no readable {JSON_FILE} naming a tensor file ({type(exc).__name__}); "
                          f"export the model again") from None
    return Path(directory) / name


class _Collect(Codec):
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        # a fresh contiguous copy: safetensors refuses tensors that share storage
        self.tensors[key] = tensor.detach().cpu().contiguous().clone()


def describe(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the ``model`` entry of the JSON, its tensors by key). Raises ExportError naming the first
    value that no declaration covers."""
    collect = _Collect()
    try:
        entry = ANY.encode(model, "model", collect)
    except SpecMismatch as exc:
        raise ExportError(f"cannot export the integer model: {exc}; every integer form must be declared "
                          f"with @serializable (qswap.io.serializable)") from None
    return entry, collect.tensors


def model_digest(entry: Mapping, tensor_sha256: str) -> str:
    """The sha256 (hex) of the canonical JSON text (sorted keys, no spaces) of the ``model`` entry
    and the sha256 of the tensor file it reads: a JSON pointed at another export's tensors (of the
    same architecture, the ``tensor_file`` entry copied over) had loaded as neither model."""
    return hashlib.sha256(json.dumps({"model": entry, "tensor_sha256": tensor_sha256}, sort_keys=True,
                                     separators=(",", ":"), allow_nan=False).encode("utf-8")).hexdigest()


def write_integer_model(model: torch.nn.Module, out: str | Path, *, task: Mapping | None = None,
                        decoding: Mapping | None = None, source: str = "") -> Path:
    """Write ``model`` into the directory ``out`` (made if missing): the tensor file first, under a
    name of its own (``tensor_file_name``), then the JSON that names it and its hash, each
    atomically; the tensor files of an export this one replaces go last. Stopped or failing at any
    point (a full disk, SIGTERM through the CLI), the folder holds the previous export whole, or
    this one: never a JSON beside another export's tensors. Returns the JSON's path."""
    from safetensors.torch import save

    from qswap import __version__
    from qswap.io.serializable import SERIALIZABLE

    entry, tensors = describe(model)
    blob = save(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    name = tensor_file_name(digest)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "qswap_version": __version__,
            "tensor_file": {"name": name, "bytes": len(blob), "sha256": digest},
            "float_steps": SERIALIZABLE[entry["class"]].float_steps, "model": entry, "model_sha256": model_digest(entry, digest),
            "task": None if task is None else dict(task), "decoding": None if decoding is None else dict(decoding),
            "source": source}
    try:
        text = json.dumps(meta, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"cannot write the model description as JSON: {exc} (task and decoding must be "
                          f"plain data with finite numbers)") from None
    from qswap.export.package import check_export_directory

    directory = Path(out)
    check_export_directory(directory, onnx=False)
    made = make_directory(directory)
    previous = [p for p in directory.iterdir() if TENSOR_FILES.fullmatch(p.name)]  # a replaced export's, or
    # one a killed export left
    try:
        atomic_write_bytes(directory / name, blob)
        atomic_write_text(directory / JSON_FILE, text + "\n")
    except BaseException:
        if all(p.name != name for p in previous):  # the previous JSON names its own tensor file, not this
            (directory / name).unlink(missing_ok=True)
        remove_made(made)  # a folder this export made (and its new parents) holds nothing else now
        raise
    for path in previous:
        if path.name != name:
            path.unlink(missing_ok=True)
    return directory / JSON_FILE

