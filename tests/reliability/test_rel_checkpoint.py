"""qswap checkpoints: written from what the CLI has at hand, re-saved without drift."""
from __future__ import annotations

import torch

import qswap
from qswap.io import load_fairseq_model, save_qswap_checkpoint


def test_save_with_the_source_checkpoint_path(shared, tmp_path):
    model, _cfg, _task = load_fairseq_model(shared.checkpoint("legacy_args"))
    qmodel = qswap.convert(model, "w8_weight_only")
    out = save_qswap_checkpoint(tmp_path / "q.pt", qmodel, shared.checkpoint("legacy_args"))
    again, _cfg, _task = load_fairseq_model(out)
    assert again.qswap_recipe.name == "w8_weight_only"
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in again.state_dict().items())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_resaving_a_loaded_qswap_checkpoint_reproduces_its_content(shared, tmp_path):
    """The same content; the bytes may differ where pickle memoizes shared string objects."""
    source = shared.qswap_checkpoint()
    model, _cfg, _task = load_fairseq_model(source)
    out = save_qswap_checkpoint(tmp_path / "again.pt", model, source)
    assert _same(torch.load(out, weights_only=True), torch.load(source, weights_only=True))
