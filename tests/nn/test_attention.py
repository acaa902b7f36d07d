"""qswap.nn.attention helpers: the key-padding fill's broadcast view against the tiled mask."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qswap.nn.attention import fill_padding, heads_padding


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
