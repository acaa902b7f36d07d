"""What the documentation tools' command lines share: a typed qswap error (``QswapError``: bad
input, a failed command) is printed as one ``error:`` message, with exit status 2 and no traceback."""
from __future__ import annotations

import sys
from typing import Callable

from qswap.errors import QswapError


def exit_status(main: Callable[[], int]) -> int:
    """``main()``'s exit status; 2 after printing ``error: ...`` for a ``QswapError``."""
    try:
        return main()
    except QswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be 1 or more (repeats, utterances): 0 or a negative
    count is the command line's error, before any work (a median of no timings had been a
    traceback after the models were built)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value
