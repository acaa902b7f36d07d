"""Quantization-aware training of the shipped model with fairseq-train and the qswap plugin, and
what comes after it: dev WER of the saved checkpoints, the shipped QAT checkpoint, docs/qat.md.

    # the training corpus (the shipped model's splits; see qswap/assets/s2t_demo/README.md)
    .venv/bin/python tools/make_corpus.py --out DATA --num-train 7000 --num-dev 200 --num-test 100 --seed 1
    .venv/bin/python tools/qat_train.py train --data DATA --save-dir RUN        # fairseq-train (LSQ)
    .venv/bin/python tools/qat_train.py dev --data DATA --save-dir RUN         # dev WER per checkpoint
    .venv/bin/python tools/qat_train.py average --save-dir RUN --last 5       # mean of the last 5 (optional)
    .venv/bin/python tools/qat_train.py dev --data DATA --save-dir RUN         # ... and of the average
    .venv/bin/python tools/qat_train.py ship --save-dir RUN --out ASSET.pt     # best on dev -> asset
    .venv/bin/python tools/qat_train.py doc --save-dir RUN --evals EVALS --shipped ASSET.pt --target T \
        --out PAGE.md --log-out PAGE.log                                          # the run's page

On a GPU machine (``train --device cuda``): ``pack`` writes the corpus in compact form in parts
small enough to carry there, ``unpack`` rebuilds a fairseq data directory from them, and
``--train-subset train_1,train_2,...`` trains on the parts (docs/qat_w4a8.md was made so).

``train`` fine-tunes the shipped float checkpoint converted with ``--recipe`` (default
``w4a4_edges8_lsq``: w4a4_edges8 with learned activation scales): the first ``--calib-batches``
training batches calibrate every activation grid (zero gradient), then fairseq's Adam trains the
weights and the LSQ scales together. A recipe whose transforms need activation statistics
(``w4a4_edges8_stream_smoothquant_lsq``: SmoothQuant folded offline) cannot be applied to the
model fairseq-train builds: ``--from-qckpt QCKPT`` fine-tunes from the checkpoint ``qswap convert``
wrote with that recipe (transforms folded into the shipped weights with real calibration
statistics, every grid calibrated; those grids are the LSQ start, ``--calib-batches`` is skipped);
without it ``train`` stops and names the command. Calibrated as the PTQ row it is compared with::

    qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe w4a4_edges8_stream_smoothquant_lsq \
        --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o QCKPT
    .venv/bin/python tools/qat_train.py train --data DATA --save-dir RUN \
        --recipe w4a4_edges8_stream_smoothquant_lsq --from-qckpt QCKPT

``ship`` picks the checkpoint with the lowest dev WER (never a test set) and stores it as a
qswap checkpoint (float16 storage of the float weights, quantizer state in float32) that
``qswap eval`` loads as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairseq_walkthrough import arch_args  # noqa: E402  (tools/fairseq_walkthrough.py)
from tool_cli import exit_status  # noqa: E402  (tools/tool_cli.py)

from qswap.errors import CheckpointError, DataError, TrainingError  # noqa: E402

ASSET = REPO / "qswap" / "assets" / "s2t_demo"
SHIPPED_QAT = ASSET / "qat_w4a4_edges8.pt"
KEEP = 20  # fairseq-train's --keep-interval-updates in train_command
TRAIN_DEFAULTS = {"lr": 3e-4, "warmup": 20, "max_tokens": 6000, "max_update": 3000, "calib_batches": 4}
MODEL_FILES = ("spm_unigram200.model", "spm_unigram200.txt")
CORPUS = "the corpus tools/make_corpus.py wrote (see qswap/assets/s2t_demo/README.md)"


def train_command(a: argparse.Namespace) -> list[str]:
    """The fairseq-train command line of the QAT run."""
    import qswap

    ckpt = Path(getattr(a, "from_qckpt", None) or ASSET / "checkpoint.pt")
    return [sys.executable, "-m", "fairseq_cli.train", str(a.data), "--user-dir", qswap.plugin_dir(),
            "--task", "speech_to_text_qswap", "--qswap-recipe", a.recipe,
            "--qswap-calib-batches", str(a.calib_batches), "--finetune-from-model", str(ckpt),
            *arch_args(ckpt), "--train-subset", getattr(a, "train_subset", "train"), "--valid-subset", "dev",
            *criterion_args(a), "--label-smoothing", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(a.lr),
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(a.warmup), "--clip-norm", "10",
            "--max-tokens", str(a.max_tokens), "--max-update", str(a.max_update),
            "--stop-time-hours", str(a.hours), "--save-interval-updates", str(a.save_every),
            "--validate-interval-updates", str(a.save_every), "--keep-interval-updates", str(KEEP),
            "--no-epoch-checkpoints", *(["--cpu"] if getattr(a, "device", "cpu") == "cpu" else []), "--num-workers", "0",
            "--log-format", "simple",
            "--log-interval", "10", "--required-batch-size-multiple", "1", "--seed", "1",
            "--save-dir", str(a.save_dir)]


def criterion_args(a: argparse.Namespace) -> list[str]:
    """fairseq's label-smoothed cross entropy, or with ``--distill TEACHER`` qswap's distillation
    criterion (``qswap.integration.distill``: the same cross entropy mixed with the teacher's
    distributions)."""
    teacher = getattr(a, "distill", None)
    if not teacher:
        return ["--criterion", "label_smoothed_cross_entropy"]
    alpha, temperature = distill_settings(a)
    return ["--criterion", "qswap_distill", "--distill-teacher", str(teacher),
            "--distill-alpha", str(alpha), "--distill-temperature", str(temperature)]


def distill_settings(a: argparse.Namespace) -> tuple[float, float]:
    """``--distill-alpha`` and ``--distill-temperature``, each the criterion's default where not
    given (``qswap.integration.distill``)."""
    from qswap.integration.distill import DEFAULT_ALPHA, DEFAULT_TEMPERATURE

    return (DEFAULT_ALPHA if a.distill_alpha is None else a.distill_alpha,
            DEFAULT_TEMPERATURE if a.distill_temperature is None else a.distill_temperature)


def use_shipped_tokenizer(data: Path) -> None:
    """The corpus's sentencepiece model and dictionary must be the shipped model's: the same
    dictionary is checked, the shipped sentencepiece model is copied over the rebuilt one (the
    rebuild trains its own on the same sentences; the bytes may differ across versions)."""
    import shutil

    from qswap.integration.data import check_data_dir

    check_data_dir(data, CORPUS)
    if not (data / MODEL_FILES[1]).is_file():
        raise DataError(f"{data}: no {MODEL_FILES[1]} (the dictionary); pass --data DIR, {CORPUS}")
    if (data / MODEL_FILES[1]).read_text() != (ASSET / MODEL_FILES[1]).read_text():
        raise DataError(f"{data}: its dictionary is not the shipped model's; rebuild the corpus "
                         f"with the parameters in {ASSET / 'README.md'}")
    shutil.copyfile(ASSET / MODEL_FILES[0], data / MODEL_FILES[0])


def check_start(a: argparse.Namespace) -> None:
    """Refuse (ConvertError naming the qswap convert command) a recipe whose transforms need
    activation statistics unless ``--from-qckpt`` is a checkpoint converted with it."""
    import qswap
    from qswap.errors import ConvertError
    from qswap.integration.qat_start import converted_start

    try:
        converted_start(qswap.load_recipe(a.recipe), a.from_qckpt, recipe_arg=a.recipe, data=a.data,
                        float_checkpoint=ASSET / "checkpoint.pt")
    except ConvertError as exc:
        raise ConvertError(f"{exc}; then run train with --from-qckpt QCKPT") from None


def check_distill(a: argparse.Namespace) -> None:
    """``--distill``'s settings checked before fairseq-train starts (``TrainingError``); a weight or
    temperature without ``--distill`` would be ignored: refused."""
    from qswap.integration.distill import check_settings

    if getattr(a, "distill", None):
        check_settings(str(a.distill), *distill_settings(a))
        if not Path(a.distill).is_file():
            raise CheckpointError(f"--distill {a.distill}: no such checkpoint; pass the teacher's checkpoint "
                             f"(the float model: {_rel(ASSET / 'checkpoint.pt')})")
    elif a.distill_alpha is not None or a.distill_temperature is not None:
        raise TrainingError("--distill-alpha and --distill-temperature weigh the distillation term: pass --distill TEACHER")


def do_train(a: argparse.Namespace) -> int:
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TrainingError("--device cuda: torch sees no GPU on this machine; train with --device cpu, or on a "
                             "machine with one (pack the corpus there: 'qat_train.py pack', then 'unpack')")
    check_start(a)
    check_distill(a)
    use_shipped_tokenizer(Path(a.data))
    Path(a.save_dir).mkdir(parents=True, exist_ok=True)
    cmd = train_command(a)
    print("$ " + " ".join(cmd), flush=True)
    with open(Path(a.save_dir) / "train.log", "a") as log:  # fairseq's own --log-file misses train_inner
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)}, stdout=log,
                              stderr=subprocess.STDOUT).returncode


def checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """(updates, path) of the run's interval checkpoints and of checkpoint_last.pt (where the
    run stopped, read from the checkpoint), in update order."""
    found = {}
    for p in save_dir.glob("checkpoint_*_*.pt"):
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", p.name)
        if m:
            found[int(m.group(1))] = p
    last = save_dir / "checkpoint_last.pt"
    if last.exists():
        from qswap.integration.fairseq_task import allow_fairseq_checkpoints
        from qswap.io.safe_load import load_checkpoint

        allow_fairseq_checkpoints()
        found.setdefault(int(load_checkpoint(last)["optimizer_history"][-1]["num_updates"]), last)
    return sorted(found.items())


def qswap_eval(checkpoint: Path, data: Path, subset: str, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "qswap.cli", "eval", str(checkpoint), "--data", str(data), "--subset", subset,
           "--json", str(out), *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def do_dev(a: argparse.Namespace) -> int:
    """Dev WER of each kept checkpoint, ``--jobs`` evaluations at a time (one thread each)."""
    from concurrent.futures import ThreadPoolExecutor

    save_dir = Path(a.save_dir)
    if not checkpoints(save_dir) and not averages(save_dir):
        what = "no checkpoints (checkpoint_last.pt, checkpoint_E_U.pt, average_F_L.pt)" if save_dir.is_dir() \
            else "no such directory"
        raise TrainingError(f"--save-dir {save_dir}: {what}; pass the --save-dir of a train run")
    from qswap.integration.data import check_data_dir
    check_data_dir(a.data, CORPUS)
    kept = checkpoints(save_dir)[-a.last:] if a.last else checkpoints(save_dir)
    todo = [(f"update {u}", path, save_dir / f"dev_{u}.json") for u, path in kept
            if (not a.updates or u in a.updates)]
    todo += [(f"average of updates {first} to {last}", path, save_dir / f"dev_average_{first}_{last}.json")
             for first, last, path in averages(save_dir)]

    def one(item):
        name, path, out = item
        r = qswap_eval(path, Path(a.data), "dev", out)
        print(f"{name}: dev WER {r['counts']['wer']:.2f}", flush=True)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(one, [t for t in todo if not t[2].exists()]))
    return 0


def do_pack(a: argparse.Namespace) -> int:
    """The corpus's ``--splits`` in compact form (``qswap.integration.compact``: features rounded to
    0.08 of each channel's std, about a seventh of the bytes), ``train`` cut into ``--parts``
    manifests ``train_1`` ... so that each travels on its own; ``unpack`` restores a fairseq
    data directory (training then reads ``--train-subset train_1,train_2,...``)."""
    from concurrent.futures import ProcessPoolExecutor

    from qswap.errors import DataError
    from qswap.integration.compact import pack
    from qswap.io.atomic import atomic_write_text

    src, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for split in a.splits:
        if not (src / f"{split}.tsv").is_file():
            raise DataError(f"{src}: no {split}.tsv; pass the corpus folder tools/make_corpus.py wrote, or --splits")
        lines = (src / f"{split}.tsv").read_text().splitlines(keepends=True)
        parts = a.parts if split == "train" else 1
        if parts == 1:
            names.append(split)
            continue
        rows, size = lines[1:], -(-(len(lines) - 1) // parts)
        for i in range(parts):
            names.append(f"{split}_{i + 1}")
            # the part's manifest beside the corpus's (compact.pack reads a split of DATA)
            atomic_write_text(src / f"{names[-1]}.tsv", lines[0] + "".join(rows[i * size:(i + 1) * size]))
    with ProcessPoolExecutor(max(1, a.jobs)) as pool:
        for target in pool.map(pack, [src] * len(names), names, [out] * len(names)):
            print(target, flush=True)
    return 0


def do_unpack(a: argparse.Namespace) -> int:
    """A fairseq data directory at ``--out`` from ``pack``'s folder(s) and the shipped model's
    config, sentencepiece and global CMVN files."""
    from qswap.errors import DataError
    from qswap.integration.compact import MODEL_FILES, materialize

    out = Path(a.out)
    for folder in a.compact:
        zips = sorted(Path(folder).glob("fbank80_*.q8.zip"))
        if not zips:
            raise DataError(f"{folder}: no fbank80_<split>.q8.zip; pass the folder 'qat_train.py pack' wrote")
        for z in zips:
            split = z.name[len("fbank80_"):-len(".q8.zip")]
            materialize(folder, split, ASSET, out, copy=(*MODEL_FILES, "gcmvn.npz"))
            print(f"{split}: {out}", flush=True)
    return 0


AVERAGE_KEEPS_LAST = ("num_batches_tracked", "observer.num_batches", "weight_quant.zero_point")


def average_states(paths: list[Path]) -> dict:
    """The fairseq-train checkpoint at ``paths[-1]`` with its model state replaced by the mean over
    ``paths`` of each floating-point tensor (weights, biases, learned scales, observed ranges:
    summed in float64, stored in the tensor's own dtype). Counters (BatchNorm's
    ``num_batches_tracked``, an observer's ``num_batches``) are the last checkpoint's; every other
    tensor (activation zero points, frozen flags) must be the same in all of them, or there is no
    average to take. A weight quantizer's zero point is the last checkpoint's: it follows the
    averaged weights at the next forward, as the weight grids do."""
    import torch

    from qswap.integration.fairseq_task import allow_fairseq_checkpoints
    from qswap.io.safe_load import load_checkpoint

    allow_fairseq_checkpoints()
    if len(paths) < 2:
        raise TrainingError(f"average needs two checkpoints or more, got {len(paths)}; pass --last N with N >= 2")
    out = load_checkpoint(paths[-1])
    states = [load_checkpoint(p)["model"] for p in paths[:-1]] + [out["model"]]
    keys = list(states[-1])
    for p, st in zip(paths, states):
        if list(st) != keys:
            raise CheckpointError(f"{p}: its model state names other tensors than {paths[-1]}'s; average "
                             f"checkpoints of one run")
    model = {}
    for k in keys:
        values = [st[k] for st in states]
        if values[-1].is_floating_point():
            model[k] = (sum(v.double() for v in values) / len(values)).to(values[-1].dtype)
        elif k.endswith(AVERAGE_KEEPS_LAST) or all(torch.equal(v, values[-1]) for v in values):
            model[k] = values[-1]
        else:
            raise CheckpointError(f"{k} ({values[-1].dtype}) differs between the checkpoints; an integer or "
                             f"bool tensor has no average (average checkpoints with the same grids)")
    out["model"] = model
    return out


def do_average(a: argparse.Namespace) -> int:
    """The mean of the last ``--last`` interval checkpoints as ``average_FIRST_LAST.pt`` in the run
    folder (not an interval checkpoint's name: ``dev`` and ``ship`` leave it alone)."""
    import torch

    from qswap.io.atomic import atomic_open, atomic_write_text

    save_dir = Path(a.save_dir)
    if a.last < 2:
        raise TrainingError(f"--last {a.last}: average at least the last 2 checkpoints")
    interval = [(u, p) for u, p in checkpoints(save_dir) if p.name != "checkpoint_last.pt"]
    if len(interval) < 2:
        raise TrainingError(f"{save_dir} has {len(interval)} interval checkpoint(s) (checkpoint_EPOCH_UPDATE.pt); "
                         f"average needs two or more")
    kept = interval[-a.last:]
    state = average_states([p for _, p in kept])
    out = save_dir / f"average_{kept[0][0]}_{kept[-1][0]}.pt"
    with atomic_open(out, "wb") as f:
        torch.save(state, f)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"updates": [u for u, _ in kept]}) + "\n")
    print(f"{len(kept)} checkpoints (updates {kept[0][0]} to {kept[-1][0]}) -> {out}")
    return 0


def dev_scores(save_dir: Path) -> dict[int, float]:
    """Dev WER of each interval checkpoint ``dev`` evaluated, by update."""
    scores = {}
    for p in save_dir.glob("dev_*.json"):
        m = re.fullmatch(r"dev_(\d+)", p.stem)
        if m:
            scores[int(m.group(1))] = json.loads(p.read_text())["counts"]["wer"]
    return dict(sorted(scores.items()))


def averages(save_dir: Path) -> list[tuple[int, int, Path]]:
    """(first update, last update, path) of each ``average_FIRST_LAST.pt`` that ``average`` wrote."""
    found = []
    for p in save_dir.glob("average_*_*.pt"):
        m = re.fullmatch(r"average_(\d+)_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def average_scores(save_dir: Path) -> dict[tuple[int, int], float]:
    """Dev WER of each average ``dev`` evaluated, by (first update, last update)."""
    scores = {}
    for p in save_dir.glob("dev_average_*_*.json"):
        m = re.fullmatch(r"dev_average_(\d+)_(\d+)", p.stem)
        if m:
            scores[(int(m.group(1)), int(m.group(2)))] = json.loads(p.read_text())["counts"]["wer"]
    return dict(sorted(scores.items()))


def do_ship(a: argparse.Namespace) -> int:
    """Store the dev-best candidate (``pick``) as a qswap checkpoint with float16 weights."""
    from qswap.io.atomic import atomic_write_text

    save_dir = Path(a.save_dir)
    path, facts = pick(save_dir)
    effect = ship(path, Path(a.out))
    atomic_write_text(save_dir / "shipped.json", json.dumps({**facts, "float16": effect}))
    name = (f"update {facts['update']}" if not facts.get("average") else
            f"the average of updates {facts['average']['first']} to {facts['average']['last']}")
    print(f"{name} (dev WER {facts['dev_wer']:.2f}) -> {a.out}; float16 storage changed {effect['changed']} "
          f"of {effect['values']} weight codes")
    return 0


def pick(save_dir: Path) -> tuple[Path, dict]:
    """The dev-best candidate of a run folder and what ``shipped.json`` says of it: an interval
    checkpoint, or an average ``average`` wrote; on a tie the average (it is no single
    checkpoint's draw of the dev set's noise), then the earlier update. Only candidates still on
    disk count; an average's size is what ``average`` wrote beside it."""
    interval = dict(checkpoints(save_dir))
    on_disk = {(first, last): path for first, last, path in averages(save_dir)}
    scores = {u: wer for u, wer in dev_scores(save_dir).items() if u in interval}
    averaged = {k: wer for k, wer in average_scores(save_dir).items() if k in on_disk}
    if not scores and not averaged:
        raise TrainingError(f"no dev results for the checkpoints in {save_dir}; run the 'dev' step first")
    candidates = [(wer, 0, first, last) for (first, last), wer in averaged.items()]
    candidates += [(wer, 1, u, u) for u, wer in scores.items()]
    wer, single, first, last = min(candidates)
    if single:
        return interval[first], {"update": first, "dev_wer": wer}
    best = min(scores, key=lambda u: (scores[u], u)) if scores else None
    path = on_disk[(first, last)]
    sidecar = path.with_suffix(".json")  # what 'average' averaged (fairseq may have pruned them since)
    count = (len(json.loads(sidecar.read_text())["updates"]) if sidecar.exists() else
             sum(1 for u, p in interval.items() if first <= u <= last and p.name != "checkpoint_last.pt"))
    return path, {
        "update": None, "dev_wer": wer, "average": {"first": first, "last": last, "count": count},
        "best_single": best, "best_single_wer": scores.get(best)}


def ship(path: Path, out: Path) -> dict:
    """The fairseq-train checkpoint at ``path`` as a qswap checkpoint at ``out``: the model's float
    parameters stored as float16 (as the shipped float model), quantizer state (learned scales,
    zero points, frozen flags) as float32. Float16 rounding is not lossless for a 4-bit grid
    derived from the weights: returns how many weight codes it changes."""
    import torch

    from qswap.integration.data import load_model_cfg_task
    from qswap.io.atomic import atomic_open
    from qswap.io.checkpoint import save_qswap_checkpoint

    model, _cfg, _task = load_model_cfg_task(path, ASSET)
    save_qswap_checkpoint(out, model, ASSET / "checkpoint.pt")
    state = torch.load(out, map_location="cpu", weights_only=True)
    params = float16_names(model)
    state["model"] = {k: v.half() if k in params and v.is_floating_point() else v for k, v in state["model"].items()}
    with atomic_open(out, "wb") as f:
        torch.save(state, f)
    return float16_effect(model)


def float16_names(model) -> set:
    """The model's parameters ship() stores as float16: all but the quantizers' own (learned
    scales), told by module type (a quantizer in a ModuleList, ``glu_quant.0.scale``, has no
    ``_quant.scale`` suffix)."""
    from qswap.quant.fake_quantize import FakeQuantize

    quantizer = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, FakeQuantize)
                 for p, _ in m.named_parameters()}
    return {n for n, _ in model.named_parameters() if n not in quantizer}


def float16_effect(model) -> dict:
    """Weight codes (integers on the grid inference uses) that change when the weights come from
    a float16 copy, over all quantized weights; the grids themselves move by float rounding."""
    import copy

    import torch

    from qswap.quant.fake_quantize import FakeQuantize

    changed = total = 0
    with torch.no_grad():
        for module in model.modules():
            for name, w in module.named_parameters(recurse=False):
                q = getattr(module, f"{name}_quant", None)
                if isinstance(q, FakeQuantize) and q.kind == "weight":
                    codes = [_codes(copy.deepcopy(q).eval(), v) for v in (w.detach().clone(), w.detach().half().float())]
                    changed += int((codes[0] != codes[1]).sum())
                    total += w.numel()
    return {"changed": changed, "values": total}


def _codes(q, w):
    out = q(w)
    scale = q.scale.detach().reshape(-1, *[1] * (w.dim() - 1)) if q.scale.numel() > 1 else q.scale.detach()
    return (out / scale).round()


# -- the curve and the doc --------------------------------------------------------------------------
TRAIN_LINE = re.compile(r"\| train_inner \|.*?loss=([\d.]+).*?num_updates=(\d+)")
VALID_LINE = re.compile(r"\| valid on 'dev' subset \| loss ([\d.]+) \|.*?\| num_updates (\d+)")


def curve(log_text: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss by update, dev loss by update) from fairseq-train's simple log."""
    train = [(int(m.group(2)), float(m.group(1))) for m in TRAIN_LINE.finditer(log_text)]
    valid = [(int(m.group(2)), float(m.group(1))) for m in VALID_LINE.finditer(log_text)]
    return train, valid


def run_facts(log_text: str) -> dict:
    """What the run's log says about the run: the recipe, where it started (the shipped float
    checkpoint, or a checkpoint ``qswap convert`` wrote), the hyperparameters of its last
    fairseq-train command line, and how many invocations (a resumed run has several)."""
    commands = [ln[2:].split() for ln in log_text.splitlines()
                if ln.startswith("$ ") and ("fairseq-train" in ln or "fairseq_cli.train" in ln)]
    if not commands:
        raise TrainingError("the log has no fairseq-train command line ('$ fairseq-train ...'); pass the "
                         "train.log that 'qat_train.py train' wrote")
    last = commands[-1]
    flag = {k: v for k, v in zip(last, last[1:]) if k.startswith("--")}
    start = Path(flag["--finetune-from-model"])
    converted = start.parts[-2:] != ASSET.parts[-1:] + ("checkpoint.pt",)  # not the shipped float checkpoint
    return {"recipe": Path(flag["--qswap-recipe"]).stem, "converted": converted, "start": str(start),
            "device": "cpu" if "--cpu" in last else "cuda", "train_subset": flag.get("--train-subset", "train"),
            "invocations": len(commands), "lr": float(flag["--lr"]), "warmup": int(flag["--warmup-updates"]),
            "max_tokens": int(flag["--max-tokens"]), "hours": float(flag["--stop-time-hours"]),
            "max_update": int(flag.get("--max-update", TRAIN_DEFAULTS["max_update"])),
            "save_every": int(flag["--save-interval-updates"]), "calib_batches": int(flag["--qswap-calib-batches"]),
            "distill": ({"teacher": flag["--distill-teacher"], "alpha": float(flag["--distill-alpha"]),
                         "temperature": float(flag["--distill-temperature"])}
                        if flag.get("--criterion") == "qswap_distill" else None)}


def do_doc(a: argparse.Namespace) -> int:
    from qswap.io.atomic import atomic_write_text

    moved = None
    if a.moved_from:
        if not a.continues:
            raise TrainingError("--moved-from names a checkpoint shipped at the --continues commit: pass --continues COMMIT")
        moved = (a.moved_from, recipe_at(a.continues, a.moved_from))
    save_dir, evals = Path(a.save_dir), Path(a.evals)
    log_text = Path(a.log or save_dir / "train.log").read_text()
    keep = [ln for ln in log_text.splitlines() if re.search(r"train_inner|valid on|qswap|done training", ln)]
    atomic_write_text(a.log_out, "\n".join(keep) + "\n")
    train, valid = curve(log_text)
    dev = dev_scores(save_dir)
    shipped = json.loads((save_dir / "shipped.json").read_text())
    page = render(train, valid, dev, evals, shipped, run_facts(log_text), Path(a.shipped), Path(a.log_out),
                  a.target, Path(a.out), a.continues, moved)
    atomic_write_text(a.out, with_training_changes(page, a.trained_with))
    print(f"wrote {a.out} and {a.log_out}")
    return 0


def recipe_at(commit: str, path: str) -> str:
    """The name of the recipe stored in the qswap checkpoint at ``path`` as git ``commit`` has it."""
    import tempfile

    from qswap.integration.qat_start import stored_recipe

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "start.pt"
        with out.open("wb") as f:
            done = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], stdout=f,
                                  stderr=subprocess.PIPE)
        if done.returncode:
            raise TrainingError(f"--moved-from {path}: git has no such file at {commit} "
                                f"({done.stderr.decode().strip().splitlines()[-1] if done.stderr else 'git failed'})")
        recipe = stored_recipe(out)
    if recipe is None:
        raise TrainingError(f"--moved-from {path}: at git {commit} it is no qswap checkpoint (no recipe stored)")
    return recipe.name


def calibration() -> str:
    """How the PTQ checkpoints were calibrated (--calib-subset train_calib --calib-batches 4)."""
    from qswap.demo import calibration_text  # qswap (torch) only where a page is written
    return calibration_text(4)


TARGET = 2.0  # issue 19: honest W4A4 with 8-bit first/last layers within +2.0 absolute WER of float
SUBSETS = ("test", "test_heldout", "test_large", "test_heldout_large")  # those with results are shown
LARGE = "python -c \"import qswap.demo as d; print(d.data_dir('SUBSET'))\""


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def render(train, valid, dev, evals: Path, shipped: dict, run: dict, shipped_path: Path = SHIPPED_QAT,
           log_path: Path = REPO / "docs" / "qat_w4a4_edges8.log", target: float = TARGET,
           doc_path: Path = REPO / "docs" / "qat.md", continues: str | None = None,
           moved_from: tuple[str, str] | None = None) -> str:
    """The page of the run. ``continues``: the git commit at which the run's start (``--from-qckpt``)
    was the shipped QAT checkpoint, which the run fine-tunes further (one more stage of QAT)."""
    train_at, valid_at = dict(train), dict(valid)
    shown = sorted({u for u in train_at if u % 50 == 0} | set(valid_at) | set(dev))
    cell = lambda table, u, fmt: fmt.format(table[u]) if u in table else ""  # noqa: E731
    rows = [f"| {u} | {cell(train_at, u, '{:.3f}')} | {cell(valid_at, u, '{:.3f}')} | {cell(dev, u, '{:.2f}')} |"
            for u in shown]
    cmp_rows, wins = comparison(evals)
    target_rows, met = against_float(evals, target)
    out, ev = _rel(shipped_path), _rel(evals)
    f16 = shipped["float16"]
    verdict = ptq_verdict(wins)
    last = max([u for u, _ in train] + [u for u, _ in valid] + list(dev), default=0)
    recipe, qckpt = run["recipe"], "QCKPT"
    gpu = run.get("device") == "cuda"
    nice = "" if gpu else "nice -n 5 "
    changed = [k for k in ("lr", "warmup", "max_tokens") + (() if run["converted"] else ("calib_batches",))
               if run[k] != TRAIN_DEFAULTS[k]]
    stopped_early = last < run["max_update"]  # by --hours: a rerun stops at the same update with --max-update
    flags = (f"--hours {run['hours']:g} --save-every {run['save_every']}"
             + "".join(f" --{k.replace('_', '-')} {run[k]:g}" for k in changed)
             + (f" --max-update {last}" if stopped_early and run["invocations"] == 1 else "")
             + (f" \\\n    --device cuda --train-subset {run['train_subset']}" if gpu else "")
             + _distill_flags(run.get("distill")))
    parts = len(run["train_subset"].split(","))
    carry = (f"python tools/qat_train.py pack --data DATA --out PACKED --parts {parts} --jobs {parts}   # to the GPU "
             f"machine\npython tools/qat_train.py unpack --compact PACKED --out DATA     # there: a fairseq data "
             f"directory\n" if gpu else "")
    kept = sorted(u for u in valid_at if u % run["save_every"] == 0)[-KEEP:]  # the interval checkpoints kept
    averaged = shipped.get("average")
    if averaged and kept and averaged["last"] != kept[-1]:
        raise TrainingError(f"the shipped average ends at update {averaged['last']}, before the run's last interval "
                            f"checkpoint ({kept[-1]}): the page's 'average --last {averaged['count']}' would average "
                            f"other checkpoints; run 'average' again at the end of the run, then 'dev' and 'ship'")
    dev_cmd = ("python tools/qat_train.py dev --data DATA --save-dir RUN" + (
        "" if set(kept) <= set(dev) else " --updates " + " ".join(str(u) for u in sorted(dev))))
    large = [sub for sub in SUBSETS[2:] if (evals / f"qat_{sub}.json").exists()]
    data = "SET" if large else "qswap/assets/s2t_demo"
    if continues:
        start, ptq_cmd, ptq_text = _continued(recipe, run, continues, data, ev, moved_from)
        train_cmd = (f"{nice}python tools/qat_train.py train --data DATA --save-dir RUN --recipe {recipe} \\\n"
                     f"    --from-qckpt START.pt {flags}")
    elif run["converted"]:
        start = (f"qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe {recipe} \\\n"
                 f"    --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o {qckpt}\n")
        train_cmd = (f"{nice}python tools/qat_train.py train --data DATA --save-dir RUN --recipe {recipe} \\\n"
                     f"    --from-qckpt {qckpt} {flags}")
        ptq_cmd = f"qswap eval {qckpt} --data {data} --subset SUBSET --json {ev}/ptq_SUBSET.json"
        ptq_text = (f"PTQ: the checkpoint `qswap convert` wrote with `{recipe}` (transforms folded with "
                    f"calibration statistics, every grid calibrated on {calibration()}), the start of "
                    f"the QAT run")
    else:
        start = ""
        train_cmd = (f"{nice}python tools/qat_train.py train --data DATA --save-dir RUN --recipe {recipe} \\\n"
                     f"    {flags}")
        ptq_cmd = (f"qswap eval qswap/assets/s2t_demo/checkpoint.pt --recipe {recipe} --data {data} \\\n"
                   f"    --subset SUBSET --calib-subset train_calib --calib-batches 4 --json {ev}/ptq_SUBSET.json")
        ptq_text = (f"PTQ: the float checkpoint converted with `{recipe}`, calibrated on {calibration()}, "
                    f"as the demo does")
    calib_note = ("" if run["converted"] else f", the first {run['calib_batches']} of them calibration steps "
                  "that change no weight")
    runs = ("one fairseq-train invocation" if run["invocations"] == 1 else
            f"{run['invocations']} fairseq-train invocations, the later ones resuming from `checkpoint_last.pt`")
    text = TEMPLATE.format(
        shipped_path=out, evals=ev, log_path=_rel(log_path), doc_path=_rel(doc_path), carry=carry,
        continues_flag=(f" --continues {continues}" if continues else "")
        + (f" --moved-from {moved_from[0]}" if moved_from else ""),
        dev_cmd=dev_cmd, calib_note=calib_note, data=data,
        further=further(target_rows),
        sets=("" if not large else f" (SET: `qswap/assets/s2t_demo` for `test` and `test_heldout`; for "
              f"{' and '.join(f'`{x}`' for x in large)}, the folder `{LARGE}` prints)"),
        where=("on one GPU (`--device cuda`), the corpus carried there in compact form (`pack` and `unpack`: "
               "features within 0.04 of each channel's standard deviation; the dev WERs below are on that dev "
               "set)" if gpu else "2 shared CPU cores, one thread, `nice -n 5`"),
        recipe=recipe, verdict=verdict, updates=last, runs=runs, curve="\n".join(rows),
        comparison="\n".join(cmp_rows), target_rows="\n".join(target_rows), target=target,
        target_verdict=float_verdict(met, target), float_header=FLOAT_HEADER,
        chosen=chosen(shipped), candidate="candidate" if shipped.get("average") else "checkpoint",
        average_cmd=(f"python tools/qat_train.py average --save-dir RUN --last {shipped['average']['count']}\n"
                     if shipped.get("average") else ""),
        changed=f16["changed"], values=f16["values"],
        percent=100.0 * f16["changed"] / max(f16["values"], 1), start=start, train_cmd=train_cmd, ptq_cmd=ptq_cmd,
        ptq_text=ptq_text, lr=run["lr"], warmup=run["warmup"], max_tokens=run["max_tokens"],
        loss=_loss_text(run.get("distill")),
        loss_column=("the criterion's loss (the mixture above)" if run.get("distill") else "label-smoothed cross entropy"),
        calib=("grids from the start checkpoint (no calibration batches)" if continues else
               "grids from the converted checkpoint (no calibration batches)" if run["converted"] else
               f"{run['calib_batches']} calibration batches"))
    return text + (SPEED_NOTE if Path(shipped_path).resolve() == SHIPPED_QAT.resolve() else "")


def chosen(shipped: dict) -> str:
    """Which checkpoint ``ship`` stored (its ``shipped.json``), as the page says it."""
    if not shipped.get("average"):
        return f"the dev-best one above (update {shipped['update']}, dev WER {shipped['dev_wer']:.2f} %)"
    avg = shipped["average"]
    single = ("" if shipped.get("best_single") is None else
              f"; the best single checkpoint above: update {shipped['best_single']}, dev WER "
              f"{shipped['best_single_wer']:.2f} %")
    return (f"the mean of the {avg['count']} interval checkpoints of updates {avg['first']} to {avg['last']} "
            f"(`qat_train.py average`: weights and learned scales averaged), dev WER {shipped['dev_wer']:.2f} %, "
            f"the dev-best candidate{single}")


def _continued(recipe: str, run: dict, commit: str, data: str, ev: str,
               moved_from: tuple[str, str] | None = None) -> tuple[str, str, str]:
    """(the start's commands, the PTQ eval command, the PTQ sentence) of a run that fine-tunes the
    QAT checkpoint shipped at git ``commit`` further: the start comes out of git, PTQ is the
    recipe's as for a first-stage run (its own conversion where its transforms need statistics).
    ``moved_from``: (its path in the repo, its recipe) where that checkpoint was trained with
    another recipe and ``qswap convert`` moved it onto this one's grids (``qswap.regrid``) to
    make the start."""
    import qswap
    from qswap.transforms import needs_data

    start = Path(run["start"])
    rel = start.resolve().relative_to(REPO) if start.resolve().is_relative_to(REPO) else start
    if moved_from:
        rel, old = moved_from
        lines = (f"git show {commit}:{rel} > SHIPPED.pt    # the QAT checkpoint shipped at git {commit} "
                 f"(recipe {old})\n"
                 f"qswap convert SHIPPED.pt --recipe {recipe} \\\n    --data qswap/assets/s2t_demo "
                 f"--calib-subset train_calib --calib-batches 1 -o START.pt    # moved onto its grids, the start\n")
    else:
        lines = f"git show {commit}:{rel} > START.pt    # the QAT checkpoint shipped at git {commit}, the start\n"
    if needs_data(qswap.load_recipe(recipe).transforms):
        lines += (f"qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe {recipe} \\\n"
                  f"    --data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o QCKPT\n")
        ptq_cmd = f"qswap eval QCKPT --data {data} --subset SUBSET --json {ev}/ptq_SUBSET.json"
        ptq = (f"PTQ: the checkpoint `qswap convert` wrote with `{recipe}` (transforms folded with calibration "
               f"statistics, every grid calibrated on {calibration()})")
    else:
        ptq_cmd = (f"qswap eval qswap/assets/s2t_demo/checkpoint.pt --recipe {recipe} --data {data} \\\n"
                   f"    --subset SUBSET --calib-subset train_calib --calib-batches 4 --json {ev}/ptq_SUBSET.json")
        ptq = f"PTQ: the float checkpoint converted with `{recipe}`, calibrated on {calibration()}, as the demo does"
    simulate = qswap.load_recipe(recipe).simulate
    moved = ("" if not moved_from else
             f", trained with recipe `{moved_from[1]}` and moved onto this recipe's grids by `qswap convert` "
             f"(`qswap.regrid`: its weights and learned scales kept, each site whose grid this recipe changes "
             f"calibrated afresh on `train_calib`, alone)")
    ptq += (f". The run continues QAT: it fine-tunes `{rel}` as shipped at git {commit} (itself trained by QAT, "
            f"which the page of that commit describes{moved}) further, computing in training what the "
            f"evaluations below compute (the recipe's `simulate: {simulate}`, qswap.nn.simulate)")
    return lines, ptq_cmd, ptq


def _distill_flags(distill: dict | None) -> str:
    if not distill:
        return ""
    return (f" \\\n    --distill {distill['teacher']} --distill-alpha {distill['alpha']:g} "
            f"--distill-temperature {distill['temperature']:g}")


def _loss_text(distill: dict | None) -> str:
    """The run's loss, as the page's settings line names it."""
    if not distill:
        return "fairseq's label-smoothed cross entropy (0.1)"
    return (f"qswap's distillation criterion (`qswap_distill`): {distill['alpha']:g} x the KL divergence to the "
            f"output distributions of `{distill['teacher']}` (temperature {distill['temperature']:g}) + "
            f"{1 - distill['alpha']:g} x fairseq's label-smoothed cross entropy (0.1)")


def comparison(evals: Path) -> tuple[list[str], list[str]]:
    """Markdown rows QAT vs PTQ per shipped test set from ``qswap eval --json`` results, and the
    subsets where QAT is better by more than the interval."""
    from qswap.integration.bootstrap import as_interval, value_text
    from qswap.integration.compare import significance_text

    rows, wins = [], []
    for subset in SUBSETS:
        ptq, qat = evals / f"ptq_{subset}.json", evals / f"qat_{subset}.json"
        if not (ptq.exists() and qat.exists()):
            continue
        p, q = json.loads(ptq.read_text()), json.loads(qat.read_text())
        rows.append(f"| {subset} | {value_text(p['counts']['wer'], p['wer_ci'])} | "
                    f"{value_text(q['counts']['wer'], q['wer_ci'])} | "
                    f"{value_text(q['delta_wer'], q['delta_wer_ci'], '+')} | {significance_text(q['significant'])} |")
        if q["significant"] and as_interval(q["delta_wer_ci"]).high < 0:
            wins.append(subset)
    return rows, wins


def against_float(evals: Path, target: float = TARGET) -> tuple[list[str], dict[str, list[str]]]:
    """Markdown rows QAT vs the float model per test set (``float_<subset>.json``: ``qswap eval``
    of the float checkpoint with ``--recipe fp32``), QAT - float with its paired bootstrap interval
    (``qswap.integration.bootstrap.paired_delta``), and the sets by verdict: "met" where the whole
    interval lies at or below +``target``, "not met" where it lies above, "undecided" where it
    spans the target (the point estimate alone decides nothing there)."""
    from qswap.integration.bootstrap import Bootstrap, paired_delta, value_text

    rows, verdicts = [], {"met": [], "not met": [], "undecided": []}
    for subset in SUBSETS:
        flt, qat = evals / f"float_{subset}.json", evals / f"qat_{subset}.json"
        if not (flt.exists() and qat.exists()):
            continue
        f, q = json.loads(flt.read_text()), json.loads(qat.read_text())
        bootstrap = Bootstrap(**{k: q["bootstrap"][k] for k in ("resamples", "seed", "confidence")})
        delta, ci = paired_delta(q["utterances"], f["utterances"], bootstrap, f"{flt.name} (the float model)")
        verdict = ("undecided" if ci is None or ci.low <= target < ci.high else
                   "met" if ci.high <= target else "not met")
        shown = {"met": "met", "not met": "**not met**", "undecided": "undecided"}[verdict]
        rows.append(f"| {subset} | {f['counts']['wer']:.2f} | {q['counts']['wer']:.2f} | "
                    f"{value_text(delta, ci, '+')} | {shown} |")
        verdicts[verdict].append(subset)
    return rows, verdicts


FLOAT_HEADER = "| subset | float WER % | QAT WER % | QAT - float [95 % CI] | target |"


def ptq_verdict(wins: list[str]) -> str:
    return (f"QAT beats PTQ by more than the interval on: {', '.join(wins)}." if wins else
            "QAT does not beat PTQ by more than the interval on any of the sets.")


def float_verdict(verdicts: dict[str, list[str]], target: float) -> str:
    """The sentence under the float table: where the interval puts QAT within +``target`` of
    float, where above it, and where it cannot tell."""
    met, missed, open_ = verdicts["met"], verdicts["not met"], verdicts["undecided"]
    text = (f"Within +{target:.1f} of float (the whole interval) on: {', '.join(met)}." if met else
            f"Within +{target:.1f} of float (the whole interval) on none of the sets.")
    if missed:
        text += f" Beyond it (the whole interval) on: {', '.join(missed)}."
    if open_:
        text += f" Undecided (the interval spans +{target:.1f}) on: {', '.join(open_)}."
    return text


FURTHER = (" QAT is also further training of the float model on its own corpus: where it lands below "
           "float, the cost of quantization alone is measured against a float fine-tune of the same "
           "length, which was not run.")


def further(target_rows: list[str]) -> str:
    """The sentence after the float verdict where QAT lands below float on some set."""
    return FURTHER if any(" | -" in row for row in target_rows) else ""


def refreshed(page: str, evals: Path) -> str:
    """``page`` (written by ``doc``) with its two comparison tables, their verdicts and the
    sentence after them rendered again from the eval JSONs in ``evals`` (PTQ, QAT and float
    ``qswap eval`` results; the run itself is not needed), against the target the page states:
    what ``doc`` writes when only those evaluations change. Sets with results must be the ones
    the page shows (a new set changes the commands too: run ``doc``)."""
    found = re.search(r"within \+([0-9.]+) absolute WER\)", page)
    if found is None:
        raise TrainingError("the page states no target ('within +T absolute WER'); write it with 'doc' first")
    target = float(found.group(1))
    cmp_rows, wins = comparison(evals)
    target_rows, met = against_float(evals, target)
    shown = set(re.findall(r"^\| (test\w*) \|", page, flags=re.M))
    if shown != {row.split(" | ")[0][2:] for row in cmp_rows + target_rows}:
        raise TrainingError(f"{evals} has results for other sets than the page shows ({', '.join(sorted(shown))}); "
                         "write the page with 'doc'")
    page = _rows_after(page, "| subset | PTQ WER % [95 % CI] |", cmp_rows)
    page = re.sub(r"^\| subset \| float WER % \| QAT WER % \|[^\n]*$", FLOAT_HEADER, page, count=1, flags=re.M)
    page = _rows_after(page, FLOAT_HEADER, target_rows)
    page = re.sub(r"QAT (beats PTQ by more than the interval on: [^\n]*?\.|does not beat PTQ by more than the "
                  r"interval on any of the sets\.)", lambda m: ptq_verdict(wins), page, count=1)
    page = page.replace(FURTHER, "", 1)
    page = re.sub(r"Within \+[0-9.]+ of float (\(the whole interval\) )?on(:[^\n]*?| none of the sets)\."
                  r"( Beyond it \(the whole interval\) on:[^\n]*?\.)?( Undecided \(the interval spans [^\n]*?\) on:[^\n]*?\.)?",
                  lambda m: float_verdict(met, target) + further(target_rows), page, count=1)
    return page


def _rows_after(page: str, header: str, rows: list[str]) -> str:
    """The rows of the table whose header line starts with ``header`` replaced by ``rows``."""
    lines = page.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    if start is None:
        raise TrainingError(f"the page has no table headed {header!r}; write it with 'doc' first")
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start + 2] + rows + lines[end:])


def do_refresh(a: argparse.Namespace) -> int:
    from qswap.io.atomic import atomic_write_text

    if a.evals is None and a.trained_with is None:
        raise TrainingError("refresh needs --evals (the comparisons) or --trained-with (the training arithmetic "
                            "section), or both")
    if not Path(a.page).is_file():
        raise TrainingError(f"--page {a.page} does not exist; name a page 'doc' wrote (docs/qat*.md)")
    if a.evals is not None and not Path(a.evals).is_dir():
        raise TrainingError(f"--evals {a.evals} is not a folder of 'qswap eval' results; pass the folder 'eval' "
                            f"wrote")
    page = Path(a.page).read_text()
    if a.evals is not None:
        page = refreshed(page, Path(a.evals))
    if a.trained_with is not None:
        page = with_training_changes(page, a.trained_with)
    atomic_write_text(a.page, page)
    print(f"wrote {a.page}")
    return 0


# Commits that changed what a training step computes (not what evaluation computes), with what they
# changed: a page whose run trained before one of them says so (``training_changes``).
TRAINING_CHANGES = (
    ("4087de7", "the LSQ training forward rounds `x * float32(1 / s)`, as evaluation, torch's kernels and the "
                "integer forms do (it computed `x / s`: near-tie inputs came out a step apart between training and "
                "evaluation on the same grid), and the gradient-scaled scale has the scale's value exactly"),
)
CHANGES_HEADER = "## Training arithmetic after this run"


def training_changes(trained_with: str, repo: Path = REPO) -> str:
    """The page's section on ``TRAINING_CHANGES`` the run at git ``trained_with`` did not have
    (none: ''). Evaluation is unchanged by them: the page's evaluations of the shipped checkpoint
    reproduce; a rerun of its training commands trains with the current arithmetic."""
    commit = _git(repo, "rev-parse", "--short", f"{trained_with}^{{commit}}")
    missing = [(c, what) for c, what in TRAINING_CHANGES if not _has_commit(repo, commit, c)]
    if not missing:
        return ""
    items = "\n".join(f"- {c}: {what}." for c, what in missing)
    return (f"{CHANGES_HEADER}\n\nThe run trained with qswap as of git {commit}. Since then a training step "
            f"computes differently (evaluation does not: the evaluations above are of the shipped checkpoint "
            f"and reproduce; a rerun of the training commands trains with today's arithmetic, so its curve and "
            f"checkpoint would differ):\n\n{items}\n")


def with_training_changes(page: str, trained_with: str) -> str:
    """``page`` with its training-arithmetic section (``training_changes``) written for a run at
    ``trained_with``: replaced where the page has one, else added at the end; none where the run
    had every change."""
    at = page.find(CHANGES_HEADER)
    if at >= 0:
        nxt = page.find("\n## ", at + len(CHANGES_HEADER))
        page = page[:at].rstrip("\n") + "\n" + (page[nxt:] if nxt >= 0 else "")
    section = training_changes(trained_with)
    return page if not section else page.rstrip("\n") + "\n\n" + section


def _has_commit(repo: Path, commit: str, change: str) -> bool:
    """Whether git ``commit`` has ``change`` in its history; a TrainingError where git cannot tell
    (a shallow clone without ``change``)."""
    done = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", change, commit],
                          capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise TrainingError(f"git cannot tell whether {commit} has {change} ({done.stderr.strip() or 'failed'}): "
                            f"fetch the whole history (git fetch --unshallow)")
    return done.returncode == 0


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TrainingError(f"git {' '.join(args)}: {done.stderr.strip() or 'failed'} (give a commit of this "
                            f"repository)")
    return done.stdout.strip()


TEMPLATE = """# QAT of the shipped model (fairseq-train, LSQ scales): `{recipe}`

Written by `tools/qat_train.py doc` from the run's log (`{log_path}`, the filtered
fairseq-train log) and `qswap eval` results. Reproduce{sets}:

```sh
python tools/make_corpus.py --out DATA --num-train 7000 --num-dev 200 --num-test 100 --seed 1 --jobs 1
{carry}{start}{train_cmd}
{average_cmd}{dev_cmd}
python tools/qat_train.py ship --save-dir RUN --out {shipped_path}    # the dev-best {candidate}
{ptq_cmd}
qswap eval qswap/assets/s2t_demo/checkpoint.pt --recipe fp32 --data {data} --subset SUBSET \\
    --json {evals}/float_SUBSET.json
qswap eval {shipped_path} --data {data} --subset SUBSET \\
    --baseline {evals}/ptq_SUBSET.json --json {evals}/qat_SUBSET.json
python tools/qat_train.py doc --save-dir RUN --evals {evals} --shipped {shipped_path} --target {target:g} \\
    --out {doc_path} --log-out {log_path}{continues_flag}
```

(lr {lr:g}, inverse square root schedule with {warmup} warm-up updates, Adam (0.9, 0.98), clip 10,
batches of at most {max_tokens:,} frames, {calib}; {loss}.)

## Training curve

The run made {updates} updates in {runs}{calib_note} (an invocation ends at fairseq's
`--stop-time-hours`, or when it is stopped: the session running it ends, or by hand; {where}). Rows: every 50th update and every update with a dev
measurement. Train loss: fairseq's `train_inner` ({loss_column}, mean over the last
10 updates); dev loss: fairseq's validation on `dev`; dev WER: `qswap eval CKPT --subset dev`
(beam 5), for the checkpoints `dev` evaluated (fairseq-train keeps the last 20 interval checkpoints).

| update | train loss | dev loss | dev WER % |
|---|---|---|---|
{curve}

## QAT against PTQ of the same recipe

{ptq_text}. QAT: the shipped checkpoint, {chosen} stored with float16 weights. ΔWER = QAT - PTQ with the paired bootstrap
interval (`qswap/integration/bootstrap.py`: 2,000 resamples, 95 %); significant when the
interval excludes 0.

| subset | PTQ WER % [95 % CI] | QAT WER % [95 % CI] | ΔWER [95 % CI] | significant |
|---|---|---|---|---|
{comparison}

{verdict}

## Against the float model (issue 19's target: within +{target:.1f} absolute WER)

{float_header}
|---|---|---|---|---|
{target_rows}

{target_verdict}{further}

The shipped checkpoint is `{shipped_path}`: a qswap checkpoint (recipe
`{recipe}` inside) whose float weights are stored as float16 and whose quantizer state
(learned scales, zero points, frozen flags) is float32; `qswap eval`, `qswap audit` and
fairseq-generate with the plugin load it as it is. Float16 storage is not lossless for 4-bit
grids derived from the weights: it changes {changed:,} of the {values:,} weight codes of the
training checkpoint ({percent:.2f} %; the grids move by float rounding); the QAT WERs above are
the shipped file's.
"""

SPEED_NOTE = """
## Decoding speed of a QAT checkpoint

docs/fairseq.md once showed the QAT checkpoint decoding in 111.2 s against 11.1 s for the PTQ
one. Nothing in a QAT checkpoint makes decoding slower: loaded through fairseq, a checkpoint
trained with learned scales runs exactly the aten ops of a PTQ checkpoint of the same recipe, as
many times, with every activation grid frozen, no autograd graph and each weight fake-quantized
once (`tests/integration/test_qat_decode.py`; `tools/bench.py` times it as `qat_decode`). The
walkthrough ran each fairseq command with torch's default of one intra-op thread per core on a
2-core machine that other processes kept busy: an op split over two threads waits for a
descheduled sibling, which slowed some commands tenfold and not others (the two timings also
came from different recipes, w8a8 and w4a8). `tools/fairseq_walkthrough.py` now runs every
command with one thread (`--threads`).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run fairseq-train (QAT)")
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--save-dir", required=True)
    t.add_argument("--recipe", default=str(REPO / "recipes" / "w4a4_edges8_lsq.yaml"))
    t.add_argument("--from-qckpt", type=Path, help="fine-tune from this qswap checkpoint (qswap convert with "
                   "--recipe) instead of the shipped float one; needed when the recipe's transforms need data")
    t.add_argument("--calib-batches", type=int, default=TRAIN_DEFAULTS["calib_batches"])
    t.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    t.add_argument("--warmup", type=int, default=TRAIN_DEFAULTS["warmup"])
    t.add_argument("--max-tokens", type=int, default=TRAIN_DEFAULTS["max_tokens"])
    t.add_argument("--max-update", type=int, default=TRAIN_DEFAULTS["max_update"])
    t.add_argument("--hours", type=float, default=0.75, help="fairseq's --stop-time-hours")
    t.add_argument("--save-every", type=int, default=40, help="updates between checkpoints/validations")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--distill", type=Path, metavar="TEACHER", help="distil from this checkpoint (the float "
                   "model: qswap/assets/s2t_demo/checkpoint.pt) with qswap's criterion qswap_distill")
    t.add_argument("--distill-alpha", type=float, help="weight of the distillation term (default: the criterion's)")
    t.add_argument("--distill-temperature", type=float,
                   help="softmax temperature of the term (default: the criterion's)")
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: fairseq-train on the GPU")
    t.add_argument("--train-subset", default="train", help="fairseq's --train-subset (unpack: train_1,train_2,...)")
    d = sub.add_parser("dev", help="dev WER of each saved checkpoint (qswap eval)")
    d.add_argument("--data", required=True, type=Path)
    d.add_argument("--save-dir", required=True)
    d.add_argument("--updates", type=int, nargs="*", help="only these checkpoints")
    d.add_argument("--jobs", type=int, default=1, help="evaluations at a time")
    d.add_argument("--last", type=int, help="only the last N checkpoints")
    k = sub.add_parser("pack", help="the corpus in compact form, to carry it to another machine")
    k.add_argument("--data", required=True, type=Path)
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--splits", nargs="+", default=["dev", "train"])
    k.add_argument("--parts", type=int, default=1, help="cut train into this many parts")
    k.add_argument("--jobs", type=int, default=1, help="parts packed at a time")
    u = sub.add_parser("unpack", help="a fairseq data directory from pack's folders")
    u.add_argument("--compact", required=True, nargs="+", type=Path)
    u.add_argument("--out", required=True, type=Path)
    v = sub.add_parser("average", help="the mean of the last N interval checkpoints (weights and learned scales)")
    v.add_argument("--save-dir", required=True)
    v.add_argument("--last", type=int, default=5)
    s = sub.add_parser("ship", help="store the dev-best checkpoint as the shipped QAT checkpoint")
    s.add_argument("--save-dir", required=True)
    s.add_argument("--out", required=True, help=f"the qswap checkpoint to write (W4A4's: {_rel(SHIPPED_QAT)})")
    o = sub.add_parser("doc", help="write docs/qat.md (or --out) and the run's filtered log")
    o.add_argument("--save-dir", required=True)
    o.add_argument("--log", help="the run's log (default: SAVE_DIR/train.log)")
    o.add_argument("--evals", required=True, help="folder with ptq_<subset>.json and qat_<subset>.json")
    o.add_argument("--out", required=True, help="the page (docs/qat.md, docs/qat_w4a8.md)")
    o.add_argument("--log-out", required=True, help="the filtered log beside it")
    o.add_argument("--shipped", required=True, help="the checkpoint 'ship' wrote (named in the page)")
    o.add_argument("--continues", metavar="COMMIT", help="the run fine-tuned the QAT checkpoint shipped at this "
                   "git commit (--from-qckpt): the page says so and takes the start out of git")
    o.add_argument("--moved-from", metavar="PATH", help="with --continues: the start was this checkpoint (its path "
                   "in the repo at that commit), trained with another recipe and moved onto the run's grids with "
                   "'qswap convert SHIPPED.pt --recipe R' (qswap.regrid): the page shows that command")
    o.add_argument("--target", type=float, required=True, help="issue 19's target for this recipe: WER "
                   "within +TARGET of float (2.0: W4A4 with 8-bit edges; 0.5: W4A8)")
    o.add_argument("--trained-with", default="HEAD", metavar="COMMIT", help="the qswap commit the run trained "
                   "with (default HEAD): the page lists the training-arithmetic changes it lacks")
    r = sub.add_parser("refresh", help="render a page's PTQ and float comparisons again from --evals (the "
                                       "evaluations changed, the run did not)")
    r.add_argument("--page", required=True, help="the page 'doc' wrote (docs/qat.md, docs/qat_w4a8.md)")
    r.add_argument("--evals", help="folder with ptq_, qat_ and float_<subset>.json (against the target the "
                                   "page states)")
    r.add_argument("--trained-with", metavar="COMMIT", help="the qswap commit the run trained with: the page's "
                   "section on the training-arithmetic changes it lacks is written again")
    a = p.parse_args(argv)
    if a.cmd == "pack" and a.parts < 1:
        p.error(f"--parts takes a count of at least 1; got {a.parts}")
    command = {"train": do_train, "dev": do_dev, "average": do_average, "ship": do_ship, "doc": do_doc,
               "pack": do_pack, "unpack": do_unpack, "refresh": do_refresh}[a.cmd]
    return exit_status(lambda: command(a))


if __name__ == "__main__":
    sys.exit(main())
