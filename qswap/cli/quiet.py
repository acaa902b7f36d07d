"""Third-party chatter (fairseq's log lines, torch's and fairseq's warnings) held back while a
command runs and summarized once at the end: one line per distinct message with its count.
``qswap --verbose`` shows them in full as they happen instead. qswap's own log records pass, and
its own warnings (QswapWarning: a recipe rule that matched no module) are printed as they happen
as ``warning: ...``: they are about the user's input, not chatter."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter
from typing import Iterator

WIDTH = 110  # characters of a message kept in the summary


class _Collect(logging.Handler):
    """Collects records of loggers outside qswap; passes qswap's own to ``passthrough``."""

    def __init__(self, passthrough: list[logging.Handler], seen: Counter):
        super().__init__(level=logging.NOTSET)
        self.passthrough, self.seen = passthrough, seen

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "qswap" or record.name.startswith("qswap."):
            for handler in self.passthrough:
                if record.levelno >= handler.level:
                    handler.handle(record)
            return
        self.seen[(f"{record.name} {record.levelname.lower()}", record.getMessage())] += 1


@contextlib.contextmanager
def held_back(verbose: bool) -> Iterator[Counter]:
    """While inside: third-party log records and warnings are counted, not printed. Yields the
    Counter of (source, message) -> times; ``summary`` renders it."""
    seen: Counter = Counter()
    if verbose:
        yield seen
        return
    root = logging.getLogger()
    saved = root.handlers[:]
    collect = _Collect(saved, seen)
    root.handlers = [collect]
    try:
        with warnings.catch_warnings():  # the active filters still apply; showwarning is restored
            warnings.showwarning = lambda message, category, filename, *_: _show(seen, message, category, filename)
            yield seen
    finally:
        root.handlers = saved


def _show(seen: Counter, message, category: type, filename: str) -> None:
    """A warning while held back: qswap's own printed now, a third-party one counted."""
    from qswap.errors import QswapWarning
    if issubclass(category, QswapWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        seen[(f"{category.__name__} ({_package(filename)})", str(message))] += 1


def summary(seen: Counter) -> list[str]:
    """One line per distinct held-back message, most frequent first; empty when there were none."""
    if not seen:
        return []
    total = sum(seen.values())
    lines = [f"{total} third-party message{'s' if total > 1 else ''} held back ({len(seen)} distinct; "
             f"--verbose shows them in full):"]
    for (source, message), n in seen.most_common():
        text = " ".join(message.split())
        text = text if len(text) <= WIDTH else text[:WIDTH - 1] + "…"
        lines.append(f"  {n:>3}x {source}: {text}")
    return lines


def _package(filename: str) -> str:
    """'torch', 'fairseq', ... from a warning's file path (the directory under site-packages)."""
    parts = filename.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1]
    return parts[-1] if parts else "?"
