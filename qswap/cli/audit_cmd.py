"""Audit a checkpoint: did every op on the inference path run on quantized values?

``qswap audit CHECKPOINT --recipe R [--data DIR --subset S | --synthetic N] [--strict]
[--values] [--integer] [--json F] [--markdown F]``: converts the checkpoint's float model with the recipe, calibrates
it on the audit batch, audits it and prints the report. A saved qswap checkpoint is audited as
it was saved (``--recipe`` may then only repeat its recipe). Exit code 0 when honest, 1 when
not (with ``--strict``, declared float_ok exceptions and undeclared dynamic ranges count as
not honest), 2 on a usage or
input error. ``--integer``: the integer audit level instead (``qswap.honesty.integer``): the
calibrated model is integerized and every path (batch forward, incremental decoding, beam
reorders) must compute on integer dtypes outside the declared float steps; exit 0 when it does,
1 when not, 2 when the model cannot be integerized (the error names each module).

``qswap audit DIR --onnx [--optimization all] [--optimized-dir D]``: the deploy audit of an
export directory (``qswap export --onnx``): every graph optimized as onnxruntime's CPU session
optimizes it (the optimized graphs saved, by default under DIR/optimized), every node that
still computes in float listed with its qswap site, integer nodes counted. Exit code 0 when no
node computes in float, 1 otherwise.
"""
from __future__ import annotations

import argparse
from typing import Callable

from qswap.cli import EXIT_OK, EXIT_VERDICT
from qswap.cli.args import at_least, only_with

DEFAULT_SYNTHETIC = 2
# the audited utterances are one batch through every path at once: which ops run, and on what
# dtypes, does not depend on its size (two utterances already exercise padding), while its memory
# grows with it (--synthetic 3000000 had asked torch for 115 GB)
MAX_AUDIT_BATCH = 64
AUDIT_BATCH = at_least(1, MAX_AUDIT_BATCH, why="the audit runs them as one batch, and which ops run does "
                                               "not depend on its size (2 already exercise padding)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="float fairseq checkpoint (with --onnx: an export directory)")
    p.add_argument("--onnx", action="store_true",
                   help="audit the deployed graphs of an export directory (qswap export --onnx)")
    p.add_argument("--optimization", choices=("basic", "extended", "all"),
                   help="with --onnx: onnxruntime's graph optimization level (default: all, a "
                        "CPU session's default)")
    p.add_argument("--optimized-dir", metavar="D",
                   help="with --onnx: where to save the optimized graphs (default: DIR/optimized)")
    p.add_argument("--recipe", help="shipped recipe name or YAML path (needed for a float checkpoint)")
    p.add_argument("--data", help="fairseq data directory (config.yaml, manifests)")
    p.add_argument("--subset", help="subset of --data whose first utterances are audited")
    p.add_argument("--count", type=AUDIT_BATCH, help="utterances taken from --subset (default 2)")
    p.add_argument("--synthetic", type=AUDIT_BATCH, metavar="N",
                   help=f"audit N random utterances shaped for the model (the default: "
                        f"{DEFAULT_SYNTHETIC}, when --subset is not given)")
    p.add_argument("--decode-steps", type=at_least(1), default=3, help="incremental decoding steps audited")
    p.add_argument("--strict", action="store_true",
                   help="declared float_ok exceptions and undeclared dynamic ranges fail too")
    p.add_argument("--values", action="store_true",
                   help="also run the value-level check (operands on uniform grids; slower)")
    p.add_argument("--integer", action="store_true",
                   help="integer audit level: integerize the calibrated model and prove every path computes "
                        "on integer dtypes outside the declared float steps")
    p.add_argument("--json", metavar="F", help="write the full report as JSON")
    p.add_argument("--markdown", metavar="F", help="write the report as Markdown")
    p.add_argument("--max-rows", type=at_least(1), default=40, help="violation rows printed (default 40)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    import qswap
    from qswap.honesty.loading import synthetic_net_input
    from qswap.honesty.paths import run_paths
    from qswap.calibrate import activation_quantizers
    from qswap.cli.render import console
    from qswap.cli.render_audit import print_report
    from qswap.integration import data as fdata

    _check_args(args)
    if args.onnx:
        return _run_onnx(args)
    model, cfg, task = _load(args)
    model = model.float()
    if args.subset:
        net_input = fdata.first_net_input(task, args.subset, args.count)
    else:
        count = DEFAULT_SYNTHETIC if args.synthetic is None else args.synthetic
        net_input = synthetic_net_input(model, count, cfg)
    qmodel = _quantized(model, args.recipe, [net_input])
    if qmodel is not model and activation_quantizers(qmodel):
        qswap.calibrate(qmodel, [net_input], forward=run_paths)  # the audited paths, unobserved
    report = qswap.audit(qmodel, net_input, decode_steps=args.decode_steps, values=args.values,
                         integer=args.integer)
    _write(args.json, report.to_json)  # the files first: a reader that closes the terminal's pipe loses none
    _write(args.markdown, report.to_markdown)
    if args.integer:
        from qswap.cli.render_integer import print_integer_report
        print_integer_report(console(), report, max_rows=args.max_rows)
        honest = report.integer_only
    else:
        print_report(console(), report, max_rows=args.max_rows)
        honest = report.honest_strict if args.strict else report.honest
        if args.strict and report.honest and not honest:  # say why the exit status is 1
            why = (["declared float exceptions (the recipe's float_ok)"] if report.declared else []) + (
                ["ranges computed at run time (uncalibrated activation quantizers: run qswap calibrate)"]
                if report.undeclared_dynamic else [])
            console().print(f"--strict: NOT STRICTLY HONEST: {' and '.join(why)}; --strict allows neither")
    return EXIT_OK if honest else EXIT_VERDICT


def _run_onnx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qswap.cli.render import console
    from qswap.cli.render_audit import print_deploy_audit
    from qswap.export.onnx_audit import audit_export
    from qswap.export.package import OPTIMIZED

    optimized = args.optimized_dir or Path(args.checkpoint) / OPTIMIZED
    audit = audit_export(args.checkpoint, level=args.optimization, save_optimized=optimized)
    _write(args.json, audit.to_json)  # the files first, as above
    _write(args.markdown, audit.to_markdown)
    print_deploy_audit(console(), audit, max_rows=args.max_rows)
    console().print(f"optimized graphs saved in {optimized}")
    return EXIT_OK if audit.integer_only else EXIT_VERDICT


def _load(args: argparse.Namespace):
    """(model, cfg, task) of the audited checkpoint. A float checkpoint given neither --recipe nor
    --data is told first what it cannot be audited without (--recipe), not that its task's data
    directory is missing (its setup fails first, so the checkpoint is read again only then)."""
    from qswap.errors import AuditError, DataError
    from qswap.integration import data as fdata

    try:
        return fdata.load_model_cfg_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    except DataError:
        if args.recipe is None and args.data is None and _is_float(args.checkpoint, args.trust_checkpoint):
            raise AuditError(f"{args.checkpoint} is a float checkpoint: it needs --recipe R (a shipped name or "
                             f"a YAML path) and --data DIR (the folder with its task's config.yaml and "
                             f"dictionary)") from None
        raise


def _is_float(checkpoint: str, trust_checkpoint: bool) -> bool:
    """Whether ``checkpoint`` loads as a fairseq checkpoint without qswap's entry (False where it
    cannot be read: the loader's own error stands)."""
    from qswap.errors import QswapError
    from qswap.io.checkpoint import QSWAP_KEY
    from qswap.io.safe_load import load_checkpoint

    try:
        state = load_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint)
    except QswapError:
        return False
    return isinstance(state, dict) and QSWAP_KEY not in state


def _quantized(model, recipe: str | None, data: list):
    """The model converted with ``recipe`` (``data``: for transforms that need activation
    statistics, the audited batch, as its calibration), or a saved qswap model as it is."""
    import qswap
    from qswap.errors import AuditError

    stored = getattr(getattr(model, "qswap_recipe", None), "name", None)
    if stored is None:
        if recipe is None:
            raise AuditError("a float checkpoint needs --recipe R (a shipped name or a YAML path)")
        return qswap.convert(model, recipe, data=data)
    if recipe is not None:
        from qswap.recipe import same_recipe
        asked = qswap.load_recipe(recipe)
        if asked.name != stored:
            raise AuditError(f"this checkpoint is already quantized with recipe {stored!r}; audit it "
                             f"without --recipe (or convert the float checkpoint with {recipe!r})")
        if not same_recipe(asked, model.qswap_recipe):  # a name alone had passed: the stored one was audited
            raise AuditError(f"this checkpoint is quantized with recipe {stored!r} as it stores it, and {recipe!r} "
                             f"is another recipe of that name (its content differs from the stored one); audit the "
                             f"checkpoint without --recipe, or convert the float checkpoint with {recipe!r}")
    return model


def _check_args(args: argparse.Namespace) -> None:
    from qswap.errors import AuditError, DataError

    if args.onnx:
        given = [flag for flag, on in (("--recipe", args.recipe), ("--data", args.data), ("--subset", args.subset),
                                       ("--synthetic", args.synthetic is not None), ("--values", args.values),
                                       ("--strict", args.strict), ("--integer", args.integer)) if on]
        if given:
            raise AuditError(f"--onnx audits the graphs of an export directory as exported; "
                             f"{', '.join(given)} apply to a checkpoint's fake-quant audit")
    # they had been ignored without a word
    only_with(args, {"--optimized-dir": None, "--optimization": "all"}, args.onnx,
              lambda named: f"{named} go{'' if ' and ' in named else 'es'} with --onnx (the deploy audit of an "
                            f"export directory): drop {named}", AuditError)
    only_with(args, {"--count": 2}, bool(args.subset),
              lambda named: "--count takes that many utterances of --subset; without --subset the audit runs "
                            "--synthetic N random utterances: pass --data DIR --subset S, or --synthetic N",
              AuditError)
    if args.subset and args.synthetic is not None:
        raise AuditError("give either --data DIR --subset S or --synthetic N, not both")
    if args.integer and (args.values or args.strict):
        raise AuditError("--values and --strict apply to the honesty audit; --integer has its own verdict "
                         "(every op outside the declared float steps on integer dtypes)")
    if args.subset and not args.data:
        raise DataError("--subset needs --data DIR (the data directory the subset is in)")
    for name in ("count", "decode_steps", "max_rows", "synthetic"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AuditError(f"--{name.replace('_', '-')} must be at least 1")


def _write(path: str | None, render: Callable[[], str]) -> None:
    """``render()`` written to ``path`` (rendered only when asked for)."""
    if path:
        from qswap.io.atomic import atomic_write_text
        atomic_write_text(path, render())  # OutputError when it cannot be written
