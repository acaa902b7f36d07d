"""``qswap export QCKPT -o DIR`` (the integer model) and ``qswap eval DIR``: the exported model
decodes the same transcripts as the integer model before export, on a tiny fairseq-trained
model with its real data directory and on the shipped model (a few utterances)."""
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from qswap.cli import main  # noqa: E402
from qswap.export.integer_format import JSON_FILE, tensor_path  # noqa: E402
from qswap.integration import data as fdata  # noqa: E402
from qswap.integration.decode import decode  # noqa: E402
from qswap.io.checkpoint import save_qswap_checkpoint  # noqa: E402
from qswap.models import s2t_net_input  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


def integer_transcripts(qckpt, data, subset, shards) -> dict[int, str]:
    """Transcripts of the integer model made from ``qckpt`` before any export (same decoding)."""
    model, task = fdata.load_model_and_task(qckpt, data)
    imodel = qswap.integerize(model)
    samples = fdata.batches(task, subset, max_sentences=3, num_shards=shards[0], shard_id=shards[1])
    result = decode(task, imodel, samples, beam=5)
    return {u.id: u.hyp for u in result.utterances}


def export_and_eval(qckpt, data, out, subset, shards, capsys):
    assert main(["export", str(qckpt), "-o", str(out), "--data", str(data)]) == 0
    assert "wrote the integer model" in capsys.readouterr().out
    assert (out / JSON_FILE).is_file() and tensor_path(out).is_file()
    result = out.parent / "eval.json"
    assert main(["eval", str(out), "--data", str(data), "--subset", subset, "--max-sentences", "3",
                 "--num-shards", str(shards[0]), "--shard-id", str(shards[1]), "--json", str(result)]) == 0
    assert "integer export (beam search, beam 5)" in capsys.readouterr().out
    return {u["id"]: u["hyp"] for u in json.loads(result.read_text())["utterances"]}


def test_tiny_fairseq_model_exports_and_decodes_the_same(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    qckpt = tmp_path / "w8a8.pt"
    assert main(["convert", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--calib-batches", "2",
                 "--max-sentences", "4", "-o", str(qckpt)]) == 0
    exported = export_and_eval(qckpt, data, tmp_path / "export", "test", (1, 0), capsys)
    assert len(exported) == 6  # two batches of 3, one shard
    assert exported == integer_transcripts(qckpt, data, "test", (1, 0))


@pytest.fixture(scope="module")
def shipped_w8a8(tmp_path_factory):
    """A w8a8 quantized checkpoint of the shipped model (calibrated on synthetic batches)."""
    from qswap.io.checkpoint import load_fairseq_model
    torch.set_num_threads(1)
    model, _cfg, _task = load_fairseq_model(ASSET / "checkpoint.pt", arg_overrides={"data": str(ASSET)})
    qmodel = qswap.convert(model.float().eval(), "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [s2t_net_input(2, 120, 80, 2, 200, seed=s) for s in range(2)])
    path = tmp_path_factory.mktemp("shipped") / "w8a8.pt"
    save_qswap_checkpoint(path, qmodel, str(ASSET / "checkpoint.pt"))
    return path


def test_shipped_model_exports_and_decodes_the_same(shipped_w8a8, tmp_path, capsys):
    shards = (34, 0)  # one batch of 3 utterances (fairseq shards batches)
    exported = export_and_eval(shipped_w8a8, ASSET, tmp_path / "export", "test", shards, capsys)
    assert len(exported) == 3 and all(exported.values())
    assert exported == integer_transcripts(shipped_w8a8, ASSET, "test", shards)


def test_export_needs_a_calibrated_checkpoint(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out"), "--data", str(data)]) == 2
    assert "float checkpoint" in capsys.readouterr().err
    qckpt = tmp_path / "dynamic.pt"
    assert main(["convert", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--no-calibrate",
                 "-o", str(qckpt)]) == 0
    assert main(["export", str(qckpt), "-o", str(tmp_path / "out"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "not calibrated" in err and "qswap calibrate" in err and not (tmp_path / "out" / JSON_FILE).exists()
    # a recipe whose transforms need activation statistics: the CLI's options, not the Python API
    assert main(["convert", str(ckpt), "--recipe", "w4a4_edges8_stream_smoothquant", "--data", str(data),
                 "--no-calibrate", "-o", str(tmp_path / "sq.pt")]) == 2
    err = capsys.readouterr().err
    assert "folds smoothquant" in err and "--calib-batches N --data DIR" in err and "qswap.convert" not in err
    assert not (tmp_path / "sq.pt").exists()


def test_eval_of_an_export_refuses_a_recipe_and_a_damaged_file(shipped_w8a8, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(shipped_w8a8), "-o", str(out), "--data", str(ASSET)]) == 0
    assert main(["eval", str(out), "--data", str(ASSET), "--recipe", "w4a8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(ASSET), "--simulate", "float"]) == 2  # not silently ignored
    assert "drop --simulate (compare with --baseline" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(ASSET), "--integer"]) == 2  # it had been accepted, doing nothing
    assert "already quantized and runs integer kernels; drop --integer" in capsys.readouterr().err
    blob = tensor_path(out).read_bytes()
    tensor_path(out).write_bytes(blob[:-10])
    assert main(["eval", str(out), "--data", str(ASSET)]) == 2
    assert "is truncated" in capsys.readouterr().err
