"""A quantized model moved onto another recipe's grids, its weights kept.

A QAT run trains the weights of one recipe; a later recipe that changes a few sites' grids
(``w4a4_edges8_stream_embed_smoothquant_lsq`` puts the residual stream's entry on a per-channel
grid where ``w4a4_edges8_stream_smoothquant_lsq`` has one scale) would otherwise start again from
the float checkpoint and lose that training. ``regrid`` converts a float model of the same
architecture with the new recipe's structure only (its transforms are not computed again), loads
every weight of the quantized model into it and the state of every quantizer whose spec and kind
are the same in both recipes (a learned scale, a calibrated grid), and leaves the others fresh:
a weight quantizer derives its grid from its weight at its next call; an activation quantizer is
calibrated with ``qswap.calibrate(model, batches, quantizers=fresh)``, which leaves every other
grid as it is.

The two recipes must fold the same transforms with the same parameters: the weights hold the
old recipe's folded transforms, and a recipe with others needs the float checkpoint (a
ConvertError says so).

>>> moved = qswap.regrid(trained, "w4a4_edges8_stream_embed_smoothquant_lsq", float_model)
>>> qswap.calibrate(moved.model, batches, quantizers=moved.fresh_activations())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from qswap.convert import convert
from qswap.errors import ConvertError
from qswap.quant import FakeQuantize
from qswap.recipe import Recipe, load_recipe
from qswap.transforms import STRUCTURE_ONLY


@dataclass
class Regridded:
    """``model``: the new recipe's model (``.qswap_recipe``, ``.qswap_report`` as ``convert``
    sets them). ``kept``: the quantizers whose state came from the old model; ``fresh``: those
    without (a changed spec or kind, or a site the old recipe did not quantize), by name;
    ``dropped``: the old model's quantizers the new recipe has no site for."""

    model: nn.Module
    kept: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def fresh_activations(self) -> list[FakeQuantize]:
        """The fresh activation quantizers, for ``qswap.calibrate(..., quantizers=...)``."""
        mods = dict(self.model.named_modules())
        return [mods[n] for n in self.fresh if mods[n].kind == "activation"]


def regrid(qmodel: nn.Module, recipe: "str | Mapping[str, Any] | Recipe", float_model: nn.Module) -> Regridded:
    """``qmodel`` (a model ``qswap.convert`` made, calibrated or trained) under ``recipe``:
    ``float_model`` (the same architecture, any weights; it becomes the result, converted in
    place) converted with the recipe's structure only, ``qmodel``'s weights and the state of its
    unchanged quantizers loaded into it. ``qmodel`` is untouched."""
    old = getattr(qmodel, "qswap_recipe", None)
    if old is None or not _quantizers(qmodel):
        raise ConvertError("regrid takes a model qswap.convert made (with its quantizers and "
                           ".qswap_recipe); to quantize a float model, use qswap.convert")
    if _quantizers(float_model):
        raise ConvertError("regrid's float_model already contains qswap quantizers; pass a float model of "
                           "the same architecture (its weights are replaced)")
    new = load_recipe(recipe)
    if old.transforms != new.transforms:
        raise ConvertError(f"recipe {new.name} folds the transforms {_steps(new)}, and the model's weights hold "
                           f"those of recipe {old.name} ({_steps(old)}); a recipe with other transforms starts "
                           f"from the float checkpoint: qswap convert FLOAT_CHECKPOINT --recipe {new.name}")
    model = convert(float_model, new, inplace=True, data=STRUCTURE_ONLY)
    before, after = _quantizers(qmodel), _quantizers(model)
    fresh = [n for n, q in after.items()
             if n not in before or before[n].kind != q.kind or before[n].spec != q.spec]
    dropped = [n for n in before if n not in after]
    skip = tuple(f"{n}." for n in (*fresh, *dropped))
    state = {k: v for k, v in qmodel.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = nn.Module.load_state_dict(model, state, strict=False)
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ConvertError(f"the quantized model and float_model are not the same architecture: "
                           f"{len(missing)} entries of the new model have no value in the old one "
                           f"({', '.join(missing[:3])}), {len(unexpected)} of the old one have no place "
                           f"({', '.join(unexpected[:3])}); pass a float model built from the same config")
    model.eval()
    kept = [n for n in after if n not in fresh]
    return Regridded(model=model, kept=kept, fresh=fresh, dropped=dropped)


def _quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantize)}


def _steps(recipe: Recipe) -> str:
    return ", ".join(s.describe() for s in recipe.transforms) or "none"
