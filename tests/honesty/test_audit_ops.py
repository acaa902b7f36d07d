"""The op classification table (qswap.honesty.ops) and the fail-loudly rule for unknown ops."""
import pytest
import torch
from torch import nn

import qswap
from qswap.honesty import ops


def test_every_rule_names_a_known_class():
    assert {rule.cls for rule in ops.OPS.values()} <= set(ops.CLASSES)
    counts = ops.class_counts()
    assert sum(counts.values()) == len(ops.OPS)
    assert all(counts[c] > 0 for c in ops.CLASSES)


@pytest.mark.parametrize("name, cls", [
    ("addmm", ops.COMPUTE), ("convolution", ops.COMPUTE), ("_softmax", ops.COMPUTE),
    ("native_layer_norm", ops.COMPUTE), ("exp", ops.COMPUTE), ("glu", ops.COMPUTE),
    ("relu", ops.GRID), ("max_pool2d_with_indices", ops.GRID), ("amax", ops.GRID),
    ("view", ops.MOVEMENT), ("cat", ops.MOVEMENT), ("masked_fill", ops.MOVEMENT),
    ("index_select", ops.MOVEMENT), ("constant_pad_nd", ops.MOVEMENT), ("embedding", ops.MOVEMENT),
    ("_scaled_dot_product_flash_attention_for_cpu", ops.FUSED), ("_native_multi_head_attention", ops.FUSED),
    ("eq", ops.PREDICATE), ("argmax", ops.PREDICATE), ("zeros", ops.FACTORY), ("arange", ops.FACTORY),
    ("_local_scalar_dense", ops.META),
])
def test_classification_of_common_ops(name, cls):
    assert ops.OPS[name].cls == cls


def test_inplace_variants_share_the_rule_of_their_op():
    assert ops.op_name(torch.ops.aten.add_.Tensor) == "add"
    assert ops.lookup(torch.ops.aten.masked_fill_.Scalar) == ops.OPS["masked_fill"]
    assert ops.is_inplace(torch.ops.aten.mul_.Tensor) and not ops.is_inplace(torch.ops.aten.mul.Tensor)


def test_aliases_for_float_ok_keys():
    assert {"_softmax", "softmax", "aten._softmax"} <= ops.aliases("aten._softmax")
    assert "norm" not in ops.aliases("aten.native_layer_norm")  # a family is keyed "family:norm"
    assert ops.family("aten.native_layer_norm") == "norm" and ops.family("qswap_x.op") is None


@torch.library.custom_op("qswap_audit_test::mystery_scale", mutates_args=())
def _mystery_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


class _Mystery(nn.Module):
    def forward(self, x):
        return _mystery_scale(x)


def test_an_op_without_a_rule_is_a_finding_never_assumed_fine():
    model = nn.Sequential(nn.Linear(4, 4), _Mystery())
    qmodel = qswap.convert(model, "w8a8")
    x = torch.randn(2, 4)
    qswap.calibrate(qmodel, [(x,)])
    report = qswap.audit(qmodel, (x,))
    assert not report.honest
    found = [(v.module, v.op) for v in report.violations if v.kind == "unclassified_op"]
    assert found == [("1", "qswap_audit_test.mystery_scale")]
    assert report.totals["unclassified"] == 1
