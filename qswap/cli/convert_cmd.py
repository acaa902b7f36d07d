"""Convert a fairseq checkpoint with a recipe, calibrate it, and write a quantized checkpoint."""
from __future__ import annotations

import argparse

from qswap.cli.render import console, convert_summary, convert_table, progress_bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint")
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    p.add_argument("-o", "--output", required=True, help="quantized checkpoint to write (atomically)")
    p.add_argument("--data", help="fairseq data directory (needed for calibration)")
    p.add_argument("--calib-subset", default="train", help="calibration subset (default: train)")
    p.add_argument("--calib-batches", type=int, default=0, help="calibration batches (0: no calibration)")
    p.add_argument("--max-sentences", type=int, default=32, help="utterances per calibration batch")
    p.add_argument("--strict", action="store_true", help="fail on modules left float without a skip rule")
    p.add_argument("--show-all", action="store_true", help="list passthrough modules too")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import qswap
    from qswap.calibrate import activation_quantizers
    from qswap.errors import DataError
    from qswap.integration import data as fdata
    from qswap.io.checkpoint import save_qswap_checkpoint

    if args.calib_batches and not args.data:
        raise DataError("--calib-batches needs --data DIR to read calibration batches from")
    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    qmodel = qswap.convert(model, args.recipe, strict=args.strict or None)
    out = console()
    if args.calib_batches and activation_quantizers(qmodel):
        with progress_bar("calibrating", args.calib_batches) as advance:
            used = qswap.calibrate(qmodel, fdata.net_inputs(task, args.calib_subset, args.calib_batches,
                                                            max_sentences=args.max_sentences),
                                   progress=lambda n: advance(1))
        out.print(f"calibrated on {used} batches of {args.calib_subset}")
    save_qswap_checkpoint(args.output, qmodel, args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    out.print(convert_table(qmodel.qswap_report, show_all=args.show_all))
    out.print(convert_summary(qmodel.qswap_report))
    out.print(f"wrote {args.output}")
    return 0
