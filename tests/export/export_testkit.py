"""Shared pieces of the export tests: a converted and calibrated small s2t_transformer, and the
comparison of an integer model with its exported and loaded copy."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import qswap
from qswap.models import s2t_net_input


def calibrated(model, recipe="w8a8"):
    """``model`` converted with ``recipe`` and calibrated on three small padded batches."""
    batches = [s2t_net_input(2, 60, seed=s) for s in range(3)]
    qmodel = qswap.convert(model, recipe, data=batches)  # data: a recipe's transforms' statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batches never take keep observing
        qswap.calibrate(qmodel, batches)
    return qmodel


def same_tree(a: nn.Module, b: nn.Module) -> None:
    """Same classes at the same paths, every buffer equal in dtype, shape and value."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def same_description(a: nn.Module, b: nn.Module) -> None:
    """The same declared object tree, every declared value equal (constants outside the modules'
    buffers included: requantizations, grids, tables)."""
    from qswap.export.integer_format import describe
    (entry_a, tensors_a), (entry_b, tensors_b) = describe(a), describe(b)
    assert entry_a == entry_b and tensors_a.keys() == tensors_b.keys()
    for key, t in tensors_a.items():
        assert t.dtype == tensors_b[key].dtype and torch.equal(t, tensors_b[key]), key
