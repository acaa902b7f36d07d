"""Safe checkpoint loading, and qswap's own quantized checkpoint format.

A checkpoint is a pickle, and unpickling a stranger's file can run any code. qswap loads with
``torch.load(weights_only=True)`` plus an allowlist of the classes fairseq checkpoints contain
(found by saving real ones, see ``tests/reliability``):

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

A qswap checkpoint is a fairseq-style checkpoint (``cfg`` + ``model`` state_dict, which holds
the quantizer buffers) plus a ``qswap`` entry with the recipe as plain data. It holds only
plain containers and tensors (``argparse.Namespace`` in the cfg is stored as a tagged dict), so
it loads under ``weights_only`` with no allowlist and no opt-in.

>>> model, cfg, task = load_fairseq_model("checkpoint.pt", arg_overrides={"data": "data/"})
>>> qmodel = qswap.convert(model, "w8a8"); qswap.calibrate(qmodel, batches)
>>> save_qswap_checkpoint("w8a8.pt", qmodel, {"cfg": cfg})
>>> qmodel2, cfg, task = load_fairseq_model("w8a8.pt", arg_overrides={"data": "data/"})
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from qswap.errors import CheckpointError, DataError, QswapError, RecipeError, UnsafeCheckpointError
from qswap.io.atomic import atomic_open

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
QSWAP_KEY = "qswap"
QSWAP_FORMAT = 1
NAMESPACE_TAG = "__argparse.Namespace__"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
_PLAIN_LEAVES = (str, int, float, bool, type(None))


# -- safe loading ------------------------------------------------------------------------------
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
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for fn in (multiarray._reconstruct, multiarray.scalar):  # numpy 1.x and 2.x pickle names
        allowed += [(fn, f"{mod}.{fn.__name__}") for mod in ("numpy.core.multiarray",
                                                              "numpy._core.multiarray")]
    return allowed


@contextlib.contextmanager
def _safe_globals() -> Iterator[None]:
    with torch.serialization.safe_globals(allowed_globals()):
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
        names = _unsafe_globals(path, exc)
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
    return _first_line(text)


def _first_line(exc: "BaseException | str") -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    line = lines[0]
    if line.startswith("Error(s) in loading state_dict") and len(lines) > 1:
        line = lines[1]  # load_state_dict: the first mismatch says more than the header
    if len(line) > 120 and ". " in line[20:]:  # keep the first sentence of a long message
        line = line[:20] + line[20:].split(". ", 1)[0]
    return line[:300]


# -- fairseq models ----------------------------------------------------------------------------
def load_fairseq_model(path: "str | os.PathLike[str]", *, trust_checkpoint: bool = False,
                       arg_overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any, Any]:
    """``(model, cfg, task)`` from a fairseq or qswap checkpoint, with fairseq's own builders.

    The checkpoint is loaded once, safely (``load_checkpoint``); fairseq's
    ``load_model_ensemble_and_task`` builds the task and model from that state. A qswap
    checkpoint comes back converted and calibrated, as it was saved. ``arg_overrides`` work as
    in fairseq (``{"data": "path/to/data"}`` relocates the data directory). The model is in
    eval mode.
    """
    path = Path(path)
    state = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    if QSWAP_KEY in state:
        return _load_qswap(path, state, arg_overrides)
    _check_fairseq_state(path, state)
    from fairseq import checkpoint_utils

    state = _prepare_state(path, state, arg_overrides)
    cfg = state["cfg"]
    _check_registered(path, cfg)
    task = _setup_task(path, cfg)
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], task=task, state=state)
    except QswapError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: fairseq could not build the model from this checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    return models[0].eval(), cfg, task


def _check_fairseq_state(path: Path, state: dict) -> None:
    if state.get("cfg") is None and state.get("args") is None:
        raise CheckpointError(f"{path}: not a fairseq checkpoint: it has neither 'cfg' nor 'args' "
                              f"(top-level keys: {', '.join(map(str, list(state)[:8]))})")
    model = state.get("model")
    if not isinstance(model, Mapping) or not model:
        raise CheckpointError(f"{path}: not a fairseq checkpoint: 'model' is "
                              f"{'missing' if model is None else type(model).__name__}, not a "
                              f"state_dict")
    _check_weights(path, model)


def _check_weights(path: Path, model: Mapping) -> None:
    bad = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: 'model' entry {bad[0]!r} is a {type(model[bad[0]]).__name__}, "
                              f"not a tensor; not a state_dict")
    nonfinite = [k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} weight tensor(s) contain NaN or inf (first: "
                              f"{nonfinite[0]}); the checkpoint is broken (a diverged training run?)")


def _prepare_state(path: Path, state: dict, arg_overrides: Mapping[str, Any] | None) -> dict:
    """What fairseq's ``load_checkpoint_to_cpu`` does after its ``torch.load``."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    try:
        if state.get("args") is not None and arg_overrides:
            for name, value in arg_overrides.items():
                setattr(state["args"], name, value)
        if state.get("cfg") is not None:
            state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
            if arg_overrides:
                overwrite_args_by_name(state["cfg"], dict(arg_overrides))
        if "best_loss" not in state:  # stripped checkpoints: fairseq would fail on a KeyError
            state.setdefault("optimizer_history", [{"criterion_name": "CrossEntropyCriterion",
                                                    "optimizer_name": None, "num_updates": 0,
                                                    "lr_scheduler_state": {}}])
            state.setdefault("extra_state", {})
        return checkpoint_utils._upgrade_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"{path}: malformed fairseq cfg/args ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None


def _check_registered(path: Path, cfg: Any) -> None:
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    task_name = _cfg_name(cfg.task, "task")
    if task_name not in TASK_REGISTRY:
        raise CheckpointError(f"{path}: fairseq task {task_name!r} is not registered; if it comes "
                              f"from a plugin, import it (fairseq --user-dir) before loading")
    arch = _cfg_name(cfg.model, "arch")
    if arch not in ARCH_MODEL_REGISTRY and arch not in MODEL_REGISTRY:
        raise CheckpointError(f"{path}: fairseq architecture {arch!r} is not registered; if it "
                              f"comes from a plugin, import it (fairseq --user-dir) before loading")


def _cfg_name(node: Any, legacy: str) -> Any:
    if node is None:
        return None
    name = getattr(node, "_name", None)
    return name if name is not None else getattr(node, legacy, None)


def _setup_task(path: Path, cfg: Any):
    from fairseq import tasks

    data = getattr(cfg.task, "data", None)
    try:
        return tasks.setup_task(cfg.task, from_checkpoint=True)
    except QswapError:
        raise
    except Exception as exc:  # the task reads its data directory: config, dictionaries
        raise DataError(f"{path}: cannot set up fairseq task {_cfg_name(cfg.task, 'task')!r} from "
                        f"data directory {data!r} ({type(exc).__name__}: {_first_line(exc)}); "
                        f"point it at the folder with the task's config and dictionary "
                        f"(arg_overrides={{'data': ...}})") from None


# -- qswap checkpoints -------------------------------------------------------------------------
def save_qswap_checkpoint(path: "str | os.PathLike[str]", model: nn.Module,
                          state_like_fairseq: Any, *, trust_checkpoint: bool = False) -> Path:
    """Write a converted (and calibrated) model as a qswap checkpoint, atomically.

    ``state_like_fairseq`` gives the fairseq config the float model was built from: the path of
    the checkpoint it was loaded from (read with ``load_checkpoint(path, trust_checkpoint)``), a
    checkpoint state (``{"cfg": ...}`` or ``{"args": ...}``), or a cfg (DictConfig / dict).
    """
    recipe = getattr(model, "qswap_recipe", None)
    if recipe is None:
        raise CheckpointError("save_qswap_checkpoint takes a model made by qswap.convert (it has no "
                              ".qswap_recipe); convert the model first")
    from qswap import __version__

    state = {
        "cfg": to_plain(_cfg_of(state_like_fairseq, trust_checkpoint), "cfg"),
        "args": None,
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {},
        QSWAP_KEY: {"format": QSWAP_FORMAT, "version": __version__,
                    "recipe": to_plain(recipe.to_dict(), "recipe")},
    }
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def _cfg_of(state_like: Any, trust_checkpoint: bool) -> Any:
    from omegaconf import OmegaConf

    if isinstance(state_like, (str, os.PathLike)):
        state_like = load_checkpoint(state_like, trust_checkpoint=trust_checkpoint)
        if QSWAP_KEY in state_like:  # re-saving a qswap checkpoint (e.g. after re-calibration)
            state_like = {"cfg": from_plain(state_like.get("cfg"))}
    if OmegaConf.is_config(state_like) or isinstance(state_like, argparse.Namespace):
        cfg = state_like
    elif isinstance(state_like, Mapping) and ("cfg" in state_like or "args" in state_like):
        cfg = state_like.get("cfg")
        if cfg is None:
            cfg = state_like.get("args")
    elif isinstance(state_like, Mapping):
        cfg = state_like
    else:
        raise CheckpointError(f"save_qswap_checkpoint needs the fairseq state or cfg the model was "
                              f"built from, got {type(state_like).__name__}")
    if isinstance(cfg, argparse.Namespace):
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        cfg = convert_namespace_to_omegaconf(cfg)
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if not isinstance(cfg, Mapping) or "model" not in cfg or "task" not in cfg:
        raise CheckpointError("save_qswap_checkpoint: the fairseq cfg needs 'model' and 'task' "
                              "sections (pass the state or cfg that load_fairseq_model returned)")
    return cfg


def to_plain(obj: Any, where: str) -> Any:
    """``obj`` as str/int/float/bool/None, lists and str-keyed dicts (Namespaces tagged)."""
    if isinstance(obj, argparse.Namespace):
        return {NAMESPACE_TAG: to_plain(vars(obj), where)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: key {k!r} is not a string; qswap checkpoints hold "
                                      f"plain data only")
            out[k] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return obj.item()
    raise CheckpointError(f"{where} is a {type(obj).__name__}; qswap checkpoints hold plain data "
                          f"only (str, numbers, lists, dicts)")


def from_plain(obj: Any) -> Any:
    """Inverse of ``to_plain``: tagged dicts become argparse Namespaces again."""
    if isinstance(obj, dict):
        if set(obj) == {NAMESPACE_TAG} and isinstance(obj[NAMESPACE_TAG], dict):
            return argparse.Namespace(**from_plain(obj[NAMESPACE_TAG]))
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def _load_qswap(path: Path, state: dict, arg_overrides: Mapping[str, Any] | None):
    from omegaconf import OmegaConf

    meta = state[QSWAP_KEY]
    if not isinstance(meta, Mapping) or not isinstance(meta.get("recipe"), Mapping):
        raise CheckpointError(f"{path}: malformed qswap entry (expected a mapping with 'format' and "
                              f"'recipe'); the file is damaged")
    if meta.get("format") != QSWAP_FORMAT:
        raise CheckpointError(f"{path}: qswap checkpoint format {meta.get('format')!r}; this qswap "
                              f"reads format {QSWAP_FORMAT} (written by qswap {meta.get('version')!r})")
    if not isinstance(state.get("cfg"), Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path}: qswap checkpoint without 'cfg' or 'model'; the file is damaged")
    _check_weights(path, state["model"])
    try:
        cfg = OmegaConf.create(from_plain(dict(state["cfg"])), flags={"allow_objects": True})
        if arg_overrides:
            from fairseq.dataclass.utils import overwrite_args_by_name
            overwrite_args_by_name(cfg, dict(arg_overrides))
    except Exception as exc:
        raise CheckpointError(f"{path}: malformed cfg in qswap checkpoint ({_first_line(exc)})") from None
    _check_registered(path, cfg)
    task = _setup_task(path, cfg)
    model = _build_float_model(path, cfg, task)
    qmodel = _convert_stored(path, model, meta["recipe"])
    _load_quantized_state(path, qmodel, state["model"])
    return qmodel.eval(), cfg, task


def _build_float_model(path: Path, cfg: Any, task: Any) -> nn.Module:
    try:
        if "from_checkpoint" in inspect.getfullargspec(task.build_model).args:
            return task.build_model(cfg.model, from_checkpoint=True)
        return task.build_model(cfg.model)
    except Exception as exc:
        raise CheckpointError(f"{path}: fairseq could not build the model from the stored cfg "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None


def _convert_stored(path: Path, model: nn.Module, recipe: Mapping) -> nn.Module:
    from qswap.convert import QswapWarning, convert

    try:
        with warnings.catch_warnings():  # they were shown when the model was first converted
            warnings.simplefilter("ignore", QswapWarning)
            return convert(model, dict(recipe), inplace=True)
    except RecipeError as exc:
        raise CheckpointError(f"{path}: the recipe stored in this qswap checkpoint is invalid "
                              f"({exc}); the file is damaged") from None
    except QswapError as exc:
        raise CheckpointError(f"{path}: cannot re-apply the stored recipe ({exc})") from None


def _load_quantized_state(path: Path, qmodel: nn.Module, state_dict: Mapping) -> None:
    try:
        nn.Module.load_state_dict(qmodel, dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit the model rebuilt from its cfg "
                              f"and recipe ({_first_line(exc)}); was it written by a different "
                              f"qswap or fairseq version?") from None
