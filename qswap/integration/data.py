"""fairseq checkpoints, data directories and batches for qswap's commands."""
from __future__ import annotations

import contextlib
import itertools
import os
import re
from pathlib import Path
from typing import Any, Iterator

from qswap.errors import DataError, DependencyError
from qswap.integration.audio_rows import with_own_fbank


def load_model_and_task(checkpoint: str | Path, data: str | Path | None = None, *,
                        trust_checkpoint: bool = False):
    """(model in eval mode, task) from a fairseq or qswap checkpoint, data dir overridden."""
    model, _cfg, task = load_model_cfg_task(checkpoint, data, trust_checkpoint=trust_checkpoint)
    return model, task


def load_model_cfg_task(checkpoint: str | Path, data: str | Path | None = None, *,
                        trust_checkpoint: bool = False) -> tuple[Any, Any, Any]:
    """(model in eval mode, cfg, task): the one way qswap's commands load a checkpoint.

    Registers qswap's plugin tasks (a QAT checkpoint names ``speech_to_text_qswap``), points the
    task at ``data`` when given, and reads manifest paths relative to the data directory."""
    from qswap.integration.fairseq_task import register_tasks
    from qswap.io.checkpoint import load_fairseq_model

    register_tasks()  # checkpoints trained or converted with the plugin name qswap's own tasks

    if data is not None:
        check_data_dir(data, "the config.yaml and TSV manifests the model was trained with")
    overrides = {"data": str(Path(data).resolve())} if data is not None else None
    model, cfg, task = load_fairseq_model(str(checkpoint), trust_checkpoint=trust_checkpoint,
                                          arg_overrides=overrides)
    if getattr(task, "data_cfg", None) is not None:
        resolve_data_paths(task.data_cfg)
    return model.eval(), cfg, task


def check_data_dir(data: str | Path, contents: str) -> None:
    """A DataError unless ``data`` is a directory: one that says it does not exist, or that it is a
    file (--data config.yaml had been told it "does not exist"), naming what the directory holds
    (``contents``)."""
    path = Path(data)
    if path.is_dir():
        return
    if not path.exists():
        raise DataError(f"data directory {data} does not exist; pass --data DIR with {contents}")
    kind = "a file" if path.is_file() else "not a directory"
    parent = path.resolve().parent
    holds_config = (parent / "config.yaml").is_file()
    hint = f" (its directory {parent} holds a config.yaml: --data {parent}?)" if holds_config else ""
    raise DataError(f"--data {data} is {kind}, not a data directory; pass --data DIR, the directory with "
                    f"{contents}{hint}")


def resolve_data_paths(data_cfg) -> None:
    """Manifest paths without an ``audio_root`` are relative to the data directory (so a data
    directory can move, and the shipped model's works from any directory), not to the working
    directory as plain fairseq 0.12 reads them; so is a relative ``global_cmvn.stats_npz_path``
    that names a file there (fairseq's GlobalCMVN opens it relative to the working directory: run
    from elsewhere, the subset had been reported missing)."""
    if not data_cfg.config.get("audio_root"):
        data_cfg.config["audio_root"] = str(data_cfg.root)
    cmvn = data_cfg.config.get("global_cmvn")
    stats = cmvn.get("stats_npz_path") if isinstance(cmvn, dict) else None
    if isinstance(stats, str) and not Path(stats).is_absolute() and (Path(data_cfg.root) / stats).is_file():
        cmvn["stats_npz_path"] = str(Path(data_cfg.root) / stats)


def check_cmvn_stats(data_cfg, split: str) -> None:
    """A DataError naming config.yaml's ``global_cmvn.stats_npz_path`` where the global CMVN stats it
    names, read for ``split`` (a transform list of the split names ``global_cmvn``), do not load,
    lack ``mean`` / ``std``, do not broadcast to one value per feature channel, or hold a
    non-finite value or a std of 0 (dividing by it): each had been blamed on the manifest or on
    every utterance."""
    cmvn = data_cfg.config.get("global_cmvn") if data_cfg is not None else None
    stats_path = cmvn.get("stats_npz_path") if isinstance(cmvn, dict) else None
    loaded, applied = _uses_global_cmvn(data_cfg, split) if stats_path else (False, False)
    if not loaded:
        return
    import numpy as np

    where = f"the global CMVN stats {stats_path} (config.yaml: global_cmvn: stats_npz_path)"
    if not Path(stats_path).is_file():
        raise DataError(f"{where} not found; put the .npz there (with arrays mean and std) or correct the path "
                        f"(a relative one is read from the data directory)")
    try:
        with np.load(stats_path) as stats:
            absent = [name for name in ("mean", "std") if name not in stats.files]
            if absent:
                raise DataError(f"{where} hold no array {' or '.join(absent)} (they hold {', '.join(stats.files) or 'none'}); "
                                f"the .npz needs arrays named mean and std")
            mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    except (OSError, ValueError, EOFError, AttributeError, TypeError) as exc:  # not an .npz (np.load of a .npy: an array)
        raise DataError(f"{where} do not load ({type(exc).__name__}: {exc}); write them again with "
                        f"numpy.savez(path, mean=..., std=...)") from None
    if not applied:  # loaded by fairseq for a train* split's training transforms, which qswap does not apply
        return
    channels = getattr(data_cfg, "input_feat_per_channel", None)
    for name, value in (("mean", mean), ("std", std)):
        if channels is not None and not _broadcasts(value.shape, channels):
            raise DataError(f"{where}: {name} has shape {value.shape}, the features have {channels} channels "
                            f"(config.yaml: input_feat_per_channel); use stats of these features")
        if not np.isfinite(value).all():
            raise DataError(f"{where}: {name} holds NaN or inf; compute the stats again")
    if (std == 0).any():
        raise DataError(f"{where}: std is 0 in {int((std == 0).sum())} channel(s), which the features are divided "
                        f"by; compute the stats again (a constant channel gets std 1)")


def _broadcasts(shape: tuple, channels: int) -> bool:
    """Whether stats of ``shape`` broadcast onto (frames, ``channels``) features as fairseq applies
    them, one value per channel or one for all: (C,), (1, C), (), (1,)."""
    return all(n == 1 for n in shape[:-1]) and (not shape or shape[-1] in (1, channels))


def _uses_global_cmvn(data_cfg, split: str) -> tuple[bool, bool]:
    """(whether fairseq loads the stats file when it loads ``split``, whether the features qswap
    reads are normalized by them): a feature transform list of the split names global_cmvn; fairseq
    builds a ``train*`` split's training list, qswap then reads every split with the evaluation one
    (``without_training_augmentation``)."""
    def named(is_train: bool) -> bool:
        lists = []
        for kind in ("", "feature_"):
            try:
                lists.append(data_cfg.get_transforms(kind, split, is_train) or [])
            except (AttributeError, TypeError):  # a config without transforms
                continue
        return any(isinstance(names, list) and "global_cmvn" in names for names in lists)

    applied = named(False)
    return applied or (split.startswith("train") and named(True)), applied


def load_subset(task, subset: str) -> Any:
    first = subset not in task.datasets  # read once per task: its checks run once too
    if first:
        check_tokenizer(task)
        check_cmvn_stats(getattr(task, "data_cfg", None), subset)
        if _raw_audio_task(task):
            check_raw_audio_manifest(task, subset)
    try:
        if subset not in task.datasets:
            task.load_dataset(subset)
    except FileNotFoundError as exc:
        manifest = f"{subset}.tsv"
        if exc.filename is not None and Path(str(exc.filename)).name != manifest:
            raise DataError(f"subset {subset!r}: {exc.filename} not found ({exc.strerror}); the data directory's "
                            f"config.yaml or {manifest} names it") from None
        raise DataError(f"subset {subset!r} not found: {exc}; the data directory needs {manifest}") from None
    except (ValueError, KeyError, OSError, TypeError, AssertionError) as exc:  # fairseq's TSV readers: no
        # typed errors (a line cut short leaves fields None; the raw audio reader asserts)
        manifest = _manifest(task, subset)
        if manifest is not None and manifest.read_bytes()[:3] == b"\xef\xbb\xbf":  # its header reads "\ufeffid"
            raise DataError(f"subset {subset!r}: {manifest} starts with a UTF-8 byte-order mark, so its first column "
                            f"is not read as 'id'; save it as UTF-8 without a BOM") from None
        where = _first_bad_row(manifest) if manifest is not None and not _raw_audio_task(task) else ""
        raise DataError(f"subset {subset!r}: malformed manifest {subset}.tsv ({where or f'{type(exc).__name__}: {exc}'}); "
                        f"{_manifest_format(task)}") from None
    dataset = task.dataset(subset)
    if len(dataset) == 0:
        raise DataError(f"subset {subset!r} is empty")
    with_own_fbank(dataset)  # audio rows where fairseq's get_fbank has no backend (no torchaudio)
    if first:
        try:
            _check_audio_files(dataset, subset)
        except DataError:
            task.datasets.pop(subset, None)  # not kept: the next read is checked again
            raise
    without_training_augmentation(dataset, getattr(task, "data_cfg", None))
    return dataset


S2T_COLUMNS = ("id", "audio", "n_frames", "tgt_text")  # what fairseq's speech_to_text reader needs of a row


def _first_bad_row(manifest: Path) -> str:
    """Where a speech_to_text manifest, read as fairseq reads it (``csv.DictReader``, tabs, no
    quoting), first lacks a column it needs or gives a row a blank value in one: "line N: ..."; ""
    when none does (the error is elsewhere)."""
    import csv

    try:
        with open(manifest, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n",
                                    quoting=csv.QUOTE_NONE)
            missing = [c for c in S2T_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                return f"its header lacks {', '.join(missing)}"
            for row in reader:
                blank = [c for c in S2T_COLUMNS if c != "tgt_text" and not (row.get(c) or "").strip()]
                if blank:
                    return f"line {reader.line_num}: no {', '.join(blank)} (a blank or cut-short line?)"
                if not (row.get("n_frames") or "").strip().isdigit():
                    return f"line {reader.line_num}: n_frames is {row.get('n_frames')!r}, not a whole number"
    except (OSError, UnicodeDecodeError, csv.Error):
        return ""
    return ""


def _raw_audio_task(task) -> bool:
    """Whether ``task`` reads waveforms from a wav2vec 2.0 manifest (fairseq's audio_pretraining
    and audio_finetuning), not a speech_to_text TSV."""
    from fairseq.tasks.audio_pretraining import AudioPretrainingTask

    return isinstance(task, AudioPretrainingTask)


def _manifest_format(task) -> str:
    """What a manifest of ``task``'s kind holds, for an error message."""
    if _raw_audio_task(task):
        return ("a wav2vec 2.0 manifest's first line is the audio root, then one '<path>\\t<number of samples>' "
                "per line (no blank line), and its label file one transcript per audio line")
    return "it needs a header with id, audio, n_frames and tgt_text and one utterance per line"


def check_raw_audio_manifest(task, subset: str) -> None:
    """A DataError naming the line of a wav2vec 2.0 manifest (``SUBSET.tsv``: the audio root, then
    ``<path>\\t<samples>`` per line) that fairseq's reader would meet with a bare AssertionError: a
    blank line (a trailing one included), a line without two tab-separated fields, a sample count
    that is not a whole number; and a label file (``SUBSET.<labels>``) with another number of lines
    than the manifest has audio lines."""
    manifest = _manifest(task, subset)
    if manifest is None:
        return  # fairseq says the subset is missing
    try:
        lines = manifest.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"subset {subset!r}: {manifest} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                        f"save it as UTF-8") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines or "\t" in lines[0]:  # a blank root is fairseq's too: the paths below are then absolute
        raise DataError(f"subset {subset!r}: {manifest} has no audio root on its first line"
                        f"{' (it reads as an audio line)' if lines else ''}; {_manifest_format(task)}")
    for number, line in enumerate(lines[1:], start=2):
        fields = line.strip().split("\t")  # as fairseq reads it
        problem = ("is blank" if not line.strip() else
                   f"has {len(fields)} tab-separated field(s), not 2" if len(fields) != 2 else
                   f"gives {fields[1]!r} samples, not a whole number" if not _int_like(fields[1]) else "")
        if problem:
            raise DataError(f"subset {subset!r}: {manifest} line {number} {problem}; {_manifest_format(task)}")
    labels = getattr(task.cfg, "labels", None)
    label_file = manifest.with_suffix(f".{labels}") if labels else None
    if label_file is not None and label_file.is_file():
        count = len(label_file.read_bytes().splitlines())
        if count != len(lines) - 1:
            raise DataError(f"subset {subset!r}: {label_file.name} has {count} line(s), {manifest.name} "
                            f"{len(lines) - 1} audio line(s); give one transcript per audio line, in order")


def _int_like(text: str) -> bool:
    """Whether fairseq's ``int()`` reads ``text`` ("+16000", "16_000" too)."""
    try:
        int(text)
    except ValueError:
        return False
    return True


def _manifest(task, subset: str) -> Path | None:
    """The manifest file fairseq reads for ``subset`` (DATA/SUBSET.tsv), where it exists."""
    root = getattr(getattr(task, "cfg", None), "data", None) or getattr(getattr(task, "args", None), "data", None)
    path = Path(str(root)) / f"{subset}.tsv" if root else None
    return path if path is not None and path.is_file() else None


def _check_audio_files(dataset, subset: str) -> None:
    """A wav2vec 2.0 manifest's audio files (fairseq's ``FileAudioDataset``, inside its target
    wrapper) that do not exist: a DataError naming the first, before fairseq's reader retries each
    for seconds and raises a plain Exception; and a PCM WAV file cut short (its header declares more
    frames than it holds), which fairseq's reader (soundfile) reads as the shorter file with no word:
    a DataError naming it. (A zip entry is not read here: its bytes are the utterance's.)"""
    while not hasattr(dataset, "fnames") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    names, root = getattr(dataset, "fnames", None), getattr(dataset, "root_dir", None)
    if names is None or root is None or not hasattr(dataset, "text_compressor"):
        return
    from fairseq.data.audio.audio_utils import parse_path

    missing = []
    for name in names:
        name = name if isinstance(names, list) else name.as_py()  # as fairseq's reader: a list or a pyarrow array
        entry = os.path.join(root, dataset.text_compressor.decompress(name))
        try:
            path = parse_path(entry)[0]  # a zip's member: the zip
        except AssertionError:
            raise DataError(f"subset {subset!r}: manifest entry {entry} is neither a file nor a zip entry "
                            f"'<zip>:<byte offset>:<byte length>'; write the manifest again") from None
        if not os.path.isfile(path):
            missing.append(path)
        elif path == entry and not missing:
            _check_not_cut_short(path, subset)
    if missing:
        raise DataError(f"subset {subset!r}: {len(missing)} audio file(s) of its manifest do not exist, the "
                        f"first {missing[0]}; check the manifest's first line (the audio root) and its paths")


def _check_not_cut_short(path: str, subset: str) -> None:
    """A DataError where the PCM WAV at ``path`` holds fewer frames than its header declares
    (``audio_rows.declared_frames``: None for other formats and streamed headers)."""
    from qswap.integration.audio_rows import declared_frames

    try:
        import soundfile
    except ImportError:
        return  # fairseq's reader needs it too, and says so
    declared = declared_frames(path)
    if declared is None:
        return
    try:
        held = soundfile.info(path).frames
    except (RuntimeError, OSError, ValueError):
        return  # unreadable: the read says so (DataError, "cannot read an utterance")
    if held < declared:
        raise DataError(f"subset {subset!r}: audio file {path} is cut short: its header declares {declared} "
                        f"frames and it holds {held}; copy or export the file again")


def check_tokenizer(task) -> None:
    """A DataError naming the file where the SentencePiece model that the data directory's
    config.yaml names (``bpe_tokenizer.sentencepiece_model``) is missing or does not load; fairseq
    would fail while reading a manifest, with sentencepiece's untyped error."""
    cfg = getattr(task, "data_cfg", None)
    tokenizer = getattr(cfg, "bpe_tokenizer", None) if cfg is not None else None
    if not isinstance(tokenizer, dict) or tokenizer.get("bpe") != "sentencepiece":
        return
    path = Path(str(tokenizer.get("sentencepiece_model", "")))
    where = "the data directory's config.yaml (bpe_tokenizer: sentencepiece_model)"
    if not path.is_file():
        raise DataError(f"SentencePiece model {path} not found: {where} names it; put the model there or "
                        f"correct the path")
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        from qswap.io.safe_load import first_line

        raise DataError(f"SentencePiece model {path} does not load ({first_line(exc)}): a truncated or "
                        f"corrupt file? {where} names it; copy it again") from None


def without_training_augmentation(dataset, data_cfg) -> None:
    """Read a speech_to_text subset as evaluation data.

    fairseq gives every split whose name starts with ``train`` the config's ``_train``
    transforms (SpecAugment: random time and frequency masks) and shuffling. qswap calibrates,
    evaluates and probes on such subsets too (a calibration subset of the training data), and
    must see the features inference sees, the same ones on every run: the ``_eval`` / ``*``
    transforms, in manifest order.
    """
    if data_cfg is None or not getattr(dataset, "is_train_split", False):
        return
    from fairseq.data.audio.feature_transforms import CompositeAudioFeatureTransform
    from fairseq.data.audio.waveform_transforms import CompositeAudioWaveformTransform

    if hasattr(dataset, "feature_transforms"):
        dataset.feature_transforms = CompositeAudioFeatureTransform.from_config_dict(
            data_cfg.get_feature_transforms(dataset.split, False))
    if hasattr(dataset, "waveform_transforms"):
        dataset.waveform_transforms = CompositeAudioWaveformTransform.from_config_dict(
            data_cfg.get_waveform_transforms(dataset.split, False))
    dataset.shuffle = False


MAX_FRAMES = 40000  # a batch's fbank frames (speech_to_text: 400 s)
MAX_SAMPLES = 1_600_000  # a batch's waveform samples (wav2vec 2.0: 100 s at 16 kHz), or the longest utterance's


def batches(task, subset: str, *, max_tokens: int | None = None, max_sentences: int | None = 32,
            num_shards: int = 1, shard_id: int = 0) -> Iterator[dict]:
    """fairseq samples (dicts with ``net_input``, ``target``, ``id``) of a subset, in order, batched
    as asked on every call: fairseq's task keeps one batch iterator per dataset and would hand the
    first call's batches (its sizes, its shard) to every later one, so none is kept. ``max_tokens``
    (default: by the input's kind, ``max_tokens_for``) bounds a batch's frames or samples."""
    if not 0 <= shard_id < num_shards:
        raise DataError(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    itr = _batch_iterator(task, subset, max_tokens, max_sentences, num_shards, shard_id)
    with _reading(subset):
        for sample in itr.next_epoch_itr(shuffle=False):
            if sample:  # fairseq pads shards with empty batches
                _check_inputs(sample, subset)
                yield sample


def batch_count(task, subset: str, *, max_tokens: int | None = None, max_sentences: int | None = 32) -> int:
    """How many batches ``batches(task, subset, ...)`` yields, from the manifest's frame counts
    (no features read)."""
    return len(_batch_iterator(task, subset, max_tokens, max_sentences, 1, 0))


def max_tokens_for(task, dataset) -> int:
    """A batch's bound of input units when none is asked for: ``MAX_FRAMES`` fbank frames for
    speech_to_text; for waveforms (wav2vec 2.0, whose sizes are samples) ``MAX_SAMPLES`` or the
    longest utterance's samples, so that any utterance gets a batch (40,000 samples, 2.5 s, had
    refused ordinary utterances with fairseq's AssertionError)."""
    if not _raw_audio_task(task):
        return MAX_FRAMES
    sizes = getattr(dataset, "sizes", None)
    return max(MAX_SAMPLES, int(max(sizes)) if sizes is not None and len(sizes) else 0)


def _batch_iterator(task, subset: str, max_tokens: int | None, max_sentences: int | None, num_shards: int,
                    shard_id: int):
    dataset = load_subset(task, subset)
    max_tokens = max_tokens_for(task, dataset) if max_tokens is None else max_tokens
    try:
        itr = task.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, max_sentences=max_sentences,
                                      max_positions=None, ignore_invalid_inputs=False,
                                      num_shards=num_shards, shard_id=shard_id, num_workers=0, seed=1,
                                      disable_iterator_cache=True)
        itr.frozen_batches  # noqa: B018  (batched here: audio tasks batch lazily, at the first read)
        return itr
    except AssertionError as exc:  # fairseq's batching asserts every utterance fits max_tokens
        column = "sample count (second column)" if _raw_audio_task(task) else "n_frames"
        raise DataError(f"subset {subset!r}: {exc}: an utterance's {column} in {subset}.tsv is larger than a "
                        f"batch may hold ({max_tokens}); check the manifest's {column}") from None


def _check_inputs(sample: dict, subset: str) -> None:
    """A DataError naming the utterances whose input features (or waveform) hold NaN or inf, or
    none at all (0 frames or samples): a model would turn them into a transcript, a calibration
    range or an audit finding about the model (or fairseq's beam search into an AssertionError,
    ``200 < 200``), none of which is about the data at fault."""
    import torch

    from qswap.honesty.paths import FEATURE_KEYS

    net_input = sample["net_input"]
    for key in FEATURE_KEYS:
        x = net_input.get(key)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
            if bool(bad.any()):
                raise DataError(f"subset {subset!r}: utterance(s) {_ids(sample, bad)} (their manifest row indices) "
                                f"have NaN or inf input values; recompute or drop them from {subset}.tsv")
            empty = _empty_rows(net_input, x)
            if bool(empty.any()):
                raise DataError(f"subset {subset!r}: utterance(s) {_ids(sample, empty)} (their manifest row indices) "
                                f"have no input frames (an empty audio file, or audio shorter than one 25 ms frame, has none); "
                                f"recompute or drop them from {subset}.tsv")


def _empty_rows(net_input: dict, x):
    """Which rows of input ``x`` (batch first) hold no frame: an axis of size 0, a length of 0
    (``src_lengths``), or a padding mask that pads the whole row (wav2vec 2.0's)."""
    import torch

    if x.dim() > 1 and x.shape[1] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool)
    lengths = net_input.get("src_lengths")
    if isinstance(lengths, torch.Tensor) and lengths.shape == x.shape[:1]:
        return lengths == 0
    mask = net_input.get("padding_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == x.shape[0]:
        return mask.all(dim=1)
    return torch.zeros(x.shape[0], dtype=torch.bool)


def _ids(sample: dict, rows) -> str:
    ids = [int(i) for i in sample["id"][rows]]
    return ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")


def net_inputs(task, subset: str, count: int | None = None, **kwargs) -> Iterator[dict]:
    """The ``net_input`` dicts of the first ``count`` batches (all when None)."""
    return (s["net_input"] for s in itertools.islice(batches(task, subset, **kwargs), count))


def transform_data(recipe, task, subset: str, count: int | None, **kwargs) -> list[dict] | None:
    """The calibration batches, as a list, when the recipe's transforms need activation statistics
    (``qswap.convert(..., data=)``: smoothquant); None otherwise."""
    from qswap.recipe import load_recipe
    from qswap.transforms import needs_data

    return list(net_inputs(task, subset, count, **kwargs)) if needs_data(load_recipe(recipe).transforms) else None


def first_net_input(task, subset: str, count: int = 2) -> dict:
    """A small batch of the first ``count`` utterances of a subset (for the audit)."""
    dataset = load_subset(task, subset)
    with _reading(subset):
        sample = dataset.collater([dataset[i] for i in range(min(count, len(dataset)))])
    _check_inputs(sample, subset)
    return sample["net_input"]


def single_utterances(task, subset: str, count: int) -> list[dict]:
    """The first ``count`` utterances of a subset (manifest order), each a fairseq sample of its own:
    no padding, and the same utterances whatever the batching."""
    dataset = load_subset(task, subset)
    with _reading(subset):
        samples = [dataset.collater([dataset[i]]) for i in range(min(count, len(dataset)))]
    for sample in samples:
        _check_inputs(sample, subset)
    return samples


@contextlib.contextmanager
def _reading(subset: str) -> Iterator[None]:
    """A manifest line whose audio or features cannot be read is a DataError naming the subset."""
    import zipfile

    try:
        yield
    except ImportError as exc:  # fairseq reads waveforms with torchaudio and soundfile, either may be missing
        module = exc.name or next((m for m in ("torchaudio", "soundfile") if m in str(exc)), "a module")
        raise DependencyError(f"subset {subset!r}: reading its audio needs {module} ({exc}); install a {module} "
                              f"that matches this torch, or give the subset fbank features (a feature zip, as "
                              f"tools/make_corpus.py writes)") from None
    except DataError:
        raise
    except AssertionError as exc:  # fairseq's readers assert on a zip pointer (parse_path) and on the bytes it
        # points at (the raw audio reader's is_sf_audio_data)
        text = str(exc)
        if text.startswith("Invalid path"):
            raise DataError(f"subset {subset!r}: {text}: a manifest row's zip entry is "
                            f"'<zip>:<byte offset>:<byte length>'; write the manifest again with its zip") from None
        raise DataError(f"subset {subset!r}: cannot read an utterance (AssertionError{': ' + text if text else ''}: "
                        f"the bytes a manifest row points at are not WAV/FLAC audio or .npy features?); check "
                        f"the manifest's offsets against its zip, or write both again") from None
    except (OSError, ValueError, IndexError, TypeError, RuntimeError, zipfile.BadZipFile) as exc:  # fairseq's
        # readers: a truncated feature zip reads past its end (IndexError), a manifest line cut short
        # leaves None, a missing or unreadable wav is soundfile's LibsndfileError (a RuntimeError)
        if _torchaudio_broken(exc):
            raise DependencyError(f"subset {subset!r}: torchaudio, which reads its audio, does not load "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); install a torchaudio "
                                  f"built for this torch, or give the subset fbank features") from None
        raise DataError(f"subset {subset!r}: cannot read an utterance ({type(exc).__name__}: "
                        f"{exc}); check the audio paths in {subset}.tsv and audio_root, and that the "
                        f"feature or audio files are complete") from None
    except Exception as exc:  # noqa: BLE001  fairseq's raw audio reader raises plain Exceptions
        if type(exc) is not Exception:
            raise
        rate = re.fullmatch(r"sample rate: (\d+), need (\d+)", str(exc))
        if rate:
            have, need = rate.groups()
            raise DataError(f"subset {subset!r}: an utterance's audio is sampled at {have} Hz and the task reads "
                            f"{need} Hz; resample it (sox in.wav -r {need} out.wav) or set the task's "
                            f"sample_rate") from None
        raise DataError(f"subset {subset!r}: cannot read an utterance ({exc}); check the audio paths in the "
                        f"manifest and that the audio files are complete WAV/FLAC files") from None


def _torchaudio_broken(exc: BaseException) -> bool:
    """Whether ``exc`` is torchaudio failing to load (its native library next to another torch),
    not the data: raised from inside torchaudio's own import."""
    tb = exc.__traceback__
    while tb is not None:
        if "torchaudio" in tb.tb_frame.f_code.co_filename and "__init__" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return "torchaudio" in str(exc) and isinstance(exc, OSError)


def audio_seconds(sample: dict, frame_shift_s: float = 0.01, sample_rate: int = 16000) -> float:
    """Seconds of audio in a batch: fbank frames (10 ms shift) or raw waveform samples."""
    ni = sample["net_input"]
    if "src_lengths" in ni:
        return float(ni["src_lengths"].sum()) * frame_shift_s
    if "padding_mask" in ni and ni["padding_mask"] is not None:
        return float((~ni["padding_mask"]).sum()) / sample_rate
    return float(ni["source"].numel()) / sample_rate
