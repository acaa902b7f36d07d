"""The demo behind ``make demo`` (``python -m qswap.demo``).

On the shipped model (``qswap/assets/s2t_demo``: a small s2t_transformer trained by
``tools/train_s2t.py`` on synthesized speech): evaluate float, then convert + calibrate + audit
+ evaluate every shipped recipe (and the model's searched mixed-precision recipe), audit and
evaluate the shipped QAT checkpoints as they are, print the
comparison table and write it to ``demo_out/demo.md`` under the working directory (or
``--markdown PATH``; the committed run, docs/demo.md, is ``--markdown docs/demo.md``, as ``make
docs`` runs it: the README's first command leaves the repository's files as they are). This is
``qswap compare`` with the shipped model's paths filled in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qswap.cli.args import POSITIVE

ASSET = Path(__file__).parent / "assets" / "s2t_demo"
OUT = "demo_out"  # the default output folder, under the working directory (made; git-ignored in the repository)
RECIPES = ["fp32", "w8a8", "w8a8_per_channel", "w4a8", "w4a8_edges8", "w4a4", "w4a4_edges8_stream_smoothquant",
           "w4a4_edges8_stream_embed_smoothquant", "w8_weight_only"]
# the mixed-precision recipe `qswap search` found for this model at w4a8_edges8's weight size
# (written by tools/sensitivity_doc.py; docs/sensitivity.md shows how)
SEARCHED = ASSET / "searched.yaml"
# the QAT checkpoints (tools/qat_train.py), each a row as it is: W4A4 with 8-bit edges (docs/qat.md), the
# same with the stream's entry per channel (docs/qat_w4a4_edges8_embed.md), that with every activation
# 4-bit, the edges keeping 8-bit weights only (issue 19's stretch setting: docs/qat_w4a4_edgew8_embed.md) and W4A8 (docs/qat_w4a8.md)
QAT = {"qat_w4a4_edges8": ASSET / "qat_w4a4_edges8.pt", "qat_w4a4_edges8_embed": ASSET / "qat_w4a4_edges8_embed.pt",
       "qat_w4a4_edgew8_embed": ASSET / "qat_w4a4_edgew8_embed.pt", "qat_w4a8": ASSET / "qat_w4a8.pt"}
# the large evaluation sets (1,000 in-voice, 600 held-out-voice utterances), stored compactly
# (qswap.integration.compact) and materialized as a fairseq data directory on first use
EVAL_LARGE = ASSET / "eval_large"
LARGE_SUBSETS = ("test_large", "test_heldout_large")


def calibration_text(calib_batches: int, subset: str = "train_calib", batch: int = 32) -> str:
    """What a page says of the shipped model's calibration: the utterances and batches it used.
    ``--calib-batches N`` asks for at most N batches of ``batch`` utterances; the shipped
    ``train_calib`` holds 32, so 4 asked for are one batch."""
    utterances = len((ASSET / f"{subset}.tsv").read_text(encoding="utf-8").splitlines()) - 1  # less the header
    used = min(calib_batches, -(-utterances // batch))
    return (f"`{subset}`: its {utterances} utterances, {used} batch{'' if used == 1 else 'es'} of at most {batch} "
            f"(`--calib-batches {calib_batches}`)")


def data_dir(subset: str) -> Path:
    """The shipped data directory that holds ``subset``: the asset itself for the 100-utterance
    sets, a cache directory (``$XDG_CACHE_HOME/qswap``, default ``~/.cache/qswap``) for the large
    ones."""
    if subset not in LARGE_SUBSETS:
        return ASSET
    import os

    from qswap.integration.compact import MODEL_FILES, materialize

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qswap" / "s2t_demo_eval"
    calib = ("train_calib.tsv", "fbank80_train_calib.zip")  # the demo calibrates on it
    return materialize(EVAL_LARGE, subset, ASSET, cache, copy=MODEL_FILES + calib)


def default_markdown(subset: str) -> str:
    """Where the demo writes the table of ``subset`` without ``--markdown``: under OUT in the
    working directory, not the repository's docs/ (the committed run)."""
    return f"{OUT}/demo.md" if subset == "test" else f"{OUT}/demo_{subset}.md"


def main(argv: list[str] | None = None) -> int:
    from qswap.cli import main as cli

    p = argparse.ArgumentParser(prog="python -m qswap.demo", description=__doc__.splitlines()[0])
    p.add_argument("--markdown", help=f"where to write the table, the JSON beside it (default: {OUT}/demo.md for "
                                      f"the test subset, {OUT}/demo_<subset>.md for the others; the folder is made)")
    p.add_argument("--subset", default="test", help="shipped subset to evaluate: test, test_heldout "
                                                    "(100 utterances each), test_large or test_heldout_large")
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size (default: 5)")
    p.add_argument("--verbose", action="store_true", help="show fairseq's and torch's log lines and warnings")
    args = p.parse_args(argv)
    if args.markdown is not None and (not args.markdown.strip() or args.markdown.endswith(".json")):
        # '' had fallen back to docs/demo.md; a .json path collided with the JSON written beside it
        p.error(f"--markdown {args.markdown!r}: pass a Markdown file path (the JSON goes beside it, "
                f"with the suffix .json)")
    markdown = args.markdown or default_markdown(args.subset)
    checkpoint = ASSET / "checkpoint.pt"
    if not checkpoint.exists():
        print(f"no shipped model at {checkpoint}; build it with tools/train_s2t.py", file=sys.stderr)
        return 2
    if args.markdown is None:  # minutes of decoding had ended in "no such directory" where docs/ was missing
        Path(markdown).parent.mkdir(exist_ok=True)
    return cli([*(["--verbose"] if args.verbose else []), "compare", str(checkpoint),
                "--data", str(data_dir(args.subset)), "--subset", args.subset, "--calib-subset", "train_calib", "--calib-batches", "1", "--beam", str(args.beam),
                "--recipes", *RECIPES, *([str(SEARCHED)] if SEARCHED.exists() else []),
                *[arg for name, path in QAT.items() if path.exists() for arg in ("--quantized", f"{name}={path}")],
                "--markdown", markdown, "--json", str(Path(markdown).with_suffix(".json"))])


if __name__ == "__main__":
    sys.exit(main())
