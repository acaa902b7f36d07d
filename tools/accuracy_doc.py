"""Write docs/accuracy.md: the demo's recipes (``qswap.demo.RECIPES``) and the searched one on the
large evaluation sets, with paired bootstrap confidence intervals.

For each of ``test_large`` (in-voice) and ``test_heldout_large`` (held-out voices) this runs
``qswap compare`` (the library function) on the shipped model exactly as the demo does (calibration
on the shipped ``train_calib`` subset: its 32 utterances, one batch; beam 5), writes the full result to
``docs/accuracy_<subset>.json`` (rows with per-utterance word errors) and then the Markdown page.

    .venv/bin/python tools/accuracy_doc.py               # decode and write (about 70 min on 2 shared cores; each JSON records its seconds)
    .venv/bin/python tools/accuracy_doc.py --from-json   # rewrite the page from the JSON files
    .venv/bin/python tools/accuracy_doc.py --refresh-cost   # only the MMAC/s and GBOP/s of each row (no decoding)
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qswap.demo import ASSET, EVAL_LARGE, RECIPES, SEARCHED, calibration_text, data_dir  # noqa: E402

SUBSETS = {"test_large": "In-voice", "test_heldout_large": "Held-out voices"}
DOCS = REPO / "docs"


def set_size(subset: str, rows: list[dict]) -> str:
    """'N utterances, W words, V voices' of a large set (words: reference words as scored)."""
    with open(EVAL_LARGE / f"{subset}.tsv", newline="", encoding="utf-8") as f:
        voices = {r["speaker"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    words = sum(rows[0]["utterance_words"])
    return f"{rows[0]['utterances']:,} utterances, {words:,} words, {len(voices)} voices"


def run(subset: str, beam: int) -> dict:
    from qswap.cli.quiet import held_back
    from qswap.integration.compare import compare

    recipes = RECIPES + [str(SEARCHED)]
    start = time.perf_counter()
    with held_back(verbose=False):
        table = compare(str(ASSET / "checkpoint.pt"), str(data_dir(subset)), recipes, subset=subset,
                        calib_subset="train_calib", calib_batches=4, beam=beam,
                        progress=lambda r, stage, n, total: None)
    payload = table.to_dict()
    payload["checkpoint"] = "qswap/assets/s2t_demo/checkpoint.pt"
    payload["seconds"] = round(time.perf_counter() - start, 1)
    return payload


def refresh_cost(payload: dict, subset: str) -> list[str]:
    """``payload``'s rows with their MMAC/s and GBOP/s counted again (``compare.row_cost``: one
    forward of each of the subset's first utterances alone, each recipe converted and calibrated as ``run`` does: ``compare.prepare_recipe``),
    nothing decoded: what a change of the counting (``qswap.integration.cost``) changes. Returns
    'recipe: old -> new' for each changed row."""
    from qswap.convert import copy_model
    from qswap.integration import data as fdata
    from qswap.integration.compare import calibration_settings, prepare_recipe, row_cost

    model, task = fdata.load_model_and_task(str(ASSET / "checkpoint.pt"), str(data_dir(subset)))
    settings, changed = payload["settings"], []
    # the calibration as compare now records it: the batches used, the number asked, the batch size
    settings.update(calibration_settings(task, settings["calib_subset"], settings["calib_batches"]))
    by_name = {row["recipe"]: row for row in payload["rows"]}
    for recipe in ["fp32"] + [r for r in RECIPES if r != "fp32"] + [str(SEARCHED)]:
        qmodel = prepare_recipe(copy_model(model), task, recipe, calib_subset=settings["calib_subset"],
                                calib_batches=settings["calib_batches"])
        row = by_name[qmodel.qswap_recipe.name]
        mmacs, gbops = row_cost(qmodel, task, subset)
        if (mmacs, gbops) != (row["mmacs_per_s"], row["gbops_per_s"]):
            changed.append(f"{row['recipe']}: {row['mmacs_per_s']:.1f} -> {mmacs:.1f} MMAC/s, "
                           f"{row['gbops_per_s']:.1f} -> {gbops:.1f} GBOP/s")
        row["mmacs_per_s"], row["gbops_per_s"] = mmacs, gbops
    return changed


from qswap.integration.compare import significance_text  # noqa: E402
from qswap.integration.bootstrap import interval_text  # noqa: E402
from qswap.integration.bootstrap import value_text as _cell  # noqa: E402


def _delta(r: dict) -> str:
    """A row's ΔWER cell: the reference row (fp32, ``significant`` None) is the difference's zero,
    with no interval to give; another row's difference with its interval."""
    return f"{r['delta_wer']:+.2f}" if r["significant"] is None else _cell(r["delta_wer"], r["delta_wer_ci"], "+")


def table(payload: dict) -> str:
    lines = ["| recipe | WER % [95 % CI] | ΔWER [95 % CI] | significant | honest | weights MB |",
             "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        sig = significance_text(r["significant"])
        lines.append(f"| {Path(r['recipe']).stem} | {_cell(r['wer'], r['wer_ci'])} | "
                     f"{_delta(r)} | {sig} | "
                     f"{'yes' if r['honest'] else 'no'} | {r['weight_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def summary_table(results: dict[str, dict]) -> str:
    """One row per recipe: ΔWER with its interval on each large set; the README copies it."""
    head = "| recipe | " + " | ".join(f"{SUBSETS[s]}: ΔWER [95 % CI] | significant" for s in results)
    lines = [head + " | honest | weights MB |", "|---" * (2 * len(results) + 3) + "|"]
    by_subset = [{Path(r["recipe"]).stem: r for r in p["rows"]} for p in results.values()]
    for name in by_subset[0]:
        cells = []
        for rows in by_subset:
            r = rows[name]
            sig = significance_text(r["significant"])
            cells += [_delta(r), sig]
        r = by_subset[0][name]
        lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if r['honest'] else 'no'} | {r['weight_mb']:.2f} |")
    return "\n".join(lines) + "\n"


PAIRS = [("searched", "w4a8_edges8"), ("w4a8_edges8", "w4a8"), ("w4a8", "w8a8"), ("w8a8_per_channel", "w8a8")]


def recipe_pairs(results: dict[str, dict]) -> str:
    """Recipes against each other (not against float), paired on the same utterances."""
    from qswap.integration.bootstrap import Bootstrap, delta_interval, significant

    lines = ["| A - B | " + " | ".join(f"{SUBSETS[s]}: WER A, B | A - B [95 % CI] | significant" for s in results) + " |",
             "|---" * (3 * len(results) + 1) + "|"]
    for a, b in PAIRS:
        cells = []
        for payload in results.values():
            rows = {Path(r["recipe"]).stem: r for r in payload["rows"]}
            ra, rb = rows[a], rows[b]
            boot = payload["settings"]["bootstrap"]
            ci = delta_interval(ra["utterance_errors"], rb["utterance_errors"], ra["utterance_words"],
                                Bootstrap(boot["resamples"], boot["confidence"], boot["seed"]))
            cells += [f"{ra['wer']:.2f}, {rb['wer']:.2f}", _cell(ra["wer"] - rb["wer"], ci, "+"),
                      significance_text(significant(ci))]
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _small_set_note() -> str:
    """The float WER of the demo's 100-utterance set (docs/demo.json, written by `python -m qswap.demo --markdown docs/demo.md`, as `make docs` runs it)."""
    demo = json.loads((DOCS / "demo.json").read_text())["rows"][0]
    return (f"the demo's in-voice 100 utterances give fp32 {demo['wer']:.2f} %{interval_text(demo.get('wer_ci'))} WER (`make demo`), "
            "a harder sample than the 1,000 below; compare recipes within one set, never across sets.")


def _comparisons(result: dict) -> str:
    """How many ΔWER intervals a set's summary gives (every row but the reference, whose
    ``significant`` is None: ``_delta``), in words."""
    n = sum(1 for row in result["rows"] if row["significant"] is not None)
    words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
    return words[n] if n < len(words) else str(n)


def page(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    boot = first["settings"]["bootstrap"]
    parts = [
        "# Accuracy on the large evaluation sets\n",
        "Written by `.venv/bin/python tools/accuracy_doc.py` (do not edit by hand). The demo's recipes "
        "(`qswap.demo.RECIPES`: the shipped recipes `make demo` evaluates) and "
        "the searched one (`qswap/assets/s2t_demo/searched.yaml`) on the shipped model, converted, "
        f"calibrated (shipped {calibration_text(first['settings']['calib_batches'])}) "
        f"and decoded with beam {first['settings']['beam']}, as `make demo` does on the 100-utterance set.\n",
        f"**Intervals**: {boot['method']}, {boot['resamples']:,} resamples, seed {boot['seed']}, "
        f"{100 * boot['confidence']:.0f} % percentile intervals (`qswap/integration/bootstrap.py`). "
        "ΔWER is the recipe's WER minus fp32's on the same resampled utterances. **significant**: the "
        "ΔWER interval excludes 0; \"no\" means this set cannot tell the recipe from float.\n",
        "**Sets** (`qswap/assets/s2t_demo/eval_large`, built by `tools/ship_eval_large.py` from "
        "`tools/make_corpus.py --eval-large 1000 600 --seed 1`): sentences never in the model's training, "
        "dev or shipped test sets. A voice is an engine+voice configuration (the manifests' `speaker`). Held-out voices: `flite:rms`, `espeak-ng:en-029+Annie` and "
        "`espeak-ng:en-us+Annie`; training never used flite's rms voice, espeak-ng's en-029 accent or its "
        "Annie variant. Features are stored as int8 codes of each channel's standard deviation "
        "(`qswap/integration/compact.py`); stored that way, the 100-utterance in-voice set gives the float "
        "model at most one word error more or fewer than its float32 features do "
        "(`tests/integration/test_compact.py` decodes both and asserts it).\n",
        f"**Reading the intervals**: each is one comparison at 95 %, not corrected for the "
        f"{_comparisons(first)} comparisons with fp32 per set; a recipe whose interval only just excludes 0 is weaker evidence than one "
        "far from it. The large sets are not harder or easier copies of the 100-utterance ones: "
        f"{_small_set_note()}\n",
    ]
    parts.append("## Summary: ΔWER against fp32\n")
    parts.append(summary_table(results))
    if len(results) == len(SUBSETS):
        parts.append("## Recipes against each other\n")
        parts.append("Paired intervals of WER(A) - WER(B), same bootstrap: the searched recipe against the "
                     "uniform one of the same weight budget, and neighbouring uniform recipes.\n")
        parts.append(recipe_pairs(results))
    for subset, payload in results.items():
        parts.append(f"## {SUBSETS[subset]}: `{subset}` ({set_size(subset, payload['rows'])})\n")
        parts.append(table(payload))
        parts.append(f"\nFull rows, per-utterance word errors included: `docs/accuracy_{subset}.json` "
                     f"(decoded in {payload['seconds'] / 60:.1f} min on this repository's 2-core machine, shared with other jobs).\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", action="store_true", help="rewrite the page from docs/accuracy_*.json")
    p.add_argument("--refresh-cost", action="store_true", help="count each row's MMAC/s and GBOP/s again in "
                   "docs/accuracy_*.json (one forward per recipe, no decoding), then rewrite the page")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS))
    args = p.parse_args(argv)
    from qswap.io.atomic import atomic_write_text

    results = {}
    for subset in SUBSETS:
        path = DOCS / f"accuracy_{subset}.json"
        if args.refresh_cost and subset in args.subsets and path.is_file():
            from qswap.cli.quiet import held_back

            payload = json.loads(path.read_text())
            with held_back(verbose=False):
                changed = refresh_cost(payload, subset)
            for line in changed or ["no row changed"]:
                print(f"{subset}: {line}", flush=True)
            atomic_write_text(path, json.dumps(payload, separators=(",", ":")) + "\n")
        elif not args.from_json and not args.refresh_cost and subset in args.subsets:
            payload = run(subset, args.beam)
            atomic_write_text(path, json.dumps(payload, separators=(",", ":")) + "\n")
            print(f"{subset}: {len(payload['rows'])} recipes in {payload['seconds']:.0f} s", flush=True)
        if path.is_file():
            results[subset] = json.loads(path.read_text())
    atomic_write_text(DOCS / "accuracy.md", page(results))
    print(f"wrote {DOCS / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
