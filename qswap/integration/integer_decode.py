"""What an exported integer model records to decode again, and decoding it.

The integer S2T models (transformer, conformer) are fairseq encoder-decoder models (incremental
decoding on integer caches), so ``decode_exported`` runs fairseq's own SequenceGenerator on them,
the same beam search as ``qswap eval --integer``; the integer wav2vec 2.0 CTC model returns
fairseq's ``encoder_out`` logits, decoded with greedy CTC as ``qswap eval --integer`` decodes it.
``decode_exported`` is what ``qswap eval EXPORT_DIR`` runs.

>>> task = exported_task(load_integer_model(out), "data/")
>>> result = decode_exported(task, load_integer_model(out), fdata.batches(task, "test"), beam=5)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from qswap.errors import DataError, ExportError, LoadError
from qswap.integration.decode import DecodeResult, decode
from qswap.io.dictionary import check

BEAM_SEARCH, GREEDY_CTC = "beam search", "greedy CTC"


def task_config(cfg) -> dict:
    """The fairseq task config of a loaded checkpoint's ``cfg`` as plain data (what an export
    records, so that decoding it again builds the task without the model)."""
    from omegaconf import OmegaConf

    from qswap.io.checkpoint import to_plain
    task = cfg.task
    if OmegaConf.is_config(task):
        task = OmegaConf.to_container(task, resolve=True, enum_to_str=True)
    return to_plain(task, "task")


def exported_task(exported, data: str | Path):
    """fairseq's task from an export's recorded task config, reading ``data``; its target
    dictionary must be the one the model was exported with."""
    from omegaconf import OmegaConf

    from qswap.integration.data import check_data_dir, resolve_data_paths
    from qswap.integration.fairseq_task import register_tasks
    from qswap.io.checkpoint import setup_task

    if exported.task is None or not exported.decoding:  # {} too: an edit that would skip the dictionary check
        raise LoadError(f"{exported.path}: records no fairseq task or target dictionary; export a fairseq "
                        f"checkpoint with 'qswap export QCKPT -o DIR' to decode it", kind="edited")
    check_data_dir(data, "the config.yaml, dictionary and TSV manifests")
    register_tasks()
    task = setup_task(exported.path, OmegaConf.create({"task": {**exported.task, "data": str(Path(data).resolve())}}))
    if getattr(task, "data_cfg", None) is not None:
        resolve_data_paths(task.data_cfg)
    try:
        dictionary = task.target_dictionary  # some tasks (audio_finetuning) read it only now
    except Exception as e:  # fairseq reads the data directory's dictionary: no typed errors
        raise DataError(f"cannot read the target dictionary of task {exported.task.get('_name')!r} in {data} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); pass the data directory of the "
                        f"model's training") from None
    check(exported.decoding, dictionary, str(exported.path), made="exported with",
          advice=f"pass the data directory of the model's training, not {data}")
    return task


def decoding_method(exported) -> str:
    """How an exported integer model decodes: ``BEAM_SEARCH`` (an encoder-decoder model) or
    ``GREEDY_CTC`` (the integer wav2vec 2.0 CTC model); ExportError for any other model."""
    from qswap.nn.fairseq.models import IntegerWav2VecCtc

    if isinstance(exported.model, IntegerWav2VecCtc):
        return GREEDY_CTC
    if callable(getattr(exported.model, "encoder", None)) and hasattr(exported.model, "decoder"):
        return BEAM_SEARCH
    raise ExportError(f"{exported.path}: a {type(exported.model).__name__} has no integer decoding yet "
                      f"(only the S2T encoder-decoder models and wav2vec 2.0 CTC)")


def decode_exported(task, exported, samples: Iterable[dict], *, beam: int = 5, max_len_b: int = 200,
                    progress: Callable[[int], None] | None = None) -> DecodeResult:
    """Decode ``samples`` with an exported integer model: fairseq's SequenceGenerator (``beam``)
    for an S2T model, greedy CTC for wav2vec 2.0 (``decoding_method``)."""
    decoding_method(exported)  # refuses a model without a decoding
    return decode(task, exported.model, samples, beam=beam, max_len_b=max_len_b, progress=progress)
