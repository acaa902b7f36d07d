"""Encoder latency of one model three ways, measured in one run, interleaved: torch fp32 eager,
onnxruntime on qswap's exported w8a8 QDQ graph, onnxruntime on the float graph of the same
structure (each onnxruntime graph twice: its threads yielding their cores when idle, qswap's
``load_session`` default, and spinning, onnxruntime's own default; a pause before each timed
run); plus the graphs' sizes, the deploy audit's counts and the int8 graph's agreement with the
fake-quant model in output grid steps; and where each graph's time goes (onnxruntime's
profiler: the kernel time of each op type of the optimized graph, per run). Prints one JSON object.

    PYTHONPATH=$PWD python tools/onnx_bench.py --model shipped --threads 2

Calibration runs on random features (as tools/bench.py does): this measures speed, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import interleaved_medians, load_model  # noqa: E402
from tool_cli import positive_int  # noqa: E402

import qswap  # noqa: E402
from qswap.export.onnx import export_encoder, load_session, run_encoder  # noqa: E402
from qswap.export.onnx_audit import audit_onnx  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402

NO_QUANT = {"version": 1, "name": "no_quant", "defaults": {"weight": None, "activation": None}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("shipped", "s"), default="shipped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--repeats", type=positive_int, default=15)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--pause", type=float, default=PAUSE,
                    help="seconds of sleep before each timed run (not timed), so one system's spinning "
                         "threads are idle when the next one's run starts")
    args = ap.parse_args(argv)
    if args.pause < 0:
        ap.error(f"--pause takes seconds of at least 0; got {args.pause}")
    torch.set_num_threads(args.threads)
    model, tgt_dict, label, feat = load_model(args.model)
    vocab = len(tgt_dict)
    net = s2t_net_input(args.batch, args.frames, feat, 2, vocab, seed=1)
    calib = [s2t_net_input(args.batch, args.frames, feat, 2, vocab, seed=10 + i) for i in range(args.calib_batches)]
    qmodel = qswap.convert(model, "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, calib)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = export_encoder(qmodel, Path(tmp) / "encoder_w8a8.onnx", net)
        fp32_path = export_encoder(qswap.convert(model, NO_QUANT), Path(tmp) / "encoder_fp32.onnx", net,
                                   allow_float=True)
        int8, fp32 = (load_session(p, threads=args.threads, level="all") for p in (int8_path, fp32_path))
        # onnxruntime's default thread pool: its threads spin while they wait for the next node
        int8_spin, fp32_spin = (load_session(p, threads=args.threads, level="all", spinning=True)
                                for p in (int8_path, fp32_path))
        audit = audit_onnx(int8_path, level="all", site_prefix="encoder.")
        sizes = {"int8_bytes": int8_path.stat().st_size, "fp32_bytes": fp32_path.stat().st_size}
        profile = {name: op_times(path, net, args.threads, Path(tmp) / name, PROFILE_RUNS)
                   for name, path in (("ort_int8", int8_path), ("ort_fp32", fp32_path))}
    src, lengths = net["src_tokens"], net["src_lengths"]
    with torch.no_grad():
        ref = qmodel.encoder(src, lengths)["encoder_out"][0]
        out, _ = run_encoder(int8, src, lengths)
        step = qmodel.decoder.layers[0].encoder_attn.key_quant.scale
        steps = (out - ref).abs() / step
        t = interleaved_medians({
            "torch_fp32": lambda: model.encoder(src, lengths),
            "ort_int8": lambda: run_encoder(int8, src, lengths),
            "ort_fp32": lambda: run_encoder(fp32, src, lengths),
            "ort_int8_spinning": lambda: run_encoder(int8_spin, src, lengths),
            "ort_fp32_spinning": lambda: run_encoder(fp32_spin, src, lengths),
        }, args.repeats, pause=args.pause)
    return {
        "model": label, "threads": args.threads, "batch": args.batch, "frames": args.frames,
        "repeats": args.repeats, "pause_s": args.pause, "seconds": t,
        "ort_int8_vs_torch_fp32": t["torch_fp32"] / t["ort_int8"],
        "ort_int8_vs_ort_fp32": t["ort_fp32"] / t["ort_int8"],
        "ort_int8_spinning_vs_torch_fp32": t["torch_fp32"] / t["ort_int8_spinning"],
        "ort_int8_spinning_vs_ort_fp32_spinning": t["ort_fp32_spinning"] / t["ort_int8_spinning"],
        **sizes, "size_ratio": sizes["int8_bytes"] / sizes["fp32_bytes"],
        "output_steps_max": float(steps.max()), "output_steps_mean": float(steps.mean()),
        "deploy_audit": {"integer": audit.integer_count, "float": audit.float_count,
                         "float_ops": audit.float_ops, "integer_ops": audit.integer_ops},
        "profile": profile,
    }


PROFILE_RUNS = 5
PAUSE = 0.1  # seconds before each timed encoder run (not timed): the threads a run leaves spinning go idle


def op_times(path: Path, net: dict, threads: int, prefix: Path, runs: int) -> dict:
    """onnxruntime's profile of ``runs`` runs of the graph at ``path`` after a warm-up run (left
    out): per op type of the optimized graph, its nodes and their kernel milliseconds per run; the
    sum over all kernels and the wall time per run (the profiler's own cost included)."""
    session = load_session(path, threads=threads, level="all", profile_prefix=str(prefix))
    feeds = {"src_tokens": net["src_tokens"].numpy(), "src_lengths": net["src_lengths"].numpy()}
    session.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    wall = (time.perf_counter() - t0) / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first_timed = starts[1] if len(starts) > 1 else 0  # the warm-up run's nodes are left out
    ops: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            op = ops.setdefault(e["args"]["op_name"], {"nodes": set(), "ms": 0.0})
            op["nodes"].add(e["name"])
            op["ms"] += e["dur"] / 1e3 / runs
    ops = {k: {"nodes": len(v["nodes"]), "ms": v["ms"]} for k, v in sorted(ops.items(), key=lambda kv: -kv[1]["ms"])}
    return {"ops": ops, "kernel_ms": sum(v["ms"] for v in ops.values()), "wall_ms": wall * 1e3, "runs": runs}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
