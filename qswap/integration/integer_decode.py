"""Decoding with an integer S2T model, and what an exported one records to decode again.

The integer model has no incremental decoding state yet (issue 16), so ``greedy_prefix_rerun``
decodes greedily by rerunning the integer decoder on the whole prefix at every step: the
integer model's own transcripts, not beam search's. ``decode_exported`` is what ``qswap eval
EXPORT_DIR`` runs.

>>> tokens = greedy_prefix_rerun(imodel, sample["net_input"], eos, eos, max_len=200)
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

import torch

from qswap.errors import DataError, ExportError, LoadError
from qswap.integration.decode import DecodeResult, decode_with

DECODE_METHOD = "greedy, prefix rerun"


def greedy(step: Callable[[torch.Tensor], torch.Tensor], batch: int, bos: int, eos: int,
           max_len: int) -> list[torch.Tensor]:
    """Greedy tokens per utterance: ``step(prev_tokens (B, t))`` -> (B, t, V) scores (codes or
    floats on one grid: argmax takes the first of tied tokens); stops at ``eos`` or ``max_len``
    tokens. Returns each utterance's tokens without ``eos``."""
    prev = torch.full((batch, 1), bos, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_len):
        nxt = torch.where(done, eos, step(prev)[:, -1].argmax(-1))  # (B,)
        prev = torch.cat([prev, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return [row[1:][row[1:] != eos] for row in prev]


def greedy_prefix_rerun(imodel, net_input: dict, bos: int, eos: int, max_len: int) -> list[torch.Tensor]:
    """Greedy decoding of an integer S2T model (``IntegerS2TTransformerModel``): the declared
    float step on the features, the integer encoder once, then the integer decoder on the whole
    prefix at every step (logits codes, argmax). ``max_len`` is capped by the decoder's integer
    position table."""
    decoder = imodel.decoder
    max_len = min(max_len, decoder.positions.shape[0] - decoder.padding_idx - 2)
    with torch.no_grad():
        codes = imodel.encoder.quantize_input(net_input["src_tokens"])
        memory, padding = imodel.encoder.forward_codes(codes, net_input["src_lengths"])
        return greedy(lambda prev: decoder(prev, memory, padding), len(net_input["src_lengths"]), bos, eos, max_len)


def task_config(cfg) -> dict:
    """The fairseq task config of a loaded checkpoint's ``cfg`` as plain data (what an export
    records, so that decoding it again builds the task without the model)."""
    from omegaconf import OmegaConf

    from qswap.io.checkpoint import to_plain
    task = cfg.task
    if OmegaConf.is_config(task):
        task = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
    return to_plain(task, "task")


def dictionary_facts(dictionary) -> dict:
    """The target dictionary's special indices, size and a hash of its symbols."""
    symbols = "\n".join(dictionary.symbols).encode("utf-8")
    return {"bos": dictionary.bos(), "eos": dictionary.eos(), "pad": dictionary.pad(), "unk": dictionary.unk(),
            "size": len(dictionary), "symbols_sha256": hashlib.sha256(symbols).hexdigest()}


def exported_task(exported, data: str | Path):
    """fairseq's task from an export's recorded task config, reading ``data``; its target
    dictionary must be the one the model was exported with."""
    from omegaconf import OmegaConf

    from qswap.integration.data import resolve_audio_root
    from qswap.integration.fairseq_task import register_tasks
    from qswap.io.checkpoint import setup_task

    if exported.task is None or exported.decoding is None:
        raise LoadError(f"{exported.path}: records no fairseq task or target dictionary; export a fairseq "
                        f"checkpoint with 'qswap export QCKPT -o DIR' to decode it", kind="edited")
    if not Path(data).is_dir():
        raise DataError(f"data directory {data} does not exist; pass --data DIR with the config.yaml, "
                        f"dictionary and TSV manifests")
    register_tasks()
    task = setup_task(exported.path, OmegaConf.create({"task": {**exported.task, "data": str(Path(data).resolve())}}))
    if getattr(task, "data_cfg", None) is not None:
        resolve_audio_root(task.data_cfg)
    found = dictionary_facts(task.target_dictionary)
    if found != exported.decoding:
        raise DataError(f"the target dictionary in {data} ({found['size']} symbols) is not the one the model was "
                        f"exported with ({exported.decoding.get('size')} symbols, recorded in {exported.path}); "
                        f"pass the data directory of the model's training")
    return task


def decode_exported(task, exported, samples: Iterable[dict], *, max_len_b: int = 200,
                    progress: Callable[[int], None] | None = None) -> DecodeResult:
    """Decode ``samples`` with an exported integer S2T model (``greedy_prefix_rerun``)."""
    if not callable(getattr(exported.model, "encoder", None)) or not hasattr(exported.model, "decoder"):
        raise ExportError(f"{exported.path}: a {type(exported.model).__name__} has no integer decoding yet "
                          f"(only the S2T transformer's encoder-decoder)")
    eos = exported.decoding["eos"]
    return decode_with(task, lambda s: greedy_prefix_rerun(exported.model, s["net_input"], eos, eos, max_len_b),
                       samples, progress)
