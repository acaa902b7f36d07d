"""WER and CER with jiwer, kept as error counts so shards merge exactly."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

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


def check_pairs(refs: list[str], hyps: list[str], ids: Sequence[object] | None = None) -> None:
    """The rule every WER count applies (``error_counts``, ``utterance_word_errors``): as many
    hypotheses as references, and no empty reference (an utterance with no reference words has no
    WER; all of them empty, the WER divides by zero words). ``ids``: the utterances' ids, named in
    the message (their positions otherwise)."""
    if len(refs) != len(hyps):
        raise DataError(f"{len(refs)} references but {len(hyps)} hypotheses")
    empty = [i for i, r in enumerate(refs) if not r.strip()]
    if empty:
        names = [ids[i] if ids is not None else i for i in empty]
        listed = ", ".join(map(str, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DataError(f"a reference transcript is empty; WER needs non-empty references: {len(empty)} of "
                        f"{len(refs)} utterances have none (utterance {'ids' if ids is not None else 'positions'} "
                        f"{listed}); give them a transcript or leave them out of the manifest")


def error_counts(refs: list[str], hyps: list[str], ids: Sequence[object] | None = None) -> ErrorCounts:
    """Word and character edit counts over a list of utterances (empty hypotheses allowed; an empty
    reference is a DataError, ``check_pairs``)."""
    import jiwer

    check_pairs(refs, hyps, ids)
    if not refs:
        return ErrorCounts(0, 0, 0, 0, 0)
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


def utterance_word_errors(refs: list[str], hyps: list[str],
                          ids: Sequence[object] | None = None) -> tuple[list[int], list[int]]:
    """(word errors, reference words) of each utterance, from jiwer's alignment of each pair; they
    sum to ``error_counts``' totals (the same pairs refused: ``check_pairs``). The bootstrap
    resamples these (qswap.integration.bootstrap)."""
    import jiwer

    check_pairs(refs, hyps, ids)
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
