"""``qswap audit``: exit codes, and the JSON and Markdown reports, on a real fairseq checkpoint
saved the way fairseq-train saves one (``cfg`` + ``model`` state_dict)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datadir import make_s2t_datadir
from qswap.cli import main

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"

SMALL = ["--arch", "s2t_transformer", "--encoder-layers", "1", "--decoder-layers", "1",
         "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
         "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
         "--conv-channels", "32", "--share-decoder-input-output-embed"]


def save_fairseq_checkpoint(data, path, task=("--task", "speech_to_text")):
    """Build the model with fairseq's own parser, task and builder; save cfg + state_dict."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data), *task, *SMALL])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    torch.save({"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                "model": model.state_dict(), "extra_state": {"epoch": 1}, "last_optimizer_state": None,
                "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                                       "optimizer_name": "FairseqAdam", "lr_scheduler_state": {},
                                       "num_updates": 0}]}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_cli")
    data = make_s2t_datadir(root / "data", {"train": 2, "test": 3})
    return save_fairseq_checkpoint(data, root / "checkpoint.pt"), data


def test_w8a8_is_honest_exit_0_with_json_and_markdown(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out_json, out_md = tmp_path / "audit.json", tmp_path / "audit.md"
    code = main(["audit", str(ckpt), "--recipe", "w8a8", "--synthetic", "2", "--json", str(out_json),
                 "--markdown", str(out_md)])
    assert code == 0
    assert "HONEST" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["verdict"] == "honest" and report["honest"] and report["recipe"] == "w8a8"
    assert report["paths"][2].startswith("incremental decoding")
    assert report["totals"]["float"] == 0 and report["totals"]["quantized"] > 0
    # 32: the bias quantizers, which run with the float insides (the integer ones use int32 bias codes)
    assert "8" in report["bits_histogram"] and set(report["bits_histogram"]) <= {"8", "32"}
    markdown = out_md.read_text()
    assert "Verdict: **HONEST**" in markdown and "## Paths covered" in markdown


def test_weight_only_is_dishonest_exit_1_and_lists_every_violation(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out_json, out_md = tmp_path / "audit.json", tmp_path / "audit.md"
    code = main(["audit", str(ckpt), "--recipe", "w8_weight_only", "--max-rows", "3",
                 "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 1
    assert "NOT HONEST" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["verdict"] == "dishonest" and len(report["violations"]) > 3
    first = report["violations"][0]
    assert set(first) >= {"module", "op", "operand", "shape", "dtype", "reason", "source", "count"}
    assert {v["op"] for v in report["violations"]} >= {"aten.native_layer_norm", "aten._softmax"}
    markdown = out_md.read_text()
    assert "Verdict: **NOT HONEST**" in markdown and "`aten.native_layer_norm`" in markdown


def test_values_runs_the_value_level_check_beside_the_tags(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    out_json = tmp_path / "audit.json"
    assert main(["audit", str(ckpt), "--recipe", "w8a8", "--values", "--json", str(out_json)]) == 0
    assert "value-level check: honest, 0 disagreement(s)" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["values_verdict"] == "honest" and report["value_disagreements"] == []
    out_md = tmp_path / "audit.md"
    assert main(["audit", str(ckpt), "--recipe", "w8_weight_only", "--values", "--json", str(out_json),
                 "--markdown", str(out_md)]) == 1
    report = json.loads(out_json.read_text())
    assert report["values_verdict"] == "dishonest"
    # the Markdown carries the value-level check too (it had only been on the terminal and in the JSON)
    markdown = out_md.read_text()
    assert f"## Value-level check: dishonest ({len(report['value_disagreements'])} disagreement(s)" in markdown
    assert "undeclared dynamic range: no" in markdown


def test_a_data_subset_can_be_audited(checkpoint):
    ckpt, data = checkpoint
    assert main(["audit", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--subset", "test"]) == 0


def test_strict_fails_on_declared_exceptions(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    recipe = tmp_path / "weights_only_declared.yaml"
    recipe.write_text("version: 1\nname: w8_declared\ndefaults:\n  weight: {bits: 8}\n"
                      "  activation: null\nfloat_ok:\n  '*': weight-only study, activations float\n")
    assert main(["audit", str(ckpt), "--recipe", str(recipe)]) == 0
    assert main(["audit", str(ckpt), "--recipe", str(recipe), "--strict"]) == 1


def test_strict_says_why_an_honest_verdict_fails_it(checkpoint, capsys, tmp_path):
    """The report headlines HONEST (with declared exceptions); --strict's exit status 1 comes with a
    line that says what strict mode refused."""
    ckpt, _ = checkpoint
    recipe = tmp_path / "weights_only_declared.yaml"
    recipe.write_text("version: 1\nname: w8_declared\ndefaults:\n  weight: {bits: 8}\n"
                      "  activation: null\nfloat_ok:\n  '*': weight-only study, activations float\n")
    assert main(["audit", str(ckpt), "--recipe", str(recipe), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "--strict: NOT STRICTLY HONEST: declared float exceptions" in " ".join(out.split())


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "w8a8", "--synthetic", "2", "--subset", "test"], "not both"),
    (["--recipe", "w8a8", "--subset", "test"], "--subset needs --data"),
    ([], "needs --recipe"),
    (["--recipe", "no_such_recipe"], "no shipped recipe"),
    (["--recipe", "w8a8", "--json", "/nonexistent/dir/audit.json"], "audit.json"),
])
def test_usage_and_input_errors_exit_2(checkpoint, capsys, extra, message):
    ckpt, _ = checkpoint
    assert main(["audit", str(ckpt), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_float_checkpoint_without_recipe_or_data_is_told_it_needs_a_recipe(tmp_path, monkeypatch, capsys):
    """The missing --data (the task's setup fails first) had been reported, and only after adding
    it the missing --recipe. A qswap checkpoint needs no recipe: its message stays the loader's."""
    monkeypatch.chdir(tmp_path)  # the asset's task reads config.yaml from '.': not here
    assert main(["audit", str(ASSET / "checkpoint.pt")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is a float checkpoint: it needs --recipe R" in err and "--data DIR" in err
    assert main(["audit", str(ASSET / "qat_w4a8.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot set up fairseq task" in err and "needs --recipe" not in err


def test_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing.pt"), "--recipe", "w8a8"]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_the_shipped_asset_audits_a_data_subset_from_another_directory(tmp_path, monkeypatch, capsys):
    """The asset's manifests are relative to its data directory (no audio_root): the audit reads
    them through the same loader as `qswap eval`, from any working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["audit", str(ASSET / "checkpoint.pt"), "--recipe", "w8a8", "--data", str(ASSET),
                 "--subset", "test", "--count", "1", "--decode-steps", "1"]) == 0
    assert "HONEST" in capsys.readouterr().out


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory):
    """A checkpoint as fairseq-train --task speech_to_text_qswap --qswap-recipe w8a8 saves one:
    the plugin task in its cfg, the quantizer buffers in its state_dict (built, not trained)."""
    from qswap.integration.fairseq_task import register_tasks

    register_tasks()
    root = tmp_path_factory.mktemp("audit_qat")
    data = make_s2t_datadir(root / "data", {"train": 2, "test": 3})
    path = save_fairseq_checkpoint(data, root / "checkpoint.pt",
                                   task=["--task", "speech_to_text_qswap", "--qswap-recipe", "w8a8"])
    state = torch.load(path, weights_only=False)
    assert state["cfg"]["task"]._name == "speech_to_text_qswap"  # a Namespace: a legacy task
    assert any(k.endswith("input_quant.scale") for k in state["model"])
    return path, data


def test_a_checkpoint_of_the_plugin_task_audits_in_a_fresh_process(qat_checkpoint):
    """No plugin imported first (a new process): the audit registers qswap's tasks itself."""
    ckpt, _ = qat_checkpoint
    proc = subprocess.run([sys.executable, "-m", "qswap.cli", "audit", str(ckpt), "--synthetic", "1",
                           "--decode-steps", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "not registered" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recipe w8a8" in proc.stdout


@pytest.mark.parametrize("recipe", ["w8a8", str(REPO / "recipes" / "w8a8.yaml")])
def test_recipe_given_by_name_or_path_matches_the_stored_one(qat_checkpoint, recipe):
    ckpt, _ = qat_checkpoint
    assert main(["audit", str(ckpt), "--recipe", recipe, "--synthetic", "1", "--decode-steps", "1"]) == 0


def test_a_different_recipe_than_the_stored_one_exits_2(qat_checkpoint, capsys):
    ckpt, _ = qat_checkpoint
    assert main(["audit", str(ckpt), "--recipe", str(REPO / "recipes" / "w4a8.yaml"), "--synthetic", "1"]) == 2
    assert "already quantized with recipe 'w8a8'" in capsys.readouterr().err


def test_another_recipe_of_the_stored_name_exits_2(qat_checkpoint, capsys, tmp_path):
    """A file named w8a8 with other settings (4-bit weights): only the names had been compared, and
    the stored 8-bit recipe was audited under the file's name."""
    ckpt, _ = qat_checkpoint
    other = tmp_path / "w8a8.yaml"
    text = (REPO / "recipes" / "w8a8.yaml").read_text()
    assert "bits: 8, symmetric: true" in text
    other.write_text(text.replace("bits: 8, symmetric: true", "bits: 4, symmetric: true", 1))
    assert main(["audit", str(ckpt), "--recipe", str(other), "--synthetic", "1"]) == 2
    assert "is another recipe of that name" in capsys.readouterr().err


def test_a_report_path_under_a_regular_file_exits_2(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    (tmp_path / "file").write_text("not a directory")
    assert main(["audit", str(ckpt), "--recipe", "w8a8", "--synthetic", "1",
                 "--json", str(tmp_path / "file" / "audit.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
