"""The low-bit strategy study: every method on every bit budget, on the shipped model.

Rows are methods (a way of building the recipe), columns bit budgets (the shipped recipes w8a8,
w4a8, w4a4 and w4a4_edges8). Each cell is the column's recipe changed as the method says,
converted, calibrated (shipped ``train_calib`` subset: its 32 utterances, one batch, as ``make demo``),
audited and decoded with beam 5 on both shipped 100-utterance sets (``test`` in-voice,
``test_heldout`` held-out voices), with paired bootstrap intervals against float
(``qswap/integration/bootstrap.py``). Writes ``docs/strategies_<subset>.json`` (every row, per-utterance
word errors included; one file per set, cells saved as they finish, ``--resume`` skips them) and
``docs/strategies.md``.

    .venv/bin/python tools/strategies.py                      # decode everything, write the page
    .venv/bin/python tools/strategies.py --from-json          # rewrite the page from the JSON
    .venv/bin/python tools/strategies.py --refresh-integer-form   # only the "integer form" column (no decoding)
    .venv/bin/python tools/strategies.py --refresh-size       # only the weights' sizes (no calibration, no decoding)
    .venv/bin/python tools/strategies.py --qat w4a4_edges8=checkpoints/qat/checkpoint_best.pt
    .venv/bin/python tools/strategies.py --methods shipped smoothquant --columns w4a4_edges8 --batches 1
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qswap.demo import ASSET, calibration_text  # noqa: E402
from qswap.errors import DataError  # noqa: E402
from tools.tool_cli import exit_status  # noqa: E402  (tools/tool_cli.py)

SUBSETS = {"test": "In-voice (`test`)", "test_heldout": "Held-out voices (`test_heldout`)"}
COLUMNS = ["w8a8", "w4a8", "w4a4", "w4a4_edges8"]
PRIORITY = ["w4a4_edges8", "w4a8", "w4a4", "w8a8"]
# the decode order within a column (the page lists METHODS' order): the shipped baseline and the
# methods that move the most first
IMPORTANCE = ["shipped", "stream_entry_smoothquant", "stream_per_channel_smoothquant", "stream_per_channel", "per_site",
              "smoothquant", "per_group",
              "percentile", "minmax", "mse", "observe_float", "hadamard", "smoothquant_hadamard"]
TARGETS = {"w4a8": 0.5, "w4a4_edges8": 2.0}  # issue 19: honest, within + this absolute WER of float
HADAMARD_RULE = {"match": {"class": "Hadamard"}, "note": "the online Walsh-Hadamard's +-1 matrix: codes +-1",
                 "weight": {"bits": 2, "granularity": "per_tensor", "axis": None, "observer": "minmax"}}
GROUP = 16  # divides every linear input width of the shipped model (80 is not a linear's; 176, 704)
# the residual stream: the residual adds' operands and the LayerNorms' inputs (they read the stream)
STREAM_SITES = ["attn_residual", "attn_out", "ffn_residual", "ffn_out", "cross_residual", "cross_out"]
NORMS = ["LayerNorm", "GroupNorm", "Fp32LayerNorm", "Fp32GroupNorm", "FusedLayerNorm"]
PER_CHANNEL = {"granularity": "per_channel", "axis": -1}


def _observer(name: str) -> Callable[[dict], dict]:
    def change(recipe: dict) -> dict:
        recipe["defaults"]["activation"] = {**recipe["defaults"]["activation"], "observer": name}
        return recipe
    return change


# the attention counterparts converted as one unit: their projections are their parts, which a
# class Linear rule does not reach (qswap.convert warns); the rule names the units too
ATTENTIONS = ["MultiheadAttention", "ESPNETMultiHeadedAttention", "RelPositionMultiHeadedAttention",
              "RotaryPositionMultiHeadedAttention"]


def _per_group(recipe: dict) -> dict:
    """Every Linear's weight per group of GROUP input channels, the attention projections'
    included (rules before it keep theirs)."""
    w = {**recipe["defaults"]["weight"], "granularity": "per_group", "axis": -1, "group_size": GROUP}
    recipe["rules"] = [*recipe.get("rules", []), {"match": {"class": ["Linear", *ATTENTIONS]}, "weight": w}]
    return recipe


def _transforms(*steps: dict) -> Callable[[dict], dict]:
    def change(recipe: dict) -> dict:
        recipe["transforms"] = list(steps)
        if any("hadamard" in s for s in steps):
            recipe["rules"] = [*recipe.get("rules", []), HADAMARD_RULE]
        return recipe
    return change


def _stream_per_channel(recipe: dict) -> dict:
    """The residual stream's activation grids per channel (one scale and zero point per embedding
    channel, axis -1): the residual adds' operands and the norms' inputs. Integer arithmetic takes
    it: an add requantizes each operand channel by channel, a norm rescales each channel onto one
    grid before its mean; no matmul reads these grids (the norms' outputs stay per tensor)."""
    recipe["defaults"]["sites"] = {**recipe["defaults"].get("sites", {}), **{s: PER_CHANNEL for s in STREAM_SITES}}
    rules = recipe.setdefault("rules", [])
    for rule in rules:
        classes = rule["match"].get("class", [])
        if set(NORMS) & set([classes] if isinstance(classes, str) else classes) and "path" not in rule["match"]:
            rule["activation"] = {**(rule.get("activation") or {}), **PER_CHANNEL}
            return recipe
    rules.insert(0, {"match": {"class": NORMS}, "activation": PER_CHANNEL})
    return recipe


def _stream_entry(recipe: dict) -> dict:
    """``_stream_per_channel``, and the stream's entry per channel too: the encoder's embed grid
    (the conv subsampler's output, which the first layer's residual add and norm read). Integer
    arithmetic takes it: the subsampler's last GLU requantizes each channel onto it, and the
    entry stream stays per channel until the first add; no matmul reads it."""
    recipe = _stream_per_channel(recipe)
    recipe["defaults"]["sites"]["embed"] = PER_CHANNEL
    return recipe


def _chain(*changes: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def change(recipe: dict) -> dict:
        for c in changes:
            recipe = c(recipe)
        return recipe
    return change


METHODS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "shipped": ("the column's recipe as shipped", lambda r: r),
    "minmax": ("activation ranges: min/max over calibration", _observer("minmax")),
    "percentile": ("activation ranges: 99.99th percentile", _observer("percentile")),
    "mse": ("activation ranges: MSE-optimal clipping", _observer("mse")),
    "observe_float": ("calibration observes float activation sites (`observe: float`), not the quantized model",
                      lambda r: {**r, "observe": "float"}),
    "per_site": ("per activation site, the observer (minmax, percentile, mse) with the highest SQNR", None),
    "per_group": (f"Linear weights (attention projections included) per group of {GROUP} input channels", _per_group),
    "smoothquant": ("SmoothQuant alpha 0.5 folded into norms, fc1/fc2", _transforms({"smoothquant": {"alpha": 0.5}})),
    "hadamard": ("Hadamard: per-head folded, online WHT (64) before fc2", _transforms({"hadamard": {"block": 64}})),
    "smoothquant_hadamard": ("SmoothQuant, then Hadamard", _transforms({"smoothquant": {"alpha": 0.5}},
                                                                        {"hadamard": {"block": 64}})),
    "stream_per_channel": ("residual stream grids per channel (adds' operands, norms' inputs)", _stream_per_channel),
    "stream_per_channel_smoothquant": ("residual stream per channel, and SmoothQuant alpha 0.5",
                                       _chain(_stream_per_channel, _transforms({"smoothquant": {"alpha": 0.5}}))),
    "stream_entry_smoothquant": ("residual stream per channel, its entry (the encoder's embed grid) too, and "
                                 "SmoothQuant alpha 0.5",
                                 _chain(_stream_entry, _transforms({"smoothquant": {"alpha": 0.5}}))),
}


OBSERVERS = ["minmax", "percentile", "mse"]


def site_choice(model, task, column: str) -> dict:
    """Per activation site of the column's recipe, the SQNR (dB) of each observer on the first
    calibration batch after calibrating with it; the pick is the highest."""
    from qswap.integration import data as fdata
    from qswap.integration.site_error import site_sqnr
    import qswap

    batches = list(fdata.net_inputs(task, "train_calib", 4, max_sentences=32))
    table: dict[str, dict[str, float]] = {}
    for observer in OBSERVERS:
        qmodel = qswap.convert(copy.deepcopy(model), _observer(observer)(copy.deepcopy(qswap.load_recipe(column).to_dict())))
        qswap.calibrate(qmodel, batches)
        for site, db in site_sqnr(qmodel, batches[:1]).items():
            table.setdefault(site, {})[observer] = round(db, 2)
    return {"sqnr_db": table, "pick": {site: max(OBSERVERS, key=lambda o: row[o]) for site, row in table.items()}}


def _per_site(picks: dict[str, str]) -> Callable[[dict], dict]:
    def change(recipe: dict) -> dict:
        sites = dict(recipe["defaults"].get("sites", {}))
        for site, observer in picks.items():
            sites[site] = {**sites.get(site, {}), "observer": observer}
        recipe["defaults"]["sites"] = sites
        return recipe
    return change


def recipe_for(column: str, method: str, picks: dict[str, str] | None = None) -> dict:
    """The cell's recipe; ``picks`` (site -> observer, from ``site_choice``) for ``per_site``."""
    import qswap
    recipe = copy.deepcopy(qswap.load_recipe(column).to_dict())
    if method == "per_site":
        if picks is None:
            raise ValueError("per_site needs the picks of site_choice()")
        recipe = _per_site(picks)(recipe)
    else:
        recipe = METHODS[method][1](recipe)
    recipe["name"] = column if method == "shipped" else f"{column}_{method}"
    return recipe


def json_path(prefix: str, subset: str) -> Path:
    return Path(f"{prefix}_{subset}.json")


def load(prefix: str) -> dict:
    """The per-subset JSON files as one payload: {"settings", "cells": {subset: {"method/column": row}}}."""
    payload: dict = {"cells": {}}
    for subset in SUBSETS:
        path = json_path(prefix, subset)
        if path.is_file():
            part = json.loads(path.read_text())
            payload["settings"] = part["settings"]
            payload.setdefault("per_site", {}).update(part.get("per_site", {}))
            payload["cells"][subset] = part["cells"][subset]
    return payload


def integer_form(qmodel) -> str:
    """"yes" when ``qswap.integerize`` builds the model's integer form, else its reason."""
    import qswap
    from qswap.errors import IntegerizeError
    try:
        qswap.integerize(qmodel)
    except IntegerizeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines[0].startswith("cannot integerize the model:") and len(lines) > 1:
            lines = lines[1:]  # the first module's problem, without its path (the cell is the method's)
        return re.sub(r"^\S+ \([\w.]+\): ", "", lines[0])[:160]
    return "yes"


def _same(a: dict, b: dict) -> bool:
    """Two recipes that differ in their name only."""
    return {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


def _save(prefix: str, payload: dict, subset: str) -> None:
    from qswap.io.atomic import atomic_write_text
    part = {"settings": payload["settings"], "cells": {subset: payload["cells"][subset]},
            "per_site": payload.get("per_site", {})}
    atomic_write_text(json_path(prefix, subset), json.dumps(part, separators=(",", ":")) + "\n")


def run(payload: dict, prefix: str, subsets: list[str], methods: list[str], columns: list[str],
        qat: dict[str, str], batches: int | None, beam: int) -> None:
    """Decode every missing cell into ``payload["cells"][subset]["method/column"]``, saving as it goes."""
    from dataclasses import asdict

    from qswap.cli.quiet import held_back
    from qswap.integration import data as fdata
    from qswap.integration.compare import evaluate_recipe, score

    settings = {"calib_subset": "train_calib", "calib_batches": 4, "beam": beam, "batches": batches}
    if payload.get("settings", settings) != settings:
        raise DataError(f"{prefix}_*.json were written with {payload['settings']}; rerun without --resume or with "
                        f"those settings")
    payload["settings"] = settings
    for subset in subsets:
        cells = payload.setdefault("cells", {}).setdefault(subset, {})
        # the 4-bit-activation column first: cells are saved as they finish, a cut-short run keeps those
        order = sorted(columns, key=PRIORITY.index)
        by_weight = sorted(methods, key=lambda m: IMPORTANCE.index(m) if m in IMPORTANCE else len(IMPORTANCE))
        wanted = [("float", "fp32")] + [("qat", c) for c in qat] + [(m, c) for c in order for m in by_weight]
        if all(f"{m}/{c}" in cells for m, c in wanted):
            continue
        with held_back(verbose=False):
            model, task = fdata.load_model_and_task(str(ASSET / "checkpoint.pt"), str(ASSET))
            for method, column in wanted:
                key = f"{method}/{column}"
                if key in cells:
                    continue
                start = time.perf_counter()
                if method == "qat":
                    qmodel, _ = fdata.load_model_and_task(qat[column], str(ASSET))
                    row = score(qmodel, task, f"{column}_qat", subset=subset, beam=beam, batches=batches)
                elif method not in ("float", "shipped", "per_site") and _same(recipe_for(column, method), recipe_for(column, "shipped")) \
                        and f"shipped/{column}" in cells:
                    cells[key] = {**cells[f"shipped/{column}"], "recipe": recipe_for(column, method)["name"],
                                  "same_as": "shipped", "seconds": 0.0}  # e.g. w4a4's own observer is mse
                    _save(prefix, payload, subset)
                    continue
                else:
                    picks = None
                    if method == "per_site":
                        choice = payload.setdefault("per_site", {})
                        if column not in choice:
                            choice[column] = site_choice(model, task, column)
                        picks = choice[column]["pick"]
                    recipe = "fp32" if method == "float" else recipe_for(column, method, picks)
                    row, qmodel = evaluate_recipe(copy.deepcopy(model), task, recipe, subset=subset,
                                                  calib_subset="train_calib", calib_batches=4, beam=beam, batches=batches)
                cells[key] = {**asdict(row), "seconds": round(time.perf_counter() - start, 1),
                              "integer_form": integer_form(qmodel) if method != "float" else None,
                              **({"checkpoint": qat[column]} if method == "qat" else {})}
                _save(prefix, payload, subset)
                print(f"{subset} {key}: WER {row.wer:.2f} honest {row.honest} "
                      f"({cells[key]['seconds']:.0f} s)", flush=True)


def refresh_integer_forms(payload: dict, prefix: str) -> list[str]:
    """Recompute the "integer form" of every PTQ cell that did not have one (convert and calibrate
    as the decode did, no decoding), in every set's cells; returns "method/column: form" lines."""
    first = next(iter(SUBSETS))
    keys = [k for k, c in payload["cells"][first].items()
            if c.get("integer_form") not in (None, "yes") and not k.startswith(("float/", "qat/"))]
    return [f"{key}: {form}" for key, _, form in _refresh(payload, prefix, keys, "integer_form", integer_form,
                                                          calibrated=True)]


def refresh_sizes(payload: dict, prefix: str) -> list[str]:
    """Recompute every quantized cell's weights MB (``qswap.integration.cost.parameter_bytes``)
    from the model the cell decoded: the PTQ cells converted as the decode converted them (no
    calibration: a weight's size is its spec's and its shape's), the QAT cells loaded from their
    checkpoint; every set's cells. Returns "method/column: old -> new MB" lines."""
    from qswap.integration.cost import parameter_bytes

    keys = [k for k in payload["cells"][next(iter(SUBSETS))] if not k.startswith("float/")]
    return [f"{key}: {old:.3f} -> {mb:.3f} MB" for key, old, mb in _refresh(
        payload, prefix, keys, "weight_mb", lambda qmodel: parameter_bytes(qmodel)[1] / 1e6, calibrated=False)]


def _refresh(payload: dict, prefix: str, keys: list[str], field: str, measure: Callable, calibrated: bool) -> list:
    """``measure`` of each cell ``keys`` names, written to ``field`` of that cell in every set's
    file: a PTQ cell's model converted as the decode converted it (and calibrated as it was where
    ``calibrated``), a QAT cell's loaded from its checkpoint; no decoding. Returns (key, the old
    value, the new one) per cell."""
    from qswap.cli.quiet import held_back
    from qswap.integration import data as fdata
    import qswap

    first = payload["cells"][next(iter(SUBSETS))]
    done = []
    with held_back(verbose=False):
        model, task = fdata.load_model_and_task(str(ASSET / "checkpoint.pt"), str(ASSET))
        for key in keys:
            method, column = key.split("/")
            if method == "qat":
                qmodel, _ = fdata.load_model_and_task(first[key]["checkpoint"], str(ASSET))
            else:
                picks = payload.get("per_site", {}).get(column, {}).get("pick") if method == "per_site" else None
                recipe = recipe_for(column, method, picks)
                data = fdata.transform_data(recipe, task, "train_calib", 4, max_sentences=32)
                qmodel = qswap.convert(copy.deepcopy(model), recipe, data=data)
                if calibrated:
                    qswap.calibrate(qmodel, fdata.net_inputs(task, "train_calib", 4, max_sentences=32))
            value = measure(qmodel)
            done.append((key, first[key].get(field), value))
            for cells in payload["cells"].values():
                if key in cells:
                    cells[key][field] = value
    for subset in payload["cells"]:
        _save(prefix, payload, subset)
    return done


def with_intervals(payload: dict) -> dict[str, dict[str, dict]]:
    """Per subset, per cell: WER interval and the paired ΔWER interval against float."""
    from qswap.integration.bootstrap import Bootstrap, bounds, delta_interval, significant, wer_interval

    boot = Bootstrap()
    out = {}
    for subset, cells in payload["cells"].items():
        ref = cells["float/fp32"]
        out[subset] = {}
        for key, c in cells.items():
            wer = wer_interval(c["utterance_errors"], c["utterance_words"], boot)
            d = delta_interval(c["utterance_errors"], ref["utterance_errors"], c["utterance_words"], boot)
            out[subset][key] = {"wer": c["wer"], "wer_ci": bounds(wer), "delta": c["wer"] - ref["wer"],
                                "delta_ci": bounds(d), "significant": significant(d) if key != "float/fp32" else None,
                                "honest": c["honest"], "mb": c["weight_mb"], "same_as": c.get("same_as")}
    return out


def pair(payload: dict, subset: str, a: str, b: str):
    """The paired interval of WER(a) - WER(b) on one subset (None below MIN_UTTERANCES utterances)."""
    from qswap.integration.bootstrap import Bootstrap, bounds, delta_interval
    ca, cb = payload["cells"][subset][a], payload["cells"][subset][b]
    d = delta_interval(ca["utterance_errors"], cb["utterance_errors"], ca["utterance_words"], Bootstrap())
    return ca["wer"] - cb["wer"], bounds(d)


def _f(v: float, ci, sign: str = "") -> str:
    from qswap.integration.bootstrap import value_text
    return value_text(v, ci, sign)


def _upper_within(ci, target: float) -> bool:
    """The interval's upper end is within ``target``; False without an interval."""
    return ci is not None and ci[1] <= target


def _lower_beyond(ci, target: float) -> bool:
    """The whole interval lies above ``target``; False without an interval."""
    return ci is not None and ci[0] > target


def _rows(payload: dict) -> list[str]:
    keys = payload["cells"][next(iter(SUBSETS))]
    return [m for m in [*METHODS, "qat"] if any(k.startswith(f"{m}/") for k in keys)]


def _columns(payload: dict) -> list[str]:
    keys = payload["cells"][next(iter(SUBSETS))]
    return [c for c in COLUMNS if any(k.endswith(f"/{c}") for k in keys)]


def table(payload: dict, stats: dict, subset: str) -> str:
    cols = _columns(payload)
    lines = ["| method | " + " | ".join(f"{c}: ΔWER [95 % CI]" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in _rows(payload):
        cells = []
        for c in cols:
            s = stats[subset].get(f"{m}/{c}")
            cells.append("-" if s is None else _f(s["delta"], s["delta_ci"], "+") + ("" if s["honest"] else " (not honest)")
                         + (" (= shipped)" if s.get("same_as") else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def size_table(payload: dict, stats: dict) -> str:
    cols = _columns(payload)
    first = next(iter(SUBSETS))
    lines = ["| method | what changes | " + " | ".join(f"{c}: MB, honest" for c in cols) + " | integer form |",
             "|---" * (len(cols) + 3) + "|"]
    for m in _rows(payload):
        what = METHODS[m][0] if m in METHODS else "QAT checkpoint (`--qat`): " + ", ".join(
            Path(payload["cells"][first][k]["checkpoint"]).name for k in payload["cells"][first] if k.startswith("qat/"))
        cells = []
        for c in cols:
            s = stats[first].get(f"{m}/{c}")
            cells.append("-" if s is None else f"{s['mb']:.2f}, {'yes' if s['honest'] else 'no'}")
        forms = {payload["cells"][first][f"{m}/{c}"].get("integer_form") for c in cols if f"{m}/{c}" in payload["cells"][first]}
        form = "; ".join(sorted(f for f in forms if f)) or "not checked"
        lines.append(f"| {m} | {what} | " + " | ".join(cells) + f" | {form} |")
    return "\n".join(lines) + "\n"


def site_table(choice: dict) -> str:
    lines = ["| site | " + " | ".join(OBSERVERS) + " | pick |", "|---" * (len(OBSERVERS) + 2) + "|"]
    for site, row in choice["sqnr_db"].items():
        lines.append(f"| {site} | " + " | ".join(f"{row[o]:.1f}" for o in OBSERVERS) + f" | {choice['pick'][site]} |")
    return "\n".join(lines) + "\n"


def reading(payload: dict, stats: dict) -> str:
    """Per column: the method with the lowest mean ΔWER over both sets, what the intervals say
    against the shipped recipe, and the issue's target where there is one."""
    lines = []
    for c in _columns(payload):
        methods = [m for m in _rows(payload) if m != "qat" and all(f"{m}/{c}" in stats[s] for s in SUBSETS)
                   and all(stats[s][f"{m}/{c}"]["honest"] for s in SUBSETS)]
        if not methods:
            continue
        best = min(methods, key=lambda m: sum(stats[s][f"{m}/{c}"]["delta"] for s in SUBSETS))
        parts = []
        for s in SUBSETS:
            st = stats[s][f"{best}/{c}"]
            text = f"{s}: ΔWER {_f(st['delta'], st['delta_ci'], '+')}"
            if best != "shipped":
                d, ci = pair(payload, s, f"{best}/{c}", f"shipped/{c}")
                verdict = _verdict(ci)
                text += f", against shipped {_f(d, ci, '+')} ({verdict})"
            parts.append(text)
        line = f"- **{c}**: lowest mean ΔWER: `{best}`; " + "; ".join(parts) + ". " + _pick(payload, c, best)
        if c in TARGETS:
            t = TARGETS[c]
            pts = [stats[s][f"{best}/{c}"]["delta"] for s in SUBSETS]
            if all(_upper_within(stats[s][f"{best}/{c}"]["delta_ci"], t) for s in SUBSETS):
                line += f" Target (within +{t}) met on both sets: the intervals' upper ends are below it."
            elif all(p <= t for p in pts):
                line += (f" Target (within +{t}): the point estimates meet it on both sets, but an interval "
                         f"reaches beyond it, so these sets cannot confirm it.")
            elif any(_lower_beyond(stats[s][f"{best}/{c}"]["delta_ci"], t) for s in SUBSETS):
                beyond = [s for s in SUBSETS if _lower_beyond(stats[s][f"{best}/{c}"]["delta_ci"], t)]
                line += f" Target (within +{t}) not met: on {' and '.join(beyond)} the whole interval lies above it."
            else:
                line += (f" Target (within +{t}): a point estimate lies above it, but no interval lies wholly "
                         f"above it: these sets cannot tell.")
            others = _meeting(payload, stats, c, t, exclude=best)
            if others:
                line += (f" Other cells whose point estimates meet it on both sets: {others}.")
        lines.append(line)
    return "\n".join(lines) + "\n"


def observe_table(payload: dict) -> str:
    """Per column and set: WER of the ``observe_float`` cell minus the shipped cell's (the same
    recipe, calibration observing float activation sites against the quantized model), paired;
    only the columns with both cells on every set (a run decoding one set at a time may not have
    them yet); empty where there are none."""
    cols = [c for c in _columns(payload) if all(f"{m}/{c}" in payload["cells"][s]
                                                 for s in SUBSETS for m in ("observe_float", "shipped"))]
    if not cols:
        return ""
    lines = ["| set | " + " | ".join(f"{c}: observe float − quantized [95 % CI]" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for s in SUBSETS:
        cells = []
        for c in cols:
            d, ci = pair(payload, s, f"observe_float/{c}", f"shipped/{c}")
            verdict = _verdict(ci)
            cells.append(f"{_f(d, ci, '+')} ({verdict})")
        lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _meeting(payload: dict, stats: dict, column: str, target: float, exclude: str) -> str:
    """The column's other honest cells (methods and a QAT checkpoint) whose ΔWER point estimates
    are within ``target`` on both sets, each said with whether its intervals confirm it; empty
    where there are none."""
    out = []
    for m in _rows(payload):
        cells = [stats[s].get(f"{m}/{column}") for s in SUBSETS]
        if m == exclude or any(st is None or not st["honest"] for st in cells):
            continue
        if all(st["delta"] <= target for st in cells):
            confirmed = all(_upper_within(st["delta_ci"], target) for st in cells)
            out.append(f"`{m}` ({'confirmed by the intervals' if confirmed else 'an interval reaches beyond it'})")
    return ", ".join(out)


def _verdict(ci) -> str:
    """A paired interval's reading: "better" / "worse" only where it excludes 0; "no verdict" without one."""
    if ci is None:
        return "no verdict"
    return "better" if ci[1] < 0 else ("worse" if ci[0] > 0 else "not distinguishable")


def _verdicts(payload: dict, a: str, b: str) -> list[str]:
    """Per set: "better" / "worse" / "not distinguishable" for cell a against cell b."""
    out = []
    for s in SUBSETS:
        _, ci = pair(payload, s, a, b)
        out.append(_verdict(ci))
    return out


def _pick(payload: dict, column: str, best: str) -> str:
    """Which recipe to pick at this budget, as far as the paired intervals support it; and QAT
    against that PTQ choice when a QAT checkpoint was given."""
    if best == "shipped":
        text = "Pick the shipped recipe: no method reads lower."
    else:
        v = _verdicts(payload, f"{best}/{column}", f"shipped/{column}")
        if all(x == "better" for x in v):
            text = f"Pick `{best}`: better than the shipped recipe on both sets."
        elif "better" in v and "worse" not in v and "no verdict" not in v:
            text = f"Pick `{best}`: better than the shipped recipe on one set, not distinguishable on the other."
        elif "worse" in v:  # the intervals exclude 0 the other way on a set: no pick they support
            named = dict(zip(SUBSETS, v))
            better = [s for s, x in named.items() if x == "better"]
            worse = [s for s, x in named.items() if x == "worse"]
            text = (f"`{best}` reads lowest on average but is worse than the shipped recipe on {', '.join(worse)}"
                    + (f" (better on {', '.join(better)})" if better else "")
                    + ": no method is better on every set; the shipped recipe is the simplest choice.")
        elif "no verdict" in v:
            text = (f"`{best}` reads lowest, with no interval on a set (too few utterances) to tell it from the "
                    f"shipped recipe; the shipped recipe is the simplest choice.")
        else:
            text = ("No method is distinguishable from the shipped recipe on these sets; the shipped recipe "
                    "is the simplest choice.")
    if f"qat/{column}" in payload["cells"][next(iter(SUBSETS))]:
        ptq = best if best != "qat" else "shipped"
        v = _verdicts(payload, f"qat/{column}", f"{ptq}/{column}")
        if all(x == "better" for x in v):
            text += f" QAT beats the best PTQ (`{ptq}`) on both sets, by more than the interval."
        else:
            text += (f" QAT against the best PTQ (`{ptq}`): {', '.join(f'{s} {x}' for s, x in zip(SUBSETS, v))}; "
                     "it does not beat it by more than the interval on both sets.")
    return text


def page(payload: dict) -> str:
    stats = with_intervals(payload)
    st = payload["settings"]
    utts = {s: payload["cells"][s]["float/fp32"]["utterances"] for s in SUBSETS}
    parts = [
        "# Strategy study: methods against bit budgets\n",
        "Written by `.venv/bin/python tools/strategies.py` (do not edit by hand; `--from-json` rewrites "
        "it from `docs/strategies_<subset>.json`). Every cell: the column's shipped recipe changed by the row's "
        f"method, converted, calibrated (shipped {calibration_text(st['calib_batches'], st['calib_subset'])}), "
        f"audited (`qswap.audit`) and decoded with beam {st['beam']} on the shipped model "
        f"(`qswap/assets/s2t_demo`). Sets: {', '.join(f'`{s}` ({n} utterances)' for s, n in utts.items())}. "
        "Intervals: paired percentile bootstrap over utterances, 2,000 resamples, seed 0, 95 % "
        "(`qswap/integration/bootstrap.py`); not corrected for the many comparisons on this page. "
        "`w4a4_edges8` is `recipes/w4a4_edges8.yaml`: w4a4 with the conv subsampler and the output "
        "projection at 8-bit weights and activations.\n",
        "Float: " + "; ".join(f"{s} WER {_f(stats[s]['float/fp32']['wer'], stats[s]['float/fp32']['wer_ci'])}"
                              for s in SUBSETS) + ".\n",
        "## Methods, weight size and honesty\n",
        "Weights MB counts every parameter at its quantizer's width (float32 where a module sharing it reads it unquantized), the online Hadamard matrices at theirs, and each weight grid's float32 scale and an affine grid's zero point (`qswap.integration.cost.parameter_bytes`: 4-bit weights in groups of 16 store 6 bits a weight). "
        "\"honest\": the audit found no float op outside the recipe's declared exceptions. \"integer form\": "
        "whether `qswap.integerize` builds the quantized model's integer execution (`docs/integer.md`), or "
        "why not.\n",
        size_table(payload, stats),
    ]
    parts.append("\"-\": not decoded in this run (`--resume` decodes the missing cells); \"(= shipped)\": the "
                 "method's recipe is the column's own (w4a4's activation observer is already mse). The `qat` row "
                 "appears with `--qat RECIPE=CHECKPOINT`.\n")
    for s, title in SUBSETS.items():
        parts += [f"## {title}: ΔWER against float\n", table(payload, stats, s)]
    observed = observe_table(payload)
    if observed:
        parts += ["## What calibration observes\n",
                  "WER of each column's recipe calibrated observing float activation sites (`observe: float`, the "
                  "`observe_float` row) minus the same recipe calibrated observing the quantized model (`observe: "
                  "quantized`, the default: the `shipped` row), on the same utterances; \"better\"/\"worse\" only "
                  "where the paired interval excludes 0.\n", observed]
    for column, choice in payload.get("per_site", {}).items():
        parts += [f"## Per-site calibration choice ({column})\n",
                  "SQNR (dB) of each activation site's quantizer, summed over the modules with that site, on the "
                  "first calibration batch after calibrating every site with the observer "
                  "(`qswap/integration/site_error.py`); the `per_site` row uses the pick of each site.\n",
                  site_table(choice)]
    parts += ["## Reading\n",
              "Generated from the intervals above; \"better\"/\"worse\" only where the paired interval against "
              "the shipped recipe of the same column excludes 0.\n", reading(payload, stats)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", action="store_true", help="rewrite the page from the JSON only")
    p.add_argument("--resume", action="store_true", help="keep the cells already in the JSON")
    p.add_argument("--redo", action="store_true",
                   help="with --resume: decode again the cells of --methods x --columns in --subsets (e.g. after a "
                        "change to how those methods compute), keeping every other cell")
    p.add_argument("--refresh-integer-form", action="store_true",
                   help="recompute only the integer-form column of the cells without one (no decoding), then "
                        "rewrite the page")
    p.add_argument("--refresh-size", action="store_true",
                   help="recompute only the weights' sizes of every cell (no calibration, no decoding), then "
                        "rewrite the page")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--columns", nargs="+", default=COLUMNS, choices=COLUMNS)
    p.add_argument("--qat", action="append", default=[], metavar="RECIPE=CKPT",
                   help="a QAT checkpoint of a column's recipe (repeatable): the qat row")
    p.add_argument("--batches", type=int, default=None, help="decode only the first N batches of 32 (development)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS),
                   help="decode these sets only (two processes can share the work; the page reads both files)")
    p.add_argument("--json", default=str(REPO / "docs" / "strategies"), help="JSON prefix: PREFIX_<subset>.json")
    p.add_argument("--markdown", default=str(REPO / "docs" / "strategies.md"))
    args = p.parse_args(argv)
    qat = {}
    for item in args.qat:
        column, _, ckpt = item.partition("=")
        if column not in COLUMNS or not ckpt:
            p.error(f"--qat takes RECIPE=CHECKPOINT with RECIPE one of {', '.join(COLUMNS)}; got {item!r}")
        qat[column] = ckpt
    refresh = args.refresh_integer_form or args.refresh_size
    if args.redo and not args.resume:
        p.error("--redo drops cells from the JSON that --resume keeps; give both")
    payload = load(args.json) if (args.resume or args.from_json or refresh) else {"cells": {}}
    if args.redo:
        for subset in args.subsets:
            cells = payload.get("cells", {}).get(subset, {})
            for key in [f"{m}/{c}" for m in args.methods for c in args.columns]:
                cells.pop(key, None)
    def work() -> int:
        if args.refresh_integer_form:
            print("\n".join(refresh_integer_forms(payload, args.json)), flush=True)
        if args.refresh_size:
            print("\n".join(refresh_sizes(payload, args.json)), flush=True)
        if not refresh and not args.from_json:
            run(payload, args.json, args.subsets, args.methods, args.columns, qat, args.batches, args.beam)
        return 0

    if exit_status(work):  # a typed input error: one line, no traceback
        return 2
    if not args.from_json and not refresh:
        payload = load(args.json)  # both sets, whichever process decoded them
    if set(payload["cells"]) != set(SUBSETS):
        print(f"not writing {args.markdown}: {', '.join(set(SUBSETS) - set(payload['cells']))} not decoded yet")
        return 0
    from qswap.io.atomic import atomic_write_text
    atomic_write_text(Path(args.markdown), page(payload))
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
