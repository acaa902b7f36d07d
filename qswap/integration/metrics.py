"""WER and CER with jiwer, kept as error counts so shards merge exactly."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from qswap.errors import DataError


@dataclass(frozen=True)
class ErrorCounts:
    word_errors: int
    words: int
    char_errors: int
    chars: int
    utterances: int

    @property
    def wer(self) -> float:
        return 100.0 * self.word_errors / max(self.words, 1)

    @property
    def cer(self) -> float:
        return 100.0 * self.char_errors / max(self.chars, 1)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def to_dict(self) -> dict:
        return {**asdict(self), "wer": self.wer, "cer": self.cer}


def error_counts(refs: list[str], hyps: list[str]) -> ErrorCounts:
    """Word and character edit counts over a list of utterances (empty hypotheses allowed)."""
    import jiwer

    if len(refs) != len(hyps):
        raise DataError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return ErrorCounts(0, 0, 0, 0, 0)
    if any(not r.strip() for r in refs):
        raise DataError("a reference transcript is empty; WER needs non-empty references")
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    nw = words.hits + words.substitutions + words.deletions
    nc = chars.hits + chars.substitutions + chars.deletions
    return ErrorCounts(words.substitutions + words.deletions + words.insertions, nw,
                       chars.substitutions + chars.deletions + chars.insertions, nc, len(refs))


def merge(counts: Iterable[ErrorCounts]) -> ErrorCounts:
    total = ErrorCounts(0, 0, 0, 0, 0)
    for c in counts:
        total = total + c
    return total


def utterance_word_errors(refs: list[str], hyps: list[str]) -> tuple[list[int], list[int]]:
    """(word errors, reference words) of each utterance, from jiwer's alignment of each pair; they
    sum to ``error_counts``' totals. The bootstrap resamples these (qswap.integration.bootstrap)."""
    import jiwer

    if len(refs) != len(hyps):
        raise DataError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return [], []
    out = jiwer.process_words(refs, hyps)
    errors, words = [], []
    for chunks in out.alignments:
        e = w = 0
        for c in chunks:
            ref_len, hyp_len = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            w += ref_len if c.type != "insert" else 0
            e += {"equal": 0, "substitute": ref_len, "delete": ref_len, "insert": hyp_len}[c.type]
        errors.append(e)
        words.append(w)
    return errors, words
