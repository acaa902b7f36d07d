"""The ``qswap`` command line. Lives apart from the library: library functions return report
objects and raise QswapError; only this package prints and chooses exit codes.

Each subcommand is a module here with ``add_arguments(parser)`` and ``run(args) -> int``.
Exit codes: 0 success, 1 a negative verdict (audit found float ops), 2 usage or input error,
130 interrupted, 141 the reader closed standard output (``| head``), 143 terminated.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading

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
EXIT_PIPE = 128 + 13  # the reader closed standard output (SIGPIPE's code, as a shell gives it)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; keep its message on one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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
    with held_back(args.verbose) as seen, _terminate_as_interrupt():
        code = _run(args)
    for line in summary(seen):
        print(line, file=sys.stderr)
    return code


# the options that name a file a command writes; export's -o and audit's --optimized-dir are
# directories
OUTPUTS = ("output", "json", "json_out", "markdown", "plot", "optimized_dir")
# the outputs that take '-' for standard output (the others would write a file named '-')
STDOUT_OUTPUTS = {("eval", "json_out"), ("compare", "json_out")}
# the options that name files (or an export directory) a command reads; --quantized is NAME=PATH.
# A name that is no file (a shipped recipe's) is not compared with the outputs; a file output
# inside one that is a directory (an export directory) is refused: it would replace or mix with
# the files of that input
INPUTS = ("checkpoint", "recipe", "recipes", "high", "baseline", "merge", "quantized")
# --data is an input directory too, but one qswap's own outputs may live in (a searched recipe
# beside the checkpoint it was searched for: tools/sensitivity_doc.py): an output there is refused
# when it is a file of the kinds a fairseq data directory holds (what the task reads), new or not
DATA_FILES = {".tsv", ".zip", ".npy", ".npz", ".wav", ".flac", ".ogg", ".mp3", ".model", ".txt", ".ltr", ".wrd"}


def _check_outputs(args: argparse.Namespace) -> None:
    """Each output the command will write, checked before it loads, calibrates or decodes anything:
    a path it can write, not one of its inputs (which the write would replace) and not another
    output's file (one would silently overwrite the other)."""
    import os

    from qswap.errors import OutputError
    from qswap.io.atomic import check_output

    inputs = [path for name in INPUTS for v in _values(getattr(args, name, None))
              for path in [v.partition("=")[2] if name == "quantized" else v] if os.path.exists(path)]
    written: dict[str, str] = {}
    for name in OUTPUTS:
        value, option = getattr(args, name, None), _option(name)
        if value == "":
            raise OutputError(f"{option} is empty; give the path to write to")
        if value == "-" and (args.command, name) not in STDOUT_OUTPUTS:
            raise OutputError(f"{option} -: qswap {args.command} writes {option} to a file, not to standard "
                              f"output; give a file path")
        if not isinstance(value, str) or value in ("", "-"):
            continue
        directory = (args.command == "export" and name == "output") or name == "optimized_dir"
        check_output(value, directory=directory)
        for path in inputs:
            if _same_file(value, path):
                raise OutputError(f"{option} {value} is also an input of this command ({path}); writing it would "
                                  f"replace that file: give another output path")
            if not directory and os.path.isdir(path) and _inside(value, path):
                raise OutputError(f"{option} {value} is inside {path}, an input directory of this command; writing "
                                  f"there would replace or add to that input's files: give a path outside it")
        data = getattr(args, "data", None)
        if not directory and isinstance(data, str) and os.path.isdir(data) and _inside(value, data) \
                and _data_file(value):
            raise OutputError(f"{option} {value} is inside {data}, the --data directory, and names a data file "
                              f"(config, manifest, features, audio or vocabulary) the task may read: give a path "
                              f"outside it")
        from qswap.io.atomic import is_stream
        for other, path in written.items():
            if _same_file(value, path) and not is_stream(value):  # two reports into /dev/null
                raise OutputError(f"{other} {path} and {option} {value} are the same file; give each output a "
                                  f"path of its own")
        written[option] = value


def _inside(path: str, directory: str) -> bool:
    """``path`` lies inside ``directory`` (links resolved)."""
    from pathlib import Path

    return Path(directory).resolve() in Path(path).resolve().parents


def _data_file(path: str) -> bool:
    """``path`` names a file of a fairseq data directory: config.yaml, a manifest or its labels
    (a file sharing a manifest's stem), features, audio or a vocabulary."""
    from pathlib import Path

    p = Path(path)
    return (p.name == "config.yaml" or p.suffix.lower() in DATA_FILES
            or (p.suffix != "" and p.with_suffix(".tsv").is_file()))


def _option(name: str) -> str:
    return "--json" if name == "json_out" else f"--{name.replace('_', '-')}"


def _values(value) -> list[str]:
    """An option's value as a list of strings (nargs='+' and append options are lists already)."""
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]


def _same_file(a: str, b: str) -> bool:
    """``a`` and ``b`` name one file: the same file where both exist (links included), else the
    same absolute path."""
    import os
    from pathlib import Path

    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's or ``kill``'s stop), raised where the command runs, as Ctrl-C's
    KeyboardInterrupt is: every write's clean-up runs (an export takes its staged graphs and the
    folder it made away again; an atomic write its temporary file), which the default action, an
    exit with no Python code run, skipped."""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises ``Terminated`` inside the block (main thread only: Python runs handlers there);
    the previous handler afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    except Terminated:
        print(f"qswap {args.command}: terminated (SIGTERM); no file was left half-written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"qswap {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head`: the reader has what it wanted; files were written before the report
        import os
        with contextlib.suppress(OSError):  # no second error as Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
