"""Convert, calibrate, audit and evaluate each recipe; print and write the comparison table."""
from __future__ import annotations

import argparse

from qswap.cli.args import MAX_SENTENCES, POSITIVE
from qswap.cli.render import console, interactive, json_text, recipe_progress, styled

DEFAULT_RECIPES = ["fp32", "w8a8", "w8a8_per_channel", "w4a8", "w4a8_edges8", "w8_weight_only"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint")
    p.add_argument("--data", required=True, help="fairseq data directory")
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipes (names or YAML paths)")
    p.add_argument("--subset", default="test", help="subset to evaluate (default: test)")
    p.add_argument("--calib-subset", default="train", help="calibration subset (default: train)")
    p.add_argument("--calib-batches", type=POSITIVE, default=8, help="calibration batches (default: 8)")
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size (default: 5)")
    p.add_argument("--max-sentences", type=POSITIVE, default=MAX_SENTENCES,
                   help="utterances per batch, decoding and calibrating (default: 32); MMACs/s and GBOPs/s do "
                        "not depend on it: one forward of each of the subset's first 32 utterances alone, "
                        "per second of their audio")
    p.add_argument("--integer", action="store_true",
                   help="also integerize each quantized recipe, audit and decode the integer model: integer WER, "
                        "integer - fake-quant with a paired interval, integer-only (slower)")
    p.add_argument("--quantized", action="append", default=[], metavar="NAME=QCKPT",
                   help="also a row NAME for a quantized checkpoint (written by qswap convert, or a QAT run's), "
                        "evaluated as it is; repeatable")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.add_argument("--json", dest="json_out", help="write the table as JSON here ('-': to stdout, "
                                                   "instead of the terminal table and without progress)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    from qswap.integration.compare import compare
    from qswap.io.atomic import atomic_write_text

    to_stdout = args.json_out == "-"
    quantized = quantized_rows(args.quantized)
    names = ["fp32"] + [r for r in args.recipes if r != "fp32"] + list(quantized)
    with recipe_progress(names, enabled=interactive() and not to_stdout) as progress:
        table = compare(args.checkpoint, args.data, args.recipes, subset=args.subset,
                        calib_subset=args.calib_subset, calib_batches=args.calib_batches, beam=args.beam,
                        max_sentences=args.max_sentences, trust_checkpoint=args.trust_checkpoint,
                        integer=args.integer, quantized=quantized, progress=progress)
    if args.markdown:  # the files first: a reader that closes the terminal's pipe loses none
        atomic_write_text(args.markdown, table.markdown())
    if args.json_out and not to_stdout:
        atomic_write_text(args.json_out, json_text(table.to_dict()))
    if to_stdout:
        print(json_text(table.to_dict()), end="")
    else:
        console().print(render_comparison(table))
    return 0


def quantized_rows(items: list[str]) -> dict[str, str]:
    """``--quantized NAME=QCKPT`` arguments as {name: path}; a DataError names a malformed one or a
    missing file."""
    from pathlib import Path

    from qswap.errors import DataError

    rows: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--quantized takes NAME=QCKPT (a row name and a quantized checkpoint), got {item!r}")
        if name in rows:
            raise DataError(f"--quantized: the row name {name!r} is given twice")
        if not Path(path).is_file():
            raise DataError(f"--quantized {item}: no file {path}; write one with qswap convert CKPT --recipe R -o QCKPT")
        rows[name] = path
    return rows


def render_comparison(table):
    from rich.table import Table

    from qswap.integration.compare import INTEGER_COLUMNS, delta_cell, integer_cells, significance_cell, wer_cell

    boot = table.settings.get("bootstrap", {})
    t = Table(title=f"{table.checkpoint} on {table.subset}",
              caption=(f"[95 % CI]: paired bootstrap over utterances, {boot['resamples']} resamples, seed "
                       f"{boot['seed']}; significant: the ΔWER interval excludes 0"
                       + (f"\n{table.note}" if table.note else "") if boot else None))
    for col in ("recipe", "WER % [95 % CI]", "ΔWER [95 % CI]", "significant", "CER %", "honest", "weights MB",
                "MMACs/s", "GBOPs/s"):
        t.add_column(col, justify="left" if col in ("recipe", "honest", "significant") else "right")
    integer = table.settings.get("integer")
    for col in INTEGER_COLUMNS if integer else ():
        t.add_column(col, justify="left" if col == "integer-only" else "right")
    for r in table.rows:
        honest = styled("yes", "green") if r.honest else styled(f"no ({r.float_ops} violations)", "red")
        sig = significance_cell(r)
        t.add_row(r.recipe, wer_cell(r), delta_cell(r), styled(sig, "bold" if sig == "yes" else "dim"),
                  f"{r.cer:.2f}", honest, f"{r.weight_mb:.2f}", f"{r.mmacs_per_s:.1f}", f"{r.gbops_per_s:.1f}",
                  *(integer_cells(r) if integer else ()))
    return t
