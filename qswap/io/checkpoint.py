"""fairseq models from checkpoints, and qswap's own quantized checkpoint format.

``load_fairseq_model`` loads a checkpoint once, safely (``qswap.io.safe_load``), and lets
fairseq's own builders make the task and model from that state.

A qswap checkpoint is a fairseq-style checkpoint (``cfg`` + ``model`` state_dict, which holds
the quantizer buffers) plus a ``qswap`` entry with the recipe as plain data. It holds only
plain containers and tensors (an ``argparse.Namespace`` in the cfg is stored as a dict, which
fairseq's builders take as well), so it loads under ``weights_only`` with no allowlist and no
opt-in. The recipe is also in ``cfg.model.qswap_recipe``, where fairseq's own loader, run with
the qswap plugin's task, finds it.

>>> model, cfg, task = load_fairseq_model("checkpoint.pt", arg_overrides={"data": "data/"})
>>> qmodel = qswap.convert(model, "w8a8"); qswap.calibrate(qmodel, batches)
>>> save_qswap_checkpoint("w8a8.pt", qmodel, {"cfg": cfg})
>>> qmodel2, cfg, task = load_fairseq_model("w8a8.pt", arg_overrides={"data": "data/"})
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qswap.errors import CheckpointError, DataError, QswapError, RecipeError
from qswap.io.atomic import atomic_open
from qswap.io.dictionary import CFG_KEY as DICTIONARY_KEY, check, dictionary_facts, recorded_facts
from qswap.io.safe_load import TRUST_FLAG, allowed_globals, first_line, load_checkpoint

__all__ = ["TRUST_FLAG", "allowed_globals", "load_checkpoint", "load_fairseq_model",
           "save_qswap_checkpoint"]

QSWAP_KEY = "qswap"
QSWAP_FORMAT = 1
_PLAIN_LEAVES = (str, int, float, bool, type(None))


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
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint is a path (a str or a pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    state = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    if QSWAP_KEY in state:
        return _load_qswap(path, state, arg_overrides)
    check_fairseq_state(path, state)
    from fairseq import checkpoint_utils

    state = _prepare_state(path, state, arg_overrides)
    cfg = state["cfg"]
    _check_registered(path, cfg)
    task = setup_task(path, cfg)
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], task=task, state=state)
    except CheckpointError as exc:
        if type(exc) is not CheckpointError or exc.checkpoint is not None:
            raise
        raise CheckpointError(f"{path}: {exc}", kind=exc.kind, checkpoint=path) from None
    except QswapError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: fairseq could not build the model from this checkpoint "
                              f"({type(exc).__name__}: {first_line(exc)})", kind="build") from None
    return models[0].eval(), cfg, task


def check_fairseq_state(path: Path, state: dict) -> None:
    """A CheckpointError naming ``path`` where ``state`` (a loaded checkpoint) is not fairseq's:
    no ``cfg`` or ``args``, a ``cfg`` (where no ``args`` stand for it) without its ``model`` and
    ``task`` sections, no ``model`` state_dict."""
    if state.get("cfg") is None and state.get("args") is None:
        raise CheckpointError(f"{path}: not a fairseq checkpoint: it has neither 'cfg' nor 'args' "
                              f"(top-level keys: {', '.join(map(str, list(state)[:8]))})")
    cfg = state.get("cfg")
    if state.get("args") is None:  # omegaconf's 'Missing key task' had come as a raw traceback
        sections = list(cfg) if isinstance(cfg, Mapping) or hasattr(cfg, "keys") else None
        missing = ["model", "task"] if sections is None else [k for k in ("model", "task") if k not in sections]
        if sections is None:
            raise CheckpointError(f"{path}: not a fairseq checkpoint: its cfg is a {type(cfg).__name__}, not a "
                                  f"config with 'model' and 'task' sections")
        if missing:
            raise CheckpointError(f"{path}: not a fairseq checkpoint: its cfg has no "
                                  f"{' and no '.join(repr(k) for k in missing)} section")
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
                              f"{first_line(exc)})") from None


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


# the qswap plugin's training options (fairseq-train's --qswap-calib-batches, --qswap-strict) and
# what loading a checkpoint sets them to
TRAINING_ONLY = {"qswap_calib_batches": 0, "qswap_strict": False}


def setup_task(path: Path, cfg: Any):
    """fairseq's task for ``cfg.task`` (it reads its data directory); DataError naming ``path``."""
    from fairseq import tasks

    data = getattr(cfg.task, "data", None)
    if getattr(cfg.get("model"), "qswap_recipe", None) and getattr(cfg.task, "qswap_recipe", None):
        # the qswap plugin's task: the model cfg holds the recipe the model was trained or
        # converted with; the task's is the training command's --qswap-recipe (a name or a YAML
        # path, which may have changed or gone since)
        set_cfg_option(cfg.task, "qswap_recipe", None)
    for key, value in TRAINING_ONLY.items():
        # the training command's plugin options, stored in its checkpoint's task cfg: loading the
        # checkpoint neither calibrates (a warning said they were ignored) nor checks strictly again
        if getattr(cfg.task, key, None):
            set_cfg_option(cfg.task, key, value)
    name = _cfg_name(cfg.task, "task")
    if isinstance(name, str) and name not in tasks.TASK_REGISTRY:
        from qswap.integration.fairseq_task import register_tasks
        register_tasks()  # qswap's own tasks (speech_to_text_qswap, audio_finetuning_qswap)
        if name not in tasks.TASK_REGISTRY:  # a record edited by hand, or a plugin not imported
            raise DataError(f"{path}: records fairseq task {name!r}, which is not a registered fairseq task "
                            f"(known: {', '.join(sorted(tasks.TASK_REGISTRY)[:8])}, ...); the file was edited "
                            f"or needs a fairseq plugin (--user-dir): re-export or re-save it")
    try:
        return tasks.setup_task(cfg.task, from_checkpoint=True)
    except QswapError:
        raise
    except Exception as exc:  # the task reads its data directory: config, dictionaries
        raise DataError(f"{path}: cannot set up fairseq task {_cfg_name(cfg.task, 'task')!r} from "
                        f"data directory {data!r} ({type(exc).__name__}: {first_line(exc)}); "
                        f"point it at the folder with the task's config and dictionary: '--data DIR' on the "
                        f"command line, arg_overrides={{'data': DIR}} in Python") from None


def set_cfg_option(opts: Any, key: str, value: Any) -> None:
    """Set ``key`` in a fairseq options node: a DictConfig (the key added even in struct mode), a
    dict, or an ``argparse.Namespace`` (legacy args); nothing for None."""
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.is_config(opts):
        with open_dict(opts):
            opts[key] = value
    elif isinstance(opts, Mapping):
        opts[key] = value
    elif opts is not None:
        setattr(opts, key, value)


# -- qswap checkpoints -------------------------------------------------------------------------
def save_qswap_checkpoint(path: "str | os.PathLike[str]", model: nn.Module,
                          state_like_fairseq: Any, *, trust_checkpoint: bool = False,
                          data: "str | os.PathLike[str] | None" = None, dictionary: Any = None) -> Path:
    """Write a converted (and calibrated) model as a qswap checkpoint, atomically.

    ``state_like_fairseq`` gives the fairseq config the float model was built from: the path of
    the checkpoint it was loaded from (read with ``load_checkpoint(path, trust_checkpoint)``), a
    checkpoint state (``{"cfg": ...}`` or ``{"args": ...}``), or a cfg (DictConfig / dict).
    ``data``: the data directory the model was loaded with (a command's ``--data``), written into
    the cfg's ``task.data`` as an absolute path, so that a later command (``qswap export``,
    ``qswap eval``) finds it without ``--data``; None keeps the cfg's own. ``dictionary``: the task's
    target dictionary (default: an S2T decoder's own; a CTC model holds none: pass the task's), whose facts the model cfg records
    (``qswap.io.dictionary``): loading the checkpoint with a data directory of another dictionary
    is then refused, not decoded into other words.
    """
    recipe = getattr(model, "qswap_recipe", None)
    if recipe is None:
        raise CheckpointError("save_qswap_checkpoint takes a model made by qswap.convert (it has no "
                              ".qswap_recipe); convert the model first")
    from qswap import __version__

    recipe_data = to_plain(recipe.to_dict(), "recipe")
    cfg = to_plain(_cfg_of(state_like_fairseq, trust_checkpoint), "cfg")
    cfg["model"]["qswap_recipe"] = recipe_data  # for fairseq's loader with the qswap plugin
    if dictionary is None:
        dictionary = getattr(getattr(model, "decoder", None), "dictionary", None)
    if dictionary is not None:
        cfg["model"][DICTIONARY_KEY] = dictionary_facts(dictionary)
    if data is not None:
        cfg["task"]["data"] = str(Path(data).resolve())
    plain = _canonical({
        "cfg": cfg,
        "args": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "extra_state": {},
        QSWAP_KEY: {"format": QSWAP_FORMAT, "version": __version__, "recipe": recipe_data},
    })
    state = {**plain, "model": model.state_dict()}
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def _canonical(plain: dict) -> dict:
    """Fresh objects built from the JSON text alone. pickle memoizes objects shared in the graph
    (the same str object used twice), and which strings are shared depends on the process's
    history; rebuilding from text makes the written bytes depend on the content only."""
    return json.loads(json.dumps(plain, sort_keys=True))


def _cfg_of(state_like: Any, trust_checkpoint: bool) -> Any:
    from omegaconf import OmegaConf

    if isinstance(state_like, (str, os.PathLike)):
        state_like = load_checkpoint(state_like, trust_checkpoint=trust_checkpoint)
        if QSWAP_KEY in state_like:  # re-saving a qswap checkpoint (e.g. after re-calibration)
            state_like = {"cfg": state_like.get("cfg")}
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
    if not isinstance(cfg, Mapping) or not all(isinstance(cfg.get(k), (Mapping, argparse.Namespace))
                                               for k in ("model", "task")):
        raise CheckpointError("save_qswap_checkpoint: the fairseq cfg needs 'model' and 'task' "
                              "sections (pass the state or cfg that load_fairseq_model returned)")
    return cfg


def to_plain(obj: Any, where: str) -> Any:
    """``obj`` as str/int/float/bool/None, lists and str-keyed dicts (Namespaces as dicts)."""
    if isinstance(obj, argparse.Namespace):
        return to_plain(vars(obj), where)
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


def qswap_entry(path, state: dict) -> Mapping:
    """The checked ``qswap`` entry of a loaded qswap checkpoint (its format and stored recipe);
    CheckpointError for a malformed entry or another format."""
    meta = state[QSWAP_KEY]
    if not isinstance(meta, Mapping) or not isinstance(meta.get("recipe"), Mapping):
        raise CheckpointError(f"{path}: malformed qswap entry (expected a mapping with 'format' and "
                              f"'recipe'); the file is damaged")
    if meta.get("format") != QSWAP_FORMAT:
        raise CheckpointError(f"{path}: qswap checkpoint format {meta.get('format')!r}; this qswap "
                              f"reads format {QSWAP_FORMAT} (written by qswap {meta.get('version')!r})")
    return meta


def _load_qswap(path: Path, state: dict, arg_overrides: Mapping[str, Any] | None):
    meta, cfg = _stored_cfg(path, state, arg_overrides)
    task = setup_task(path, cfg)
    check_dictionary(path, cfg.get("model"), task)
    model = _build_float_model(path, cfg, task)
    qmodel = _convert_stored(path, model, meta["recipe"])
    _load_quantized_state(path, qmodel, state["model"])
    return qmodel.eval(), cfg, task


def check_dictionary(path: Any, model_cfg: Any, task: Any) -> None:
    """A DataError where the task's target dictionary is not the one the checkpoint's model cfg
    records (``qswap.io.dictionary``); nothing where it records none."""
    recorded = recorded_facts(model_cfg)
    if recorded is None:
        return
    try:
        dictionary = task.target_dictionary  # some tasks (audio_finetuning) read it only now
    except Exception:  # noqa: BLE001  (fairseq's own error: building the model reports it)
        return
    check(recorded, dictionary, f"the checkpoint {path}")


def _stored_cfg(path: Path, state: dict, arg_overrides: Mapping[str, Any] | None) -> tuple[Mapping, Any]:
    """(the checked qswap entry, the cfg as a DictConfig with ``arg_overrides`` applied) of a
    loaded qswap checkpoint."""
    from omegaconf import OmegaConf

    meta = qswap_entry(path, state)
    if not isinstance(state.get("cfg"), Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"{path}: qswap checkpoint without 'cfg' or 'model'; the file is damaged")
    _check_weights(path, state["model"])
    try:
        cfg = OmegaConf.create(dict(state["cfg"]), flags={"allow_objects": True})
        if arg_overrides:
            from fairseq.dataclass.utils import overwrite_args_by_name
            overwrite_args_by_name(cfg, dict(arg_overrides))
    except Exception as exc:
        raise CheckpointError(f"{path}: malformed cfg in qswap checkpoint ({first_line(exc)})") from None
    _check_registered(path, cfg)
    return meta, cfg


def float_structure(path: "str | os.PathLike[str]", *, trust_checkpoint: bool = False,
                    arg_overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """A float model (fresh weights) of the architecture the qswap checkpoint ``path`` was converted
    from: what ``qswap.regrid`` converts with another recipe (it loads the checkpoint's weights
    into it). The recipe the cfg stores is left out, so that the plugin's task builds it float."""
    path = Path(path)
    state = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    if QSWAP_KEY in state:
        _, cfg = _stored_cfg(path, state, arg_overrides)
    else:  # a checkpoint fairseq-train wrote with the plugin (QAT): its cfg names the recipe
        check_fairseq_state(path, state)
        cfg = _prepare_state(path, state, arg_overrides)["cfg"]
        if cfg is None or not any(getattr(node, "qswap_recipe", None) for node in (cfg.get("model"), cfg.get("task"))):
            raise CheckpointError(f"{path}: a float checkpoint (no qswap recipe in it); convert it with "
                                  f"qswap convert as it is")
        _check_registered(path, cfg)
    for node in (cfg.get("model"), cfg.get("task")):
        # the training command's plugin options too: they would convert or calibrate the built model
        for key, value in (("qswap_recipe", None), *TRAINING_ONLY.items()):
            if key == "qswap_recipe" or getattr(node, key, None) is not None:
                set_cfg_option(node, key, value)
    return _build_float_model(path, cfg, setup_task(path, cfg)).eval()


def _build_float_model(path: Path, cfg: Any, task: Any) -> nn.Module:
    try:
        if "from_checkpoint" in inspect.getfullargspec(task.build_model).args:
            return task.build_model(cfg.model, from_checkpoint=True)
        return task.build_model(cfg.model)
    except Exception as exc:
        raise CheckpointError(f"{path}: fairseq could not build the model from the stored cfg "
                              f"({type(exc).__name__}: {first_line(exc)})", kind="build") from None


def _convert_stored(path: Path, model: nn.Module, recipe: Mapping) -> nn.Module:
    from qswap.convert import QswapWarning, convert
    from qswap.quant import FakeQuantize
    from qswap.recipe.loader import load_stored_recipe
    from qswap.transforms import STRUCTURE_ONLY

    if getattr(model, "qswap_recipe", None) is not None and any(
            isinstance(m, FakeQuantize) for m in model.modules()):
        # the task converted it (the qswap plugin's tasks read cfg.model.qswap_recipe)
        from qswap.recipe import same_recipe
        if not same_recipe(model.qswap_recipe, load_stored_recipe(dict(recipe))):
            raise CheckpointError(f"{path}: the model cfg's recipe ({model.qswap_recipe.name}) is not the "
                                  f"one in the checkpoint's qswap entry ({recipe.get('name')!r}); the file "
                                  f"was edited or is damaged: write it again with qswap convert")
        return model
    try:
        with warnings.catch_warnings():  # they were shown when the model was first converted
            warnings.simplefilter("ignore", QswapWarning)
            # the stored state holds the transformed weights: only module insertions are redone;
            # strict's checks ran at the first conversion (a later qswap may check more: a
            # recipe's strict must not make a checkpoint it wrote unloadable)
            return convert(model, load_stored_recipe(dict(recipe)), inplace=True, data=STRUCTURE_ONLY,
                           strict=False)
    except RecipeError as exc:
        raise CheckpointError(f"{path}: the recipe stored in this qswap checkpoint is invalid "
                              f"({exc}); the file is damaged") from None
    except QswapError as exc:
        raise CheckpointError(f"{path}: cannot re-apply the stored recipe ({exc})") from None


def _load_quantized_state(path: Path, qmodel: nn.Module, state_dict: Mapping) -> None:
    from qswap.quant.fake_quantize import FakeQuantize

    try:
        nn.Module.load_state_dict(qmodel, dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit the model rebuilt from its cfg "
                              f"and recipe ({first_line(exc)}); was it written by a different "
                              f"qswap or fairseq version?") from None
    for name, module in qmodel.named_modules():  # its buffers take the file's shapes (lazy state)
        problem = module.state_problem() if isinstance(module, FakeQuantize) else None
        if problem is not None:  # it had loaded, and the first forward raised a raw ValueError
            raise CheckpointError(f"{path}: quantizer {name} holds {problem}; the file is damaged: write it "
                                  f"again with qswap convert or qswap calibrate")
