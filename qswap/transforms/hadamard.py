"""Hadamard rotations (QuaRot / SpinQuant style), exact in float:

- ``heads``: per attention head, v_proj's output rows and out_proj's input columns by one
  orthonormal Hadamard matrix R (attention averages v over time, channel by channel, so
  out_proj(R^T R v) = out_proj(v)); q_proj's and k_proj's rows by one R per head (q.k = Rq.Rk).
  Folded into the weights offline: nothing runs at inference.
- ``ffn``: an online rotation before fc2 (the FFN's down projection; its input follows a ReLU, so
  no rotation folds into fc1): a ``Hadamard`` module (a Walsh-Hadamard transform in blocks of
  ``block`` channels, additions and subtractions of the codes of its quantized input) is inserted
  and fc2's weight becomes W R^T: fc2 becomes a ``RotatedLinear`` (the transform, then the linear). Its quantized counterpart (``qswap.nn.hadamard.QHadamard``)
  declares an input quantizer and one for its +-1 matrix, so the audit sees the op.

The residual stream is not rotated: LayerNorm's mean subtraction does not commute with a
rotation (QuaRot needs RMSNorm; SliceGPT's LayerNorm conversion is not built).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from qswap.errors import ConvertError
from qswap.transforms import NothingToTransform, transform
from qswap.transforms.layers import ffns, plain_attentions


def _sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    for i in range(q):
        for j in range(q):
            s[i + 1, j + 1] = chi[(j - i) % q]
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard_matrix(n: int) -> torch.Tensor:
    """A +-1 matrix H of order ``n`` with H H^T = n I (float64): Sylvester's 2^k, or its Kronecker
    product with a Paley matrix of order m (m - 1 a prime = 3 mod 4). ConvertError otherwise."""
    if n < 1:
        raise ConvertError(f"a Hadamard matrix has a positive order, got {n}")
    built = _construction(n)
    if built is None:
        raise ConvertError(f"no Hadamard matrix of order {n} is built here ({ORDERS}); choose a block size that "
                           f"divides the width and has one")
    j, m = built
    return _sylvester(j) if m == 1 else torch.kron(_sylvester(j), _paley(m - 1))


ORDERS = "orders 2^k and 2^k (p + 1), p a prime = 3 mod 4"  # what hadamard_matrix builds


def _construction(n: int) -> tuple[int, int] | None:
    """(j, m) with n = 2^j m of the matrix ``hadamard_matrix`` builds for order ``n`` (m = 1:
    Sylvester's; else Sylvester's times Paley's of order m), or None: none is built here."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for j in range(k, -1, -1):
        m = n // 2 ** j
        if m == 1 or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            return j, m
    return None


def orthonormal(n: int) -> torch.Tensor:
    return hadamard_matrix(n) / math.sqrt(n)


class Hadamard(nn.Module):
    """x (..., F) -> R x with R = blockdiag(H_b, ..., H_b) / sqrt(b), H_b a +-1 Hadamard matrix
    of order ``block``: an orthonormal rotation in blocks of ``block`` channels."""

    def __init__(self, features: int, block: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if block < 1 or features % block:
            raise ConvertError(f"Hadamard block {block} does not divide the width {features}")
        self.features, self.block = features, block
        # in the rotated layer's dtype: a float64 model's float32 matrix had failed at its first forward
        self.register_buffer("matrix", orthonormal(block).to(dtype))

    def rotation(self) -> torch.Tensor:
        """The (F, F) float64 rotation this module applies."""
        return torch.block_diag(*[orthonormal(self.block)] * (self.features // self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., F)
        y = nn.functional.linear(x.reshape(*shape[:-1], self.features // self.block, self.block), self.matrix)
        return y.reshape(shape)  # (..., F//b, b) -> (..., F)

    def extra_repr(self) -> str:
        return f"features={self.features}, block={self.block}"


def _rows(linear: nn.Linear, r: torch.Tensor) -> None:
    """linear's output rotated: W <- R W, b <- R b (float64, then back to the weight's dtype)."""
    w = linear.weight
    w.copy_((r @ w.double()).to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_((r @ linear.bias.double()).to(linear.bias.dtype))


def _cols(linear: nn.Linear, r: torch.Tensor) -> None:
    """linear reads a rotated input: W <- W R^T."""
    w = linear.weight
    w.copy_((w.double() @ r.T).to(w.dtype))


def rotate_heads(attn: nn.Module, qk: bool) -> None:
    head = attn.head_dim
    r = torch.block_diag(*[orthonormal(head)] * attn.num_heads)  # (E, E)
    _rows(attn.v_proj, r)
    _cols(attn.out_proj, r)
    if qk:
        _rows(attn.q_proj, r)
        _rows(attn.k_proj, r)
    # add_bias_kv: fairseq appends bias_k / bias_v (1, 1, E) to the projected k / v: rotated as they are
    for name in ("bias_v", "bias_k") if qk else ("bias_v",):
        b = getattr(attn, name, None)
        if b is not None:
            b.copy_((b.double() @ r.T).to(b.dtype))


class RotatedLinear(nn.Sequential):
    """An FFN's fc2 after the online rotation: ``linear(rotate(x))``, children ``rotate`` (a
    ``Hadamard``) and ``linear`` (fc2, its weight W R^T). A class of its own, so that its quantized
    counterpart (``qswap.nn.hadamard.QRotatedLinear``) is told the quantizer that reads its result,
    as a linear is."""


MAX_BLOCK = 2 ** 16  # wider than any layer's channels; a larger one had spent minutes in the prime tests


def _check(params) -> str | None:
    if params["block"] < 1:
        return f"block must be a positive number of channels (one that divides the FFN width), got {params['block']}"
    if params["block"] > MAX_BLOCK:
        return (f"block {params['block']} is more channels than any layer has (at most {MAX_BLOCK}); give a block "
                f"such as 64 that divides the FFN width")
    if params["ffn"] and _construction(params["block"]) is None:  # had loaded, to fail at convert
        return (f"block {params['block']} has no Hadamard matrix here ({ORDERS}); give a block such as 64 that "
                f"divides the FFN width, or ffn: false")
    return None


def rotate_ffn(layer_fc2: nn.Linear, block: int) -> RotatedLinear:
    rotate = Hadamard(layer_fc2.in_features, block, dtype=layer_fc2.weight.dtype)
    _cols(layer_fc2, rotate.rotation())
    return RotatedLinear(OrderedDict(rotate=rotate, linear=layer_fc2))


@transform("hadamard", check=_check)
def hadamard(model: nn.Module, data, *, heads: bool = True, qk: bool = True, ffn: bool = True,
             block: int = 64) -> list[str]:
    """Per-head rotations folded offline (``heads``; ``qk``: q and k too) and an online
    Walsh-Hadamard transform in blocks of ``block`` before every fc2 (``ffn``)."""
    notes = []
    found = [f for f in ffns(model) if isinstance(f.fc2, nn.Linear)] if ffn else []
    for f in found:  # before anything is rotated
        width = f.fc2.in_features
        if width % block:
            power = width & -width  # the largest power of two dividing the width
            advice = (f"block: {min(power, 64)}, a power of two that does" if power > 1 else
                      "no power of two does: ffn: false leaves the FFNs unrotated")
            raise ConvertError(f"transform hadamard: block {block} does not divide the FFN width {width} of "
                               f"{f.path}.fc2; give the recipe's hadamard transform a block that divides it ({advice})")
    attns = list(plain_attentions(model)) if heads else []
    for path, attn in attns:  # the block is the FFN's: a head size without a matrix is the heads' to switch off
        if _construction(attn.head_dim) is None:
            raise ConvertError(f"transform hadamard: the per-head rotation of {path} needs a Hadamard matrix of its "
                               f"head size {attn.head_dim}, and none is built here ({ORDERS}); give the recipe's "
                               f"hadamard transform heads: false (the FFN rotation, its block, stays)")
    if not attns and not found:  # before anything changes
        parts = ", ".join((["no attention with per-head projections to rotate"] if heads else
                           ["heads: false"]) + (["no FFN with a Linear fc2"] if ffn else ["ffn: false"]))
        raise NothingToTransform(parts)
    with torch.no_grad():
        if heads:
            for _, attn in attns:
                rotate_heads(attn, qk)
            notes.append(f"{len(attns)} attention(s): per-head Hadamard folded into "
                         f"{'q/k/' if qk else ''}v_proj and out_proj")
        if ffn:
            for f in found:
                model.get_submodule(f.path).fc2 = rotate_ffn(f.fc2, block)
            notes.append(f"{len(found)} FFN(s): online {block}-point Walsh-Hadamard before fc2, folded into fc2")
    return notes
