"""The plugin through fairseq's real entry points: fairseq-train (float, then QAT fine-tuning
with --finetune-from-model) and fairseq-generate with --qswap-audit. No mocks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qswap
from fairseq_run import BIN, SMALL, TRAIN, convert_small, run_tool as _run

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
    stored = state["args"].qswap_recipe if state.get("args") else state["cfg"]["model"].qswap_recipe
    assert stored == qswap.load_recipe("w4a8").to_dict()  # the recipe's content, not its name
    frozen = [v for k, v in state["model"].items() if k.endswith("input_quant.frozen")]
    assert frozen and all(bool(v) for v in frozen)


def test_generate_loads_the_quantized_model_and_prints_the_audit(trained):
    root, data, plugin, _ = trained
    out = _run("fairseq-generate", data, "--user-dir", plugin, "--task", "speech_to_text_qswap",
               "--path", root / "qat" / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "2",
               "--max-tokens", "4000", "--cpu", "--qswap-audit", "--scoring", "wer",
               "--required-batch-size-multiple", "1", "--qswap-calib-batches", "3", cwd=root)
    assert "qswap: converted with recipe w4a8" in out  # rebuilt from the checkpoint's own args
    # generate has no updates to calibrate on: the option is named as ignored, not dropped silently
    assert "qswap: --qswap-calib-batches 3 (given, or the training run's" in out and "is ignored" in out
    assert "qswap audit:" in out
    assert "WER:" in out


def test_validate_does_not_say_an_option_it_was_not_given_is_ignored(trained):
    """fairseq-validate builds its task from the checkpoint's config, which holds the training run's
    --qswap-calib-batches 2: the plugin had warned that this option, never passed, is ignored."""
    root, data, plugin, _ = trained
    out = _run("fairseq-validate", data, "--user-dir", plugin, "--task", "speech_to_text_qswap",
               "--path", root / "qat" / "checkpoint_last.pt", "--valid-subset", "train", "--max-tokens", "4000",
               "--cpu", cwd=root)
    assert "qswap: converted with recipe w4a8" in out and "valid on 'train' subset" in out
    assert "--qswap-calib-batches" not in out


def test_a_qat_checkpoint_refuses_a_dictionary_of_the_same_size_with_other_symbols(trained, tmp_path):
    """fairseq-train records the target dictionary's facts in the QAT checkpoint's model cfg;
    fairseq-generate with two of its symbols swapped had decoded other words with no error."""
    import shutil

    from qswap.io.dictionary import recorded_facts

    root, data, plugin, _ = trained
    state = torch.load(root / "qat" / "checkpoint_last.pt", weights_only=False)
    assert recorded_facts(state["args"] if state.get("args") else state["cfg"]["model"])["size"] > 5
    swapped = tmp_path / "data"
    shutil.copytree(data, swapped)
    lines = (swapped / "spm.txt").read_text().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    (swapped / "spm.txt").write_text("".join(lines))
    err = _refused("fairseq-generate", swapped, "--user-dir", plugin, "--task", "speech_to_text_qswap", "--path",
                   root / "qat" / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000",
                   "--cpu", cwd=root)
    assert "DataError: the task's target dictionary" in err and "other symbols" in err
    # fairseq-train continuing from it on the swapped data: its checkpoints would record the swapped
    # dictionary, and later loads would pass
    args = _qat(root, swapped, tmp_path / "on", "w4a8", 0, 1)
    args[args.index("--finetune-from-model") + 1] = root / "qat" / "checkpoint_last.pt"
    err = _refused(*args, cwd=root)
    assert "DataError: the task's target dictionary" in err and "--finetune-from-model" in err
    assert not list((tmp_path / "on").glob("*.pt"))


def test_loading_a_qat_checkpoint_neither_calibrates_nor_warns_of_its_training_options(trained, caplog):
    """The checkpoint's task cfg stores fairseq-train's --qswap-calib-batches 2: qswap's loader
    builds the model from a checkpoint, where the plugin warns that the option is ignored (meant
    for fairseq-generate's command line), so the loader resets it first."""
    import logging

    from qswap.integration import data as fdata

    root, data, _, _ = trained
    with caplog.at_level(logging.WARNING, logger="qswap"):
        model, _ = fdata.load_model_and_task(root / "qat" / "checkpoint_last.pt", data)
    assert model.qswap_recipe.name == "w4a8"
    assert "--qswap-calib-batches" not in caplog.text


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


MINMAX_RECIPE = """version: 1
name: w8a8_minmax
defaults:
  weight: {bits: 8, symmetric: true, granularity: per_tensor, observer: minmax}
  activation: {bits: 8, symmetric: false, granularity: per_tensor, observer: minmax}
"""
FIRST_OBSERVER = "encoder.subsample.conv_layers.0.input_quant.observer"


def _qat(root, data, save_dir, recipe, calib, updates, *extra):
    return ["fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
            "--qswap-recipe", recipe, "--qswap-calib-batches", str(calib), *SMALL, *TRAIN,
            "--batch-size", "3", "--max-update", str(updates), "--finetune-from-model",
            root / "float" / "checkpoint_last.pt", "--save-dir", save_dir, *extra]


def _model_state(path):
    return torch.load(path, weights_only=False, map_location="cpu")["model"]


def test_calibration_updates_apply_no_update(float_checkpoint, tmp_path):
    """Two calibration updates of two batches each (--update-freq 2), two updates: every weight is
    still the float checkpoint's (with --weight-decay too, which fairseq's Adam applies whatever the
    gradient: it had shrunk every weight by lr * decay), each observer saw the four training batches
    and nothing else (not the validation after each epoch), and the updates log their real loss
    (label-smoothed cross entropy logs the loss tensor fairseq zeroes in place: it had logged 0)."""
    import re

    root, data, float_ckpt = float_checkpoint
    log = _run(*_qat(root, data, tmp_path / "qat", "w8a8", 2, 2, "--update-freq", "2", "--weight-decay", "0.5",
                     "--log-interval", "1"), cwd=root)
    assert "on the batches of 2 updates (the calibration updates moved no weight)" in log
    logged = re.findall(r"train_inner .* loss=([\d.]+), nll_loss=([\d.]+)", log)
    assert len(logged) == 2 and all(loss == nll and float(loss) > 1 for loss, nll in logged)  # no smoothing
    before, after = _model_state(float_ckpt), _model_state(tmp_path / "qat" / "checkpoint_last.pt")
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert bool(after[FIRST_OBSERVER.replace("observer", "frozen")])
    assert int(after[f"{FIRST_OBSERVER}.num_batches"]) == 4


def test_calibration_updates_move_no_batch_norm_statistic_either(float_checkpoint, tmp_path):
    """A conformer's batch norms update their running statistics in a training forward: the zero-loss
    calibration updates had moved them (running mean by up to 0.07) while the log said no weight moved."""
    root, data, _ = float_checkpoint
    conformer = ["--arch", "s2t_conformer", "--depthwise-conv-kernel-size", "3"]
    _run("fairseq-train", data, "--task", "speech_to_text", *SMALL, *conformer, *TRAIN, "--max-update", "2",
         "--save-dir", tmp_path / "float", cwd=root)
    float_ckpt = tmp_path / "float" / "checkpoint_last.pt"
    log = _run("fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
               "--qswap-recipe", "w8a8", "--qswap-calib-batches", "2", *SMALL, *conformer, *TRAIN, "--batch-size", "3",
               "--max-update", "2", "--finetune-from-model", float_ckpt, "--save-dir", tmp_path / "qat", cwd=root)
    assert "the calibration updates moved no weight" in log
    before, after = _model_state(float_ckpt), _model_state(tmp_path / "qat" / "checkpoint_last.pt")
    norms = [k for k in before if k.endswith("running_mean")]
    assert norms and set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]


def test_training_a_fixed_grid_recipe_with_no_calibration_is_said(float_checkpoint, tmp_path):
    """w8a8 from a float checkpoint with --qswap-calib-batches 0: every training forward observed, no
    grid ever frozen, exit 0 and nothing said (the LSQ recipes refuse it: TrainingError)."""
    root, data, _ = float_checkpoint
    log = _run(*_qat(root, data, tmp_path / "moving", "w8a8", 0, 1), cwd=root)
    assert "with no calibration updates (--qswap-calib-batches 0) and no calibrated start checkpoint" in log
    assert "pass --qswap-calib-batches N" in log


def test_a_run_resumed_during_calibration_calibrates_only_the_updates_left(float_checkpoint, tmp_path):
    """Three calibration updates: a run stopped after two and resumed from its checkpoint_last.pt
    calibrates on one more and ends where the run that was never stopped ends, tensor for tensor."""
    root, data, _ = float_checkpoint
    _run(*_qat(root, data, tmp_path / "once", "w8a8", 3, 5), cwd=root)
    _run(*_qat(root, data, tmp_path / "resumed", "w8a8", 3, 2), cwd=root)
    log = _run(*_qat(root, data, tmp_path / "resumed", "w8a8", 3, 5), cwd=root)
    assert "on the batches of 3 updates" in log
    once, resumed = (_model_state(tmp_path / d / "checkpoint_last.pt") for d in ("once", "resumed"))
    assert int(resumed[f"{FIRST_OBSERVER}.num_batches"]) == 3
    assert once.keys() == resumed.keys() and all(torch.equal(once[k], resumed[k]) for k in once)


def test_a_run_resumed_with_fewer_calibration_updates_freezes_what_it_observed(float_checkpoint, tmp_path):
    """A run stopped during 2 calibration updates and resumed with --qswap-calib-batches 1: no update
    of the resumed run calibrated, none froze, and it had trained 3 updates on grids observed anew at
    every forward (learned scales reset each time), exit 0 and nothing said."""
    root, data, _ = float_checkpoint
    _run(*_qat(root, data, tmp_path / "qat", "w4a8_lsq", 2, 1), cwd=root)
    assert not bool(_model_state(tmp_path / "qat" / "checkpoint_last.pt")[FIRST_OBSERVER.replace("observer", "frozen")])
    log = _run(*_qat(root, data, tmp_path / "qat", "w4a8_lsq", 1, 3), cwd=root)
    assert "the run resumes at update 2, past its 1 calibration update(s)" in log and "froze" in log
    state = _model_state(tmp_path / "qat" / "checkpoint_last.pt")
    assert bool(state[FIRST_OBSERVER.replace("observer", "frozen")])
    assert int(state[f"{FIRST_OBSERVER}.num_batches"]) == 1  # the update the stopped run calibrated


def test_a_calibration_updates_logged_tensors_are_copies_nested_ones_too():
    """fairseq zeroes a calibration update's loss in place (``ignore_grad``); a criterion logging that
    tensor, alone or inside a dict or list, had logged 0."""
    from qswap.integration.fairseq_task import _LoggedApart

    loss = torch.tensor(3.0)

    def criterion(model, sample):
        return loss, 1, {"loss": loss, "parts": {"ctc": loss}, "terms": [loss], "n": 4}

    _, _, logged = _LoggedApart(criterion)(None, None)
    loss.mul_(0)
    assert float(logged["loss"]) == float(logged["parts"]["ctc"]) == float(logged["terms"][0]) == 3.0
    assert logged["n"] == 4


@pytest.mark.parametrize("option, match", [
    (["--memory-efficient-fp16"], "cast the quantized model to float16; qswap's fake quantization computes in float32"),
    (["--store-ema", "--ema-decay", "0.9"], "--store-ema keeps an exponential moving average .* drop --store-ema"),
])
def test_options_the_quantized_model_cannot_train_with_are_refused(float_checkpoint, tmp_path, option, match):
    """Each had failed inside the first update with torch's dtype or cast error (the float model
    trains with them)."""
    import re

    root, data, _ = float_checkpoint
    err = _refused(*_qat(root, data, tmp_path / "qat", "w8a8", 1, 2, *option), cwd=root)
    assert "TrainingError" in err and re.search(match, err), err[-1500:]


def test_calibration_options_without_a_recipe_are_refused(float_checkpoint, tmp_path):
    root, data, _ = float_checkpoint
    args = [a for a in _qat(root, data, tmp_path / "none", "w8a8", 2, 1) if a not in ("--qswap-recipe", "w8a8")]
    result = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    # the options given are named (it had named --qswap-strict, not given), with fairseq-train's remedy
    assert ("TrainingError: --qswap-calib-batches applies to a model qswap converts: pass --qswap-recipe RECIPE\n"
            in result.stderr)


def test_two_ddp_workers_freeze_the_grid_of_both_shards(float_checkpoint, tmp_path):
    """fairseq's own distributed training, 2 CPU workers (gloo): each calibrates on its shard's
    first batch and both freeze the range of the two batches together, exactly what one process
    calibrating on those two batches gets (first quantizer: raw features, no grid upstream)."""
    import socket

    root, data, _ = float_checkpoint
    recipe = tmp_path / "minmax.yaml"
    recipe.write_text(MINMAX_RECIPE)
    _run(*_qat(root, data, tmp_path / "one", recipe, 2, 2), cwd=root)
    _run(*_qat(root, data, tmp_path / "first", recipe, 1, 1), cwd=root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = []
    for rank in (0, 1):
        args = _qat(root, data, tmp_path / "ddp", recipe, 1, 1, "--distributed-world-size", "2",
                    "--distributed-rank", str(rank), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                    "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend",
                    "legacy_ddp", "--device-id", "0")
        workers.append(subprocess.Popen([str(BIN / args[0]), *map(str, args[1:])], cwd=root,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}))
    logs = [w.communicate(timeout=600)[0] for w in workers]
    # rank 0 finishing means every collective (the calibration ranges, the gradients) completed with
    # rank 1; rank 1 now and then aborts in gloo's teardown once rank 0 has gone ("terminate called
    # without an active exception", after its last collective): that exit is not the training's
    assert workers[0].returncode == 0, logs[0][-3000:] + logs[1][-3000:]
    assert workers[1].returncode == 0 or logs[1].rstrip().endswith(
        "terminate called without an active exception"), logs[1][-3000:]
    assert "calibrated and froze" in logs[0]  # fairseq logs INFO on rank 0 only
    one, first, ddp = (_model_state(tmp_path / d / "checkpoint_last.pt") for d in ("one", "first", "ddp"))
    keys = [f"{FIRST_OBSERVER}.{key}" for key in ("min_val", "max_val")]
    assert all(torch.equal(ddp[k], one[k]) for k in keys)
    assert not all(torch.equal(ddp[k], first[k]) for k in keys)  # rank 0's batch alone: another range
    # the joined range sets the grid one process's calibrating calls set for it, bit for bit
    grid = [FIRST_OBSERVER.replace("observer", key) for key in ("scale", "zero_point")]
    assert all(torch.equal(ddp[k], one[k]) for k in grid)


def test_qat_calibration_steps_observe_what_the_recipe_says(float_checkpoint, tmp_path):
    """A recipe with ``observe: float``: fairseq-train's calibration steps pass activations through
    unquantized while observing (qswap.calibrate.observing), set each grid from its range, and
    freeze them before the first update. The same run with ``observe: quantized`` (the same
    batches: the same seed) observes the quantized model: other grids."""
    root, data, _ = float_checkpoint
    scales = {}
    for observe in ("float", "quantized"):
        recipe = tmp_path / f"w8a8_observe_{observe}.yaml"
        recipe.write_text(f"version: 1\nname: w8a8_observe_{observe}\nobserve: {observe}\ndefaults:\n"
                          "  weight: {bits: 8}\n  activation: {bits: 8, symmetric: false, observer: minmax}\n")
        log = _run("fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--qswap-recipe", recipe, "--qswap-calib-batches", "2", *SMALL, *TRAIN, "--max-update", "2",
                   "--finetune-from-model", root / "float" / "checkpoint_last.pt",
                   "--save-dir", tmp_path / observe, cwd=root)
        assert f"qswap: converted with recipe w8a8_observe_{observe}" in log and "qswap: calibrated and froze" in log
        state = torch.load(tmp_path / observe / "checkpoint_last.pt", weights_only=False)["model"]
        frozen = [v for k, v in state.items() if k.endswith("input_quant.frozen")]
        assert frozen and all(bool(v) for v in frozen)
        scales[observe] = {k: v for k, v in state.items() if k.endswith("input_quant.scale") and v.numel()}
    assert scales["float"].keys() == scales["quantized"].keys() and len(scales["float"]) > 5
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales["float"].values())
    assert any(not torch.equal(scales["float"][k], scales["quantized"][k]) for k in scales["float"])


def _refused(tool, *args, cwd):
    """stderr of a fairseq command that must fail."""
    result = subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


@pytest.fixture(scope="module")
def w8a8(float_checkpoint, tmp_path_factory):
    root, data, float_ckpt = float_checkpoint
    return convert_small(float_ckpt, data, tmp_path_factory.mktemp("w8a8") / "w8a8.pt", batches=1)


def test_a_recipe_other_than_the_checkpoints_is_refused(float_checkpoint, w8a8, tmp_path):
    """--qswap-recipe w4a4 with a checkpoint trained or converted with w8a8 (fine-tuning from it,
    resuming it, decoding it) would put 8-bit grids into 4-bit quantizers: a ConvertError naming
    both recipes and the checkpoint."""
    root, data, _ = float_checkpoint
    args = [a if a != "w8a8" else "w4a4" for a in _qat(root, data, tmp_path / "ft", "w8a8", 1, 1)]
    args[args.index("--finetune-from-model") + 1] = w8a8
    err = _refused(*args, cwd=root)
    assert f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {w8a8} was" in err
    err = _refused("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", w8a8, "--qswap-recipe", "w4a4", "--gen-subset", "test", "--beam", "2",
                   "--max-tokens", "4000", "--cpu", "--required-batch-size-multiple", "1", cwd=root)
    assert f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {w8a8} was" in err
    _run(*_qat(root, data, tmp_path / "resumed", "w8a8", 1, 1), cwd=root)
    args = [a if a != "w8a8" else "w4a4" for a in _qat(root, data, tmp_path / "resumed", "w8a8", 1, 2)]
    err = _refused(*args, cwd=root)
    last = tmp_path / "resumed" / "checkpoint_last.pt"
    assert f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {last} was" in err


def test_a_bad_recipe_given_with_a_float_checkpoint_blames_the_recipe_not_the_checkpoint(float_checkpoint):
    """fairseq-generate --path FLOAT.pt --qswap-recipe nope: the checkpoint stores no recipe, and
    the error had blamed it ('cannot load the recipe the checkpoint was trained with ... pass
    --qswap-recipe RECIPE', the option given)."""
    root, data, _ = float_checkpoint
    err = _refused("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", root / "float" / "checkpoint_last.pt", "--qswap-recipe", "nope", "--gen-subset", "test",
                   "--beam", "2", "--max-tokens", "4000", "--cpu", "--required-batch-size-multiple", "1", cwd=root)
    assert "RecipeError: --qswap-recipe nope: no shipped recipe named 'nope'" in err and "CheckpointError" not in err


def test_a_qat_checkpoint_keeps_its_recipe_not_the_yaml_path(float_checkpoint, tmp_path):
    """fairseq-train --qswap-recipe PATH.yaml stores the recipe's content: editing or removing the
    YAML later changes nothing in the checkpoint's model (qswap's loader and fairseq-generate)."""
    from qswap.integration.data import load_model_and_task

    root, data, _ = float_checkpoint
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(MINMAX_RECIPE)
    _run(*_qat(root, data, tmp_path / "qat", recipe.name, 1, 1), cwd=tmp_path)
    ckpt = tmp_path / "qat" / "checkpoint_last.pt"
    assert torch.load(ckpt, weights_only=False)["cfg"]["model"].qswap_recipe["name"] == "w8a8_minmax"
    recipe.write_text(MINMAX_RECIPE.replace("weight: {bits: 8", "weight: {bits: 2").replace("w8a8_", "w2a8_"))
    model, _ = load_model_and_task(ckpt, data)
    assert model.qswap_recipe.name == "w8a8_minmax"
    assert model.encoder.transformer_layers[0].fc1.weight_quant.spec.bits == 8
    recipe.unlink()
    out = _run("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
               "--path", ckpt, "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--cpu",
               "--scoring", "wer", "--required-batch-size-multiple", "1", cwd=root)
    assert "qswap: converted with recipe w8a8_minmax" in out and "WER:" in out


def test_a_checkpoint_naming_a_recipe_file_that_is_gone_says_which_and_what_to_pass(float_checkpoint, tmp_path):
    """A QAT checkpoint of an older qswap stores --qswap-recipe as the YAML path it was given:
    once that file is gone, the error names the checkpoint and --qswap-recipe."""
    from qswap.errors import CheckpointError
    from qswap.integration.data import load_model_and_task

    root, data, _ = float_checkpoint
    _run(*_qat(root, data, tmp_path / "qat", "w8a8", 1, 1), cwd=root)
    state = torch.load(tmp_path / "qat" / "checkpoint_last.pt", weights_only=False)
    for part in ("model", "task"):
        state["cfg"][part].qswap_recipe = "gone.yaml"
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(CheckpointError, match=f"^{old}: cannot load the recipe the checkpoint was trained with .*gone.yaml: "
                                              f"recipe file not found.*--qswap-recipe RECIPE"):
        load_model_and_task(old, data)
    err = _refused("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", old, "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--cpu",
                   "--required-batch-size-multiple", "1", cwd=root)
    assert f"CheckpointError: {old}: cannot load the recipe the checkpoint was trained with" in err


def test_a_qswap_checkpoint_whose_cfg_recipe_is_not_its_stored_one_is_refused(w8a8, float_checkpoint, tmp_path):
    from qswap.errors import CheckpointError
    from qswap.integration.data import load_model_and_task

    _, data, _ = float_checkpoint
    state = torch.load(w8a8, weights_only=True)
    # as a qswap checkpoint re-saved from a QAT run: the plugin's task converts it from its cfg
    state["cfg"]["task"]["_name"] = state["cfg"]["task"]["task"] = "speech_to_text_qswap"
    state["cfg"]["model"]["qswap_recipe"] = qswap.load_recipe("w4a4").to_dict()
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    with pytest.raises(CheckpointError, match=r"the model cfg's recipe \(w4a4\) is not the one in the "
                                              r"checkpoint's qswap entry \('w8a8'\)"):
        load_model_and_task(edited, data)


def test_the_audit_reads_the_subset_fairseq_generates(float_checkpoint, w8a8, tmp_path):
    """fairseq-generate --gen-subset dev --qswap-audit audits dev (a data directory without test)."""
    import shutil

    root, data, _ = float_checkpoint
    shutil.copytree(data, tmp_path / "data")
    (tmp_path / "data" / "test.tsv").unlink()
    out = _run("fairseq-generate", tmp_path / "data", "--user-dir", qswap.plugin_dir(), "--task",
               "speech_to_text_qswap", "--path", w8a8, "--gen-subset", "dev", "--beam", "2", "--max-tokens", "4000",
               "--cpu", "--qswap-audit", "--scoring", "wer", "--required-batch-size-multiple", "1", cwd=root)
    assert "qswap audit: HONEST" in out and "Generate dev with beam=2" in out


@pytest.fixture(scope="module")
def suffixed(float_checkpoint, tmp_path_factory):
    """A w8a8 QAT run of one update saved with --checkpoint-suffix _x: SAVE_DIR/checkpoint_last_x.pt."""
    root, data, _ = float_checkpoint
    save = tmp_path_factory.mktemp("suffixed")
    _run(*_qat(root, data, save, "w8a8", 1, 1, "--checkpoint-suffix", "_x"), cwd=root)
    assert not (save / "checkpoint_last.pt").exists()
    return save / "checkpoint_last_x.pt"


def _without(args, *options):
    """fairseq-train's ``args`` without ``options`` and their values."""
    out = list(args)
    for option in options:
        i = out.index(option)
        del out[i:i + 2]
    return out


def test_the_recipe_is_checked_on_the_checkpoint_fairseq_train_loads(float_checkpoint, suffixed, tmp_path):
    """fairseq's loader reads SAVE_DIR/checkpoint_last{--checkpoint-suffix}.pt, a --restore-file with
    the suffix before its .pt, and --continue-once on a first launch: each such checkpoint of the
    w8a8 run is refused for --qswap-recipe w4a4, as SAVE_DIR/checkpoint_last.pt is."""
    root, data, _ = float_checkpoint
    refused = f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {suffixed} was"
    # resuming it (the float --finetune-from-model is what only a first launch loads)
    assert refused in _refused(*_qat(root, data, suffixed.parent, "w4a4", 1, 2, "--checkpoint-suffix", "_x"),
                               cwd=root)
    restore = _without(_qat(root, data, tmp_path / "restore", "w4a4", 1, 2, "--checkpoint-suffix", "_x",
                            "--restore-file", suffixed.parent / "checkpoint_last.pt"), "--finetune-from-model")
    assert refused in _refused(*restore, cwd=root)
    once = _qat(root, data, tmp_path / "once", "w4a4", 1, 2, "--continue-once", suffixed)
    assert refused in _refused(*_without(once, "--finetune-from-model"), cwd=root)
    assert not list((tmp_path / "restore").glob("*.pt")) and not list((tmp_path / "once").glob("*.pt"))


def test_the_start_checkpoint_is_found_as_fairseq_finds_it(tmp_path):
    from argparse import Namespace

    from qswap.integration.fairseq_task import _start_checkpoint

    for name in ("checkpoint_last.pt", "checkpoint_last_x.pt", "other_x.pt", "once.pt", "ft.pt"):
        (tmp_path / name).write_bytes(b"")
    opts = dict(save_dir=str(tmp_path), restore_file="checkpoint_last.pt", checkpoint_suffix="",
                continue_once=str(tmp_path / "once.pt"), finetune_from_model=str(tmp_path / "ft.pt"))
    assert _start_checkpoint(Namespace(**opts)).path == str(tmp_path / "checkpoint_last.pt")
    assert _start_checkpoint(Namespace(**{**opts, "checkpoint_suffix": "_x"})).path == str(tmp_path / "checkpoint_last_x.pt")
    first = {**opts, "checkpoint_suffix": "_y"}  # no checkpoint_last_y.pt: a first launch
    assert _start_checkpoint(Namespace(**first)).source == f"--continue-once {tmp_path / 'once.pt'}"
    assert _start_checkpoint(Namespace(**{**first, "continue_once": None})).path == str(tmp_path / "ft.pt")
    assert _start_checkpoint(Namespace(**{**first, "continue_once": str(tmp_path / "gone.pt")})) is None
    restore = {**opts, "restore_file": str(tmp_path / "other.pt"), "checkpoint_suffix": "_x"}
    assert _start_checkpoint(Namespace(**restore)).path == str(tmp_path / "other_x.pt")
    assert _start_checkpoint(Namespace(**{**restore, "checkpoint_suffix": ""})) is None  # no other.pt


def test_a_quantized_start_without_a_recipe_names_the_recipe_to_pass(float_checkpoint, suffixed, w8a8, tmp_path):
    """Resuming a QAT run, or fine-tuning from a qswap checkpoint, without --qswap-recipe builds a
    float model its state does not fit: a TrainingError naming --qswap-recipe w8a8, not fairseq's
    "Cannot load model parameters" exception."""
    root, data, _ = float_checkpoint
    resume = _without(_qat(root, data, suffixed.parent, "w8a8", 0, 2, "--checkpoint-suffix", "_x"), "--qswap-recipe")
    err = _refused(*resume, cwd=root)
    assert (f"TrainingError: the checkpoint {suffixed} that fairseq-train resumes holds a model quantized with "
            f"qswap recipe w8a8") in err and "pass --qswap-recipe w8a8, the recipe it was converted" in err
    finetune = _without(_qat(root, data, tmp_path / "ft", "w8a8", 0, 1), "--qswap-recipe")
    finetune[finetune.index("--finetune-from-model") + 1] = w8a8
    err = _refused(*finetune, cwd=root)
    assert f"TrainingError: --finetune-from-model {w8a8} holds a model quantized with qswap recipe w8a8" in err


def test_learned_scales_without_calibration_are_refused(float_checkpoint, tmp_path):
    """LSQ with --qswap-calib-batches 0 from a float checkpoint would reset every scale from its
    observer at each training forward (nothing learned): a TrainingError before the first update
    naming both ways out. From a checkpoint qswap convert calibrated, the scales start from its
    frozen grids and train. A negative count is refused."""
    root, data, float_ckpt = float_checkpoint
    err = _refused(*_qat(root, data, tmp_path / "lsq", "w4a8_lsq", 0, 1), cwd=root)
    assert "TrainingError: recipe w4a8_lsq learns its activation scales (LSQ)" in err
    assert "Pass --qswap-calib-batches N" in err and f"`qswap convert {float_ckpt} --recipe w4a8_lsq" in err
    assert not list((tmp_path / "lsq").glob("*.pt"))
    err = _refused(*_qat(root, data, tmp_path / "neg", "w8a8", -3, 1), cwd=root)
    assert "TrainingError: --qswap-calib-batches -3: pass the number of updates" in err
    qckpt = convert_small(float_ckpt, data, tmp_path / "lsq.pt", recipe="w4a8_lsq", batches=1)
    args = _qat(root, data, tmp_path / "ok", "w4a8_lsq", 0, 1)
    args[args.index("--finetune-from-model") + 1] = qckpt
    log = _run(*args, cwd=root)
    assert "qswap: converted with recipe w4a8_lsq" in log and "calibrated and froze" not in log
    trained, start = _model_state(tmp_path / "ok" / "checkpoint_last.pt"), _model_state(qckpt)
    scales = [k for k in start if k.endswith("input_quant.scale") and start[k].numel()]
    assert scales and any(not torch.equal(trained[k], start[k].to(trained[k].dtype)) for k in scales)


def test_an_empty_recipe_and_an_audit_without_a_recipe_are_refused(float_checkpoint, tmp_path):
    """--qswap-recipe "" had been taken for no option (fairseq-train trained the float model, exit 0);
    fairseq-generate --qswap-audit of a float checkpoint without a recipe had printed the float
    model's ops as the verdict, where the other plugin options are refused without a recipe."""
    root, data, float_ckpt = float_checkpoint
    args = [a if a != "w8a8" else "" for a in _qat(root, data, tmp_path / "empty", "w8a8", 1, 1)]
    assert "RecipeError: --qswap-recipe is empty: pass a shipped recipe name" in _refused(*args, cwd=root)
    assert not (tmp_path / "empty" / "checkpoint_last.pt").exists()
    err = _refused("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", float_ckpt, "--qswap-audit", "--gen-subset", "test", "--beam", "1", "--max-tokens",
                   "4000", "--cpu", "--required-batch-size-multiple", "1", cwd=root)
    assert ("TrainingError: --qswap-audit applies to a model qswap converts: pass --qswap-recipe RECIPE (or --path "
            "a checkpoint 'qswap convert' wrote)") in err


def test_calibration_updates_of_a_weight_only_recipe_are_said_to_train(float_checkpoint, tmp_path):
    """w8_weight_only has no activation quantizer: its --qswap-calib-batches updates had trained the
    weights without a word; and fairseq-train's --qswap-audit (read by fairseq-generate only) is said
    to be ignored."""
    root, data, _ = float_checkpoint
    log = _run(*_qat(root, data, tmp_path / "wo", "w8_weight_only", 2, 1, "--qswap-audit"), cwd=root)
    assert ("--qswap-calib-batches 2: recipe w8_weight_only has no activation quantizers, so there is nothing to "
            "calibrate: training starts at the first update") in log
    assert "--qswap-audit runs before decoding (fairseq-generate); fairseq-train does not run it" in log


def test_more_calibration_updates_than_the_run_makes_are_said(float_checkpoint, tmp_path):
    """--qswap-calib-batches 5 with --max-update 2: every update had been a zero-gradient calibration
    step, no grid frozen, exit 0 and nothing said (the checkpoint's quantizers still observing). A
    warning (a run resumed with a larger --max-update goes on calibrating)."""
    root, data, _ = float_checkpoint
    log = _run(*_qat(root, data, tmp_path / "short", "w8a8", 5, 2), cwd=root)
    assert ("--qswap-calib-batches 5 is more than --max-update 2: this run ends before calibration does (no grid "
            "frozen, no weight trained") in log
    assert "calibrated and froze" not in log
