"""Convert a fairseq checkpoint with a recipe, calibrate it, and write a quantized checkpoint.

Given a quantized checkpoint (``qswap convert`` or a QAT run wrote it), ``convert`` moves it onto
the recipe's grids (``qswap.regrid``): the weights and the grids of unchanged sites are kept,
the sites whose spec changed are calibrated afresh (``--calib-batches``), the others untouched.

A recipe with activation quantizers needs ``--calib-batches N`` (and ``--data DIR``): an
uncalibrated activation quantizer re-derives its range from every batch at run time, which is
not what an integer kernel does. ``--no-calibrate`` writes such a dynamic-range model on purpose.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qswap.cli.args import COUNT, MAX_SENTENCES, POSITIVE, only_with
from qswap.nn.simulate import SIMULATIONS
from qswap.cli.render import console, convert_summary, convert_table, progress_bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint (or a quantized one, to move onto the recipe's grids)")
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    p.add_argument("-o", "--output", required=True, help="quantized checkpoint to write (atomically)")
    p.add_argument("--data", help="fairseq data directory (needed for calibration)")
    p.add_argument("--calib-subset", help="with --calib-batches: calibration subset (default: train)")
    p.add_argument("--calib-batches", type=COUNT, default=0,
                   help="calibration batches; required when the recipe quantizes activations")
    p.add_argument("--no-calibrate", action="store_true",
                   help="write activation quantizers uncalibrated (dynamic ranges, re-derived per batch)")
    p.add_argument("--max-sentences", type=POSITIVE,
                   help=f"with --calib-batches: utterances per calibration batch (default: {MAX_SENTENCES})")
    p.add_argument("--simulate", choices=SIMULATIONS,
                   help="the recipe's 'simulate' set to this (qswap.nn.simulate), stored with it in the checkpoint "
                        "and in force while it calibrates: float (what onnxruntime's QDQ graphs compute: the "
                        "models docs/deploy.md compares them with) or integer (the integer model's arithmetic, "
                        "the shipped recipes' default)")
    p.add_argument("--strict", action="store_true", help="fail on modules left float without a skip rule")
    p.add_argument("--show-all", action="store_true", help="list passthrough modules too")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import warnings

    import qswap
    from qswap.calibrate import activation_quantizers, observed_note, recipe_observe
    from qswap.errors import ConvertError, DataError
    from qswap.integration import data as fdata
    from qswap.io.checkpoint import save_qswap_checkpoint

    if args.simulate:  # the recipe as the checkpoint stores it, its simulation set
        from qswap.recipe import with_simulate
        args.recipe = with_simulate(args.recipe, args.simulate)
    if args.calib_batches and args.no_calibrate:
        raise ConvertError("give either --calib-batches N or --no-calibrate, not both")
    only_with(args, {"--calib-subset": "train", "--max-sentences": MAX_SENTENCES}, bool(args.calib_batches),
              lambda named: f"{named} shape{'s' if ' and ' not in named else ''} the calibration batches, and "
                            f"there are none (no --calib-batches N): add --calib-batches N --data DIR, or drop "
                            f"{named}")
    if args.calib_batches and not args.data:
        raise DataError("--calib-batches needs --data DIR to read calibration batches from")
    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    if activation_quantizers(model) or getattr(model, "qswap_recipe", None) is not None:
        if args.simulate:  # its grids were calibrated already, under its own recipe's simulation
            raise ConvertError(f"--simulate sets the arithmetic a float checkpoint is converted and calibrated "
                               f"under; {args.checkpoint} is quantized (a move onto a recipe keeps its calibrated "
                               f"grids): convert the float checkpoint with --simulate {args.simulate}, or decode "
                               f"this one with 'qswap eval CHECKPOINT --simulate {args.simulate}'")
        return _regrid(args, model, task)
    from qswap.transforms import needs_data

    recipe = qswap.load_recipe(args.recipe)
    if not args.calib_batches and needs_data(recipe.transforms):
        raise ConvertError(f"recipe {recipe.name} folds {', '.join(s.name for s in recipe.transforms)}, which needs "
                           f"activation statistics: pass --calib-batches N --data DIR (--no-calibrate cannot "
                           f"convert it)")
    data = fdata.transform_data(recipe, task, args.calib_subset, args.calib_batches,
                                max_sentences=args.max_sentences) if args.calib_batches else None
    with warnings.catch_warnings():  # its QswapWarnings are in the report, which convert_summary prints
        warnings.simplefilter("ignore", qswap.QswapWarning)
        qmodel = qswap.convert(model, recipe, strict=args.strict or None, data=data)
    n_act = len(activation_quantizers(qmodel))
    if n_act and not args.calib_batches and not args.no_calibrate:
        raise ConvertError(f"recipe {qmodel.qswap_recipe.name} has {n_act} activation quantizers and "
                           f"--calib-batches is 0; pass --calib-batches N --data DIR (and "
                           f"--calib-subset S), or --no-calibrate to write a dynamic-range model")
    out = console()
    if args.calib_batches and n_act:
        with progress_bar("calibrating", args.calib_batches) as advance:
            used = qswap.calibrate(qmodel, fdata.net_inputs(task, args.calib_subset, args.calib_batches,
                                                            max_sentences=args.max_sentences),
                                   progress=lambda n: advance(1))
        out.print(f"calibrated on {used} batches of {args.calib_subset}{observed_note(recipe_observe(qmodel))}")
    elif n_act:
        out.print(f"note: --no-calibrate: {n_act} activation quantizers left uncalibrated "
                  f"(their ranges are re-derived from every batch at run time)")
    elif args.calib_batches and not needs_data(recipe.transforms):  # a transform's statistics used them
        out.print(f"note: recipe {recipe.name} quantizes no activations: nothing calibrated (--calib-batches "
                  f"{args.calib_batches} is not used)")
    save_qswap_checkpoint(args.output, qmodel, args.checkpoint, trust_checkpoint=args.trust_checkpoint,
                          data=args.data, dictionary=task.target_dictionary)
    out.print(convert_table(qmodel.qswap_report, show_all=args.show_all))
    out.print(convert_summary(qmodel.qswap_report))
    out.print(f"wrote {args.output}")
    return 0


def _regrid(args: argparse.Namespace, qmodel, task) -> int:
    """``qswap convert QCKPT --recipe R``: the quantized checkpoint moved onto R's grids."""
    import qswap
    from qswap.errors import ConvertError
    from qswap.integration import data as fdata
    from qswap.io.checkpoint import float_structure, save_qswap_checkpoint
    from qswap.regrid import regrid

    overrides = {"data": str(Path(args.data).resolve())} if args.data else None
    if args.show_all:  # it had been accepted and printed nothing more
        raise ConvertError("--show-all lists the modules a float checkpoint's conversion leaves as they are; a "
                           "quantized checkpoint moved onto another recipe keeps its modules: drop --show-all")
    moved = regrid(qmodel, args.recipe, float_structure(args.checkpoint, trust_checkpoint=args.trust_checkpoint,
                                                          arg_overrides=overrides), strict=args.strict or None)
    fresh = moved.fresh_activations()
    out = console()
    out.print(f"moved {args.checkpoint} (recipe {qmodel.qswap_recipe.name}) onto recipe {moved.model.qswap_recipe.name}: "
              f"{len(moved.kept)} quantizers kept, {len(moved.fresh)} fresh"
              + (f", {len(moved.dropped)} dropped" if moved.dropped else ""))
    for name in moved.fresh[:10]:
        out.print(f"  fresh: {name}")
    if len(moved.fresh) > 10:
        out.print(f"  ... and {len(moved.fresh) - 10} more")
    if fresh and not args.calib_batches and not args.no_calibrate:
        raise ConvertError(f"{len(fresh)} activation grid(s) of recipe {moved.model.qswap_recipe.name} are fresh in "
                           f"{args.checkpoint} (a changed spec, or never calibrated); calibrate them: --calib-batches N "
                           f"--data DIR (and --calib-subset S), or --no-calibrate to write them with dynamic ranges")
    if fresh and args.no_calibrate:
        out.print(f"note: --no-calibrate: {len(fresh)} fresh activation quantizers left uncalibrated "
                  f"(their ranges are re-derived from every batch at run time)")
    elif args.calib_batches and not fresh:
        out.print("note: no activation grid is fresh; nothing calibrated (--calib-batches is not used)")
    elif fresh:
        with progress_bar("calibrating", args.calib_batches) as advance:
            used = qswap.calibrate(moved.model, fdata.net_inputs(task, args.calib_subset, args.calib_batches,
                                                                 max_sentences=args.max_sentences),
                                   quantizers=fresh, progress=lambda n: advance(1))
        out.print(f"calibrated the {len(fresh)} fresh activation grid(s) on {used} batches of {args.calib_subset}")
    save_qswap_checkpoint(args.output, moved.model, args.checkpoint, trust_checkpoint=args.trust_checkpoint,
                          data=args.data, dictionary=task.target_dictionary)
    out.print(convert_summary(moved.model.qswap_report))
    out.print(f"wrote {args.output}")
    return 0
