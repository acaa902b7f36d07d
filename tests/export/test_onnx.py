"""ONNX QDQ export of a calibrated qswap s2t_transformer encoder: onnxruntime computes what the
fake-quant model computes (compared in grid steps of the decoder's input quantizer), on qswap's
own grids, with padded batches; bad inputs give typed errors."""
import numpy as np
import pytest
import torch

import qswap
from qswap.errors import ExportError
from qswap.models import build_s2t_transformer, s2t_net_input
from qswap.quant.primitives import quantize

pytest.importorskip("fairseq")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qswap.export import export_encoder, load_session  # noqa: E402

from export_testkit import calibrated, encoder_feeds, output_steps, padded_batch, quantizer_inputs  # noqa: E402


@pytest.fixture(scope="module")
def graph_path(qmodel, tmp_path_factory):
    return export_encoder(qmodel, tmp_path_factory.mktemp("onnx") / "encoder.onnx", s2t_net_input())


@pytest.mark.parametrize("batch,frames", [(3, 90), (1, 40), (4, 64)])
def test_onnxruntime_matches_fake_quant_in_grid_steps(qmodel, graph_path, batch, frames):
    session = load_session(graph_path)
    steps, padding, ref_padding = output_steps(qmodel, session, padded_batch(batch, frames, seed=batch))
    if batch > 1:
        assert torch.equal(padding, ref_padding[0])
    else:
        assert not padding.any() and ref_padding == []
    # onnxruntime's kernels accumulate in another order: a value at a rounding boundary takes the
    # neighbouring code (0.01% at the first conv) and the flip spreads through attention and
    # LayerNorm. Measured on this model: at most 3.6 steps, mean below 0.1 step.
    assert steps.max() <= 8.0
    assert steps.mean() < 0.25


def _quant_nodes(graph_path):
    model = onnx.load(str(graph_path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    values = {**inits, **consts}
    for n in model.graph.node:  # torch's exporter shares equal initializers through Identity nodes
        if n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
    return model, values


def test_graph_carries_qswaps_scales_and_integer_weights(qmodel, graph_path):
    model, values = _quant_nodes(graph_path)
    modules = dict(qmodel.encoder.named_modules())
    checked = 0
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict = {}
    for node in model.graph.node:
        readers.setdefault(node.input[0] if node.input else "", []).append(node)

    def dequantizer(codes):  # the DequantizeLinear of a quantizer's codes (a Gemm's: after a Flatten)
        for node in readers[codes]:
            if node.op_type == "DequantizeLinear":
                return node
            if node.op_type == "Flatten":
                return dequantizer(node.output[0])
        raise AssertionError(f"no DequantizeLinear reads {codes}")
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        site = ".".join(p for p in node.name.split("/")[1:-1])
        fq = modules[site]
        scale = np.float32(fq.scale)
        if values[node.input[1]] == 1:  # quantize_by_inverse: x * float32(1 / s), then unit scale
            mul = producer[node.input[0]]
            assert mul.op_type == "Mul" and values[mul.input[1]] == np.float32(1) / scale
            dq_scale = dequantizer(node.output[0]).input[1]  # its DequantizeLinear: the grid (or folded)
            assert values[dq_scale] == scale or "/scale_times_" in dq_scale
        elif node.input[1].endswith("/divisor"):  # a float32 a few ulps from s that rounds as 1 / s
            assert 0 < abs(int(values[node.input[1]].view(np.int32)) - int(scale.view(np.int32))) <= 4
        else:
            assert values[node.input[1]] == scale
        offset = 128 if fq.spec.signed else 0  # the same grid as uint8 codes
        assert int(values[node.input[2]]) == int(fq.zero_point) + offset
        assert values[node.input[2]].dtype == np.uint8
        checked += 1
    assert checked >= 30  # every activation quantizer on the encoder's path
    int8 = [v for v in values.values() if v.dtype == np.int8 and v.ndim == 2]
    fc1 = qmodel.encoder.transformer_layers[0].fc1
    codes = quantize(fc1.weight, fc1.weight_quant.scale, fc1.weight_quant.zero_point, fc1.weight_quant.spec)
    assert any(v.shape == tuple(codes.shape) and np.array_equal(v, codes.numpy()) for v in int8)
    assert not any(v.dtype == np.float32 and v.shape == tuple(fc1.weight.shape) for v in values.values())


def test_no_quantizer_sees_infinity_with_padding(qmodel, graph_path):
    """The padding mask enters as booleans: every QuantizeLinear input is finite on a padded
    batch (fairseq's -inf fill happens after the softmax input quantizer)."""
    values, input_types = quantizer_inputs(graph_path, encoder_feeds(padded_batch(3, 80, seed=7)))
    assert values and all(np.isfinite(v).all() for v in values)
    assert input_types == [1, 7]  # float, int64


def test_caller_model_untouched(qmodel, tmp_path):
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    classes = [type(m) for m in qmodel.modules()]
    export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert [type(m) for m in qmodel.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())


def test_four_bit_weights_export_as_int4_codes(tmp_path):
    qmodel = calibrated(build_s2t_transformer(), "w4a8")
    path = export_encoder(qmodel, tmp_path / "w4a8.onnx", s2t_net_input())
    _, values = _quant_nodes(path)
    weights = [v for v in values.values() if v.dtype.name == "int4" and v.ndim == 2]  # test_compact.py: packing
    assert weights and not [v for v in values.values() if v.dtype == np.int8 and v.ndim == 2]
    steps, _, _ = output_steps(qmodel, load_session(path), padded_batch(2, 60, seed=3))
    assert steps.max() <= 8.0


def test_uncalibrated_model_is_a_typed_error(tmp_path):
    qmodel = qswap.convert(build_s2t_transformer(), "w8a8")
    with pytest.raises(ExportError, match="not calibrated"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert not (tmp_path / "e.onnx").exists()


def test_float_model_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match="no qswap activation quantizers"):
        export_encoder(build_s2t_transformer(), tmp_path / "e.onnx", s2t_net_input())


def test_grid_onnx_cannot_express_names_the_site(tmp_path):
    recipe = {"version": 1, "name": "w8a16",
              "defaults": {"weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
                           "activation": {"bits": 16, "symmetric": False, "observer": "minmax"}}}
    qmodel = calibrated(build_s2t_transformer(), qswap.load_recipe(recipe))
    with pytest.raises(ExportError, match=r"encoder\.subsample\.conv_layers\.0\.input_quant: .*16-bit.*uint8"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert not (tmp_path / "e.onnx").exists()


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    """A calibrated w4a4 s2t_transformer (every activation on a 4-bit grid) and its export."""
    from qswap.export.package import export_model

    qmodel = calibrated(build_s2t_transformer(), "w4a4")
    out = tmp_path_factory.mktemp("w4a4")
    export_model(qmodel, out)
    return qmodel, out


def test_four_bit_activations_agree_with_the_fake_quant_model_in_every_graph(w4a4):
    from qswap.export.agreement import agreement

    qmodel, out = w4a4
    net = padded_batch(2, 80, seed=5)
    found = agreement(qmodel, out, net, net["prev_output_tokens"])
    assert found["padding_mask_equal"]
    # measured on this model (asymmetric grids, mse ranges): below 2e-6 step (encoder), 0
    # (cross_kv, decoder_step). Symmetric min/max 4-bit grids put more values on exact rounding
    # ties, which onnxruntime's float ops (another summation order) can flip: a few steps there
    assert found["encoder"]["max"] <= 1.0 and found["cross_kv"]["max"] <= 1.0
    assert found["decoder_step"]["max"] <= 1.0


def test_four_bit_activation_codes_are_clipped_to_their_grid(w4a4):
    """Each QuantizeLinear's uint8 codes go through a Clip to the site's 16 codes before its
    DequantizeLinear, and the clipped codes are what the graph computes on a padded batch."""
    qmodel, out = w4a4
    model, values = _quant_nodes(out / "encoder.onnx")
    modules = dict(qmodel.encoder.named_modules())
    readers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    clips = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        fq = modules[".".join(p for p in node.name.split("/")[1:-1])]
        (clip,) = readers[node.output[0]]
        offset = 128 if fq.spec.signed else 0
        assert clip.op_type == "Clip" and values[clip.input[1]].dtype == np.uint8
        assert (int(values[clip.input[1]]), int(values[clip.input[2]])) == (fq.spec.qmin + offset, fq.spec.qmax + offset)
        clips += 1
    assert clips >= 30
    inputs = [n.output[0] for n in model.graph.node if n.op_type == "Clip"]
    for name in inputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in encoder_feeds(padded_batch(3, 80, seed=7)).items()}
    codes = session.run(inputs, feeds)
    assert all(np.unique(c).size <= 16 for c in codes) and max(np.unique(c).size for c in codes) > 8


def test_four_bit_activations_keep_onnxruntimes_integer_kernels(w4a4, graph_path):
    """The clipped codes are uint8, as 8-bit ones: onnxruntime fuses the same integer kernels
    around them as in the w8a8 graph, and the deploy audit counts no Clip as float."""
    from qswap.export.onnx_audit import audit_onnx

    four, eight = audit_onnx(w4a4[1] / "encoder.onnx", level="all"), audit_onnx(graph_path, level="all")
    # each Clip of codes counts as its quantizer's (the quantize bucket), whatever reads it
    assert "Clip" not in four.integer_ops and "Clip" not in four.float_ops
    assert four.buckets["quantize"] >= eight.buckets["quantize"] + 30 and four.buckets["index"] == eight.buckets["index"]
    for op in ("QGemm", "QLinearMatMul", "QLinearConv", "MatMulIntegerToFloat"):
        assert four.integer_ops.get(op, 0) == eight.integer_ops.get(op, 0) > 0, op


def test_other_encoders_are_a_typed_error(tmp_path):
    qmodel = calibrated(build_s2t_transformer())
    qmodel.encoder = build_s2t_transformer().encoder  # fairseq's own, not qswap's conversion
    with pytest.raises(ExportError, match="encoder is fairseq's float S2TTransformerEncoder, not qswap's conversion"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())


def test_a_recipe_that_converts_nothing_is_told_to_convert_and_calibrate(tmp_path):
    """fp32's conversion keeps fairseq's float modules: the whole export had said that exporting
    fairseq's S2TTransformerEncoder 'is not supported yet' while naming it as covered."""
    import qswap
    from qswap.export import export_model

    with pytest.raises(ExportError, match="recipe 'fp32' quantizes nothing: the model has no qswap activation "
                                          "quantizers; convert it with a recipe that quantizes activations"):
        export_model(qswap.convert(build_s2t_transformer(), "fp32"), tmp_path / "deploy", audit=False)
    assert not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("spinning", [False, True])
def test_sessions_spin_only_when_asked(graph_path, spinning):
    """A decode runs torch's beam search between the steps: by default the pool's threads yield."""
    session = load_session(graph_path, spinning=True) if spinning else load_session(graph_path)  # the default
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")


def test_missing_graph_file_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match="no ONNX graph there"):
        load_session(tmp_path / "absent.onnx")


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nonfinite_features_are_a_data_error_as_in_the_model_and_a_non_session_is_named(graph_path, bad):
    """The exported encoder, as the model it came from (``check_finite_input``): onnxruntime's
    QuantizeLinear turned a NaN into a finite code, and the graph gave finite output."""
    from qswap.errors import DataError
    from qswap.export import run_encoder

    net = s2t_net_input()
    net["src_tokens"][1, 5, 7] = bad
    with pytest.raises(DataError, match="the exported encoder's input holds NaN or \\+-inf"):
        run_encoder(load_session(graph_path), net["src_tokens"], net["src_lengths"])
    with pytest.raises(ExportError, match="expected an onnxruntime session .* got NoneType"):
        run_encoder(None, s2t_net_input()["src_tokens"], net["src_lengths"])


def test_truncated_graph_file_is_a_typed_error(graph_path, tmp_path):
    data = graph_path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="onnxruntime cannot load this graph"):
        load_session(truncated)


def test_a_recipe_without_activation_quantizers_is_a_typed_error_naming_what_to_do(tmp_path):
    """A calibrated conversion whose recipe quantizes weights alone: not 'convert it and
    calibrate it' (it is both), but a recipe that quantizes activations, or allow_float."""
    recipe = "w8_weight_only"
    qmodel = calibrated(build_s2t_transformer(), recipe)
    with pytest.raises(ExportError, match=rf"recipe '{recipe}' quantizes no activations: .*cannot be exported as "
                                          r"QDQ graphs of qswap's scales.*quantizes activations.*allow_float=True"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert not (tmp_path / "e.onnx").exists()
    export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input(), allow_float=True)  # its float-activation graph


def test_examples_opsets_and_levels_the_export_cannot_take_are_typed_errors(qmodel, tmp_path, graph_path):
    """No example, one missing src_lengths, another feature dimension (the model's own RuntimeError,
    and torch's tracer printing its graph), opsets out of range or not numbers, an unknown
    optimization level: raw TypeError, KeyError, RuntimeError before."""
    net = s2t_net_input()
    cases = [(None, 17, "example is a net_input dict .* got NoneType"),
             ({"src_tokens": net["src_tokens"]}, 17, r"got \['src_tokens'\]"),
             (s2t_net_input(feat=40), 17, r"does not run on the example inputs \(torch.float32\[2, 60, 40\]"),
             (net, 3, "opset is an ONNX opset version from 13 .* got 3"),
             (net, "x", "got 'x'")]
    for example, opset, message in cases:
        with pytest.raises(ExportError, match=message):
            export_encoder(qmodel, tmp_path / "e.onnx", example, opset=opset)
        assert not (tmp_path / "e.onnx").exists()
    with pytest.raises(ExportError, match="optimization level is one of"):
        load_session(graph_path, level="x")


def test_export_model_arguments_of_another_kind_are_typed_errors(qmodel, tmp_path):
    """``audit="no"`` had run the audit (a truthy string), a None directory had been a raw
    TypeError from pathlib."""
    from qswap.export import export_model

    for kwargs, message in (({"audit": "no"}, "audit takes True or False, got 'no'"),
                            ({"allow_float": 1}, "allow_float takes True or False, got 1"),
                            ({"task_cfg": 5}, "task_cfg is the fairseq task config .* got int")):
        with pytest.raises(ExportError, match=message):
            export_model(qmodel, tmp_path / "out", **kwargs)
    with pytest.raises(ExportError, match="directory is a path .* got NoneType"):
        export_model(qmodel, None)
    assert not (tmp_path / "out").exists()


def test_a_qswap_error_in_the_recording_forward_keeps_its_own_message(qmodel, tmp_path, monkeypatch):
    """The recording forward turns the model's own failures on the example (torch's RuntimeError,
    a ValueError) into 'does not run on the example inputs'; a qswap error raised there already
    says what to change (several are ValueErrors too: SpecError, IntegerizeError) and is raised
    as it is, not reworded as a bad example."""
    from qswap.errors import SpecError

    def refuses(*args, **kwargs):
        raise SpecError("a grid qswap refuses: change the recipe")

    monkeypatch.setattr(qmodel.encoder.transformer_layers[0], "forward", refuses)  # copied with the model
    with pytest.raises(SpecError, match="a grid qswap refuses: change the recipe"):
        export_encoder(qmodel, tmp_path / "e.onnx", s2t_net_input())
    assert not (tmp_path / "e.onnx").exists()
