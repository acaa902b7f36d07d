"""Running fairseq's real entry points from tests, with a tiny model's arguments."""
import os
import subprocess
import sys
from pathlib import Path


BIN = Path(sys.executable).parent
SMALL = ["--arch", "s2t_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
         "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
         "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
         "--conv-channels", "32", "--share-decoder-input-output-embed"]
TRAIN = ["--train-subset", "train", "--valid-subset", "dev", "--max-tokens", "4000", "--optimizer", "adam",
         "--lr", "1e-3", "--lr-scheduler", "fixed", "--criterion", "label_smoothed_cross_entropy",
         "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple", "--seed", "1",
         "--no-progress-bar", "--required-batch-size-multiple", "1"]


def run_tool(tool, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def convert_small(checkpoint, data, out, recipe="w8a8", batches=2):
    """``qswap convert CHECKPOINT --recipe RECIPE`` of a tiny model, calibrated on ``batches`` batches
    of at most 4 utterances; returns ``out``."""
    from qswap.cli import main

    assert main(["convert", str(checkpoint), "--recipe", str(recipe), "--data", str(data), "--calib-batches",
                 str(batches), "--max-sentences", "4", "-o", str(out)]) == 0
    return out
