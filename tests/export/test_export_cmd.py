"""``qswap export QCKPT --onnx -o DIR`` on a quantized checkpoint of the shipped model."""
import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch

import qswap
from qswap.errors import ExportError
from qswap.models import s2t_net_input

pytest.importorskip("fairseq")
pytest.importorskip("onnxruntime")

from qswap.cli import export_cmd, main  # noqa: E402
from qswap.export import load_session, run_encoder  # noqa: E402
from qswap.io.checkpoint import load_fairseq_model, save_qswap_checkpoint  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


def parse(*argv):
    p = argparse.ArgumentParser()
    export_cmd.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ckpt")
    model, _cfg, _task = load_fairseq_model(ASSET / "checkpoint.pt", arg_overrides={"data": str(ASSET)})
    uncalibrated = qswap.convert(model.float().eval(), "w8a8")
    save_qswap_checkpoint(root / "uncalibrated.pt", uncalibrated, str(ASSET / "checkpoint.pt"))
    qmodel = qswap.convert(model.float().eval(), "w8a8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qswap.calibrate(qmodel, [s2t_net_input(2, 120, 80, 2, 200, seed=s) for s in range(2)])
    save_qswap_checkpoint(root / "w8a8.pt", qmodel, str(ASSET / "checkpoint.pt"))
    return root, qmodel


def test_export_writes_an_encoder_graph_onnxruntime_runs(checkpoints, tmp_path, capsys):
    root, qmodel = checkpoints
    assert export_cmd.run(parse(root / "w8a8.pt", "--onnx", "-o", tmp_path / "out", "--data", ASSET)) == 0
    printed = capsys.readouterr().out
    assert all(f"{g}.onnx" in printed for g in ("encoder", "cross_kv", "decoder_step"))
    assert json.loads((tmp_path / "out" / "export.json").read_text())["claims_honest"] is True
    assert load_session(tmp_path / "out" / "decoder_step.onnx").get_inputs()[0].name == "tokens"
    net = s2t_net_input(2, 150, 80, 2, 200, seed=9)
    out, padding = run_encoder(load_session(tmp_path / "out" / "encoder.onnx"), net["src_tokens"],
                               net["src_lengths"])
    with torch.no_grad():
        ref = qmodel.encoder(net["src_tokens"], net["src_lengths"])
    assert out.shape == ref["encoder_out"][0].shape and torch.equal(padding, ref["encoder_padding_mask"][0])


def test_uncalibrated_checkpoint_is_a_typed_error(checkpoints, tmp_path):
    root, _ = checkpoints
    with pytest.raises(ExportError, match="not calibrated"):
        export_cmd.run(parse(root / "uncalibrated.pt", "--onnx", "-o", tmp_path, "--data", ASSET))


def test_float_checkpoint_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match="float checkpoint"):
        export_cmd.run(parse(ASSET / "checkpoint.pt", "--onnx", "-o", tmp_path, "--data", ASSET))


def test_eval_with_onnxruntime_decodes_the_export_directory(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    assert main(["export", str(root / "w8a8.pt"), "--onnx", "-o", str(tmp_path / "out"), "--data", str(ASSET)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--backend", "onnxruntime", "--data", str(ASSET),
                 "--subset", "train_calib", "--beam", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert "w8a8 (onnxruntime): 32 utterances of train_calib" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "w8a8 (onnxruntime)" and result["counts"]["wer"] < 100
    assert sum(bool(u["hyp"]) for u in result["utterances"]) == 32


def test_eval_onnxruntime_rejects_a_recipe_and_a_directory_without_export(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime", "--data", str(ASSET), "--recipe", "w8a8"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime", "--data", str(ASSET)]) == 2
    assert "no export.json" in capsys.readouterr().err
