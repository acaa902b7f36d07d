"""Rendering of library report objects for the terminal (rich) and as JSON. Only the CLI prints."""
from __future__ import annotations

import json
import math
import sys
from typing import Any


def console(stderr: bool = False):
    """The CLI's rich console. It parses no markup: what it prints holds text users wrote (recipe
    names, notes and rule patterns, paths), which may contain brackets (``[/]`` had raised rich's
    MarkupError after a checkpoint was written) or ``:name:`` (no emoji code either); styles are
    given as ``styled`` text. Off a terminal (a log, a pipe) nothing is cut or wrapped: tables are
    as wide as their cells (at 160 columns a module path, a source's file:line or a recipe name had
    been folded mid-word or cut to '…', and a grep of the log found nothing) and lines of text stay
    whole (a result line or a command to copy); the width follows the stream it writes (stderr's
    own). A reader that closed the pipe is a ``BrokenPipeError`` (``qswap.cli`` ends with exit
    141), not rich's ``SystemExit(1)``, which had read as an audit's negative verdict."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return _console_class()(file=stream, width=None if terminal else UNWRAPPED, soft_wrap=not terminal,
                            markup=False, emoji=False)


UNWRAPPED = 100_000  # the console width off a terminal: every table fits its cells whole


_CONSOLE = None


def _console_class():
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        class PipeConsole(Console):
            def on_broken_pipe(self) -> None:
                self.quiet = True
                raise BrokenPipeError("the reader of the output closed it")
        _CONSOLE = PipeConsole
    return _CONSOLE


def styled(text: str, style: str):
    """``text`` shown in ``style`` (a rich ``Text``; an empty style: plain)."""
    from rich.text import Text
    return Text(text, style=style)


def styled_line(lead: str, style: str, rest: str):
    """``lead`` in ``style``, then ``rest`` plain: a verdict line."""
    from rich.text import Text
    return Text.assemble((lead, style), rest)


def json_text(payload: Any) -> str:
    """``payload`` as valid JSON text. A float that is not finite (an SQNR of -inf dB: the
    quantized model's output was NaN or inf) is written as ``null``; ``json.dumps`` would write
    ``-Infinity``, which JSON readers other than Python's reject."""
    return json.dumps(_finite_or_none(payload), indent=2, allow_nan=False) + "\n"


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def convert_table(report, show_all: bool = False):
    from rich.table import Table

    table = Table(title=f"convert report: recipe {report.recipe}", show_lines=False)
    for col in ("module", "class", "action", "counterpart", "weight", "activation", "rule / reason"):
        table.add_column(col, overflow="fold")
    style = {"quantized": "green", "no_quantizer": "yellow", "float": "red", "skipped": "yellow", "passthrough": "dim"}
    for e in report.entries:
        if e.action in ("passthrough", "container") and not show_all:
            continue
        table.add_row(e.path or "<root>", e.float_class, styled(e.action, style.get(e.action, "")),
                      e.counterpart, e.weight, e.activation,
                      e.rule + (f" - {e.reason}" if e.reason else ""))
    return table


def convert_summary(report) -> str:
    c = report.counts()
    mb = lambda b: f"{b / 1e6:.2f} MB"  # noqa: E731
    lines = [f"{c['quantized']} quantized, "
             + (f"{c['no_quantizer']} converted with no quantizer (null specs), " if c["no_quantizer"] else "")
             + f"{c['float']} left float, {c['skipped']} skipped, "
             f"{c['passthrough']} passthrough, {c['container']} containers; weights {mb(report.float_bytes)} float -> "
             f"{mb(report.quantized_bytes)} quantized (codes at their bit widths, with their grids)"]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"warning: {r} matched no module" for r in report.unmatched_rules]
    lines += [f"declared float: {k}: {v}" for k, v in report.float_ok.items()]
    return "\n".join(lines)


def interactive() -> bool:
    """Progress is drawn only on a terminal: CI logs and pipes get none."""
    return sys.stderr.isatty()


def progress_display(enabled: bool | None = None):
    """A rich Progress on stderr (description, bar, done/total, elapsed, time left); drawn only when
    ``enabled`` (default: on a terminal)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                    console=console(stderr=True), transient=True,
                    disable=not (interactive() if enabled is None else enabled))


class progress_bar:
    """A rich progress bar on stderr, on a terminal only:
    ``with progress_bar("decoding", total) as advance: advance(n)``."""

    def __init__(self, description: str, total: int | None, enabled: bool | None = None):
        self.progress = progress_display(enabled)
        self.description, self.total = description, total

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n=1: self.progress.update(task, advance=n)

    def __exit__(self, *exc):
        self.progress.stop()
        return False


class recipe_progress:
    """Progress of a run over recipes, on a terminal only: an overall bar (recipes done, time
    left) and one for the current recipe's stage (batches calibrated or utterances decoded).
    Called as ``progress(recipe, stage, n, total)`` (qswap.integration.compare's protocol)."""

    def __init__(self, recipes: list[str], enabled: bool | None = None):
        self.progress = progress_display(enabled)
        self.recipes, self.current = recipes, None

    def __enter__(self):
        self.progress.start()
        self.overall = self.progress.add_task("recipes", total=len(self.recipes))
        self.stage = self.progress.add_task("starting", total=None)
        return self

    def __call__(self, recipe: str, stage: str, n: int, total: int) -> None:
        if (recipe, stage) != self.current:
            if self.current is not None and recipe != self.current[0]:
                self.progress.advance(self.overall)
            self.current = (recipe, stage)
            unit = "utterances" if stage.endswith("decode") else "batches"
            self.progress.reset(self.stage, total=total, description=f"{recipe}: {stage} ({unit})")
        self.progress.advance(self.stage, n)

    def __exit__(self, *exc):
        self.progress.stop()
        return False
