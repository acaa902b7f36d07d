"""Argument types shared by the subcommands: a count out of range is a usage error that names
the option and the smallest value it takes (``qswap eval: error: argument --beam: ...``), before
any model is loaded, instead of an error from deep inside fairseq or torch."""
from __future__ import annotations

import argparse


def at_least(low: int):
    """An argparse ``type``: an integer of ``low`` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in its own messages
    return parse


def finite(text: str) -> float:
    """An argparse ``type``: a finite number (``float`` alone takes nan and inf, which no budget
    or bound can mean)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


finite.__name__ = "finite number"
COUNT = at_least(0)  # a number of batches, where 0 means none
POSITIVE = at_least(1)  # a beam, a batch size, a thread or shard count
