"""A tiny but real fairseq speech_to_text data directory for tests: random 80-dim features as
.npy files, TSV manifests, a sentencepiece model trained on the transcripts, its fairseq
dictionary, and config.yaml. fairseq's own SpeechToTextDataset loads it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

WORDS = "set a timer for five ten minutes turn on off the kitchen lights call anna at seven pm".split()


def make_s2t_datadir(root: Path, splits: dict[str, int] | None = None, seed: int = 0) -> Path:
    import sentencepiece as spm

    splits = splits or {"train": 12, "dev": 4, "test": 6}
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "fbank").mkdir(exist_ok=True)
    texts = []
    for split, n in splits.items():
        rows = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            frames = rng.randint(40, 90)
            feats = nprng.standard_normal((frames, 80)).astype(np.float32)
            rel = f"fbank/{split}_{i}.npy"
            np.save(root / rel, feats)
            rows.append(f"{split}_{i}\t{rel}\t{frames}\t{text}\tspk{i % 2}")
            texts.append(text)
        (root / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (root / "text.txt").write_text("\n".join(texts + WORDS) + "\n")
    spm.SentencePieceTrainer.train(input=str(root / "text.txt"), model_prefix=str(root / "spm"),
                                   vocab_size=30, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, bos_id=-1, eos_id=-1, pad_id=-1,
                                   unk_id=0, minloglevel=2)
    pieces = [line.split("\t")[0] for line in (root / "spm.vocab").read_text().splitlines()]
    (root / "spm.txt").write_text("".join(f"{p} 1\n" for p in pieces if p != "<unk>"))
    (root / "config.yaml").write_text(
        "bpe_tokenizer:\n  bpe: sentencepiece\n  sentencepiece_model: spm.model\n"
        "input_channels: 1\ninput_feat_per_channel: 80\nvocab_filename: spm.txt\n"
        f"audio_root: {root}\n")
    return root
