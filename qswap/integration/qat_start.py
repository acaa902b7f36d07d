"""Where a QAT run's transformed weights come from, for a recipe with transforms (folded into the
weights: ``smoothquant``, which needs activation statistics, and ``hadamard``).

fairseq-train builds the model (random weights) before it loads ``--finetune-from-model``, so the
transforms cannot be computed there: the run fine-tunes from a qswap checkpoint that
``qswap convert`` wrote with the same recipe (the transforms folded into the trained float
weights with real calibration statistics, every quantizer calibrated). The task then converts the
built model with the transforms' structure only (``STRUCTURE_ONLY``) so that the parameter names
and shapes match, and fairseq's loader puts the folded weights and the quantizer state in.

>>> data = converted_start(recipe, "qckpt.pt")   # STRUCTURE_ONLY, or a ConvertError saying what to run
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from qswap.errors import CheckpointError, ConvertError, RecipeError
from qswap.recipe import Recipe, same_recipe
from qswap.transforms import STRUCTURE_ONLY, needs_data


def convert_command(recipe_arg: Any, float_checkpoint: Any = None, data: Any = None) -> str:
    """The ``qswap convert`` command that writes the checkpoint to fine-tune from."""
    return (f"qswap convert {float_checkpoint or 'FLOAT_CHECKPOINT'} --recipe {recipe_arg} "
            f"--data {data or 'DATA'} --calib-batches 4 -o QCKPT")


def _needs_statistics(recipe: Recipe) -> str:
    steps = ", ".join(s.describe() for s in recipe.transforms)
    return f"recipe {recipe.name}: its transforms ({steps}) need activation statistics"


def _folded(recipe: Recipe) -> str:
    """What a recipe's transforms that need no statistics (hadamard) are: folded into the weights."""
    steps = ", ".join(s.describe() for s in recipe.transforms)
    return f"recipe {recipe.name}: its transforms ({steps}) are folded into the weights"


def converted_start(recipe: Recipe, finetune_from: Any, *, recipe_arg: Any = None, data: Any = None,
                    float_checkpoint: Any = None, source: Any = None, state: Any = None) -> Any:
    """``data=`` for ``qswap.convert`` of a model fairseq-train builds for QAT: None for a recipe
    without transforms, or with transforms that need no statistics (hadamard) and no checkpoint to
    load (folded into the built weights); ``STRUCTURE_ONLY`` when ``finetune_from`` (the
    checkpoint fairseq-train loads into the built model: --finetune-from-model, or the run's own
    checkpoint it resumes) is a qswap checkpoint written with this very recipe, or a QAT checkpoint
    trained with it (its state holds the folded weights and the calibrated quantizers). Otherwise
    (a float ``finetune_from``, whose untransformed weights would load over the transformed
    structure; no start for statistics-needing transforms; another recipe's checkpoint)
    a ConvertError naming the ``qswap convert`` command to run (``recipe_arg``, ``data``,
    ``float_checkpoint``: the recipe name or path, the data directory and the float checkpoint it
    shows; ``source``: how the message names ``finetune_from``, by default as
    ``--finetune-from-model``; ``state``: ``finetune_from``'s content where the caller has read it)."""
    if not recipe.transforms:
        return None
    recipe_arg = recipe_arg or recipe.name
    statistics = needs_data(recipe.transforms)
    what = (f"{_needs_statistics(recipe)}, which a model fairseq-train builds (random weights) does not have"
            if statistics else _folded(recipe))
    if not finetune_from:
        if not statistics:  # trained from scratch: folded into the weights it builds, which training moves
            return None
        raise ConvertError(f"{what}; convert the trained float checkpoint first, "
                           f"`{convert_command(recipe_arg, float_checkpoint, data)}`, and fine-tune from it "
                           f"(--finetune-from-model QCKPT)")
    source = source or f"--finetune-from-model {finetune_from}"
    stored = stored_recipe(finetune_from, state)
    if stored is None:  # its untransformed weights would load over the transformed structure (rotations lost)
        raise ConvertError(f"{what}, and {source} is a float checkpoint (its weights would load without the "
                           f"transforms); convert it first, `{convert_command(recipe_arg, finetune_from, data)}`, "
                           f"and fine-tune from QCKPT")
    if not same_recipe(stored, recipe):
        raise ConvertError(f"{what}; {source} was converted with recipe "
                           f"{stored.name}, not with this one (its folded weights and grids would not "
                           f"be this recipe's); convert the float checkpoint with this recipe, "
                           f"`{convert_command(recipe_arg, float_checkpoint, data)}`")
    return STRUCTURE_ONLY


def float_checkpoint_error(recipe: Recipe, checkpoint: Any, *, recipe_arg: Any = None,
                           data: Any = None) -> ConvertError:
    """The ConvertError for a float ``checkpoint`` loaded as a model of ``recipe`` whose transforms
    need activation statistics (fairseq-generate --path FLOAT --qswap-recipe R): a model built
    from a checkpoint gets the transforms' structure only, so it would decode the float weights
    untransformed under the recipe's name. It names the ``qswap convert`` command to run."""
    what = (f"{_needs_statistics(recipe)}, which a model loaded from a checkpoint does not have"
            if needs_data(recipe.transforms) else _folded(recipe))
    return ConvertError(f"{what}, and {checkpoint} is a float checkpoint (its weights would be used without "
                        f"the transforms); convert it first, "
                        f"`{convert_command(recipe_arg or recipe.name, checkpoint, data)}`, and load QCKPT "
                        f"(--path QCKPT)")


def stored_recipe(path: Any, state: Mapping | None = None) -> "Recipe | None":
    """The recipe a checkpoint was converted or trained with: a qswap checkpoint's ``qswap`` entry,
    else the ``qswap_recipe`` of a fairseq-train checkpoint's cfg.model / cfg.task (or legacy
    ``args``); None for a float checkpoint. A recipe stored by name or path (a checkpoint of an
    older qswap) that no longer loads is a CheckpointError naming the checkpoint. ``state``: the
    checkpoint's content where the caller has read it (``read_start``), else it is read here."""
    from qswap.io.checkpoint import QSWAP_KEY, check_fairseq_state, qswap_entry

    if state is None:
        state = read_start(path)
    if QSWAP_KEY not in state:  # a torch file of something else: fairseq-train would fail on a missing key
        check_fairseq_state(path, state)
    if QSWAP_KEY in state:
        return load_recipe_of(path, dict(qswap_entry(path, state)["recipe"]))
    cfg = state.get("cfg") or {}
    for opts in (cfg.get("model"), cfg.get("task"), state.get("args")):
        value = opts.get("qswap_recipe") if isinstance(opts, Mapping) else getattr(opts, "qswap_recipe", None)
        if value:
            return load_recipe_of(path, value)
    return None


def stored_dictionary(path: Any, state: Mapping | None = None) -> "dict | None":
    """The target dictionary's facts a checkpoint records (``qswap.io.dictionary``: a qswap
    checkpoint's or a QAT checkpoint's model cfg, or legacy ``args``); None where it records none.
    ``state``: as ``stored_recipe``'s."""
    from qswap.io.dictionary import recorded_facts

    if state is None:
        state = read_start(path)
    cfg = state.get("cfg") or {}
    for opts in (cfg.get("model"), state.get("args")):
        facts = recorded_facts(opts)
        if facts is not None:
            return facts
    return None


def read_start(path: Any) -> Mapping:
    """The content of the checkpoint ``path`` a run starts from (qswap checkpoints load with
    weights_only, no allowlist), read once for ``stored_recipe``, ``stored_dictionary`` and
    ``converted_start`` where the caller keeps it (fairseq-train's start checks each)."""
    from qswap.io.safe_load import load_checkpoint
    return load_checkpoint(os.fspath(path))


def load_recipe_of(path: Any, value: Any) -> Recipe:
    """``value`` (a recipe, its name or path, or its content) stored in the checkpoint ``path``
    (None: a checkpoint whose path is not known here)."""
    from omegaconf import OmegaConf

    from qswap.recipe.loader import load_stored_recipe
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    try:
        return load_stored_recipe(value)
    except RecipeError as exc:
        where = f"{path}: " if path else ""
        raise CheckpointError(f"{where}cannot load the recipe the checkpoint was trained with ({exc}); it "
                              f"stores the recipe by name or path only (written by an older qswap): pass the "
                              f"recipe it was trained with, --qswap-recipe RECIPE", checkpoint=path or None) from None
