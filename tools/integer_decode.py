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
    from qswap.integration.integer_decode import greedy, greedy_prefix_rerun
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
        return bpe.decode(tgt.string(tokens)).strip()

    with torch.no_grad():
        start = time.perf_counter()
        enc = qmodel.encoder(net_input["src_tokens"], net_input["src_lengths"])
        fake = greedy(lambda p: qmodel.logits_quant(qmodel.decoder(p, encoder_out=enc)[0]), len(refs), bos, eos,
                      args.max_len)  # both models: logits on the logits_quant grid, first of tied tokens
        fake_s = time.perf_counter() - start
    start = time.perf_counter()
    integer = greedy_prefix_rerun(imodel, net_input, bos, eos, args.max_len)
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
