#!/usr/bin/env python3
"""QAT gradient norms of the shipped model: float against each recipe, with qswap's bounded
LayerNorm gradient and (diagnostic) with LayerNorm's exact gradient.

    .venv/bin/python tools/qat_gradients.py [--recipes w8a8 w4a8 w4a4] [--checkpoint CKPT]

On real test features with frames 40-59 zeroed (a SpecAugment-style time mask), calibrated on
the two batches before, eval mode (no dropout) with autograd on, as in a QAT step. The
"exact LayerNorm" column sets every quantized LayerNorm's ``grad_std_floor`` to 0 (in a copy):
it shows what the bound prevents (rows that quantization made constant).
``tools/fairseq_walkthrough.py`` calls ``measure`` and puts the table into docs/fairseq.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qswap  # noqa: E402
from qswap.integration.data import batches, load_model_and_task  # noqa: E402
from qswap.nn.norm import QLayerNorm  # noqa: E402

ASSET = REPO / "qswap" / "assets" / "s2t_demo"


def grad_norm(model, net_input: dict, target: torch.Tensor, pad: int) -> float:
    model.eval().zero_grad()
    lprobs = model.get_normalized_probs(model(**net_input), log_probs=True)
    F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1), ignore_index=pad, reduction="sum").backward()
    return torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


def measure(checkpoint: Path, recipes: list[str]) -> dict:
    """{"float": norm, "recipes": {recipe: {"bounded": norm, "exact": norm}}}"""
    model, task = load_model_and_task(checkpoint, ASSET)
    model = model.float()
    samples = batches(task, "test", max_sentences=4)
    calib = [next(samples)["net_input"] for _ in range(2)]
    sample = next(samples)
    net_input = dict(sample["net_input"], src_tokens=sample["net_input"]["src_tokens"].clone())
    net_input["src_tokens"][:, 40:60] = 0.0
    pad = task.tgt_dict.pad()
    out = {"float": grad_norm(model, net_input, sample["target"], pad), "recipes": {}}
    for recipe in recipes:
        q = qswap.convert(model, recipe)
        qswap.calibrate(q, calib)
        bounded = grad_norm(q, net_input, sample["target"], pad)
        for m in q.modules():
            if isinstance(m, QLayerNorm):
                m.grad_std_floor = 0.0
        out["recipes"][recipe] = {"bounded": bounded, "exact": grad_norm(q, net_input, sample["target"], pad)}
    return out


def table(result: dict) -> str:
    lines = ["| recipe | bounded LayerNorm gradient (qswap) | exact LayerNorm gradient | float |",
             "|---|---|---|---|"]
    for recipe, r in result["recipes"].items():
        lines.append(f"| {recipe} | {r['bounded']:.3g} | {r['exact']:.3g} | {result['float']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8", "w4a4"])
    ap.add_argument("--checkpoint", type=Path, default=ASSET / "checkpoint.pt",
                    help="a checkpoint of the shipped model's data (default: the shipped one)")
    args = ap.parse_args(argv)
    print(table(measure(args.checkpoint, args.recipes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
