"""What a cache was computed from, and whether it is still that.

A stamp holds each source tensor itself and its storage (so while the stamp lives no other tensor
can take its object, its ``id`` or its storage address, even after ``.data = ...`` gave the tensor
a new storage and would otherwise free the old one) and a fingerprint of them: per tensor its
``id``, its version counter (every in-place write through the tensor: ``copy_``, ``resize_``,
``set_``, ``load_state_dict``, a torch optimizer step), its storage address (``.data = ...``,
``.to()``: a new storage) and its shape and strides (``.data = w.data[:4]`` or a ``view`` keeps
the storage). Checking a stamp is one comparison of two flat lists, the fingerprint made afresh: a
cache is checked on every call (a decoding step checks each quantizer's). Writes through ``.data``
(fairseq's optimizers) bump no version counter: caches are only read without autograd, and a
forward with autograd (a training step) drops them (``FakeQuantize``, ``derived_weight``,
``BiasQuantize``, ``quantized_pair``).
"""
from __future__ import annotations

import copy

import torch

Stamp = tuple  # (the source tensors, their fingerprint, their storages)


def fingerprint(*tensors: torch.Tensor) -> list:
    """[id, version, storage address, shape, strides] of each tensor, flat: equal while each is
    the same tensor, unwritten, on the same storage, seen through the same view of it."""
    if len(tensors) == 3:  # a quantizer's grid (frozen, scale, zero point), a weight and its grid: per call
        a, b, c = tensors
        return [id(a), a._version, a.data_ptr(), a.shape, a.stride(), id(b), b._version, b.data_ptr(), b.shape,
                b.stride(), id(c), c._version, c.data_ptr(), c.shape, c.stride()]
    out = []
    for t in tensors:  # a loop: about half the time of a comprehension of tuples
        out += (id(t), t._version, t.data_ptr(), t.shape, t.stride())
    return out


class _Held:
    """The storages a stamp keeps alive (a freed storage's address could be handed to the next
    allocation, the same tensor's new storage). A copy or a pickle of a stamp holds none: its
    fingerprint names the original tensors, which a copy's never match."""

    __slots__ = ("storages",)

    def __init__(self, storages: tuple = ()):
        self.storages = storages

    def __reduce__(self):
        return _Held, ()

    def __deepcopy__(self, memo):
        return _Held()


def stamp(*tensors: torch.Tensor) -> Stamp:
    """The stamp of ``tensors``: the fingerprint, and the tensors and their storages held."""
    return tensors, fingerprint(*tensors), _Held(tuple(t.untyped_storage() for t in tensors))


def unchanged(old: Stamp | None, *tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` are, one by one, the very tensors ``old`` stamped, unwritten since."""
    return old is not None and old[1] == fingerprint(*tensors)


class LeavesCaches:
    """A mixin for a module whose attributes named in ``_KEPT`` are caches (each with its stamp):
    a deep copy (the export copies models) or a pickle leaves them behind, as ``None``, and the
    copy rebuilds them on use (a stamp names the original's tensors, which a copy's never match)."""

    _KEPT: tuple = ()

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: None if k in self._KEPT else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def __getstate__(self):
        return {k: None if k in self._KEPT else v for k, v in self.__dict__.items()}
