"""The plugin through fairseq's real entry points: fairseq-train (float, then QAT fine-tuning
with --finetune-from-model) and fairseq-generate with --qswap-audit. No mocks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qswap
from fairseq_run import SMALL, TRAIN, run_tool as _run

@pytest.fixture(scope="module")
def trained(float_checkpoint):
    root, data, _ = float_checkpoint
    plugin = qswap.plugin_dir()
    log = _run("fairseq-train", data, "--user-dir", plugin, "--task", "speech_to_text_qswap",
               "--qswap-recipe", "w4a8", "--qswap-calib-batches", "2", *SMALL, *TRAIN, "--max-update", "4",
               "--finetune-from-model", root / "float" / "checkpoint_last.pt", "--save-dir", root / "qat",
               cwd=root)
    return root, data, plugin, log


def test_qat_converts_calibrates_and_saves_quantizer_state(trained):
    root, _, _, log = trained
    assert "qswap: converted with recipe w4a8" in log
    assert "qswap: calibrated and froze" in log
    state = torch.load(root / "qat" / "checkpoint_last.pt", weights_only=False)
    keys = state["model"].keys()
    assert any(k.endswith("input_quant.scale") for k in keys)
    assert state["args"].qswap_recipe == "w4a8" if state.get("args") else \
        state["cfg"]["model"].qswap_recipe == "w4a8"
    frozen = [v for k, v in state["model"].items() if k.endswith("input_quant.frozen")]
    assert frozen and all(bool(v) for v in frozen)


def test_generate_loads_the_quantized_model_and_prints_the_audit(trained):
    root, data, plugin, _ = trained
    out = _run("fairseq-generate", data, "--user-dir", plugin, "--task", "speech_to_text_qswap",
               "--path", root / "qat" / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "2",
               "--max-tokens", "4000", "--cpu", "--qswap-audit", "--scoring", "wer",
               "--required-batch-size-multiple", "1", cwd=root)
    assert "qswap: converted with recipe w4a8" in out  # rebuilt from the checkpoint's own args
    assert "qswap audit:" in out
    assert "WER:" in out


def test_qswap_eval_reads_the_qat_checkpoint(trained, tmp_path):
    from qswap.cli import main

    root, data, _, _ = trained
    out = tmp_path / "qat.json"
    assert main(["eval", str(root / "qat" / "checkpoint_last.pt"), "--data", str(data), "--beam", "2",
                 "--json", str(out)]) == 0
    import json
    assert json.loads(out.read_text())["model"] == "w4a8"  # rebuilt quantized from the checkpoint


def test_plugin_options_have_help_in_the_parser_fairseq_builds():
    # fairseq-train --help prints only its first-stage parser (no legacy task's own options, not
    # even speech_to_text's --config-yaml); the task's options join the parser fairseq builds next.
    from fairseq import options
    from fairseq.tasks import TASK_REGISTRY

    import qswap.integration.fairseq_task  # noqa: F401  (what the --user-dir plugin imports)
    qswap.integration.fairseq_task.register_tasks()
    parser = options.get_training_parser()
    TASK_REGISTRY["speech_to_text_qswap"].add_args(parser)
    text = parser.format_help()
    for option in ("--qswap-recipe", "--qswap-calib-batches", "--qswap-audit", "--qswap-strict"):
        assert option in text
    assert "qswap recipe (shipped name such as w8a8" in text
    from qswap.integration.fairseq_task import AudioFinetuningQswapConfig
    fields = AudioFinetuningQswapConfig.__dataclass_fields__
    assert all(fields[f].metadata.get("help") for f in fields if f.startswith("qswap_"))


def test_importing_the_plugin_twice_does_not_crash():
    code = ("import sys, importlib; sys.path.insert(0, %r); import qswap_fairseq_plugin; "
            "import qswap.integration.fairseq_task as t; t.register_tasks(); "
            "sys.modules.pop('qswap_fairseq_plugin'); importlib.import_module('qswap_fairseq_plugin'); "
            "from fairseq.tasks import TASK_REGISTRY; assert 'speech_to_text_qswap' in TASK_REGISTRY"
            % str(Path(qswap.plugin_dir()).parent))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
