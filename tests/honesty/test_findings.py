import pytest

from qswap.honesty.findings import FloatOk


@pytest.mark.parametrize("key, module, op, hit", [
    ("re:dec.*", "decoder.layers.0", "aten.add", True),
    ("re:dec.*", "encoder.layers.0", "aten.add", False),
    ("re:dec.*:softmax", "decoder.layers.0.self_attn", "aten._softmax", True),
    ("re:dec.*:softmax", "decoder.layers.0.self_attn", "aten.add", False),
    ("re:dec.*:*", "decoder", "aten.add", True),
    ("re:(?:en|de)coder", "decoder", "aten.add", True),  # a ':' inside the regex
    ("re:(?:en|de)coder", "decoder.fc1", "aten.add", False),
    ("decoder", "decoder.layers.0.fc1", "aten.mm", True),  # an exact path covers its submodules
    ("decoder", "decoder2", "aten.mm", False),
    ("decoder:add", "decoder.layers.0", "aten.add", True),
    ("decoder:add", "decoder.layers.0", "aten.mm", False),
    ("softmax", "anything", "aten._softmax", True),
])
def test_float_ok_keys(key, module, op, hit):
    float_ok = FloatOk({key: "why"})
    assert (float_ok.match(module, op, "float_operand") == f"{key}: why") is hit
    assert float_ok.unused() == ([] if hit else [key])


@pytest.mark.parametrize("key, module, op, kind, hit", [
    ("matmul", "fc", "aten.addmm", "float_operand", False),  # a family name is no op name
    ("family:matmul", "fc", "aten.addmm", "float_operand", True),
    ("family:matmul", "fc", "aten.bmm", "fused_kernel", True),
    ("fc:family:matmul", "fc.inner", "aten.bmm", "float_operand", True),
    ("fc:family:matmul", "dec", "aten.bmm", "float_operand", False),
    ("re:f.*:family:matmul", "fc", "aten.mm", "float_operand", True),
    ("family:norm", "ln", "aten.native_layer_norm", "float_operand", True),
    ("norm", "ln", "aten.native_layer_norm", "float_operand", False),
    ("norm", "ln", "aten.norm", "float_operand", True),  # aten.norm is an op of its own
    ("softmax", "att", "aten.logsumexp", "float_operand", False),
    ("softmax", "att", "aten._safe_softmax", "float_operand", False),
    ("family:softmax", "att", "aten._safe_softmax", "float_operand", True),
    ("family:softmax", "att", "aten._log_softmax", "float_operand", False),  # a family of its own
    ("aten.addmm", "fc", "aten.addmm", "float_operand", True),
    # an op or family key never declares a bypass, an unseen tensor, an off-grid quantizer or a
    # module that never ran: findings about the model's integrity, not about one op staying float
    ("aten.addmm", "fc", "aten.addmm", "raw_parameter", False),
    ("family:matmul", "fc", "aten.addmm", "raw_parameter", False),
    ("add", "", "aten.add", "unseen_origin", False),
    ("fc:addmm", "fc", "aten.addmm", "off_grid", False),
    ("re:f.*:addmm", "fc", "aten.addmm", "raw_parameter", False),
    ("fc", "fc", "aten.addmm", "raw_parameter", True),  # a module key declares the module whole
    ("fc:*", "fc", "aten.addmm", "raw_parameter", True),
    ("fc", "fc", "<not executed>", "not_executed", True),
])
def test_float_ok_op_and_family_keys(key, module, op, kind, hit):
    float_ok = FloatOk({key: "why"})
    assert (float_ok.match(module, op, kind) == f"{key}: why") is hit
