"""The shipped demo model (qswap/assets/s2t_demo) loads with fairseq and reproduces its
documented WER (metrics.json, written by tools/train_s2t.py) on the shipped test sets.

Decoding: fairseq's SequenceGenerator, beam 5, max_len_b 200; WER with jiwer on
sentencepiece-detokenized words. Batches are built with the dataset's own collater (no
fairseq batch sampler), so every utterance is decoded exactly once.
"""
import json
from pathlib import Path

import pytest
import torch

ASSET = Path(__file__).resolve().parents[1] / "qswap" / "assets" / "s2t_demo"
TOLERANCE_PP = 0.5


@pytest.fixture(scope="module")
def loaded():
    from fairseq import checkpoint_utils

    assert (ASSET / "checkpoint.pt").is_file(), f"missing shipped checkpoint {ASSET / 'checkpoint.pt'}"
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(ASSET / "checkpoint.pt")], arg_overrides={"data": str(ASSET)})
    # fairseq 0.12 resolves manifest audio paths against config `audio_root` (default: CWD);
    # the manifests are relative to the asset folder.
    task.data_cfg.config["audio_root"] = str(ASSET)
    model = models[0].float().eval()
    return model, task


def _decode_wer(model, task, split, beam=5, batch=25):
    import jiwer
    from fairseq.sequence_generator import SequenceGenerator

    task.load_dataset(split)
    ds = task.dataset(split)
    gen = SequenceGenerator([model], task.tgt_dict, beam_size=beam, max_len_b=200)
    bpe = task.build_bpe(None)
    hyps = {}
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            sample = ds.collater([ds[i] for i in range(start, min(start + batch, len(ds)))])
            out = gen.generate([model], sample)
            for k, sid in enumerate(sample["id"].tolist()):
                toks = out[k][0]["tokens"].int().cpu()
                hyps[sid] = bpe.decode(task.tgt_dict.string(toks, extra_symbols_to_ignore={task.tgt_dict.eos()})).strip()
    assert sorted(hyps) == list(range(len(ds)))
    refs = [ds.tgt_texts[i] for i in range(len(ds))]
    return 100.0 * jiwer.wer(refs, [hyps[i] for i in range(len(ds))]), len(ds)


def test_checkpoint_is_stripped():
    state = torch.load(str(ASSET / "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert state.get("last_optimizer_state") is None
    assert "cfg" in state and state["cfg"]["model"] is not None
    assert all(v.dtype in (torch.float16, torch.float32, torch.int64) for v in state["model"].values())


@pytest.mark.parametrize("split", ["test", "test_heldout"])
def test_documented_wer(loaded, split):
    model, task = loaded
    metrics = json.loads((ASSET / "metrics.json").read_text())
    wer, n = _decode_wer(model, task, split)
    assert n == metrics[split]["utterances"]
    assert abs(wer - metrics[split]["wer"]) <= TOLERANCE_PP, (split, wer, metrics[split]["wer"])
