"""The decoder's step graph against fairseq's incremental decoder on the fake-quant model: the
same quantized logits (in grid steps) at every step, its caches fed back step after step."""
import numpy as np
import pytest
import torch

import qswap
from qswap.errors import ExportError
from qswap.models import build_s2t_transformer, s2t_net_input

from export_testkit import calibrated, exported_step

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from qswap.export.decoder_step import (CrossKVGraph, cache_values, empty_cache, export_cross_kv,  # noqa: E402
                                       export_decoder_step, names)
from qswap.export.onnx import load_session  # noqa: E402


@pytest.fixture(scope="module")
def setup(qmodel, tmp_path_factory):
    encoder_out, path = exported_step(qmodel, tmp_path_factory.mktemp("onnx"), 3)
    with torch.no_grad():
        cross = [c.numpy() for c in CrossKVGraph(qmodel)(encoder_out["encoder_out"][0])]
    return qmodel, encoder_out, path, cross


def test_step_graph_matches_fairseqs_incremental_decoder(setup):
    # measured: 0 steps (2 while onnxruntime fused the self-attention softmax into its
    # QLinearSoftmax); one step leaves room for a near-tie of another CPU's integer kernels
    assert steps_against_fairseq(*setup) <= 1.0


def test_a_step_graph_with_learned_positions_reads_each_steps_position(tmp_path):
    """fairseq's LearnedPositionalEmbedding takes a step's position as int(padding_idx + T): a trace
    fixed it at the traced step's, and every step of the exported decoder read that one row (the
    shipped model with learned decoder positions: 288.86 % WER deployed against 10.04 %)."""
    qmodel = calibrated(build_s2t_transformer(decoder_learned_pos=True))
    encoder_out, path = exported_step(qmodel, tmp_path, 3)
    with torch.no_grad():
        cross = [c.numpy() for c in CrossKVGraph(qmodel)(encoder_out["encoder_out"][0])]
    assert steps_against_fairseq(qmodel, encoder_out, path, cross) <= 1.0


def steps_against_fairseq(qmodel, encoder_out, path, cross) -> float:
    """The step graph against fairseq's incremental decoder on three sentences, six steps, each
    side feeding back its own caches: the largest logits difference, in grid steps."""
    session = load_session(path)
    inputs, outputs = names(len(qmodel.decoder.layers))
    layers = len(qmodel.decoder.layers)
    tokens = torch.tensor([[2, 5, 9, 11, 7, 4], [2, 6, 6, 30, 8, 9], [2, 40, 12, 5, 5, 5]])
    feeds = {"encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy(),
             **dict(zip(inputs[2 + 2 * layers:], cross))}
    cache = [c.numpy() for c in empty_cache(qmodel, 3)]
    state, worst = {}, 0.0
    for t in range(1, tokens.shape[1] + 1):
        with torch.no_grad():
            ref, _ = qmodel.decoder(tokens[:, :t], encoder_out=encoder_out, incremental_state=state)
            ref = qmodel.logits_quant(ref)  # (B, 1, V)
        logits, *cache = session.run(list(outputs), {"tokens": tokens[:, :t].numpy(), **feeds,
                                                      **dict(zip(inputs[2:2 + 2 * layers], cache))})
        assert cache[0].shape[2] == t  # the keys of every token so far
        steps = (torch.from_numpy(logits) - ref).abs() / qmodel.logits_quant.scale
        worst = max(worst, float(steps.max()))
    return worst


def beams_against_fairseq(qmodel, encoder_out, path, cross, beams: int = 4) -> float:
    """The step graph fed the encoder-decoder keys, values and padding mask once per sentence,
    the tokens and self-attention caches once per beam (sentence by sentence), against fairseq's
    incremental decoder on the encoder output repeated per beam: the largest logits difference
    over every step, in grid steps."""
    session = load_session(path)
    inputs, outputs = names(len(qmodel.decoder.layers))
    layers = len(qmodel.decoder.layers)
    sentences = encoder_out["encoder_padding_mask"][0].shape[0]
    rows = qmodel.encoder.reorder_encoder_out(encoder_out, torch.arange(sentences).repeat_interleave(beams))
    tokens = torch.randint(4, 30, (sentences * beams, 5), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 2
    feeds = {"encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy(),
             **dict(zip(inputs[2 + 2 * layers:], cross))}  # (N, S), (N, H, S, D): per sentence
    cache = [c.numpy() for c in empty_cache(qmodel, sentences * beams)]
    state, worst = {}, 0.0
    for t in range(1, tokens.shape[1] + 1):
        with torch.no_grad():
            ref = qmodel.logits_quant(qmodel.decoder(tokens[:, :t], encoder_out=rows, incremental_state=state)[0])
        logits, *cache = session.run(list(outputs), {"tokens": tokens[:, :t].numpy(), **feeds,
                                                      **dict(zip(inputs[2:2 + 2 * layers], cache))})
        assert logits.shape[0] == cache[0].shape[0] == sentences * beams
        worst = max(worst, float(((torch.from_numpy(logits) - ref).abs() / qmodel.logits_quant.scale).max()))
    return worst


def test_step_graph_serves_each_sentences_beams_from_its_cross_row(setup):
    qmodel, encoder_out, path, cross = setup
    inputs = {i.name: i.shape for i in load_session(path).get_inputs()}
    assert inputs["encoder_padding_mask"][0] == inputs["cross_key_0"][0] == "sentences"
    assert inputs["tokens"][0] == inputs["past_key_0"][0] == "batch"
    assert beams_against_fairseq(qmodel, encoder_out, path, cross) <= 1.0  # measured: 0 steps


def test_a_per_channel_grid_in_the_encoder_decoder_attention_is_a_typed_error(tmp_path):
    """Its beams grouped as query positions would meet another layout on that grid."""
    recipe = {"version": 1, "name": "w8a8_q_per_channel",
              "defaults": {"weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
                           "activation": {"bits": 8, "symmetric": False, "observer": "moving_average"}},
              "rules": [{"match": {"path": "decoder.layers.*.encoder_attn"},
                         "sites": {"q": {"granularity": "per_channel", "axis": 2}}}]}  # (B*H, T, D): per D
    qmodel = calibrated(build_s2t_transformer(), qswap.load_recipe(recipe))
    with torch.no_grad():
        encoder_out = qmodel.encoder(**{k: v for k, v in s2t_net_input(2, 60).items() if k != "prev_output_tokens"})
    with pytest.raises(ExportError, match=r"decoder\.layers\.0\.encoder_attn\.core\.q_quant: a per_channel"):
        export_decoder_step(qmodel, tmp_path / "decoder_step.onnx", encoder_out["encoder_out"][0],
                            encoder_out["encoder_padding_mask"][0])


@pytest.mark.parametrize("attention", ["self_attn", "encoder_attn"])
def test_a_skipped_decoder_attention_is_a_typed_error_naming_the_way_to_keep_it_float(tmp_path, attention):
    recipe = {"version": 1, "name": "w8a8_skip",
              "defaults": {"weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
                           "activation": {"bits": 8, "symmetric": False, "observer": "moving_average"}},
              "rules": [{"match": {"path": f"decoder.layers.0.{attention}"}, "skip": True}]}
    qmodel = calibrated(build_s2t_transformer(), qswap.load_recipe(recipe))
    with torch.no_grad():
        encoder_out = qmodel.encoder(**{k: v for k, v in s2t_net_input(2, 60).items() if k != "prev_output_tokens"})
    for export, args in ((export_cross_kv, (encoder_out["encoder_out"][0],)),
                         (export_decoder_step, (encoder_out["encoder_out"][0], encoder_out["encoder_padding_mask"][0]))):
        with pytest.raises(ExportError, match=rf"decoder\.layers\.0\.{attention} is fairseq's MultiheadAttention.*"
                                              r"'weight: null' and 'activation: null' instead of 'skip: true'"):
            export(qmodel, tmp_path / "g.onnx", *args)


def test_step_graph_softmaxes_run_float_softmax(setup, tmp_path):
    """onnxruntime's QLinearSoftmax is not the fake-quant softmax (qswap.export.graph_passes,
    quantize_by_inverse):
    the graph onnxruntime optimizes runs float Softmax for every attention of every layer."""
    import onnx

    qmodel, _, path, _ = setup
    load_session(path, level="all", optimized_path=str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearSoftmax" not in ops
    assert ops.count("Softmax") == 2 * len(qmodel.decoder.layers)  # self- and encoder-attention


def test_cached_keys_go_in_and_out_as_the_codes_of_the_quantized_projections(setup):
    """A quantized cache leaves the step graph as uint8 codes whose values are the keys and values
    fairseq's incremental decoder caches on the fake-quant model, bit for bit."""
    qmodel, encoder_out, path, cross = setup
    session = load_session(path)
    inputs, outputs = names(len(qmodel.decoder.layers))
    assert {i.type for i in session.get_inputs() if i.name.startswith(("past_", "cross_"))} == {"tensor(uint8)"}
    tokens = torch.tensor([[2, 7], [2, 9], [2, 30]])
    feeds = {"encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy(), **dict(zip(inputs[2 + 2 * len(
        qmodel.decoder.layers):], cross))}
    past, state = [c.numpy() for c in empty_cache(qmodel, 3)], {}
    for t in (1, 2):
        _, *past = session.run(list(outputs), {"tokens": tokens[:, :t].numpy(), **feeds,
                                               **dict(zip(inputs[2:2 + 2 * len(qmodel.decoder.layers)], past))})
        with torch.no_grad():
            qmodel.decoder(tokens[:, :t], encoder_out=encoder_out, incremental_state=state)
    assert all(c.dtype == np.uint8 and c.shape[2] == 2 for c in past)
    ref = [layer.self_attn._get_input_buffer(state)[kind] for layer in qmodel.decoder.layers
           for kind in ("prev_key", "prev_value")]
    assert all(torch.equal(got, want) for got, want in zip(cache_values(qmodel, past), ref))


def test_float_caches_stay_float_where_the_attention_keeps_no_quantized_cache(tmp_path):
    """A per-channel k grid: the fake-quant attention caches float projections (re-quantized as it
    reads them), and the step graph carries them as floats."""
    recipe = {"version": 1, "name": "w8a8_k_per_channel",
              "defaults": {"weight": {"bits": 8, "symmetric": True, "granularity": "per_tensor", "observer": "minmax"},
                           "activation": {"bits": 8, "symmetric": False, "observer": "moving_average"}},
              "rules": [{"match": {"path": "decoder.layers.*.self_attn"},
                         "sites": {"k": {"granularity": "per_channel", "axis": 2}}}]}
    qmodel = calibrated(build_s2t_transformer(), qswap.load_recipe(recipe))
    assert [c.dtype for c in empty_cache(qmodel, 1)[:2]] == [torch.float32, torch.float32]
    encoder_out, path = exported_step(qmodel, tmp_path, 2)
    types = {i.name: i.type for i in load_session(path).get_inputs()}
    assert types["past_key_0"] == types["past_value_0"] == "tensor(float)"
    assert types["cross_key_0"] == "tensor(uint8)"  # the encoder-decoder attention's grids are per tensor


def test_onnxruntime_runs_every_attention_matmul_of_the_step_on_integers(setup, tmp_path):
    """The caches' codes reach the attention matmuls through DequantizeLinear (graph_passes.code_caches):
    onnxruntime fuses each into an integer kernel, none stays a float MatMul."""
    import onnx

    qmodel, _, path, _ = setup
    load_session(path, level="all", optimized_path=str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "MatMul" not in ops and "FusedMatMul" not in ops
    # the token embedding's embed_scale is in its DequantizeLinear's scale (gather_codes, then
    # fold_constant_scales): no float Mul reads dequantized values in the step
    nodes = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    assert not [n.name for n in nodes if n.op_type == "Mul" and dequantized & set(n.input)]
    assert ops.count("QLinearMatMul") + ops.count("MatMulIntegerToFloat") == 4 * len(qmodel.decoder.layers)


def test_uncalibrated_decoder_is_a_typed_error(tmp_path):
    qmodel = qswap.convert(build_s2t_transformer(), "w8a8")
    with pytest.raises(ExportError, match="not calibrated"):
        export_decoder_step(qmodel, tmp_path / "d.onnx", torch.zeros(5, 1, 64), torch.zeros(1, 5, dtype=torch.bool))


def test_cross_kv_graph_gives_the_keys_fairseqs_decoder_caches(setup, tmp_path):
    qmodel, encoder_out, _, _ = setup
    path = export_cross_kv(qmodel, tmp_path / "cross_kv.onnx", encoder_out["encoder_out"][0])
    layers = len(qmodel.decoder.layers)
    session = load_session(path)
    assert [i.name for i in session.get_inputs()] == ["encoder_out"]
    codes = session.run(None, {"encoder_out": encoder_out["encoder_out"][0].numpy()})
    assert all(c.dtype == np.uint8 for c in codes)  # per-tensor k/v grids: the caches' codes
    got = [c.numpy() for c in cache_values(qmodel, codes, cross=True)]
    state: dict = {}  # fairseq's incremental decoder fills its static caches at the first step
    with torch.no_grad():
        qmodel.decoder(torch.full((3, 1), 2), encoder_out=encoder_out, incremental_state=state)
    for i, layer in enumerate(qmodel.decoder.layers):
        saved = layer.encoder_attn._get_input_buffer(state)
        for j, (kind, grid) in enumerate((("prev_key", layer.encoder_attn.core.k_quant),
                                          ("prev_value", layer.encoder_attn.core.v_quant))):
            steps = (torch.from_numpy(got[2 * i + j]) - saved[kind]).abs() / grid.scale
            assert got[2 * i + j].shape == tuple(saved[kind].shape) and float(steps.max()) <= 1.0
    assert len(got) == 2 * layers


def test_a_second_step_graph_on_the_same_model_computes_the_same_step(setup):
    """The first DecoderStepGraph swaps each encoder-decoder attention's class in place; a second
    one on the same (copied) model accepts the swapped attentions and computes the same logits
    and caches (before, it was an ExportError naming a SentenceCrossAttention)."""
    import copy

    from qswap.export.decoder_step import DecoderStepGraph, SentenceCrossAttention
    qmodel, encoder_out, _, cross = setup
    model = copy.deepcopy(qmodel).eval()
    first = DecoderStepGraph(model)
    assert all(type(a) is SentenceCrossAttention for a in first.cross_attns)
    second = DecoderStepGraph(model)
    rows = 2 * encoder_out["encoder_padding_mask"][0].shape[0]
    tokens = torch.full((rows, 1), qmodel.decoder.dictionary.eos(), dtype=torch.long)
    args = (tokens, encoder_out["encoder_padding_mask"][0], *empty_cache(qmodel, rows),
            *(torch.from_numpy(c) for c in cross))
    with torch.no_grad():
        out_first, out_second = first(*args), second(*args)
    assert len(out_first) == len(out_second)
    assert all(torch.equal(a, b) for a, b in zip(out_first, out_second))


def test_the_step_adds_the_integer_models_entry_tables_in_int32(setup, tmp_path):
    """The decoder's entry (embed_scale x token row + position row) runs as the integer model
    defines it (``folded_tables``: int32 rows on the grid 2^-16 of its readers' finest, added):
    the graph's DequantizeLinear of the sum gives exactly those int32 sums times that grid, at
    every step, and the deploy audit finds no float ``Add`` in the step graph."""
    import onnx

    from qswap.export.decoder_step import entry_tables
    from qswap.export.onnx_audit import audit_onnx
    from qswap.nn.fairseq.decoder import decoder_stream

    qmodel, encoder_out, path, cross = setup
    tables, grid = entry_tables(qmodel.decoder)
    tokens_table, positions_table, scale = qmodel.decoder.folded_tables()
    assert grid == scale
    model = onnx.load(str(path))
    adds = {n.output[0] for n in model.graph.node if n.op_type == "Add"}
    entry = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in adds]
    assert len(entry) == 1  # the one Add a DequantizeLinear reads (QuantizeLinear nodes read the residual adds)
    model.graph.output.append(onnx.helper.make_tensor_value_info(entry[0].output[0], onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(model, str(probe))
    session = load_session(probe, level="disabled")
    inputs, outputs = names(len(qmodel.decoder.layers))
    layers = len(qmodel.decoder.layers)
    tokens = torch.tensor([[2, 5, 9, 11], [2, 6, 6, 30], [2, 40, 12, 5]])
    feeds = {"encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy(),
             **dict(zip(inputs[2 + 2 * layers:], cross))}
    cache = [c.numpy() for c in empty_cache(qmodel, 3)]
    for t in range(1, tokens.shape[1] + 1):
        *outs, entry_values = session.run([*outputs, entry[0].output[0]], {
            "tokens": tokens[:, :t].numpy(), **feeds, **dict(zip(inputs[2:2 + 2 * layers], cache))})
        cache = outs[1:]
        stream = decoder_stream(tokens_table, positions_table, qmodel.decoder.padding_idx, tokens[:, :t], True)
        expected = (stream.double() * scale).float().numpy()  # (1, B, C)
        assert np.array_equal(entry_values.reshape(expected.shape), expected)
    report = audit_onnx(path, site_prefix="decoder.")
    assert "Add" not in report.float_ops and report.integer_ops.get("Add") == 1


def test_a_decoder_whose_entry_has_no_integer_form_keeps_the_float_add():
    """Unquantized token or position tables (a recipe that leaves the embedding float): no int32
    tables to add, ``entry_tables`` says so and the export keeps the float ``Add``."""
    from qswap.export.decoder_step import entry_tables

    recipe = {"version": 1, "name": "w8a8_float_embeddings",
              "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8, "symmetric": False}},
              "rules": [{"match": {"class": ["Embedding"]}, "skip": True}]}
    model = qswap.convert(build_s2t_transformer(), qswap.load_recipe(recipe))
    qswap.calibrate(model, [s2t_net_input(2, 40, seed=s) for s in range(2)])
    assert entry_tables(model.decoder) is None
