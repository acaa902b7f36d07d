"""Decoding: fairseq's own SequenceGenerator for seq2seq models, greedy CTC for CTC models."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from qswap.integration.data import audio_seconds


@dataclass(frozen=True)
class Utterance:
    id: int
    ref: str
    hyp: str


@dataclass
class DecodeResult:
    utterances: list[Utterance]
    seconds: float  # wall-clock decode time
    audio_seconds: float


def is_ctc(model) -> bool:
    return not hasattr(model, "decoder") or type(model).__name__ in ("Wav2VecCtc",)


def _post_process(task) -> str:
    """How the task turns target pieces into words: speech_to_text's ``post_process`` (default
    sentencepiece), audio_finetuning's ``eval_wer_post_process`` (``letter`` for .ltr labels)."""
    cfg = getattr(task, "cfg", None)
    return (getattr(cfg, "post_process", None) or getattr(cfg, "eval_wer_post_process", None)
            or "sentencepiece")


def _text(dictionary, tokens: torch.Tensor, post: str) -> str:
    return dictionary.string(tokens.int().cpu(), post, extra_symbols_to_ignore={dictionary.eos()}).strip()


def decode(task, model, samples: Iterable[dict], *, beam: int = 5, max_len_b: int = 200,
           progress: Callable[[int], None] | None = None) -> DecodeResult:
    """Decode every sample; returns references and hypotheses as text."""
    dictionary = task.target_dictionary
    model.eval()
    if is_ctc(model):
        return decode_with(task, lambda sample: _ctc_greedy(model, sample, dictionary), samples, progress)
    from fairseq.sequence_generator import SequenceGenerator
    generator = SequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0, max_len_b=max_len_b)
    return decode_with(task, lambda sample: [h[0]["tokens"] for h in generator.generate([model], sample)],
                       samples, progress)


def decode_with(task, hypothesize: Callable[[dict], list[torch.Tensor]], samples: Iterable[dict],
                progress: Callable[[int], None] | None = None) -> DecodeResult:
    """Every sample's hypothesis tokens from ``hypothesize(sample)`` (one 1-d tensor per
    utterance), as text beside the reference, timed."""
    dictionary = task.target_dictionary
    post = _post_process(task)
    utterances, audio, start, unknown = [], 0.0, time.perf_counter(), []
    with torch.no_grad():
        for sample in samples:
            audio += audio_seconds(sample)
            hyps = hypothesize(sample)
            ids = sample["id"].tolist()
            unknown += [sid for sid, unk in zip(ids, (sample["target"] == dictionary.unk()).any(dim=1).tolist()) if unk]
            for i, sid in enumerate(ids):
                target = sample["target"][i]
                target = target[target != dictionary.pad()]
                utterances.append(Utterance(sid, _text(dictionary, target, post),
                                            _text(dictionary, hyps[i], post)))
            if progress is not None:
                progress(len(sample["id"]))
    utterances.sort(key=lambda u: u.id)
    if unknown:  # scored as they are: the same for every model (ΔWER unbiased), but the WER is inflated
        import warnings

        from qswap.errors import QswapWarning
        unknown.sort()
        warnings.warn(QswapWarning(
            f"{len(unknown)} of {len(utterances)} references hold <unk> (utterance(s) "
            f"{', '.join(map(str, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}): words or characters the "
            f"target dictionary does not hold (casing, punctuation?), which no hypothesis can match; their "
            f"errors count in every WER alike: normalize the manifest's tgt_text as the training data was"),
            stacklevel=2)
    return DecodeResult(utterances, time.perf_counter() - start, audio)


def _ctc_greedy(model, sample: dict, dictionary) -> list[torch.Tensor]:
    out = model(**sample["net_input"])
    logits = model.get_logits(out) if hasattr(model, "get_logits") else out["encoder_out"]  # (T, B, V)
    padding = out.get("padding_mask")
    best = logits.argmax(dim=-1).transpose(0, 1)  # (B, T)
    # the blank is fairseq's bos (index 0); like fairseq's CTC criterion, pad and eos are no words
    dropped = torch.tensor([dictionary.bos(), dictionary.pad(), dictionary.eos()], device=best.device)
    result = []
    for b in range(best.shape[0]):
        seq = best[b] if padding is None else best[b][~padding[b]]
        seq = torch.unique_consecutive(seq)
        result.append(seq[~torch.isin(seq, dropped)])
    return result
