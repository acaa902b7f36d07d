"""What a cache was computed from, and whether it is still that.

A stamp holds each source tensor itself (so while the stamp lives no other tensor can take its
object or its storage address), its version counter (every in-place write through the tensor:
``copy_``, ``load_state_dict``, a torch optimizer step), its storage address (``.data = ...``,
``.to()``) and its shape. Writes through ``.data`` (fairseq's optimizers) bump no version
counter: caches are only read without autograd, and a forward with autograd (a training step)
drops them (``FakeQuantize``, ``derived_weight``, ``BiasQuantize``).
"""
from __future__ import annotations

import torch

Stamp = tuple


def stamp(*tensors: torch.Tensor) -> Stamp:
    return tuple((t, t._version, t.data_ptr(), t.shape) for t in tensors)


def unchanged(old: Stamp | None, *tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` are, one by one, the very tensors ``old`` stamped, unwritten since."""
    if old is None or len(old) != len(tensors):
        return False
    for (src, version, ptr, shape), t in zip(old, tensors):  # a loop, not all(generator): per call
        if src is not t or version != t._version or ptr != t.data_ptr() or shape != t.shape:
            return False
    return True
