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
    for recipe in ("w4a8", "w8a8"):  # the w8a8 model is the one the tests compare with
        qmodel = qswap.convert(model.float().eval(), recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qswap.calibrate(qmodel, [s2t_net_input(2, 120, 80, 2, 200, seed=s) for s in range(2)])
        save_qswap_checkpoint(root / f"{recipe}.pt", qmodel, str(ASSET / "checkpoint.pt"))
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
    with pytest.raises(ExportError, match="not calibrated.*qswap calibrate .*uncalibrated.pt --data DIR -o"):
        export_cmd.run(parse(root / "uncalibrated.pt", "--onnx", "-o", tmp_path, "--data", ASSET))


def test_float_checkpoint_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match="float checkpoint"):
        export_cmd.run(parse(ASSET / "checkpoint.pt", "--onnx", "-o", tmp_path, "--data", ASSET))


def test_a_failed_export_removes_nothing_from_its_output_folder(tmp_path):
    """A folder holding only an integer export's tensor file (what a stopped integer export leaves)
    had been emptied before the checkpoint was even loaded, by a command that then failed, and by
    --onnx, which writes no such file: an ONNX export refuses that folder now."""
    from qswap.errors import OutputError

    tensor = tmp_path / "model.0123456789abcdef.safetensors"
    tensor.write_bytes(b"x")
    with pytest.raises(ExportError, match="float checkpoint"):
        export_cmd.run(parse(ASSET / "checkpoint.pt", "-o", tmp_path, "--data", ASSET))
    assert tensor.exists()
    with pytest.raises(OutputError, match="is a folder with other files, not an ONNX export"):
        export_cmd.run(parse(ASSET / "checkpoint.pt", "--onnx", "-o", tmp_path, "--data", ASSET))
    assert tensor.exists()


@pytest.fixture(scope="module")
def export_dir(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    assert main(["export", str(checkpoints[0] / "w8a8.pt"), "--onnx", "-o", str(out), "--data", str(ASSET)]) == 0
    return out


def test_eval_with_onnxruntime_decodes_the_export_directory(export_dir, tmp_path, capsys):
    assert main(["eval", str(export_dir), "--backend", "onnxruntime", "--data", str(ASSET),
                 "--subset", "train_calib", "--beam", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert "w8a8 (onnxruntime): 32 utterances of train_calib" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "w8a8 (onnxruntime)" and result["counts"]["wer"] < 100
    assert sum(bool(u["hyp"]) for u in result["utterances"]) == 32


def test_eval_with_onnxruntime_decodes_a_w4a8_export_stored_as_int4(checkpoints, tmp_path, capsys):
    import onnx

    out = tmp_path / "w4a8"
    assert main(["export", str(checkpoints[0] / "w4a8.pt"), "--onnx", "-o", str(out), "--data", str(ASSET)]) == 0
    for graph in ("encoder", "cross_kv", "decoder_step"):
        model = onnx.load(str(out / f"{graph}.onnx"))
        assert any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer), graph
    assert main(["eval", str(out), "--backend", "onnxruntime", "--data", str(ASSET), "--subset", "train_calib",
                 "--beam", "2", "--json", str(tmp_path / "r.json")]) == 0
    assert "w4a8 (onnxruntime): 32 utterances of train_calib" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["counts"]["wer"] < 100 and sum(bool(u["hyp"]) for u in result["utterances"]) == 32


def test_eval_onnxruntime_rejects_a_recipe_and_a_directory_without_export(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime", "--data", str(ASSET), "--recipe", "w8a8"]) == 2
    assert "--recipe" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime", "--data", str(ASSET)]) == 2
    assert "no export.json" in capsys.readouterr().err


def test_the_onnx_commands_say_what_to_pass_for_a_checkpoint_file_or_an_integer_export(tmp_path, capsys):
    """A checkpoint file is not an export directory (not 'unreadable: re-export'); an integer
    export (model.json) is decoded without --backend onnxruntime."""
    ckpt = tmp_path / "q.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "int").mkdir()
    (tmp_path / "int" / "model.json").write_text("{}")
    for argv in (["eval", str(ckpt), "--backend", "onnxruntime", "--data", str(ASSET)], ["audit", str(ckpt), "--onnx"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a file, not an export directory" in err and "re-export" not in err
    assert main(["eval", str(tmp_path / "int"), "--backend", "onnxruntime", "--data", str(ASSET)]) == 2
    assert "it holds an integer model" in capsys.readouterr().err


def test_audit_onnx_lists_float_nodes_and_says_the_honest_claim_deploys_float(export_dir, tmp_path, capsys):
    code = main(["audit", str(export_dir), "--onnx", "--optimized-dir", str(tmp_path / "opt"),
                 "--json", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "a.md"), "--max-rows", "3"])
    assert code == 1  # LayerNorm, Softmax and residual adds stay float in onnxruntime's CPU graph
    printed = capsys.readouterr().out
    assert "CLAIMS HONEST, DEPLOYS FLOAT" in printed and "float nodes" in printed
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["recipe"] == "w8a8" and report["claims_honest"] is True
    assert [g["graph"] for g in report["graphs"]] == ["encoder.onnx", "cross_kv.onnx", "decoder_step.onnx"]
    assert report["float_count"] == sum(len(g["float_nodes"]) for g in report["graphs"]) > 0
    assert report["integer_count"] > 0 and report["graphs"][0]["integer_ops"]["QLinearConv"] == 2
    sites = {n["site"] for g in report["graphs"] for n in g["float_nodes"]}
    assert any(s.startswith("encoder.transformer_layers.") for s in sites)
    assert any(s.startswith("decoder.layers.") for s in sites)
    md = (tmp_path / "a.md").read_text()
    assert md.startswith("# qswap deploy audit") and "## Deploy honesty: decoder_step.onnx" in md
    assert sorted(p.name for p in (tmp_path / "opt").iterdir()) == [
        "cross_kv.all.onnx", "decoder_step.all.onnx", "encoder.all.onnx"]
    onnx = pytest.importorskip("onnx")
    onnx.load(str(tmp_path / "opt" / "encoder.all.onnx"))  # a complete graph


def test_audit_onnx_of_an_incomplete_export_writes_no_optimized_graph(export_dir, tmp_path, capsys):
    """A graph missing: refused before any optimized graph is written (the folder and the graphs
    before the missing one were left), the manifest names it; claims_honest not a verdict: refused
    (a KeyError rendering the Markdown no one asked for)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "decoder_step.onnx").unlink()
    assert main(["audit", str(copy), "--onnx"]) == 2
    assert "decoder_step.onnx: no ONNX graph there (the decoder_step graph export.json names)" in capsys.readouterr().err
    assert not (copy / "optimized").exists()
    assert main(["audit", str(copy), "--onnx", "--optimized-dir", str(tmp_path / "new" / "opt")]) == 2
    assert not (tmp_path / "new").exists()
    shutil.copy(export_dir / "decoder_step.onnx", copy / "decoder_step.onnx")
    manifest = json.loads((copy / "export.json").read_text())
    (copy / "export.json").write_text(json.dumps({**manifest, "claims_honest": "yes"}))
    assert main(["audit", str(copy), "--onnx"]) == 2
    assert "malformed manifest (claims_honest is 'yes')" in capsys.readouterr().err
    assert not (copy / "optimized").exists()


def test_audit_onnx_refuses_an_optimized_dir_that_holds_an_export(export_dir, tmp_path, capsys):
    """--optimized-dir pointing at another export's folder (an ONNX or an integer export) had put the
    optimized graphs among its files, where a later export over it kept them (describing another
    model). Refused before anything is written. (The audited folder itself is an input: refused too.)"""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(export_dir, other)
    before = sorted(p.name for p in other.iterdir())
    assert main(["audit", str(export_dir), "--onnx", "--optimized-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--optimized-dir {other} holds an ONNX export (export.json)" in err and "pass another folder" in err
    assert sorted(p.name for p in other.iterdir()) == before
    assert main(["audit", str(export_dir), "--onnx", "--optimized-dir", str(export_dir)]) == 2
    assert "is also an input of this command" in capsys.readouterr().err
    integer = tmp_path / "integer"
    integer.mkdir()
    (integer / "model.json").write_text(json.dumps({"format": __import__(
        "qswap.export.integer_format", fromlist=["FORMAT"]).FORMAT}))
    assert main(["audit", str(export_dir), "--onnx", "--optimized-dir", str(integer)]) == 2
    assert "holds an integer model export (model.json)" in capsys.readouterr().err
    assert sorted(p.name for p in integer.iterdir()) == ["model.json"]


def test_audit_onnx_rejects_fake_quant_options(export_dir, capsys):
    assert main(["audit", str(export_dir), "--onnx", "--recipe", "w8a8", "--values"]) == 2
    assert "--recipe, --values" in capsys.readouterr().err


def test_an_empty_output_path_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """``-o ""`` would write the export into the working directory: refused before anything runs."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(tmp_path / "absent.pt"), "--onnx", "-o", ""]) == 2
    assert "--output is empty" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_export_stopped_by_sigterm_leaves_nothing_and_its_leftovers_do_not_block_the_next(
        checkpoints, tmp_path, capsys, monkeypatch):
    """SIGTERM ended the process with no Python code run: the staged encoder graph stayed in the
    folder the export made, and the same command was then refused (a folder of other files)."""
    import os
    import signal
    import time

    import qswap.export.decoder_step as decoder_step

    root, _ = checkpoints
    out = tmp_path / "new" / "deploy"

    def killed(*args, **kwargs):  # the encoder and cross_kv graphs staged: a scheduler stops the job
        assert (out / ".encoder.onnx.partial").is_file()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the export")

    def guard(signum, frame):  # SIGTERM outside qswap's handler fails the test (and spares pytest)
        raise AssertionError("SIGTERM reached the test's own handler: the command installed none")

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        with monkeypatch.context() as m:
            m.setattr(decoder_step, "export_decoder_step", killed)
            code = main(["export", str(root / "w8a8.pt"), "--onnx", "-o", str(out), "--data", str(ASSET)])
        assert signal.getsignal(signal.SIGTERM) is guard  # qswap's handler only while a command runs
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "terminated (SIGTERM)" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folders it made, and the staged graphs, taken away
    # a process killed outright (SIGKILL) leaves its staged files: qswap's own, which the next export clears
    out.mkdir(parents=True)
    (out / ".encoder.onnx.partial").write_bytes(b"half")
    (out / ".export.json.1f2e3d4c.tmp").write_text("{")
    assert main(["export", str(root / "w8a8.pt"), "--onnx", "-o", str(out), "--data", str(ASSET)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cross_kv.onnx", "decoder_step.onnx", "encoder.onnx",
                                                     "export.json"]
    (out / ".decoder_step.onnx.partial").write_bytes(b"half")  # over an export: cleared too
    assert main(["export", str(root / "w8a8.pt"), "--onnx", "-o", str(out), "--data", str(ASSET)]) == 0
    assert not (out / ".decoder_step.onnx.partial").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # a file qswap did not write still refuses the folder
    (other / ".encoder.onnx.partial").write_bytes(b"half")
    assert main(["export", str(root / "w8a8.pt"), "--onnx", "-o", str(other), "--data", str(ASSET)]) == 2
    assert sorted(p.name for p in other.iterdir()) == [".encoder.onnx.partial", "notes.txt"]
