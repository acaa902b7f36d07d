"""qswap.nn.attention helpers: the key-padding fill's broadcast view against the tiled mask, and the
additive form a traced (ONNX) graph adds instead."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qswap.nn.attention import fill_padding, heads_padding, padding_bias


def _tiled(fill, scores: Tensor, mask: Tensor, heads: int) -> Tensor:
    return fill(scores, heads_padding(mask, heads), float("-inf"))


@pytest.mark.parametrize("fill", [Tensor.masked_fill, Tensor.masked_fill_], ids=["copy", "in_place"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64])
def test_broadcast_fill_gives_the_tiled_masks_values(fill, dtype):
    torch.manual_seed(0)
    batch, heads, rows, src = 3, 4, 5, 7
    mask = torch.rand(batch, src) < 0.4
    mask[:, 0] = False  # every sentence keeps a key
    scores = torch.randn(batch * heads, rows, src)
    expected = _tiled(Tensor.masked_fill, scores.clone(), mask.to(dtype), heads)
    given = scores.clone()
    out = fill_padding(fill, given, mask.to(dtype), heads)
    assert out.shape == (batch * heads, rows, src)
    assert torch.equal(out, expected)
    assert torch.isneginf(out).sum() == heads * rows * int(mask.sum())
    if fill is Tensor.masked_fill_:  # written into the scores themselves, as the tiled fill does
        assert out.data_ptr() == given.data_ptr() and torch.equal(given, expected)
    else:  # the caller's scores untouched
        assert not torch.isneginf(given).any()


def test_a_strided_mask_and_non_contiguous_scores_give_the_tiled_masks_values():
    """A mask sliced out of a per-beam one (encoder-decoder attention's one row per sentence) is
    not contiguous; transposed scores take the tiled path."""
    torch.manual_seed(1)
    batch, beam, heads, rows, src = 2, 3, 2, 1, 6
    per_beam = torch.rand(batch * beam, src) < 0.5
    mask = per_beam.view(batch, beam, src)[:, 0, :]
    assert not mask.is_contiguous()
    scores = torch.randn(batch * heads, rows, src)
    assert torch.equal(fill_padding(Tensor.masked_fill, scores, mask, heads),
                       _tiled(Tensor.masked_fill, scores, mask, heads))
    transposed = torch.randn(batch * heads, src, src).transpose(1, 2)
    assert not transposed.is_contiguous()
    assert torch.equal(fill_padding(Tensor.masked_fill, transposed, mask, heads),
                       _tiled(Tensor.masked_fill, transposed, mask, heads))


def test_a_mask_whose_batch_does_not_match_the_scores_fails_as_the_tiled_fill_does():
    scores = torch.randn(6, 1, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)  # 4 sentences x 2 heads = 8 rows, not 6
    with pytest.raises(RuntimeError):
        _tiled(Tensor.masked_fill, scores, mask, 2)
    with pytest.raises(RuntimeError):
        fill_padding(Tensor.masked_fill, scores, mask, 2)


def test_the_additive_mask_gives_the_fills_values_and_the_same_softmax():
    """What an exported graph computes (``scores + padding_bias``, an ``Add``) against the fill:
    every finite score kept, every padded key at -inf; -0.0 becomes +0.0, which the softmax
    reads alike."""
    torch.manual_seed(2)
    batch, heads, rows, src = 3, 2, 4, 6
    mask = torch.rand(batch, src) < 0.4
    mask[:, 0] = False
    scores = torch.randn(batch * heads, rows, src)
    scores[0, 0, 0], scores[1, 1, 0] = -0.0, 0.0
    bias = padding_bias(mask, heads)
    assert bias.shape == (batch * heads, 1, src) and bias.dtype == torch.float32
    added, filled = scores + bias, _tiled(Tensor.masked_fill, scores, mask, heads)
    assert torch.equal(added, filled)  # -0.0 == +0.0
    assert torch.equal(torch.isneginf(added), torch.isneginf(filled))
    assert torch.equal(torch.softmax(added, -1), torch.softmax(filled, -1))
    half = scores.to(torch.float16)  # the bias takes the scores' dtype, as the fill keeps it
    assert torch.equal(half + padding_bias(mask, heads, half.dtype), _tiled(Tensor.masked_fill, half, mask, heads))
    assert (half + padding_bias(mask, heads, half.dtype)).dtype == torch.float16


def test_a_traced_fill_adds_the_mask_instead_of_a_where():
    """Traced for ONNX, the padding is an ``aten::add`` of ``padding_bias`` (onnxruntime runs an
    ``Add`` several times faster than a broadcast ``Where``), with the fill's values."""
    batch, heads, rows, src = 2, 2, 3, 5
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    scores = torch.randn(batch * heads, rows, src)

    def fill(s, m):
        return fill_padding(Tensor.masked_fill, s, m, heads)
    traced = torch.jit.trace(fill, (scores, mask))
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::add" in kinds and "aten::masked_fill" not in kinds
    other = torch.tensor([[False, True, True, True, True], [False] * 5])  # the mask is an input
    assert torch.equal(traced(scores, other), _tiled(Tensor.masked_fill, scores, other, heads))
