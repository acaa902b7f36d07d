"""A quantized model moved onto another recipe's grids, its weights kept.

A QAT run trains the weights of one recipe; a later recipe that changes a few sites' grids
(``w4a4_edges8_stream_embed_smoothquant_lsq`` puts the residual stream's entry on a per-channel
grid where ``w4a4_edges8_stream_smoothquant_lsq`` has one scale) would otherwise start again from
the float checkpoint and lose that training. ``regrid`` converts a copy of a float model of the
same architecture (the caller's stays as it is) with the new recipe's structure only (its
transforms are not computed again), loads every weight of the quantized model into it and the
state of every quantizer whose spec and kind are the same in both recipes (a learned scale, a calibrated grid; a site the model's calibration
never reached stays as it was, observing), and leaves the others fresh:
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
    without (a changed spec or kind, a site the old recipe did not quantize, or every activation
    site of a model that was never calibrated: none of its activation grids frozen), by name;
    ``dropped``: the names of the old model's quantizers the new recipe has no site for (a
    quantizer under each name it has: a tied weight's under each owner)."""

    model: nn.Module
    kept: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def fresh_activations(self) -> list[FakeQuantize]:
        """The fresh activation quantizers, for ``qswap.calibrate(..., quantizers=...)``."""
        mods = dict(self.model.named_modules())
        return [mods[n] for n in self.fresh if mods[n].kind == "activation"]


def regrid(qmodel: nn.Module, recipe: "str | Mapping[str, Any] | Recipe", float_model: nn.Module, *,
           strict: bool | None = None) -> Regridded:
    """``qmodel`` (a model ``qswap.convert`` made, calibrated or trained) under ``recipe``: a copy
    of ``float_model`` (the same architecture, any weights) converted with the recipe's structure
    only, ``qmodel``'s weights and the state of its unchanged quantizers loaded into it. Neither
    ``qmodel`` nor ``float_model`` is changed, also where it fails (another architecture: a
    ConvertError). A model of a recipe without quantizers (``fp32``) has every site fresh.
    ``strict``: as ``qswap.convert``'s."""
    for name, value in (("qmodel", qmodel), ("float_model", float_model)):
        if not isinstance(value, nn.Module):
            raise ConvertError(f"regrid's {name} is a torch.nn.Module, got {type(value).__name__}")
    old = getattr(qmodel, "qswap_recipe", None)
    if old is None:
        raise ConvertError("regrid takes a model qswap.convert made (it has .qswap_recipe); to quantize a "
                           "float model, use qswap.convert")
    if _quantizers(float_model):
        raise ConvertError("regrid's float_model already contains qswap quantizers; pass a float model of "
                           "the same architecture (its weights are replaced)")
    new = load_recipe(recipe)
    if _filled(old) != _filled(new):
        raise ConvertError(f"recipe {new.name} folds the transforms {_steps(new)}, and the model's weights hold "
                           f"those of recipe {old.name} ({_steps(old)}); a recipe with other transforms starts "
                           f"from the float checkpoint: qswap convert FLOAT_CHECKPOINT --recipe {new.name}")
    model = convert(float_model, new, data=STRUCTURE_ONLY, strict=strict)  # a copy: the caller's stays float
    before, after = _quantizers(qmodel), _quantizers(model)
    # fresh: no state carried over, as the spec or kind changed, or the old model was never calibrated
    # (no activation grid frozen: a --no-calibrate checkpoint), unless the new recipe declares dynamic
    # ranges. A calibrated model's site still observing is one its calibration never reached: kept as is.
    never = not any(bool(q.frozen) for q in before.values() if q.kind == "activation") and not new.dynamic_activations
    fresh = [n for n, q in after.items()
             if n not in before or before[n].kind != q.kind or before[n].spec != q.spec
             or (never and q.kind == "activation")]
    # every name of an old quantizer the new model lacks: a tied one keeps its first owner's name and
    # loses another's where the new recipe leaves that owner float (a skipped output projection)
    named_after = _quantizers(model, every_name=True)
    dropped = [n for n in _quantizers(qmodel, every_name=True) if n not in named_after]
    # every name of a fresh quantizer (a tied or aliased one has several) and each dropped name: no state loaded
    skip = tuple(f"{alias}." for alias in _aliases(model, fresh) | _aliases(qmodel, fresh) | set(dropped))
    state = {k: v for k, v in qmodel.state_dict().items() if not k.startswith(skip)}
    wrong = ("the quantized model and float_model are not the same architecture: {}; pass a float model "
             "built from the same config")
    try:
        missing, unexpected = nn.Module.load_state_dict(model, state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise ConvertError(wrong.format(str(exc).strip().splitlines()[-1].strip())) from None
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ConvertError(wrong.format(
            f"{len(missing)} entries of the new model have no value in the old one ({', '.join(missing[:3])}), "
            f"{len(unexpected)} of the old one have no place ({', '.join(unexpected[:3])})"))
    # shapes alone miss what splits a weight: attention heads, per module
    olds = dict(qmodel.named_modules())
    for name, module in model.named_modules():
        for attr in _STRUCTURE:
            was, now = getattr(olds.get(name), attr, None), getattr(module, attr, None)
            if name in olds and was != now:
                raise ConvertError(wrong.format(f"{name or 'the model'}.{attr} is {was} in the quantized model "
                                                f"and {now} in float_model"))
    model.eval()
    kept = [n for n in after if n not in fresh]
    return Regridded(model=model, kept=kept, fresh=fresh, dropped=dropped)


# attributes that change how a module reads weights of the same shapes (fairseq's attention heads)
_STRUCTURE = ("num_heads", "head_dim", "h", "d_k")


def _aliases(model: nn.Module, names: list[str]) -> set[str]:
    """Every name under which the modules called ``names`` appear in ``model``."""
    names = set(names)
    wanted = {id(m) for n, m in model.named_modules() if n in names}
    return {n for n, m in model.named_modules(remove_duplicate=False) if id(m) in wanted}


def _filled(recipe: Recipe) -> list[tuple[str, dict]]:
    """The recipe's transforms with each parameter's default filled in: ``smoothquant: {alpha: 0.5}``
    and the same with its defaults written out fold the same weights."""
    return [(s.name, s.filled()) for s in recipe.transforms]


def _quantizers(model: nn.Module, every_name: bool = False) -> dict[str, FakeQuantize]:
    """``model``'s quantizers by name: each under its first name, or (``every_name``) under each
    name it has (a tied weight's quantizer under each owner)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=not every_name) if isinstance(m, FakeQuantize)}


def _steps(recipe: Recipe) -> str:
    return ", ".join(s.describe() for s in recipe.transforms) or "none"
