"""speech_to_text rows holding WAV audio: features from fairseq's reader where it has an fbank
backend, from qswap's kaldi_native_fbank fbank where it has none (no torchaudio), the same
features through qswap's readers and through fairseq-generate with the plugin."""
import shutil
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import qswap
from fairseq_run import run_tool
from qswap.assets import __path__ as asset_path
from qswap.features import fbank, load_audio
from qswap.integration.audio_rows import needs_own_fbank, row_features, with_own_fbank
from qswap.integration.data import batches, load_model_and_task, load_subset

ASSET = f"{asset_path[0]}/s2t_demo"
ROWS = 4


def _wav(path, seconds, seed):
    """A 16 kHz 16-bit mono WAV of tones and noise (no voice needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    signal = 3000 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + rng.normal(0, 300, t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(signal.astype("<i2").tobytes())


def _data_with(tmp_path, audio_of):
    """The shipped config and tokenizer with a subset ``rows`` of ROWS utterances whose audio column
    is ``audio_of(i, wav_path)`` for a WAV written per row."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("config.yaml", "spm_unigram200.model", "spm_unigram200.txt"):
        shutil.copyfile(Path(ASSET) / name, data / name)
    lines = ["id\taudio\tn_frames\ttgt_text\tspeaker"]
    for i in range(ROWS):
        wav = data / f"u{i}.wav"
        _wav(wav, 0.6 + 0.2 * i, i)
        frames = fbank(load_audio(wav)[0], 16000).shape[0]
        lines.append(f"u{i}\t{audio_of(i, wav)}\t{frames}\tone two three\tspk")
    (data / "rows.tsv").write_text("\n".join(lines) + "\n")
    return data


def _expected(wav, task):
    """A row's features: qswap's fbank of its WAV, through the subset's feature transforms (CMVN)."""
    features = fbank(load_audio(wav)[0], 16000).numpy()
    transforms = load_subset(task, "rows").feature_transforms
    return torch.from_numpy(transforms(features) if transforms is not None else features)


def test_wav_rows_are_read_as_fbank_features(tmp_path):
    """Without torchaudio (this machine's usual case) the rows are qswap's fbank exactly; with it,
    fairseq's torchaudio fbank, which computes the same Kaldi features."""
    data = _data_with(tmp_path, lambda i, wav: wav.name)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    dataset = load_subset(task, "rows")
    assert with_own_fbank(dataset) == needs_own_fbank()
    for i in range(ROWS):
        got, want = dataset[i].source, _expected(data / f"u{i}.wav", task)
        assert got.shape == want.shape == (want.shape[0], 80)
        if needs_own_fbank():
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, atol=1e-3)
    assert sorted(i for s in batches(task, "rows", max_sentences=3) for i in s["id"].tolist()) == list(range(ROWS))


def test_wav_stored_in_a_zip_and_npy_rows_are_read_too(tmp_path):
    """A WAV stored in an uncompressed zip (path:offset:length) and a .npy row in one manifest."""
    def audio_of(i, wav):
        if i == 0:
            np.save(wav.with_suffix(".npy"), fbank(load_audio(wav)[0], 16000).numpy())
            return wav.with_suffix(".npy").name
        with zipfile.ZipFile(wav.parent / f"z{i}.zip", "w", zipfile.ZIP_STORED) as z:
            z.write(wav, wav.name)
        with zipfile.ZipFile(wav.parent / f"z{i}.zip") as z:
            info = z.getinfo(wav.name)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        return f"z{i}.zip:{offset}:{info.file_size}"

    data = _data_with(tmp_path, audio_of)
    kept = tmp_path / "kept"
    kept.mkdir()
    for i in range(ROWS):
        (data / f"u{i}.wav").rename(kept / f"u{i}.wav")  # the rows read the zip (or .npy), not the file
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    dataset = load_subset(task, "rows")
    for i in range(ROWS):
        want = _expected(kept / f"u{i}.wav", task)
        assert torch.allclose(dataset[i].source, want, atol=0 if needs_own_fbank() or i == 0 else 1e-3)


def test_concatenated_rows_read_each_rows_audio(tmp_path):
    """ConcatAugment asks for a list of indices: their features, concatenated, as fairseq does; a list
    of feature rows only is fairseq's own reading."""
    from types import SimpleNamespace

    from qswap.integration.audio_rows import _source_features

    for i in range(2):
        _wav(tmp_path / f"{i}.wav", 0.5 + 0.25 * i, i)
    rows = SimpleNamespace(audio_paths=[str(tmp_path / f"{i}.wav") for i in range(2)], waveform_transforms=None,
                           feature_transforms=None)
    each = [row_features(p) for p in rows.audio_paths]
    assert torch.equal(_source_features(rows, [1, 0]), torch.from_numpy(np.concatenate([each[1], each[0]])))
    assert torch.equal(_source_features(rows, np.int64(0)), torch.from_numpy(each[0]))


def test_a_wav_too_short_for_one_frame_is_a_data_error_naming_it(tmp_path):
    from qswap.errors import DataError

    data = _data_with(tmp_path, lambda i, wav: wav.name)
    _wav(data / "u2.wav", 0.01, 2)  # 160 samples: under one 25 ms window
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    if not needs_own_fbank():
        pytest.skip("fairseq's own torchaudio fbank reads the rows here")
    with pytest.raises(DataError, match=r"manifest audio .*u2\.wav: waveform too short.*give the row longer"):
        list(batches(task, "rows", max_sentences=8))


def test_fairseq_generate_with_the_plugin_decodes_wav_rows_as_their_features(tmp_path):
    """fairseq-generate --task speech_to_text_qswap on WAV rows gives the hypotheses it gives on
    .npy rows holding qswap's fbank of the same WAVs (fairseq's own task, without torchaudio,
    cannot read the WAV rows at all)."""
    data = _data_with(tmp_path, lambda i, wav: wav.name)
    for i in range(ROWS):
        np.save(data / f"u{i}.npy", fbank(load_audio(data / f"u{i}.wav")[0], 16000).numpy())
    text = (data / "rows.tsv").read_text()
    (data / "npy.tsv").write_text(text.replace(".wav", ".npy"))

    def hypotheses(subset):
        out = run_tool("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                       "--path", f"{ASSET}/checkpoint.pt", "--gen-subset", subset, "--beam", "2", "--max-tokens",
                       "4000", "--cpu", "--config-yaml", "config.yaml", "--required-batch-size-multiple", "1",
                       cwd=tmp_path)
        return sorted(line for line in out.splitlines() if line.startswith("H-"))

    wav_rows = hypotheses("rows")
    assert len(wav_rows) == ROWS
    assert wav_rows == hypotheses("npy")


def test_row_features_leave_feature_rows_to_fairseq(tmp_path):
    """A .npy row is fairseq's np.load, untouched."""
    array = np.arange(160, dtype=np.float32).reshape(2, 80)
    np.save(tmp_path / "f.npy", array)
    assert np.array_equal(row_features(str(tmp_path / "f.npy")), array)


def test_feature_zip_rows_read_as_fairseq_reads_them():
    """The shipped subsets' rows (a feature zip's <zip>:<offset>:<length>) give what fairseq's own
    _get_source_audio gives, bit for bit."""
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    dataset = load_subset(task, "test")
    for i in (0, 7):
        assert torch.equal(dataset._get_source_audio(i), type(dataset)._get_source_audio(dataset, i))


def test_a_wav_row_at_another_rate_than_the_config_names_is_a_data_error(tmp_path):
    """With ``use_sample_rate: 16000`` in config.yaml an 8 kHz row had been turned into features at 8
    kHz (a filterbank over other frequencies) and decoded without a word; wav2vec 2.0's reader refuses
    such audio too. Without the key each row is read at its own rate, as fairseq reads it (a model
    trained on 8 kHz rows)."""
    import yaml

    from qswap.errors import DataError

    if not needs_own_fbank():
        pytest.skip("fairseq's own torchaudio fbank reads the rows here")
    data = _data_with(tmp_path, lambda i, wav: wav.name)
    with wave.open(str(data / "u1.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, "<i2").tobytes())
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    assert len(list(batches(task, "rows", max_sentences=8))) == 1  # no key: fairseq's reading
    config = yaml.safe_load((data / "config.yaml").read_text())
    (data / "config.yaml").write_text(yaml.safe_dump({**config, "use_sample_rate": 16000}))
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    with pytest.raises(DataError, match=r"u1\.wav is sampled at 8000 Hz and the data's config reads 16000 Hz"):
        list(batches(task, "rows", max_sentences=8))


@pytest.mark.parametrize("where", ["file", "zip"])
def test_a_wav_row_cut_short_is_a_data_error(tmp_path, where):
    """soundfile reads a WAV cut between samples (an interrupted copy, a zip entry's length short) as
    the shorter file, with no word: the row had been decoded from part of its audio."""
    from qswap.errors import DataError

    if not needs_own_fbank():
        pytest.skip("fairseq's own torchaudio fbank reads the rows here")

    def audio_of(i, wav):
        if i != 1:
            return wav.name
        if where == "file":
            wav.write_bytes(wav.read_bytes()[:-2000])
            return wav.name
        with zipfile.ZipFile(wav.parent / "z.zip", "w", zipfile.ZIP_STORED) as z:
            z.write(wav, wav.name)
        with zipfile.ZipFile(wav.parent / "z.zip") as z:
            info = z.getinfo(wav.name)
        offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        return f"z.zip:{offset}:{info.file_size - 2000}"

    data = _data_with(tmp_path, audio_of)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", data)
    with pytest.raises(DataError, match=r"truncated: its header declares \d+ frames and it holds \d+"):
        list(batches(task, "rows", max_sentences=8))
