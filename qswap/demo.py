"""The demo behind ``make demo``: convert a real fairseq speech model with qswap and show what
happened to every module. Run as ``python -m qswap.demo``."""
from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    import qswap
    from qswap.cli.render import console, convert_summary, convert_table
    from qswap.models import build_s2t_transformer, s2t_net_input

    out = console()
    out.rule("qswap demo: a fairseq s2t_transformer (fairseq's own classes, random weights)")
    model = build_s2t_transformer()
    net_input = s2t_net_input()
    start = time.perf_counter()
    qmodel = qswap.convert(model, "w8a8")
    out.print(f"converted with recipe w8a8 in {time.perf_counter() - start:.3f} s")
    qswap.calibrate(qmodel, [net_input])
    with torch.no_grad():
        ref, got = model(**net_input)[0], qmodel(**net_input)[0]
    noise = (ref - got).pow(2).mean()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / noise.clamp_min(1e-30))
    out.print(convert_table(qmodel.qswap_report))
    out.print(convert_summary(qmodel.qswap_report))
    out.print(f"decoder output SQNR vs float: {float(sqnr):.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
