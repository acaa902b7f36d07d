"""Writes docs/deploy.md (and docs/deploy.json): qswap's ONNX deployment measured in one run.

    PYTHONPATH=$PWD python tools/deploy_doc.py --threads 2

On the shipped model (calibrated on the shipped ``train_calib`` subset, its 32 utterances, as the
demo does; beam 5):
- WER of onnxruntime on qswap's exported graphs vs the fake-quant torch model, for w8a8, w4a8 and
  the searched recipe, on ``test`` and ``test_heldout``, with the paired bootstrap interval of the
  difference (qswap.integration.bootstrap), and each graph's agreement in grid steps;
- the deploy audit (``qswap audit DIR --onnx``) of every shipped recipe;
- encoder latency and full decoding of ``test`` (interleaved medians): onnxruntime int8 vs torch
  fp32 eager and vs onnxruntime fp32 of the same graph, beside ``torch.ao`` ``quantize_dynamic``
  and onnxruntime's own static quantization (MatMul/Gemm/Conv only, its own calibration on the
  same batches), with their WER and float-node counts; file sizes.
On an s2t_transformer_s-sized model (random weights, random calibration): encoder latency and
file sizes (tools/onnx_bench.py). The machine may be loaded: the numbers are one run's.

``--sizes-only`` measures only the size section (a minute): the shipped model exported in fp32
(qswap's float graph of the same structure, the baseline of the ratios) and with every recipe of
SIZE_RECIPES, each file's bytes and where they go (``byte_breakdown``), and the
s2t_transformer_s-sized encoder's; it is stored in --json beside the other sections and the page
re-rendered.

``--wer-only`` measures only the WER section (minutes): the WER recipes exported and decoded on
both subsets beside the fake-quant model, each graph's agreement, the sites where the graphs'
codes differ from the fake-quant model's (``tools/onnx_sites.py``), the fake-quant model's own
WER with every activation scale moved by one float32 ulp (how far its WER moves for rounding
alone), and the deploy audit of every recipe's export; it is stored in --json beside the other
sections and the page re-rendered.

``--low-bit`` measures only the deploy audit of every shipped recipe and the searched one (the 4-bit-activation ones
included) and the shipped 4-bit-activation QAT checkpoint (``qat_w4a4_edges8.pt``) exported as it
is: its deploy audit and its WER on both subsets as ``qswap eval`` decodes it (integer insides),
with float insides, and in onnxruntime (minutes); stored in --json beside the other sections and
the page re-rendered.

``--wer-large`` measures only the WER rows on the two large shipped sets
(``qswap.demo.LARGE_SUBSETS``: 1,000 and 600 utterances; minutes), and with ``--ulp-seeds`` (default
5) the fake-quant model's one-ulp spread on them: the same exports and decodes as ``--wer-only``'s
rows, where the fake-quant model's own rounding spread is smaller than on 100 utterances; stored
in --json beside the other sections and the page re-rendered.

``--architectures`` measures only the architecture table (seconds): small random fairseq models
of each exported architecture (s2t_transformer; s2t_conformer with abs, rel_pos and rope
positions; wav2vec 2.0 CTC post- and pre-norm), w8a8 calibrated on random inputs, each graph's
agreement with the fake-quant model and the deploy audit's node counts; it is stored in --json
beside the other sections and the page re-rendered.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench import busy_processes, interleaved_medians, machine, wait_idle  # noqa: E402
import onnx_bench  # noqa: E402
from tool_cli import positive_int  # noqa: E402

import qswap  # noqa: E402
from qswap.errors import ExportError  # noqa: E402
from qswap.export.agreement import agreement, ctc_agreement  # noqa: E402
from qswap.export.onnx_audit import audit_export  # noqa: E402
from qswap.export.package import (GRAPHS, NO_QUANT, export_model, graph_digest, read_manifest,  # noqa: E402
                                  write_manifest)
from qswap.export.onnx import load_session, run_encoder  # noqa: E402
from qswap.export.runtime import OrtS2TModel, load_exported  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402
from qswap.integration.bootstrap import Bootstrap, as_interval, bounds, delta_interval, significant, value_text  # noqa: E402
from qswap.integration.decode import decode  # noqa: E402
from qswap.integration.metrics import error_counts, utterance_word_errors  # noqa: E402
from qswap.demo import LARGE_SUBSETS  # noqa: E402
from qswap.io.atomic import atomic_write_text  # noqa: E402
from qswap.recipe.loader import shipped_recipe_names  # noqa: E402

ASSET = ROOT / "qswap" / "assets" / "s2t_demo"
WER_RECIPES = {"w8a8": "w8a8", "w4a8": "w4a8", "searched": str(ASSET / "searched.yaml")}
SUBSETS = ("test", "test_heldout")
BEAM = 5
CALIB_BATCHES = 4
TARGETS = {"encoder_vs_torch": 2.0, "encoder_vs_ort_fp32": 1.6, "decode_vs_torch": 1.5,
           "w8a8_size": 0.27, "w4_packed_size": 0.15, "wer_gap": 0.3}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "deploy.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "deploy.json"))
    section = ap.add_mutually_exclusive_group()  # one section a run: a second flag had been ignored
    section.add_argument("--render-only", action="store_true",
                    help="rewrite --out from the measurements already in --json (no measuring)")
    section.add_argument("--architectures", action="store_true",
                    help="measure only the architecture table into --json, then re-render --out")
    section.add_argument("--sizes-only", action="store_true",
                    help="measure only the graphs' sizes into --json, then re-render --out")
    section.add_argument("--wer-only", action="store_true",
                    help="measure only the WER section and the deploy audit into --json, then re-render --out")
    section.add_argument("--wer-large", action="store_true",
                    help="measure only the WER rows on the large shipped sets (test_large, test_heldout_large) "
                         "into --json, then re-render --out")
    section.add_argument("--low-bit", action="store_true",
                    help="measure only the deploy audit of every shipped recipe and the shipped 4-bit-activation QAT "
                         "checkpoint's export (audit, and WER on test and test_heldout) into --json, then re-render --out")
    section.add_argument("--sites-only", action="store_true",
                    help="measure only the site-by-site table (tools/onnx_sites.py on the WER recipes' exports) "
                         "into --json, then re-render --out")
    section.add_argument("--speed-only", action="store_true",
                    help="measure only the speed sections (shipped model and s2t_transformer_s) into --json, "
                         "then re-render --out")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="--speed-only: wait up to this many seconds for no other process to use a fifth of a core "
                         "before timing (the 2 cores are shared; torch's thread pool slows many times when one is busy)")
    ap.add_argument("--ulp-seeds", type=int, default=5,
                    help="fake-quant decodes with activation scales moved by one ulp, per recipe and subset "
                         "(--wer-only --ulp-seeds 0 keeps the stored ones)")
    args = ap.parse_args(argv)
    if args.wait_idle and not args.speed_only:
        ap.error("--wait-idle applies to --speed-only (the timed sections) only")
    command = "PYTHONPATH=$PWD python tools/deploy_doc.py " + " ".join(argv or sys.argv[1:])
    if args.sizes_only:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        with tempfile.TemporaryDirectory(prefix="qswap-sizes-") as tmp:
            tmp = Path(tmp)
            float_dir = export_float(model, cfg, tmp / "float")
            dirs = {}
            for name in SIZE_RECIPES:
                log(f"export {name}")
                export_model(calibrated(model, WER_RECIPES.get(name, name), calib), tmp / name, task_cfg=cfg.task,
                             audit=False)
                dirs[name] = tmp / name
            result["sizes"] = {"command": command, **shipped_sizes(model, float_dir, dirs), "s_model": s_model_sizes()}
        write(result, args)
        return result
    if args.wer_only:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        with tempfile.TemporaryDirectory(prefix="qswap-wer-") as tmp:
            exports = export_recipes(model, cfg, task, calib, Path(tmp))
            result["honesty"] = {name: e["audit"] for name, e in exports.items()}
            result["honesty_command"] = command
            result["wer"] = wer_rows(task, exports, args.threads)
            result["wer_sites"], result["wer_sites_command"] = site_rows(task, exports), command
            if args.ulp_seeds:  # 0: the stored rows stay (the fake-quant model's own, no export in them)
                result["wer_ulp"], result["wer_ulp_command"] = ulp_rows(task, exports, args.ulp_seeds), command
            else:
                result.setdefault("wer_ulp_command", result.get("wer_command", result["command"]))
        result["wer_command"] = command
        write(result, args)
        return result
    if args.sites_only:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        with tempfile.TemporaryDirectory(prefix="qswap-sites-") as tmp:
            exports = export_recipes(model, cfg, task, calib, Path(tmp), names=tuple(WER_RECIPES))
            result["wer_sites"], result["wer_sites_command"] = site_rows(task, exports), command
        write(result, args)
        return result
    if args.low_bit:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        with tempfile.TemporaryDirectory(prefix="qswap-low-bit-") as tmp:
            exports = export_recipes(model, cfg, task, calib, Path(tmp))  # every row of the honesty table
            result["honesty"].update({name: e["audit"] for name, e in exports.items()})
            result["honesty_command"] = command
            result["qat"] = {"command": command, **qat_rows(task, Path(tmp), args.threads)}
        write(result, args)
        return result
    if args.wer_large:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        with tempfile.TemporaryDirectory(prefix="qswap-wer-large-") as tmp:
            exports = export_recipes(model, cfg, task, calib, Path(tmp), names=tuple(WER_RECIPES))
            result["wer_large"] = {"command": command, "rows": wer_rows(task, exports, args.threads,
                                                                         subsets=LARGE_SUBSETS, with_agreement=False)}
            if args.ulp_seeds:  # the fake-quant model's own rounding spread on the same sets
                result["wer_large"]["ulp"] = ulp_rows(task, exports, args.ulp_seeds, subsets=LARGE_SUBSETS)
        write(result, args)
        return result
    if args.speed_only:
        result, (model, cfg, task, calib) = json.loads(Path(args.json).read_text()), shipped_model(args)
        result.update({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                       "onnxruntime": _ort().__version__, "speed_command": command, "cpu": machine()["cpu"]})
        with tempfile.TemporaryDirectory(prefix="qswap-speed-") as tmp:  # w8a8: the int8 system measured
            exports = export_recipes(model, cfg, task, calib, Path(tmp), names=("w8a8",))
            result["busy_at_start"] = settled_idle(args.wait_idle) if args.wait_idle else busy_processes()
            before = cpu_accounts()
            result["shipped_speed"] = shipped_speed(model, cfg, task, calib, exports, Path(tmp), args)
            result["other_cores_during_timing"] = other_cores(before, cpu_accounts())
            result["busy_at_end"] = busy_processes()
            write(result, args)
            result["s_model"] = s_model(args)
        write(result, args)
        return result
    if args.render_only or args.architectures:
        result = json.loads(Path(args.json).read_text())
        if args.architectures:
            torch.set_num_threads(args.threads)
            warnings.simplefilter("ignore")
            result["architectures"] = {"command": command, "rows": architecture_rows()}
            atomic_write_text(args.json, json.dumps(result, indent=1, sort_keys=True) + "\n")
        atomic_write_text(args.out, render(result))
        return result
    model, cfg, task, calib = shipped_model(args)
    result = {"command": command, "threads": args.threads, "repeats": args.repeats, "beam": BEAM,
              "torch": torch.__version__, "onnxruntime": _ort().__version__, "cpu": machine()["cpu"]}
    result["targets"] = TARGETS
    result["partial"] = True
    with tempfile.TemporaryDirectory(prefix="qswap-deploy-") as tmp:
        tmp = Path(tmp)
        exports = export_recipes(model, cfg, task, calib, tmp)
        result["honesty"] = {name: e["audit"] for name, e in exports.items()}
        result["honesty_command"] = command
        write(result, args)  # each section as it is done: a run cut short still shows what it measured
        result["busy_at_start"] = busy_processes()
        result["shipped_speed"] = shipped_speed(model, cfg, task, calib, exports, tmp, args)
        result["busy_at_end"] = busy_processes()
        write(result, args)
        result["sizes"] = {"command": command, "s_model": s_model_sizes(), **shipped_sizes(
            model, tmp / "float", {n: exports[n]["dir"] for n in SIZE_RECIPES if "dir" in exports[n]})}
        write(result, args)
        result["s_model"] = s_model(args)
        write(result, args)
        result["wer"] = wer_rows(task, exports, args.threads)
        result["wer_sites"] = site_rows(task, exports)
        result["wer_ulp"] = ulp_rows(task, exports, args.ulp_seeds)
    result.pop("partial")
    write(result, args)
    return result


def shipped_model(args) -> tuple:
    """(model, cfg, task, calibration batches) of the shipped model, torch at ``args.threads``."""
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, cfg, task = fdata.load_model_cfg_task(ASSET / "checkpoint.pt", ASSET)
    return model, cfg, task, list(fdata.net_inputs(task, "train_calib", CALIB_BATCHES))


def write(result: dict, args) -> None:
    """--json, and --out rendered from what --json holds (its keys sorted: the page a re-render of
    the JSON gives, whatever order the run filled the dicts in)."""
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    atomic_write_text(args.json, text)
    atomic_write_text(args.out, render(json.loads(text)))


def calibrated(model, recipe, calib):
    """``model`` converted by ``recipe`` with ``simulate: float`` whatever the recipe says: the
    fake-quant model every onnxruntime number here is compared with computes what a QDQ graph
    computes (each op in float between DQ and Q, rounded onto its reader's grid)."""
    from qswap.calibrate import activation_quantizers

    from qswap.recipe import with_simulate

    recipe = with_simulate(recipe, "float")
    qmodel = qswap.convert(copy.deepcopy(model), recipe, data=calib)  # data: a recipe transform's statistics
    if activation_quantizers(qmodel):  # a weight-only or fp32 recipe has nothing to calibrate
        qswap.calibrate(qmodel, calib)
    return qmodel


def export_recipes(model, cfg, task, calib, tmp: Path, names: tuple[str, ...] | None = None) -> dict:
    """Every shipped recipe and the searched one (``names``: these alone), calibrated, exported and
    deploy-audited (an export the format cannot express is recorded with its error)."""
    out = {}
    for name in names or [*shipped_recipe_names(), "searched"]:
        recipe = WER_RECIPES.get(name, name)
        log(f"export {name}")
        # the deploy audit does not depend on the ranges: one batch calibrates the recipes
        # exported for it alone, the WER recipes get the demo's four
        qmodel = calibrated(model, recipe, calib if name in WER_RECIPES else calib[:1])
        directory = tmp / name
        try:
            manifest = export_model(qmodel, directory, task_cfg=cfg.task)
        except ExportError as e:
            out[name] = {"audit": {"exported": False, "error": str(e)}}
            continue
        audit = audit_export(directory)
        out[name] = {"qmodel": qmodel, "dir": directory, "audit": {
            "exported": True, "claims_honest": manifest.claims_honest, "verdict": audit.verdict,
            "integer": audit.integer_count, "float": audit.float_count,
            "float_ops": _merge(g.float_ops for g in audit.graphs),
            "bytes": graph_bytes(directory)["total"]}}
    return out


def wer_rows(task, exports: dict, threads: int, subsets: tuple[str, ...] = SUBSETS,
             with_agreement: bool = True) -> list[dict]:
    """Per WER recipe and subset: the fake-quant model and onnxruntime on its export, both decoded
    (``paired``); with ``with_agreement``, each graph's agreement on the first 8 ``test`` utterances.
    A large subset is read from the folder ``qswap.demo.data_dir`` materializes (the shipped
    model's dictionary and tokenizer beside it)."""
    tasks = subset_tasks(task, subsets)
    rows = []
    for name in WER_RECIPES:
        e = exports[name]
        if "qmodel" not in e:
            rows.append({"recipe": name, "error": e["audit"]["error"]})
            continue
        ort = load_exported(e["dir"], task.target_dictionary, threads=threads)
        steps = None
        if with_agreement:
            net = next(iter(fdata.batches(task, "test", max_sentences=8)))["net_input"]
            steps = agreement(e["qmodel"], e["dir"], net, net["prev_output_tokens"][:, :12])
        for subset in subsets:
            log(f"decode {name} {subset}")
            samples = list(fdata.batches(tasks[subset], subset))
            fq = decode(tasks[subset], e["qmodel"], samples, beam=BEAM).utterances
            ox = decode(tasks[subset], ort, samples, beam=BEAM).utterances
            rows.append({"recipe": name, "subset": subset, **paired(fq, ox),
                         "agreement": steps if subset == "test" else None})
    return rows


QAT_CHECKPOINT = ASSET / "qat_w4a4_edges8.pt"


def qat_rows(task, tmp: Path, threads: int, subsets: tuple[str, ...] = SUBSETS) -> dict:
    """The shipped 4-bit-activation QAT checkpoint exported as it is (its learned grids), its
    deploy audit, and per subset: its WER as ``qswap eval`` decodes it (the recipe's ``simulate:
    integer``), the fake-quant model with float insides (``simulate: float``, what a QDQ graph
    computes) and onnxruntime on the export, the last two paired (``paired``)."""
    from qswap.nn.simulate import simulating

    qmodel, qcfg, _ = fdata.load_model_cfg_task(QAT_CHECKPOINT, ASSET)
    directory = tmp / "qat"
    log(f"export {QAT_CHECKPOINT.name}")
    manifest = export_model(qmodel, directory, task_cfg=qcfg.task)
    audit = audit_export(directory)
    ort = load_exported(directory, task.target_dictionary, threads=threads)
    rows = []
    for subset in subsets:
        log(f"decode {QAT_CHECKPOINT.name} {subset}")
        samples = list(fdata.batches(task, subset))
        integer = decode(task, qmodel, samples, beam=BEAM).utterances
        with simulating(qmodel, "float"):
            fq = decode(task, qmodel, samples, beam=BEAM).utterances
        ox = decode(task, ort, samples, beam=BEAM).utterances
        errors, words = utterance_word_errors([u.ref for u in integer], [u.hyp for u in integer])
        rows.append({"subset": subset, "wer_integer": 100.0 * sum(errors) / sum(words), **paired(fq, ox)})
    return {"checkpoint": str(QAT_CHECKPOINT.relative_to(ROOT)), "recipe": manifest.recipe,
            "audit": {"claims_honest": manifest.claims_honest, "verdict": audit.verdict,
                      "integer": audit.integer_count, "float": audit.float_count,
                      "float_ops": _merge(g.float_ops for g in audit.graphs),
                      "bytes": graph_bytes(directory)["total"]},
            "rows": rows}


def subset_tasks(task, subsets: tuple[str, ...]) -> dict:
    """The fairseq task reading each of ``subsets``: ``task`` for the 100-utterance sets, the
    shipped model's task over the folder ``qswap.demo.data_dir`` materializes for a large one."""
    from qswap.demo import data_dir

    return {subset: task if subset not in LARGE_SUBSETS
            else fdata.load_model_cfg_task(ASSET / "checkpoint.pt", data_dir(subset))[2] for subset in subsets}


def site_rows(task, exports: dict) -> list[dict]:
    """Per WER recipe: the encoder's and the step graph's sites against the fake-quant model on the
    first ``test`` utterance (onnxruntime's optimizations as decoding runs them; tools/onnx_sites.py)."""
    import onnx_sites

    net = onnx_sites.first_utterances(task, "test", 1)
    rows = []
    for name in WER_RECIPES:
        e = exports[name]
        if "qmodel" not in e:
            continue
        q = e["qmodel"]
        with torch.no_grad():
            encoder_out = onnx_sites.with_padding_mask(q.encoder(net["src_tokens"], net["src_lengths"]))
        tables = {"encoder": onnx_sites.encoder_table(q, e["dir"] / GRAPHS["encoder"], net, "extended"),
                  "decoder_step": onnx_sites.decoder_step_table(q, e["dir"] / GRAPHS["decoder_step"], encoder_out,
                                                                net["prev_output_tokens"][:, :12], "extended")}
        rows.append({"recipe": name, **{graph: {
            "sites": len(t.sites), "same": sum(1 for s in t.sites if not s.different),
            "first_different": next((s.name for s in t.sites if s.different), None),
            "first_beyond_one": t.first_beyond(1.0).name if t.first_beyond(1.0) else None,
            "largest": max((s.largest for s in t.sites), default=0.0)} for graph, t in tables.items()}})
    return rows


def ulp_rows(task, exports: dict, seeds: int, subsets: tuple[str, ...] = SUBSETS) -> list[dict]:
    """Per WER recipe and subset: the fake-quant model's WER with every activation scale moved by
    one float32 ulp (up, down or kept, at random: seed 0..seeds-1), against the fake-quant WER
    (a large subset read as ``wer_rows`` reads it)."""
    tasks = subset_tasks(task, subsets)
    rows = []
    for name in WER_RECIPES:
        e = exports[name]
        if "qmodel" not in e:
            continue
        for subset in subsets:
            log(f"ulp {name} {subset}")
            samples = list(fdata.batches(tasks[subset], subset))
            base = decode(tasks[subset], e["qmodel"], samples, beam=BEAM).utterances
            moved = [paired(base, decode(tasks[subset], ulp_moved(e["qmodel"], seed), samples, beam=BEAM).utterances)
                     for seed in range(seeds)]
            rows.append({"recipe": name, "subset": subset, "wer_fake_quant": moved[0]["wer_fake_quant"],
                         "wer_moved": [m["wer_onnxruntime"] for m in moved],
                         "same_transcripts": [m["same_transcripts"] for m in moved]})
    return rows


def ulp_moved(qmodel, seed: int):
    """A copy of ``qmodel`` with each activation quantizer's scale moved by one float32 ulp: up,
    down or kept, drawn with ``seed`` (a model equal to it but for rounding)."""
    from qswap.quant.fake_quantize import FakeQuantize

    moved = copy.deepcopy(qmodel)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in moved.modules():
            if isinstance(m, FakeQuantize) and m.kind == "activation" and m.initialized:
                direction = torch.randint(-1, 2, m.scale.shape, generator=generator).to(m.scale.dtype)
                m.scale.copy_(torch.nextafter(m.scale, m.scale * (1 + direction)))
    return moved


def paired(base, ours) -> dict:
    """WER of both, and the paired bootstrap interval of ours - base."""
    refs = [u.ref for u in base]
    if refs != [u.ref for u in ours]:
        raise RuntimeError("the two decodes cover different utterances")
    base_err, words = utterance_word_errors(refs, [u.hyp for u in base])
    our_err, _ = utterance_word_errors(refs, [u.hyp for u in ours])
    interval = delta_interval(our_err, base_err, words, Bootstrap())
    return {"wer_fake_quant": 100.0 * sum(base_err) / sum(words), "wer_onnxruntime": 100.0 * sum(our_err) / sum(words),
            "delta": 100.0 * (sum(our_err) - sum(base_err)) / sum(words), "delta_ci": bounds(interval),
            "significant": significant(interval), "utterances": len(refs),
            "same_transcripts": sum(a.hyp == b.hyp for a, b in zip(base, ours))}


# -- speed ---------------------------------------------------------------------------------------------
def shipped_speed(model, cfg, task, calib, exports, tmp: Path, args) -> dict:
    """Encoder latency and full decoding of ``test``: torch fp32, onnxruntime int8 (w8a8), onnxruntime
    fp32 (the same graph without quantizers), torch quantize_dynamic, onnxruntime static."""
    float_dir = export_float(model, cfg, tmp / "float")
    static_dir = ort_static(float_dir, task.target_dictionary, calib, tmp / "ort_static", args.threads)
    dynamic = quantize_dynamic(model)
    systems = {"torch_fp32": model, "ort_int8": load_exported(exports["w8a8"]["dir"], task.target_dictionary,
                                                                 threads=args.threads),
               "ort_fp32": load_exported(float_dir, task.target_dictionary, threads=args.threads),
               "torch_quantize_dynamic": dynamic,
               "ort_static": load_exported(static_dir, task.target_dictionary, threads=args.threads)}
    net = next(iter(fdata.batches(task, "test", max_sentences=8)))["net_input"]
    src, lengths = net["src_tokens"], net["src_lengths"]
    def encoder(m):  # onnxruntime: the encoder graph alone (cross_kv runs once per utterance later)
        if isinstance(m, OrtS2TModel):
            return lambda: run_encoder(m.encoder.encoder, src, lengths)
        return lambda: m.encoder(src, lengths)

    # the encoder graphs again, each in a session of onnxruntime's default thread pool: spinning
    # while it waits for the next node (decoding keeps load_session's yielding threads: the beam
    # search runs torch's own threads between the steps)
    spinning = {f"{name}_spinning": load_session(Path(directory) / GRAPHS["encoder"], threads=args.threads,
                                                 spinning=True)
                for name, directory in (("ort_int8", exports["w8a8"]["dir"]), ("ort_fp32", float_dir))}
    encoders = {k: encoder(m) for k, m in systems.items()}
    encoders.update({k: (lambda s: lambda: run_encoder(s, src, lengths))(s) for k, s in spinning.items()})
    with torch.no_grad():
        enc = interleaved_medians(encoders, args.repeats, pause=onnx_bench.PAUSE)
    samples = list(fdata.batches(task, "test"))
    log(f"decode test with {', '.join(systems)}, {args.repeats} times each, interleaved")
    results: dict = {}

    def decoding(name, m):  # every decode gives the same transcripts: the last one's are kept
        return lambda: results.__setitem__(name, decode(task, m, samples, beam=BEAM))
    seconds = interleaved_medians({name: decoding(name, m) for name, m in systems.items()}, args.repeats)
    decoded = {}
    for name, result in results.items():
        counts = error_counts([u.ref for u in result.utterances], [u.hyp for u in result.utterances])
        decoded[name] = {"seconds": seconds[name], "wer": counts.wer}
    static_audit = audit_export(static_dir)
    return {"encoder_batch": [int(src.shape[0]), int(src.shape[1])], "encoder_s": enc, "decode": decoded,
            "decode_interleaved": True, "ort_spinning": False, "encoder_pause_s": onnx_bench.PAUSE,
            "encoder_vs_torch": enc["torch_fp32"] / enc["ort_int8"],
            "encoder_vs_ort_fp32": enc["ort_fp32"] / enc["ort_int8"],
            "encoder_spinning_vs_torch": enc["torch_fp32"] / enc["ort_int8_spinning"],
            "encoder_spinning_vs_ort_fp32_spinning": enc["ort_fp32_spinning"] / enc["ort_int8_spinning"],
            "decode_vs_torch": decoded["torch_fp32"]["seconds"] / decoded["ort_int8"]["seconds"],
            "ort_static": {"bytes": graph_bytes(static_dir)["total"],
                           "integer": static_audit.integer_count, "float": static_audit.float_count,
                           "float_ops": _merge(g.float_ops for g in static_audit.graphs)},
            "quantize_dynamic": {"linear_modules": sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear)
                                                       for m in dynamic.modules())}}


def export_float(model, cfg, directory: Path) -> Path:
    """qswap's float graph of the model (identity quantizers): the fp32 reference of speed and size."""
    export_model(qswap.convert(copy.deepcopy(model), NO_QUANT), directory, task_cfg=cfg.task, audit=False,
                 allow_float=True)
    return directory


# -- size ----------------------------------------------------------------------------------------------
SIZE_RECIPES = ("w8a8", "w8a8_per_channel", "w4a8", "w4a8_edges8", "searched")
FOUR_BIT = ("w4a8", "w4a8_edges8", "searched")  # 4-bit weights (edges8 and searched: some sites at 8)


def graph_bytes(directory: Path) -> dict:
    """Each graph file's bytes and their total."""
    sizes = {name: (Path(directory) / f).stat().st_size for name, f in GRAPHS.items()}
    return {**sizes, "total": sum(sizes.values())}


def shipped_sizes(model, float_dir: Path, dirs: dict) -> dict:
    """The shipped model's graphs' bytes per recipe against the float graphs' (and its parameters')."""
    fp32 = graph_bytes(float_dir)
    return {"fp32_onnx": fp32, "fp32_breakdown": byte_breakdown(float_dir),
            "checkpoint_param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "recipes": {name: {**graph_bytes(d), "ratio": graph_bytes(d)["total"] / fp32["total"],
                               "breakdown": byte_breakdown(d)} for name, d in dirs.items()}}


def byte_breakdown(directory: Path) -> dict:
    """Where the bytes of a directory's graphs go: initializers by what reads them, the graphs'
    metadata (``METADATA_BYTES``), and the rest of the protobuf (nodes, their names and attributes)."""
    import onnx

    kinds: dict = {}
    for f in GRAPHS.values():
        model = onnx.load(str(Path(directory) / f))
        readers: dict = {}
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                readers.setdefault(name, set()).add((node.op_type, i))
        total = 0
        for t in model.graph.initializer:
            kind = _kind(t, readers.get(t.name, set()))
            kinds[kind] = kinds.get(kind, 0) + t.ByteSize()
            total += t.ByteSize()
        meta = sum(p.ByteSize() for p in model.metadata_props)
        kinds[METADATA_BYTES] = kinds.get(METADATA_BYTES, 0) + meta
        kinds["graph structure (nodes, names, attributes)"] = (
            kinds.get("graph structure (nodes, names, attributes)", 0) + (Path(directory) / f).stat().st_size - total
            - meta)
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# the graphs' metadata: each graph's site map (``qswap.sites``), the step graph's position limit
METADATA_BYTES = "metadata (site maps, the step graph's position limit)"


def _kind(tensor, read_by: set) -> str:
    import onnx

    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return "4-bit weight codes (INT4)"
    scalar = len(tensor.dims) == 0 or list(tensor.dims) == [1]
    if read_by <= {("DequantizeLinear", 0), ("QuantizeLinear", 0)} and read_by:
        return {onnx.TensorProto.INT32: "int32 bias codes"}.get(tensor.data_type, "8-bit weight codes")
    if read_by and all(op in ("DequantizeLinear", "QuantizeLinear") for op, _ in read_by):
        return "scales and zero points" + (" (per tensor)" if scalar else " (per channel)")
    if tensor.data_type == onnx.TensorProto.FLOAT and not scalar:
        return "float tensors (weights, biases, tables, norms)"
    return "other constants (shape arithmetic)"


def s_model_sizes() -> dict:
    """The s2t_transformer_s-sized encoder graph (random weights, one random calibration batch:
    sizes do not depend on the ranges) in fp32, w8a8 and w4a8."""
    from bench import load_model

    from qswap.export.onnx import export_encoder
    from qswap.models import s2t_net_input

    model, _, label, feat = load_model("s")
    net = s2t_net_input(2, 200, feat, 2, len(model.decoder.dictionary), seed=1)
    out = {"model": label}
    with tempfile.TemporaryDirectory(prefix="qswap-s-sizes-") as tmp:
        out["fp32"] = export_encoder(qswap.convert(copy.deepcopy(model), NO_QUANT), Path(tmp) / "fp32.onnx", net,
                                     allow_float=True).stat().st_size
        for recipe in ("w8a8", "w4a8"):
            log(f"s-sized encoder {recipe}")
            out[recipe] = export_encoder(calibrated(model, recipe, [net]), Path(tmp) / f"{recipe}.onnx",
                                         net).stat().st_size
    return out


def quantize_dynamic(model):
    """torch.ao's dynamic int8 Linear on a copy of ``model``. fairseq's attention passes its
    projections' ``weight`` tensors to torch's fused attention, which a dynamic Linear does not
    have: ``skip_embed_dim_check`` sends it down fairseq's own path, which calls the projections."""
    from fairseq.modules import MultiheadAttention

    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    for m in dynamic.modules():
        if isinstance(m, MultiheadAttention):
            m.skip_embed_dim_check = True
    return dynamic


def ort_static(float_dir: Path, dictionary, calib, out: Path, threads: int) -> Path:
    """onnxruntime's own static quantization (QDQ, MatMul/Gemm/Conv only, its MinMax calibration)
    of each float graph, calibrated on the feeds each graph sees while the float export decodes
    the calibration batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = record_feeds(float_dir, dictionary, calib, threads)

    class Reader(CalibrationDataReader):
        def __init__(self, items):
            self.items = iter(items)

        def get_next(self):
            return next(self.items, None)

    out.mkdir(parents=True, exist_ok=True)
    for name, file in GRAPHS.items():
        quantize_static(str(float_dir / file), str(out / file), Reader(feeds[name]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=False)
    # the float export's manifest, with the digests of onnxruntime's graphs (loading checks them)
    manifest = read_manifest(float_dir)
    manifest.digests = {name: graph_digest(out / file) for name, file in GRAPHS.items()}
    write_manifest(out, manifest)
    return out


ARCHITECTURES = {  # name: (builder, overrides)
    "s2t_transformer": ("build_s2t_transformer", {}),
    "s2t_conformer, abs positions": ("build_s2t_conformer", {"pos_enc_type": "abs"}),
    "s2t_conformer, rel_pos": ("build_s2t_conformer", {"pos_enc_type": "rel_pos"}),
    "s2t_conformer, rope": ("build_s2t_conformer", {"pos_enc_type": "rope"}),
    "wav2vec 2.0 CTC, post-norm": ("build_wav2vec2_ctc", {}),
    "wav2vec 2.0 CTC, pre-norm (layer_norm extractor)": ("build_wav2vec2_ctc", {"extractor_mode": "layer_norm",
                                                                               "layer_norm_first": True}),
}


def architecture_rows() -> list[dict]:
    """Per architecture (``qswap.models`` builders, small dims, random weights): w8a8 with
    ``simulate: float`` (as ``calibrated``) calibrated on three random padded batches, exported,
    each graph's agreement on a padded batch, deploy audit."""
    from qswap import models

    rows = []
    for name, (builder, overrides) in ARCHITECTURES.items():
        log(f"architecture {name}")
        ctc = builder == "build_wav2vec2_ctc"
        make = (lambda s: models.wav2vec2_net_input(2, 4000, seed=s)) if ctc else (
            lambda s: models.s2t_net_input(2, 60, seed=s))
        from qswap.recipe import with_simulate
        # a fresh model: no copy (a weight-normed conv cannot be deep-copied); simulate: float as `calibrated`
        qmodel = qswap.convert(getattr(models, builder)(**overrides), with_simulate("w8a8", "float"))
        qswap.calibrate(qmodel, [make(s) for s in range(3)])
        with tempfile.TemporaryDirectory(prefix="qswap-arch-") as tmp:
            manifest = export_model(qmodel, tmp)
            if ctc:
                net = models.wav2vec2_net_input(3, 5000, seed=7, ragged=False)
                net["padding_mask"][1:, 4000:] = True
                net["source"][1:, 4000:] = 0.0
                found = ctc_agreement(qmodel, tmp, net)
            else:
                net = models.s2t_net_input(3, 80, seed=7)
                found = agreement(qmodel, tmp, net, net["prev_output_tokens"])
            audit = audit_export(tmp)
        rows.append({"architecture": name, "graphs": list(manifest.graphs.values()), "agreement": found,
                     "claims_honest": manifest.claims_honest, "integer": audit.integer_count,
                     "float": audit.float_count})
    return rows


def record_feeds(float_dir: Path, dictionary, calib, threads: int, max_steps: int = 64) -> dict:
    """The inputs every graph of the float export receives while it beam-decodes ``calib``."""
    model = load_exported(float_dir, dictionary, threads=threads)
    feeds: dict = {name: [] for name in GRAPHS}
    for name, holder, attr in (("encoder", model.encoder, "encoder"), ("cross_kv", model.encoder, "cross_kv"),
                               ("decoder_step", model.decoder, "step")):
        setattr(holder, attr, _Recording(getattr(holder, attr), feeds[name]))
    from fairseq.sequence_generator import SequenceGenerator
    generator = SequenceGenerator([model], dictionary, beam_size=BEAM, max_len_a=0, max_len_b=200)
    with torch.no_grad():
        for net in calib:
            generator.generate([model], {"net_input": net})
    feeds["decoder_step"] = feeds["decoder_step"][::max(1, len(feeds["decoder_step"]) // max_steps)]
    return feeds


class _Recording:
    def __init__(self, session, into: list):
        self.session, self.into = session, into

    def run(self, outputs, feeds):
        self.into.append(dict(feeds))
        return self.session.run(outputs, feeds)

    def get_outputs(self):
        return self.session.get_outputs()


def settled_idle(seconds: float, gap: float = 10.0, most: float = 0.2) -> list[str]:
    """The busy processes once the machine was idle at two samples ``gap`` seconds apart (another
    tool's runs come one process after another: one idle sample can fall between two) and other
    processes, short-lived ones included, used at most ``most`` of a core over the gap; or once
    ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        busy = wait_idle(max(0.0, deadline - time.monotonic()), log)
        if busy or time.monotonic() >= deadline:
            return busy
        before = cpu_accounts()
        time.sleep(gap)
        busy, others = busy_processes(), other_cores(before, cpu_accounts())
        if (not busy and others <= most) or time.monotonic() >= deadline:
            return busy
        log(f"waiting for an idle machine: other processes used {others:.2f} cores")


def cpu_accounts() -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of every process, of this one), from /proc/stat and /proc/self/stat."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    total = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = sum(total) - total[3] - total[4]  # all but idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return time.monotonic(), busy / ticks, (int(own[11]) + int(own[12])) / ticks  # utime, stime


def other_cores(before: tuple, after: tuple) -> float:
    """Cores other processes (short-lived ones included) used on average between two accounts."""
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall if wall > 0 else 0.0


def s_model(args) -> dict:
    return onnx_bench.main(["--model", "s", "--threads", str(args.threads), "--repeats", str(args.repeats)])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _merge(counters) -> dict:
    total: dict = {}
    for c in counters:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _ort():
    import onnxruntime
    return onnxruntime


# -- rendering -----------------------------------------------------------------------------------------
def met(value: float, target: float, at_least: bool = True) -> str:
    ok = value >= target if at_least else value <= target
    return "met" if ok else "**not met**"


def gap_verdict(row: dict, gap: float) -> str:
    """|ΔWER| <= ``gap`` judged as the paired interval supports it (docs/qat*.md's convention): "met"
    where the whole interval lies within ±gap, "**not met**" where it lies wholly outside, "undecided"
    where it reaches both (or there is none); the point estimate alone decides nothing."""
    ci = as_interval(row["delta_ci"])
    if ci is None:
        return "undecided"
    if -gap <= ci.low and ci.high <= gap:
        return "met"
    if ci.low > gap or ci.high < -gap:
        return "**not met**"
    return "undecided"


def render(r: dict) -> str:
    lines = header(r)
    if "shipped_speed" in r and "s_model" in r:
        lines += speed_section(r)
    else:
        lines += ["## Speed", "", "Not measured: the run stopped before this section.", ""]
    lines += size_section(r)
    lines += wer_section(r) if "wer" in r else ["## WER", "", "Not measured: the run stopped before this section.", ""]
    return "\n".join(lines + qat_section(r) + honesty_section(r) + architecture_section(r))


def qat_section(r: dict) -> list[str]:
    """The shipped 4-bit-activation QAT checkpoint, exported and decoded (``--low-bit``)."""
    if "qat" not in r:
        return []
    q, t = r["qat"], r["targets"]
    a = q["audit"]
    ops = ", ".join(f"{k} {v}" for k, v in a["float_ops"].items())
    lines = ["## The 4-bit-activation QAT checkpoint, deployed", "",
             f"`{q['checkpoint']}` (recipe `{q['recipe']}`: every activation on a 4-bit grid but the 8-bit first "
             "and last layers, its grids learned in QAT, docs/qat.md) exported as it is, with its learned scales "
             "(`qswap export CKPT --onnx -o DIR`), and decoded three ways, beam "
             f"{r['beam']}: as `qswap eval` decodes the checkpoint (its recipe's `simulate: integer`, the integer "
             "model's codes: the WERs of docs/qat.md), the fake-quant model with float insides (`--simulate float`, "
             "what a QDQ graph computes) and onnxruntime on the export (`--backend onnxruntime`). ΔWER = onnxruntime − "
             "fake-quant (float insides), paired bootstrap 95 % interval.", "",
             "| subset | WER % (`simulate: integer`) | fake-quant WER % (float insides) | onnxruntime WER % | "
             "ΔWER [95 % CI] | same transcripts | target |", "|---|---:|---:|---:|---:|---:|---|"]
    for row in q["rows"]:
        lines.append(f"| {row['subset']} | {row['wer_integer']:.2f} | {row['wer_fake_quant']:.2f} | "
                     f"{row['wer_onnxruntime']:.2f} | {value_text(row['delta'], row['delta_ci'], '+')} | "
                     f"{row['same_transcripts']}/{row['utterances']} | {gap_verdict(row, t['wer_gap'])} |")
    lines += ["", "Each 4-bit activation leaves its `QuantizeLinear` as uint8 codes clipped to the grid's 16 "
              "(`qswap.export.qdq`): onnxruntime's 8-bit integer kernels run on them (int32 accumulation of the "
              "4-bit codes' products), the codes take a byte each. Among the graph's float nodes (below) are "
              "ONNX's LayerNorm and softmax, which the QAT model computes in integers (`simulate: integer`): the "
              "first column against the second is what that difference changes on this model, the second against "
              "the third what the deployment changes.", "",
              f"Deploy audit of the export: {a['integer']} integer nodes, {a['float']} float nodes ({ops}); "
              f"{a['bytes']:,} bytes in its three graphs. Verdict: {a['verdict']}.", "",
              f"Measured by `{q['command']}`.", ""]
    return lines


def header(r: dict) -> list[str]:
    partial = ["**Partial run**: the sections marked not measured were not reached.", ""] if r.get("partial") else []
    return partial + ["# Deployment: qswap's exported graphs in onnxruntime", "",
             f"Written by `tools/deploy_doc.py` (`{r['command']}`"
             + (f"; speed sections re-measured by `{r['speed_command']}`" if r.get("speed_command") else "")
             + f"), one run: torch {r['torch']}, "
             f"onnxruntime {r['onnxruntime']}, {r['threads']} threads, beam {r['beam']}. {machine_state(r)} "
             f"The timings are what this one run measured.", "",
             "Export and decode with the exported graphs:", "", "```",
             "qswap convert qswap/assets/s2t_demo/checkpoint.pt --recipe w8a8 --simulate float "
             "--data qswap/assets/s2t_demo --calib-subset train_calib --calib-batches 4 -o w8a8.pt",
             "qswap export w8a8.pt --onnx -o deploy/ --data qswap/assets/s2t_demo",
             "qswap eval deploy/ --backend onnxruntime --data qswap/assets/s2t_demo --subset test --threads 2",
             "qswap audit deploy/ --onnx --markdown deploy_audit.md", "```", "",
             "`deploy/` holds `encoder.onnx`, `cross_kv.onnx` (the encoder-decoder keys and values of every "
             "decoder layer, computed once per utterance), `decoder_step.onnx` (one incremental step, its "
             "self-attention keys and values as inputs and outputs, one row per hypothesis; the encoder-decoder "
             "keys, values and padding mask one row per sentence, shared by its beams) and `export.json` "
             "(each graph's SHA-256, checked whenever the directory is loaded: a directory that mixes two "
             "exports is refused; the target dictionary's facts: a data directory with another dictionary is "
             "refused; the decoder's position limit, which the step graph records too: an edited one is "
             "refused; the SHA-256 of all its fields, so that an edited recipe name or audit verdict is "
             "refused as an edited manifest). "
             "The cached keys and values travel as uint8 codes on their quantizers' grids where the recipe "
             "quantizes them per tensor, as float values otherwise. fairseq's own "
             "`SequenceGenerator` drives the beam search over them (`qswap.export.runtime`). "
             "Each graph records, in its metadata (`qswap.sites`), the module of the quantized model every "
             "scope of its node names came from, taken from the very module objects the exporter traced "
             "(`qswap.export.sites`): `qswap audit DIR --onnx` names each float node's module with it "
             "(the node names alone skip the modules a graph calls past, and number a repeated path); "
             "a graph exported before qswap recorded it is audited by the path its node names spell.", ""]


def speed_section(r: dict) -> list[str]:
    sp, s, t = r["shipped_speed"], r["s_model"], r["targets"]
    enc, dec = sp["encoder_s"], sp["decode"]
    lines = ["## Speed (targets of issue 18)", "",
             f"Shipped model, encoder on the first {sp['encoder_batch'][0]} test utterances "
             f"({sp['encoder_batch'][1]} frames padded), median of {r['repeats']} interleaved runs; full "
             f"decoding of the 100 `test` utterances, {decode_runs(sp, r)}."
             + (f" CPU: {r['cpu']} (int8 and fp32 kernels, and so these ratios, differ from one CPU to another)."
                if r.get("cpu") else ""), "",
             "| measure | value | target | |", "|---|---:|---:|---|"]
    spin = "encoder_spinning_vs_torch" in sp and "ort_int8_spinning_vs_torch_fp32" in s
    yielding = " (threads yield)" if spin else ""
    rows = [("encoder: onnxruntime int8 vs torch fp32 eager", sp["encoder_vs_torch"], "encoder_vs_torch"),
            ("encoder: onnxruntime int8 vs onnxruntime fp32 (same graph)", sp["encoder_vs_ort_fp32"], "encoder_vs_ort_fp32")]
    if spin:
        rows = [(label[:-1] + "; threads yield)" if label.endswith(")") else label + yielding, value, key)
                for label, value, key in rows] + [
            ("encoder: onnxruntime int8 vs torch fp32 eager (threads spin)", sp["encoder_spinning_vs_torch"],
             "encoder_vs_torch"),
            ("encoder: onnxruntime int8 vs onnxruntime fp32 (same graph; threads spin)",
             sp["encoder_spinning_vs_ort_fp32_spinning"], "encoder_vs_ort_fp32")]
    rows.append(("decoding of `test`: onnxruntime int8 vs torch fp32 fairseq", sp["decode_vs_torch"], "decode_vs_torch"))
    model_s = f"s2t_transformer_s-sized encoder ({s['batch']}x{s['frames']} frames)"
    rows += [(f"{model_s}: onnxruntime int8 vs torch fp32{yielding}", s["ort_int8_vs_torch_fp32"], "encoder_vs_torch"),
             (f"{model_s}: onnxruntime int8 vs onnxruntime fp32{yielding}", s["ort_int8_vs_ort_fp32"], "encoder_vs_ort_fp32")]
    if spin:
        rows += [(f"{model_s}: onnxruntime int8 vs torch fp32 (threads spin)", s["ort_int8_spinning_vs_torch_fp32"],
                  "encoder_vs_torch"),
                 (f"{model_s}: onnxruntime int8 vs onnxruntime fp32 (threads spin)",
                  s["ort_int8_spinning_vs_ort_fp32_spinning"], "encoder_vs_ort_fp32")]
    lines += [f"| {label} | {value:.2f}x | ≥ {t[key]}x | {met(value, t[key])} |" for label, value, key in rows]
    if spin:
        lines += ["", "Two settings of onnxruntime's thread pool, both timed: its threads yield their cores "
                  "when they wait for work (`load_session`'s default, which decoding uses: fairseq's beam "
                  "search runs torch's own threads between the steps), or they spin, waiting for the next "
                  "node (onnxruntime's own default, `load_session(..., spinning=True)`), which saves the "
                  "wake-up between the encoder's hundreds of nodes. Each timed encoder run follows a pause "
                  f"of {sp['encoder_pause_s']:g} s (not timed), so threads one system leaves spinning are idle "
                  "when the next one starts: back to back on these 2 cores, they slowed the run after them."]
    lines += ["", "The size targets: the next section.", "",
             "### Side by side (shipped model)", "",
             "| system | encoder ms | decode `test` s | WER `test` % | float nodes | bytes |", "|---|---:|---:|---:|---:|---:|"]
    names = {"torch_fp32": "torch fp32 eager (fairseq)", "ort_fp32": "onnxruntime fp32 (qswap's float graph)",
             "ort_int8": "onnxruntime int8 (qswap w8a8 export)",
             "torch_quantize_dynamic": "torch.ao quantize_dynamic (Linear, qint8)",
             "ort_static": "onnxruntime quantize_static (MatMul/Gemm/Conv, its own calibration)"}
    floats = {"torch_fp32": "all", "ort_fp32": "all", "ort_int8": r["honesty"]["w8a8"]["float"],
              "torch_quantize_dynamic": f"all activations ({sp['quantize_dynamic']['linear_modules']} dynamic Linear)",
              "ort_static": sp["ort_static"]["float"]}
    sizes = r.get("sizes", {})
    size = {"torch_fp32": sizes.get("checkpoint_param_bytes"), "ort_fp32": sizes.get("fp32_onnx", {}).get("total"),
            "ort_int8": sizes.get("recipes", {}).get("w8a8", {}).get("total"), "torch_quantize_dynamic": None,
            "ort_static": sp["ort_static"]["bytes"]}
    for k, label in names.items():
        lines.append(f"| {label} | {enc[k] * 1e3:.1f} | {dec[k]['seconds']:.1f} | {dec[k]['wer']:.2f} | {floats[k]} | "
                     f"{size[k] if size[k] is not None else '-'} |")
    lines += ["", "torch fp32's bytes are its parameters' (fp32); the graphs' are the three ONNX files (qswap's: "
              "measured by the size section's command; onnxruntime's static quantization: by the command above, "
              "quantizing that run's float export). "
              "onnxruntime's static quantization runs on qswap's float export (boolean masks: fairseq's own "
              "-inf masks are what breaks it when it quantizes every op) and re-calibrates with its own ranges: "
              "its deployed model is not the one qswap evaluated. Its float ops: "
              + ", ".join(f"{k} {v}" for k, v in sorted(sp["ort_static"]["float_ops"].items(),
                                                        key=lambda kv: (-kv[1], kv[0]))) + ".", "",
              f"s2t_transformer_s-sized model ({s['model']}), encoder: torch fp32 {s['seconds']['torch_fp32'] * 1e3:.1f} ms, "
              f"onnxruntime int8 {s['seconds']['ort_int8'] * 1e3:.1f} ms, onnxruntime fp32 {s['seconds']['ort_fp32'] * 1e3:.1f} ms"
              + (f" (threads yield); threads spinning: onnxruntime int8 {s['seconds']['ort_int8_spinning'] * 1e3:.1f} ms, "
                 f"onnxruntime fp32 {s['seconds']['ort_fp32_spinning'] * 1e3:.1f} ms" if spin else "")
              + (f"; shipped model's encoder, threads spinning: onnxruntime int8 {enc['ort_int8_spinning'] * 1e3:.1f} ms, "
                 f"onnxruntime fp32 {enc['ort_fp32_spinning'] * 1e3:.1f} ms" if spin else "")
              + " (`tools/onnx_bench.py`, random calibration: speed only).", "",
              trust_note(r, sp), ""]
    return lines + time_lines(s)


def time_lines(s: dict, top: int = 9) -> list[str]:
    """Where the s2t_transformer_s-sized encoder's time goes in onnxruntime (``onnx_bench``'s
    ``profile``): kernel milliseconds per run of each op type of the optimized int8 and fp32 graphs."""
    if "profile" not in s:
        return []
    int8, fp32 = s["profile"]["ort_int8"], s["profile"]["ort_fp32"]

    def slowest(g):  # the JSON holds the ops sorted by name
        return sorted(g["ops"], key=lambda k: -g["ops"][k]["ms"])[:top]
    ops = sorted(set(slowest(int8) + slowest(fp32)),
                 key=lambda k: (-max(g["ops"].get(k, {}).get("ms", 0) for g in (int8, fp32)), k))

    def cell(g, k):
        op = g["ops"].get(k)
        return f"{op['ms']:.2f} | {op['nodes']}" if op else "- | -"
    lines = ["### Where the encoder time goes", "",
             f"The s2t_transformer_s-sized encoder above under onnxruntime's profiler ({s['threads']} threads, "
             f"{int8['runs']} runs after a warm-up, `tools/onnx_bench.py`): kernel time per run of each op type "
             f"of the optimized graphs (onnxruntime's fusions applied), with its node count.", "",
             "| op | int8 ms | int8 nodes | fp32 ms | fp32 nodes |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {cell(int8, k)} | {cell(fp32, k)} |" for k in ops]
    rest = [sum(v["ms"] for k, v in g["ops"].items() if k not in ops) for g in (int8, fp32)]
    lines += [f"| other ops | {rest[0]:.2f} | {sum(v['nodes'] for k, v in int8['ops'].items() if k not in ops)} | "
              f"{rest[1]:.2f} | {sum(v['nodes'] for k, v in fp32['ops'].items() if k not in ops)} |",
              f"| all kernels | {int8['kernel_ms']:.2f} | {sum(v['nodes'] for v in int8['ops'].values())} | "
              f"{fp32['kernel_ms']:.2f} | {sum(v['nodes'] for v in fp32['ops'].values())} |",
              f"| wall time of a profiled run | {int8['wall_ms']:.2f} | | {fp32['wall_ms']:.2f} | |", ""]
    gemm = {"QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv"}
    int8_gemm = sum(v["ms"] for k, v in int8["ops"].items() if k in gemm)
    fp32_gemm = sum(v["ms"] for k, v in fp32["ops"].items() if k in {"MatMul", "FusedMatMul", "Gemm", "Conv"})
    lines += [f"The integer kernels (QGemm, MatMulIntegerToFloat, QLinearMatMul, QLinearConv) take {int8_gemm:.1f} ms "
              f"where the float graph's matmuls and convolutions take {fp32_gemm:.1f} ms "
              f"({fp32_gemm / max(int8_gemm, 1e-9):.1f}x); the rest of the int8 graph, "
              f"{int8['kernel_ms'] - int8_gemm:.1f} ms of kernels (float LayerNorm and softmax, the quantizers "
              f"around them, the FFN's ReLU tables, data movement, shape arithmetic) against the float graph's "
              f"{fp32['kernel_ms'] - fp32_gemm:.1f} ms, and the per-node cost between kernels "
              f"({int8['wall_ms'] - int8['kernel_ms']:.1f} ms for the int8 graph's "
              f"{sum(v['nodes'] for v in int8['ops'].values())} nodes, {fp32['wall_ms'] - fp32['kernel_ms']:.1f} ms "
              f"for the float graph's) are what keeps the whole encoder from the kernels' ratio.", ""]
    return lines


def decode_runs(sp: dict, r: dict) -> str:
    """How the run timed full decoding (a run before the decodes were interleaved timed each once)."""
    if sp.get("decode_interleaved"):
        return f"median of {r['repeats']} interleaved runs each, after one warm-up"
    return "one run each"


def machine_state(r: dict) -> str:
    """What the machine was doing when the speed run started (``busy_at_start``: other processes
    using more than a fifth of a core, ``tools/bench.py``'s ``busy_processes``)."""
    busy = r.get("busy_at_start")
    if busy is None:
        return "The machine is shared and was loaded while it ran (not sampled)."
    if not busy:
        said = "No other process used more than a fifth of a core when the speed run started."
    else:
        said = f"Other processes were busy when the speed run started: {', '.join(busy)}."
    end = r.get("busy_at_end")  # sampled again after the shipped model's timings (runs since this was added)
    if end:
        said += f" When its shipped-model timings ended: {', '.join(end)}."
    elif end is not None:
        said += " None did when its shipped-model timings ended."
    others = r.get("other_cores_during_timing")
    if others is not None:
        said += (f" Other processes, short-lived ones included, used {others:.2f} cores on average while the "
                 f"shipped-model timings ran.")
    return said


def trust_note(r: dict, sp: dict) -> str:
    """How far the speed ratios carry, from the run's own numbers."""
    seconds = {k: v["seconds"] for k, v in sp["decode"].items()}
    slower = seconds["ort_int8"] > seconds["ort_fp32"]
    idle = r.get("busy_at_start") == [] and not r.get("busy_at_end") and r.get("other_cores_during_timing", 0) <= 0.2
    note = ("How far to trust this run: " + ("the machine was idle when it started"
                                            + (" and when its timings ended; " if "busy_at_end" in r else "; ") if idle
                                            else "the machine's 2 cores were shared with other jobs; torch's OpenMP "
                                                 "thread pool loses far more than onnxruntime's under oversubscription, "
                                                 "so ratios against torch eager overstate what an idle machine shows; ")
            + "the ratios within onnxruntime (int8 vs fp32 of the same graph) are the comparable ones.")
    if "encoder_pause_s" in sp:  # both thread pool settings timed, each run after a pause
        note += (" Decoding ran onnxruntime with yielding threads (`load_session`, `spinning` off): spinning, "
                 "they would slow the torch work of the beam search between the steps. The encoder timings "
                 "paused before each run (above), so no system's spinning threads slowed the next one's run.")
    elif sp.get("ort_spinning") is False:  # recorded since the sessions stopped spinning by default
        note += (" onnxruntime's threads yielded their cores between runs (`load_session`, `spinning` off): "
                 "spinning, they slow the torch run interleaved after them.")
    if slower:
        note += (" In full decoding, onnxruntime int8 was not faster than onnxruntime fp32 in this run (where "
                 "the step's time goes is not measured here).")
    return note


def size_section(r: dict) -> list[str]:
    z, t = r.get("sizes"), r["targets"]
    if not z:
        return ["## Size", "", "Not measured (`tools/deploy_doc.py --sizes-only`).", ""]
    fp32 = z["fp32_onnx"]
    lines = ["## Size (targets of issue 18)", "",
             f"Written by `{z['command']}`: the shipped model exported with each recipe (calibrated on "
             f"`train_calib` as above), the bytes of its three graph files against those of qswap's fp32 "
             f"graphs of the same structure (the baseline of the targets: {fp32['total']} bytes; the model's "
             f"fp32 parameters alone are {z['checkpoint_param_bytes']} bytes, the graphs hold the sinusoidal "
             f"position tables too).", "",
             "| recipe | weights stored as | encoder | cross_kv | decoder_step | total bytes | / fp32 graphs | target | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|",
             f"| fp32 | float32 | {fp32['encoder']} | {fp32['cross_kv']} | {fp32['decoder_step']} | {fp32['total']} | "
             f"100.0% | - | |"]
    for name, row in z["recipes"].items():
        four = name in FOUR_BIT
        target = t["w4_packed_size"] if four else t["w8a8_size"] if name == "w8a8" else None
        lines.append(f"| {name} | {'INT4 (8-bit sites: int8)' if four else 'int8'} | {row['encoder']} | "
                     f"{row['cross_kv']} | {row['decoder_step']} | {row['total']} | {row['ratio']:.1%} | "
                     + (f"≤ {target:.0%} | {met(row['ratio'], target, False)} |" if target else "- | |"))
    sm = z["s_model"]
    lines += ["", "`w4a8_edges8` and `searched` keep some weights at 8 bits (the edges; the layers the search "
              "kept at 8), stored as int8: the 15 % target is the all-4-bit recipe's.", "",
              f"s2t_transformer_s-sized encoder graph ({sm['model']}): fp32 {sm['fp32']} bytes, w8a8 "
              f"{sm['w8a8']} ({sm['w8a8'] / sm['fp32']:.1%}), w4a8 {sm['w4a8']} ({sm['w4a8'] / sm['fp32']:.1%}).", "",
              "Where the bytes go (all three graphs; `byte_breakdown` in `tools/deploy_doc.py`):", ""]
    shown = ["fp32", *(n for n in ("w8a8", "w4a8") if n in z["recipes"])]
    columns = {"fp32": z["fp32_breakdown"], **{n: z["recipes"][n]["breakdown"] for n in shown[1:]}}
    kinds = list(dict.fromkeys(k for c in columns.values() for k in c))
    lines += ["| bytes in | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    lines += [f"| {k} | " + " | ".join(str(columns[n].get(k, 0)) for n in shown) + " |" for k in kinds]
    lines += ["", "How the exporter keeps the files small without changing a value the graphs compute "
              "(`qswap.export.compact`; `tests/export/test_compact.py` runs each compacted graph against the "
              "graph torch traced: equal outputs at every onnxruntime optimization level, the same integer "
              "and float node counts): intermediate values named by an index (torch repeats each node's "
              "name in its outputs' names; node names, which carry the qswap site, are kept), torch's shape "
              "constants stored once per distinct value, no `Identity` aliases of initializers, one scale "
              "(not a vector of equal ones) for the int32 bias of a per-tensor weight and no all-zero bias "
              "zero points. A 4-bit weight's codes are ONNX INT4, two a byte (opset 21), read through a "
              "`Cast` to int8 that onnxruntime folds when it loads the graph: its DequantizeLinear then reads "
              "the int8 codes of the int8-stored graph and its QDQ fusions run the same integer kernels. An "
              "INT4 DequantizeLinear onnxruntime 1.32 runs as well, but does not fuse: its matmuls and "
              "convolutions would run in float. Sites a recipe keeps at 8 bits (LayerNorm weights, the edges "
              "of `w4a8_edges8`, `searched`'s 8-bit layers) stay int8. Where onnxruntime cannot optimize the "
              "packed graph, its codes all stay int8 at opset 17 (the same values, a larger file; "
              "`qswap.export.onnx.trace_to_onnx`): at opset 21 its QDQ propagation breaks an int8 table's "
              "rows dequantized after their Gather and then reshaped (a QuantizeLinear whose type and zero "
              "point disagree), as in a w8a8 recipe with the `hadamard` transform's 2-bit matrix; the export "
              "logs it. Which storage a graph gets thus depends on the onnxruntime that exports it.", ""]
    return lines


def wer_section(r: dict) -> list[str]:
    t = r["targets"]
    lines = ["## WER: onnxruntime on the exported graphs vs the fake-quant model", "",
              f"Both decode with fairseq's SequenceGenerator, beam {r['beam']}; ΔWER = onnxruntime − fake-quant with "
              "the paired bootstrap 95 % interval (2,000 resamples over utterances). Target: |ΔWER| ≤ 0.3, met where "
              "the whole interval lies within ±0.3, not met where it lies wholly outside, undecided otherwise. The "
              "fake-quant model here computes with `simulate: float` (float32 insides, float rounding onto each "
              "grid), which a QDQ graph computes, and was calibrated so (`qswap convert ... --simulate float`, as "
              "the commands at the top; calibrated under the recipe's default `simulate: integer`, the grids come "
              "out slightly different, and so do the transcripts and WERs of both systems); with the default "
              "`simulate: integer` it computes the integer model's codes (docs/integer.md), whose WER docs/demo.md "
              "and docs/integer.md give.", "",
              "| recipe | subset | fake-quant WER % | onnxruntime WER % | ΔWER [95 % CI] | same transcripts | target |",
              "|---|---|---:|---:|---:|---:|---|"]
    for row in r["wer"]:
        if "error" in row:
            lines.append(f"| {row['recipe']} | - | - | - | not exported: {row['error']} | - | - |")
            continue
        lines.append(wer_row_line(row, t["wer_gap"]))
    lines += large_wer_lines(r)
    lines += ["", "Agreement of each graph with the fake-quant model on the first 8 `test` utterances, in steps "
              "of the grid its output lands on (max / mean; `qswap.export.agreement`):", "",
              "| recipe | encoder | cross_kv | decoder_step |", "|---|---|---|---|"]
    for row in r["wer"]:
        if row.get("agreement"):
            a = row["agreement"]
            lines.append(f"| {row['recipe']} | " + " | ".join(
                f"{a[g]['max']:.2f} / {a[g]['mean']:.3f} {'' if a[g]['unit'] == 'grid steps' else a[g]['unit']}".rstrip()
                for g in ("encoder", "cross_kv", "decoder_step")) + " |")
    lines += sites_lines(r) + ulp_lines(r)
    return lines


def wer_row_line(row: dict, gap: float) -> str:
    """One paired onnxruntime-vs-fake-quant row (``paired``) of a WER table, judged on |ΔWER|."""
    return (f"| {row['recipe']} | {row['subset']} | {row['wer_fake_quant']:.2f} | {row['wer_onnxruntime']:.2f} | "
            f"{value_text(row['delta'], row['delta_ci'], '+')} | {row['same_transcripts']}/{row['utterances']} | "
            f"{gap_verdict(row, gap)} |")


def large_wer_lines(r: dict) -> list[str]:
    """The same comparison on the two large shipped sets (``--wer-large``), where it was measured."""
    if "wer_large" not in r:
        return []
    rows = [row for row in r["wer_large"]["rows"] if "error" not in row]
    sizes = {row["subset"]: row["utterances"] for row in rows}
    lines = ["", "The same comparison on the large shipped sets (`qswap.demo.data_dir` materializes them: "
             + ", ".join(f"`{subset}` {count:,} utterances" for subset, count in sizes.items())
             + "), where a rounding flip that changes one transcript moves the WER less than on 100:", "",
             "| recipe | subset | fake-quant WER % | onnxruntime WER % | ΔWER [95 % CI] | same transcripts | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(wer_row_line(row, r["targets"]["wer_gap"]))
    gap = r["targets"]["wer_gap"]
    inside = [row for row in rows if (ci := as_interval(row["delta_ci"])) is not None and -gap <= ci.low and ci.high <= gap]
    lines += ["", f"{sum(1 for row in rows if abs(row['delta']) <= r['targets']['wer_gap'])} of {len(rows)} "
              f"rows are within ±{r['targets']['wer_gap']} by their ΔWER; the 95 % interval lies within it "
              f"(the target met) in {len(inside)} of them."]
    ulp = r["wer_large"].get("ulp")
    if ulp:
        spread = {(u["recipe"], u["subset"]): (min(u["wer_moved"]) - u["wer_fake_quant"],
                                               max(u["wer_moved"]) - u["wer_fake_quant"]) for u in ulp}
        within = [row for row in rows if (row["recipe"], row["subset"]) in spread
                  and spread[(row["recipe"], row["subset"])][0] <= row["delta"] <= spread[(row["recipe"], row["subset"])][1]]
        lines += ["", f"The fake-quant model's own rounding spread on the same sets (every activation scale moved "
                  f"by one float32 ulp, {len(ulp[0]['wer_moved'])} draws, as in the table further down):", ""]
        lines += ulp_table(ulp)
        lines += ["", f"In {len(within)} of {len(rows)} rows onnxruntime's ΔWER lies within the range the fake-quant "
                  f"model moves by for a one-ulp change of its scales."]
    return lines + ["", f"Measured by `{r['wer_large']['command']}`."]


def sites_lines(r: dict) -> list[str]:
    if "wer_sites" not in r:
        return [""]
    lines = ["", "Where they differ, site by site (`tools/onnx_sites.py`: every activation quantizer of the graph "
             "against the fake-quant model's, first `test` utterance, onnxruntime's optimizations as decoding runs "
             "them; the step graph over 12 reference tokens):", "",
             "| recipe | graph | sites with the same codes | first site that differs | first site more than one "
             "step away | largest (steps) |", "|---|---|---:|---|---|---:|"]
    for row in r["wer_sites"]:
        for graph in ("encoder", "decoder_step"):
            g = row[graph]
            lines.append(f"| {row['recipe']} | {graph} | {g['same']} of {g['sites']} | {g['first_different'] or '-'} | "
                         f"{g['first_beyond_one'] or '-'} | {g['largest']:g} |")
    if "wer_sites_command" in r:
        lines += ["", f"Measured by `{r['wer_sites_command']}`."]
    return lines + [
        "", "A `QuantizeLinear` that reads another quantizer's grid (through data movement or a `Relu`) rounds as "
        "torch's fake quantization does, `x * float32(1 / s)` (`qswap.export.graph_passes.quantize_by_inverse`): "
        "ONNX's own `QuantizeLinear` divides by `s`, which breaks rounding ties the other way, and ties are "
        "frequent there (`tests/export/test_graph_passes.py`). Where a float32 a few ulps from `s` rounds every "
        "value of that grid alike the quantizer divides by it (no extra node); else a `Mul` by `1 / s` comes "
        "before it. A quantizer of a computed value (a matmul, a sum, a LayerNorm) keeps ONNX's division: a "
        "continuous value falls within an ulp of a tie about once in 10^5, as often as the integer kernels "
        "before it round differently from the fake-quant model's float sums. With onnxruntime's optimizations "
        "off (`tools/onnx_sites.py --level disabled`) the graphs compute the fake-quant model's ops in float32, "
        "in another summation order. With them on (the rows above), the fused integer kernels (`QGemm`, "
        "`MatMulIntegerToFloat`, `QLinearMatMul`, `QLinearAdd`, `QLinearConv`: int32 accumulation, one float "
        "rescale, where the fake-quant model sums float products) give the same codes up to rounding ties: the "
        "first differing sites differ by one step, in a few codes. Such a one-step flip is what the model then "
        "amplifies: a "
        "LayerNorm whose input moved one step moves its output several, attention spreads it over the frames, "
        "and by the last encoder layers most codes differ. onnxruntime's `QLinearSoftmax` (a table-driven exp) "
        "was not a rounding tie either: it put some of the decoder step's self-attention probabilities one "
        "step away on the same input codes; that softmax now stays float. onnxruntime's `QLinearAdd` (the "
        "residual adds) does not round exact ties half to even: where the operands' and the sum's scales are "
        "powers of two (`scale_type: pow2`) a sum of two codes falls on a tie for a large share of values, and "
        "the deployed graph then differs from the fake-quant model by a step at many codes of every residual "
        "add, not at a few (`qswap export --onnx` warns for such grids; no shipped recipe has them); with other "
        "scales a tie there is as rare as above. qswap's own sessions (`qswap.export.load_session`) set "
        "`session.qdq_matmulnbits_accuracy_level` to 1: where a recipe leaves the input of a weight-quantized "
        "matmul float (`activation: null`), onnxruntime fuses the weight's `DequantizeLinear` and the `MatMul` "
        "into `MatMulNBits`, whose default accuracy level (4) quantizes that float input to int8 at run time, "
        "a rounding the recipe does not have; a session of your own should set the same entry "
        "(`SessionOptions.add_session_config_entry`) to run what qswap evaluated."]


def ulp_table(rows: list[dict]) -> list[str]:
    """The one-ulp rows (``ulp_rows``) as a table: each draw's WER and their range around the
    fake-quant WER."""
    lines = ["| recipe | subset | fake-quant WER % | WER % with scales moved one ulp | range | same transcripts |",
             "|---|---|---:|---|---:|---|"]
    for row in rows:
        moved = row["wer_moved"]
        lines.append(f"| {row['recipe']} | {row['subset']} | {row['wer_fake_quant']:.2f} | "
                     f"{', '.join(f'{w:.2f}' for w in moved)} | {min(moved) - row['wer_fake_quant']:+.2f} to "
                     f"{max(moved) - row['wer_fake_quant']:+.2f} | {', '.join(str(n) for n in row['same_transcripts'])} |")
    return lines


def ulp_lines(r: dict) -> list[str]:
    if "wer_ulp" not in r:
        return [""]
    seeds = len(r["wer_ulp"][0]["wer_moved"]) if r["wer_ulp"] else 0
    lines = ["", f"How far the fake-quant model's own WER moves for rounding alone: the same model with every "
             f"activation quantizer's scale moved by one float32 ulp (up, down or kept at random, a relative "
             f"1.2e-7; {seeds} draws), decoded the same way:", ""] + ulp_table(r["wer_ulp"])
    return lines + [
        "", "The fake-quant model moves as far for a one-ulp change of its grids as the deployment does: at "
        "these grids its transcripts depend on which side of a rounding tie a few values fall. A deployment "
        "meets the 0.3 target only where it reproduces the fake-quant model's float32 rounding value for value "
        "(onnxruntime's kernels sum in another order, and the integer model of `docs/integer.md` rounds "
        "differently by design), so the rows above miss it by the model's own rounding spread, not by a "
        "different computation. The beam search is not a cause: the float export decodes to fairseq's own "
        "transcripts (`tests/export/test_runtime.py`).", "",
        f"Measured by `{r.get('wer_command', r['command'])}`" + (
            f"; the one-ulp rows (the fake-quant model alone: no exported graph in them) by "
            f"`{r['wer_ulp_command']}`" if r.get("wer_ulp_command", r.get("wer_command")) != r.get("wer_command") else "")
        + ".", ""]


def honesty_section(r: dict) -> list[str]:
    lines = ["## Deploy honesty of each shipped recipe", "",
              "`qswap audit DIR --onnx` on each recipe's export (onnxruntime CPU, optimization `all`): nodes that "
              "run integer kernels and nodes that still compute in float, with the fake-quant audit's verdict"
              + (f" (measured by `{r['honesty_command']}`)" if r.get("honesty_command") else "") + ".", "",
              "| recipe | fake-quant audit | integer nodes | float nodes | float ops | verdict |", "|---|---|---:|---:|---|---|"]
    for name, h in r["honesty"].items():
        if not h["exported"]:
            lines.append(f"| {name} | - | - | - | - | not exported: {h['error']} |")
            continue
        claims = {True: "honest", False: "not honest", None: "-"}[h["claims_honest"]]
        ops = ", ".join(f"{k} {v}" for k, v in h["float_ops"].items())
        lines.append(f"| {name} | {claims} | {h['integer']} | {h['float']} | {ops} | {h['verdict']} |")
    lines += ["", "No recipe deploys integer-only: LayerNorm and softmax run in float in "
              "onnxruntime's CPU graph whatever the recipe says (they are integer in qswap's integer forms, "
              "`docs/integer.md`, which onnxruntime's QDQ fusions do not express). The attention matmuls "
              "of the decoder step run on integers: the self- and encoder-decoder attention caches go in and out "
              "of the graphs as uint8 codes (`qswap.export.decoder_step`), the step appends the new row's codes "
              "to the cache's and its matmuls read them through a `DequantizeLinear` "
              "(`qswap.export.graph_passes.code_caches`), which onnxruntime fuses. Carried as float tensors of "
              "grid values, as qswap exported them before, the caches left every one of these matmuls a float "
              "`MatMul`. "
              "Its self-attention `Softmax` is float by choice: onnxruntime's `QLinearSoftmax` computes another "
              "softmax than the fake-quant model (WER section). A `Mul` by `1 / s` before a `QuantizeLinear` "
              "counts as the quantizer's. The FFN's ReLU between the activation's grid and fc2's input grid runs "
              "as `QLinearLeakyRelu`, a table of the 256 codes' results (`qswap.export.graph_passes.relu_lookups`: "
              "the same codes, without two float passes over the hidden layer). Where no float32 divisor "
              "rounds fc2's input grid as the fake-quant model does, a `Mul` by `1 / s` comes between them "
              "(above) and that layer's `Relu` stays a float node. Linear layers are exported as a `Gemm` on their "
              "flattened rows (`qswap.export.graph_passes.linear_as_gemm`): onnxruntime fuses each, with its "
              "int32 bias, into one `QGemm`; the `MatMul` and `Add` torch traces left the bias add in float. "
              "The decoder step's entry, `embed_scale` times a token row plus a position row, adds the integer "
              "model's rows in int32 (`qswap.export.graph_passes.integer_entry`: each table's codes looked up "
              "in a table of their folded values, `folded_tables`, on a grid 2^-16 of the finest one reading "
              "the sum), and one `DequantizeLinear` hands the sum to its readers: an integer `Add` where torch "
              "traced a float one of two dequantized rows (per-tensor token and position grids; on per-channel "
              "ones the float `Add` stays). "
              "A recipe without activation quantizers (fp32, w8_weight_only) is not exported: the export "
              "needs calibrated activation grids. A 4-bit activation grid exports as the 8-bit `QuantizeLinear` "
              "and a `Clip` of its uint8 codes to the grid's 16 (`qswap.export.qdq`): integer saturation, which "
              "keeps onnxruntime's fusions (an INT4 `QuantizeLinear` it runs, but fuses no kernel around, which "
              "would leave each matmul next to it in float). Where a residual stream's grids are per channel "
              "(`stream_per_channel`, the `*_stream_smoothquant` recipes) the residual `Add` stays float: "
              "onnxruntime's `QLinearAdd` takes per-tensor grids.", ""]
    return lines



def architecture_section(r: dict) -> list[str]:
    lines = ["## Architecture coverage", "",
             "`qswap export QCKPT --onnx` covers three of fairseq's speech architectures:", "",
             "- **s2t_transformer**: `encoder.onnx`, `cross_kv.onnx`, `decoder_step.onnx` (above).",
             "- **s2t_conformer** (fairseq's registered `s2t_conformer`, `conv_version` s2t_transformer): the "
             "same three graphs; the conformer encoder (`qswap.export.encoders`) with each of fairseq's "
             "position encodings: `abs` (the quantized sinusoidal table added), `rel_pos` (the constant "
             "table sliced per length and `rel_shift`, which exports as ONNX slicing and reshapes) and "
             "`rope` (fairseq caches its cos/sin tables for the longest input seen and quantizes the cached "
             "table: the graph holds them for 2048 subsampled frames, the fake-quant model after an input "
             "that long; a longer input is an `ExportError`). Its decoder is the transformer's: the same "
             "cross_kv and decoder_step graphs.",
             "- **wav2vec 2.0 CTC** (`Wav2VecCtc`): one graph, `ctc.onnx`: waveforms (B, S) float and their "
             "padding mask (B, S) bool in; logits (T, B, V) on the logits grid and the output padding mask "
             "(B, T) bool out (`qswap.export.wav2vec2`). `qswap eval DIR --backend onnxruntime` decodes it "
             "with greedy CTC, as `qswap eval` decodes the torch model. Not covered (typed errors): "
             "`blank_weight` other than 0, `crop_seq_to_multiple` other than 1, the conformer wav2vec 2.0 "
             "encoder. An utterance shorter than the feature extractor's receptive field (400 samples, 25 ms "
             "at 16 kHz, with fairseq's default extractor) has no frame: in a padded batch the graph masks all "
             "its frames, and greedy CTC gives it an empty transcript; fairseq's mask construction, which the "
             "fake-quant model and `qswap eval` on the checkpoint use, indexes with the negative length, which "
             "wraps around, and masks almost none of its frames (it decodes the padding). Alone in a batch, "
             "such an utterance is too short for the convolutions: onnxruntime refuses it (an `ExportError`).",
             "", "In every graph the padding mask enters as booleans (attention adds it to the scores after "
             "the softmax input quantizer as 0 or -inf, `Where(mask, -inf, 0)`: the masked fill's values, and "
             "an `Add` onnxruntime runs several times faster than a `Where` on the scores; the deploy audit "
             "counts it with the data movement; wav2vec 2.0 zeroes padded frames before its positional "
             "convolution), so no quantizer reads -inf. Other encoders (a `Conv2dSubsampler`, fairseq's unconverted "
             "modules) are refused with an `ExportError` naming them.", ""]
    arch = r.get("architectures")
    if not arch:
        return lines + ["Per-architecture agreement: not measured (`tools/deploy_doc.py --architectures`).", ""]
    lines += [f"Each architecture's graphs against its fake-quant model (`{arch['command']}`): small random "
              "fairseq models (`qswap.models` builders), w8a8 calibrated on three random padded batches, "
              "compared on one padded batch of 3 in steps of the grid each output lands on (max / mean; "
              "`qswap.export.agreement`); node counts of the deploy audit (optimization `all`).", "",
              "| architecture | graphs | encoder / ctc | cross_kv | decoder_step | padding masks equal | "
              "integer nodes | float nodes |", "|---|---|---|---|---|---|---:|---:|"]
    for row in arch["rows"]:
        a = row["agreement"]
        cells = [f"{a[g]['max']:.2f} / {a[g]['mean']:.4f}" if g in a else "-"
                 for g in ("ctc" if "ctc" in a else "encoder", "cross_kv", "decoder_step")]
        lines.append(f"| {row['architecture']} | {', '.join(row['graphs'])} | " + " | ".join(cells)
                     + f" | {'yes' if a['padding_mask_equal'] else '**no**'} | {row['integer']} | {row['float']} |")
    return lines + ["", "These models are small and random: the agreement says the graphs compute what the "
                    "fake-quant model (`simulate: float`) computes up to rounding ties, not what a trained "
                    "model's WER does (the WER section is the shipped s2t_transformer's). A row whose maximum "
                    "is a few steps is a rounding tie that flipped (onnxruntime's integer kernels sum in another order, \"Where they differ\" above) "
                    "and that the random layers amplified: calibrated with the integer insides instead (one ad "
                    "hoc run), the same builders gave such rows for the S2T transformer and the abs conformer "
                    "and none for rel_pos and rope.", ""]

if __name__ == "__main__":
    out = main()
    print(f"wrote the deploy doc ({'partial' if out.get('partial') else 'complete'} run)")
