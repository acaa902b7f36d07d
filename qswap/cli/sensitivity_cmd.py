"""Rank quantizer sites by how much each hurts the model (SQNR, optionally delta WER)."""
from __future__ import annotations

import argparse

from qswap.cli.args import MAX_SENTENCES, POSITIVE, only_with
from qswap.cli.render import console, json_text, progress_display


TOP_K, BEAM = 10, 5  # --metric wer's, where the options are not given


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint")
    p.add_argument("--data", required=True, help="fairseq data directory")
    p.add_argument("--subset", default="dev", help="subset to measure on (default: dev)")
    p.add_argument("--calib-subset", default="train", help="calibration subset (default: train)")
    p.add_argument("--calib-batches", type=POSITIVE, default=4, help="calibration batches (default: 4)")
    p.add_argument("--batches", type=POSITIVE, default=1, help="batches of --subset the SQNR is pooled over")
    p.add_argument("--recipe", default="w4a8", help="recipe whose sites are probed (default: w4a8)")
    p.add_argument("--metric", choices=("sqnr", "wer"), default="sqnr",
                   help="sqnr (cheap) or wer (also decodes --subset for the --top-k sites)")
    p.add_argument("--top-k", type=POSITIVE,
                   help=f"with --metric wer: sites measured by delta WER (default: {TOP_K})")
    p.add_argument("--beam", type=POSITIVE, help=f"with --metric wer: beam size (default: {BEAM})")
    p.add_argument("--max-sentences", type=POSITIVE, default=MAX_SENTENCES, help="utterances per batch")
    p.add_argument("--show", type=POSITIVE, default=25, help="rows of the ranked table to print")
    p.add_argument("--json", dest="json_out",
                   help="write every site's numbers here (an SQNR of -inf dB, a site that makes the "
                        "output NaN/inf, is written as null)")
    p.add_argument("--plot", help="write a bar chart here (.png or .svg; needs matplotlib)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def wer_evaluator(task, subset: str, beam: int, max_sentences: int):
    from qswap.integration import data as fdata
    from qswap.integration.decode import decode
    from qswap.integration.metrics import error_counts

    samples = list(fdata.batches(task, subset, max_sentences=max_sentences))

    def evaluate(model) -> float:
        result = decode(task, model, samples, beam=beam)
        return error_counts([u.ref for u in result.utterances], [u.hyp for u in result.utterances]).wer
    return evaluate


def run(args: argparse.Namespace) -> int:
    from qswap.integration import data as fdata
    from qswap.io.atomic import atomic_write_text
    from qswap.sensitivity import plot, plot_format, sensitivity

    _wer_options(args)
    if args.plot:  # before minutes of probing, not after
        plot_format(args.plot)
        _require_matplotlib()
    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    batches = list(fdata.net_inputs(task, args.subset, args.batches, max_sentences=args.max_sentences))
    calib = list(fdata.net_inputs(task, args.calib_subset, args.calib_batches, max_sentences=args.max_sentences))
    settings = _settings(args, len(batches), len(calib))
    evaluate = wer_evaluator(task, args.subset, args.beam, args.max_sentences) if args.metric == "wer" else None
    with progress_display() as bar:
        job = bar.add_task("probing sites", total=None)
        report = sensitivity(model, args.recipe, batches, metric=args.metric, evaluate=evaluate,
                             top_k=args.top_k, calib_batches=calib,
                             progress=lambda i, n: bar.update(job, completed=i, total=n))
    # the files before the terminal table: a reader that closes stdout (| head) loses none of them
    if args.json_out:
        atomic_write_text(args.json_out, json_text({**report.to_dict(), "settings": settings}))
    if args.plot:
        plot(report, args.plot)
    console().print(sensitivity_table(report, args.checkpoint, args.show))
    return 0


def _wer_options(args: argparse.Namespace) -> None:
    """--top-k and --beam apply to --metric wer: refused with sqnr (they had been ignored without
    a word); with wer, their defaults set."""
    only_with(args, {"--top-k": TOP_K, "--beam": BEAM}, args.metric == "wer",
              lambda named: (f"{named} appl{'y' if ' and ' in named else 'ies'} to --metric wer (the sites it "
                             f"decodes); --metric {args.metric} decodes nothing: add --metric wer or drop {named}"))


def _settings(args: argparse.Namespace, batches: int, calib: int) -> dict:
    """What the run measured on, for its JSON: the batches of --subset and of --calib-subset as
    asked and as used (``batches`` and ``calib`` read; fewer, with a warning, where a subset makes
    fewer: the subsets are not batched a second time to count them), and the WER options."""
    from qswap.integration.compare import said_used

    return {"subset": args.subset, "batches": args.batches,
            "batches_used": said_used(args.subset, args.batches, batches, "--batches", "the SQNR", args.max_sentences),
            "calib_subset": args.calib_subset, "calib_batches": args.calib_batches,
            "calib_batches_used": said_used(args.calib_subset, args.calib_batches, calib, "--calib-batches",
                                            "calibration", args.max_sentences),
            "max_sentences": args.max_sentences,
            "metric": args.metric, **({"top_k": args.top_k, "beam": args.beam} if args.metric == "wer" else {})}


DELTA_WER_COLUMN = "ΔWER (all - all-but)"
DELTA_WER_LEGEND = (f"{DELTA_WER_COLUMN}: WER with every site quantized minus WER with this site alone kept float, "
                    f"in points (positive: the site hurts); the opposite of compare's ΔWER (recipe - float)")


def sensitivity_table(report, checkpoint: str, show: int):
    """The ranked sites as a rich Table, its first ``show`` rows; with WER measured, a caption says
    which way the WER column's difference goes."""
    from rich.table import Table

    table = Table(title=f"sensitivity of {checkpoint} to recipe {report.recipe}: all sites "
                        f"quantized {report.full_sqnr:.1f} dB" +
                        (f", WER {report.full_wer:.2f}% (float {report.float_wer:.2f}%)" if report.full_wer is not None else ""),
                  caption=DELTA_WER_LEGEND if report.full_wer is not None else None)
    for col in ("rank", "site", "kind", "bits", "alone dB", "all-but dB", "gain dB", DELTA_WER_COLUMN):
        table.add_column(col, justify="left" if col in ("site", "kind") else "right")
    for i, s in enumerate(report.ranked()[:show], 1):
        table.add_row(str(i), s.site, s.kind, str(s.bits), f"{s.alone_sqnr:.1f}", f"{s.all_but_sqnr:.1f}",
                      f"{s.gain_db:+.2f}", "" if s.delta_wer is None else f"{s.delta_wer:+.2f}")
    return table


def _require_matplotlib() -> None:
    import importlib

    from qswap.errors import DependencyError

    try:
        importlib.import_module("matplotlib.backends.backend_agg")  # what plot draws with
    except ImportError as exc:
        raise DependencyError(f"--plot needs matplotlib ({exc}): pip install matplotlib, or leave "
                              f"out --plot") from None
