#!/usr/bin/env python3
"""Write docs/integer.md's decode table: on the shipped model, each recipe's fake-quant WER and
its integer model's WER (``qswap.integerize``), decoded alike by fairseq's SequenceGenerator
(beam 5, as ``qswap eval`` and ``make demo`` decode), the paired difference integer - fake-quant
with its bootstrap interval, how many transcripts are the same, the honesty audit's verdict on the
fake-quant model and the integer audit's on the integer model.

It runs ``qswap compare --integer`` (the library function ``qswap.integration.compare.compare``)
on both shipped test sets exactly as the demo calibrates (shipped ``train_calib``: its 32
utterances, one batch), writes each result to ``docs/integer_<subset>.json``, measures how the codes of the two
encoders drift apart layer by layer (``docs/integer_layers.json``) and writes the tables between
the ``<!-- decode:begin -->`` and ``<!-- decode:end -->`` markers of docs/integer.md (the decode
table also between the same markers of the README).

    .venv/bin/python tools/integer_doc.py               # decode and write (about 15 min on 2 cores)
    .venv/bin/python tools/integer_doc.py --from-json   # rewrite the table from the JSON files
    .venv/bin/python tools/integer_doc.py --subsets test_heldout   # one set (two processes: two cores)
    .venv/bin/python tools/integer_doc.py --stream      # the per-channel stream recipe's table (its own
                                                         # markers <!-- stream:begin --> / <!-- stream:end -->)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qswap.demo import ASSET, SEARCHED, calibration_text  # noqa: E402

RECIPES = ["w8a8", "w4a8", "w4a8_edges8", str(SEARCHED)]
SUBSETS = {"test": "in-voice", "test_heldout": "held-out voices"}
TARGET = 0.2  # issue 16: |integer - fake-quant| <= 0.2 absolute WER
DOC, README = REPO / "docs" / "integer.md", REPO / "README.md"
LAYERS = REPO / "docs" / "integer_layers.json"
BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
STREAM = "w4a4_edges8_stream_smoothquant"  # the 4-bit-activation recipe with per-channel stream grids
STREAM_BEGIN, STREAM_END = "<!-- stream:begin -->", "<!-- stream:end -->"
STREAM_LAYERS = REPO / "docs" / "stream_integer_layers.json"
STREAM_LAYERS_BEGIN, STREAM_LAYERS_END = "<!-- stream-layers:begin -->", "<!-- stream-layers:end -->"


def run(subset: str, beam: int, recipes: list[str] = RECIPES) -> dict:
    from qswap.cli.quiet import held_back
    from qswap.integration.compare import compare

    start = time.perf_counter()
    with held_back(verbose=False):
        table = compare(str(ASSET / "checkpoint.pt"), str(ASSET), recipes, subset=subset,
                        calib_subset="train_calib", calib_batches=4, beam=beam, integer=True,
                        progress=lambda r, stage, n, total: None)
    payload = table.to_dict()
    payload["checkpoint"] = "qswap/assets/s2t_demo/checkpoint.pt"
    payload["seconds"] = round(time.perf_counter() - start, 1)
    return payload


def layer_agreement(recipe: str = "w8a8", count: int = 8) -> list[dict]:
    """Per encoder layer of the shipped model (``recipe`` with ``simulate: float``, calibrated as
    above; the first ``count`` test utterances), the share of equal codes between the integer and
    the fake-quant encoder (the default ``simulate: integer`` computes the integer encoder's codes):
    ``chained``: on the layer's input (its norm's grid), both run from the features; ``alone``: on
    the layer's output (the next consumer's grid), the integer layer given the fake-quant layer's
    input (onto a stream 2^16 times finer than the input's grids)."""
    import torch
    from fairseq import utils
    from fairseq.data.data_utils import lengths_to_padding_mask

    import qswap
    from qswap.integration import data as fdata
    from qswap.nn.simulate import stream_to
    from qswap.recipe import with_simulate

    model, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    calibration = list(fdata.net_inputs(task, "train_calib", 4, max_sentences=32))
    qmodel = qswap.convert(model, with_simulate(recipe, "float"), data=calibration)  # data: a recipe's transforms (SmoothQuant)
    qswap.calibrate(qmodel, calibration)
    encoder, layers = qmodel.encoder, list(qmodel.encoder.transformer_layers)
    integer = qswap.integerize(qmodel).encoder
    net_input = fdata.first_net_input(task, "test", count)
    seen: list = []
    hooks = [layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for layer in layers]
    with torch.no_grad():
        encoder(net_input["src_tokens"], net_input["src_lengths"])
        for h in hooks:
            h.remove()
        x, lengths = integer.subsample(integer.input(net_input["src_tokens"]), net_input["src_lengths"])
        padding = lengths_to_padding_mask(lengths)  # (B, T')
        valid = ~padding.T  # (T', B)
        positions = utils.make_positions(padding, integer.padding_idx)  # (B, T')
        stream = ((x.to(torch.int32) - integer.embed_zero_point) << integer.stream_bits) + integer.positions[positions.T]
        scale = encoder.embed_scale * float(encoder.embed_quant.scale) * 2.0 ** -integer.stream_bits
        nexts = [layer.self_attn_layer_norm.input_quant for layer in layers[1:]] + [encoder.layer_norm.input_quant]
        rows = []
        for layer, integer_layer, (x_in, out), nxt in zip(layers, integer.layers, seen, nexts):
            norm_in = layer.self_attn_layer_norm.input_quant
            chained = stream_to(scale, norm_in)(stream)
            stream, scale = integer_layer(stream, padding), integer_layer.stream_scale
            fine = min(float(norm_in.scale.min()), float(layer.attn_residual_quant.scale.min())) \
                * 2.0 ** -integer.stream_bits  # the finest channel of per-channel grids
            alone_layer = layer.to_integer(fine)
            alone = stream_to(alone_layer.stream_scale, nxt)(alone_layer(torch.round(x_in / fine).to(torch.int32), padding))
            rows.append({"chained": _equal(chained, x_in, norm_in, valid), "alone": _equal(alone, out, nxt, valid)})
    return rows


def _equal(codes, fake, quant, valid) -> float:
    """Share of ``codes`` equal to the codes of the fake-quant values ``fake`` on ``quant``'s grid."""
    from qswap.quant.integer import stream_grid
    reference = stream_grid(quant).quantize(fake)
    return float((codes.long() == reference.long())[valid].double().mean())


def layers_table(rows: list[dict], recipe: str = "w8a8") -> list[str]:
    head = f"| {recipe}, shipped model, first 8 test utterances: encoder layer | " + " | ".join(
        str(i + 1) for i in range(len(rows))) + " |"
    return ["", "Where the differences of `simulate: float` come from (its decode table is below, under "
            "\"The float insides\"): each op of the float insides agrees with its integer form up to "
            "near-ties, and the model amplifies every one-step flip as it travels through the layers "
            "(with the default `simulate: integer` the two encoders compute the same codes):", "",
            head, "|---|" + "---|" * len(rows),
            "| codes entering the layer equal %, both encoders run from the features | "
            + " | ".join(f"{100 * r['chained']:.1f}" for r in rows) + " |",
            "| the integer layer alone, on the fake-quant layer's input: output codes equal % | "
            + " | ".join(f"{100 * r['alone']:.1f}" for r in rows) + " |"]


def rows_table(results: dict[str, dict]) -> list[str]:
    """The decode table itself (docs/integer.md and the README)."""
    from qswap.integration.bootstrap import value_text as with_interval

    lines = ["| recipe | test set | fake-quant WER % | integer WER % | integer - fake [95 % CI] | "
             f"within {TARGET} | same transcripts | honest | integer-only | decode s (fake, integer) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for subset, payload in results.items():
        for r in payload["rows"]:
            i = r["integer"]
            if i is None:  # the float reference row
                continue
            name = Path(r["recipe"]).stem
            if i["wer"] is None:
                lines.append(f"| {name} | {subset} | {r['wer']:.2f} | - ({i['note']}) | - | - | - | "
                             f"{'yes' if r['honest'] else 'no'} | - | - |")
                continue
            lines.append(
                f"| {name} | {subset} | {r['wer']:.2f} | {i['wer']:.2f} | "
                f"{with_interval(i['delta_vs_fake'], i['delta_vs_fake_ci'], '+')} | "
                f"{'yes' if abs(i['delta_vs_fake']) <= TARGET + 1e-9 else 'no'} | "
                f"{i['same_transcripts']} of {r['utterances']} | {'yes' if r['honest'] else 'no'} | "
                f"{'yes' if i['integer_only'] else 'no'} | {r['decode_s']:.0f}, {i['decode_s']:.0f} |")
    return lines


def stream_table(results: dict[str, dict]) -> str:
    """The per-channel stream recipe's decode table (float, fake-quant and integer WER), between
    the stream markers."""
    from qswap.integration.bootstrap import value_text as with_interval

    lines = [STREAM_BEGIN, "<!-- generated by tools/integer_doc.py --stream; do not edit by hand -->", "",
             "| recipe | test set | float WER % | fake-quant WER % [95 % CI] | integer WER % | integer - fake [95 % CI] "
             "| same transcripts | honest | integer-only | decode s (fake, integer) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for subset, payload in results.items():
        float_wer = next(r["wer"] for r in payload["rows"] if r["integer"] is None)
        for r in payload["rows"]:
            i = r["integer"]
            if i is None:  # the float reference row
                continue
            cells = ([f"{i['wer']:.2f}", with_interval(i["delta_vs_fake"], i["delta_vs_fake_ci"], "+"),
                      f"{i['same_transcripts']} of {r['utterances']}"] if i["wer"] is not None
                     else [f"- ({i['note']})", "-", "-"])
            lines.append(" | ".join([
                f"| {Path(r['recipe']).stem}", subset, f"{float_wer:.2f}", with_interval(r["wer"], r["wer_ci"]), *cells,
                "yes" if r["honest"] else "no", ("yes" if i["integer_only"] else "no") if i["wer"] is not None else "-",
                f"{r['decode_s']:.0f}, {i['decode_s']:.0f}" if i["wer"] is not None else "-"]) + " |")
    lines.append(STREAM_END)
    return "\n".join(lines)


def stream_layers_table(layers: dict) -> str:
    """``--layers``'s JSON of the stream recipe as the page's table, with its command, between the
    stream-layers markers."""
    return "\n".join([STREAM_LAYERS_BEGIN, "", "    .venv/bin/python tools/integer_doc.py --layers "
                      + layers["recipe"] + " --layers-json docs/stream_integer_layers.json", "",
                      *layers_table(layers["rows"], layers["recipe"])[3:], STREAM_LAYERS_END])


def table(results: dict[str, dict], layers: list[dict] | None = None) -> str:
    from qswap.integration.bootstrap import as_interval, significant

    lines = [BEGIN, "<!-- generated by tools/integer_doc.py; do not edit by hand -->", "", *rows_table(results)]
    first = next(iter(results.values()))
    boot = first["settings"]["bootstrap"]
    decoded = [(r, r["integer"]) for p in results.values() for r in p["rows"] if r["integer"] and r["integer"]["wer"] is not None]
    met = sum(abs(i["delta_vs_fake"]) <= TARGET + 1e-9 for _, i in decoded)
    excludes = sum(bool(significant(as_interval(i["delta_vs_fake_ci"]))) for _, i in decoded)
    lines += ["", f"Within the issue's target (|integer - fake| <= {TARGET} WER): {met} of {len(decoded)} rows; "
              f"intervals of the difference that exclude 0: {excludes} of {len(decoded)}; the same transcript: "
              f"{sum(i['same_transcripts'] for _, i in decoded)} of {sum(r['utterances'] for r, _ in decoded)} "
              "decodes."]
    lines += ["", f"Shipped model, calibrated on {calibration_text(first['settings']['calib_batches'])}, "
              f"beam {first['settings']['beam']}; {', '.join(f'`{s}`: {SUBSETS[s]}' for s in results)}, "
              f"{first['rows'][0]['utterances']} utterances each. Interval: paired bootstrap over utterances "
              f"({boot['resamples']:,} resamples, seed {boot['seed']}). Decode times on the shared 2-core "
              "machine, one thread, other jobs running."]
    lines += layers_table(layers) if layers else []
    lines.append(END)
    return "\n".join(lines)


def stored_results(pattern: str, asked: list[str]) -> dict:
    """The results of every set with a stored JSON (``docs/`` + ``pattern`` of the set's name), in
    SUBSETS order: a run of one set (``--subsets test_heldout``, one process a core) rewrites the
    tables with the other set's stored rows, not without them. A set asked for must be there."""
    missing = [s for s in asked if not (REPO / "docs" / pattern.format(s)).exists()]
    if missing:
        raise SystemExit(f"integer_doc.py: no {', '.join('docs/' + pattern.format(s) for s in missing)}; decode "
                         f"the set first (leave out --from-json)")
    return {s: json.loads((REPO / "docs" / pattern.format(s)).read_text()) for s in SUBSETS
            if (REPO / "docs" / pattern.format(s)).exists()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", action="store_true", help="rewrite the table from docs/integer_<subset>.json")
    parser.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=list(SUBSETS))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--layers", metavar="RECIPE", help="only the per-layer agreement of RECIPE, as JSON to "
                                                           "--layers-json (the docs are left as they are)")
    parser.add_argument("--layers-json", type=Path, help="where --layers writes its JSON")
    parser.add_argument("--stream", action="store_true",
                        help=f"only {STREAM}: decode it (or, with --from-json, read docs/stream_integer_<subset>.json) "
                             "and write its table between the stream markers of docs/integer.md")
    args = parser.parse_args(argv)
    import torch

    from qswap.cli.quiet import held_back
    from qswap.io import atomic_write_text
    torch.set_num_threads(1)
    if args.layers:
        if args.layers_json is None:
            parser.error("--layers needs --layers-json")
        with held_back(verbose=False):
            rows = layer_agreement(args.layers)
        atomic_write_text(args.layers_json, json.dumps({"recipe": args.layers, "rows": rows}, indent=1) + "\n")
        print("\n".join(layers_table(rows, args.layers)))
        return 0
    if args.stream:
        for subset in args.subsets:
            if not args.from_json:
                atomic_write_text(REPO / "docs" / f"stream_integer_{subset}.json",
                                  json.dumps(run(subset, args.beam, [STREAM]), indent=1) + "\n")
        results = stored_results("stream_integer_{}.json", args.subsets)
        blocks = [(STREAM_BEGIN, STREAM_END, stream_table(results))]
        if STREAM_LAYERS.exists():
            blocks.append((STREAM_LAYERS_BEGIN, STREAM_LAYERS_END,
                           stream_layers_table(json.loads(STREAM_LAYERS.read_text()))))
        doc = DOC.read_text(encoding="utf-8")
        missing = [b for b, e, _ in blocks if not (b in doc and e in doc.split(b, 1)[1])]
        if missing:  # nothing written
            print(f"{DOC}: markers {', '.join(missing)} (each with its end after it) not found", file=sys.stderr)
            return 1
        for begin, end, block in blocks:
            head, rest = doc.split(begin, 1)
            doc = head + block + rest.split(end, 1)[1]
        atomic_write_text(DOC, doc)
        text = "\n\n".join(block for _, _, block in blocks)
        print(text)
        return 0
    for subset in args.subsets:
        if not args.from_json:
            atomic_write_text(REPO / "docs" / f"integer_{subset}.json", json.dumps(run(subset, args.beam), indent=1) + "\n")
    results = stored_results("integer_{}.json", args.subsets)
    if not args.from_json and "test" in args.subsets:
        with held_back(verbose=False):
            atomic_write_text(LAYERS, json.dumps(layer_agreement(), indent=1) + "\n")
    layers = json.loads(LAYERS.read_text()) if LAYERS.exists() else None
    doc = DOC.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        print(f"{DOC}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    atomic_write_text(DOC, head + table(results, layers) + rest.split(END, 1)[1])
    readme = README.read_text(encoding="utf-8")
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        atomic_write_text(README, head + "\n".join([BEGIN, *rows_table(results), END]) + rest.split(END, 1)[1])
    print(table(results, layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
