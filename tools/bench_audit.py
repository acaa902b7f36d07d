#!/usr/bin/env python3
"""Time ``qswap.audit`` against a float forward on fairseq's s2t_transformer_s (~30M parameters).

    .venv/bin/python tools/bench_audit.py                  # print the table
    .venv/bin/python tools/bench_audit.py --write-docs     # also update docs/honesty.md

Times (median of ``--repeats``, timed round-robin after one warm-up of each):

* float forward / float paths / float audit: the float model's teacher-forced batch forward
  (``model(**net_input)``); every path the audit runs (batch forward, get_normalized_probs,
  incremental decoding), unobserved; ``qswap.audit`` of the float model;
* the same three on the model converted with w8a8 (``simulate: float``, the configuration
  ``tools/bench.py`` holds the targets to) and calibrated (fake quantization costs too, and the
  audit checks every quantizer output against its grid);
* w8a8 audit with the value-level check on (``qswap.audit(..., values=True)``), which is off by
  default and not part of the 3x target.

The first audit in a process pays one-time set-up (imports, the op tables); that cost is
reported apart.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench import interleaved_medians  # noqa: E402  (one timing helper for both benchmarks)
from qswap.errors import OutputError  # noqa: E402
from tools.tool_cli import exit_status, positive_int  # noqa: E402  (tools/tool_cli.py)
from qswap.io.atomic import atomic_write_text  # noqa: E402

DOC = REPO / "docs" / "honesty.md"
START, END = "<!-- bench_audit:start -->", "<!-- bench_audit:end -->"


def _no_grad(fn):
    import torch

    def run():
        with torch.no_grad():
            fn()
    return run


def measure(args: argparse.Namespace) -> dict:
    import torch

    import qswap
    from qswap.honesty.paths import run_paths
    from qswap.models import build_s2t_transformer, s2t_net_input
    from qswap.recipe import with_simulate

    torch.set_num_threads(args.threads)
    model = build_s2t_transformer(arch=args.arch)
    params = sum(p.numel() for p in model.parameters())
    net_input = s2t_net_input(batch=args.batch, frames=args.frames, num_tokens=args.tokens,
                              vocab=len(model.decoder.dictionary))
    # simulate: float, as tools/bench.py holds the targets to: the integer insides (the default)
    # are a slower model, not a slower audit
    qmodel = qswap.convert(model, with_simulate("w8a8", "float"))
    qswap.calibrate(qmodel, [net_input], forward=run_paths)
    t0 = time.perf_counter()
    report = qswap.audit(qmodel, net_input, decode_steps=args.decode_steps)
    first = time.perf_counter() - t0
    audit_args = dict(decode_steps=args.decode_steps)
    t = interleaved_medians({
        "float_forward": _no_grad(lambda: model(**net_input)),
        "float_paths": _no_grad(lambda: run_paths(model, net_input, **audit_args)),
        "float_audit": lambda: qswap.audit(model, net_input, **audit_args),
        "w8a8_forward": _no_grad(lambda: qmodel(**net_input)),
        "w8a8_paths": _no_grad(lambda: run_paths(qmodel, net_input, **audit_args)),
        "w8a8_audit": lambda: qswap.audit(qmodel, net_input, **audit_args),
        "w8a8_audit_values": lambda: qswap.audit(qmodel, net_input, values=True, **audit_args),
    }, args.repeats)
    return {"arch": args.arch, "parameters": params, "batch": args.batch, "frames": args.frames,
            "tokens": args.tokens, "decode_steps": args.decode_steps, "threads": args.threads,
            "repeats": args.repeats, "verdict": report.verdict, "aten_ops": report.totals["ops"],
            "first_audit_s": first, "torch": torch.__version__, **{f"{k}_s": v for k, v in t.items()}}


def markdown(r: dict) -> str:
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    x = lambda a, b: f"{r[a + '_s'] / r[b + '_s']:.1f}x"  # noqa: E731
    return "\n".join([
        f"`.venv/bin/python tools/bench_audit.py --write-docs`: `{r['arch']}` "
        f"({r['parameters'] / 1e6:.1f}M parameters), batch {r['batch']} x {r['frames']} fbank "
        f"frames, {r['tokens']} target tokens, {r['decode_steps']} incremental steps, "
        f"{r['threads']} intra-op thread(s), torch {r['torch']}, median of {r['repeats']}:", "",
        "| model | forward (batch) | every audited path, unobserved | audit | audit / forward | "
        "audit / paths |", "|---|---|---|---|---|---|",
        f"| float | {ms(r['float_forward_s'])} | {ms(r['float_paths_s'])} | {ms(r['float_audit_s'])} | "
        f"{x('float_audit', 'float_forward')} | {x('float_audit', 'float_paths')} |",
        f"| w8a8, `simulate: float` ({r['aten_ops']} aten ops, {r['verdict']}) | {ms(r['w8a8_forward_s'])} | "
        f"{ms(r['w8a8_paths_s'])} | {ms(r['w8a8_audit_s'])} | {x('w8a8_audit', 'w8a8_forward')} | "
        f"{x('w8a8_audit', 'w8a8_paths')} |",
        f"| w8a8, value-level check on (`values=True`) | | | {ms(r['w8a8_audit_values_s'])} | "
        f"{x('w8a8_audit_values', 'w8a8_forward')} | {x('w8a8_audit_values', 'w8a8_paths')} |", "",
        f"w8a8 audit / float forward: **{x('w8a8_audit', 'float_forward')}** (the target: at most "
        f"3x; with the value-level check on: {x('w8a8_audit_values', 'float_forward')}). The first audit "
        f"in a process took {ms(r['first_audit_s'])} (one-time set-up).", ""])


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise OutputError(f"{DOC} has no {START} ... {END} section to update; put those two marker lines "
                          f"back around the benchmark section (or run without --write-docs)")
    atomic_write_text(DOC, pattern.sub(lambda _: f"{START}\n{text}{END}", doc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="s2t_transformer_s")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=400, help="fbank frames (4 s of audio)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=3)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (on a shared machine, threads beyond the free cores slow "
                         "every op down unevenly)")
    ap.add_argument("--write-docs", action="store_true", help=f"update the benchmark section of {DOC.name}")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    result = measure(args)
    text = markdown(result)
    print(text)

    def write() -> int:
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
        if args.write_docs:
            write_docs(text)
        return 0

    return exit_status(write)  # a QswapError: one line, no traceback, exit 2


if __name__ == "__main__":
    sys.exit(main())
