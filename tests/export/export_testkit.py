"""Shared pieces of the export tests: converted and calibrated small s2t and wav2vec 2.0 CTC models, padded batches,
the encoder graph's distance from the fake-quant encoder in grid steps, the values every
QuantizeLinear of a graph reads, and the comparison of an integer model with its exported and
loaded copy."""
from __future__ import annotations

import warnings

import torch
from torch import nn

import qswap
from qswap.models import build_wav2vec2_ctc, s2t_net_input, wav2vec2_net_input
from qswap.nn.simulate import simulating
from qswap.recipe import with_simulate


def float_insides(recipe):
    """``recipe`` (a name, path or Recipe) with ``simulate: float``: the fake-quant model these
    tests compare onnxruntime with computes what a QDQ graph computes (each op in float between
    DQ and Q, rounded onto its reader's grid), whatever the default simulation."""
    return with_simulate(recipe, "float")


def calibrated(model, recipe="w8a8"):
    """``model`` converted with ``recipe`` (``float_insides``) and calibrated on three small
    padded batches."""
    batches = [s2t_net_input(2, 60, seed=s) for s in range(3)]
    qmodel = qswap.convert(model, float_insides(recipe), data=batches)  # data: a recipe's transforms' statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batches never take keep observing
        qswap.calibrate(qmodel, batches)
    return qmodel


def calibrated_ctc(recipe="w8a8", **overrides):
    """A small fairseq wav2vec 2.0 CTC model (``overrides``: Wav2Vec2Config fields) converted with
    ``recipe`` (``float_insides``) and calibrated on three small padded batches."""
    qmodel = qswap.convert(build_wav2vec2_ctc(**overrides), float_insides(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [wav2vec2_net_input(2, 4000, seed=s) for s in range(3)])
    return qmodel


def padded_waveforms(batch: int, samples: int, seed: int) -> dict:
    """Waveforms of ``batch`` utterances, the first filling ``samples``, each next 1000 shorter."""
    net = wav2vec2_net_input(batch, samples, seed=seed, ragged=False)
    for i in range(1, batch):
        net["padding_mask"][i, samples - 1000 * i:] = True
        net["source"][i, samples - 1000 * i:] = 0.0
    return net


def same_tree(a: nn.Module, b: nn.Module) -> None:
    """Same classes at the same paths, every buffer equal in dtype, shape and value."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def same_description(a: nn.Module, b: nn.Module) -> None:
    """The same declared object tree, every declared value equal (constants outside the modules'
    buffers included: requantizations, grids, tables)."""
    from qswap.export.integer_format import describe
    (entry_a, tensors_a), (entry_b, tensors_b) = describe(a), describe(b)
    assert entry_a == entry_b and tensors_a.keys() == tensors_b.keys()
    for key, t in tensors_a.items():
        assert t.dtype == tensors_b[key].dtype and torch.equal(t, tensors_b[key]), key


def padded_batch(batch, frames, seed):
    """Features of ``batch`` utterances, the first filling ``frames``, the others shorter."""
    net = s2t_net_input(batch, frames, seed=seed)
    for i in range(1, batch):
        net["src_lengths"][i] = frames - 7 * i
        net["src_tokens"][i, frames - 7 * i:] = 0.0
    return net


def exported_step(qmodel, folder, batch: int) -> tuple:
    """(the encoder output of ``batch`` utterances of 72 frames, the last one 50, and
    ``decoder_step.onnx`` exported for ``qmodel`` into ``folder`` with it)."""
    from qswap.export.decoder_step import export_decoder_step

    net = s2t_net_input(batch, 72, seed=4)
    net["src_lengths"][batch - 1] = 50
    with torch.no_grad():
        encoder_out = qmodel.encoder(net["src_tokens"], net["src_lengths"])
    path = export_decoder_step(qmodel, folder / "decoder_step.onnx", encoder_out["encoder_out"][0],
                               encoder_out["encoder_padding_mask"][0])
    return encoder_out, path


def output_steps(qmodel, session, net):
    """|onnxruntime - fake-quant| of the encoder output, in steps of the grid its consumer (the
    decoder's encoder-attention input quantizer) puts it on; and both padding masks. The graph
    runs ONNX's float LayerNorm and Softmax: the fake-quant model is run with those insides too
    (``simulate: float``), not the integer ones."""
    from qswap.export import run_encoder

    with torch.no_grad(), simulating(qmodel, "float"):
        ref = qmodel.encoder(net["src_tokens"], net["src_lengths"])
    out, padding = run_encoder(session, net["src_tokens"], net["src_lengths"])
    step = qmodel.decoder.layers[0].encoder_attn.key_quant.scale
    return (out - ref["encoder_out"][0]).abs() / step, padding, ref["encoder_padding_mask"]


def encoder_feeds(net: dict) -> dict:
    """The encoder graph's inputs of a ``net_input``."""
    return {"src_tokens": net["src_tokens"], "src_lengths": net["src_lengths"]}


def quantizer_inputs(graph_path, feeds: dict) -> tuple[list, list[int]]:
    """What every QuantizeLinear of the graph at ``graph_path`` reads on ``feeds`` (input name ->
    tensor), as numpy arrays, and the graph inputs' ONNX element types."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(graph_path))
    inputs = [n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for name in inputs:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(inputs, {name: value.numpy() for name, value in feeds.items()})
    return values, [i.type.tensor_type.elem_type for i in model.graph.input]
