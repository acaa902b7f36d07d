"""Build the large evaluation sets and ship them compactly in qswap/assets/s2t_demo/eval_large.

Synthesizes ``test_large`` (in-voice) and ``test_heldout_large`` (held-out voices) with
``tools/make_corpus.py --eval-large`` (deterministic for the seed; sentences outside the shipped
model's corpus), then packs their features with ``qswap.integration.compact``:

    .venv/bin/python tools/ship_eval_large.py --test 1000 --heldout 600 --seed 1   # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import make_corpus  # noqa: E402

from qswap.demo import EVAL_LARGE, LARGE_SUBSETS  # noqa: E402
from qswap.integration.compact import pack  # noqa: E402
from tools.tool_cli import positive_int  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", type=positive_int, default=1000, help="in-voice utterances (default: 1000)")
    p.add_argument("--heldout", type=positive_int, default=600, help="held-out-voice utterances (default: 600)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default: 1, the shipped model's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=EVAL_LARGE, help="where the compact sets go")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qswap_eval_large_") as tmp:
        make_corpus.main(["--out", tmp, "--eval-large", str(args.test), str(args.heldout),
                          "--seed", str(args.seed), "--jobs", str(args.jobs)])
        args.out.mkdir(parents=True, exist_ok=True)
        for split in LARGE_SUBSETS:
            print(f"packed {pack(tmp, split, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
