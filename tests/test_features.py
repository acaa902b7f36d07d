"""qswap.features: Kaldi fbank shape/finiteness, backend agreement, typed audio errors."""
import math
import struct
import sys
import wave

import numpy as np
import pytest
import torch

from qswap.errors import AudioError, QswapError
from qswap import features
from qswap.features import fbank, load_audio


def _tone(seconds=0.5, sr=16000, freq=440.0, amp=0.3, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * math.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _write_wav(path, samples, sr=16000, channels=1, width=2):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        if width == 2:
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        else:
            w.writeframes(bytes(samples))


def test_fbank_shape_and_finite():
    x = _tone(1.0)
    f = fbank(x, 16000)
    assert isinstance(f, torch.Tensor) and f.dtype == torch.float32
    # Kaldi snip_edges: 1 + (N - 400) // 160 frames
    assert f.shape == (1 + (16000 - 400) // 160, 80)
    assert torch.isfinite(f).all()
    # the 440 Hz tone raises the low mel bins well above the noise-only floor
    noise = fbank(_tone(1.0, amp=0.0), 16000)
    assert (f[:, :30].mean(0) - noise[:, :30].mean(0)).max() > 5.0
    assert abs(f[:, -10:].mean() - noise[:, -10:].mean()) < 1.0


def test_fbank_accepts_tensor_2d_and_int16():
    x = _tone(0.3)
    a = fbank(x, 16000)
    b = fbank(torch.from_numpy(x).unsqueeze(0), 16000)
    c = fbank((x * 32768).astype(np.int16), 16000)
    assert torch.allclose(a, b)
    assert torch.allclose(a, c, atol=0.05)  # int16 rounding of the input


def test_fbank_kaldi_native_backend_explicit():
    x = _tone(0.3)
    f = fbank(x, 16000, backend="kaldi_native_fbank")
    assert f.shape[1] == 80 and torch.isfinite(f).all()


def test_torchaudio_matches_kaldi_native_fbank():
    try:
        import torchaudio.compliance.kaldi  # noqa: F401
    except Exception as e:  # ImportError, or OSError from a CUDA build next to CPU torch
        pytest.skip(f"torchaudio not importable ({type(e).__name__}): backend agreement not checked")
    x = _tone(0.7, seed=3)
    a = fbank(x, 16000, backend="torchaudio")
    b = fbank(x, 16000, backend="kaldi_native_fbank")
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-2, rtol=1e-3), (a - b).abs().max()


def test_features_module_does_not_import_fairseq_or_torchaudio():
    import subprocess

    code = ("import sys, qswap.features as f; import numpy as np; f.fbank(np.zeros(800, 'float32') + 0.01, 16000, "
            "backend='kaldi_native_fbank'); "
            "print('fairseq' in sys.modules, 'torchaudio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("bad", [np.zeros(0, np.float32), np.full(1600, np.nan, np.float32),
                                 np.array([0.1] * 1599 + [np.inf], np.float32), np.zeros(100, np.float32)])
def test_fbank_bad_waveform_raises_audio_error(bad):
    with pytest.raises(AudioError):
        fbank(bad, 16000)


def test_fbank_bad_rate_and_shape():
    with pytest.raises(AudioError):
        fbank(_tone(0.1), 0)
    with pytest.raises(AudioError):
        fbank(np.zeros((2, 1600), np.float32), 16000)
    with pytest.raises(AudioError):
        fbank([0.0] * 1600, 16000)


def test_load_audio_roundtrip(tmp_path):
    x = _tone(0.25)
    p = tmp_path / "a.wav"
    _write_wav(p, x)
    w, sr = load_audio(p, expected_sample_rate=16000)
    assert sr == 16000 and w.dtype == torch.float32 and w.shape == (x.size,)
    assert np.abs(w.numpy() - x).max() < 1e-3


def test_load_audio_stereo_averaged(tmp_path):
    x = _tone(0.1)
    st = np.stack([x, -x * 0 + x], 1).reshape(-1)
    p = tmp_path / "s.wav"
    _write_wav(p, st, channels=2)
    w, _ = load_audio(p)
    assert w.shape == (x.size,)


def test_load_audio_wrong_rate(tmp_path):
    p = tmp_path / "a8k.wav"
    _write_wav(p, _tone(0.2, sr=8000), sr=8000)
    with pytest.raises(AudioError, match="8000 Hz, expected 16000"):
        load_audio(p, expected_sample_rate=16000)
    w, sr = load_audio(p)  # no expectation: fine
    assert sr == 8000


def test_load_audio_empty(tmp_path):
    p = tmp_path / "empty.wav"
    _write_wav(p, np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="empty"):
        load_audio(p)


def test_load_audio_unreadable(tmp_path):
    p = tmp_path / "junk.wav"
    p.write_bytes(b"this is not a wav file at all")
    with pytest.raises(AudioError):
        load_audio(p)
    with pytest.raises(AudioError):
        load_audio(tmp_path / "missing.wav")
    # a float WAV (format 3) is not PCM: the stdlib reader refuses it; soundfile reads it (without
    # soundfile: an AudioError saying to install it or convert the file)
    fp = tmp_path / "float.wav"
    data = np.zeros(160, "<f4").tobytes()
    hdr = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", len(data))
    fp.write_bytes(hdr + data)
    try:
        import soundfile  # noqa: F401
    except ImportError:
        with pytest.raises(AudioError, match="a float WAV, which reading needs soundfile"):
            load_audio(fp)
    else:
        waveform, rate = load_audio(fp)
        assert rate == 16000 and torch.equal(waveform, torch.zeros(160))


def test_audio_error_is_qswap_error():
    assert issubclass(AudioError, QswapError)
    assert features.fbank_backend("kaldi_native_fbank") == "kaldi_native_fbank"


def test_unsigned_8bit_pcm_is_centred_as_load_audio_reads_it(tmp_path):
    """An 8-bit WAV's samples are unsigned, centred on 128: fbank of the uint8 array equals fbank
    of the waveform load_audio reads from the file (not a [0, 1] signal at half the scale)."""
    codes = np.clip(np.round(_tone(0.5) * 127 + 128), 0, 255).astype(np.uint8)
    p = tmp_path / "u8.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(16000)
        w.writeframes(codes.tobytes())
    waveform, _ = load_audio(p, expected_sample_rate=16000)
    torch.testing.assert_close(fbank(codes, 16000), fbank(waveform, 16000), rtol=0, atol=1e-4)


@pytest.mark.parametrize("width, cut", [(2, 1), (3, 1), (3, 2), (4, 1), (4, 3)])
def test_load_audio_truncated_inside_a_sample_is_an_audio_error(tmp_path, width, cut):
    """A WAV cut short inside a sample (an interrupted copy) is a typed error at every width (16
    and 32 bits raised numpy's ValueError; 24 bits already said 'truncated')."""
    p = tmp_path / f"cut{width}.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(bytes(range(256)) * 20 * width)
    p.write_bytes(p.read_bytes()[:-cut])
    with pytest.raises(AudioError, match=f"truncated {8 * width}-bit data.*copy or export the file again"):
        load_audio(p)


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "knf"}, "unknown fbank backend 'knf'; pass one of 'torchaudio', 'kaldi_native_fbank'"),
    ({"num_mel_bins": 0}, "num_mel_bins must be an integer >= 3"),
    ({"num_mel_bins": -3}, "num_mel_bins must be an integer >= 3"),
    ({"num_mel_bins": True}, "num_mel_bins must be an integer >= 3"),
    ({"sample_rate": True}, "sample_rate must be a positive integer number of Hz"),
    ({"sample_rate": 16000.0}, "sample_rate must be a positive integer number of Hz"),
    ({"sample_rate": 4000}, r"80 mel bins do not fit audio at 4000 Hz.*num_mel_bins=66.*resample"),
    ({"sample_rate": 40}, r"do not fit audio at 40 Hz.*no filterbank of 3 or more bins.*resample"),
])
def test_fbank_bad_options_are_audio_errors_that_say_what_to_change(kwargs, match):
    """A misspelt backend, too few mel bins, a bool or float rate (True passed the int check) and
    more mel bins than the rate's band holds (kaldi-native-fbank's ValueError) are AudioErrors."""
    kwargs = {"sample_rate": 16000, **kwargs}
    x = _tone(1.0, sr=max(kwargs["sample_rate"], 1000))
    for backend in (None, "kaldi_native_fbank"):
        with pytest.raises(AudioError, match=match):
            fbank(x, **{"backend": backend, **kwargs})
    with pytest.raises(AudioError, match="unknown fbank backend"):
        features.fbank_backend("knf")


@pytest.mark.parametrize("sample_rate, bins", [(4000, 66), (3000, 78), (8000, 80), (22050, 128), (1000, 23)])
def test_the_mel_bins_that_fit_are_the_ones_kaldi_native_fbank_accepts(sample_rate, bins):
    """The up-front check is Kaldi's own condition: a count it says fits computes, one more (or the
    next that does not fit) is refused by the check, not by the backend."""
    x = _tone(0.5, sr=sample_rate)
    assert fbank(x, sample_rate, num_mel_bins=bins, backend="kaldi_native_fbank").shape[1] == bins
    too_many = next(n for n in range(bins + 1, 400) if not features._mel_bins_fit(sample_rate, n))
    import kaldi_native_fbank as knf
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq, opts.mel_opts.num_bins, opts.mel_opts.low_freq = float(sample_rate), too_many, 20.0
    with pytest.raises(Exception):
        knf.OnlineFbank(opts)  # the backend refuses it too
    with pytest.raises(AudioError, match="do not fit"):
        fbank(x, sample_rate, num_mel_bins=too_many)


@pytest.fixture
def broken_torchaudio(tmp_path, monkeypatch):
    """A torchaudio that imports but whose fbank fails when called (as one built for another torch
    does): a stand-in package first on sys.path, the module's torchaudio state reset, both undone."""
    kaldi = tmp_path / "torchaudio" / "compliance"
    kaldi.mkdir(parents=True)
    (tmp_path / "torchaudio" / "__init__.py").write_text("")
    (kaldi / "__init__.py").write_text("")
    (kaldi / "kaldi.py").write_text("def fbank(*a, **k):\n"
                                    "    raise RuntimeError('undefined symbol: _ZN3c10 (built for another torch)')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {k: v for k, v in sys.modules.items() if k == "torchaudio" or k.startswith("torchaudio.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setattr(features, "_TORCHAUDIO_KALDI", None)
    yield
    for k in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
        if k not in saved:
            del sys.modules[k]


def test_a_torchaudio_that_imports_but_fails_falls_back_when_chosen_automatically(broken_torchaudio):
    """Only an import failure fell back to kaldi-native-fbank; a failing call propagated. Chosen
    automatically, torchaudio is now marked unusable (the import failure's state) and the features
    are kaldi-native-fbank's; asked for by name, the failure is an AudioError naming its cause."""
    x = _tone(0.3)
    assert features.fbank_backend() == "torchaudio"  # it imports
    with pytest.raises(AudioError, match=r"torchaudio backend requested but its fbank failed \(RuntimeError: "
                                         r"undefined symbol.*backend='kaldi_native_fbank'"):
        fbank(x, 16000, backend="torchaudio")
    assert features.fbank_backend() == "torchaudio"  # asked for by name: reported, not marked
    feats = fbank(x, 16000)
    assert torch.equal(feats, fbank(x, 16000, backend="kaldi_native_fbank"))
    assert features._TORCHAUDIO_KALDI is False and features.fbank_backend() == "kaldi_native_fbank"
    with pytest.raises(AudioError, match="torchaudio does not import; install"):
        fbank(x, 16000, backend="torchaudio")


def test_samples_whose_scale_does_not_match_their_dtype_are_audio_errors():
    """16-bit samples in an int64 array (torch.tensor(ints)) had been scaled by 2^63: every feature
    the energy floor; 16-bit values as floats shifted every feature by +20.8 (and huge floats gave
    inf features). Float samples may lie a little beyond [-1, 1] (a clipped float file)."""
    pcm = (_tone() * 32767).astype(np.int16)
    with pytest.raises(AudioError, match="int64 samples: pass 16- or 32-bit PCM"):
        fbank(pcm.astype(np.int64), 16000)
    with pytest.raises(AudioError, match="samples up to .* float samples must lie in \\[-1, 1\\].*32768"):
        fbank(pcm.astype(np.float32), 16000)
    with pytest.raises(AudioError, match="float samples must lie in"):
        fbank(_tone() * 1e30, 16000)
    clipped = fbank(np.clip(_tone() * 4.0, -1.2, 1.2), 16000)
    assert torch.isfinite(clipped).all()
    torch.testing.assert_close(fbank(pcm.astype(np.int32) * 65536, 16000), fbank(pcm, 16000), atol=1e-4, rtol=0)


def test_the_shortest_waveform_is_one_kaldi_window_truncated():
    """Kaldi's window is int(rate * 25 ms) samples: at 11025 Hz a 275-sample clip makes one frame,
    which the check (rounding to 276) had refused, naming a wrong frame size."""
    feats = fbank(_tone(275 / 11025, sr=11025), 11025, num_mel_bins=40, backend="kaldi_native_fbank")
    assert feats.shape[0] == 1
    with pytest.raises(AudioError, match=r"274 samples < one 25 ms frame \(275 samples\)"):
        fbank(_tone(274 / 11025, sr=11025), 11025, num_mel_bins=40)


def test_load_audio_cut_between_samples_is_an_audio_error(tmp_path):
    """A copy interrupted on a sample boundary had been read as a shorter file, with no word."""
    p = tmp_path / "cut.wav"
    _write_wav(p, _tone(1.0))
    p.write_bytes(p.read_bytes()[:-4000])  # 2000 samples short
    with pytest.raises(AudioError, match="truncated: its header declares 16000 frames and the file holds 14000"):
        load_audio(p)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000, 0x7FFFFFFF], ids=["ffmpeg", "sox", "other"])
def test_a_wav_whose_header_declares_no_length_is_read_whole(tmp_path, placeholder):
    """A pipe's WAV (``sox ... -t wav -``, ffmpeg to a pipe) declares its data with a placeholder size
    (sox's 0x7FFFF000 had been refused as truncated): not truncated."""
    p = tmp_path / "streamed.wav"
    _write_wav(p, _tone(0.5))
    raw = bytearray(p.read_bytes())
    at = raw.index(b"data") + 4
    raw[at:at + 4] = struct.pack("<I", placeholder)
    p.write_bytes(bytes(raw))
    waveform, _ = load_audio(p)
    assert waveform.numel() == 8000


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_24", "PCM_32"])
def test_float_and_extensible_wavs_are_read_on_the_same_scale(tmp_path, subtype):
    """sox and ffmpeg write 24- and 32-bit WAVs as WAVE_FORMAT_EXTENSIBLE, and float WAVs as format 3,
    which Python's wave refuses ('unknown format: 65534'): read with soundfile, the samples are the
    16-bit file's to within the 16-bit step."""
    sf = pytest.importorskip("soundfile")
    tone = _tone(0.5)
    ref = tmp_path / "ref.wav"
    _write_wav(ref, tone)
    expected, _ = load_audio(ref)
    p = tmp_path / f"{subtype}.wav"
    sf.write(p, expected.numpy(), 16000, subtype=subtype, format="WAV" if subtype == "FLOAT" else "WAVEX")
    if subtype != "FLOAT":
        raw = p.read_bytes()
        assert struct.unpack("<H", raw[20:22])[0] == 0xFFFE  # extensible, as sox writes it
    got, rate = load_audio(p, expected_sample_rate=16000)
    assert rate == 16000 and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1 / 32768)


def test_fbank_takes_a_bfloat16_waveform():
    """numpy has no bfloat16: a raw TypeError had come from the conversion (float16 worked)."""
    tone = torch.from_numpy(_tone(0.5))
    got = fbank(tone.to(torch.bfloat16), 16000)
    assert got.shape == fbank(tone.to(torch.bfloat16).float(), 16000).shape
    torch.testing.assert_close(got, fbank(tone.to(torch.bfloat16).float(), 16000), rtol=0, atol=0)
