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
    assert (float_ok.match(module, op) == f"{key}: why") is hit
    assert float_ok.unused() == ([] if hit else [key])
