"""Speech-to-text rows that hold audio, turned into features where fairseq's own reader cannot.

A speech_to_text manifest row may name a WAV/FLAC file (or one stored in a zip) instead of
fbank features; fairseq then computes the features with pyKaldi or torchaudio
(``fairseq.data.audio.audio_utils.get_fbank``). Where neither imports (PyPI's torchaudio is a
CUDA build that fails next to the CPU torch), qswap computes the same Kaldi filterbank with
``kaldi_native_fbank`` (:func:`qswap.features.fbank`: 80 bins, 25 ms povey window, 10 ms
shift, pre-emphasis 0.97, DC removal, no dither, ``snip_edges``), the options fairseq's
torchaudio call takes by default. Feature rows (.npy, features in a zip) and wav2vec-style
waveform input (``use_audio_input``) are read by fairseq as before.

The fallback is set on one dataset object (its ``_get_source_audio``), by
:func:`with_own_fbank`; nothing global changes.
"""
from __future__ import annotations

import importlib.util
import io
import types
from pathlib import Path

import numpy as np

from qswap.errors import AudioError

__all__ = ["needs_own_fbank", "with_own_fbank"]


def needs_own_fbank() -> bool:
    """Whether fairseq's ``get_fbank`` has no backend here: neither pyKaldi nor torchaudio imports."""
    from qswap.features import fbank_backend

    return fbank_backend() == "kaldi_native_fbank" and importlib.util.find_spec("kaldi") is None


def with_own_fbank(dataset) -> bool:
    """Give a speech_to_text dataset qswap's fbank for its audio rows where fairseq has none.

    Returns whether it did: a ``SpeechToTextDataset`` (or subclass) reading features (not
    waveforms), on a machine where :func:`needs_own_fbank`. Applied once; a second call is a
    no-op."""
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDataset

    if (not isinstance(dataset, SpeechToTextDataset) or getattr(dataset.cfg, "use_audio_input", False)
            or not callable(getattr(type(dataset), "_get_source_audio", None))):  # fairseq 0.12.2 reads rows elsewhere
        return False
    if "_get_source_audio" in vars(dataset):
        return True
    if not needs_own_fbank():
        return False
    dataset._get_source_audio = types.MethodType(_source_features, dataset)
    return True


def _fairseq_features(path: str, waveform_transforms):
    """fairseq's reader of a feature row (waveform transforms passed only where set: fairseq 0.12.2's
    reader takes none)."""
    from fairseq.data.audio import audio_utils as au

    extra = {} if waveform_transforms is None else {"waveform_transforms": waveform_transforms}
    return au.get_features_or_waveform(path, **extra)


def _source_features(self, index):
    """fairseq's ``SpeechToTextDataset._get_source_audio`` for feature input (one index, or
    ConcatAugment's list of indices), its audio rows read by :func:`row_features`."""
    import torch

    indices = [index] if np.ndim(index) == 0 else list(index)
    if not any(is_audio_row(self.audio_paths[i]) for i in indices):  # feature rows: fairseq's own reading
        return type(self)._get_source_audio(self, index)
    # the rate the data's config.yaml names (``use_sample_rate``); without one fairseq computes each
    # row's fbank at the row's own rate (a model trained on 8 kHz rows reads 8 kHz rows), and so does qswap
    config = getattr(getattr(self, "cfg", None), "config", None)
    rate = config.get("use_sample_rate") if isinstance(config, dict) else None
    parts = [row_features(self.audio_paths[i], getattr(self, "waveform_transforms", None), rate) for i in indices]
    source = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if self.feature_transforms is not None:
        source = self.feature_transforms(source)
    return torch.from_numpy(source).float()


def is_audio_row(path: str) -> bool:
    """Whether a manifest ``audio`` entry may hold audio: a WAV/FLAC file (by its suffix) or any zip
    entry ``<zip>:<offset>:<length>`` (its bytes are told apart when read: ``row_features`` reads a
    feature zip's .npy entry once, as fairseq does); a plain ``.npy`` row is not."""
    from fairseq.data.audio import audio_utils as au

    file, pointer = au.parse_path(path)
    return bool(pointer) or _audio_file(file)


def _audio_file(file: str) -> bool:
    """A file soundfile reads as audio, by its suffix (fairseq's own list: .wav, .flac, .ogg)."""
    from fairseq.data.audio import audio_utils as au

    return Path(file).suffix in au.SF_AUDIO_FILE_EXTENSIONS


def declared_frames(source) -> int | None:
    """The frames a PCM WAV's header declares (soundfile reads a file cut short as the shorter file,
    with no word), or None: not a PCM WAV Python's ``wave`` reads (FLAC, float), or a streamed header
    whose size is a placeholder (``qswap.features.streamed_size``)."""
    import wave

    from qswap.features import streamed_size

    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with wave.open(source, "rb") as w:
            frames, frame_bytes = w.getnframes(), w.getnchannels() * w.getsampwidth()
    except (wave.Error, EOFError, OSError, ValueError):
        return None
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    return None if streamed_size(frames * frame_bytes, frame_bytes) else frames


def row_features(path: str, waveform_transforms=None, sample_rate: int | None = None) -> np.ndarray:
    """The (T, 80) features of one manifest ``audio`` entry: fairseq's reader for features, qswap's
    fbank of the 16-bit-scale waveform (after ``waveform_transforms``, as fairseq applies them)
    for audio. ``sample_rate``: the rate the data's config.yaml names (``use_sample_rate``), or
    None (fairseq's reading: each row at its own rate); audio at another rate than the named one is
    an AudioError (its filterbank would span other frequencies: features the model never saw,
    decoded without a word)."""
    from fairseq.data.audio import audio_utils as au

    from qswap.features import fbank

    file, pointer = au.parse_path(path)
    if len(pointer) == 2:
        data = au.read_from_stored_zip(file, pointer[0], pointer[1])
        if au.is_npy_data(data):  # a feature zip's row: read once, as fairseq reads it
            return np.load(io.BytesIO(data))
        if not au.is_sf_audio_data(data):
            return _fairseq_features(path, waveform_transforms)
        source = io.BytesIO(data)
    elif not pointer and _audio_file(file):
        source = file
    else:
        return _fairseq_features(path, waveform_transforms)
    import soundfile

    # fairseq's get_waveform as get_fbank calls it (which imports torchaudio even when it has no
    # effect to apply): float32 samples, channels mixed to mono by their mean (sox's "channels 1"),
    # to the 16-bit integer scale, then the waveform transforms
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    declared = declared_frames(source)
    if declared is not None and samples.shape[0] < declared:
        raise AudioError(f"manifest audio {path}: truncated: its header declares {declared} frames and it holds "
                         f"{samples.shape[0]}; copy or export the file again (a zip entry: write the zip again)")
    waveform = samples.T.mean(axis=0, keepdims=True) if samples.shape[1] > 1 else samples.T
    waveform = waveform * np.float32(2 ** 15)
    if waveform_transforms is not None:
        waveform, rate = waveform_transforms(waveform, rate)
    if sample_rate is not None and int(rate) != int(sample_rate):
        raise AudioError(f"manifest audio {path} is sampled at {int(rate)} Hz and the data's config reads "
                         f"{int(sample_rate)} Hz (config.yaml: use_sample_rate); resample it "
                         f"(sox in.wav -r {int(sample_rate)} out.wav)")
    try:  # fbank scales [-1, 1] by 2^15 itself (exact: a power of two)
        return fbank(waveform / np.float32(2 ** 15), int(rate), backend="kaldi_native_fbank").numpy()
    except AudioError as exc:
        raise AudioError(f"manifest audio {path}: {exc}; give the row longer or readable audio, or leave it "
                         f"out of the manifest") from None
