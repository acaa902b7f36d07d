"""Mixed-precision recipe search from measured weight sensitivity.

The search works on *units*: the modules the walker swaps (a Linear, a whole attention, a
conv), which are what recipe rules address by path. Start from a high-precision recipe
(``high``, e.g. w8a8_per_channel); for every unit, measure the output SQNR loss when that
unit's weights alone drop to ``low_bits``, everything else float (so the measurement is not
buried under the noise of every other quantizer). Quantization errors of different units add up
roughly as independent noises, so each unit's cost is the noise power it adds (relative to the
signal: ``10^(-SQNR_low/10) - 10^(-SQNR_high/10)``), and units go low-bit in order of least
added noise per weight saved:

* ``target_mb``: as many as needed for the weights to fit the budget;
* ``max_delta_wer``: as many as keep ``evaluate`` (dev WER) within the budget (binary search
  over the ordered list; decoding is the expensive step).

The result is an ordinary recipe: ``high``'s defaults plus one exact-path rule per low-bit unit
(both paths of a tied embedding / output projection), first in the rule order.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from qswap.calibrate import check_batches
from qswap.convert import copy_model, rules_hit, rules_in_effect
from qswap.errors import BudgetError, expect_module
from qswap.nn.base import param_quantizer
from qswap.quant.fake_quantize import FakeQuantize
from qswap.quant.observers import make_observer
from qswap.quant.switch import enabled_only
from qswap.recipe import load_recipe
from qswap.recipe.loader import OBSERVER_OPTIONS
from qswap.sensitivity import checked_wer, model_output, output_sqnr
from qswap.transforms import STRUCTURE_ONLY, apply_transforms


@dataclass
class Candidate:
    paths: list[str]  # the unit's path(s): two for a tied embedding / output projection
    numel: int  # weights the unit stores
    loss_db: float  # output SQNR drop (dB) at low bits, this unit alone quantized
    cost: float = 0.0  # relative output noise power it adds at low bits (what the order uses)


@dataclass
class SearchResult:
    recipe: dict  # recipe as plain data (write it with yaml.safe_dump)
    low_units: list[str]
    weight_mb: float
    candidates: list[Candidate] = field(default_factory=list)
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (units low, dev WER)
    # units moved to low bits: the first ``low_count`` candidates (``low_units`` holds their paths, two
    # for a tied embedding and output projection, which are one unit)
    low_count: int = 0


def _units(qmodel: nn.Module) -> list[tuple[list[str], list[FakeQuantize], int]]:
    """(paths, weight quantizers, weight numel) of every swapped, non-norm unit."""
    entries = qmodel.qswap_report.by_action("quantized")
    unit_paths = sorted((e.path for e in entries), key=len, reverse=True)
    # a normalization's scale and shift stay as the recipe says (declared: QuantModule.normalizes)
    norms = {e.path for e in entries if getattr(qmodel.get_submodule(e.path), "normalizes", False)}
    owners: dict[int, tuple[FakeQuantize, set[str], int]] = {}
    for mpath, module in qmodel.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            # the class's declared quantizer (wav2vec 2.0's weight-normed positional conv: weight_g and
            # weight_v read by weight_quant), as the size report finds it (cost.parameter_bytes)
            q = param_quantizer(module, pname)
            if not isinstance(q, FakeQuantize):
                continue
            unit = next((u for u in unit_paths if mpath == u or mpath.startswith(u + ".")), None)
            if unit is None or unit in norms:
                continue
            # one numel per quantizer: the largest parameter it reads (weight_v, not weight_g)
            held = owners.get(id(q))
            owners[id(q)] = (q, (held[1] if held else set()) | {unit}, max(held[2] if held else 0, param.numel()))
    grouped: dict[tuple[str, ...], tuple[list[FakeQuantize], int]] = {}
    for q, units, numel in owners.values():
        key = tuple(sorted(units))
        qs, n = grouped.get(key, ([], 0))
        grouped[key] = (qs + [q], n + numel)
    for qpath, q in qmodel.named_modules():
        # a weight quantizer of no parameter (a rope attention's rotary tables, made at run time):
        # the written rule of the unit holding it moves it too, so that unit's probe does
        if isinstance(q, FakeQuantize) and q.kind == "weight" and id(q) not in owners:
            unit = next((u for u in unit_paths if qpath.startswith(u + ".")), None)
            key = next((k for k in grouped if unit in k), None)
            if key is not None:
                grouped[key][0].append(q)
    return [(list(k), qs, n) for k, (qs, n) in grouped.items()]


# the observer a unit moved to low bits gets (written by ``build_recipe``, probed by ``_bits``)
LOW_BITS_OBSERVER = "mse"


def low_weight_changes(bits: int) -> dict[str, Any]:
    """What a unit moved to ``bits`` changes in its weight spec: the one source of what the written
    rule declares (``build_recipe``) and what the ranking measures (``_bits``)."""
    return {"bits": bits, "observer": LOW_BITS_OBSERVER}


@contextlib.contextmanager
def _bits(quantizers: list[FakeQuantize], bits: int) -> Iterator[None]:
    """Temporarily give weight quantizers the spec a rule moving them to ``bits`` declares (the
    width and observer of ``low_weight_changes``), with a fresh observer of that spec; the spec
    and observer objects are restored afterwards, whatever happens (and the grid re-derived)."""
    saved = [(q.spec, q.observer) for q in quantizers]
    try:
        for q in quantizers:
            spec = q.spec.replace(**low_weight_changes(bits))
            q.observer = make_observer(spec)
            q.spec = spec  # drops the grid kept (FakeQuantize.spec)
        yield
    finally:
        for q, (spec, observer) in zip(quantizers, saved):
            q.observer = observer
            q.spec = spec


def _movable_units(model: nn.Module, high: Any, low_bits: int) -> list[Candidate]:
    """The units ``rank_candidates`` orders (those with weights above ``low_bits``), unmeasured and
    in no order: what the sizes with every unit low need."""
    import qswap

    qmodel = qswap.convert(model, high, data=STRUCTURE_ONLY)
    return [Candidate(paths, numel, 0.0) for paths, quantizers, numel in _units(qmodel)
            if not all(q.spec.bits <= low_bits for q in quantizers)]


def rank_candidates(model: nn.Module, high: Any, batches: list, low_bits: int = 4) -> list[Candidate]:
    """Units ordered by least output noise added per weight moved to ``low_bits``, each unit's
    weights measured alone (every other quantizer off: float), with the weight spec the written
    rule declares (``_bits``: ``low_weight_changes``)."""
    import qswap

    float_model = copy_model(model).eval()
    with torch.no_grad():
        reference = [model_output(float_model, b) for b in batches]
    qmodel = qswap.convert(model, high, data=batches).eval()  # data: the statistics transforms fold (smoothquant)
    units = _units(qmodel)
    if not units:  # it had calibrated ("convert it first" where nothing was quantized) or found 0 units
        raise BudgetError(f"the high recipe {qmodel.qswap_recipe.name} (--high) quantizes the weights of no module "
                          f"of this model (every unit skipped or left float): the search moves units with "
                          f"quantized weights to fewer bits; pass a high recipe that quantizes them (the default: "
                          f"w8a8_per_channel)")
    everything = [m for m in qmodel.modules() if isinstance(m, FakeQuantize)]
    qswap.calibrate(qmodel, batches)
    candidates = []
    for paths, quantizers, numel in units:
        if all(q.spec.bits <= low_bits for q in quantizers):
            continue
        with enabled_only(everything, keep=quantizers):
            high_db = output_sqnr(reference, qmodel, batches)
            with _bits(quantizers, low_bits):
                low_db = output_sqnr(reference, qmodel, batches)
        candidates.append(Candidate(paths, numel, _loss_db(high_db, low_db), _added_noise(high_db, low_db)))
    candidates.sort(key=lambda c: (c.cost / c.numel, c.paths))
    return candidates


def _loss_db(high_db: float, low_db: float) -> float:
    return 0.0 if high_db == low_db else max(high_db - low_db, 0.0)


def _added_noise(high_db: float, low_db: float) -> float:
    """Relative output noise power the low bits add; inf where the output breaks (-inf dB), so
    such a unit sorts last instead of in an undefined place."""
    try:
        noise = math.inf if low_db == -math.inf else 10.0 ** (-low_db / 10.0) - 10.0 ** (-high_db / 10.0)
    except OverflowError:  # below about -3080 dB
        noise = math.inf
    return math.inf if math.isnan(noise) else max(noise, 0.0)


def build_recipe(high: Any, low: list[Candidate], low_bits: int, name: str,
                 rules: Mapping[str, Any] | None = None, structure: nn.Module | None = None) -> dict:
    """``high`` with one exact-path rule per unit moved to ``low_bits`` weights, placed first. Each
    is the rule ``high`` applies to that module (``rules``: path -> rule, ``qswap.convert.
    rules_in_effect``; the nearest listed ancestor's for a path not listed; without it, the
    defaults) with only the weight's width and observer changed (``low_weight_changes``, what the
    ranking's probe ``_bits`` measured): its activations, sites and float_ok stay as ranked.
    ``structure`` (the model with the high recipe's transforms' modules): the base rules the moved
    ones leave taking no module are left out (``_still_taking``)."""
    base = load_recipe(high).to_dict()
    moved = []
    for c in low:
        for p in c.paths:
            effective = _nearest(rules or {}, p)
            own = {k: v for k, v in (base["rules"][effective.index] if effective is not None else {}).items()
                   if k not in ("match", "note", "skip")}
            weight = own.get("weight", base.get("defaults", {}).get("weight")) or {}
            # an option of the high observer (percentile, momentum) is no option of the low one
            kept = {k: v for k, v in weight.items() if OBSERVER_OPTIONS.get(k, LOW_BITS_OBSERVER) == LOW_BITS_OBSERVER}
            moved.append({**own, "match": {"path": p}, "weight": {**kept, **low_weight_changes(low_bits)},
                          "note": f"searched: alone at {low_bits} bits it costs {c.loss_db:.2f} dB of output SQNR"})
    written = {**base, "name": name,
               "description": f"mixed precision searched from {base.get('name', 'recipe')}: "
                              f"{len(low)} units at {low_bits}-bit weights",
               "rules": moved + list(base.get("rules", []))}
    if structure is not None and moved:
        written["rules"] = moved + _still_taking(written, structure, len(moved))
    return written


def _still_taking(recipe: dict, structure: nn.Module, first_base: int) -> list:
    """The base rules (``recipe["rules"][first_base:]``) that still take a module (any path,
    containers included, the first rule matching it) once the moved units' exact-path rules come
    first: the others would take none (a "shadowed" warning at every convert of the written recipe,
    a ConvertError under ``strict: true``) and change nothing where left out."""
    hit = rules_hit(structure, load_recipe(recipe))
    return [r for i, r in enumerate(recipe["rules"][first_base:], first_base) if i in hit]


def _nearest(rules: Mapping[str, Any], path: str):
    """``rules``' entry of ``path``, or of its nearest ancestor listed; None: none is."""
    while True:
        if path in rules:
            return rules[path]
        if not path:
            return None
        path = path.rpartition(".")[0]


def search(model: nn.Module, batches: list, *, high: Any = "w8a8_per_channel", low_bits: int = 4,
           target_mb: float | None = None, max_delta_wer: float | None = None,
           evaluate: Callable[[nn.Module], float] | None = None, name: str = "searched") -> SearchResult:
    """A mixed-precision recipe meeting ``target_mb`` or ``max_delta_wer`` (exactly one).

    >>> result = qswap.search(float_model, dev_batches, target_mb=1.5)
    >>> yaml.safe_dump(result.recipe)
    """
    import qswap

    expect_module(model, "search()", BudgetError)
    if (target_mb is None) == (max_delta_wer is None):
        raise BudgetError("give exactly one budget: target_mb or max_delta_wer")
    option, budget = ("target_mb", target_mb) if target_mb is not None else ("max_delta_wer", max_delta_wer)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise BudgetError(f"{option} must be a finite number, got {budget!r}; pass MB of weights (target_mb) "
                          f"or WER points above float (max_delta_wer)")
    if isinstance(low_bits, bool) or not isinstance(low_bits, int) or not 2 <= low_bits <= 16:
        raise BudgetError(f"low_bits is the weight width units move down to: a whole number of bits from 2 to 16, "
                          f"got {low_bits!r}")
    check_batches(batches, "search")
    batches = list(batches)
    # the rules convert applies, on the model with the high recipe's transforms' modules (a
    # hadamard fc2 becomes a RotatedLinear, whose .linear a candidate names): worked out once
    structure = copy_model(model)
    apply_transforms(structure, load_recipe(high).transforms, STRUCTURE_ONLY)
    rules = rules_in_effect(structure, load_recipe(high))

    def sized(units: list[Candidate]) -> float:
        # the sizes need the transforms' modules, not their folded values
        recipe = build_recipe(high, units, low_bits, name, rules, structure)
        return qswap.convert(model, recipe, data=STRUCTURE_ONLY).qswap_report.quantized_bytes / 1e6

    if target_mb is not None:  # before the ranking's minutes of probes: every unit low needs no order
        smallest = sized(_movable_units(model, high, low_bits))
        if target_mb < smallest:
            raise BudgetError(f"no recipe fits {target_mb} MB: with every unit at {low_bits}-bit weights "
                              f"they take {smallest:.3f} MB ({sized([]):.3f} MB with none); raise the "
                              f"budget or lower low_bits")
    candidates = rank_candidates(model, high, batches, low_bits)
    if not candidates:  # the result would be the high recipe, its rows decoded for nothing
        raise BudgetError(f"no unit of {load_recipe(high).name} (--high) has weights above {low_bits} bits (its "
                          f"norms keep theirs: the search does not move them); pass a lower low_bits or a "
                          f"higher recipe")

    def recipe(n: int) -> dict:
        return build_recipe(high, candidates[:n], low_bits, name, rules, structure)

    def size_mb(n: int) -> float:
        return sized(candidates[:n])

    if target_mb is not None:
        lo, hi = 0, len(candidates)  # fewest low-bit units that fit: sizes fall as n grows
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if size_mb(mid) <= target_mb else (mid + 1, hi)
        return SearchResult(recipe(lo), [p for c in candidates[:lo] for p in c.paths], size_mb(lo), candidates,
                            low_count=lo)
    if evaluate is None:
        raise BudgetError("max_delta_wer needs an evaluate(model) -> WER function")
    float_wer = checked_wer(evaluate, copy_model(model).eval(), BudgetError)
    evaluations: list[tuple[int, float]] = []

    def delta(n: int) -> float:
        qm = qswap.convert(model, recipe(n), data=batches).eval()
        qswap.calibrate(qm, batches)
        wer = checked_wer(evaluate, qm, BudgetError)
        evaluations.append((n, wer))
        return wer - float_wer

    if delta(0) > max_delta_wer:
        raise BudgetError(f"even {load_recipe(high).name} loses {evaluations[0][1] - float_wer:.2f} WER "
                          f"points (> {max_delta_wer}); raise the budget or start from a higher recipe")
    lo, hi = 0, len(candidates)  # most low-bit units within the budget (WER grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if delta(mid) <= max_delta_wer else (lo, mid - 1)
    return SearchResult(recipe(lo), [p for c in candidates[:lo] for p in c.paths], size_mb(lo), candidates,
                        evaluations, low_count=lo)
