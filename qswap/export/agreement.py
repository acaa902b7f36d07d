"""How far the exported graphs' outputs are from the fake-quant model's, graph by graph, in steps
of the grid each output lands on (0: the same values; 1: one rounding apart).

=============  ===================================================  ===============================
graph          compared with                                        grid of the steps
=============  ===================================================  ===============================
encoder        ``qmodel.encoder`` (unpadded frames)                 first decoder layer's
                                                                    encoder-attention ``key_in``
cross_kv       the keys/values fairseq's incremental decoder        each layer's ``core.k_quant`` /
               caches, on the fake-quant encoder output             ``core.v_quant``
decoder_step   ``qmodel.decoder`` stepped incrementally on the      ``logits_quant``
               same tokens, each side with its own caches
ctc            ``qmodel(**net_input)["encoder_out"]`` (wav2vec 2.0  ``logits_quant``
               CTC, unpadded frames)
=============  ===================================================  ===============================

A grid that is not frozen per tensor (no scalar scale) is measured in its float values instead
(``unit`` says which).

The fake-quant side runs with ``simulate: float`` whatever its recipe says
(``qswap.nn.simulate``): a QDQ graph computes each op in float between its DequantizeLinear and
QuantizeLinear nodes and rounds the result onto the reader's grid, as that simulation does; the
integer insides (``simulate: integer``) are what ``qswap.integerize`` computes instead.

>>> agreement(qmodel, "deploy/", net_input, tokens)
{'encoder': {'max': 1.0, 'mean': 0.02, 'unit': 'grid steps'}, ...}
"""
from __future__ import annotations

import os

import torch
from torch import nn

from qswap.export.decoder_step import CrossKVGraph, cache_values, cross_names, empty_cache, names
from qswap.export.onnx import load_session, run_encoder
from qswap.export.package import graph_paths, read_manifest
from qswap.nn.simulate import simulating


def agreement(qmodel: nn.Module, directory: "str | os.PathLike[str]", net_input: dict,
              tokens: torch.Tensor) -> dict[str, dict]:
    """Per graph of the export ``directory``: max and mean distance from ``qmodel`` on
    ``net_input`` (the decoder stepped through ``tokens`` (B, T), BOS/EOS first)."""
    paths = graph_paths(directory, read_manifest(directory))
    sessions = {name: load_session(path) for name, path in paths.items()}
    src, lengths = net_input["src_tokens"], net_input["src_lengths"]
    with torch.no_grad(), simulating(qmodel, "float"):
        ref = qmodel.encoder(src, lengths)
        ref_out, ref_mask = ref["encoder_out"][0], ref["encoder_padding_mask"][0]
        out, mask = run_encoder(sessions["encoder"], src, lengths)
        keep = ~ref_mask.transpose(0, 1).unsqueeze(-1)  # (T', B, 1): unpadded frames
        result = {"encoder": _distance(out, ref_out, qmodel.decoder.layers[0].encoder_attn.key_quant, keep)}
        result["padding_mask_equal"] = bool(torch.equal(mask, ref_mask))
        layers = len(qmodel.decoder.layers)
        cross_ref = cache_values(qmodel, CrossKVGraph(qmodel)(ref_out), cross=True)
        cross = sessions["cross_kv"].run(list(cross_names(layers)), {"encoder_out": ref_out.numpy()})
        grids = [q for layer in qmodel.decoder.layers
                 for q in (layer.encoder_attn.core.k_quant, layer.encoder_attn.core.v_quant)]
        # compared as values: a cache of codes (uint8) holds no differences
        result["cross_kv"] = _worst(_distance(c, r, g)
                                    for c, r, g in zip(cache_values(qmodel, cross, cross=True), cross_ref, grids))
        result["decoder_step"] = _step_distance(qmodel, sessions["decoder_step"], ref, tokens,
                                                [torch.from_numpy(c) for c in cross])
    return result


def ctc_agreement(qmodel: nn.Module, directory: "str | os.PathLike[str]", net_input: dict) -> dict[str, dict]:
    """The CTC graph of the export ``directory`` against ``qmodel`` (a wav2vec 2.0 CTC model) on
    ``net_input`` (``source``, ``padding_mask``): the logits' distance on unpadded frames, whether
    the output padding masks agree, and the fraction of unpadded frames with the same argmax."""
    from qswap.export.wav2vec2 import run_ctc

    paths = graph_paths(directory, read_manifest(directory))
    source, mask = net_input["source"], net_input["padding_mask"]
    with torch.no_grad(), simulating(qmodel, "float"):
        ref = qmodel(source=source, padding_mask=mask)
    logits, padding = run_ctc(load_session(paths["ctc"]), source, mask)
    ref_padding = ref["padding_mask"] if ref["padding_mask"] is not None else torch.zeros_like(padding)
    keep = ~padding.transpose(0, 1)  # (T, B): unpadded frames
    same = logits.argmax(-1)[keep] == ref["encoder_out"].argmax(-1)[keep]
    return {"ctc": _distance(logits, ref["encoder_out"], qmodel.logits_quant, keep.unsqueeze(-1)),
            "padding_mask_equal": bool(torch.equal(padding, ref_padding)),
            "same_argmax": float(same.float().mean()) if same.numel() else 1.0}


def _step_distance(qmodel, session, encoder_out: dict, tokens: torch.Tensor, cross) -> dict:
    inputs, outputs = names(len(qmodel.decoder.layers))
    layers = len(qmodel.decoder.layers)
    cache = [c.numpy() for c in empty_cache(qmodel, tokens.shape[0])]
    state: dict = {}
    found = []
    for t in range(1, tokens.shape[1] + 1):
        logits_ref, _ = qmodel.decoder(tokens[:, :t], encoder_out=encoder_out, incremental_state=state)
        logits_ref = qmodel.logits_quant(logits_ref)  # (B, 1, V)
        feeds = {"tokens": tokens[:, :t].numpy(),
                 "encoder_padding_mask": encoder_out["encoder_padding_mask"][0].numpy()}
        feeds.update(zip(inputs[2:2 + 2 * layers], cache))
        feeds.update(zip(inputs[2 + 2 * layers:], (c.numpy() for c in cross)))
        logits, *cache = session.run(list(outputs), feeds)
        found.append(_distance(torch.from_numpy(logits), logits_ref, qmodel.logits_quant))
    return _worst(found)


def _distance(out: torch.Tensor, ref: torch.Tensor, grid, keep: torch.Tensor | None = None) -> dict:
    scale = getattr(grid, "scale", None)
    per_tensor = isinstance(scale, torch.Tensor) and scale.numel() == 1 and bool(getattr(grid, "enabled", False))
    diff = (out - ref).abs()
    if per_tensor:
        diff = diff / scale.reshape(())
    if keep is not None:
        diff = diff.masked_select(keep.expand_as(diff))
    return {"max": float(diff.max()) if diff.numel() else 0.0, "mean": float(diff.mean()) if diff.numel() else 0.0,
            "unit": "grid steps" if per_tensor else "float"}


def _worst(found) -> dict:
    found = list(found)
    units = {f["unit"] for f in found}
    return {"max": max(f["max"] for f in found), "mean": sum(f["mean"] for f in found) / len(found),
            "unit": units.pop() if len(units) == 1 else "mixed"}
