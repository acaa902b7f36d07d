#!/usr/bin/env python3
"""Time the fake-quant forward with the integer insides (``simulate: integer``) against the float
ones (``simulate: float``, the default) and the float model:
teacher-forced batch forward of tools/bench.py's inputs, median of interleaved repeats, one
thread.

    python tools/simulate_speed.py --model shipped --recipe w8a8 --repeats 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("s", "shipped"), default="shipped")
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    from qswap.nn.simulate import simulating
    with bench.one_thread():
        sizes = bench.Sizes.of(quick=False, repeats=args.repeats)
        b = bench.make_bench(args.model, sizes)
        qmodel = bench.converted(b, args.recipe)

        def integer_insides():
            with simulating(qmodel, "integer"):
                return qmodel(**b.net_input)
        t = bench.interleaved_medians({
            "float model": bench.no_grad(lambda: b.model(**b.net_input)),
            "simulate: integer": bench.no_grad(integer_insides),
            "simulate: float": bench.no_grad(lambda: qmodel(**b.net_input)),
        }, args.repeats)
    print(f"{b.label}, {args.recipe}, batch {sizes.batch} x {b.frames} frames, median of {args.repeats}")
    for name, seconds in t.items():
        print(f"{name:>18}: {1000 * seconds:8.1f} ms ({seconds / t['float model']:.2f}x float)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
