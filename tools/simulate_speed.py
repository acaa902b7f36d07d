#!/usr/bin/env python3
"""Time the fake-quant forward with the integer insides (``simulate: integer``, the default) against
the float ones (``simulate: float``, the fast option) and the float model:
teacher-forced batch forward of tools/bench.py's inputs, median of interleaved repeats, one
thread; with ``--decode``, fairseq's SequenceGenerator instead (tools/bench.py's decoding:
beam 5, exactly its number of steps).

    python tools/simulate_speed.py --model shipped --recipe w8a8 --repeats 10
    python tools/simulate_speed.py --model shipped --recipe w8a8 --repeats 10 --decode
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.tool_cli import positive_int  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("s", "shipped"), default="shipped")
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--decode", action="store_true", help="time beam-5 decoding, not the batch forward")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    from qswap.nn.simulate import simulating
    with bench.one_thread():
        sizes = bench.Sizes.of(quick=False, repeats=args.repeats)
        b = bench.make_bench(args.model, sizes)
        qmodel = bench.converted(b, args.recipe)

        run = decoder(b, sizes) if args.decode else (lambda model: model(**b.net_input))

        def simulated(mode):
            def go():
                with simulating(qmodel, mode):
                    return run(qmodel)
            return bench.no_grad(go)
        t = bench.interleaved_medians({
            "float model": bench.no_grad(lambda: run(b.model)),
            "simulate: integer": simulated("integer"),
            "simulate: float": simulated("float"),
        }, args.repeats)
    what = (f"beam-5 decoding of {sizes.decode_utts} x {b.frames} frames, {sizes.decode_steps} steps" if args.decode
            else f"batch {sizes.batch} x {b.frames} frames")
    print(f"{b.label}, {args.recipe}, {what}, median of {args.repeats}")
    for name, seconds in t.items():
        print(f"{name:>18}: {1000 * seconds:8.1f} ms ({seconds / t['float model']:.2f}x float)")
    return 0


def decoder(b, sizes):
    """``model`` -> fairseq's SequenceGenerator on ``b``'s decoding sample (as tools/bench.py)."""
    from fairseq.sequence_generator import SequenceGenerator

    steps = sizes.decode_steps
    generators: dict = {}  # id(model) -> its generator, built before the timed runs reach it twice

    def run(model):
        generator = generators.get(id(model))
        if generator is None:
            generator = generators[id(model)] = SequenceGenerator([model], b.tgt_dict, beam_size=5, max_len_a=0,
                                                                  max_len_b=steps, min_len=steps)
        return generator.generate(generator.model.models, b.decode_sample)
    return run


if __name__ == "__main__":
    sys.exit(main())
