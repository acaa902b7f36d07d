"""Where a QAT run's transformed weights come from, for a recipe whose transforms need activation
statistics (``smoothquant``).

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
from typing import Any

from qswap.errors import ConvertError
from qswap.recipe import Recipe
from qswap.transforms import STRUCTURE_ONLY, needs_data


def convert_command(recipe_arg: Any, float_checkpoint: Any = None, data: Any = None) -> str:
    """The ``qswap convert`` command that writes the checkpoint to fine-tune from."""
    return (f"qswap convert {float_checkpoint or 'FLOAT_CHECKPOINT'} --recipe {recipe_arg} "
            f"--data {data or 'DATA'} --calib-batches 4 -o QCKPT")


def converted_start(recipe: Recipe, finetune_from: Any, *, recipe_arg: Any = None, data: Any = None,
                    float_checkpoint: Any = None) -> Any:
    """``data=`` for ``qswap.convert`` of a model fairseq-train builds for QAT: None when the
    recipe's transforms need no statistics; ``STRUCTURE_ONLY`` when ``finetune_from`` is a qswap
    checkpoint written with this very recipe (its state holds the folded weights and the
    calibrated quantizers). Otherwise a ConvertError naming the ``qswap convert`` command to run
    (``recipe_arg``, ``data``, ``float_checkpoint``: the recipe name or path, the data directory
    and the float checkpoint it shows)."""
    if not needs_data(recipe.transforms):
        return None
    recipe_arg = recipe_arg or recipe.name
    steps = ", ".join(s.describe() for s in recipe.transforms)
    what = (f"recipe {recipe.name}: its transforms ({steps}) need activation statistics, which a "
            f"model fairseq-train builds (random weights) does not have")
    if not finetune_from:
        raise ConvertError(f"{what}; convert the trained float checkpoint first, "
                           f"`{convert_command(recipe_arg, float_checkpoint, data)}`, and fine-tune from it "
                           f"(--finetune-from-model QCKPT)")
    stored = _stored_recipe(finetune_from)
    if stored is None:
        raise ConvertError(f"{what}, and --finetune-from-model {finetune_from} is a float checkpoint; "
                           f"convert it first, `{convert_command(recipe_arg, finetune_from, data)}`, "
                           f"and fine-tune from QCKPT")
    if stored.to_dict() != recipe.to_dict():
        raise ConvertError(f"{what}; --finetune-from-model {finetune_from} was converted with recipe "
                           f"{stored.name}, not with this one (its folded weights and grids would not "
                           f"be this recipe's); convert the float checkpoint with this recipe, "
                           f"`{convert_command(recipe_arg, float_checkpoint, data)}`")
    return STRUCTURE_ONLY


def _stored_recipe(path: Any) -> "Recipe | None":
    """The recipe a qswap checkpoint stores; None for a fairseq checkpoint without one."""
    from qswap.io.checkpoint import QSWAP_KEY, qswap_entry
    from qswap.io.safe_load import load_checkpoint
    from qswap.recipe import load_recipe

    state = load_checkpoint(os.fspath(path))  # qswap checkpoints load with weights_only, no allowlist
    if QSWAP_KEY not in state:
        return None
    return load_recipe(dict(qswap_entry(path, state)["recipe"]))
