"""Shared piece of the export tests: a converted and calibrated small s2t_transformer."""
from __future__ import annotations

import warnings

import qswap
from qswap.models import s2t_net_input


def calibrated(model, recipe="w8a8"):
    """``model`` converted with ``recipe`` and calibrated on three small padded batches."""
    qmodel = qswap.convert(model, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batches never take keep observing
        qswap.calibrate(qmodel, [s2t_net_input(2, 60, seed=s) for s in range(3)])
    return qmodel
