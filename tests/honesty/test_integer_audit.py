"""The integer audit level (``qswap.audit(model, inputs, integer=True)``, i.e.
``qswap.honesty.integer.audit_integer``): on a real fairseq s2t_transformer and s2t_conformer
(rel_pos) every path fairseq's SequenceGenerator runs computes on integer dtypes outside the
declared float steps, and so does a wav2vec 2.0 CTC model's forward; a float op anywhere else is
a finding naming its path, module and op; models without an integer form raise IntegerizeError
naming their modules."""
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.errors import AuditError, IntegerizeError  # noqa: E402
from qswap.honesty.integer import audit_integer  # noqa: E402
from qswap.models import (build_s2t_conformer, build_s2t_transformer, build_wav2vec2_ctc,  # noqa: E402
                          s2t_net_input, wav2vec2_net_input)

PATHS = {"batch forward (teacher-forced)", "get_normalized_probs (batch)", "encoder forward",
         "incremental decoding (3 steps)", "get_normalized_probs (incremental)",
         "reorder_incremental_state (beam reorder)", "reorder_encoder_out"}


INTEGER_DTYPES = {"bool", "int8", "uint8", "int16", "int32", "int64"}


def calibrated(builder, make_input=s2t_net_input, **overrides):
    net_input = make_input()
    qmodel = qswap.convert(builder(seed=0, **overrides), "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batch never takes keep observing
        qswap.calibrate(qmodel, [net_input])
    return qmodel, net_input


@pytest.fixture(scope="module")
def s2t():
    return calibrated(build_s2t_transformer)


def test_every_path_of_the_integer_s2t_model_is_integer(s2t):
    qmodel, net_input = s2t
    report = qswap.audit(qmodel, net_input, integer=True)
    assert report.integer_only and report.verdict == "integer-only" and report.recipe == "w8a8"
    assert {p.name for p in report.paths} == PATHS
    assert all(p.integer_ops > 0 for p in report.paths if not p.name.startswith("get_normalized_probs"))
    assert set(report.dtypes) <= {"bool", "int8", "uint8", "int16", "int32", "int64"}
    steps = {d.module: d for d in report.declared}
    assert set(steps) == {"encoder.input", "decoder.output", "get_normalized_probs"}
    assert steps["get_normalized_probs"].ops == ("_log_softmax",)


def float_detour(module, args, output):
    """The same codes, through float: what a float op hidden in an integer form looks like."""
    return (output.float() * 1.0).to(output.dtype)


def test_a_float_op_on_the_incremental_path_is_named_with_path_module_and_op(s2t):
    qmodel, net_input = s2t
    imodel = qswap.integerize(qmodel)
    imodel.decoder.layers[0].attns[0].core.register_forward_hook(
        lambda m, args, out: (float_detour(m, args, out[0]), out[1]))
    report = audit_integer(imodel, net_input)
    assert not report.integer_only
    found = {(f.path, f.module, f.op) for f in report.findings}
    assert ("incremental decoding (3 steps)", "decoder.layers.0.attns.0.core", "mul") in found
    assert ("batch forward (teacher-forced)", "decoder.layers.0.attns.0.core", "mul") in found
    assert "decoder.layers.0.attns.0.core" in report.to_markdown() and '"integer_only": false' in report.to_json()


def test_a_float_op_in_the_beam_reorder_is_a_finding(s2t):
    qmodel, net_input = s2t
    imodel = qswap.integerize(qmodel)
    attn = imodel.decoder.layers[0].attns[1]
    plain = attn.reorder_incremental_state

    def through_float(state, order):
        plain(state, order.float().long())
    attn.reorder_incremental_state = through_float
    report = audit_integer(imodel, net_input)
    assert {(f.path, f.op) for f in report.findings} == {("reorder_incremental_state (beam reorder)", "_to_copy")}
    assert report.findings[0].module == "decoder.reorder_incremental_state_scripting"


def test_a_float_encoder_output_reorder_is_a_finding(s2t):
    qmodel, net_input = s2t
    imodel = qswap.integerize(qmodel)
    plain = imodel.encoder.reorder_encoder_out
    imodel.encoder.reorder_encoder_out = lambda out, order: plain(out, (order * 1.0).long())
    report = audit_integer(imodel, net_input)
    assert {f.path for f in report.findings} == {"reorder_encoder_out"}


def test_every_path_of_the_integer_rel_pos_conformer_is_integer():
    qmodel, net_input = calibrated(build_s2t_conformer)  # ESPnet rel_pos attention
    report = qswap.audit(qmodel, net_input, integer=True)
    assert report.integer_only, [(f.path, f.module, f.op) for f in report.findings[:5]]
    assert {p.name for p in report.paths} == PATHS and set(report.dtypes) <= INTEGER_DTYPES
    assert {d.module for d in report.declared} == {"encoder.input", "decoder.output", "get_normalized_probs"}


@pytest.fixture(scope="module")
def wav2vec2():
    return calibrated(build_wav2vec2_ctc, wav2vec2_net_input)


def test_a_wav2vec2_ctc_integer_model_is_integer_only(wav2vec2):
    """The waveform in (``input``: a QuantizeStep) and the logits out (``output``: a
    DequantizeStep) are its only float steps; feature extractor, encoder and CTC projection run
    on integers, the padding mask included."""
    qmodel, net_input = wav2vec2
    report = qswap.audit(qmodel, net_input, integer=True)
    assert report.integer_only and [p.name for p in report.paths] == ["forward"]
    assert set(report.dtypes) <= INTEGER_DTYPES
    steps = {d.module: d.step for d in report.declared}
    assert steps == {"input": "quantize the input", "output": "output codes to float scores"}


def test_a_float_op_inside_the_wav2vec2_encoder_is_named(wav2vec2):
    qmodel, net_input = wav2vec2
    imodel = qswap.integerize(qmodel)
    imodel.w2v_model.encoder.layers[0].register_forward_hook(float_detour)
    report = audit_integer(imodel, net_input)
    assert not report.integer_only
    assert ("forward", "w2v_model.encoder.layers.0", "mul") in {(f.path, f.module, f.op) for f in report.findings}


def test_models_without_an_integer_form_raise_naming_modules():
    qmodel, net_input = calibrated(build_s2t_conformer, conv_version="convtransformer")  # a Conv2d subsampler
    with pytest.raises(IntegerizeError, match=r"subsample \(Conv2dSubsampler\): no integer form yet"):
        qswap.audit(qmodel, net_input, integer=True)


def test_an_integer_chain_is_audited_on_its_forward():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    q = qswap.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), "w8a8")
    qswap.calibrate(q, [x])
    report = qswap.audit(q, x, integer=True)
    assert report.integer_only and [p.name for p in report.paths] == ["forward"]
    assert {d.module for d in report.declared} == {"input", "output"}


def test_honesty_options_do_not_apply_to_the_integer_level(s2t):
    qmodel, net_input = s2t
    with pytest.raises(AuditError, match="apply to the honesty audit"):
        qswap.audit(qmodel, net_input, integer=True, values=True)


def test_inputs_the_model_cannot_run_are_an_audit_error_as_at_the_honesty_level(s2t):
    """Missing net_input keys, other feature dimensions, a list: the model's own TypeError or
    RuntimeError reached the caller raw at the integer level."""
    qmodel, net_input = s2t
    for bad in ({"src_tokens": net_input["src_tokens"]}, s2t_net_input(feat=40), [net_input]):
        with pytest.raises(AuditError, match="the integer model failed with these inputs: (TypeError|RuntimeError)"):
            qswap.audit(qmodel, bad, integer=True)


class _ComplexMiddle(nn.Module):
    """An integer model (``forward_codes``) whose middle is float arithmetic carried in complex64:
    int8 codes in, a softmax in complex numbers, int32 codes out."""

    def forward_codes(self, codes):
        return self(codes)

    def forward(self, codes):
        e = (codes.to(torch.complex64) / 16).exp()
        return ((e / e.sum(-1, keepdim=True)) * 127).to(torch.int32)


def test_complex_arithmetic_is_float_arithmetic_to_the_integer_audit():
    report = qswap.audit(_ComplexMiddle(), torch.randint(-128, 127, (2, 8), dtype=torch.int8), integer=True)
    assert not report.integer_only
    assert {f.op for f in report.findings} >= {"exp", "sum", "div"}
