"""Argument types shared by the subcommands: a count out of range is a usage error that names
the option and the smallest value it takes (``qswap eval: error: argument --beam: ...``), before
any model is loaded, instead of an error from deep inside fairseq or torch."""
from __future__ import annotations

import argparse
from typing import Callable


# utterances per batch, every command's default: search and sensitivity had 16 against the others' 32,
# and since the same value batches calibration, search's row of a recipe was calibrated differently
# from compare's row of the same recipe
MAX_SENTENCES = 32
INT32_MAX = 2**31 - 1  # the largest count fairseq's batching (C longs, int32 tensors) and torch take whole


def at_least(low: int, high: int = INT32_MAX, why: str = ""):
    """An argparse ``type``: an integer from ``low`` to ``high``. ``high`` defaults to ``INT32_MAX``:
    a larger count had reached fairseq or torch as it was (--max-sentences 10**20: an OverflowError
    in fairseq's Cython batching); ``why``: the reason for a smaller bound, said when it is passed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be {high} or less, got {value}" + (f": {why}" if why else ""))
        return value
    parse.__name__ = f"integer from {low} to {high}"  # argparse names the type in its own messages
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
POSITIVE = at_least(1)  # a beam, a batch size or a shard count
MAX_THREADS = 256
# onnxruntime starts every thread it is asked for (--threads 100000 had hung eval); more threads than
# the machine has cores only slow a decode down
THREADS = at_least(1, MAX_THREADS, why="onnxruntime starts each thread it is given; pass at most the number "
                                       "of CPU cores")


def only_with(args: argparse.Namespace, defaults: dict[str, object], applies: bool,
              refusal: Callable[[str], str], error: type | None = None) -> None:
    """Options that apply only with another choice (each declared with default None, so that
    given and not given can be told apart): where any was given and they do not apply, an
    ``error`` (a QswapError class; DataError by default) of ``refusal(named)`` (``named``: the given
    ones, '--a and --b'), since they would be ignored without a word; otherwise each not given set
    to its default (``set_defaults``). ``defaults``: {option: its default}, the option as typed
    (``--top-k``, stored as ``args.top_k``)."""
    from qswap.errors import DataError

    given = [option for option in defaults if getattr(args, _dest(option)) is not None]
    if given and not applies:
        raise (error or DataError)(refusal(" and ".join(given)))
    set_defaults(args, defaults)


def set_defaults(args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """Each option of ``defaults`` ({option as typed: its default}) declared with default None,
    so that a command can tell it given, set to its default where it was not given."""
    for option, default in defaults.items():
        if getattr(args, _dest(option)) is None:
            setattr(args, _dest(option), default)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")
