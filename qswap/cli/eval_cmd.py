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
    from qswap.integration.metrics import ErrorCounts, merge

    out = console()
    if args.merge:
        total = merge(_read_counts(path) for path in args.merge)
        out.print(f"merged {len(args.merge)} shards: {total.utterances} utterances, "
                  f"WER {total.wer:.2f}%  CER {total.cer:.2f}%")
        _write(args.json_out, {"counts": total.to_dict(), "shards": args.merge})
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


def _read_counts(path: str):
    from qswap.errors import DataError
    from qswap.integration.metrics import ErrorCounts

    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)["counts"]
        return ErrorCounts(c["word_errors"], c["words"], c["char_errors"], c["chars"], c["utterances"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a shard result written by 'qswap eval --json': {exc}") from None


def _write(path: str | None, payload: dict) -> None:
    if path:
        from qswap.io.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
