#!/usr/bin/env python3
"""Train, finalize and evaluate qswap's demo speech model (a small fairseq s2t_transformer).

Three steps (run them in order, or ``all``):

``train``     runs ``fairseq-train`` (the venv's) on a data directory written by
              ``tools/make_corpus.py``, on CPU, stopping after ``--hours`` of wall clock.
``finalize``  averages the last ``--average`` epoch checkpoints, strips the result to model
              weights + cfg (no optimizer state; fp16 storage with ``--fp16``), and exports the
              shipped asset folder: checkpoint.pt, sentencepiece model + dict, config.yaml,
              gcmvn.npz and the test / test_heldout manifests + feature zips.
``evaluate``  decodes test and test_heldout *from the asset folder* with fairseq's
              SequenceGenerator (beam 5), detokenizes with sentencepiece, scores WER with
              jiwer, and writes ``metrics.json`` into the asset folder. With
              ``--fairseq-generate`` it also runs the ``fairseq-generate`` CLI from another
              working directory and checks it gives the same WER.

Example (the commands used for the shipped model are in qswap/assets/s2t_demo/README.md):

    python tools/make_corpus.py --out /work/s2t_work/data --num-train 7000 --seed 1
    python tools/train_s2t.py all --data /work/s2t_work/data --work /work/s2t_work/run1 \\
        --hours 0.6 --asset-dir qswap/assets/s2t_demo
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHIPPED_SPLITS = ("test", "test_heldout")

ARCH_DEFAULTS = dict(
    encoder_layers=6, encoder_embed_dim=176, encoder_ffn_embed_dim=704, encoder_attention_heads=4,
    decoder_layers=3, decoder_embed_dim=176, decoder_ffn_embed_dim=704, decoder_attention_heads=4,
    conv_channels=256,
)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def train_cmd(a: argparse.Namespace) -> List[str]:
    fairseq_train = shutil.which("fairseq-train", path=str(VENV_BIN)) or "fairseq-train"
    cmd = [
        fairseq_train, str(a.data), "--config-yaml", "config.yaml",
        "--train-subset", "train", "--valid-subset", "dev", "--task", "speech_to_text",
        "--arch", "s2t_transformer",
        "--encoder-layers", str(a.encoder_layers), "--encoder-embed-dim", str(a.encoder_embed_dim),
        "--encoder-ffn-embed-dim", str(a.encoder_ffn_embed_dim),
        "--encoder-attention-heads", str(a.encoder_attention_heads),
        "--decoder-layers", str(a.decoder_layers), "--decoder-embed-dim", str(a.decoder_embed_dim),
        "--decoder-ffn-embed-dim", str(a.decoder_ffn_embed_dim),
        "--decoder-attention-heads", str(a.decoder_attention_heads),
        "--conv-channels", str(a.conv_channels), "--share-decoder-input-output-embed",
        "--dropout", str(a.dropout),
        *(["--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", str(a.ctc_weight)]
          if a.ctc_weight > 0 else ["--criterion", "label_smoothed_cross_entropy"]),
        "--label-smoothing", "0.1", "--report-accuracy",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(a.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(a.warmup), "--warmup-init-lr", "1e-7",
        "--clip-norm", "10.0", "--max-tokens", str(a.max_tokens), "--max-update", "1000000",
        "--stop-time-hours", str(a.hours), "--save-dir", str(Path(a.work) / "checkpoints"),
        "--keep-last-epochs", str(max(a.average, 1)), "--no-last-checkpoints",
        "--log-format", "simple", "--log-interval", "20", "--num-workers", "0",
        "--seed", str(a.seed), "--cpu", "--skip-invalid-size-inputs-valid-test",
        # fairseq-fixed 0.12.3.1's batch_by_size drops the last partial batch when it is not a
        # multiple of required_batch_size_multiple (default 8): use 1 so no utterance is lost
        "--required-batch-size-multiple", "1",
    ]
    if a.save_interval_updates:
        cmd += ["--save-interval-updates", str(a.save_interval_updates), "--keep-interval-updates", "3"]
    if a.restore_file:  # continue a run (optimizer state included)
        cmd += ["--restore-file", str(a.restore_file)]
    return cmd


def do_train(a: argparse.Namespace) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cmd = train_cmd(a)
    if a.nice:
        cmd = ["nice", "-n", str(a.nice)] + cmd
    (work / "train_cmd.txt").write_text(" ".join(repr(c) if " " in c else c for c in cmd) + "\n")
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if a.restore_file:
        # fairseq 0.12 training checkpoints pickle argparse.Namespace; torch >= 2.6 refuses that
        # under its weights_only default. These are our own checkpoints, so allow it for resume.
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    # fairseq 0.12 resolves manifest `audio` against config `audio_root` (default: the current
    # working directory), so train from inside the data directory.
    with open(work / "train.log", "a" if a.restore_file else "w") as log:
        p = subprocess.run(cmd, cwd=str(a.data), stdout=log, stderr=subprocess.STDOUT, env=env)
    secs = time.time() - t0
    tt = work / "train_time.json"
    prev = json.loads(tt.read_text()) if (a.restore_file and tt.exists()) else {"train_seconds": 0.0, "runs": []}
    prev["runs"] = prev.get("runs", [prev.get("train_seconds", 0.0)] if prev.get("train_seconds") else []) + [round(secs, 1)]
    prev["train_seconds"] = round(sum(prev["runs"]), 1)
    tt.write_text(json.dumps(prev) + "\n")
    if p.returncode != 0:
        sys.exit(f"fairseq-train failed (rc={p.returncode}); see {work / 'train.log'}")
    print(f"training took {secs / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------
def _epoch_ckpts(work: Path) -> List[Path]:
    ck = glob.glob(str(work / "checkpoints" / "checkpoint[0-9]*.pt"))
    return sorted((Path(p) for p in ck), key=lambda p: int(re.findall(r"\d+", p.name)[0]))


def _ckpt_epoch(p: Path) -> Optional[int]:
    m = re.fullmatch(r"checkpoint(\d+)\.pt", p.name)
    return int(m.group(1)) if m else None


def _plain(x):
    """argparse.Namespace / numpy scalars -> plain containers, so that torch.load's default
    weights_only=True (torch >= 2.6, which fairseq 0.12's load_checkpoint_to_cpu relies on)
    can read the checkpoint; fairseq rebuilds the cfg with OmegaConf.create either way."""
    import argparse

    import numpy as np

    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store {type(x).__name__} in a weights-only checkpoint")


def average_and_strip(paths: List[Path], out: Path, fp16: bool) -> Dict:
    import torch

    avg = None
    state0 = None
    for p in paths[::-1]:  # state0 (cfg, optimizer history) = the last checkpoint
        st = torch.load(str(p), map_location="cpu", weights_only=False)
        m = {k: v.double() if v.is_floating_point() else v for k, v in st["model"].items()}
        if avg is None:
            avg, state0 = m, st
        else:
            for k in avg:
                if avg[k].is_floating_point():
                    avg[k] += m[k]
    # the auxiliary CTC head (--ctc-weight) is a training aid: inference never runs it
    avg = {k: v for k, v in avg.items() if not k.startswith("encoder.ctc_proj.")}
    for k in avg:
        if avg[k].is_floating_point():
            avg[k] /= len(paths)
            avg[k] = avg[k].to(torch.float16 if fp16 else torch.float32)
    cfg = _plain(state0["cfg"])
    # neutral, machine-independent paths; callers override task.data anyway
    def _set(section, key, value):
        sec = cfg.get(section) if isinstance(cfg, dict) else getattr(cfg, section, None)
        if isinstance(sec, dict):
            if key in sec:
                sec[key] = value
        elif sec is not None and hasattr(sec, key):  # argparse.Namespace (legacy model/task cfg)
            setattr(sec, key, value)

    _set("model", "ctc_weight", 0.0)  # so the loaded model builds no ctc_proj
    for section in ("task", "model"):
        _set(section, "data", ".")
        _set(section, "save_dir", "checkpoints")
    _set("checkpoint", "save_dir", "checkpoints")
    stripped = {
        "cfg": cfg,
        "args": None,
        "model": avg,
        "optimizer_history": _plain([
            {k: v for k, v in h.items() if k in ("criterion_name", "optimizer_name", "lr_scheduler_state", "num_updates")}
            for h in state0.get("optimizer_history", [])[-1:]
        ]),
        "extra_state": {"epoch": _ckpt_epoch(paths[-1]),
                        "averaged_checkpoints": [p.name for p in paths]},
        "last_optimizer_state": None,
    }
    torch.save(stripped, str(out))
    n_params = sum(v.numel() for v in avg.values())
    return {"parameters": n_params, "averaged": [p.name for p in paths],
            "epoch": stripped["extra_state"]["epoch"],
            # fairseq's own cumulative training wall clock up to the last averaged checkpoint
            # (summed over resumed runs, including runs that were killed after saving it)
            "train_seconds": (state0.get("extra_state") or {}).get("previous_training_time"),
            "num_updates": (stripped["optimizer_history"][-1].get("num_updates") if stripped["optimizer_history"] else None)}


def do_finalize(a: argparse.Namespace) -> None:
    work, data, asset = Path(a.work), Path(a.data), Path(a.asset_dir)
    ckpts = _epoch_ckpts(work)
    if not ckpts and not a.checkpoints:
        sys.exit(f"no epoch checkpoints in {work / 'checkpoints'}")
    if a.checkpoints:
        use = [Path(p) for p in a.checkpoints]
    else:
        use = ckpts[-a.average:] if a.average > 0 else [work / "checkpoints" / "checkpoint_best.pt"]
    asset.mkdir(parents=True, exist_ok=True)
    info = average_and_strip(use, asset / "checkpoint.pt", a.fp16)
    # data files: relative paths only
    import yaml

    with open(data / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    spm_model = cfg["bpe_tokenizer"]["sentencepiece_model"]
    for name in [cfg["vocab_filename"], spm_model, "gcmvn.npz"]:
        shutil.copy2(data / name, asset / Path(name).name)
    cfg.pop("audio_root", None)
    if "global_cmvn" in cfg:
        cfg["global_cmvn"]["stats_npz_path"] = "gcmvn.npz"
    with open(asset / "config.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    src = Path(a.shipped_from) if a.shipped_from else data
    for split in SHIPPED_SPLITS:
        shutil.copy2(src / f"{split}.tsv", asset / f"{split}.tsv")
        shutil.copy2(src / f"fbank80_{split}.zip", asset / f"fbank80_{split}.zip")
    work.mkdir(parents=True, exist_ok=True)
    (work / "finalize.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum(p.stat().st_size for p in asset.iterdir() if p.is_file())
    print(json.dumps(info), f"asset folder {size / 1e6:.1f} MB", flush=True)


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def load_shipped(asset_dir: Path):
    """Load the shipped checkpoint + task with fairseq; point the data config at asset_dir."""
    from fairseq import checkpoint_utils

    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(asset_dir / "checkpoint.pt")], arg_overrides={"data": str(asset_dir)})
    # fairseq 0.12 resolves manifest audio paths against `audio_root` (default: CWD)
    task.data_cfg.config["audio_root"] = str(asset_dir)
    model = models[0].float().eval()
    return model, saved_cfg, task


def decode_split(asset_dir: Path, split: str, beam: int = 5, max_tokens: int = 20000):
    import torch
    import jiwer

    model, _, task = load_shipped(asset_dir)
    task.load_dataset(split)
    ds = task.dataset(split)
    gen = task.build_generator([model], argparse.Namespace(beam=beam, max_len_a=0, max_len_b=200))
    itr = task.get_batch_iterator(dataset=ds, max_tokens=max_tokens, max_positions=(6000, 1024),
                                  ignore_invalid_inputs=False, required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    bpe = task.build_bpe(None)
    hyps, refs, ids = {}, {}, {}
    with torch.no_grad():
        for sample in itr:
            out = task.inference_step(gen, [model], sample)
            for i, sid in enumerate(sample["id"].tolist()):
                h = task.tgt_dict.string(out[i][0]["tokens"].int().cpu(), extra_symbols_to_ignore={task.tgt_dict.eos()})
                hyps[sid] = bpe.decode(h).strip()
                refs[sid] = ds.tgt_texts[sid]
    if len(hyps) != len(ds):
        raise RuntimeError(f"decoded {len(hyps)} of {len(ds)} utterances in {split}")
    order = sorted(hyps)
    H = [hyps[i] for i in order]
    R = [refs[i] for i in order]
    wer = jiwer.wer(R, H) * 100
    return wer, list(zip([ds.ids[i] for i in order], R, H))


def fairseq_generate_wer(asset_dir: Path, split: str, beam: int = 5) -> float:
    """Run the fairseq-generate CLI from an unrelated working directory and score with jiwer.

    fairseq 0.12 resolves manifest audio against config.yaml's ``audio_root`` relative to the
    current directory, so a copy of config.yaml with an absolute ``audio_root`` (and absolute
    tokenizer/vocab paths) is passed through ``--config-yaml``.
    """
    import jiwer
    import yaml

    asset_dir = asset_dir.resolve()
    gen = shutil.which("fairseq-generate", path=str(VENV_BIN)) or "fairseq-generate"
    with tempfile.TemporaryDirectory() as tmp:
        with open(asset_dir / "config.yaml") as f:
            cfg = yaml.safe_load(f)
        cfg["audio_root"] = str(asset_dir)
        cfg["bpe_tokenizer"]["sentencepiece_model"] = str(asset_dir / cfg["bpe_tokenizer"]["sentencepiece_model"])
        if "global_cmvn" in cfg:
            cfg["global_cmvn"]["stats_npz_path"] = str(asset_dir / cfg["global_cmvn"]["stats_npz_path"])
        with open(Path(tmp) / "config.yaml", "w") as f:
            yaml.safe_dump(cfg, f)
        cmd = [gen, str(asset_dir), "--config-yaml", str(Path(tmp) / "config.yaml"), "--gen-subset", split,
               "--task", "speech_to_text", "--path", str(asset_dir / "checkpoint.pt"), "--beam", str(beam),
               "--max-tokens", "20000", "--scoring", "sacrebleu", "--cpu", "--results-path", tmp,
               "--required-batch-size-multiple", "1"]  # see train_cmd: otherwise utterances are dropped
        p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        txt = (Path(tmp) / f"generate-{split}.txt").read_text()
    H, R = {}, {}
    for line in txt.splitlines():
        if line.startswith("D-"):
            k, _, h = line.split("\t", 2)
            H[int(k[2:])] = h.strip()
        elif line.startswith("T-"):
            k, r = line.split("\t", 1)
            R[int(k[2:])] = r.strip()
    keys = sorted(R)
    n_expected = sum(1 for _ in open(asset_dir / f"{split}.tsv")) - 1
    if len(keys) != n_expected:
        raise RuntimeError(f"fairseq-generate scored {len(keys)} of {n_expected} utterances in {split}")
    return jiwer.wer([R[k] for k in keys], [H.get(k, "") for k in keys]) * 100


def do_evaluate(a: argparse.Namespace) -> None:
    asset = Path(a.asset_dir)
    metrics: Dict = {}
    fin = Path(a.work) / "finalize.json" if a.work else None
    if fin and fin.exists():
        metrics.update(json.loads(fin.read_text()))
    metrics["decoder"] = {"beam": a.beam, "wer": "jiwer on sentencepiece-detokenized words", "max_len_b": 200}
    for split in SHIPPED_SPLITS:
        t0 = time.time()
        wer, rows = decode_split(asset, split, beam=a.beam)
        by_spk: Dict[str, List] = {}
        import csv

        with open(asset / f"{split}.tsv") as f:
            spk = {r["id"]: r["speaker"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
        import jiwer

        for uid, r, h in rows:
            by_spk.setdefault(spk[uid], []).append((r, h))
        metrics[split] = {
            "wer": round(wer, 3), "utterances": len(rows), "words": sum(len(r.split()) for _, r, _ in rows),
            "decode_seconds": round(time.time() - t0, 1),
            "wer_by_speaker": {s: round(jiwer.wer([r for r, _ in v], [h for _, h in v]) * 100, 2) for s, v in sorted(by_spk.items())}
            if split == "test_heldout" else None,
        }
        if metrics[split]["wer_by_speaker"] is None:
            del metrics[split]["wer_by_speaker"]
        print(split, json.dumps(metrics[split]), flush=True)
        errs = [(u, r, h) for u, r, h in rows if r != h][:8]
        for u, r, h in errs:
            print(f"  {u}\n    REF {r}\n    HYP {h}")
        if a.fairseq_generate:
            w2 = fairseq_generate_wer(asset, split, beam=a.beam)
            metrics[split]["fairseq_generate_wer"] = round(w2, 3)
            print(f"  fairseq-generate (other cwd) WER {w2:.3f}", flush=True)
    with open(asset / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
        f.write("\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["train", "finalize", "evaluate", "all"])
    ap.add_argument("--data", type=Path, help="data directory from tools/make_corpus.py")
    ap.add_argument("--work", type=Path, help="run directory (checkpoints, logs)")
    ap.add_argument("--asset-dir", type=Path, default=REPO / "qswap" / "assets" / "s2t_demo")
    ap.add_argument("--shipped-from", type=Path, default=None,
                    help="take the shipped test/test_heldout manifests+features from this data directory "
                         "(default: --data); must hold the same utterances as --data's test splits")
    ap.add_argument("--hours", type=float, default=0.6, help="fairseq --stop-time-hours")
    ap.add_argument("--restore-file", type=Path, default=None,
                    help="continue training from this fairseq checkpoint (e.g. WORK/checkpoints/checkpoint12.pt)")
    ap.add_argument("--save-interval-updates", type=int, default=0,
                    help="also save checkpoint_E_U.pt every N updates (keeps the last 3)")
    ap.add_argument("--checkpoints", nargs="+", default=None,
                    help="finalize: average exactly these checkpoint files instead of the last --average epochs")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=24000)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--ctc-weight", type=float, default=0.3,
                    help="auxiliary CTC loss on the encoder (fairseq's label_smoothed_cross_entropy_with_ctc); "
                         "it makes the encoder learn the audio-text alignment early. The CTC head is a training "
                         "aid only: finalize drops it. 0: plain label-smoothed cross entropy")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--average", type=int, default=5, help="average the last N epoch checkpoints (0: best)")
    ap.add_argument("--fp16", action="store_true", help="store the shipped weights as float16")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--fairseq-generate", action="store_true", help="also check with the fairseq-generate CLI")
    for k, v in ARCH_DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    a = ap.parse_args(argv)
    if a.step in ("train", "all"):
        do_train(a)
    if a.step in ("finalize", "all"):
        do_finalize(a)
    if a.step in ("evaluate", "all"):
        do_evaluate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
