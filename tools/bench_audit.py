#!/usr/bin/env python3
"""Time ``qswap.audit`` against a float forward on fairseq's s2t_transformer_s (~30M parameters).

    .venv/bin/python tools/bench_audit.py                  # print the table
    .venv/bin/python tools/bench_audit.py --write-docs     # also update docs/honesty.md

Times (median of ``--repeats``, after one warm-up of each):

* float forward: the float model's teacher-forced batch forward, ``model(**net_input)``;
* w8a8 forward: the same on the converted, calibrated model (fake quantization costs too);
* w8a8 paths: every path the audit runs (batch forward, get_normalized_probs, incremental
  decoding), without the audit;
* audit: ``qswap.audit`` on the w8a8 model (the same paths, observed).

The first audit in a process also imports ``torch._dynamo`` (torch's dispatch-mode machinery
loads it lazily); that one-time cost is reported apart.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "honesty.md"
START, END = "<!-- bench_audit:start -->", "<!-- bench_audit:end -->"


def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed round-robin so load changes hit all alike."""
    times: dict = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _no_grad(fn):
    import torch

    def run():
        with torch.no_grad():
            fn()
    return run


def measure(args: argparse.Namespace) -> dict:
    import torch

    import qswap
    from qswap.audit.paths import run_paths
    from qswap.models import build_s2t_transformer, s2t_net_input

    torch.set_num_threads(args.threads)
    model = build_s2t_transformer(arch=args.arch)
    params = sum(p.numel() for p in model.parameters())
    net_input = s2t_net_input(batch=args.batch, frames=args.frames, num_tokens=args.tokens,
                              vocab=len(model.decoder.dictionary))
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, [net_input], forward=run_paths)
    t0 = time.perf_counter()
    report = qswap.audit(qmodel, net_input, decode_steps=args.decode_steps)
    first = time.perf_counter() - t0
    t = _interleaved_medians({
        "float": _no_grad(lambda: model(**net_input)),
        "w8a8": _no_grad(lambda: qmodel(**net_input)),
        "paths": _no_grad(lambda: run_paths(qmodel, net_input, decode_steps=args.decode_steps)),
        "audit": lambda: qswap.audit(qmodel, net_input, decode_steps=args.decode_steps),
    }, args.repeats)
    float_fwd, quant_fwd, quant_paths, audit = t["float"], t["w8a8"], t["paths"], t["audit"]
    return {"arch": args.arch, "parameters": params, "batch": args.batch, "frames": args.frames,
            "tokens": args.tokens, "decode_steps": args.decode_steps, "threads": args.threads,
            "verdict": report.verdict, "aten_ops": report.totals["ops"],
            "float_forward_s": float_fwd, "w8a8_forward_s": quant_fwd, "w8a8_paths_s": quant_paths,
            "audit_s": audit, "first_audit_s": first,
            "audit_over_float_forward": audit / float_fwd, "audit_over_w8a8_paths": audit / quant_paths,
            "torch": torch.__version__}


def markdown(r: dict) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    return "\n".join([
        f"`.venv/bin/python tools/bench_audit.py --write-docs` (`{r['arch']}`, "
        f"{r['parameters'] / 1e6:.1f}M parameters; batch {r['batch']} x {r['frames']} fbank frames, "
        f"{r['tokens']} target tokens, {r['decode_steps']} incremental steps; {r['threads']} CPU "
        f"thread(s), torch {r['torch']}; median of repeats):", "",
        "| measured | time | audit / this |", "|---|---|---|",
        f"| float forward (batch, teacher-forced) | {ms(r['float_forward_s'])} | "
        f"**{r['audit_over_float_forward']:.2f}x** |",
        f"| w8a8 forward (batch) | {ms(r['w8a8_forward_s'])} | "
        f"{r['audit_s'] / r['w8a8_forward_s']:.2f}x |",
        f"| w8a8, every audited path, unobserved | {ms(r['w8a8_paths_s'])} | "
        f"{r['audit_over_w8a8_paths']:.2f}x |",
        f"| **audit** (w8a8, {r['aten_ops']} aten ops, verdict: {r['verdict']}) | "
        f"{ms(r['audit_s'])} | 1x |",
        f"| first audit in a process (imports torch._dynamo once) | {ms(r['first_audit_s'])} | |",
        ""])


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOC} has no {START} ... {END} section to update")
    DOC.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", doc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="s2t_transformer_s")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=400, help="fbank frames (4 s of audio)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true", help=f"update the benchmark section of {DOC.name}")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    result = measure(args)
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
