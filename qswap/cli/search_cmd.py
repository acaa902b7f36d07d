"""Search a mixed-precision recipe for a size or WER budget, write it, and measure it."""
from __future__ import annotations

import argparse

from qswap.cli.args import COUNT, MAX_SENTENCES, POSITIVE, at_least, finite
from qswap.quant.spec import MAX_BITS, MIN_BITS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint")
    p.add_argument("--data", required=True, help="fairseq data directory")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-mb", type=finite, help="weight memory budget in MB")
    budget.add_argument("--max-delta-wer", type=finite, help="WER budget (points above float) on --subset")
    p.add_argument("--high", default="w8a8_per_channel", help="recipe units start from (default: w8a8_per_channel)")
    p.add_argument("--low-bits", type=at_least(MIN_BITS, MAX_BITS, why="the weight widths qswap quantizes to"),
                   default=4, help="weight bits of the units moved down (default: 4)")
    p.add_argument("--subset", default="dev", help="subset the search measures on (default: dev)")
    p.add_argument("--batches", type=POSITIVE, default=2, help="batches of --subset for SQNR probes")
    p.add_argument("--eval-subset", default="test", help="subset the final row is measured on")
    p.add_argument("--calib-subset", default="train", help="calibration subset for the final row")
    p.add_argument("--calib-batches", type=COUNT, default=8, help="calibration batches for the final row")
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size")
    p.add_argument("--max-sentences", type=POSITIVE, default=MAX_SENTENCES, help="utterances per batch")
    p.add_argument("--name", default="searched", help="name of the written recipe")
    p.add_argument("-o", "--output", required=True, help="recipe YAML to write (atomically)")
    p.add_argument("--json", dest="json_out", help="write the measured row and candidate ranking here")
    p.add_argument("--markdown", help="write the measured rows (with confidence intervals) as Markdown here")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from qswap.cli.compare_cmd import render_comparison
    from qswap.cli.render import console, json_text
    from qswap.cli.sensitivity_cmd import wer_evaluator
    from qswap.integration import data as fdata
    from qswap.integration.bootstrap import Bootstrap
    from qswap.integration.compare import (Comparison, add_intervals, batches_used, calibration_settings,
                                           evaluate_recipe)
    from qswap.io.atomic import atomic_write_text
    from qswap.recipe import load_recipe
    from qswap.search import search

    _check_name(args.name)
    _check_low_bits(args.high, args.low_bits)
    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if not args.calib_batches:
        _refuse_uncalibrated(model, args.high)
    for subset in (args.eval_subset, *([args.calib_subset] if args.calib_batches else [])):
        fdata.load_subset(task, subset)  # read after the search: checked before it
    probes = batches_used(task, args.subset, args.batches, "--batches", "the ranking's probing", args.max_sentences)
    batches = list(fdata.net_inputs(task, args.subset, args.batches, max_sentences=args.max_sentences))
    evaluate = wer_evaluator(task, args.subset, args.beam, args.max_sentences) if args.max_delta_wer is not None else None
    result = search(model, batches, high=args.high, low_bits=args.low_bits, target_mb=args.target_mb,
                    max_delta_wer=args.max_delta_wer, evaluate=evaluate, name=args.name)
    text = yaml.safe_dump(result.recipe, sort_keys=False)
    load_recipe(result.recipe)  # the written file is a valid recipe
    settings = search_settings(args, probes, calibration_settings(task, args.calib_subset, args.calib_batches,
                                                          args.max_sentences))
    row_float, _ = evaluate_recipe(model, task, "fp32", subset=args.eval_subset, calib_subset=args.calib_subset,
                                   calib_batches=args.calib_batches, beam=args.beam, max_sentences=args.max_sentences)
    row, _ = evaluate_recipe(model, task, result.recipe, subset=args.eval_subset, calib_subset=args.calib_subset,
                             calib_batches=args.calib_batches, beam=args.beam, max_sentences=args.max_sentences)
    bootstrap = Bootstrap()
    add_intervals([row_float, row], bootstrap)
    table = Comparison(args.checkpoint, args.eval_subset, [row_float, row], {**settings, "bootstrap": bootstrap.to_dict()})
    # written once the recipe is measured: a failure on the way leaves the caller's -o as it was
    atomic_write_text(args.output, f"# written by: qswap search ({result.low_count} units low-bit)\n" + text)
    # the files before the terminal report: a reader that closes stdout (| head) loses none of them
    if args.markdown:
        atomic_write_text(args.markdown, table.markdown())
    if args.json_out:
        payload = {"settings": settings, "row": dataclasses.asdict(row), "float": dataclasses.asdict(row_float),
                   "bootstrap": bootstrap.to_dict(),
                   "low_units": result.low_units, "low_count": result.low_count, "evaluations": result.evaluations,
                   "candidates": [dataclasses.asdict(c) for c in result.candidates]}
        atomic_write_text(args.json_out, json_text(payload))  # an infinite loss_db as null
    console().print(render_comparison(table))
    console().print(f"wrote {args.output}: {result.low_count} units at {args.low_bits}-bit weights, "
                    f"{result.weight_mb:.3f} MB")
    return 0


def search_settings(args: argparse.Namespace, probes: int, calibration: dict) -> dict:
    """What the search and its measured rows ran with, for the JSON: the budget, the probes'
    subset and batches (asked, and ``probes`` used), the final rows' subset, beam and calibration
    (``calibration_settings``: the batches used)."""
    budget = {"target_mb": args.target_mb} if args.target_mb is not None else {"max_delta_wer": args.max_delta_wer}
    return {**budget, "high": args.high, "low_bits": args.low_bits, "subset": args.subset, "batches": args.batches,
            "batches_used": probes, "eval_subset": args.eval_subset, "beam": args.beam, **calibration}


def _check_name(name: str) -> None:
    """A RecipeError for a ``--name`` the written recipe cannot carry: blank, or a shipped recipe's
    (fp32 among them), whose row the search's own table (fp32 beside it) or ``qswap compare``
    against that recipe could not tell apart, checked before the search runs."""
    from qswap.errors import RecipeError
    from qswap.recipe.loader import shipped_recipe_names

    if not name.strip():
        raise RecipeError("--name is blank: the written recipe's name labels its rows; pass a name (default: searched)")
    if name in shipped_recipe_names():
        raise RecipeError(f"--name {name}: a shipped recipe's name, which the searched recipe's rows would share "
                          f"(the search's own table has an fp32 row; qswap compare refuses two recipes of one name); "
                          f"pass another name (default: searched)")


def _check_low_bits(high, low_bits: int) -> None:
    """``--low-bits`` below the widest weight ``high`` quantizes (its defaults' or a rule's), before
    the model is loaded: units move down to fewer bits, and at ``low_bits`` or more none could (the
    search had ranked an empty list after minutes of probing)."""
    from qswap.errors import SpecError
    from qswap.recipe import load_recipe

    recipe = load_recipe(high)
    widths = [config.weight.bits for config in (recipe.defaults, *(rule.config for rule in recipe.rules))
              if config is not None and config.weight is not None]
    if not widths:
        raise SpecError(f"--high {recipe.name} quantizes no weights, so no unit can move to --low-bits "
                        f"{low_bits}; start from a recipe with quantized weights (e.g. w8a8_per_channel)")
    widest = max(widths)
    if low_bits >= widest:
        lower = (f"pass --low-bits below {widest} (e.g. {max(MIN_BITS, min(4, widest - 1))})" if widest > MIN_BITS
                 else f"its weights are at {MIN_BITS} bits, the fewest qswap quantizes to: start from a wider recipe")
        raise SpecError(f"--low-bits {low_bits}: --high {recipe.name} quantizes weights at {widest} bits at most, "
                        f"and units move down to fewer bits; {lower}")


def _refuse_uncalibrated(model, high) -> None:
    """``--calib-batches 0`` before any work: the final row converts the searched recipe, whose
    activation quantizers are ``high``'s (moved units change only their weights) and whose
    transforms are ``high``'s; either needs calibration batches (the search had run to its end,
    then calibration found zero batches)."""
    import qswap
    from qswap.calibrate import activation_quantizers
    from qswap.errors import CalibrationError
    from qswap.recipe import load_recipe
    from qswap.transforms import STRUCTURE_ONLY, needs_data

    recipe = load_recipe(high)
    if needs_data(recipe.transforms):
        need = "transforms that read activation statistics"
    elif activation_quantizers(qswap.convert(model, recipe, data=STRUCTURE_ONLY)):
        need = "activation quantizers"
    else:
        return
    raise CalibrationError(f"--calib-batches 0: the searched recipe keeps --high {recipe.name}'s {need}, which "
                           f"need calibration batches for the final row; pass --calib-batches N (at least 1), or a weight-only "
                           f"--high recipe (e.g. w8_weight_only)")
