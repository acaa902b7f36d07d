"""Decode a subset with fairseq's sequence generator (or greedy CTC) and report WER/CER."""
from __future__ import annotations

import argparse
import json

from qswap.cli.args import COUNT, MAX_SENTENCES, POSITIVE, THREADS, only_with, set_defaults
from qswap.cli.render import console, interactive, progress_bar
from qswap.nn.simulate import SIMULATIONS  # `import qswap` has imported torch already: free here

CALIB_SUBSET, CALIB_BATCHES = "train", 8  # --recipe's calibration, where the options are not given


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="fairseq or qswap checkpoint, or a directory written by "
                                                 "'qswap export' (the integer model; with --backend "
                                                 "onnxruntime, one written by 'qswap export --onnx')")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="run the checkpoint in torch (default) or the exported graphs in onnxruntime")
    p.add_argument("--threads", type=THREADS, help="onnxruntime threads (default: 1)")
    p.add_argument("--data", help="fairseq data directory (config.yaml, TSV manifests)")
    p.add_argument("--subset", help="subset to decode (default: test)")
    p.add_argument("--recipe", help="convert the model with this recipe first (calibrated on --calib-subset)")
    p.add_argument("--calib-subset", help=f"with --recipe: subset for calibration (default: {CALIB_SUBSET})")
    p.add_argument("--calib-batches", type=POSITIVE,
                   help=f"with --recipe: calibration batches (default: {CALIB_BATCHES})")
    p.add_argument("--beam", type=POSITIVE, help="beam size for seq2seq models (default: 5)")
    p.add_argument("--max-sentences", type=POSITIVE, help=f"utterances per batch (default: {MAX_SENTENCES})")
    p.add_argument("--num-shards", type=POSITIVE, default=1, help="split the subset into this many shards")
    p.add_argument("--shard-id", type=COUNT, default=0, help="which shard this process decodes")
    p.add_argument("--json", dest="json_out", help="write utterances and error counts here ('-': stdout, "
                                                   "and the summary line goes to stderr)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge shard results written with --json")
    p.add_argument("--vs-float", action="store_true",
                   help="with --recipe: decode the float model too and report ΔWER with a paired interval")
    p.add_argument("--baseline", metavar="JSON",
                   help="a result of 'qswap eval --json' on the same subset: report ΔWER against it (with "
                        "--merge: the merged result's, nothing decoded)")
    p.add_argument("--integer", action="store_true",
                   help="decode the quantized model (--recipe R, or a checkpoint written by 'qswap convert') "
                        "with integer execution (qswap.integerize), same beam search and WER")
    p.add_argument("--simulate", choices=SIMULATIONS,
                   help="the fake-quant model's arithmetic (qswap.nn.simulate), in place of its recipe's "
                        "'simulate': float (what onnxruntime's QDQ graphs compute) or integer (what "
                        "qswap.integerize computes); calibration with --recipe runs it too")
    p.add_argument("--markdown", help="write the result row as Markdown here")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def _decoding_options(args: argparse.Namespace) -> list[str]:
    """The options given that only decoding reads (``--merge`` would ignore them: ``--subset
    test_heldout`` had printed the merged shards' subset, whatever it was, with exit 0)."""
    given = {"CHECKPOINT": args.checkpoint, "--data": args.data, "--subset": args.subset is not None,
             "--beam": args.beam is not None, "--max-sentences": args.max_sentences is not None,
             "--threads": args.threads is not None, "--trust-checkpoint": args.trust_checkpoint,
             "--recipe": args.recipe,
             "--simulate": args.simulate, "--integer": args.integer, "--vs-float": args.vs_float,
             "--calib-subset": args.calib_subset, "--calib-batches": args.calib_batches,
             "--backend onnxruntime": args.backend == "onnxruntime",
             "--num-shards": args.num_shards != 1, "--shard-id": args.shard_id != 0}
    return [name for name, value in given.items() if value]


def run(args: argparse.Namespace) -> int:
    from qswap.errors import DataError
    from qswap.integration.metrics import merge

    # --json -: the JSON alone on stdout, no progress (a file path: the terminal line as well)
    out = console(stderr=True) if args.json_out == "-" else console()
    if args.merge:
        decoding = _decoding_options(args)
        if decoding:
            raise DataError(f"--merge adds up shard results as they were decoded; {', '.join(decoding)} "
                            f"appl{'ies' if len(decoding) == 1 else 'y'} when decoding: pass "
                            f"{'it' if len(decoding) == 1 else 'them'} to each shard's 'qswap eval ... --shard-id I'")
        shards = [_read_shard(path) for path in args.merge]
        _check_shards(shards)
        total = merge(shard["counts"] for shard in shards)
        utterances = sorted((u for s in shards for u in s["utterances"]), key=lambda u: u["id"])
        # --baseline: the paired ΔWER of the merged result against another stored one, nothing decoded
        baseline = _read_baseline(args.baseline) if args.baseline else None
        stats = _intervals(utterances, baseline)
        _write(args.json_out, {"counts": total.to_dict(), "subset": shards[0]["subset"],  # the files first
                               "model": shards[0]["model"], "shards": args.merge, **stats,
                               "utterances": utterances})
        if args.markdown and utterances:  # the merged row, as a single decode's --markdown writes it
            from qswap.io.atomic import atomic_write_text
            atomic_write_text(args.markdown, _markdown(shards[0]["model"], shards[0]["subset"], total, stats))
        out.print(f"merged {len(shards)} shard{'s' if len(shards) > 1 else ''} of {shards[0]['subset']} "
                  f"({shards[0]['model']}): {total.utterances} utterances, WER {total.wer:.2f}%"
                  f"{_ci(stats.get('wer_ci'))}  CER {total.cer:.2f}%{_delta_text(stats)}")
        if "note" in stats:
            out.print(f"note: {stats['note']}")
        if args.markdown and not utterances:
            out.print("no --markdown row: the shards hold no utterances (no WER to write)")
        return 0
    if not args.checkpoint or not args.data:
        raise DataError("qswap eval needs CHECKPOINT and --data DIR (or --merge JSON...)")
    given_threads = args.threads
    set_defaults(args, {"--subset": "test", "--beam": 5, "--max-sentences": MAX_SENTENCES, "--threads": 1})
    if args.backend == "onnxruntime" and (args.recipe or args.vs_float):
        raise DataError("--backend onnxruntime decodes an export directory as exported; "
                        "--recipe and --vs-float apply to torch checkpoints")
    if args.backend == "onnxruntime" and args.integer:
        raise DataError("--integer runs qswap's integer model in torch; with --backend onnxruntime the exported "
                        "graphs run as they were exported: drop one of the two")
    if args.vs_float and not args.recipe:
        raise DataError("--vs-float compares a --recipe with the float model; pass --recipe R")
    if args.simulate and (args.backend == "onnxruntime" or args.integer):
        other = "--integer (integer kernels)" if args.integer else "--backend onnxruntime (onnxruntime's kernels)"
        raise DataError(f"--simulate picks the fake-quant model's arithmetic; drop it with {other}")
    if args.baseline and args.vs_float:
        raise DataError("--baseline and --vs-float each give the ΔWER its reference; pass one of them")
    _calibration_options(args)
    if given_threads is not None and args.backend != "onnxruntime":  # had been ignored without a word
        raise DataError(f"--threads sets onnxruntime's threads: add --backend onnxruntime to decode an ONNX export "
                        f"directory with it; a torch checkpoint or an integer export decodes with torch's threads "
                        f"(OMP_NUM_THREADS={args.threads} in the environment): drop --threads")
    baseline = _read_baseline(args.baseline) if args.baseline else None
    counts, result, label, float_result = evaluate(args)
    utterances = [u.__dict__ for u in result.utterances]
    if float_result is not None:
        baseline = {"model": "float", "utterances": [u.__dict__ for u in float_result.utterances]}
    stats = _intervals(utterances, baseline)
    shard = f" (shard {args.shard_id}/{args.num_shards})" if args.num_shards > 1 else ""
    if not utterances and args.num_shards == 1:
        raise DataError(f"subset {args.subset} of {args.data} has no utterances to decode")
    # the files first: a reader that closes the terminal's pipe (| head) loses none
    _write(args.json_out, {"counts": counts.to_dict(), "subset": args.subset, "model": label,
                           "shard": [args.shard_id, args.num_shards], "settings": _settings(args), **stats,
                           "utterances": utterances})
    if args.markdown and utterances:
        from qswap.io.atomic import atomic_write_text
        atomic_write_text(args.markdown, _markdown(label, args.subset, counts, stats))
    if not utterances:  # a shard whose batches all went to the others: its (empty) result still merges
        out.print(f"{label}: 0 utterances of {args.subset}{shard}: fairseq gave every batch to the other "
                  f"shards (the subset has fewer batches than --num-shards); 'qswap eval --merge' takes this "
                  f"shard's result as it is{'; no --markdown row (no WER to write)' if args.markdown else ''}")
    else:
        out.print(f"{label}: {counts.utterances} utterances of {args.subset}{shard}: "
                  f"WER {counts.wer:.2f}%{_ci(stats['wer_ci'])}  CER {counts.cer:.2f}%{_delta_text(stats)}  "
                  f"decode {result.seconds:.1f} s ({result.audio_seconds / max(result.seconds, 1e-9):.1f}x real time)")
        if "note" in stats:
            out.print(f"note: {stats['note']}")
    return 0


def _ci(interval, sign: str = "") -> str:
    from qswap.integration.compare import interval_suffix
    return interval_suffix(interval, sign)


def _delta_text(stats: dict) -> str:
    """'  ΔWER vs BASELINE +d [lo, hi] (significant)' of a result with a baseline, else ''."""
    if "baseline" not in stats:
        return ""
    verdict = {True: "significant", False: "not significant", None: "significance: -"}
    return (f"  ΔWER vs {stats['baseline']} {stats['delta_wer']:+.2f}{_ci(stats['delta_wer_ci'], '+')} "
            f"({verdict[stats['significant']]})")


def _intervals(utterances: list[dict], baseline: dict | None) -> dict:
    """WER interval, and the paired ΔWER interval against ``baseline``'s utterances (same ids and
    references), as JSON fields; see qswap.integration.bootstrap."""
    from qswap.integration.bootstrap import Bootstrap, bounds, no_interval_note, paired_delta, significant, wer_interval
    from qswap.integration.metrics import utterance_word_errors

    if not utterances:
        return {}
    bootstrap = Bootstrap()
    errors, words = utterance_word_errors([u["ref"] for u in utterances], [u["hyp"] for u in utterances],
                                          [u["id"] for u in utterances])
    stats = {"bootstrap": bootstrap.to_dict(), "wer_ci": bounds(wer_interval(errors, words, bootstrap))}
    note = no_interval_note(len(utterances), "this result has")
    if note:
        stats["note"] = note
    if baseline is None:
        return stats
    value, delta = paired_delta(utterances, baseline["utterances"], bootstrap, f"the baseline {baseline['model']}")
    return {**stats, "baseline": baseline["model"], "delta_wer": value, "delta_wer_ci": bounds(delta),
            "significant": significant(delta)}


def _markdown(label: str, subset: str, counts, stats: dict) -> str:
    from qswap.integration.compare import significance_text
    from qswap.markdown import cell as md_cell

    head = "| model | subset | utterances | WER % [95 % CI] | CER % |"
    row = f"| {md_cell(label)} | {md_cell(subset)} | {counts.utterances} | {counts.wer:.2f}{_ci(stats.get('wer_ci'))} | {counts.cer:.2f} |"
    if "baseline" in stats:
        head += " ΔWER [95 % CI] | vs | significant |"
        row += (f" {stats['delta_wer']:+.2f}{_ci(stats['delta_wer_ci'], '+')} | {stats['baseline']} | "
                f"{significance_text(stats['significant'])} |")
    note = f"\n{stats['note']}\n" if "note" in stats else ""
    return f"{head}\n|{'---|' * head.count(' |')}\n{row}\n{note}"


def _read_baseline(path: str) -> dict:
    from qswap.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        utterances = [{"id": _utterance_id(u), "ref": str(u["ref"]), "hyp": str(u["hyp"])}
                      for u in payload["utterances"]]
        return {"model": str(payload["model"]), "utterances": utterances}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--baseline {path} is not a result written by 'qswap eval --json': "
                        f"{type(exc).__name__}: {exc}") from None


def _utterance_id(utterance: dict) -> int:
    """An utterance's id as 'qswap eval --json' writes it: a JSON integer (a ValueError for any
    other, e.g. Infinity, which Python's json reads as a float that int() cannot convert)."""
    uid = utterance["id"]
    if type(uid) is not int:  # bool is an int, not an id
        raise ValueError(f"utterance id must be an integer, got {uid!r}")
    return uid


def _calibration_options(args: argparse.Namespace) -> None:
    """--calib-subset and --calib-batches calibrate --recipe's conversion: a DataError where no
    recipe is converted (they had been ignored without a word); with a recipe, their defaults set."""
    if args.backend == "onnxruntime":
        def refusal(named):
            return (f"{named} calibrate{'' if ' and ' in named else 's'} a --recipe conversion in torch; an ONNX "
                    f"export decodes with the grids it "
                    f"was exported with: drop {named}")
    else:
        def refusal(named):
            return (f"{named} calibrate{'' if ' and ' in named else 's'} the conversion of --recipe R; without it "
                    f"nothing is calibrated (a "
                    f"checkpoint written by 'qswap convert' decodes with the grids it holds): add --recipe R "
                    f"or drop {named}")
    only_with(args, {"--calib-subset": CALIB_SUBSET, "--calib-batches": CALIB_BATCHES}, bool(args.recipe), refusal)


def evaluate(args):
    """(counts, decode result, label, float decode result or None) for ``qswap eval``'s args."""
    import qswap
    from qswap.calibrate import activation_quantizers
    from qswap.integration import data as fdata

    if args.backend == "onnxruntime":
        from qswap.export.runtime import load_deployed
        model, task = load_deployed(args.checkpoint, args.data, threads=args.threads)
        label = f"{model.recipe} (onnxruntime)"
        result = _decode(args, task, model, label)
        counts = _counts(result)
        return counts, result, label, None
    from qswap.export.integer_load import is_integer_export
    if is_integer_export(args.checkpoint):
        return _evaluate_exported(args)
    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    label = getattr(getattr(model, "qswap_recipe", None), "name", "float")
    recipe = qswap.load_recipe(args.recipe) if args.recipe else None
    # --vs-float: the float model is the one loaded (convert leaves it untouched), decoded once the
    # quantized model is ready, so that converting, calibrating and integerizing fail before any decoding
    float_model = model if args.vs_float else None
    if recipe is not None:
        model = qswap.convert(model, recipe, data=fdata.transform_data(
            recipe, task, args.calib_subset, args.calib_batches, max_sentences=args.max_sentences))
        label = model.qswap_recipe.name
    with _simulation(args, model):
        if args.recipe and activation_quantizers(model):
            from qswap.integration.compare import said_used
            with progress_bar("calibrating", args.calib_batches, enabled=_progress(args)) as advance:
                used = qswap.calibrate(model, fdata.net_inputs(task, args.calib_subset, args.calib_batches,
                                                               max_sentences=args.max_sentences),
                                       progress=lambda n: advance(1))
            # fewer than asked, where the subset makes fewer: said, and recorded (it had been neither)
            args.calib_batches_used = said_used(args.calib_subset, args.calib_batches, used, "--calib-batches",
                                                "calibration", args.max_sentences)
        if args.integer:
            model, label = integer_model(model), f"{label} (integer)"
        if args.simulate:
            label = f"{label} (simulate: {args.simulate})"
        float_result = _decode(args, task, float_model, "float") if float_model is not None else None
        result = _decode(args, task, model, label)
    counts = _counts(result)
    return counts, result, label, float_result


def _evaluate_exported(args):
    """``evaluate`` for an integer model written by ``qswap export``: integer execution
    (fairseq's beam search, or greedy CTC for wav2vec 2.0: ``qswap.integration.integer_decode``),
    no float model to compare with."""
    from qswap.errors import DataError
    from qswap.export.integer_load import load_integer_model
    from qswap.integration import data as fdata
    from qswap.integration.integer_decode import BEAM_SEARCH, decode_exported, decoding_method, exported_task

    given = [flag for flag, on in (("--recipe", args.recipe), ("--vs-float", args.vs_float),
                                   ("--simulate", args.simulate), ("--integer", args.integer)) if on]
    if given:  # --integer had been accepted, and did nothing
        raise DataError(f"{args.checkpoint} is an exported integer model: it is already quantized and runs "
                        f"integer kernels; drop {', '.join(given)} (compare with --baseline EVAL.json)")
    exported = load_integer_model(args.checkpoint)
    task = exported_task(exported, args.data)
    method = decoding_method(exported)
    label = f"integer export ({method}, beam {args.beam})" if method == BEAM_SEARCH else f"integer export ({method})"
    samples = fdata.batches(task, args.subset, max_sentences=args.max_sentences,
                            num_shards=args.num_shards, shard_id=args.shard_id)
    with progress_bar(f"{label}: decoding {args.subset}", None, enabled=_progress(args)) as advance:
        result = decode_exported(task, exported, samples, beam=args.beam, progress=advance)
    counts = _counts(result)
    return counts, result, label, None


def _counts(result):
    """Word and character error counts of a decode result's utterances (``error_counts``; a
    DataError names the utterance with an empty reference)."""
    from qswap.integration.metrics import error_counts

    utterances = result.utterances
    return error_counts([u.ref for u in utterances], [u.hyp for u in utterances], [u.id for u in utterances])


def _simulation(args, model):
    """``qswap.nn.simulate.simulating(model, --simulate)``, or nothing without the option; a
    DataError for a model with no fake-quant counterparts (a float checkpoint without --recipe)."""
    import contextlib

    from qswap.errors import DataError
    from qswap.nn.simulate import simulating

    if not args.simulate:
        return contextlib.nullcontext(model)
    if getattr(model, "qswap_recipe", None) is None:
        raise DataError("--simulate picks a quantized model's arithmetic: pass --recipe R, or a checkpoint "
                        "written by 'qswap convert'")
    return simulating(model, args.simulate)


def integer_model(model):
    """``qswap.integerize(model)`` of a quantized model; IntegerizeError for a float one."""
    import qswap
    from qswap.errors import IntegerizeError

    if getattr(model, "qswap_recipe", None) is None:
        raise IntegerizeError("--integer runs a quantized model on integers: pass --recipe R, or a checkpoint "
                              "written by 'qswap convert'")
    return qswap.integerize(model)


def _decode(args, task, model, label: str):
    from qswap.integration import data as fdata
    from qswap.integration.decode import decode

    samples = fdata.batches(task, args.subset, max_sentences=args.max_sentences,
                            num_shards=args.num_shards, shard_id=args.shard_id)
    with progress_bar(f"{label}: decoding {args.subset}", None, enabled=_progress(args)) as advance:
        return decode(task, model, samples, beam=args.beam, progress=advance)


def _settings(args) -> dict:
    """What decides which utterances a shard holds and what it decodes them to: shards of one decode
    agree on all of it (``--merge`` checks)."""
    from pathlib import Path
    return {"checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
            "data": str(Path(args.data).resolve()) if args.data else None, "recipe": args.recipe,
            # nothing calibrated without --recipe: no subset, 0 batches (as compare writes; the defaults
            # --recipe would take had been recorded)
            "calib_subset": args.calib_subset if args.recipe else None,
            "calib_batches": args.calib_batches if args.recipe else 0,
            "calib_batches_used": getattr(args, "calib_batches_used", None), "beam": args.beam, "max_sentences": args.max_sentences, "backend": args.backend,
            "integer": bool(args.integer), "simulate": args.simulate}


def _read_shard(path: str) -> dict:
    """A shard result written by ``qswap eval --json``: its counts, subset, model and shard."""
    from qswap.errors import DataError
    from qswap.integration.metrics import ErrorCounts, error_counts

    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        c = payload["counts"]
        for name in ("word_errors", "words", "char_errors", "chars", "utterances"):
            if type(c[name]) is not int or c[name] < 0:  # bool is an int, not a count
                raise ValueError(f"counts.{name} must be a whole number >= 0, got {c[name]!r}")
        counts = ErrorCounts(c["word_errors"], c["words"], c["char_errors"], c["chars"], c["utterances"])
        shard_id, num_shards = payload["shard"]
        if not (isinstance(shard_id, int) and isinstance(num_shards, int)):
            raise TypeError(f"'shard' must be [shard_id, num_shards], got {payload['shard']!r}")
        utterances = [{"id": _utterance_id(u), "ref": u["ref"], "hyp": u["hyp"]} for u in payload.get("utterances", [])]
        for u in utterances:
            if not (isinstance(u["ref"], str) and u["ref"].strip() and isinstance(u["hyp"], str)):
                raise ValueError(f"utterance {u['id']}: 'ref' must be a non-empty transcript and 'hyp' a "
                                 f"transcript, got {u['ref']!r} and {u['hyp']!r}")
        # the counts are those of the utterances (eval writes both from one decode): a hand-edited
        # count would otherwise be merged as it is (words 0, word_errors 5: "WER 500%")
        actual = error_counts([u["ref"] for u in utterances], [u["hyp"] for u in utterances],
                              [u["id"] for u in utterances])
        if counts != actual:
            differ = ", ".join(f"{name} {getattr(counts, name)} (the utterances give {getattr(actual, name)})"
                               for name in ("word_errors", "words", "char_errors", "chars", "utterances")
                               if getattr(counts, name) != getattr(actual, name))
            raise ValueError(f"its counts disagree with its utterances: {differ}")
        return {"path": path, "counts": counts, "subset": str(payload["subset"]), "utterances": utterances,
                "model": str(payload["model"]), "shard_id": shard_id, "num_shards": num_shards,
                "settings": payload.get("settings")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a shard result written by 'qswap eval --json': "
                        f"{type(exc).__name__}: {exc}") from None


def _check_shards(shards: list[dict]) -> None:
    """One decode split K ways: the same num_shards, subset and model; ids 0..K-1 each once."""
    from qswap.errors import DataError

    first = shards[0]
    for key in ("num_shards", "subset", "model", "settings"):
        for shard in shards[1:]:
            if shard[key] != first[key]:
                raise DataError(f"cannot merge: {shard['path']} has {key} {shard[key]!r} but "
                                f"{first['path']} has {first[key]!r}; merge the shards of one "
                                f"'qswap eval --num-shards K' run")
    k = first["num_shards"]
    seen: dict[int, str] = {}
    for shard in shards:
        if not 0 <= shard["shard_id"] < k:
            raise DataError(f"cannot merge: {shard['path']} is shard {shard['shard_id']}, outside "
                            f"0..{k - 1} of num_shards {k}")
        if shard["shard_id"] in seen:
            raise DataError(f"cannot merge: shard {shard['shard_id']} of {k} is given twice "
                            f"({seen[shard['shard_id']]} and {shard['path']}); pass each shard once")
        seen[shard["shard_id"]] = shard["path"]
    missing = sorted(set(range(k)) - set(seen))
    if missing:
        raise DataError(f"cannot merge: shard(s) {', '.join(map(str, missing))} of {k} missing; "
                        f"pass all {k} shard results written with --num-shards {k}")
    owner: dict[int, str] = {}
    for shard in shards:
        for u in shard["utterances"]:
            if u["id"] in owner:
                raise DataError(f"cannot merge: utterance {u['id']} is in {owner[u['id']]} and in {shard['path']}; "
                                f"merge the shards of one 'qswap eval --num-shards K' run")
            owner[u["id"]] = shard["path"]


def _progress(args) -> bool:
    return interactive() and args.json_out != "-"


def _write(path: str | None, payload: dict) -> None:
    if path == "-":
        print(json.dumps(payload, indent=2, sort_keys=True))
    elif path:
        from qswap.io.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
