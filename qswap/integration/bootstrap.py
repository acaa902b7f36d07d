"""Paired bootstrap confidence intervals for WER and for the WER difference of two systems.

How (Koehn 2004, "Statistical significance tests for machine translation evaluation"; Bisani &
Ney 2004, "Bootstrap estimates for confidence intervals in ASR performance evaluation"):

- the unit resampled is the utterance: each resample draws ``n`` utterances with replacement
  (numpy's ``Generator.integers``, seeded by ``seed``) and sums their word errors and reference
  words, so WER stays a ratio of sums, as jiwer and fairseq compute it;
- ΔWER is paired: both systems are scored on the *same* resampled utterances, which removes the
  utterance-difficulty variance that two independent intervals would double-count;
- the interval is the percentile interval of the ``resamples`` bootstrap values (numpy's
  ``percentile``, linear interpolation), the same method as
  ``scipy.stats.bootstrap(..., method="percentile")``, which the tests use as the reference;
- a difference is *significant* at ``confidence`` when its interval does not contain 0;
- below ``MIN_UTTERANCES`` (2) utterances there is no interval (None) and no verdict: one
  utterance resamples only to itself, a zero-width interval that would call any nonzero
  difference significant.

Defaults: 2,000 resamples, 95 %, seed 0: the same inputs give the same interval on every run.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from qswap.errors import DataError

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
MIN_UTTERANCES = 2
NO_INTERVAL = f"no confidence interval: the paired bootstrap needs at least {MIN_UTTERANCES} utterances"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed; written next to every interval in JSON output."""
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = SEED

    def __post_init__(self):
        for name in ("resamples", "seed"):  # numpy's own errors had come at the first interval
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise DataError(f"bootstrap {name} must be a non-negative integer, got {value!r}")
        if self.resamples < 1 or not 0 < self.confidence < 1:
            raise DataError(f"bootstrap needs resamples >= 1 and 0 < confidence < 1, got "
                            f"{self.resamples} and {self.confidence}")

    def indices(self, n: int) -> np.ndarray:
        """(resamples, n) utterance indices drawn with replacement; the same for a given n."""
        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n))

    def percentile_interval(self, values: np.ndarray) -> Interval:
        tail = 100.0 * (1.0 - self.confidence) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return Interval(float(low), float(high))

    def to_dict(self) -> dict:
        return {**asdict(self), "method": "paired percentile bootstrap over utterances"}


def _arrays(errors: Sequence[int], words: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    e, w = np.asarray(errors, dtype=np.int64), np.asarray(words, dtype=np.int64)
    if e.shape != w.shape or e.ndim != 1 or len(e) == 0:
        raise DataError(f"per-utterance word errors ({e.shape}) and reference words ({w.shape}) "
                        f"must be two non-empty lists of the same length")
    return e, w


def wer_interval(errors: Sequence[int], words: Sequence[int],
                 bootstrap: Bootstrap = Bootstrap()) -> Interval | None:
    """Interval for WER % = 100 * sum(errors) / sum(words), resampling utterances; None below
    MIN_UTTERANCES utterances."""
    e, w = _arrays(errors, words)
    if len(e) < MIN_UTTERANCES:
        return None
    idx = bootstrap.indices(len(e))
    return bootstrap.percentile_interval(100.0 * e[idx].sum(1) / np.maximum(w[idx].sum(1), 1))


def delta_interval(errors: Sequence[int], baseline_errors: Sequence[int], words: Sequence[int],
                   bootstrap: Bootstrap = Bootstrap()) -> Interval | None:
    """Interval for WER(system) - WER(baseline) in points, both on the same resampled utterances
    (``words`` are the shared references' word counts); None below MIN_UTTERANCES utterances."""
    e, w = _arrays(errors, words)
    b, _ = _arrays(baseline_errors, words)
    if len(e) < MIN_UTTERANCES:
        return None
    idx = bootstrap.indices(len(e))
    return bootstrap.percentile_interval(100.0 * (e[idx].sum(1) - b[idx].sum(1)) / np.maximum(w[idx].sum(1), 1))


def paired_delta(utterances: Sequence[dict], baseline: Sequence[dict], bootstrap: Bootstrap = Bootstrap(),
                 what: str = "the baseline") -> tuple[float, Interval | None]:
    """WER(system) - WER(baseline) in points and its paired interval (``delta_interval``), from two
    ``qswap eval --json`` results' utterances (``{"id", "ref", "hyp"}``); DataError unless both
    decoded the same utterances (ids and references)."""
    from qswap.integration.metrics import utterance_word_errors

    base = {u["id"]: u for u in baseline}
    for listed, whose in ((baseline, what), (utterances, "the result")):
        twice = sorted((i for i, n in Counter(u["id"] for u in listed).items() if n > 1), key=str)
        if twice:  # the last of each had decided the ΔWER
            raise DataError(f"{whose} lists utterance(s) {', '.join(map(str, twice[:10]))} more than once; pass one "
                            f"'qswap eval --json' result (merge shards with 'qswap eval --merge')")
    if sorted(base) != sorted(u["id"] for u in utterances) or any(base[u["id"]]["ref"] != u["ref"] for u in utterances):
        raise DataError(f"{what} was decoded on other utterances; pass a 'qswap eval --json' result of the same "
                        f"subset and shard")
    refs = [u["ref"] for u in utterances]
    errors, words = utterance_word_errors(refs, [u["hyp"] for u in utterances])
    base_errors, _ = utterance_word_errors(refs, [base[u["id"]]["hyp"] for u in utterances])
    return 100.0 * (sum(errors) - sum(base_errors)) / max(sum(words), 1), delta_interval(errors, base_errors, words,
                                                                                          bootstrap)


def significant(interval: Interval | None) -> bool | None:
    """A difference is significant when its interval excludes 0; None (no verdict) without one."""
    return None if interval is None else not interval.contains(0.0)


def bounds(interval: Interval | None) -> tuple[float, float] | None:
    """(low, high) as JSON and report rows carry it; None without an interval."""
    return None if interval is None else (interval.low, interval.high)


def no_interval_note(utterances: int, context: str) -> str | None:
    """Why a result has no interval, ``NO_INTERVAL`` then ``context`` and the count (``"test gave 1"``);
    None from MIN_UTTERANCES utterances on."""
    return f"{NO_INTERVAL}, {context} {utterances}" if utterances < MIN_UTTERANCES else None


def as_interval(ci: Interval | Sequence[float] | None) -> Interval | None:
    """An interval from itself or from its (low, high) bounds as JSON carries them; None without one."""
    if not ci:
        return None
    return ci if isinstance(ci, Interval) else Interval(*ci)


def interval_text(ci: Interval | Sequence[float] | None, sign: str = "", missing: str = f" ({NO_INTERVAL})") -> str:
    """`` [6.74, 13.17]`` (``sign="+"`` for differences) of an interval or its bounds; ``missing``
    without one (by default NO_INTERVAL's wording, for a report that has no note of its own)."""
    interval = as_interval(ci)
    return missing if interval is None else f" [{interval.low:{sign}.2f}, {interval.high:{sign}.2f}]"


def value_text(value: float, ci: Interval | Sequence[float] | None, sign: str = "",
               missing: str = f" ({NO_INTERVAL})") -> str:
    """``9.77 [6.74, 13.17]``: a value and its interval, as ``interval_text`` writes it."""
    return f"{value:{sign}.2f}" + interval_text(ci, sign, missing)
