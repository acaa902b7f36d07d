"""Integer execution of per-group Linear weights (issue 19 item 1: tools/strategies.py's per_group
method, 4-bit weights in groups of 16 input channels) on a real fairseq s2t_transformer: the
integer model runs on integer dtypes only, the fake-quant model with ``simulate: integer`` computes
its logits codes, and with ``simulate: float`` (the exact group scales) it stays close."""
import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from fairseq_testkit import assert_logits_codes_are_the_integer_models, build, convert_calibrated  # noqa: E402
from qswap.honesty.integer import check_integer  # noqa: E402
from qswap.nn.simulate import simulating  # noqa: E402

PER_GROUP = {"version": 1, "name": "w4a8_per_group",
             "defaults": {"weight": {"bits": 4, "symmetric": True, "granularity": "per_channel", "axis": 0},
                          "activation": {"bits": 8, "symmetric": False}},
             "rules": [{"match": {"class": ["LayerNorm"]},
                        "weight": {"bits": 8, "granularity": "per_tensor", "axis": None}},
                       {"match": {"class": "Linear"},
                        "weight": {"bits": 4, "symmetric": True, "granularity": "per_group", "axis": -1,
                                   "group_size": 16}}]}


@pytest.fixture(scope="module")
def per_group():
    model, net_input = build("s2t_transformer")
    qmodel = convert_calibrated(model, net_input, qswap.load_recipe(PER_GROUP))
    return qmodel, qswap.integerize(qmodel), net_input


def test_the_linears_are_per_group_and_their_integer_weights_int16(per_group):
    """The recipe's ``class: Linear`` rule reaches every FFN linear (fc1, fc2 of each layer; the
    attention's projections and the output projection are converted by other rules: per channel),
    and each per-group one's integer weight is int16 (codes times multipliers)."""
    qmodel, imodel, _ = per_group
    grouped = [m for m in qmodel.modules() if type(m).__name__ == "QLinear"
               and m.weight_quant.spec.granularity == "per_group"]
    assert len(grouped) == 8  # 2 encoder and 2 decoder layers
    forms = [m for m in imodel.modules() if type(m).__name__ == "IntegerLinear"]
    assert sum(f.weight.dtype == torch.int16 for f in forms) == len(grouped)


def test_the_integer_model_runs_on_integers_only(per_group):
    _, imodel, net_input = per_group
    report = check_integer(imodel, net_input)
    assert report.ok, [str(r) for r in report.findings[:5]]


def test_simulated_logits_codes_are_the_integer_models(per_group):
    """``simulate: integer`` (the default): teacher-forced and step by step, every logits code
    of the fake-quant model is the integer model's."""
    qmodel, imodel, net_input = per_group
    assert_logits_codes_are_the_integer_models(qmodel, imodel, net_input)


def test_the_float_simulation_is_close(per_group):
    """With ``simulate: float`` the fake-quant model uses the exact group scales (the integer
    form rounds each to a multiple of its row's largest, ``group_weight_codes``): most argmaxes
    agree and the logits stay within a few steps of their grid."""
    qmodel, imodel, net_input = per_group
    with torch.no_grad(), simulating(qmodel, "float"):
        reference = qmodel(**net_input)[0]
    logits = imodel(**net_input)[0]
    assert float((logits.argmax(-1) == reference.argmax(-1)).double().mean()) > 0.9
    assert float((logits - reference).abs().max()) <= 8 * float(qmodel.logits_quant.scale)
