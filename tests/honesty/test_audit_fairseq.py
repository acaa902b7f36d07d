"""qswap.audit on real fairseq model classes (small dimensions): the float and weight-only
S2T transformers are dishonest and named op by op; w8a8 is honest on every path."""
import re

import pytest
import torch
from torch import nn

import qswap
from qswap.honesty.paths import run_paths
from qswap.calibrate import activation_quantizers
from qswap.models import build_s2t_transformer, s2t_net_input

pytest.importorskip("fairseq")

PATHS = ["batch forward (teacher-forced)", "get_normalized_probs (batch)", "incremental decoding (3 steps)"]


@pytest.fixture(scope="module")
def float_model():
    return build_s2t_transformer()


@pytest.fixture(scope="module")
def net_input():
    return s2t_net_input()


@pytest.fixture(scope="module")
def float_report(float_model, net_input):
    return qswap.audit(float_model, net_input)


def _quantized(model, recipe, net_input):
    qmodel = qswap.convert(model, recipe)
    if activation_quantizers(qmodel):
        qswap.calibrate(qmodel, [net_input], forward=run_paths)  # incremental-only sites too
    return qmodel


def _find(report, op, module=r".*", **fields):
    return [v for v in report.violations if v.op == op and re.fullmatch(module, v.module)
            and all(value in getattr(v, name) for name, value in fields.items())]


def test_float_s2t_transformer_is_dishonest_on_every_path(float_report):
    assert not float_report.honest and float_report.paths == PATHS
    assert all(p.violations > 0 and p.compute > 0 for p in float_report.coverage)


def test_float_names_the_attention_kernel_softmax_and_layer_norms(float_report):
    fused = _find(float_report, "aten._scaled_dot_product_flash_attention_for_cpu",
                  r"encoder\.transformer_layers\.\d+\.self_attn")
    assert fused and all(v.source.startswith("fairseq/modules/multihead_attention.py:") for v in fused)
    assert any(v.kind == "fused_kernel" for v in fused)
    assert _find(float_report, "aten._softmax", r"decoder\.layers\.\d+\.(self|encoder)_attn")
    norms = _find(float_report, "aten.native_layer_norm", r".*layer_norm")
    assert {v.kind for v in norms} == {"float_operand", "raw_parameter"}


def test_float_names_residual_adds_positional_add_and_final_log_softmax(float_report):
    residual = _find(float_report, "aten.add", r"(encoder\.transformer_layers|decoder\.layers)\.\d+")
    assert residual and all("fairseq/modules/transformer_layer.py:" in v.source for v in residual)
    positions = _find(float_report, "aten.add_", "encoder", operand="embed_positions.weights")
    assert positions and positions[0].kind == "raw_parameter" and positions[0].code == "x += positions"
    final = _find(float_report, "aten._log_softmax", "decoder")
    assert {p for v in final for p in v.paths} == {PATHS[1], PATHS[2]}


def test_incremental_decoding_runs_code_the_batch_forward_does_not(float_report):
    incremental_only = [v for v in float_report.violations if v.paths == [PATHS[2]]]
    # fairseq's attention takes its unfused path when an incremental_state is given
    assert _find(float_report, "aten.bmm", r"decoder\.layers\.\d+\.self_attn") and incremental_only


def test_w8_weight_only_is_dishonest(float_model, net_input):
    report = qswap.audit(_quantized(float_model, "w8_weight_only", net_input), net_input)
    assert not report.honest and report.recipe == "w8_weight_only"
    ops = {v.op for v in report.violations}
    assert {"aten.native_layer_norm", "aten._softmax", "aten.addmm", "aten._log_softmax"} <= ops
    assert report.bits_histogram.get(8, 0) > 0  # the weights were quantized, the rest is float


@pytest.mark.parametrize("simulate", ["float", "integer"])
def test_w8a8_is_honest_on_the_batch_and_incremental_paths(float_model, net_input, simulate):
    """Honest with either simulation (qswap.nn.simulate). The operand widths are those of the
    quantizers that ran: the 32-bit bias quantizers' with the float insides; the integer insides
    add the int32 bias codes inside their exact GEMMs (integers no quantizer tags: qswap.honesty.gemm)."""
    from helpers import recipe_with
    report = qswap.audit(_quantized(float_model, recipe_with("w8a8", simulate), net_input), net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations][:10]
    assert report.paths == PATHS
    assert all(p.compute > 0 and p.violations == 0 for p in report.coverage)
    assert report.totals["float"] == report.totals["unclassified"] == 0
    assert report.totals["quantized"] > 200
    assert set(report.bits_histogram) == ({8, 32} if simulate == "float" else {8})


def test_a_site_left_float_by_the_recipe_is_named(float_model, net_input):
    recipe = {"version": 1, "name": "w8a8_float_softmax_in",
              "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False},
                           "sites": {"softmax_in": None}}}
    report = qswap.audit(_quantized(float_model, recipe, net_input), net_input)
    assert {v.op for v in report.violations} == {"aten._softmax"}
    assert all("accumulator" in v.operand for v in report.violations)


def test_a_ctc_model_audits_its_forward_and_output_normalization():
    from fairseq.models import FairseqEncoder, FairseqEncoderModel
    from qswap.models import make_dictionary

    class TinyCtcEncoder(FairseqEncoder):
        def __init__(self, dictionary):
            super().__init__(dictionary)
            self.proj = nn.Linear(80, len(dictionary))

        def forward(self, src_tokens, src_lengths):
            return {"encoder_out": self.proj(src_tokens).transpose(0, 1)}  # (T, B, V)

    model = FairseqEncoderModel(TinyCtcEncoder(make_dictionary(8))).eval()
    net_input = {"src_tokens": torch.randn(2, 12, 80), "src_lengths": torch.tensor([12, 9])}
    report = qswap.audit(_quantized(model, "w8a8", net_input), net_input)
    assert report.paths == ["encoder forward", "output normalization (get_normalized_probs)"]
    assert _find(report, "aten._log_softmax", "") and report.coverage[0].violations == 0


@pytest.mark.parametrize("builder, make_input, paths", [
    ("build_s2t_conformer", "s2t_net_input", PATHS),
    ("build_wav2vec2_ctc", "wav2vec2_net_input",
     ["encoder forward", "output normalization (get_normalized_probs)"]),
])
def test_conformer_and_wav2vec2_ctc_w8a8_are_honest_and_weight_only_is_not(builder, make_input, paths):
    import qswap.models as models

    model, net_input = getattr(models, builder)(), getattr(models, make_input)()
    report = qswap.audit(_quantized(model, "w8a8", net_input), net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations][:10]
    assert report.paths == paths and all(p.compute > 0 for p in report.coverage)
    assert not qswap.audit(_quantized(model, "w8_weight_only", net_input), net_input).honest


def test_calibration_runs_the_incremental_decoding_path_of_a_seq2seq_model():
    """A batch-only calibration would leave quantizers that only incremental decoding reaches
    observing at inference; qswap.calibrate runs the paths inference runs."""
    qmodel = qswap.convert(build_s2t_transformer(seed=0), "w8a8")
    steps = []
    hook = qmodel.decoder.register_forward_pre_hook(
        lambda m, args, kwargs: steps.append(kwargs.get("incremental_state") is not None), with_kwargs=True)
    try:
        qswap.calibrate(qmodel, [s2t_net_input()])
    finally:
        hook.remove()
    assert True in steps and False in steps
    net_input = s2t_net_input()
    report = qswap.audit(qmodel, net_input)
    assert report.honest_strict and report.dynamic == []


def test_after_calibration_no_quantizer_observes_during_beam_search():
    """The quantizers calibration leaves unseen (an attention core's score and additive-bias
    quantizers: fairseq's masks here are 0/-inf, taken as bool masks) never run when fairseq's
    SequenceGenerator decodes with beam 5: no quantizer computes its range at run time."""
    from fairseq.sequence_generator import SequenceGenerator

    model = build_s2t_transformer(seed=0)
    qmodel = _quantized(model, "w8a8", s2t_net_input())
    unseen = [q for q in activation_quantizers(qmodel) if not q.initialized]
    assert unseen and all(name.rsplit(".", 1)[-1] in ("scores_quant", "attn_bias_quant")
                          for name, q in qmodel.named_modules() if q in unseen)
    ran = []
    handles = [q.register_forward_pre_hook(lambda m, args: ran.append(m)) for q in unseen]
    try:
        sample = {"net_input": {k: v for k, v in s2t_net_input().items() if k != "prev_output_tokens"}}
        generator = SequenceGenerator([qmodel], model.decoder.dictionary, beam_size=5, max_len_b=6)
        hypos = generator.generate([qmodel], sample)
    finally:
        for h in handles:
            h.remove()
    assert ran == [] and all(len(h) == 5 for h in hypos)
    assert all(not q.initialized for q in unseen)


@pytest.mark.parametrize("arch", ["s2t_transformer", "s2t_conformer", "wav2vec2_ctc"])
def test_simulate_integer_is_honest_with_its_gemms_proven_exact_integer_gemms(arch):
    """``simulate: integer`` runs the integer model's GEMMs on float kernels holding the codes
    (qswap.nn.simulate): the audit proves each exact (qswap.honesty.gemm) and counts it as an
    integer GEMM; with ``simulate: float`` there are none."""
    from helpers import recipe_with
    from qswap.models import build_s2t_conformer, build_wav2vec2_ctc, wav2vec2_net_input
    from qswap.nn.simulate import simulating
    build, make_input = {"s2t_transformer": (build_s2t_transformer, s2t_net_input),
                         "s2t_conformer": (build_s2t_conformer, s2t_net_input),
                         "wav2vec2_ctc": (build_wav2vec2_ctc, wav2vec2_net_input)}[arch]
    net_input = make_input()
    qmodel = _quantized(build(), recipe_with("w8a8", "integer"), net_input)
    report = qswap.audit(qmodel, net_input)
    assert report.honest, [(v.module, v.op, v.operand) for v in report.violations[:5]]
    assert report.totals["float"] == 0 and report.totals["integer_gemm"] > 0
    ops = {r.op for r in report.integer_gemm}
    assert {"aten.addmm", "aten.bmm"} <= ops, ops  # linears, the attention's matmuls
    # the S2T subsampler's convs, the conformer's convolution module, wav2vec 2.0's feature
    # extractor and positional conv (each told its reader: qswap.nn.fairseq.chain.run_chain)
    assert "aten.convolution" in ops, ops
    with simulating(qmodel, "float"):
        assert qswap.audit(qmodel, net_input).totals["integer_gemm"] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_features_holding_nan_or_inf_are_an_audit_error_not_findings(float_model, net_input, value):
    """One bad feature value had the honest model reported dishonest, its first quantizer's output
    off the grid; the features are what to check."""
    from qswap import AuditError

    qmodel = qswap.convert(float_model, "w8a8")
    qswap.calibrate(qmodel, [net_input])
    assert qswap.audit(qmodel, net_input).honest
    bad = dict(net_input, src_tokens=net_input["src_tokens"].clone())
    bad["src_tokens"][0, 3, 5] = value
    with pytest.raises(AuditError, match="input 'src_tokens' holds (NaN|inf) values"):
        qswap.audit(qmodel, bad)


def test_a_one_token_target_still_audits_a_beam_reorder(monkeypatch):
    """decode_steps is clipped to the target's length; with one step the reorder (which the generator
    runs before the second step) had never run, so a float op in it went unseen."""
    net_input = s2t_net_input(num_tokens=1)
    qmodel = _quantized(build_s2t_transformer(), "w8a8", net_input)
    calls = []
    decoder = type(qmodel.decoder)
    original = decoder.reorder_incremental_state_scripting
    monkeypatch.setattr(decoder, "reorder_incremental_state_scripting",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    report = qswap.audit(qmodel, net_input, decode_steps=3)
    assert calls and report.paths[-1] == "incremental decoding (1 step)"
    assert report.honest
