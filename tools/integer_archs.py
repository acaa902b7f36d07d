#!/usr/bin/env python3
"""Measure the integer forms of the post-norm S2T encoder, the S2T conformer and wav2vec 2.0 CTC
(issue 16) against their fake-quant counterparts, and write the tables into docs/integer.md
between the ``<!-- archs:begin -->`` and ``<!-- archs:end -->`` markers. Small untrained fairseq
models (fairseq's own classes and configs, small widths), fixed seeds, CPU, one thread.

    python tools/integer_archs.py            # rewrite the tables
    python tools/integer_archs.py --print    # print them only
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- archs:begin -->", "<!-- archs:end -->"
RECIPES = ("w8a8", "w8a8_per_channel", "w4a8")


def _op_rows() -> list:
    """(op, recipe, integer codes, fake-quant codes) of the new single-op forms."""
    from integer_agreement import _chain
    from qswap.quant.fake_quantize import FakeQuantize
    from qswap.quant.integer import ConstantAddParams, Grid, add_constant
    from qswap.quant.spec import QuantSpec
    torch.manual_seed(0)
    rows = []
    x = torch.randn(4, 16, 50) * torch.linspace(0.5, 2, 16).view(1, -1, 1)
    for groups in (16, 4):
        norm = nn.GroupNorm(groups, 16)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.2, 0.2)
        for recipe in ("w8a8", "w8a8_per_channel"):
            rows.append((f"QGroupNorm({groups}, 16) over 50 steps", recipe, *_chain(norm, x, recipe, 50)))
    bn = nn.BatchNorm1d(16)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 3), bn.weight.uniform_(0.5, 1.5)
    for recipe in RECIPES:
        rows.append(("QBatchNorm1d 16 (folded, depthwise 1x1)", recipe, *_chain(bn, x, recipe, 50)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm, as fairseq uses it
        conv = nn.utils.weight_norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), name="weight", dim=2)
    for recipe in RECIPES:
        rows.append(("QConv1d k5 groups 4, weight-normed", recipe, *_chain(conv, x, recipe, 50)))
    a, u = torch.randn(400, 16) * 2, torch.randn(16) * 0.7

    def frozen(t):
        fq = FakeQuantize(QuantSpec(bits=8, symmetric=False), kind="activation")
        fq(t)
        fq.freeze()
        return fq
    qa = frozen(a)
    qo = frozen(qa(a) + u)
    with torch.no_grad():
        reference = Grid.of(qo).quantize(qo(qa(a) + u))
    codes = add_constant(Grid.of(qa).quantize(a), ConstantAddParams.build(Grid.of(qa), u, Grid.of(qo)))
    rows.append(("constant add (rel-pos bias)", "int8 affine", codes, reference))
    return rows


def _calibrated(model, net_input, recipe):
    import qswap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qswap.convert(model, recipe)
        qswap.calibrate(q, [net_input])
    return q


def _s2t(name: str, build, recipe: str) -> tuple:
    """(model, recipe, positions, best token equal %, largest logit difference in steps, '')."""
    import qswap
    from qswap.models import s2t_net_input
    from qswap.quant.integer import Grid
    net_input = s2t_net_input()
    q = _calibrated(build(), net_input, recipe)
    with torch.no_grad():
        reference = q(**net_input)[0]
    logits = qswap.integerize(q)(**net_input)[0]  # (logits, extra), as fairseq models return
    equal = 100 * float((logits.argmax(-1) == reference.argmax(-1)).double().mean())
    steps = float((logits - reference).abs().max()) / Grid.of(q.logits_quant).scale
    return name, recipe, reference.shape[0] * reference.shape[1], equal, steps, ""


def _ctc(name: str, overrides: dict, recipe: str, seeds=(0, 1, 2)) -> tuple:
    """As ``_s2t`` over ``seeds`` (a model and input each), frames; plus greedy CTC transcripts equal."""
    import qswap
    from qswap.integration.decode import _ctc_greedy
    from qswap.models import build_wav2vec2_ctc, make_dictionary, wav2vec2_net_input
    from qswap.quant.integer import Grid
    frames, equal, steps, same, total = 0, 0, 0.0, 0, 0
    for seed in seeds:
        net_input = wav2vec2_net_input(seed=seed)
        q = _calibrated(build_wav2vec2_ctc(seed=seed, **overrides), net_input, recipe)
        imodel = qswap.integerize(q)
        with torch.no_grad():
            reference = q(**net_input)
            out = imodel(**net_input)
            sample = {"net_input": net_input}
            hyps = zip(_ctc_greedy(q, sample, make_dictionary()), _ctc_greedy(imodel, sample, make_dictionary()))
        valid = ~reference["padding_mask"].T
        logits, ref = out["encoder_out"][valid], reference["encoder_out"][valid]
        frames += logits.shape[0]
        equal += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        steps = max(steps, float((logits - ref).abs().max()) / Grid.of(q.logits_quant).scale)
        for a, b in hyps:
            same, total = same + int(torch.equal(a, b)), total + 1
    return name, recipe, frames, 100 * equal / frames, steps, f"{same} of {total}"


def model_rows() -> list:
    from qswap.models import build_s2t_conformer, build_s2t_transformer
    rows = []
    for recipe in RECIPES:
        rows.append(_s2t("s2t_transformer, post-norm encoder (2+2 layers, dim 64)",
                         lambda: build_s2t_transformer(encoder_normalize_before=False), recipe))
    for label, over in (("rel_pos", {}), ("rope", {"pos_enc_type": "rope"}), ("ESPnet abs", {"pos_enc_type": "abs"}),
                        ("fairseq attention, abs", {"pos_enc_type": "abs", "attn_type": None})):
        for recipe in RECIPES:
            rows.append(_s2t(f"s2t_conformer, {label} (2+2 layers, dim 64)",
                             lambda over=over: build_s2t_conformer(**over), recipe))
    for label, over in (("GroupNorm extractor, post-norm", {}),
                        ("LayerNorm extractor, pre-norm", {"extractor_mode": "layer_norm", "layer_norm_first": True,
                                                           "conv_bias": True})):
        for recipe in RECIPES:
            rows.append(_ctc(f"wav2vec 2.0 CTC, {label} (3 convs, 2 layers, dim 32; seeds 0-2)", over, recipe))
    return rows


def render(ops: list, models: list) -> str:
    from integer_agreement import op_lines
    lines = [BEGIN, "<!-- generated by tools/integer_archs.py; do not edit by hand -->", "", *op_lines(ops)]
    lines += ["", "Whole models (untrained), teacher-forced S2T logits / CTC frames:", "",
              "| model | recipe | positions or frames | best label equal % | largest logit difference "
              "(logits grid steps) | greedy CTC transcripts equal |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {r} | {n} | {equal:.2f} | {steps:.1f} | {same or '-'} |" for m, r, n, equal, steps, same in models]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "tools"))
    from integer_agreement import run_tool
    return run_tool(__doc__, lambda: render(_op_rows(), model_rows()), BEGIN, END, argv)


if __name__ == "__main__":
    sys.exit(main())
