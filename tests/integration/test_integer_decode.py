"""qswap.integration.integer_decode: the task and dictionary an export records to decode again,
and decoding an export with fairseq's beam search."""
import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.errors import DataError, ExportError, LoadError  # noqa: E402
from qswap.export.integer_format import write_integer_model  # noqa: E402
from qswap.export.integer_load import load_integer_model  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402
from qswap.integration.integer_decode import decode_exported, exported_task, task_config  # noqa: E402
from qswap.io.dictionary import dictionary_facts  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


@pytest.fixture(scope="module")
def tiny_export(float_checkpoint, tmp_path_factory):
    """The tiny fairseq-trained model, w8a8, exported with its task and dictionary."""
    _, data, ckpt = float_checkpoint
    model, cfg, task = fdata.load_model_cfg_task(ckpt, data)
    q = qswap.convert(model, "w8a8")
    qswap.calibrate(q, fdata.net_inputs(task, "train", 2, max_sentences=4))
    out = tmp_path_factory.mktemp("tiny_export")
    write_integer_model(qswap.integerize(q), out, task=task_config(cfg),
                        decoding=dictionary_facts(task.target_dictionary))
    return out, data


def test_an_export_decodes_with_the_data_directory_it_names(tiny_export):
    out, data = tiny_export
    exported = load_integer_model(out)
    assert exported.task["_name"] == "speech_to_text" and exported.decoding["size"] > 4
    task = exported_task(exported, data)
    result = decode_exported(task, exported, fdata.batches(task, "test", max_sentences=3))
    assert len(result.utterances) == 6 and all(u.ref for u in result.utterances)


def test_another_dictionary_is_a_data_error(tiny_export):
    out, _ = tiny_export
    with pytest.raises(DataError, match="target dictionary .* is not the one the model was exported with .* not "):
        exported_task(load_integer_model(out), ASSET)
    with pytest.raises(DataError, match="does not exist"):
        exported_task(load_integer_model(out), ASSET / "missing")


def test_an_empty_dictionary_record_is_refused_as_an_edit(tiny_export):
    """``decoding: {}`` in model.json (an edit: qswap records the facts with every task) had
    skipped the dictionary check, so another dictionary of the same size decoded other words."""
    out, data = tiny_export
    exported = dataclasses.replace(load_integer_model(out), decoding={})
    with pytest.raises(LoadError, match="records no fairseq task or target dictionary"):
        exported_task(exported, data)


def test_an_export_without_task_or_encoder_decoder_cannot_be_decoded(tmp_path):
    torch.manual_seed(0)
    q = qswap.convert(torch.nn.Sequential(torch.nn.Linear(4, 3)), "w8a8")
    qswap.calibrate(q, [torch.randn(5, 4)])
    write_integer_model(qswap.integerize(q), tmp_path)
    exported = load_integer_model(tmp_path)
    with pytest.raises(LoadError, match="records no fairseq task"):
        exported_task(exported, ASSET)
    with pytest.raises(ExportError, match="IntegerModel has no integer decoding yet .only the S2T encoder-decoder models and wav2vec 2.0 CTC"):
        decode_exported(None, exported, [])


def test_a_task_that_reads_its_dictionary_late_gives_a_data_error(tmp_path):
    """fairseq's audio_finetuning task reads dict.ltr.txt only when its dictionary is asked for:
    an integer CTC export decoded with a data directory without one is a DataError."""
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from export_testkit import calibrated_ctc
    from qswap.models import make_dictionary

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = calibrated_ctc()
    write_integer_model(qswap.integerize(qmodel), tmp_path, task={"_name": "audio_finetuning", "data": "/x", "labels": "ltr"},
                        decoding=dictionary_facts(make_dictionary()))
    with pytest.raises(DataError, match="cannot read the target dictionary of task 'audio_finetuning'"):
        exported_task(load_integer_model(tmp_path), ASSET)


def test_a_file_given_as_the_data_directory_of_an_export_is_named_a_file(tmp_path):
    """exported_task: --data config.yaml had been told "data directory ... does not exist"."""
    from types import SimpleNamespace

    exported = SimpleNamespace(task={"_name": "speech_to_text"}, decoding={"size": 5}, path=tmp_path)
    with pytest.raises(DataError, match=r"config\.yaml is a file, not a data directory; pass --data DIR, the "
                                        r"directory with the config\.yaml, dictionary and TSV manifests"):
        exported_task(exported, ASSET / "config.yaml")


def test_an_export_recording_an_unknown_task_says_so_not_that_data_is_wrong(tmp_path):
    """A hand-edited task name in model.json was blamed on --data ('point it at the folder with
    the task's config'); it is a task fairseq does not know."""
    from types import SimpleNamespace

    exported = SimpleNamespace(task={"_name": "no_such_task"}, decoding={"size": 5}, path=tmp_path)
    with pytest.raises(DataError, match="records fairseq task 'no_such_task', which is not a registered fairseq "
                                        "task .*edited or needs a fairseq plugin"):
        exported_task(exported, ASSET)
