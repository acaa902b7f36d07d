"""Run the fairseq walkthrough on the shipped model and write docs/fairseq.md from its output.

    .venv/bin/python tools/fairseq_walkthrough.py [--out docs/fairseq.md] [--work DIR]

Every output block in docs/fairseq.md is the tail of the command above it, as run here:
qswap convert (PTQ), fairseq-generate with the plugin and --qswap-audit, fairseq-train QAT
fine-tuning from the float checkpoint with the plugin, fairseq-generate on the QAT checkpoint,
and qswap compare.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import qswap
from qswap.errors import CommandError
from qswap.io.atomic import atomic_write_text
from qswap.io.safe_load import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qat_gradients  # noqa: E402  (tools/qat_gradients.py)
from tool_cli import exit_status  # noqa: E402  (tools/tool_cli.py)

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"
BIN = Path(sys.executable).parent
ARCH_KEYS = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
             "decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
             "conv_channels", "conv_kernel_sizes")


def arch_args(checkpoint: Path) -> list[str]:
    """The fairseq-train architecture flags that rebuild the shipped model."""
    cfg = load_checkpoint(checkpoint)["cfg"]["model"]
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    args = ["--arch", get("arch") or "s2t_transformer", "--share-decoder-input-output-embed"]
    for key in ARCH_KEYS:
        if get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(get(key))]
    return args


def run(cmd: list[str], keep: "re.Pattern[str] | None", tail: int, cwd: Path, threads: int = 1) -> tuple[str, str]:
    shown = " ".join(c if " " not in c else repr(c) for c in cmd).replace(str(BIN) + "/", "")
    shown = shown.replace(str(ASSET), "$ASSET").replace(qswap.plugin_dir(), "$(qswap-plugin-dir)")
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "140", "OMP_NUM_THREADS": str(threads)})
    lines = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0:
        raise CommandError(f"{shown} failed with exit code {proc.returncode}:\n" + "\n".join(lines[-40:]))
    if keep is not None:
        lines = [ln for ln in lines if keep.search(ln)]
    return shown, "\n".join(lines[-tail:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/fairseq.md")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--qat-updates", type=int, default=20)
    # one intra-op thread per command: with torch's default (one per core) on a machine other
    # processes load, every op waits for a descheduled sibling thread, and fairseq's printed times
    # grew up to 10x for one command and not the next (issue 19: the "QAT decodes 10x slower")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each command (default 1)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qswap_walk_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, plugin = ASSET / "checkpoint.pt", qswap.plugin_dir()
    qswap_bin, train, gen = str(BIN / "qswap"), str(BIN / "fairseq-train"), str(BIN / "fairseq-generate")
    # no --post-process: the speech_to_text task already detokenizes with the data config's
    # sentencepiece model; post-processing again garbles the words (fairseq's WER then read 97%)
    gen_common = ["--gen-subset", "test", "--beam", "5", "--max-tokens", "50000", "--cpu",
                  "--scoring", "wer", "--required-batch-size-multiple", "1"]
    fairseq_line = re.compile(r"qswap audit|Translated|WER")
    table_line = re.compile(r"[┃│┏┡└]|utterances of")
    steps = [
        ("Post-training quantization: convert + calibrate, written atomically",
         [qswap_bin, "convert", str(ckpt), "--recipe", "w8a8", "--data", str(ASSET), "--calib-subset", "train_calib",
          "--calib-batches", "4", "-o", str(work / "w8a8.pt")], re.compile(r"quantized|wrote|calibrated|note"), 6),
        ("Decode the PTQ checkpoint with fairseq-generate and the plugin; --qswap-audit prints the verdict",
         [gen, str(ASSET), "--user-dir", plugin, "--task", "speech_to_text_qswap", "--path", str(work / "w8a8.pt"),
          "--qswap-audit", *gen_common], fairseq_line, 8),
        ("Quantization-aware fine-tuning (QAT) with fairseq-train: w4a8; the first 2 updates calibrate "
         "(zero gradient), then the grids are frozen and the weights train",
         [train, str(ASSET), "--user-dir", plugin, "--task", "speech_to_text_qswap", "--qswap-recipe", "w4a8",
          "--qswap-calib-batches", "2", "--finetune-from-model", str(ckpt), *arch_args(ckpt),
          "--train-subset", "train_calib", "--valid-subset", "train_calib", "--max-update", str(args.qat_updates),
          "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam",
          "--lr", "1e-4", "--lr-scheduler", "fixed", "--clip-norm", "10", "--max-tokens", "20000", "--cpu", "--num-workers", "0",
          "--save-dir", str(work / "qat"), "--no-epoch-checkpoints", "--log-format", "simple",
          "--log-interval", "5", "--required-batch-size-multiple", "1", "--seed", "1"],
         re.compile(r"qswap|train_inner|done training|\| valid \||\| train \|"), 10),
        ("Decode the QAT checkpoint: fairseq rebuilds the same quantized model from the checkpoint",
         [gen, str(ASSET), "--user-dir", plugin, "--task", "speech_to_text_qswap",
          "--path", str(work / "qat" / "checkpoint_last.pt"), "--qswap-audit", *gen_common], fairseq_line, 8),
        ("WER of the QAT checkpoint (qswap eval: fairseq's sequence generator, jiwer)",
         [qswap_bin, "eval", str(work / "qat" / "checkpoint_last.pt"), "--data", str(ASSET), "--subset", "test"],
         table_line, 3),
        ("The comparison table",
         [qswap_bin, "compare", str(ckpt), "--data", str(ASSET), "--calib-subset", "train_calib", "--calib-batches", "4",
          "--recipes", "fp32", "w8a8", "w4a8", "w8_weight_only"], table_line, 14),
    ]
    blocks = []
    for title, cmd, keep, tail in steps:
        shown, out = run(cmd, keep, tail, work, args.threads)
        blocks.append(f"### {title}\n\n```\n$ {shown}\n```\n\n```\n{out}\n```\n")
    grads = qat_gradients.measure(ckpt, ["w8a8", "w4a8", "w4a4"])
    text = (HEADER.format(date=datetime.date.today().isoformat(), threads=args.threads, machine=f"{platform.machine()}, "
                          f"{os.cpu_count()} cores, Python {platform.python_version()}") + "\n".join(blocks)
            + FOOTER.replace("{grad_table}", qat_gradients.table(grads)))
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


HEADER = """# qswap with fairseq's own commands

Generated by `.venv/bin/python tools/fairseq_walkthrough.py` on {date} ({machine}; every
command with `OMP_NUM_THREADS={threads}`) with the shipped model (`$ASSET` = `qswap/assets/s2t_demo`, see its README). Every output block is the
tail (filtered to the relevant lines) of the command above it; the same flow runs in the tests
on a tiny model (`tests/integration`).

The plugin folder is `$(qswap-plugin-dir)` (`qswap.plugin_dir()`); it registers the tasks
`speech_to_text_qswap` and `audio_finetuning_qswap` with these options:

| option | meaning |
|---|---|
| `--qswap-recipe R` | convert the model right after fairseq builds it (a shipped name or a YAML path); a checkpoint stores the recipe itself (a later edit or removal of the YAML changes nothing); a checkpoint trained or converted with another recipe is refused (fine-tuning from it, resuming it, decoding it: the checkpoint fairseq-train loads, found as fairseq finds it, with `--checkpoint-suffix`, `--restore-file`, `--continue-once`, `--finetune-from-model`), and so is one that holds a recipe when no `--qswap-recipe` is given (the error names the recipe to pass); a recipe whose transforms need data (smoothquant) starts only from a checkpoint `qswap convert` wrote with it (or the run's own checkpoint it resumes), and decodes no float checkpoint |
| `--qswap-calib-batches N` | calibrate the activation quantizers on the training batches of the first N updates (with `--update-freq K`, K batches each; zero gradients), then freeze them (ranges reduced across DDP workers); a run resumed during calibration calibrates the updates left (resumed with a smaller N, past it, it freezes the grids on what they observed, with a warning), and validation never calibrates; a recipe with learned activation scales (LSQ) needs N > 0 unless it starts from calibrated grids (a checkpoint `qswap convert` calibrated, a run resumed after calibration): else a TrainingError before the first update |
| `--qswap-audit` | before decoding, audit a batch of the generation subset and print the verdict |
| `--qswap-strict` | fail if a recipe rule matches no module or the recipe leaves a module float without a skip rule |

fairseq's own `--help` lists only its first-stage options (not any legacy task's options,
`speech_to_text`'s `--config-yaml` included); the qswap options carry help texts in the parser
fairseq builds for the task (tested). Under torch >= 2.6 fairseq's own `torch.load` refuses
fairseq checkpoints (`argparse.Namespace`); the plugin adds qswap's allowlist of exactly the
classes fairseq checkpoints contain, still with `weights_only` loading.

A quantized checkpoint (`qswap convert`'s, or a QAT run's) needs the plugin. Plain fairseq (no
`--user-dir $(qswap-plugin-dir) --task speech_to_text_qswap`, or `audio_finetuning_qswap`) builds the
float model and fails on it with `Unexpected key(s) in state_dict: "logits_quant.scale", ...` (the
quantizers' state), or first, under torch >= 2.6, with `WeightsUnpickler error: Unsupported global:
GLOBAL argparse.Namespace` (any fairseq-train checkpoint, float ones too); pass the plugin's `--user-dir`
and task (the recipe comes from the checkpoint), or decode it with `qswap eval`.

"""

FOOTER = """
## QAT gradients

Watch `gnorm` and `clip` above: the quantized model's gradient norm stays of the float model's
order and `--clip-norm` rarely fires. Two things in qswap make that so on a 6-layer pre-norm
encoder. Quantization makes some frames exactly constant vectors (a silent or SpecAugment-masked
frame quantizes to one code, and the positional embedding added to it is smaller than the grid
step of the sum): LayerNorm's Jacobian on such a row is 1/sqrt(eps), about 316 per norm, and
chained through the layers it blows the gradient up. `tools/qat_gradients.py` measures it on the
shipped model, test features with frames 40-59 zeroed (a time mask), gradient norm of the
loss in eval mode, with qswap's bounded LayerNorm gradient and with LayerNorm's exact one:

{grad_table}

The previous shipped model (git 56e7060) blew up at 8 bits already: w8a8 2.5e14 exact against
106 bounded and 111 float (`tools/qat_gradients.py --checkpoint` on that commit's checkpoint).

Each quantized LayerNorm's forward value is the norm of its quantized input; its gradient is
that of the float input with the row variance floored at (0.1 x the batch's median row
deviation)^2, exact for ordinary rows, bounded for collapsed ones
(`qswap.nn.norm.layer_norm_bounded_grad`, `grad_std_floor` on each module; a test checks the
shipped model's QAT gradient stays within 3x of float's for w8a8 and 100x for w4a4, whose output is broken anyway). And the calibration updates
(`--qswap-calib-batches N`) observe in eval mode with their loss multiplied by 0, so their
gradient is zero. fairseq still runs its optimizer step on them, with weight decay 0 for those
steps: with a fresh Adam state (as after `--finetune-from-model`) no weight and no learned scale
moves before the grids are frozen (tested: bit-identical weights, with `--weight-decay` set too),
and the learning-rate schedule counts them as updates. After them, `--weight-decay` decays every
parameter fairseq's optimizer holds, learned activation scales (LSQ step sizes) among them.
Half precision is a TrainingError (`--fp16`, `--memory-efficient-fp16`, `--bf16` in
fairseq-train; `--fp16` in fairseq-generate and fairseq-validate): qswap's quantizers keep
float32 grids and biases (`--amp` works), and so is `--store-ema` in speech_to_text_qswap (fairseq's EMA averages every state entry,
the quantizers' zero points and frozen flags among them; audio_finetuning_qswap's options do not
show it to the plugin, and fairseq's EMA fails there at the first update).

## QAT with a teacher (distillation)

The plugin registers one criterion, `qswap_distill` (`qswap/integration/distill.py`): fairseq's
label-smoothed cross entropy mixed with the distance of the quantized model's output
distributions from a teacher's, usually the float model it was converted from:

```
$ fairseq-train DATA --user-dir $(qswap-plugin-dir) --task speech_to_text_qswap --qswap-recipe w4a8_lsq \\
    --finetune-from-model QCKPT --criterion qswap_distill --distill-teacher float.pt \\
    --distill-alpha 0.9 --distill-temperature 1 --label-smoothing 0.1 ...
```

loss = (1 - alpha) x label-smoothed cross entropy + alpha x tau^2 x KL(teacher || student), the
KL of the two softmax(logits / tau) distributions at every teacher-forced target position that is
not padding, summed as fairseq sums its losses. The teacher is loaded once per process with the
run's data directory (a teacher trained with a dictionary of another size, or a qswap checkpoint
recording another dictionary, does not load: a `CheckpointError` says so; a fairseq float checkpoint
records no dictionary, so one of the same size with other symbols is not caught; a quantized teacher
must be calibrated), runs in eval mode without gradients, and is not part of the
criterion's modules, so it is neither trained nor saved in the run's checkpoints (their saved
config names it: `fairseq-validate` on one loads the teacher again). The log shows both terms per
token (per sentence with `--sentence-avg`, as fairseq's `loss`), `ce_loss` and `kd_loss`, base 2
like `loss`, for training and validation; the validation `loss`, by which fairseq keeps
`checkpoint_best.pt`, is the mixture. `--distill-alpha 0` is fairseq's
`label_smoothed_cross_entropy` to the last bit; no `--distill-teacher`, an alpha outside [0, 1] or
a temperature outside [0.01, 100] is a `TrainingError`, a teacher file that is missing or unsafe
the `CheckpointError` of any checkpoint load (`tests/integration/test_distill.py`, with
fairseq-train). `tools/qat_train.py train --distill
TEACHER [--distill-alpha A --distill-temperature T]` runs the shipped model's QAT with it, and
`tools/qat_train.py average --save-dir RUN --last N` writes the mean of a run's last N interval
checkpoints (weights, biases and learned scales averaged; weight zero points and counters taken
from the last; every other integer state, activation zero points and frozen flags, must agree) as
`RUN/average_FIRST_LAST.pt`, which `qswap eval` reads like any of them; `qat_train.py dev` evaluates
it beside the interval checkpoints and `ship` stores whichever has the lowest dev WER.

## Distributed QAT

fairseq's own distributed training runs unchanged. On CPU, one process per worker with gloo,
for example two workers on one machine (run each line in its own shell, `R` = 0 and 1):

```
$ fairseq-train DATA --user-dir $(qswap-plugin-dir) --task speech_to_text_qswap --qswap-recipe w8a8 \
    --qswap-calib-batches 1 ... --distributed-world-size 2 --distributed-rank R \
    --distributed-init-method tcp://127.0.0.1:29500 --distributed-no-spawn \
    --distributed-backend gloo --ddp-backend legacy_ddp --device-id 0
```

Each worker calibrates on its own shard's batches; before freezing, the observer ranges are
reduced across workers (min of minima, max of maxima; a quantizer a worker saw no data for joins
with an empty range), so every worker freezes the same grid: the test runs exactly this and
checks that the frozen range equals what one process calibrating on both workers' batches gets.
Quantizer state lives in buffers and parameters, synchronized like any other. The plugin also
allows fairseq's `_TensorPlaceholder` in `torch.load`, which fairseq uses to send the loaded
checkpoint from rank 0 to the other workers.

## Sharded evaluation

`qswap eval CKPT --data DIR --subset test --num-shards K --shard-id I --json shard_I.json` decodes
one shard (the same sharding as fairseq-generate); `qswap eval --merge shard_*.json` adds the
error counts, giving exactly the single-process WER (tested with two shards).
"""

def cli() -> int:
    """``main``; a failed command is one ``error:`` message (with the end of its output), exit 2."""
    return exit_status(main)


if __name__ == "__main__":
    sys.exit(cli())
