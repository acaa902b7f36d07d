"""Decode a subset with fairseq's sequence generator (or greedy CTC) and report WER/CER."""
from __future__ import annotations

import argparse
import json

from qswap.cli.render import console, progress_bar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="fairseq or qswap checkpoint")
    p.add_argument("--data", help="fairseq data directory (config.yaml, TSV manifests)")
    p.add_argument("--subset", default="test", help="subset to decode (default: test)")
    p.add_argument("--recipe", help="convert the model with this recipe first (calibrated on --calib-subset)")
    p.add_argument("--calib-subset", default="train", help="subset for calibration (default: train)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default: 8)")
    p.add_argument("--beam", type=int, default=5, help="beam size for seq2seq models (default: 5)")
    p.add_argument("--max-sentences", type=int, default=32, help="utterances per batch")
    p.add_argument("--num-shards", type=int, default=1, help="split the subset into this many shards")
    p.add_argument("--shard-id", type=int, default=0, help="which shard this process decodes")
    p.add_argument("--json", dest="json_out", help="write utterances and error counts here")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge shard results written with --json")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects")


def run(args: argparse.Namespace) -> int:
    from qswap.errors import DataError
    from qswap.integration.metrics import merge

    out = console()
    if args.merge:
        shards = [_read_shard(path) for path in args.merge]
        _check_shards(shards)
        total = merge(shard["counts"] for shard in shards)
        out.print(f"merged {len(shards)} shards of {shards[0]['subset']} ({shards[0]['model']}): "
                  f"{total.utterances} utterances, WER {total.wer:.2f}%  CER {total.cer:.2f}%")
        _write(args.json_out, {"counts": total.to_dict(), "subset": shards[0]["subset"],
                               "model": shards[0]["model"], "shards": args.merge})
        return 0
    if not args.checkpoint or not args.data:
        raise DataError("qswap eval needs CHECKPOINT and --data DIR (or --merge JSON...)")
    counts, result, label = evaluate(args)
    out.print(f"{label}: {counts.utterances} utterances of {args.subset}"
              f"{f' (shard {args.shard_id}/{args.num_shards})' if args.num_shards > 1 else ''}: "
              f"WER {counts.wer:.2f}%  CER {counts.cer:.2f}%  decode {result.seconds:.1f} s "
              f"({result.audio_seconds / max(result.seconds, 1e-9):.1f}x real time)")
    _write(args.json_out, {"counts": counts.to_dict(), "subset": args.subset, "model": label,
                           "shard": [args.shard_id, args.num_shards],
                           "utterances": [u.__dict__ for u in result.utterances]})
    return 0


def evaluate(args):
    import qswap
    from qswap.calibrate import activation_quantizers
    from qswap.integration import data as fdata
    from qswap.integration.decode import decode
    from qswap.integration.metrics import error_counts

    model, task = fdata.load_model_and_task(args.checkpoint, args.data, trust_checkpoint=args.trust_checkpoint)
    label = getattr(getattr(model, "qswap_recipe", None), "name", "float")
    if args.recipe:
        model = qswap.convert(model, args.recipe)
        label = model.qswap_recipe.name
        if activation_quantizers(model):
            with progress_bar("calibrating", args.calib_batches) as advance:
                qswap.calibrate(model, fdata.net_inputs(task, args.calib_subset, args.calib_batches,
                                                        max_sentences=args.max_sentences),
                                progress=lambda n: advance(1))
    samples = fdata.batches(task, args.subset, max_sentences=args.max_sentences,
                            num_shards=args.num_shards, shard_id=args.shard_id)
    with progress_bar(f"decoding {args.subset}", None) as advance:
        result = decode(task, model, samples, beam=args.beam, progress=advance)
    counts = error_counts([u.ref for u in result.utterances], [u.hyp for u in result.utterances])
    return counts, result, label


def _read_shard(path: str) -> dict:
    """A shard result written by ``qswap eval --json``: its counts, subset, model and shard."""
    from qswap.errors import DataError
    from qswap.integration.metrics import ErrorCounts

    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        c = payload["counts"]
        counts = ErrorCounts(c["word_errors"], c["words"], c["char_errors"], c["chars"], c["utterances"])
        shard_id, num_shards = payload["shard"]
        if not (isinstance(shard_id, int) and isinstance(num_shards, int)):
            raise TypeError(f"'shard' must be [shard_id, num_shards], got {payload['shard']!r}")
        return {"path": path, "counts": counts, "subset": str(payload["subset"]),
                "model": str(payload["model"]), "shard_id": shard_id, "num_shards": num_shards}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a shard result written by 'qswap eval --json': "
                        f"{type(exc).__name__}: {exc}") from None


def _check_shards(shards: list[dict]) -> None:
    """One decode split K ways: the same num_shards, subset and model; ids 0..K-1 each once."""
    from qswap.errors import DataError

    first = shards[0]
    for key in ("num_shards", "subset", "model"):
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


def _write(path: str | None, payload: dict) -> None:
    if path:
        from qswap.io.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
