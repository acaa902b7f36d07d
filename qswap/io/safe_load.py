"""Loading checkpoints without running a stranger's pickle.

A checkpoint is a pickle, and unpickling a stranger's file can run any code. qswap loads with
``torch.load(weights_only=True)`` plus an allowlist of the classes fairseq checkpoints contain
(found by saving real ones, see ``tests/reliability/rel_fixtures.py``):

==================================  ==========================================================
global                              where fairseq puts it
==================================  ==========================================================
argparse.Namespace                  legacy ``args``; ``cfg.model`` of models without dataclass
omegaconf DictConfig, ListConfig,   ``cfg`` pickled as an OmegaConf container (older trainers)
ContainerMetadata, Metadata, nodes
typing.Any, builtins dict/list/...  OmegaConf container metadata (key and element types)
collections.OrderedDict/defaultdict state dicts, OmegaConf internals
numpy ndarray/dtype/scalar          training metrics, ``best`` scores in ``extra_state``
==================================  ==========================================================

The allowlist is scoped to the load (``torch.serialization.safe_globals``), never global state.
A checkpoint that needs anything else raises UnsafeCheckpointError naming the global; the
opt-in ``trust_checkpoint=True`` (``--trust-checkpoint``) loads it the old, unsafe way.

>>> state = load_checkpoint("checkpoint_best.pt")      # a dict, or a typed CheckpointError
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from qswap.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")

def allowed_globals() -> list:
    """The non-tensor globals a fairseq checkpoint may need (entries for torch's safe_globals)."""
    import collections
    import typing

    import numpy as np
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    allowed: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict,
                     DictConfig, ListConfig, ContainerMetadata, Metadata, typing.Any,
                     nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode,
                     nodes.BooleanNode, dict, list, tuple, set, int, float, bool, str,
                     np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}, key=str)
    try:  # audio_finetuning checkpoints pickle the task's target Dictionary (plain attributes)
        from fairseq.data.dictionary import Dictionary
        allowed.append(Dictionary)
    except ImportError:  # no fairseq here: no fairseq checkpoint needs it either
        pass
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for fn in (multiarray._reconstruct, multiarray.scalar):  # numpy 1.x and 2.x pickle names
        allowed += [(fn, f"{mod}.{fn.__name__}") for mod in ("numpy.core.multiarray",
                                                              "numpy._core.multiarray")]
    return allowed


@contextlib.contextmanager
def _safe_globals() -> Iterator[None]:
    """The allowlist for one load. Only the entries not already allowed are added and removed
    again: torch's ``safe_globals`` removes on exit every entry it was given, so giving it ones the
    process had allowed before (the fairseq plugin's ``add_safe_globals``) would take them away
    from fairseq's own later loads (a fairseq-train run resuming from checkpoint_last.pt)."""
    before = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([g for g in allowed_globals() if g not in before]):
        yield


def load_checkpoint(path: "str | os.PathLike[str]", trust_checkpoint: bool = False) -> dict:
    """The checkpoint at ``path`` as a dict, loaded on CPU without running its pickle's code.

    Raises CheckpointError for a missing, empty, truncated or corrupt file or one that is not a
    dict, and UnsafeCheckpointError when it needs a global outside ``allowed_globals()``.
    """
    path = Path(path)
    _check_file(path)
    _check_zip_records(path)
    try:
        if trust_checkpoint:
            logger.warning("loading %s with trust_checkpoint: its pickle may run arbitrary code", path)
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with _safe_globals():
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = [] if trust_checkpoint else _unsafe_globals(path, exc)
        if names and _module_exists(names[0]):
            raise UnsafeCheckpointError(_unsafe_message(path, names)) from None
        missing = f"; it names a module that does not exist ({names[0]})" if names else ""
        raise CheckpointError(f"{path}: not a torch.save checkpoint, or a damaged one "
                              f"({_torch_reason(exc)}{missing}); re-download or re-save it") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... for broken files
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or corrupt "
                              f"({type(exc).__name__}: {_torch_reason(exc)}); re-download or re-save "
                              f"it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict "
                              f"(expected fairseq's {{'cfg', 'model', ...}})")
    return state


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        from qswap.export.integer_format import JSON_FILE
        from qswap.export.package import MANIFEST
        if (path / MANIFEST).is_file():  # qswap export --onnx's directory
            raise CheckpointError(f"{path} is a directory of ONNX graphs ('qswap export --onnx'), not a "
                                  f"checkpoint: run them with --backend onnxruntime ('qswap eval'), or audit them "
                                  f"with --onnx ('qswap audit')")
        if (path / JSON_FILE).is_file():  # qswap export's integer model
            raise CheckpointError(f"{path} is an integer model written by 'qswap export' ({JSON_FILE}, "
                                  f"and its tensor file), not a checkpoint: 'qswap eval {path} --data DIR' decodes "
                                  f"it; other commands take the checkpoint it was exported from")
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file (e.g. "
                              f"{path / 'checkpoint_best.pt'})")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; was a copy or "
                              f"download interrupted?")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: checkpoint is not readable (permission denied)")


def _check_zip_records(path: Path) -> None:
    """torch.save writes a zip with CRC-32s but torch.load does not check them: a flipped byte
    in the weights would load silently. Records saved without a CRC (0) are not checked."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not a checkpoint at all: torch.load will say
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0:
                    continue
                with zf.open(info) as f:
                    while f.read(1 << 22):
                        pass
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({exc}); re-download or re-save it") from None
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint archive "
                              f"({type(exc).__name__}: {exc}); re-download or re-save it") from None


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The offending global from torch's message first, then any others the pickle names."""
    names = [a or b for a, b in _GLOBAL_IN_MESSAGE.findall(str(exc))]
    names = [n if "." in n else f"builtins.{n}" for n in names]  # torch drops "builtins."
    try:  # lists every global without executing anything (zip checkpoints only)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    allowed = {_global_name(g) for g in allowed_globals()}
    names += [n for n in found if n not in allowed]
    return list(dict.fromkeys(names))


def _module_exists(name: str) -> bool:
    """Whether the top-level package of a global exists, without importing (running) it."""
    top = name.split(".")[0]
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def _unsafe_message(path: Path, names: list[str]) -> str:
    more = f" (and {', '.join(names[1:5])}{', ...' if len(names) > 5 else ''})" if len(names) > 1 else ""
    return (f"{path}: refusing to load: its pickle needs the global {names[0]}{more}, which is "
            f"not among the classes fairseq checkpoints contain, and loading it could run "
            f"arbitrary code; if you trust where the file comes from, pass {TRUST_FLAG} "
            f"(trust_checkpoint=True in Python)")


def _torch_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only messages."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return first_line(text)


def first_line(exc: "BaseException | str") -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    line = lines[0]
    if line.startswith("Error(s) in loading state_dict") and len(lines) > 1:
        line = lines[1]  # load_state_dict: the first mismatch says more than the header
    if len(line) > 120 and ". " in line[20:]:  # keep the first sentence of a long message
        line = line[:20] + line[20:].split(". ", 1)[0]
    return line[:300]
