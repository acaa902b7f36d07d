"""Decoding with exported graphs: a fairseq encoder-decoder model whose encoder and incremental
decoder run onnxruntime sessions, so fairseq's own SequenceGenerator drives the beam search.

The encoder runs ``encoder.onnx`` and, once per utterance, ``cross_kv.onnx`` (the encoder-decoder
keys and values of every decoder layer); both travel in the encoder output, one row per
sentence (the step graph serves each sentence's beams from its row), which follows the
sentences that remain when the generator prunes finished ones. The decoder runs
``decoder_step.onnx`` on the tokens so far and the self-attention caches kept in fairseq's ``incremental_state``,
reordered by beam with ``index_select`` as fairseq's own attention reorders its cache. Caches hold
what the graphs exchange: uint8 codes where the graph declares them (``decoder_step.cache_grids``),
float values otherwise; the first step's empty caches take the dtype of the graph's inputs.

A CTC export (wav2vec 2.0) loads as ``OrtCtcModel``: its forward returns the logits and the
output padding mask as the fake-quant model's forward does, and ``qswap.integration.decode``
decodes it with greedy CTC.

>>> model = load_exported("deploy/", task.target_dictionary, threads=2)
>>> SequenceGenerator([model], model.decoder.dictionary, beam_size=5).generate([model], sample)
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder

from qswap.errors import ExportError
from qswap.export.decoder_step import cross_names, names
from qswap.export.onnx import INPUTS, OUTPUTS, check_lengths, load_session, run_graph
from qswap.export.package import graph_paths, read_manifest
from qswap.nn.base import check_finite_input

CACHE = "caches"  # the incremental_state key of the self-attention caches


class OrtEncoder(FairseqEncoder):
    """``encoder.onnx`` then ``cross_kv.onnx``: fairseq's encoder output dict plus ``cross_kv``
    (per layer key, value: (N, H, S, D) tensors), one row per SENTENCE (N), not per hypothesis:
    the hypotheses the decoder steps are the sentences' beams, in groups of equal size, sentence
    by sentence (as SequenceGenerator orders them), and the step graph serves each group from
    its sentence's row. ``hypotheses`` holds their number."""

    def __init__(self, dictionary, encoder, cross_kv, layers: int):
        super().__init__(dictionary)
        self.encoder, self.cross_kv = encoder, cross_kv
        self.cross_outputs = list(cross_names(layers))

    def forward(self, src_tokens, src_lengths, **kwargs):
        check_finite_input(src_tokens, "the exported encoder")
        check_lengths(src_tokens, src_lengths)
        out, padding = run_graph(self.encoder, list(OUTPUTS), {"src_tokens": _np(src_tokens.float()),
                                                               "src_lengths": _np(src_lengths.long())})
        cross = run_graph(self.cross_kv, self.cross_outputs, {"encoder_out": out})
        return {"encoder_out": [torch.from_numpy(out)], "encoder_padding_mask": [torch.from_numpy(padding)],
                "encoder_embedding": [], "encoder_states": [], "src_tokens": [], "src_lengths": [],
                "cross_kv": [torch.from_numpy(c) for c in cross], "hypotheses": [torch.tensor(padding.shape[0])]}

    def forward_torchscript(self, net_input: Dict[str, torch.Tensor]):
        return self.forward(net_input["src_tokens"], net_input["src_lengths"])

    def reorder_encoder_out(self, encoder_out: Dict[str, List[torch.Tensor]], new_order):
        """The encoder output for the hypotheses ``new_order`` selects: the same rows when their
        number is unchanged, as fairseq's MultiheadAttention keeps its static encoder-decoder keys
        and values (``reorder_incremental_state``; SequenceGenerator reorders every step within
        each sentence's beams, which share its row), the rows of the sentences that remain when
        it changes (the beams made, finished sentences dropped; ``sentence_rows``), and of any
        other order (checked each step: one that moves hypotheses across sentences, which
        SequenceGenerator never asks for, selects their rows too). A copy of the
        (S, B x beam, E) encoder output every step was the decode's largest cost outside
        onnxruntime's runs."""
        hypotheses, rows = int(encoder_out["hypotheses"][0]), encoder_out["cross_kv"][0].size(0)
        sentences = sentence_rows(new_order, hypotheses // rows)
        if torch.equal(sentences, torch.arange(rows)):  # every sentence keeps its row
            if hypotheses == new_order.numel():
                return encoder_out
            return {**encoder_out, "hypotheses": [torch.tensor(new_order.numel())]}
        reordered = {**encoder_out, "hypotheses": [torch.tensor(new_order.numel())]}
        return {**reordered, "encoder_out": [encoder_out["encoder_out"][0].index_select(1, sentences)],
                "encoder_padding_mask": [encoder_out["encoder_padding_mask"][0].index_select(0, sentences)],
                "cross_kv": [c.index_select(0, sentences) for c in encoder_out["cross_kv"]]}

    def max_positions(self):
        return int(1e6)


def sentence_rows(new_order: torch.Tensor, beam: int) -> torch.Tensor:
    """The per-sentence rows of the hypotheses ``new_order`` selects from hypotheses grouped ``beam``
    by ``beam``: each run of hypotheses of one sentence, when the runs are of one length (the new
    beam), gives one row; otherwise each hypothesis gets its own (a beam of one)."""
    sentence = torch.div(new_order, beam, rounding_mode="floor")
    runs, counts = torch.unique_consecutive(sentence, return_counts=True)
    return runs if bool((counts == counts[0]).all()) else sentence


class OrtDecoder(FairseqIncrementalDecoder):
    """``decoder_step.onnx`` as fairseq's incremental decoder: (B, 1, V) logits (on the logits
    grid) per call, the self-attention caches in ``incremental_state``."""

    def __init__(self, dictionary, step, layers: int, heads: list[int], head_dim: list[int],
                 max_positions: int, dtypes: "list[np.dtype] | None" = None):
        super().__init__(dictionary)
        self.step, self.layers, self._max_positions = step, layers, max_positions
        self.inputs, self.outputs = names(layers)
        self.heads, self.head_dim = heads, head_dim
        # each self-attention cache's dtype (keys then values per layer): uint8 codes or float32
        self.dtypes = dtypes if dtypes is not None else [np.dtype(np.float32)] * (2 * layers)

    def forward(self, prev_output_tokens, encoder_out: Optional[Dict[str, List[torch.Tensor]]] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[torch.Tensor]]]] = None, **kwargs):
        if incremental_state is None or encoder_out is None:
            raise ExportError("the exported decoder runs one incremental step at a time; decode with "
                              "fairseq's SequenceGenerator (incremental_state), not a teacher-forced forward")
        batch = prev_output_tokens.shape[0]
        state = self.get_incremental_state(incremental_state, CACHE)
        past = state["past"] if state is not None else [
            np.zeros((batch, self.heads[i // 2], 0, self.head_dim[i // 2]), dtype)
            for i, dtype in enumerate(self.dtypes)]
        feeds = {"tokens": _np(prev_output_tokens.long()),
                 "encoder_padding_mask": _np(encoder_out["encoder_padding_mask"][0])}
        feeds.update(zip(self.inputs[2:], past))
        feeds.update(zip(self.inputs[2 + 2 * self.layers:], (_np(c) for c in encoder_out["cross_kv"])))
        logits, *caches = run_graph(self.step, list(self.outputs), feeds)
        self.set_incremental_state(incremental_state, CACHE, {"past": caches})
        return torch.from_numpy(logits), {"attn": [None], "inner_states": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, CACHE)
        if state is not None:
            order = new_order.numpy()
            self.set_incremental_state(incremental_state, CACHE, {"past": [c[order] for c in state["past"]]})

    def max_positions(self):
        return self._max_positions


class OrtS2TModel(FairseqEncoderDecoderModel):
    """The exported graphs of a qswap S2T transformer or conformer as a fairseq encoder-decoder model
    (``recipe``: the recipe name recorded at export)."""

    recipe = "unknown"

    def max_decoder_positions(self):
        return self.decoder.max_positions()


class OrtCtcModel(torch.nn.Module):
    """``ctc.onnx`` as a CTC model: ``forward(source, padding_mask)`` returns ``{"encoder_out":
    (T, B, V) logits, "padding_mask": (B, T) or None}``, what greedy CTC reads (``recipe``: the
    recipe name recorded at export)."""

    recipe = "unknown"

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs) -> dict:
        from qswap.export.wav2vec2 import run_ctc

        if padding_mask is None:
            padding_mask = torch.zeros(source.shape, dtype=torch.bool)
        logits, padding = run_ctc(self.session, source, padding_mask)
        return {"encoder_out": logits, "padding_mask": padding if bool(padding.any()) else None}


def load_exported(directory: "str | os.PathLike[str]", dictionary, *,
                  threads: int = 1) -> "OrtS2TModel | OrtCtcModel":
    """An ``OrtS2TModel`` (an ``OrtCtcModel`` for a CTC export) of an export directory
    (``qswap export --onnx``); ``dictionary`` is the target dictionary of the task. ExportError
    for a missing or malformed file, or a graph scoring another vocabulary."""
    if dictionary is None or not callable(getattr(dictionary, "__len__", None)):
        raise ExportError(f"load_exported needs the task's target dictionary (task.target_dictionary), got "
                          f"{type(dictionary).__name__}: the exported graphs score its tokens")
    manifest = read_manifest(directory)
    _check_dictionary(directory, manifest, dictionary)
    paths = graph_paths(directory, manifest)
    sessions = {name: load_session(path, threads=threads) for name, path in paths.items()}
    if manifest.kind == "ctc":
        _check_ctc_inputs(directory, sessions["ctc"])
        _check_vocabulary(directory, sessions["ctc"], dictionary)
        model = OrtCtcModel(sessions["ctc"]).eval()
        model.recipe = manifest.recipe
        return model
    _check_graph_inputs(directory, sessions, manifest.decoder_layers)
    _check_positions(directory, sessions["decoder_step"], manifest.max_target_positions)
    heads, head_dim, dtypes = _cache_shapes(sessions["decoder_step"], manifest.decoder_layers)
    _check_vocabulary(directory, sessions["decoder_step"], dictionary)
    encoder = OrtEncoder(dictionary, sessions["encoder"], sessions["cross_kv"], manifest.decoder_layers)
    decoder = OrtDecoder(dictionary, sessions["decoder_step"], manifest.decoder_layers, heads, head_dim,
                         manifest.max_target_positions, dtypes)
    model = OrtS2TModel(encoder, decoder).eval()
    model.recipe = manifest.recipe
    return model


def _check_graph_inputs(directory, sessions: dict, layers: int) -> None:
    """Each graph takes the inputs its place in export.json says (the encoder its features, the
    cross-attention graph the encoder's output, the step graph the caches of ``layers`` decoder
    layers): an export.json edited or mixed with another export's graphs is named as such, not
    as inputs the caller passed."""
    expected = {"encoder": set(INPUTS), "cross_kv": {"encoder_out"}, "decoder_step": set(names(layers)[0])}
    for role, wanted in expected.items():
        taken = {i.name for i in sessions[role].get_inputs()}
        if taken != wanted:
            raise _undescribed(directory, f"the graph it names as {role!r} takes {', '.join(sorted(taken)[:6])}"
                                          f"{' ...' if len(taken) > 6 else ''}, which is not what a {role!r} graph "
                                          f"of {layers} decoder layers takes")


def _check_ctc_inputs(directory, session) -> None:
    """The graph export.json names as the CTC model takes audio and its padding mask (an encoder
    of an S2T export named there had been blamed on the data directory's dictionary)."""
    from qswap.export.wav2vec2 import INPUTS as CTC_INPUTS

    taken = {i.name for i in session.get_inputs()}
    if taken != set(CTC_INPUTS):
        raise _undescribed(directory, f"the graph it names as 'ctc' takes {', '.join(sorted(taken))}, not what a "
                                      f"CTC graph takes ({', '.join(CTC_INPUTS)})")


def _check_positions(directory, step, max_target_positions: int) -> None:
    """export.json's ``max_target_positions`` (how long fairseq's generator lets a hypothesis grow)
    is the position limit the step graph records (``POSITIONS_KEY``; a graph exported before it was
    recorded has none): an edited smaller number truncated every hypothesis silently, a larger one
    ran past the graph's position table."""
    from qswap.export.decoder_step import POSITIONS_KEY

    recorded = step.get_modelmeta().custom_metadata_map.get(POSITIONS_KEY)
    if recorded is not None and recorded != str(max_target_positions):
        raise _undescribed(directory, f"it gives max_target_positions {max_target_positions}, the decoder step "
                                      f"graph was exported with {recorded} positions")


def _undescribed(directory, detail: str) -> ExportError:
    """The ExportError of an export.json that does not describe the graphs beside it (edited, or
    mixed with another export's): ``detail`` says how."""
    return ExportError(f"{directory}: export.json does not describe its graphs: {detail}; export the directory "
                       f"again ('qswap export QCKPT --onnx -o DIR')")


def _check_dictionary(directory, manifest, dictionary) -> None:
    """The task's target dictionary is the one the model was exported with (its recorded facts:
    special indices, size, a hash of the symbols); a dictionary of the same size with other
    symbols would decode other words silently."""
    from qswap.io.dictionary import mismatch

    why = mismatch(manifest.dictionary, dictionary, "export.json", made="exported with",
                   advice="decode with the data directory the model was trained on")
    if why is not None:
        raise ExportError(f"{directory}: {why}")


def _check_vocabulary(directory, session, dictionary) -> None:
    vocab = session.get_outputs()[0].shape[-1]
    if isinstance(vocab, int) and vocab != len(dictionary):
        raise ExportError(f"{directory}: the exported graph scores {vocab} tokens, the task's dictionary "
                          f"has {len(dictionary)}; decode with the data directory the model was trained on")


CACHE_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(uint8)": np.dtype(np.uint8)}


def _cache_shapes(step, layers: int) -> tuple[list[int], list[int], list[np.dtype]]:
    """Heads and head size of each layer's self-attention cache, and the dtype of each cache
    (keys then values per layer: float32, or uint8 codes), from the step graph's inputs."""
    declared = {i.name: i for i in step.get_inputs()}
    heads, dims, dtypes = [], [], []
    for i in range(layers):
        shape = declared[f"past_key_{i}"].shape if f"past_key_{i}" in declared else None
        if not shape or len(shape) != 4 or not all(isinstance(n, int) for n in (shape[1], shape[3])):
            raise ExportError(f"the decoder step graph has no past_key_{i} input of static heads and "
                              f"head size; re-export the directory")
        heads.append(shape[1])
        dims.append(shape[3])
        for kind in ("key", "value"):
            cache = declared.get(f"past_{kind}_{i}")
            if cache is None or cache.type not in CACHE_TYPES:
                raise ExportError(f"the decoder step graph's past_{kind}_{i} input is "
                                  f"{'missing' if cache is None else cache.type}, not a float32 or uint8 "
                                  f"cache; re-export the directory")
            dtypes.append(CACHE_TYPES[cache.type])
    return heads, dims, dtypes


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def load_deployed(directory: "str | os.PathLike[str]", data: "str | os.PathLike[str]", *, threads: int = 1):
    """``(OrtS2TModel, fairseq task)`` of an export directory, the task set up from the config
    recorded at export time and pointed at the data directory ``data``."""
    from pathlib import Path

    from fairseq import tasks
    from omegaconf import OmegaConf

    from qswap.errors import DataError
    from qswap.integration.data import check_data_dir, resolve_data_paths
    from qswap.integration.fairseq_task import register_tasks

    manifest = read_manifest(directory)
    if not manifest.task:
        raise ExportError(f"{directory}: export.json records no fairseq task; export the directory with "
                          f"'qswap export QCKPT --onnx -o DIR' (or export_model(..., task_cfg=cfg.task))")
    check_data_dir(data, "the config.yaml, dictionary and TSV manifests the model was trained with")
    register_tasks()
    cfg = OmegaConf.create({**manifest.task, "data": str(Path(data).resolve())})
    try:
        task = tasks.setup_task(cfg)
        dictionary = task.target_dictionary  # some tasks (audio_finetuning) read it only now
    except Exception as e:  # fairseq reads the data directory's config and dictionary: no typed errors
        raise DataError(f"cannot set up fairseq task {manifest.task.get('_name')!r} on {data} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); point --data at the "
                        f"folder with the task's config and dictionary") from None
    if getattr(task, "data_cfg", None) is not None:
        resolve_data_paths(task.data_cfg)
    return load_exported(directory, dictionary, threads=threads), task
