"""Turning fake-quant sites on and off for a measurement, and back again.

Sensitivity and search probe a converted model by letting some quantizers pass float values
through (``FakeQuantize.enabled = False``, which also marks the grid written so that no kept
integer form built with the site on is read with it off). ``enabled_only`` does that for one
``with`` block and restores every flag afterwards, also when the probe raises.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from qswap.quant.fake_quantize import FakeQuantize


@contextlib.contextmanager
def enabled_only(quantizers: Iterable[FakeQuantize], keep: Iterable[FakeQuantize] = ()) -> Iterator[None]:
    """Within the block, of ``quantizers`` only those in ``keep`` fake-quantize; the others are
    float. Each quantizer's previous ``enabled`` flag is restored on exit.

    >>> with enabled_only(all_sites, keep=[site]):   # this site alone quantized
    ...     sqnr = output_sqnr(reference, qmodel, batches)
    """
    quantizers = list(quantizers)
    keep_ids = {id(q) for q in keep}
    saved = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = id(q) in keep_ids
        yield
    finally:
        for q, flag in zip(quantizers, saved):
            q.enabled = flag
