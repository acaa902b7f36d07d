#!/usr/bin/env python3
"""Greedy-decode the shipped S2T model with the fake-quant model and with its integer form
(issue 16, work in progress: no incremental decoding yet, so each step reruns the decoder on
the whole prefix, in both models alike) and print how many transcripts are the same and each
WER. Greedy, not the shipped beam 5: the integer model is not inside SequenceGenerator yet.

    python tools/integer_decode.py --recipe w8a8 --subset test --count 20
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"


def greedy(step, encoder_out, batch: int, bos: int, eos: int, max_len: int) -> list[list[int]]:
    """Greedy tokens per utterance: ``step(encoder_out, prev_tokens)`` -> (B, T, V) scores (both
    models: logits on the ``logits_quant`` grid, what ``get_normalized_probs`` reads; argmax
    takes the first of tied tokens in both)."""
    prev = torch.full((batch, 1), bos, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_len):
        nxt = step(encoder_out, prev)[:, -1].argmax(-1)  # (B,)
        nxt = torch.where(done, eos, nxt)
        prev = torch.cat([prev, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return [[t for t in row[1:].tolist() if t != eos] for row in prev]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--count", type=int, default=20, help="utterances (first of the subset)")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=60)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    import jiwer

    import qswap
    from qswap.integration import data as fdata
    from qswap.integration.data import load_model_and_task
    model, task = load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    qmodel = qswap.convert(model, args.recipe)
    qswap.calibrate(qmodel, fdata.net_inputs(task, "train_calib", args.calib_batches, max_sentences=32))
    imodel = qswap.integerize(qmodel)
    dataset = fdata.load_subset(task, args.subset)
    sample = dataset.collater([dataset[i] for i in range(min(args.count, len(dataset)))])
    net_input = sample["net_input"]
    tgt, bpe = task.tgt_dict, task.build_bpe(None)
    refs = [dataset.tgt_texts[i] for i in sample["id"].tolist()]
    bos = eos = tgt.eos()

    def text(tokens):
        return bpe.decode(tgt.string(torch.tensor(tokens, dtype=torch.long))).strip()

    with torch.no_grad():
        start = time.perf_counter()
        enc = qmodel.encoder(net_input["src_tokens"], net_input["src_lengths"])
        fake = greedy(lambda e, p: qmodel.logits_quant(qmodel.decoder(p, encoder_out=e)[0]), enc, len(refs), bos, eos, args.max_len)
        fake_s = time.perf_counter() - start
    start = time.perf_counter()
    codes = imodel.encoder.quantize_input(net_input["src_tokens"])
    memory = imodel.encoder.forward_codes(codes, net_input["src_lengths"])
    integer = greedy(lambda e, p: imodel.decoder.forward_codes(p, *e), memory, len(refs), bos, eos, args.max_len)
    int_s = time.perf_counter() - start
    fake_text, int_text = [text(t) for t in fake], [text(t) for t in integer]
    same = sum(a == b for a, b in zip(fake_text, int_text))
    print(f"recipe {args.recipe}, {args.subset}, first {len(refs)} utterances, greedy, max_len {args.max_len}")
    print(f"fake-quant WER {100 * jiwer.wer(refs, fake_text):.2f} ({fake_s:.1f} s)")
    print(f"integer    WER {100 * jiwer.wer(refs, int_text):.2f} ({int_s:.1f} s)")
    print(f"same transcripts: {same} of {len(refs)}")
    for ref, a, b in zip(refs, fake_text, int_text):
        if a != b:
            print(f"  ref:  {ref}\n  fake: {a}\n  int:  {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
