"""Subsets as qswap reads them: evaluation features, the same on every read."""
import pytest
import torch

from qswap.assets import __path__ as asset_path
from qswap.integration.data import load_model_and_task, load_subset

ASSET = f"{asset_path[0]}/s2t_demo"


def test_a_train_named_subset_is_read_without_training_augmentation():
    """fairseq applies the config's `_train` transforms (SpecAugment) to splits named train*;
    calibration on the shipped `train_calib` subset must see inference features instead."""
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    task.load_dataset("train_calib")  # fairseq's own reading: augmented
    augmented = task.dataset("train_calib")
    assert "SpecAugment" in repr(augmented.feature_transforms)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    ours = load_subset(task, "train_calib")
    assert "SpecAugment" not in repr(ours.feature_transforms)
    assert not ours.shuffle
    first, again = ours[0].source, ours[0].source
    assert torch.equal(first, again)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    test_style = load_subset(task, "test")  # an eval split: utterance CMVN only
    assert repr(test_style.feature_transforms) == repr(ours.feature_transforms)
    torch.manual_seed(0)
    assert not torch.equal(augmented[0].source, first)  # SpecAugment's masks change the features


def test_batches_are_batched_as_asked_on_every_call():
    """fairseq's task keeps a batch iterator per dataset; a second call for the same subset with
    another batch size (or shard) must not get the first call's batches."""
    from qswap.integration.data import batches

    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", ASSET)
    sizes = lambda **kw: [len(s["id"]) for s in batches(task, "train_calib", **kw)]  # noqa: E731
    assert sizes(max_sentences=4) == [4] * 8
    assert sizes(max_sentences=32) == [32]
    assert sizes(max_sentences=16, num_shards=2, shard_id=1) == [16]
    ids = lambda **kw: [i for s in batches(task, "train_calib", **kw) for i in s["id"].tolist()]  # noqa: E731
    assert sorted(ids(max_sentences=8)) == list(range(32))


def _calib_copy(tmp_path):
    """The shipped data directory's config, tokenizer and ``train_calib`` subset, copied."""
    import shutil
    from pathlib import Path

    data = tmp_path / "data"
    data.mkdir()
    for name in ("config.yaml", "spm_unigram200.model", "spm_unigram200.txt", "train_calib.tsv",
                 "fbank80_train_calib.zip"):
        shutil.copyfile(Path(ASSET) / name, data / name)
    return data


def _read_all(data, subset="train_calib"):
    from qswap.integration.data import batches

    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", str(data))
    return [s["id"] for s in batches(task, subset, max_sentences=8)]


def test_a_manifest_line_cut_short_is_a_data_error(tmp_path):
    """A manifest cut mid-line (its last row lacks n_frames): a DataError naming the manifest,
    not fairseq's TypeError."""
    import pytest

    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    text = (data / "train_calib.tsv").read_text()
    cut = text[:text.index("\n", 200) + 30]
    (data / "train_calib.tsv").write_text(cut)
    with pytest.raises(DataError, match=f"malformed manifest train_calib.tsv .line {cut.count(chr(10)) + 1}: no n_frames"):
        _read_all(data)


def test_a_whitespace_line_in_a_manifest_is_named():
    """A line of spaces had been reported as fairseq's TypeError ('PosixPath' and 'NoneType')."""
    import tempfile
    from pathlib import Path

    from qswap.errors import DataError

    with tempfile.TemporaryDirectory() as tmp:
        data = _calib_copy(Path(tmp))
        lines = (data / "train_calib.tsv").read_text().splitlines()
        (data / "train_calib.tsv").write_text("\n".join(lines[:3] + ["   "] + lines[3:]) + "\n")
        with pytest.raises(DataError, match="malformed manifest train_calib.tsv .line 4: no id, audio, n_frames"):
            _read_all(data)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_sentencepiece_model_is_a_data_error_naming_it(tmp_path, damage):
    """The tokenizer config.yaml names, deleted or cut short: a DataError naming the model file and
    config.yaml, not sentencepiece's RuntimeError nor a complaint about the manifest."""
    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    model = data / "spm_unigram200.model"
    if damage == "missing":
        model.unlink()
    else:
        model.write_bytes(model.read_bytes()[:1000])
    match = "not found" if damage == "missing" else "does not load.*truncated or corrupt"
    with pytest.raises(DataError, match=f"SentencePiece model .*spm_unigram200.model {match}.*config.yaml"):
        _read_all(data)


def test_a_truncated_feature_zip_is_a_data_error(tmp_path):
    """A feature zip cut short: reading an utterance past its end is a DataError that says to
    check the files are complete, not an IndexError from fairseq's reader."""
    import pytest

    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    archive = data / "fbank80_train_calib.zip"
    archive.write_bytes(archive.read_bytes()[:200_000])
    with pytest.raises(DataError, match="cannot read an utterance.*complete"):
        _read_all(data)


def test_nan_features_are_a_data_error_naming_the_utterance(tmp_path):
    """NaN in one utterance's features: every reader (decoding, calibration, the audit's batch)
    stops with a DataError naming that utterance, before a model turns it into a transcript, a
    range or a finding about the model."""
    import numpy as np
    import pytest

    from qswap.errors import DataError
    from qswap.integration.data import first_net_input

    data = _calib_copy(tmp_path)
    row = (data / "train_calib.tsv").read_text().splitlines()[4]  # manifest row index 3
    _, offset, _ = row.split("\t")[1].split(":")
    with open(data / "fbank80_train_calib.zip", "r+b") as f:
        f.seek(int(offset))
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read_header(f)  # the header's length varies; the values follow it
        f.seek(f.tell() + 4 * 80 * 5)  # frame 5
        f.write(np.array([np.nan, np.inf], dtype=np.float32).tobytes())
    with pytest.raises(DataError, match=r"utterance\(s\) 3 .*NaN or inf"):
        _read_all(data)
    _, task = load_model_and_task(f"{ASSET}/checkpoint.pt", str(data))
    with pytest.raises(DataError, match=r"utterance\(s\) 3 "):
        first_net_input(task, "train_calib", count=5)
    assert first_net_input(task, "train_calib", count=3)["src_tokens"].isfinite().all()


def _rows_changed(data, change):
    """train_calib.tsv with each data row's columns passed through ``change`` (a dict of the header's names)."""
    lines = (data / "train_calib.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    for row in rows:
        change(row)
    (data / "train_calib.tsv").write_text("\n".join(["\t".join(header)] + ["\t".join(r[h] for h in header)
                                                                             for r in rows]) + "\n")


def test_an_utterance_longer_than_a_batch_may_hold_is_a_data_error(tmp_path):
    """fairseq's batching asserts that every n_frames fits max_tokens: a DataError pointing at the
    manifest's n_frames column, not a raw AssertionError."""
    import pytest

    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    _rows_changed(data, lambda row: row.update(n_frames="99999"))
    with pytest.raises(DataError, match="n_frames in train_calib.tsv is larger than a batch may hold"):
        _read_all(data)


def test_a_missing_audio_file_is_a_data_error(tmp_path):
    """A manifest row naming a WAV that is not there: soundfile's error (a RuntimeError) becomes a
    DataError naming the subset and the file."""
    import pytest

    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    _rows_changed(data, lambda row: row.update(audio="missing.wav"))
    with pytest.raises(DataError, match="cannot read an utterance.*missing.wav"):
        _read_all(data)


def test_a_file_given_as_the_data_directory_is_named_a_file(tmp_path):
    """--data config.yaml had been told "data directory ... does not exist"; the check comes before
    the checkpoint (missing here) is read."""
    import pytest

    from qswap.errors import DataError

    with pytest.raises(DataError, match=r"^--data .*config\.yaml is a file, not a data directory; pass --data DIR, "
                                        r"the directory with the config\.yaml .*\(its directory .*s2t_demo holds a "
                                        r"config\.yaml: --data .*s2t_demo\?\)$"):
        load_model_and_task(tmp_path / "missing.pt", f"{ASSET}/config.yaml")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt is a file, not a data directory; pass --data DIR, [^(]*$"):
        load_model_and_task(tmp_path / "missing.pt", tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"^data directory .*nowhere does not exist; pass --data DIR"):
        load_model_and_task(tmp_path / "missing.pt", tmp_path / "nowhere")


def test_an_utterance_without_frames_is_a_data_error_naming_it(tmp_path):
    """A row whose features have 0 frames (a clip shorter than one 25 ms window): fairseq's beam
    search had run to max_len and raised a raw AssertionError ('200 < 200'), naming nothing."""
    import numpy as np

    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    np.save(data / "empty.npy", np.zeros((0, 80), np.float32))
    lines = (data / "train_calib.tsv").read_text().splitlines()
    third = lines[4].split("\t")[0]  # the id of manifest row index 3
    _rows_changed(data, lambda row: row.update(audio="empty.npy", n_frames="0") if row["id"] == third else None)
    with pytest.raises(DataError, match=r"utterance\(s\) 3 \(their manifest row indices\) have no input frames"):
        _read_all(data)


def test_a_manifest_with_a_byte_order_mark_is_told_so(tmp_path):
    """A manifest saved with a UTF-8 BOM (its header read as '\\ufeffid'): the error had said it
    needs a header with id, which it has."""
    from qswap.errors import DataError

    data = _calib_copy(tmp_path)
    manifest = data / "train_calib.tsv"
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    with pytest.raises(DataError, match="starts with a UTF-8 byte-order mark.*save it as UTF-8 without a BOM"):
        _read_all(data)


def _w2v_subset(root, second, tsv=None, ltr="A B |\nB A |\n", samples=16000):
    """A 2-row wav2vec 2.0 (audio_finetuning) subset 'valid' whose second WAV ``second(path)`` writes
    (``samples`` long, each); ``tsv(root)`` / ``ltr``: other manifest / label file text."""
    import numpy as np
    import soundfile as sf
    from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask
    from omegaconf import OmegaConf

    (root / "wav").mkdir(parents=True)
    sf.write(root / "wav/0.wav", (0.1 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32), 16000)
    second(root / "wav/1.wav")
    (root / "valid.tsv").write_text(tsv(root) if tsv else f"{root}\nwav/0.wav\t{samples}\nwav/1.wav\t{samples}\n")
    (root / "valid.ltr").write_text(ltr)
    (root / "dict.ltr.txt").write_text("| 1\nA 1\nB 1\n")
    cfg = OmegaConf.structured(AudioFinetuningConfig(data=str(root), labels="ltr", sample_rate=16000, tpu=False))
    return AudioFinetuningTask.setup_task(cfg)


def _noise(samples):
    import numpy as np
    import soundfile as sf

    return lambda p: sf.write(p, (0.1 * np.random.default_rng(1).standard_normal(samples)).astype(np.float32), 16000)


def test_wav2vec2_utterances_of_ordinary_length_are_batched(tmp_path):
    """A wav2vec 2.0 batch bound counts samples: the 40,000 fbank frames of speech_to_text had been
    2.5 s of audio, and every longer utterance a raw AssertionError; one longer than the default bound
    gets a batch of its own."""
    from qswap.integration.data import MAX_SAMPLES, batch_count, batches

    task = _w2v_subset(tmp_path / "w2v", _noise(48000), samples=48000)  # 3 s each
    got = list(batches(task, "valid"))
    assert sum(len(s["id"]) for s in got) == 2 and got[0]["net_input"]["source"].shape[-1] == 48000
    long = MAX_SAMPLES + 16000
    task = _w2v_subset(tmp_path / "long", _noise(long), tsv=lambda r: f"{r}\nwav/0.wav\t16000\nwav/1.wav\t{long}\n")
    assert batch_count(task, "valid") == 2  # the long one alone
    assert sorted(int(i) for s in batches(task, "valid") for i in s["id"]) == [0, 1]


@pytest.mark.parametrize("tsv, ltr, match", [
    (lambda r: f"{r}\nwav/0.wav\t16000\nwav/1.wav\t16000\n\n", "A B |\nB A |\n", "valid.tsv line 4 is blank"),
    (lambda r: f"{r}\nwav/0.wav\t16000\n\nwav/1.wav\t16000\n", "A B |\nB A |\n", "valid.tsv line 3 is blank"),
    (lambda r: f"{r}\nwav/0.wav\t16000\tx\nwav/1.wav\t16000\n", "A B |\nB A |\n",
     "line 2 has 3 tab-separated field"),
    (lambda r: f"{r}\nwav/0.wav\nwav/1.wav\t16000\n", "A B |\nB A |\n", "line 2 has 1 tab-separated field"),
    (lambda r: f"{r}\nwav/0.wav\tmany\nwav/1.wav\t16000\n", "A B |\nB A |\n", "'many' samples, not a whole"),
    (lambda r: f"{r}\nwav/0.wav\t16000\nwav/1.wav\t16000\n", "A B |\n", "valid.ltr has 1 line.*2 audio line"),
    (lambda r: "wav/0.wav\t16000\nwav/1.wav\t16000\n", "A B |\nB A |\n", "no audio root on its first line .it reads"),
], ids=["trailing-blank", "blank", "three-fields", "no-count", "count-not-number", "labels-short", "no-root"])
def test_wav2vec2_manifest_mistakes_are_data_errors_naming_the_line(tmp_path, tsv, ltr, match):
    """fairseq's raw audio reader asserts on them (a bare AssertionError, an empty message for a
    trailing blank line), which had come through as tracebacks."""
    from qswap.errors import DataError
    from qswap.integration.data import batches

    task = _w2v_subset(tmp_path / "w2v", _noise(16000), tsv=tsv, ltr=ltr)
    with pytest.raises(DataError, match=match):
        list(batches(task, "valid"))


def test_a_zip_entry_with_a_wrong_pointer_is_a_data_error(tmp_path):
    """'<zip>:<offset>' or '<zip>:<a>:<b>:<c>' (fairseq's parse_path asserts) in either manifest kind,
    and an offset into a zip of WAVs that lands off an entry (fairseq asserts on the bytes)."""
    import zipfile

    from qswap.errors import DataError
    from qswap.integration.data import batches

    data = _calib_copy(tmp_path)
    first = (data / "train_calib.tsv").read_text().splitlines()[1].split("\t")[1]
    _rows_changed(data, lambda row: row.update(audio=first + ":3"))
    with pytest.raises(DataError, match="zip entry is '<zip>:<byte offset>:<byte length>'"):
        _read_all(data)

    def zipped(pointer):  # the second WAV stored in a zip, named by ``pointer``
        def tsv(root):
            with zipfile.ZipFile(root / "a.zip", "w", zipfile.ZIP_STORED) as z:
                z.write(root / "wav/1.wav", "1.wav")
            return f"{root}\nwav/0.wav\t16000\na.zip:{pointer}\t16000\n"
        return tsv

    for name, pointer, match in (("w2v", "1:2:3", "neither a file nor a zip entry"),
                                 ("w2v_shifted", "3:2000", "not WAV/FLAC audio")):
        task = _w2v_subset(tmp_path / name, _noise(16000), tsv=zipped(pointer))
        with pytest.raises(DataError, match=match):
            list(batches(task, "valid", max_sentences=1))


def _cmvn_data(tmp_path, stats, path="gcmvn.npz"):
    """The shipped data with global CMVN (stats written by ``stats(file)``, named ``path`` in config.yaml)."""
    import numpy as np
    import yaml

    data = _calib_copy(tmp_path)
    config = yaml.safe_load((data / "config.yaml").read_text())
    config["transforms"] = {"*": ["global_cmvn"]}
    config["global_cmvn"] = {"stats_npz_path": path}
    (data / "config.yaml").write_text(yaml.safe_dump(config))
    if stats is not None:
        stats(data / "gcmvn.npz")
    return data, np


def test_global_cmvn_stats_fairseq_reads_are_taken(tmp_path):
    """Stats of shape (1, 80) broadcast as fairseq applies them; broken stats named only by the
    ``_train`` transforms are not read for a test subset (both had been refused)."""
    import numpy as np
    import yaml

    data, _ = _cmvn_data(tmp_path, lambda f: np.savez(f, mean=np.zeros((1, 80), np.float32),
                                                       std=np.ones((1, 80), np.float32)))
    assert len(_read_all(data)) > 0
    config = yaml.safe_load((data / "config.yaml").read_text())
    config["transforms"] = {"*": ["utterance_cmvn"], "_train": ["global_cmvn"]}
    (data / "config.yaml").write_text(yaml.safe_dump(config))
    np.savez(data / "gcmvn.npz", mean=np.zeros(40), std=np.zeros(40))
    (data / "test_copy.tsv").write_text((data / "train_calib.tsv").read_text())
    assert len(_read_all(data, "test_copy")) > 0


def test_wav2vec2_manifests_fairseq_reads_are_taken(tmp_path):
    """A blank root line with absolute paths, and a sample count written '+16000' or '16_000' (fairseq's
    int() reads them), had been refused by qswap's pre-check."""
    from qswap.integration.data import batches

    task = _w2v_subset(tmp_path / "w2v", _noise(16000),
                       tsv=lambda r: f"\n{r}/wav/0.wav\t+16000\n{r}/wav/1.wav\t16_000\n")
    assert sum(len(s["id"]) for s in batches(task, "valid")) == 2


def test_a_relative_global_cmvn_path_is_read_from_the_data_directory(tmp_path, monkeypatch):
    """fairseq opens it relative to the working directory: run from elsewhere, the error had said the
    subset's TSV was missing."""
    import numpy as np

    data, _ = _cmvn_data(tmp_path, lambda f: np.savez(f, mean=np.zeros(80, np.float32), std=np.ones(80, np.float32)))
    monkeypatch.chdir(tmp_path)
    assert len(_read_all(data)) > 0


@pytest.mark.parametrize("stats, match", [
    (None, r"global CMVN stats .*gcmvn.npz \(config.yaml: global_cmvn: stats_npz_path\) not found"),
    (lambda np, f: np.savez(f, mean=np.zeros(40), std=np.ones(40)), "mean has shape .40,., the features have 80"),
    (lambda np, f: np.savez(f, mean=np.zeros(80), std=np.zeros(80)), "std is 0 in 80 channel"),
    (lambda np, f: np.savez(f, mu=np.zeros(80), sigma=np.ones(80)), "hold no array mean or std .they hold mu, sigma."),
    (lambda np, f: np.savez(f, mean=np.full(80, np.nan), std=np.ones(80)), "mean holds NaN or inf"),
], ids=["missing", "dims", "zero-std", "keys", "nan"])
def test_broken_global_cmvn_stats_are_blamed_on_the_stats(tmp_path, stats, match):
    """They had been reported as a malformed manifest, an unreadable utterance, or NaN in every utterance."""
    from qswap.errors import DataError

    import numpy as np
    data, _ = _cmvn_data(tmp_path, None if stats is None else (lambda f: stats(np, f)))
    with pytest.raises(DataError, match=match):
        _read_all(data)


@pytest.mark.parametrize("case, match", [
    ("8 kHz", "sampled at 8000 Hz and the task reads 16000 Hz; resample it"),
    ("missing", r"1 audio file\(s\) of its manifest do not exist, the first .*wav/1.wav"),
    ("not audio", "cannot read an utterance .*Failed to load .*1.wav"),
    ("empty", r"utterance\(s\) 1 \(their manifest row indices\) have no input frames"),
    ("cut short", r"audio file .*wav/1.wav is cut short: its header declares 16000 frames and it holds 7978"),
])
def test_wav2vec2_audio_that_cannot_be_read_is_a_data_error(tmp_path, case, match):
    """fairseq's raw audio reader raises plain Exceptions (after seconds of retries for a missing
    file), which had come through as raw tracebacks; a WAV cut short it reads as the shorter file."""
    import numpy as np
    import soundfile as sf

    from qswap.errors import DataError
    from qswap.integration.data import batches

    second = {"8 kHz": lambda p: sf.write(p, np.zeros(8000, np.float32), 8000),
              "missing": lambda p: None,
              "not audio": lambda p: p.write_bytes(b"garbage"),
              "empty": lambda p: sf.write(p, np.zeros(0, np.float32), 16000),
              "cut short": lambda p: (_noise(16000)(p), p.write_bytes(p.read_bytes()[:16000]))}[case]
    task = _w2v_subset(tmp_path / "w2v", second)
    with pytest.raises(DataError, match=match):
        list(batches(task, "valid", max_sentences=1))


def test_references_with_unknown_words_are_said(tmp_path):
    """A tgt_text the target dictionary cannot spell (here characters its SentencePiece model never
    saw) becomes '<unk>' in the reference, which no hypothesis matches: scored without a word, it
    had inflated every WER."""
    import itertools

    from qswap.errors import QswapWarning
    from qswap.integration.data import batches
    from qswap.integration.decode import decode

    data = _calib_copy(tmp_path)
    lines = (data / "train_calib.tsv").read_text().splitlines()
    second = lines[2].split("\t")[0]  # the id of manifest row index 1
    _rows_changed(data, lambda row: row.update(tgt_text="ÆØÅ ÞÐ") if row["id"] == second else None)
    model, task = load_model_and_task(f"{ASSET}/checkpoint.pt", str(data))
    with pytest.warns(QswapWarning, match=r"1 of 32 references hold <unk> \(utterance\(s\) 1\).*normalize"):
        result = decode(task, model, itertools.islice(batches(task, "train_calib", max_sentences=32), 1), beam=1)
    assert "<unk>" in result.utterances[1].ref
