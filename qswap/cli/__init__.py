"""The ``qswap`` command line. Lives apart from the library: library functions return report
objects and raise QswapError; only this package prints and chooses exit codes.

Each subcommand is a module here with ``add_arguments(parser)`` and ``run(args) -> int``.
Exit codes: 0 success, 1 a negative verdict (audit found float ops), 2 usage or input error.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "convert": "qswap.cli.convert_cmd",
    "calibrate": "qswap.cli.calibrate_cmd",
    "audit": "qswap.cli.audit_cmd",
    "eval": "qswap.cli.eval_cmd",
    "compare": "qswap.cli.compare_cmd",
    "sensitivity": "qswap.cli.sensitivity_cmd",
    "search": "qswap.cli.search_cmd",
    "recipes": "qswap.cli.recipes_cmd",
    "export": "qswap.cli.export_cmd",
}
EXIT_OK, EXIT_VERDICT, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; keep its message on one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"qswap: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qswap", description="Honest fake-quantization for fairseq speech models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--verbose", action="store_true",
                        help="show fairseq's and torch's log lines and warnings in full as they happen "
                             "(default: held back and summarized once at the end)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from qswap.cli.quiet import held_back, summary

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    with held_back(args.verbose) as seen:
        code = _run(args)
    for line in summary(seen):
        print(line, file=sys.stderr)
    return code


# the options that name a file a command writes ('-': standard output); export's -o and audit's
# --optimized-dir are directories
OUTPUTS = ("output", "json", "json_out", "markdown", "plot", "optimized_dir")


def _check_outputs(args: argparse.Namespace) -> None:
    """Each output the command will write, checked before it loads, calibrates or decodes anything."""
    from qswap.io.atomic import check_output

    from qswap.errors import OutputError

    for name in OUTPUTS:
        value = getattr(args, name, None)
        if value == "":
            raise OutputError(f"--{name.replace('_', '-')} is empty; give the path to write to")
        if isinstance(value, str) and value and value != "-":
            check_output(value, directory=(args.command == "export" and name == "output") or name == "optimized_dir")


def _run(args: argparse.Namespace) -> int:
    from qswap.errors import QswapError

    try:
        _check_outputs(args)
        return args._run(args)
    except QswapError as exc:
        if args.debug:
            raise
        print(f"qswap {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"qswap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
