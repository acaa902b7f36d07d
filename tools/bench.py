#!/usr/bin/env python3
"""Fake-quantization speed against float on this machine (GitHub issue 9), as ratios measured
in one run, and a table of the targets they are held to.

    .venv/bin/python tools/bench.py            # full run: prints the table, writes docs/benchmarks.md
    .venv/bin/python tools/bench.py --quick    # fewer repeats, shorter inputs; prints only

Two models: fairseq's ``s2t_transformer_s`` (~27M parameters, random weights) and the shipped
demo model (``qswap/assets/s2t_demo/checkpoint.pt``; a random model of its size when it is
absent). Every time is the median of ``--repeats`` runs (``time.perf_counter``) after one
warm-up, the compared runs interleaved round-robin so that a change of machine load hits them
alike. Ratios are what the targets are about; absolute times depend on the machine and its load,
which the output describes (other processes' CPU use during the run included).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qswap.io.atomic import atomic_write_text  # noqa: E402
from tools.tool_cli import positive_int  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
ASSET = REPO / "qswap" / "assets" / "s2t_demo"
SHIPPED_SIZE = dict(encoder_layers=6, encoder_embed_dim=176, encoder_ffn_embed_dim=704,
                    encoder_attention_heads=4, decoder_layers=3, decoder_embed_dim=176,
                    decoder_ffn_embed_dim=704, decoder_attention_heads=4, conv_channels=256)
SHIPPED_VOCAB = 196  # word pieces of the demo's sentencepiece model (+4 special symbols)


@dataclass
class Sizes:
    """Inputs and repeats of one run."""

    repeats: int
    batch: int
    frames: int
    tokens: int
    decode_utts: int
    decode_steps: int
    calib_batches: int

    @classmethod
    def of(cls, quick: bool, repeats: int | None) -> "Sizes":
        if quick:
            return cls(3 if repeats is None else repeats, 2, 300, 12, 2, 6, 2)
        return cls(7 if repeats is None else repeats, 4, 500, 20, 3, 20, 4)


@dataclass
class Target:
    measure: str
    target: str
    ok: Callable[[float, str], bool]  # (measured value, model key "s" / "shipped") -> met
    fmt: str  # how the measured value is shown


def _at_most(limit: float, shipped: float | None = None) -> Callable[[float, str], bool]:
    return lambda r, key: r <= (shipped if shipped is not None and key == "shipped" else limit)


# issue 18 item 5 (and issue 20's audit time): ratios measured in one run
TARGETS = {
    "forward": Target("fake-quant batch forward (w8a8, calibrated) / float forward",
                      "≤ 1.3× (s2t_transformer_s), ≤ 1.5× (shipped)", _at_most(1.3, shipped=1.5), "{:.2f}×"),
    "decode": Target("fake-quant incremental decoding (beam 5) / float decoding", "≤ 1.4×",
                     _at_most(1.4), "{:.2f}×"),
    "per_channel": Target("per-channel (w8a8_per_channel) / per-tensor (w8a8) forward", "≤ 1.1×",
                          _at_most(1.1), "{:.2f}×"),
    "convert": Target("`qswap.convert(model, \"w8a8\")` time", "< 1 s", lambda s, key: s < 1.0, "{:.2f} s"),
    "audit": Target("`qswap.audit` / one float forward (same input)", "≤ 3×", _at_most(3.0), "{:.2f}×"),
    "calibration": Target("calibration throughput / float throughput (the same batches and paths), "
                          "observing the quantized model (`observe: quantized`, the default)", "≥ 0.8×",
                          lambda r, key: r >= 0.8, "{:.2f}×"),
    "calibration_float": Target("the same, observing float activation sites (`observe: float`)", "≥ 0.8×",
                                lambda r, key: r >= 0.8, "{:.2f}×"),
    "convert_memory": Target("peak memory of convert / float parameter memory", "≤ 1.5×",
                             _at_most(1.5), "{:.2f}×"),
    "qat_decode": Target("QAT-trained model decoding / PTQ model decoding (w4a4_edges8_lsq)", "≤ 1.1×",
                         _at_most(1.1), "{:.2f}×"),
}


# -- timing ------------------------------------------------------------------------------------------
def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, pause: float = 0.0) -> dict[str, float]:
    """Median seconds of each function after one warm-up each, timed round-robin. ``pause``:
    seconds of sleep before each timed call, not timed: the worker threads a run leaves spinning
    (onnxruntime's default thread pool, OpenMP's) go idle before the next system's run starts."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class PathTimer:
    """Stands in for the audit's tracker in ``run_paths``: times each path it runs, unobserved."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def path(self, name: str, scope: str = ""):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    def run():
        with torch.no_grad():
            return fn()
    return run


# -- models and inputs ---------------------------------------------------------------------------------
@dataclass
class Bench:
    """One model under test, its inputs and its converted copies."""

    key: str
    label: str
    model: Any
    tgt_dict: Any
    feat: int
    frames: int
    net_input: dict = field(default_factory=dict)
    tiny_input: dict = field(default_factory=dict)
    calib: list = field(default_factory=list)
    decode_sample: dict = field(default_factory=dict)
    qmodels: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_model(key: str) -> tuple[Any, Any, str, int]:
    """(model, target dictionary, label, input features per frame) for ``s`` or ``shipped``."""
    from qswap.models import build_s2t_transformer, make_dictionary

    if key == "s":
        model = build_s2t_transformer(arch="s2t_transformer_s")
        return model, model.decoder.dictionary, "s2t_transformer_s (random weights)", 80
    checkpoint = ASSET / "checkpoint.pt"
    if checkpoint.is_file():
        from qswap.io.checkpoint import load_fairseq_model
        model, _cfg, task = load_fairseq_model(checkpoint, arg_overrides={"data": str(ASSET)})
        return model.float().eval(), task.target_dictionary, "shipped demo model (checkpoint)", 80
    model = build_s2t_transformer(make_dictionary(SHIPPED_VOCAB), **SHIPPED_SIZE)
    label = "shipped demo model's size (random weights; checkpoint absent)"
    return model, model.decoder.dictionary, label, 80


TINY_FRAMES = 16  # one utterance of 16 fbank frames (4 after subsampling), 2 target tokens


def make_bench(key: str, sizes: Sizes) -> Bench:
    from qswap.models import s2t_net_input

    model, tgt_dict, label, feat = load_model(key)
    frames = sizes.frames if key == "s" else sizes.frames * 3 // 5  # demo utterances are ~3 s
    b = Bench(key, label, model, tgt_dict, feat, frames)
    vocab = len(tgt_dict)
    b.net_input = s2t_net_input(sizes.batch, frames, feat, sizes.tokens, vocab, seed=1)
    b.tiny_input = s2t_net_input(1, TINY_FRAMES, feat, 2, vocab, seed=3)  # little arithmetic: the per-call cost
    b.calib = [s2t_net_input(sizes.batch, frames, feat, sizes.tokens, vocab, seed=10 + i)
               for i in range(sizes.calib_batches)]
    utts = s2t_net_input(sizes.decode_utts, frames, feat, 2, vocab, seed=2)
    b.decode_sample = {"net_input": {k: utts[k] for k in ("src_tokens", "src_lengths")}}
    return b


def fast(recipe: str) -> Any:
    """``recipe`` with ``simulate: float``, the fast option the fake-quant targets (issue 18 item 5)
    are held to; the default integer insides (``simulate: integer``) are timed beside them
    (``integer_insides``), with no target."""
    from qswap.recipe import with_simulate
    return with_simulate(recipe, "float")


def converted(b: Bench, recipe: str) -> Any:
    """``b.model`` converted with ``recipe`` (``simulate: float``: ``fast``) and calibrated on every
    path the audit runs."""
    import qswap
    from qswap.honesty.paths import run_paths

    if recipe not in b.qmodels:
        qmodel = qswap.convert(b.model, fast(recipe), data=b.calib)  # data: a recipe's transforms (smoothquant)
        qswap.calibrate(qmodel, b.calib, forward=run_paths)
        b.qmodels[recipe] = qmodel
    return b.qmodels[recipe]


# -- measures ----------------------------------------------------------------------------------------
def integer_insides(model: Any, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with ``model``'s integer insides (``simulate: integer``, qswap.nn.simulate)."""
    from qswap.nn.simulate import simulating

    def run():
        with simulating(model, "integer"):
            return fn()
    return run


def measure_forward(b: Bench, sizes: Sizes) -> dict:
    w8a8, per_channel = converted(b, "w8a8"), converted(b, "w8a8_per_channel")
    t = interleaved_medians({
        "float": no_grad(lambda: b.model(**b.net_input)),
        "w8a8": no_grad(lambda: w8a8(**b.net_input)),
        "w8a8_per_channel": no_grad(lambda: per_channel(**b.net_input)),
        "w8a8_integer": no_grad(integer_insides(w8a8, lambda: w8a8(**b.net_input))),
    }, sizes.repeats)
    tiny = interleaved_medians({"float": no_grad(lambda: b.model(**b.tiny_input)),  # apart: the ratio's runs
                                "w8a8": no_grad(lambda: w8a8(**b.tiny_input))}, sizes.repeats)  # stay as they were
    return {"float_s": t["float"], "w8a8_s": t["w8a8"], "per_channel_s": t["w8a8_per_channel"],
            "forward": t["w8a8"] / t["float"], "per_channel": t["w8a8_per_channel"] / t["w8a8"],
            "w8a8_integer_s": t["w8a8_integer"], "tiny_float_s": tiny["float"], "tiny_w8a8_s": tiny["w8a8"]}


def measure_decode(b: Bench, sizes: Sizes) -> dict:
    """fairseq's SequenceGenerator, beam 5, exactly ``decode_steps`` tokens per hypothesis
    (``min_len`` = ``max_len_b``), so float and fake-quant runs do the same number of steps."""
    from fairseq.sequence_generator import SequenceGenerator

    w8a8, stream = converted(b, "w8a8"), converted(b, STREAM_RECIPE)
    steps = sizes.decode_steps
    gens = {name: SequenceGenerator([m], b.tgt_dict, beam_size=5, max_len_a=0, max_len_b=steps,
                                    min_len=steps)
            for name, m in (("float", b.model), ("w8a8", w8a8), ("stream", stream))}
    runs = {name: (lambda g=g: g.generate(g.model.models, b.decode_sample)) for name, g in gens.items()}
    runs["w8a8_integer"] = integer_insides(w8a8, runs["w8a8"])
    t = interleaved_medians(runs, sizes.repeats)
    return {"decode_float_s": t["float"], "decode_w8a8_s": t["w8a8"], "decode": t["w8a8"] / t["float"],
            "decode_stream_s": t["stream"],
            "decode_w8a8_integer_s": t["w8a8_integer"], "decode_utts": sizes.decode_utts, "decode_steps": steps}


QAT_RECIPE = "w4a4_edges8_lsq"  # learned (LSQ) activation scales: Parameters after training
STREAM_RECIPE = "w4a4_edges8_stream_smoothquant"  # per-channel activation grids (the residual stream's)


def qat_trained(b: Bench, steps: int = 3) -> Any:
    """``b.model`` converted with QAT_RECIPE, calibrated, then ``steps`` Adam updates of weights
    and LSQ scales in training mode (teacher-forced cross entropy), back in eval mode: what a
    fairseq-train QAT checkpoint holds."""
    import torch

    import qswap
    from qswap.honesty.paths import run_paths

    qmodel = qswap.convert(b.model, fast(QAT_RECIPE))
    qswap.calibrate(qmodel, b.calib, forward=run_paths)
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-4)
    qmodel.train()
    target = b.net_input["prev_output_tokens"]
    for _ in range(steps):
        logits = qmodel(**b.net_input)[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qmodel.eval()


def measure_qat_decode(b: Bench, sizes: Sizes) -> dict:
    """fairseq's SequenceGenerator (as in ``measure_decode``) on a QAT-trained model against the
    same recipe calibrated only (PTQ): a QAT model must decode as fast (issue 19)."""
    from fairseq.sequence_generator import SequenceGenerator

    ptq = converted(b, QAT_RECIPE)
    steps = sizes.decode_steps
    gens = {name: SequenceGenerator([m], b.tgt_dict, beam_size=5, max_len_a=0, max_len_b=steps, min_len=steps)
            for name, m in (("ptq", ptq), ("qat", qat_trained(b)))}
    t = interleaved_medians({name: (lambda g=g: g.generate(g.model.models, b.decode_sample))
                             for name, g in gens.items()}, sizes.repeats)
    return {"decode_ptq_s": t["ptq"], "decode_qat_s": t["qat"], "qat_decode": t["qat"] / t["ptq"]}


def measure_integer(b: Bench, sizes: Sizes) -> dict:
    """The integer model (``qswap.integerize`` of the calibrated w8a8 model; issue 16) against the
    fake-quant w8a8 model: batch forward, and SequenceGenerator decoding as ``measure_decode``. No
    target: torch's int32 CPU kernels are not what an integer device runs."""
    import qswap
    from fairseq.sequence_generator import SequenceGenerator

    w8a8 = converted(b, "w8a8")
    integer = qswap.integerize(w8a8)
    steps = sizes.decode_steps
    gens = {name: SequenceGenerator([m], b.tgt_dict, beam_size=5, max_len_a=0, max_len_b=steps, min_len=steps)
            for name, m in (("w8a8", w8a8), ("integer", integer))}
    t = interleaved_medians({
        "forward_w8a8": no_grad(lambda: w8a8(**b.net_input)),
        "forward_integer": no_grad(lambda: integer(**b.net_input)),
        **{f"decode_{name}": (lambda g=g: g.generate(g.model.models, b.decode_sample)) for name, g in gens.items()},
    }, sizes.repeats)
    return {"integer_forward_s": t["forward_integer"], "integer_forward_w8a8_s": t["forward_w8a8"],
            "integer_decode_s": t["decode_integer"], "integer_decode_w8a8_s": t["decode_w8a8"]}


def measure_audit(b: Bench, sizes: Sizes) -> dict:
    """``qswap.audit(w8a8, net_input)`` against one float forward on the same net_input; also
    against the paths the audit runs, timed unobserved on the float and the w8a8 model."""
    import qswap
    from qswap.honesty.paths import run_paths

    w8a8 = converted(b, "w8a8")
    t0 = time.perf_counter()
    qswap.audit(w8a8, b.net_input)  # the first audit in a process also builds its op tables
    first = time.perf_counter() - t0
    t = interleaved_medians({
        "float": no_grad(lambda: b.model(**b.net_input)),
        "audit": lambda: qswap.audit(w8a8, b.net_input),
    }, sizes.repeats)
    t0 = time.perf_counter()  # the value-level check (~50x a forward): one run, not in the target
    qswap.audit(w8a8, b.net_input, values=True)
    t["audit_values"] = time.perf_counter() - t0
    paths = {}
    for name, m in (("float", b.model), ("w8a8", w8a8)):
        timer = PathTimer()
        no_grad(lambda: run_paths(m, b.net_input, timer))()  # warm-up
        runs = []
        for _ in range(sizes.repeats):
            timer.seconds.clear()
            no_grad(lambda: run_paths(m, b.net_input, timer))()
            runs.append(dict(timer.seconds))
        paths[name] = {p: statistics.median(r[p] for r in runs) for p in runs[0]}
    return {"audit_s": t["audit"], "audit_float_forward_s": t["float"], "first_audit_s": first,
            "audit": t["audit"] / t["float"], "paths": paths, "audit_values_s": t["audit_values"],
            "audit_over_float_paths": t["audit"] / sum(paths["float"].values()),
            "audit_over_w8a8_paths": t["audit"] / sum(paths["w8a8"].values())}


def measure_calibration(b: Bench, sizes: Sizes) -> dict:
    """``qswap.calibrate`` over the calibration batches in both observe modes, against the float
    model running what calibration runs on each batch (its default forward: ``run_paths``, a batch
    forward and the incremental decoding steps): throughput ratios (batches per second). The
    calibrated w8a8 model running the same paths (frozen grids) and the w8a8 model with its
    activation quantizers disabled (float sites, no observing) split each mode's time into the
    model's forward and what observing adds."""
    import qswap
    from qswap.calibrate import activation_quantizers
    from qswap.honesty.paths import run_paths

    quantized, passing = qswap.convert(b.model, fast("w8a8")), qswap.convert(b.model, fast("w8a8"))
    frozen, sites_float = converted(b, "w8a8"), qswap.convert(b.model, fast("w8a8"))
    for q in activation_quantizers(sites_float):
        q.enabled = False

    def paths(model):
        def run():
            for batch in b.calib:
                run_paths(model, batch)
        return no_grad(run)
    t = interleaved_medians({"float": paths(b.model), "frozen": paths(frozen), "sites_float": paths(sites_float),
                             "calibrate": lambda: qswap.calibrate(quantized, b.calib),
                             "calibrate_float": lambda: qswap.calibrate(passing, b.calib, observe="float")},
                            sizes.repeats)
    return {"calib_float_s": t["float"], "calib_frozen_s": t["frozen"], "calib_sites_float_s": t["sites_float"],
            "calib_s": t["calibrate"], "calib_passing_s": t["calibrate_float"],
            "calibration": t["float"] / t["calibrate"], "calibration_float": t["float"] / t["calibrate_float"],
            "calib_batches": len(b.calib)}


def measure_convert(b: Bench, sizes: Sizes) -> dict:
    import qswap

    t = interleaved_medians({"convert": lambda: qswap.convert(b.model, "w8a8")}, sizes.repeats)
    memory = convert_memory_subprocess(b.key)
    return {"convert": t["convert"], **memory}


def convert_memory_subprocess(key: str) -> dict:
    """Peak RSS growth of ``qswap.convert`` in a fresh process (see ``convert_memory``)."""
    out = subprocess.run([sys.executable, __file__, "--convert-memory", key], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def convert_memory(key: str) -> dict:
    """In this (fresh) process: build the model, reset the peak-RSS mark (``VmHWM``, by writing 5
    to /proc/self/clear_refs), convert, and compare the peak's growth over the RSS before the
    convert with the float model's parameter bytes. RSS, not tracemalloc: torch's tensor memory
    does not go through Python's allocator, which tracemalloc sees."""
    import gc

    import qswap
    import torch

    torch.set_num_threads(1)
    model = load_model(key)[0]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    qmodel = qswap.convert(model, "w8a8")
    peak = _status_kb("VmHWM")
    del qmodel
    growth = (peak - before) * 1024
    return {"convert_peak_bytes": growth, "float_param_bytes": param_bytes,
            "convert_memory": growth / param_bytes}


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def honesty(b: Bench) -> dict:
    import qswap

    return {recipe: qswap.audit(converted(b, recipe), b.net_input).verdict
            for recipe in ("w8a8", "w8a8_per_channel")}


# -- the machine -------------------------------------------------------------------------------------
def cpu_snapshot() -> dict[int, tuple[int, float]]:
    """pid -> (start time, CPU seconds used) of every process but this one and its children."""
    tick, mine = os.sysconf("SC_CLK_TCK"), os.getpid()
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if mine not in (pid, int(fields[1])):
            out[pid] = (int(fields[19]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def others_cpu_seconds(before: dict, after: dict) -> float:
    """CPU seconds other processes used between two snapshots (those that exited in between are
    not seen: a lower bound)."""
    total = 0.0
    for pid, (start, cpu) in after.items():
        old = before.get(pid)
        total += cpu - old[1] if old is not None and old[0] == start else cpu
    return total


def busy_processes(seconds: float = 1.0) -> list[str]:
    """Other processes using more than a fifth of a core over a short sample, with their share."""
    a = cpu_snapshot()
    time.sleep(seconds)
    b = cpu_snapshot()
    busy = []
    for pid, (start, cpu) in b.items():
        if pid in a and a[pid][0] == start and (cpu - a[pid][1]) / seconds > 0.2:
            busy.append(f"{_command(pid)} at {100 * (cpu - a[pid][1]) / seconds:.0f}% of a core")
    return sorted(busy)


def wait_idle(seconds: float, log: Callable[[str], None]) -> list[str]:
    """The busy processes once none is left or ``seconds`` have passed (sampled every 5 s)."""
    deadline = time.monotonic() + seconds
    busy = busy_processes()
    while busy and time.monotonic() < deadline:
        log(f"waiting for an idle machine: {', '.join(busy)}")
        time.sleep(4.0)
        busy = busy_processes()
    return busy


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [Path(a.decode(errors="replace")).name for a in argv[:2] if a]
    return " ".join(words) or str(pid)


KERNEL_TEXT = {True: "qswap's one-pass C kernel (`qswap/quant/fused.py`, built)",
               False: "torch's four passes (qswap's C kernel is not built)"}


def machine() -> dict:
    import fairseq
    import torch

    from qswap.quant import fused

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = _meminfo_gb()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "fairseq": fairseq.__version__, "threads": torch.get_num_threads(), "fused": fused.AVAILABLE}


def _meminfo_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2 ** 20, 1)
    return 0.0


# -- profiles for missed targets ---------------------------------------------------------------------
PROFILE_RUNS = 3  # each profile keeps its least disturbed run (the smallest total)


@contextlib.contextmanager
def one_thread():
    """Profiles run single-threaded: per-op attribution without OpenMP waits on a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def op_profile(fns: dict[str, Callable[[], Any]], rows: int = 12) -> str:
    """Self CPU time by aten op for each function (torch.profiler), side by side, sorted by the
    difference of the first two."""
    from torch.profiler import profile

    per: dict[str, dict[str, tuple[float, int]]] = {}
    with one_thread():
        for name, fn in fns.items():
            fn()
            runs = []
            for _ in range(PROFILE_RUNS):
                with profile() as prof:
                    fn()
                runs.append({e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()})
            per[name] = min(runs, key=lambda r: sum(v[0] for v in r.values()))
    names = list(fns)
    ops = set().union(*(set(p) for p in per.values()))
    diff = lambda op: -(per[names[0]].get(op, (0, 0))[0] - per[names[-1]].get(op, (0, 0))[0])  # noqa: E731
    lines = ["| op | " + " | ".join(f"{n} ms (calls)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for op in sorted(ops, key=diff)[:rows]:
        cells = [f"{per[n].get(op, (0, 0))[0]:.1f} ({per[n].get(op, (0, 0))[1]})" for n in names]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    totals = [f"{sum(v[0] for v in per[n].values()):.1f}" for n in names]
    lines.append("| total self CPU | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def python_profile(fn: Callable[[], Any], rows: int = 14) -> str:
    """The functions with the most own time (cProfile), as a markdown table."""
    import cProfile
    import pstats

    with one_thread():
        fn()
        runs = []
        for _ in range(PROFILE_RUNS):
            prof = cProfile.Profile()
            prof.runcall(fn)
            runs.append(pstats.Stats(prof).stats)  # (file, line, name) -> (calls, prim., own, cum., callers)
    stats = min(runs, key=lambda st: sum(v[2] for v in st.values()))
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:rows]
    total = sum(v[2] for v in stats.values())
    lines = ["| function | calls | own ms | cumulative ms |", "|---|---|---|---|"]
    for (path, line, name), (calls, _, own, cum, _) in top:
        where = name if path == "~" else f"{Path(path).name}:{line} {name}"
        lines.append(f"| `{where}` | {calls} | {own * 1e3:.1f} | {cum * 1e3:.1f} |")
    lines.append(f"| total own time (cProfile slows Python code down) | | {total * 1e3:.0f} | |")
    return "\n".join(lines)


def profiles_for_misses(b: Bench, result: dict) -> dict[str, str]:
    """For each missed target: where the time goes (torch.profiler by aten op, cProfile by
    Python function), measured now on the same model and inputs."""
    import qswap

    w8a8 = converted(b, "w8a8")
    out = {}
    missed = lambda name: not TARGETS[name].ok(result[name], b.key)  # noqa: E731
    if missed("forward"):
        out["forward"] = op_profile({"w8a8": no_grad(lambda: w8a8(**b.net_input)),
                                     "float": no_grad(lambda: b.model(**b.net_input))})
    if missed("per_channel"):
        pc = converted(b, "w8a8_per_channel")
        out["per_channel"] = op_profile({"w8a8_per_channel": no_grad(lambda: pc(**b.net_input)),
                                         "w8a8": no_grad(lambda: w8a8(**b.net_input))})
    if missed("decode"):
        out["decode"] = _decode_profile(b, result["decode_steps"])
    for name, observe in (("calibration", "quantized"), ("calibration_float", "float")):
        if missed(name):
            qmodel = qswap.convert(b.model, fast("w8a8"))
            out[name] = python_profile(lambda: qswap.calibrate(qmodel, b.calib, observe=observe))
    if missed("audit"):
        out["audit"] = python_profile(lambda: qswap.audit(w8a8, b.net_input))
    if missed("convert"):
        out["convert"] = python_profile(lambda: qswap.convert(b.model, "w8a8"))
    return out


def _decode_profile(b: Bench, steps: int) -> str:
    from fairseq.sequence_generator import SequenceGenerator

    gens = {name: SequenceGenerator([m], b.tgt_dict, beam_size=5, max_len_b=steps, min_len=steps)
            for name, m in (("w8a8", converted(b, "w8a8")), ("float", b.model))}
    runs = {n: (lambda g=g: g.generate(g.model.models, b.decode_sample)) for n, g in gens.items()}
    modules = {n: sum(1 for _ in g.model.models[0].decoder.modules()) for n, g in gens.items()}
    qdecoder = gens["w8a8"].model.models[0].decoder
    visited = len(qdecoder.reorderable_modules()) if hasattr(qdecoder, "reorderable_modules") else modules["w8a8"]
    return (op_profile(runs) + "\n\nPython functions (cProfile, w8a8 decoding). The w8a8 decoder has "
            f"{modules['w8a8']} modules ({modules['float']} in the float one); fairseq's beam reorder "
            f"would visit all of them at every step, qswap's decoder counterpart visits the {visited} "
            "that hold incremental state:\n\n" + python_profile(runs["w8a8"]))


# -- running and reporting ---------------------------------------------------------------------------
def run_model(key: str, sizes: Sizes, log: Callable[[str], None], only: list[str] | None = None) -> dict:
    """Every measure on model ``key`` (``only``: just these, without the honesty verdicts and the
    profiles of missed targets)."""
    b = make_bench(key, sizes)
    log(f"{b.label}: {b.parameters / 1e6:.1f}M parameters")
    result: dict[str, Any] = {"label": b.label, "parameters": b.parameters, "frames": b.frames}
    for name, fn in MEASURES.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        result.update(fn(b, sizes))
        log(f"  {name}: done in {time.perf_counter() - t0:.0f} s")
    if only is None:
        result["honesty"] = honesty(b)
        result["profiles"] = profiles_for_misses(b, result)
    return result


MEASURES = {"convert": measure_convert, "forward": measure_forward, "decode": measure_decode,
            "qat_decode": measure_qat_decode, "calibration": measure_calibration, "audit": measure_audit,
            "integer": measure_integer}


def table(results: dict[str, dict], partial: bool = False) -> str:
    """The targets table; ``partial`` (``--only``): measures not run are left out, otherwise a
    missing one is an error."""
    keys = list(results)
    head = "| measure | target | " + " | ".join(results[k]["label"] for k in keys) + " | met? |"
    lines = [head, "|---|---|" + "---|" * len(keys) + "---|"]
    for name, t in TARGETS.items():
        if partial and any(name not in results[k] for k in keys):
            continue  # not measured (``--only``)
        values = [results[k][name] for k in keys]
        met = "yes" if all(t.ok(v, k) for v, k in zip(values, keys)) else "**no**"
        lines.append(f"| {t.measure} | {t.target} | " + " | ".join(t.fmt.format(v) for v in values)
                     + f" | {met} |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def details(r: dict, sizes: Sizes) -> list[str]:
    """What was measured on one model: every time behind the ratios."""
    p = r["paths"]
    out = [f"### {r['label']}", "",
           f"{r['parameters'] / 1e6:.1f}M parameters. Forward, calibration and audit inputs: "
           f"{sizes.batch} utterances x {r['frames']} fbank frames, {sizes.tokens} target tokens "
           f"(teacher-forced); decoding: {r['decode_utts']} utterances x {r['frames']} frames, beam 5, "
           f"exactly {r['decode_steps']} steps (`min_len` = `max_len_b`).", "",
           "| measured | float | w8a8 | ratio |", "|---|---|---|---|",
           f"| batch forward `model(**net_input)` | {_ms(r['float_s'])} | {_ms(r['w8a8_s'])} | "
           f"{r['forward']:.2f}× |",
           f"| the same, `w8a8_per_channel` | | {_ms(r['per_channel_s'])} | {r['per_channel']:.2f}× "
           f"of w8a8 |",
           *([f"| the same on one {TINY_FRAMES}-frame utterance (little arithmetic: what the modules' "
              f"Python calls cost per forward) | {r['tiny_float_s'] * 1e3:.1f} ms | {r['tiny_w8a8_s'] * 1e3:.1f} ms | "
              f"{r['tiny_w8a8_s'] / r['tiny_float_s']:.2f}× |"] if "tiny_w8a8_s" in r else []),
           f"| the same, w8a8 with the default integer insides (`simulate: integer`, no target) | | "
           f"{_ms(r['w8a8_integer_s'])} | {r['w8a8_integer_s'] / r['float_s']:.2f}× |",
           f"| `SequenceGenerator.generate` | {_ms(r['decode_float_s'])} | {_ms(r['decode_w8a8_s'])} | "
           f"{r['decode']:.2f}× |",
           f"| the same, w8a8 with the default integer insides (`simulate: integer`, no target) | | "
           f"{_ms(r['decode_w8a8_integer_s'])} | {r['decode_w8a8_integer_s'] / r['decode_float_s']:.2f}× |",
           *([f"| the same, `{STREAM_RECIPE}` (per-channel activation grids of the residual stream, "
              f"`simulate: float`; no target) | | {_ms(r['decode_stream_s'])} | "
              f"{r['decode_stream_s'] / r['decode_float_s']:.2f}× |"] if "decode_stream_s" in r else []),
           f"| the same, {QAT_RECIPE}: QAT (3 Adam updates of weights and LSQ scales; second column) / PTQ "
           f"(calibrated; first column) | {_ms(r['decode_ptq_s'])} | {_ms(r['decode_qat_s'])} | {r['qat_decode']:.2f}× |",
           f"| `qswap.calibrate`, {r['calib_batches']} batches, `observe: quantized` (float: the same batch "
           f"forwards and decoding steps) | {_ms(r['calib_float_s'])} | {_ms(r['calib_s'])} | "
           f"{r['calibration']:.2f}× throughput |",
           f"| the same, `observe: float` | | {_ms(r['calib_passing_s'])} | {r['calibration_float']:.2f}× "
           f"throughput |",
           f"| the same paths, calibrated (frozen) w8a8 | | {_ms(r['calib_frozen_s'])} | "
           f"{r['calib_frozen_s'] / r['calib_float_s']:.2f}× |",
           f"| the same paths, w8a8 with its activation quantizers disabled (float sites, nothing observed) | "
           f"| {_ms(r['calib_sites_float_s'])} | {r['calib_sites_float_s'] / r['calib_float_s']:.2f}× |",
           f"| `qswap.convert(model, \"w8a8\")` | | {_ms(r['convert'])} | |",
           f"| peak RSS growth of the convert | {r['float_param_bytes'] / 2**20:.0f} MiB of float "
           f"parameters | {r['convert_peak_bytes'] / 2**20:.0f} MiB | {r['convert_memory']:.2f}× |", "",
           f"| integer model (`qswap.integerize(w8a8)`), batch forward | | {_ms(r['integer_forward_s'])} | "
           f"{r['integer_forward_s'] / r['integer_forward_w8a8_s']:.2f}× of w8a8 |",
           f"| the integer model in `SequenceGenerator.generate` | | {_ms(r['integer_decode_s'])} | "
           f"{r['integer_decode_s'] / r['integer_decode_w8a8_s']:.2f}× of w8a8 |", "",
           "The paths `qswap.audit(w8a8, net_input)` runs (3 incremental steps), each timed unobserved:", "",
           "| path | float | w8a8 |", "|---|---|---|"]
    out += [f"| {name} | {_ms(p['float'][name])} | {_ms(p['w8a8'][name])} |" for name in p["float"]]
    out += [f"| all of them | {_ms(sum(p['float'].values()))} | {_ms(sum(p['w8a8'].values()))} |", "",
            f"`qswap.audit` took {_ms(r['audit_s'])}: **{r['audit']:.2f}× one float batch forward** "
            f"({_ms(r['audit_float_forward_s'])}; the target's ratio), {r['audit_over_float_paths']:.2f}× "
            f"the float model running the same paths, {r['audit_over_w8a8_paths']:.2f}× the w8a8 model "
            f"running them unobserved. The first audit in the process took {_ms(r['first_audit_s'])} "
            f"(one-time set-up: imports, op tables); it is not in the median. With the value-level "
            f"check on (`qswap.audit(..., values=True)`, not part of the target) it took "
            f"{_ms(r['audit_values_s'])} (one run): {r['audit_values_s'] / r['audit_float_forward_s']:.2f}× one "
            f"float forward.", "",
            "Honesty: " + ", ".join(f"`{k}` audits **{v}**" for k, v in r["honesty"].items()) + ".", ""]
    for name, text in r["profiles"].items():
        out += [f"#### Where the time goes: {TARGETS[name].measure}", "", explain(name, r), "", text, "",
                "(Profiled single-threaded, the least disturbed of 3 runs.)", ""]
    return out


def explain(name: str, r: dict) -> str:
    """The measured decomposition behind a missed target, in a sentence or two."""
    paths_w8a8 = sum(r["paths"]["w8a8"].values())
    return {
        "forward": f"The w8a8 forward takes {_ms(r['w8a8_s'] - r['float_s'])} more than the float one"
                   + (f"; on one {TINY_FRAMES}-frame utterance, with little arithmetic to do, "
                      f"{(r['tiny_w8a8_s'] - r['tiny_float_s']) * 1e3:.1f} ms more: the Python calls of the "
                      f"quantizers and the counterparts' checks of what they keep, whatever the input's "
                      f"size. " if "tiny_w8a8_s" in r else ". ") +
                   "Every activation quantizer reads and writes its tensor once more (multiply by 1/s, "
                   "round, clamp, times s: one pass of qswap's C kernel, `qswap/quant/fused.py`, or "
                   "torch's four where it is not built), into a new tensor, or into the temporary a "
                   "layer hands over (attention scores and probabilities, fc1's result, the attention "
                   "outputs, the decoder's fc2 result: `consume`; the attention masks are then filled in "
                   "place); a ReLU after a quantizer runs in that quantizer's pass, and the quantizer of "
                   "fc2's input joins the same pass (`consume_twice`, one read of fc1's result for both "
                   "grids); attention runs unfused (bmm, softmax, bmm on quantized operands) "
                   "where the float model calls one fused SDPA kernel; by aten op (the kernel's pass is "
                   "not an aten op: it shows in the wall time, not here):",
        "per_channel": "By aten op, per-channel against per-tensor:",
        "decode": "A decoding step works on a few rows per tensor, so per-call overhead dominates: "
                  "each activation quantizer call costs a Python call of qswap's one-pass kernel and "
                  "an output allocation whatever the tensor size (four torch dispatches where the "
                  "kernel is not built: `qswap/quant/fused.py`) and a check that its kept grid is current, each linear "
                  "one check of its kept weight and bias, where the float decoder runs a few kernels "
                  "per layer. By aten op:",
        "calibration": f"Observing the quantized model, calibrating is the fake-quant model running the "
                       f"same paths ({r['calib_frozen_s'] / r['calib_float_s']:.2f}× float) plus observing, "
                       f"{_ms((r['calib_s'] - r['calib_frozen_s']) / r['calib_batches'])} per batch: each "
                       "activation quantizer reads its input's extremes (one pass of qswap's C kernel, "
                       "`fused.min_max`), updates its range and grid in float32 scalar arithmetic (four small "
                       "tensor writes) and rounds onto the new grid (one pass of the kernel; in place where a "
                       "layer hands the tensor over, `consume`; the frozen model's two-grid pass, "
                       "`consume_twice`, needs fixed grids). With free "
                       "observers the throughput ratio could not exceed "
                       f"{r['calib_float_s'] / r['calib_frozen_s']:.2f}×. By Python function:",
        "calibration_float": f"Observing float activation sites, calibrating is the converted model with its "
                             f"activation sites in float ({r['calib_sites_float_s'] / r['calib_float_s']:.2f}× "
                             f"float: the counterparts' Python calls around the same float ops) plus "
                             f"observing, {_ms((r['calib_passing_s'] - r['calib_sites_float_s']) / r['calib_batches'])} "
                             "per batch: each quantizer reads its input's extremes (one pass of qswap's C "
                             "kernel, single-threaded) and updates its range; no rounding. With free observers "
                             f"the throughput ratio could not exceed "
                             f"{r['calib_float_s'] / r['calib_sites_float_s']:.2f}×. By Python function:",
        "audit": f"The audited paths alone take {_ms(paths_w8a8)} unobserved "
                 f"({paths_w8a8 / r['audit_float_forward_s']:.2f}× one float forward: a batch forward, "
                 "`get_normalized_probs` and 3 decoding steps); the rest is the audit's own work "
                 "(`qswap/honesty`: module hooks, a Python dispatch-mode handler per aten op, the "
                 "on-grid check of every quantizer output, one read by qswap's C kernel (5 or 6 torch "
                 "passes where it is not built), kept weights included: "
                 "one written through `.data` bumps no version counter). By Python function:",
        "convert": "By Python function:",
        "convert_memory": "",
        "qat_decode": "",
    }[name]


def markdown(results: dict[str, dict], env: dict, sizes: Sizes, args: argparse.Namespace) -> str:
    m = env["machine"]
    busy = env["others_cpu_s"] / env["wall_s"]
    idle = ("otherwise idle" if busy < 0.1 else
            f"**not idle**: other processes kept at least {busy:.2f} of its {m['cores']} cores busy on "
            f"average (processes that started and ended during the run are not counted)")
    seen = [f"before: {', '.join(env['busy_before'])}" if env["busy_before"] else "",
            f"after: {', '.join(env['busy_after'])}" if env["busy_after"] else ""]
    busy_note = f" (busy processes {'; '.join(x for x in seen if x)})" if any(seen) else ""
    command = "`.venv/bin/python tools/bench.py" + (" --quick" if args.quick else "") + "`"
    return "\n".join([
        "# Benchmarks", "",
        f"Generated by {command} on {env['date']}; every number below comes from that run.", "",
        f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, fairseq {m['fairseq']}; {m['threads']} torch "
        f"threads; fake quantization by {KERNEL_TEXT[bool(m.get('fused'))]}. During the run ({env['wall_s'] / 60:.1f} min) the machine was {idle}{busy_note}.", "",
        f"Times are medians of {sizes.repeats} interleaved runs after a warm-up (`time.perf_counter`); "
        "the targets are ratios measured in this one run. Peak memory is the growth of the "
        "process's peak RSS (`VmHWM`, reset before the convert) in a fresh process, so torch's "
        "tensor memory counts (tracemalloc does not see it).", "",
        "The fake-quant models are converted with `simulate: float` (float32 softmax, LayerNorm and GLU "
        "insides, float rounding onto each grid): the fast option, which the targets (issue 18 item 5) "
        "are held to. The default, `simulate: integer` (the integer model's arithmetic, bit for bit on "
        "the shipped model: docs/integer.md), is timed in its own rows, with no target.", "",
        table(results), "",
        *[line for r in results.values() for line in details(r, sizes)]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and shorter inputs; prints only")
    ap.add_argument("--repeats", type=positive_int, help="timed runs per measure (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--models", default="s,shipped", help="comma-separated: s, shipped")
    ap.add_argument("--out", type=Path, help=f"markdown output (default {DOC.relative_to(REPO)}, "
                                             "not written by --quick)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for no other process to use a fifth of a core")
    ap.add_argument("--only", metavar="MEASURES",
                    help=f"comma-separated measures to run, of: {', '.join(MEASURES)} (prints only; "
                         "e.g. --only audit --models s: the audit time against one float forward)")
    ap.add_argument("--convert-memory", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = args.models.split(",")
    if any(key not in ("s", "shipped") for key in models):  # another name had benchmarked the shipped model
        ap.error(f"--models takes s, shipped or both (comma-separated), got {args.models!r}")
    if args.convert_memory:
        print(json.dumps(convert_memory(args.convert_memory)))
        return 0
    import logging
    import torch
    import warnings

    logging.getLogger("qswap").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    sizes = Sizes.of(args.quick, args.repeats)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    busy = wait_idle(args.wait_idle, log)
    snapshot, wall0 = cpu_snapshot(), time.perf_counter()
    only = args.only.split(",") if args.only else None
    if only is not None and not set(only) <= set(MEASURES):
        ap.error(f"--only takes measures of: {', '.join(MEASURES)}")
    results = {key: run_model(key, sizes, log, only) for key in models}
    if only is not None:
        print(table(results, partial=True))
        if "audit" in only:
            print("\n".join(f"{r['label']}: audit {_ms(r['audit_s'])}, float forward "
                            f"{_ms(r['audit_float_forward_s'])}, {r['audit']:.2f}x" for r in results.values()))
        if args.json:
            atomic_write_text(args.json, json.dumps({"results": results}, indent=1, default=str) + "\n")
        return 0
    env = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "wall_s": time.perf_counter() - wall0, "others_cpu_s": others_cpu_seconds(snapshot, cpu_snapshot()),
           "busy_before": busy, "busy_after": busy_processes()}
    text = markdown(results, env, sizes, args)
    print(table(results))
    out = args.out or (None if args.quick else DOC)
    if out is not None:
        atomic_write_text(out, text + "\n")
        log(f"wrote {out}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"env": env, "results": results}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
