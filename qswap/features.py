"""Kaldi-compatible log-mel filterbank features and a dependency-free WAV reader.

This module is deliberately small and pure:

* it never imports fairseq;
* ``torchaudio`` is only imported lazily (inside :func:`_torchaudio_kaldi`) and any
  failure to import it (ImportError, OSError from a mismatched CUDA build, ...) silently
  falls back to ``kaldi_native_fbank``; so does a failure of its fbank call when the backend
  was chosen automatically (torchaudio is then marked unusable, as an import failure marks
  it); one the caller asked for by name raises :class:`AudioError` naming the cause;
* WAV files are read with the standard-library :mod:`wave` module plus numpy.

Conventions follow fairseq's ``examples/speech_to_text`` data preparation: the waveform is
float in [-1, 1], it is scaled to the 16-bit integer range before the Kaldi computation, and
the result is an (T, 80) float32 matrix of log mel energies (25 ms window, 10 ms shift,
povey window, pre-emphasis 0.97, DC removal, no dither, ``snip_edges=True``).
"""
from __future__ import annotations

import os
import warnings
import wave
from typing import Optional, Tuple, Union

import numpy as np
import torch

from qswap.errors import AudioError, QswapWarning

__all__ = ["NUM_MEL_BINS", "fbank", "load_audio", "fbank_backend"]


NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0

_TORCHAUDIO_KALDI = None  # cached: module, or False when torchaudio is unusable


def _mark_torchaudio_unusable() -> None:
    """Record that torchaudio cannot be used (its fbank failed when called, e.g. a build for another
    torch): the state an import failure sets, so ``fbank_backend()`` says kaldi_native_fbank."""
    global _TORCHAUDIO_KALDI
    _TORCHAUDIO_KALDI = False


def _torchaudio_kaldi():
    """Return ``torchaudio.compliance.kaldi`` or ``None`` if torchaudio does not import."""
    global _TORCHAUDIO_KALDI
    if _TORCHAUDIO_KALDI is None:
        try:
            import torchaudio.compliance.kaldi as ta_kaldi  # noqa: WPS433 (lazy on purpose)

            _TORCHAUDIO_KALDI = ta_kaldi
        except Exception:  # ImportError, OSError (CUDA build next to CPU torch), ...
            _TORCHAUDIO_KALDI = False
    return _TORCHAUDIO_KALDI or None


BACKENDS = ("torchaudio", "kaldi_native_fbank")
MIN_MEL_BINS = 3  # Kaldi's smallest filterbank
LOW_FREQ_HZ = 20.0  # the lowest mel bin's left edge (both backends); the highest ends at Nyquist


def fbank_backend(prefer: Optional[str] = None) -> str:
    """Name of the backend :func:`fbank` will use ("torchaudio" or "kaldi_native_fbank")."""
    if prefer is not None and (not isinstance(prefer, str) or prefer not in BACKENDS):
        raise AudioError(f"unknown fbank backend {prefer!r}; pass one of {', '.join(map(repr, BACKENDS))}, "
                         f"or None (torchaudio where it imports, else kaldi_native_fbank)")
    if prefer == "kaldi_native_fbank":
        return prefer
    if _torchaudio_kaldi() is not None:
        return "torchaudio"
    if prefer == "torchaudio":
        raise AudioError(f"torchaudio backend requested but torchaudio does not import; install a torchaudio "
                         f"built for torch {torch.__version__}, or pass backend='kaldi_native_fbank'")
    return "kaldi_native_fbank"


def _as_mono_float(waveform: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        if waveform.dtype == torch.bfloat16:  # numpy has no bfloat16
            waveform = waveform.float()
        arr = waveform.detach().cpu().numpy()
    elif isinstance(waveform, np.ndarray):
        arr = waveform
    else:
        raise AudioError(f"waveform must be a torch.Tensor or numpy array, got {type(waveform).__name__}")
    if arr.dtype.kind not in "fiu":
        raise AudioError(f"waveform has non-numeric dtype {arr.dtype}")
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 4:
        # no audio format stores 64-bit PCM: 16-bit samples in an int64 array (torch.tensor(ints),
        # np.array(list)) scaled by 2^63 had given the energy floor in every bin, with no error
        raise AudioError(f"waveform of {arr.dtype} samples: pass 16- or 32-bit PCM in its own dtype "
                         f"(x.astype(np.int16) for 16-bit samples) or float samples in [-1, 1]")
    if arr.dtype.kind == "i":
        # signed integer PCM: scale to [-1, 1]
        info = np.iinfo(arr.dtype)
        arr = arr.astype(np.float64) / float(max(abs(info.min), info.max))
    elif arr.dtype.kind == "u":
        # unsigned integer PCM (8-bit WAV): centred on its midpoint, (x - 2^(b-1)) / 2^(b-1), as load_audio reads it
        half = float(np.iinfo(arr.dtype).max // 2 + 1)
        arr = (arr.astype(np.float64) - half) / half
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        if 1 not in arr.shape:
            raise AudioError(f"expected mono audio, got shape {tuple(arr.shape)}")
        arr = arr.reshape(-1)
    elif arr.ndim != 1:
        raise AudioError(f"expected a 1-D (or 1xN) waveform, got shape {tuple(arr.shape)}")
    return arr


def _mel_bins_fit(sample_rate: int, num_mel_bins: int) -> bool:
    """Whether every one of ``num_mel_bins`` triangular mel bins between LOW_FREQ_HZ and Nyquist
    holds at least one FFT bin of the frame's FFT: Kaldi's condition (kaldi-native-fbank refuses
    the options otherwise, "You may have set num_mel_bins too large"; torchaudio computes empty
    bins, features of nothing)."""
    nyquist = 0.5 * sample_rate
    if not LOW_FREQ_HZ < nyquist:
        return False
    window = int(sample_rate * 0.001 * FRAME_LENGTH_MS)
    padded = 1 << max(window - 1, 0).bit_length()  # Kaldi rounds the FFT up to a power of two

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    low, high = mel(LOW_FREQ_HZ), mel(nyquist)
    delta = (high - low) / (num_mel_bins + 1)
    fft_mels = mel(np.arange(padded // 2) * (sample_rate / padded))
    left = low + np.arange(num_mel_bins) * delta
    inside = (fft_mels[None, :] > left[:, None]) & (fft_mels[None, :] < left[:, None] + 2 * delta)
    return bool(inside.any(axis=1).all())


def _check_options(sample_rate, num_mel_bins) -> None:
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, np.integer)) \
            or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive integer number of Hz (e.g. 16000), got {sample_rate!r}")
    if isinstance(num_mel_bins, (bool, np.bool_)) or not isinstance(num_mel_bins, (int, np.integer)) \
            or num_mel_bins < MIN_MEL_BINS:
        raise AudioError(f"num_mel_bins must be an integer >= {MIN_MEL_BINS} (fairseq's speech models use "
                         f"{NUM_MEL_BINS}), got {num_mel_bins!r}")
    if not _mel_bins_fit(int(sample_rate), int(num_mel_bins)):
        fit = next((n for n in range(int(num_mel_bins) - 1, MIN_MEL_BINS - 1, -1)
                    if _mel_bins_fit(int(sample_rate), n)), None)
        fewer = (f"pass fewer mel bins (num_mel_bins={fit} is the most below {num_mel_bins} that fit)"
                 if fit is not None else f"no filterbank of {MIN_MEL_BINS} or more bins fits this rate")
        raise AudioError(f"{num_mel_bins} mel bins do not fit audio at {sample_rate} Hz (between {LOW_FREQ_HZ:g} Hz "
                         f"and the {0.5 * sample_rate:g} Hz Nyquist frequency some bins would hold no FFT bin): "
                         f"{fewer}, or resample the audio to a higher rate (e.g. 16000 Hz: "
                         f"`sox in.wav -r 16000 out.wav`)")


MAX_FLOAT_PEAK = 2.0  # float samples lie in [-1, 1]; a clipped float file may go a little beyond


def _check_waveform(arr: np.ndarray, sample_rate: int) -> None:
    if arr.size == 0:
        raise AudioError("empty waveform (0 samples)")
    if not np.all(np.isfinite(arr)):
        raise AudioError("waveform contains NaN or infinite samples")
    peak = float(np.abs(arr).max())
    if peak > MAX_FLOAT_PEAK:  # had shifted every feature (+20.8 for 16-bit values) or overflowed to inf
        raise AudioError(f"float waveform with samples up to {peak:g}: float samples must lie in [-1, 1] "
                         f"(16-bit sample values as floats? divide them by 32768, or pass them as int16)")
    min_len = int(sample_rate * 0.001 * FRAME_LENGTH_MS)  # Kaldi's window: truncated, as _mel_bins_fit's
    if arr.size < min_len:
        raise AudioError(
            f"waveform too short: {arr.size} samples < one {FRAME_LENGTH_MS:g} ms frame ({min_len} samples)"
        )


def fbank(
    waveform: Union[torch.Tensor, np.ndarray],
    sample_rate: int,
    *,
    num_mel_bins: int = NUM_MEL_BINS,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank, shape ``(T, num_mel_bins)``, float32.

    ``waveform``: mono float samples in [-1, 1] (shape (N,) or (1, N)); integer PCM arrays are
    scaled to [-1, 1] first. ``backend``: ``None`` (torchaudio if it imports, otherwise
    kaldi_native_fbank), ``"torchaudio"`` or ``"kaldi_native_fbank"``.
    Raises :class:`qswap.errors.AudioError` for empty / non-finite / too-short input, float
    samples beyond [-2, 2] (integer sample values as floats), 64-bit integer samples, an unknown
    backend, a sample rate that is not a positive int, fewer than 3 mel bins, or more mel bins than
    the sample rate's frequency range holds.
    """
    _check_options(sample_rate, num_mel_bins)
    name = fbank_backend(backend)  # a misspelt backend, before any work
    arr = _as_mono_float(waveform)
    _check_waveform(arr, sample_rate)
    scaled = arr * 32768.0  # Kaldi works on the 16-bit integer scale
    if name == "torchaudio":
        try:
            feats = _torchaudio_kaldi().fbank(
                torch.from_numpy(scaled).unsqueeze(0),
                num_mel_bins=int(num_mel_bins),
                frame_length=FRAME_LENGTH_MS,
                frame_shift=FRAME_SHIFT_MS,
                dither=0.0,
                energy_floor=0.0,
                low_freq=LOW_FREQ_HZ,
                sample_frequency=float(sample_rate),
            )
            return feats.to(torch.float32).contiguous()
        except Exception as e:  # the input is checked: a torchaudio that imports but cannot run
            cause = f"{type(e).__name__}: {e}"
            if backend == "torchaudio":
                raise AudioError(f"torchaudio backend requested but its fbank failed ({cause}); install a "
                                 f"torchaudio built for torch {torch.__version__}, or pass "
                                 f"backend='kaldi_native_fbank'") from e
            _mark_torchaudio_unusable()
            warnings.warn(QswapWarning(f"torchaudio's fbank failed ({cause}): using kaldi_native_fbank from now on "
                                       f"(Kaldi-compatible features, not bit-identical to torchaudio's)"), stacklevel=2)
    return _knf_fbank(scaled, sample_rate, num_mel_bins)


def _knf_fbank(scaled: np.ndarray, sample_rate: int, num_mel_bins: int) -> torch.Tensor:
    import kaldi_native_fbank as knf  # small C++ extension, no torch/fairseq dependency

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = int(num_mel_bins)
    opts.mel_opts.low_freq = LOW_FREQ_HZ
    opts.mel_opts.high_freq = 0.0
    opts.energy_floor = 0.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(float(sample_rate), scaled.tolist())
    extractor.input_finished()
    n = extractor.num_frames_ready
    if n == 0:
        raise AudioError("waveform produced no feature frames")
    feats = np.stack([np.asarray(extractor.get_frame(i), dtype=np.float32) for i in range(n)])
    return torch.from_numpy(feats)


# a WAV data chunk's size where the writer did not know it: a placeholder at or near the largest
# size (ffmpeg's 0xFFFFFFFF, sox's 0x7FFFF000, others' 0x7FFFFFFF); a data chunk this large read
# short is taken as streamed, not truncated
_STREAMED = 0x7FFF0000


def streamed_size(declared: int, frame_bytes: int) -> bool:
    """Whether a WAV data chunk's declared size (in whole frames of ``frame_bytes``) is a streaming
    writer's placeholder (``_STREAMED``), not a length."""
    return declared >= _STREAMED - frame_bytes


def _load_with_soundfile(path: str, expected_sample_rate: Optional[int], kind: str) -> Tuple[torch.Tensor, int]:
    """A float or WAVE_FORMAT_EXTENSIBLE WAV (Python's ``wave`` reads plain PCM only), read with
    soundfile: the same [-1, 1] scale as :func:`load_audio`'s (integer codes over 2^(bits-1))."""
    try:
        import soundfile
    except ImportError:
        raise AudioError(f"{path}: a {kind} WAV, which reading needs soundfile (pip install soundfile), or "
                         f"convert it to 16-bit PCM: sox {path} -b 16 -e signed-integer out.wav") from None
    try:
        info = soundfile.info(path)
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise AudioError(f"{path}: cannot read the {kind} WAV ({e}); convert it to 16-bit PCM: "
                         f"sox {path} -b 16 -e signed-integer out.wav") from e
    if info.frames > samples.shape[0]:
        raise AudioError(f"{path}: truncated: its header declares {info.frames} frames and the file holds "
                         f"{samples.shape[0]}; copy or export the file again")
    if expected_sample_rate is not None and rate != expected_sample_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz, expected {expected_sample_rate} Hz "
                         f"(resample it first, e.g. `sox in.wav -r {expected_sample_rate} out.wav`)")
    data = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if data.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), int(rate)


def load_audio(
    path: Union[str, os.PathLike], expected_sample_rate: Optional[int] = None
) -> Tuple[torch.Tensor, int]:
    """Read a PCM WAV file with the standard library (a float or WAVE_FORMAT_EXTENSIBLE one, as sox
    and ffmpeg write 24- and 32-bit audio, with soundfile); returns ``(waveform, sample_rate)``.

    ``waveform`` is a float32 tensor of shape (N,) in [-1, 1] (multi-channel files are averaged
    to mono). If ``expected_sample_rate`` is given and differs, :class:`AudioError` is raised
    (no resampling is done). Unreadable files, non-PCM encodings, empty audio and non-finite
    samples also raise :class:`AudioError`.
    """
    path = os.fspath(path)
    try:
        with wave.open(path, "rb") as w:
            n_channels = w.getnchannels()
            sampwidth = w.getsampwidth()
            sample_rate = w.getframerate()
            n_frames = w.getnframes()
            raw = w.readframes(n_frames)
    except FileNotFoundError as e:
        raise AudioError(f"{path}: no such file") from e
    except wave.Error as e:
        code = str(e).removeprefix("unknown format: ")
        if code in ("3", "65534") or str(e).startswith("unknown extended format"):
            # IEEE float, or WAVE_FORMAT_EXTENSIBLE (sox's and ffmpeg's 24/32-bit; Python 3.12's wave
            # reads extensible PCM and names an extensible float file "unknown extended format")
            return _load_with_soundfile(path, expected_sample_rate, "float" if code == "3" else "extensible")
        raise AudioError(f"{path}: cannot read as PCM WAV ({e or 'a truncated or unreadable header'})") from e
    except (EOFError, OSError, ValueError) as e:
        raise AudioError(f"{path}: cannot read as PCM WAV ({e or 'a truncated or unreadable header'})") from e
    if expected_sample_rate is not None and sample_rate != expected_sample_rate:
        raise AudioError(
            f"{path}: sample rate {sample_rate} Hz, expected {expected_sample_rate} Hz "
            f"(resample it first, e.g. `sox in.wav -r {expected_sample_rate} out.wav`)"
        )
    if sample_rate <= 0:
        raise AudioError(f"{path}: invalid sample rate {sample_rate}")
    if sampwidth not in (1, 2, 3, 4):
        raise AudioError(f"{path}: unsupported sample width {sampwidth} bytes")
    if len(raw) % sampwidth:  # the file was cut short inside a sample (an interrupted copy)
        raise AudioError(f"{path}: truncated {8 * sampwidth}-bit data: {len(raw)} bytes of samples is not a "
                         f"whole number of {sampwidth}-byte samples; copy or export the file again")
    declared = n_frames * n_channels * sampwidth  # the data chunk's size in the header (in whole frames)
    if len(raw) < declared and not streamed_size(declared, n_channels * sampwidth):
        # cut short between samples (an interrupted copy); a header written before its data's length
        # was known (a pipe's output, ``_STREAMED``) declares no length
        raise AudioError(f"{path}: truncated: its header declares {n_frames} frames and the file holds "
                         f"{len(raw) // (n_channels * sampwidth)}; copy or export the file again")
    if sampwidth == 1:  # unsigned 8-bit
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif sampwidth == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif sampwidth == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        data = v.astype(np.float32) / float(1 << 23)
    else:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float64).astype(np.float32) / 2147483648.0
    if n_channels < 1:
        raise AudioError(f"{path}: invalid channel count {n_channels}")
    usable = (data.size // n_channels) * n_channels
    data = data[:usable]
    if n_channels > 1:
        data = data.reshape(-1, n_channels).mean(axis=1)
    if data.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), int(sample_rate)
