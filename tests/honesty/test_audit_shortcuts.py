"""The tracker's view shortcut (qswap.honesty.tracker ``_one_move``) changes its speed, never its
answer: with it off, the fairseq models get the same report, finding for finding (the
adversarial suite checks the same in tests/honesty/test_adversarial.py), and it takes exactly
the ops that move one tensor's data."""
import pytest
import torch

import qswap
from qswap.honesty import tracker as T
from qswap.honesty.paths import run_paths
from qswap.models import build_s2t_conformer, build_s2t_transformer, s2t_net_input
from helpers import reports_with_and_without_shortcuts

pytest.importorskip("fairseq")
aten = torch.ops.aten


@pytest.mark.parametrize("build", [build_s2t_transformer, build_s2t_conformer])
@pytest.mark.parametrize("recipe", ["fp32", "w8_weight_only", "w8a8"])
def test_fairseq_models_get_the_same_report_without_the_view_shortcut(monkeypatch, build, recipe):
    net_input = s2t_net_input()
    qmodel = qswap.convert(build(), recipe)
    if recipe == "w8a8":
        qswap.calibrate(qmodel, [net_input], forward=run_paths)
    fast, general = reports_with_and_without_shortcuts(monkeypatch, lambda: qswap.audit(qmodel, net_input))
    assert fast == general
    assert fast["honest"] == (recipe == "w8a8")


@pytest.mark.parametrize("func, moved", [
    (aten.view.default, True), (aten.transpose.int, True), (aten.t.default, True),
    (aten.expand.default, True), (aten.slice.Tensor, True), (aten.select.int, True),
    (aten.permute.default, True), (aten.detach.default, True),
    (aten._unsafe_view.default, False), (aten.clone.default, False), (aten.flip.default, False),
    # more than one tensor, numbers written, in place, a copy into a tensor, no tensor argument,
    # a view of the storage (as_strided: its footprint is checked against its input's)
    (aten.index_select.default, None), (aten.cat.default, None), (aten.embedding.default, None),
    (aten.masked_fill.Scalar, None), (aten.constant_pad_nd.default, None), (aten.transpose_.default, None),
    (aten.copy_.default, None), (aten.fill_.Scalar, None), (aten.as_strided.default, None), (aten.add.Tensor, None), (aten.exp.default, None),
])
def test_the_view_shortcut_takes_only_ops_that_move_one_tensor(func, moved):
    """``_one_move``: True for a view of its one tensor argument, False for a fresh tensor of
    its values, None for every op ``_movement`` (or another class's handler) must decide."""
    name = T.O.op_name(func)
    rule = T.O.lookup(func)
    refined = T.O.refines(func, name, rule)
    assert T._one_move(func, name, rule, refined) is moved
