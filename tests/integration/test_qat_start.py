"""QAT of a recipe with a data-dependent transform (smoothquant) through fairseq-train: the run
fine-tunes from a checkpoint `qswap convert` wrote with the recipe (folded weights, calibrated
grids), the plugin converts the built model with the transforms' structure only and does not
re-calibrate; without such a checkpoint the run stops with a ConvertError naming the command."""
import os
import subprocess

import pytest
import torch

import qswap
from fairseq_run import BIN, SMALL, TRAIN, run_tool
from qswap.errors import ConvertError
from qswap.integration.qat_start import converted_start
from qswap.transforms import STRUCTURE_ONLY

RECIPE = "w4a4_edges8_stream_smoothquant_lsq"
LR = 1e-3  # TRAIN's Adam learning rate: two updates move no weight by much more than 2 * LR


def _train_args(root, data, save_dir, finetune_from, updates=2):
    return [data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap", "--qswap-recipe", RECIPE,
            "--qswap-calib-batches", "2", *SMALL, *TRAIN, "--batch-size", "3", "--max-update", str(updates),
            *(["--finetune-from-model", finetune_from] if finetune_from else []), "--save-dir", save_dir]


@pytest.fixture(scope="module")
def converted(float_checkpoint, tmp_path_factory):
    from qswap.cli import main

    root, data, float_ckpt = float_checkpoint
    qckpt = tmp_path_factory.mktemp("qat_start") / "smoothquant_lsq.pt"
    assert main(["convert", str(float_ckpt), "--recipe", RECIPE, "--data", str(data), "--calib-batches", "2",
                 "--max-sentences", "4", "-o", str(qckpt)]) == 0
    return root, data, float_ckpt, qckpt


def _state(path):
    return torch.load(path, weights_only=False, map_location="cpu")["model"]


def test_fine_tunes_the_converted_weights_and_keeps_their_grids(converted, tmp_path):
    from qswap.cli import main
    from qswap.integration.data import load_model_and_task

    root, data, float_ckpt, qckpt = converted
    log = run_tool("fairseq-train", *_train_args(root, data, tmp_path / "qat", qckpt), cwd=root)
    assert f"qswap: converted with recipe {RECIPE}" in log
    assert "calibrated and froze" not in log  # the converted checkpoint's grids are the LSQ start
    # --qswap-calib-batches is skipped (by design) and said so: its updates train
    assert "every activation grid has its fixed range already (the checkpoint loaded" in log
    assert "num_updates 2" in log or "num_updates=2" in log
    flt, conv, qat = _state(float_ckpt), _state(qckpt), _state(tmp_path / "qat" / "checkpoint_last.pt")
    # the pre-norm LayerNorms hold SmoothQuant's factors: folded by qswap convert (far from the
    # float weights), then trained (moved, a little) from those, not folded again nor random
    norms = [k for k in flt if k.endswith("self_attn_layer_norm.weight")]
    assert norms
    for k in norms:
        folded = (conv[k] - flt[k]).abs().max()
        trained = (qat[k] - conv[k]).abs().max()
        assert folded > 20 * LR, k
        assert 0 < trained < 5 * LR, (k, float(trained), float(folded))
    # the learned (LSQ) activation scales moved from the calibrated ones; the activation ranges
    # observed by qswap convert did not (weight and bias grids follow their parameters)
    scales = [k for k in conv if k.endswith("input_quant.scale") and conv[k].numel()]
    assert scales and any(not torch.equal(qat[k], conv[k]) for k in scales)
    assert all((qat[k] - conv[k]).abs().max() < 5 * LR for k in scales)
    observed = [k for k in conv if k.endswith(("observer.min_val", "observer.max_val"))
                and not k.split(".observer")[0].endswith(("weight_quant", "bias_quant"))]
    assert observed and all(torch.equal(qat[k], conv[k]) for k in observed)
    assert all(bool(qat[k]) for k in qat if k.endswith("input_quant.frozen"))
    # the saved checkpoint loads back as the quantized model, and qswap eval decodes with it
    model, _ = load_model_and_task(tmp_path / "qat" / "checkpoint_last.pt", data)
    assert model.qswap_recipe.name == RECIPE
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], qat[k].to(loaded[k].dtype)) for k in norms)
    assert main(["eval", str(tmp_path / "qat" / "checkpoint_last.pt"), "--data", str(data), "--beam", "2",
                 "--json", str(tmp_path / "qat.json")]) == 0
    # Adam moves a learned scale by about LR per update whatever its size: a small one crossed zero
    # in this run (a per-channel stream scale, -0.0015); each is kept positive (|s|), so every grid
    # of the trained model has its integer form
    learned = [k for k in qat if k.endswith("_quant.scale") and qat[k].is_floating_point() and qat[k].numel()]
    assert learned and all(bool((qat[k] > 0).all()) for k in learned)
    qswap.integerize(model)


def test_fairseq_train_from_the_float_checkpoint_names_the_convert_command(converted, tmp_path):
    root, data, float_ckpt, _ = converted
    proc = subprocess.run([str(BIN / "fairseq-train"), *map(str, _train_args(root, data, tmp_path / "qat", float_ckpt))],
                          cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qswap.errors.ConvertError: ")
    assert f"qswap convert {float_ckpt} --recipe {RECIPE} --data {data}" in last
    assert not (tmp_path / "qat" / "checkpoint_last.pt").exists()


def test_a_checkpoint_converted_with_another_recipe_is_refused(converted):
    _, _, float_ckpt, qckpt = converted
    recipe = qswap.load_recipe(RECIPE)
    assert converted_start(recipe, qckpt) is STRUCTURE_ONLY
    with pytest.raises(ConvertError, match=f"first, `qswap convert FLOAT_CHECKPOINT --recipe {RECIPE} .*`, and fine-tune from it"):
        converted_start(recipe, None)
    other = qswap.load_recipe("w4a4_edges8_stream_smoothquant")  # the same fold, fixed activation scales
    with pytest.raises(ConvertError, match=f"converted with recipe {RECIPE}, not with this one"):
        converted_start(other, qckpt)
    assert converted_start(qswap.load_recipe("w4a4_edges8_lsq"), None) is None  # no statistics needed


def test_fine_tunes_again_from_a_checkpoint_fairseq_train_wrote(converted, tmp_path):
    """A QAT checkpoint of this recipe that fairseq-train wrote (its recipe in its cfg, no qswap
    entry) is a start like the converted one, not 'a float checkpoint'."""
    root, data, _, qckpt = converted
    run_tool("fairseq-train", *_train_args(root, data, tmp_path / "qat1", qckpt), cwd=root)
    log = run_tool("fairseq-train", *_train_args(root, data, tmp_path / "qat2", tmp_path / "qat1" / "checkpoint_last.pt"),
                   cwd=root)
    assert f"qswap: converted with recipe {RECIPE}" in log and "calibrated and froze" not in log
    assert converted_start(qswap.load_recipe(RECIPE), tmp_path / "qat1" / "checkpoint_last.pt") is STRUCTURE_ONLY


def test_resumes_its_own_checkpoint(converted, tmp_path):
    """fairseq-train resuming the run from SAVE_DIR/checkpoint_last.pt (no --finetune-from-model on
    the second launch) loads that checkpoint's folded weights: the structure only, not 'convert
    the float checkpoint first'."""
    root, data, _, qckpt = converted
    run_tool("fairseq-train", *_train_args(root, data, tmp_path / "qat", qckpt, updates=1), cwd=root)
    log = run_tool("fairseq-train", *_train_args(root, data, tmp_path / "qat", None, updates=2), cwd=root)
    assert "Loaded checkpoint" in log and f"qswap: converted with recipe {RECIPE}" in log
    state = torch.load(tmp_path / "qat" / "checkpoint_last.pt", weights_only=False, map_location="cpu")
    assert state["optimizer_history"][-1]["num_updates"] == 2


@pytest.mark.parametrize("hadamard", [False, True])
def test_fairseq_generate_of_a_float_checkpoint_names_the_convert_command(float_checkpoint, tmp_path, hadamard):
    """fairseq-generate --qswap-recipe RECIPE of a float checkpoint would decode its weights without
    the SmoothQuant fold under the recipe's name: a ConvertError naming qswap convert instead. A
    hadamard recipe (no statistics needed) had decoded unrotated weights in a rotated structure, or
    failed in fairseq's state_dict error."""
    root, data, float_ckpt = float_checkpoint
    recipe = RECIPE
    if hadamard:
        recipe = str(tmp_path / "hadamard.yaml")
        (tmp_path / "hadamard.yaml").write_text(HADAMARD)
    proc = subprocess.run([str(BIN / "fairseq-generate"), str(data), "--user-dir", qswap.plugin_dir(), "--task",
                           "speech_to_text_qswap", "--path", str(float_ckpt), "--qswap-recipe", recipe,
                           "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--cpu",
                           "--required-batch-size-multiple", "1"], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    name = "w8a8_hadamard16" if hadamard else RECIPE
    assert last.startswith(f"qswap.errors.ConvertError: recipe {name}: its transforms")
    assert f"{float_ckpt} is a float checkpoint" in last
    assert f"`qswap convert {float_ckpt} --recipe {recipe} --data {data} --calib-batches 4 -o QCKPT`" in last


def test_a_torch_file_that_is_no_fairseq_checkpoint_is_named_before_fairseq_train_reads_it(tmp_path):
    """``--finetune-from-model`` a ``torch.save({"a": 1})`` file: qswap's start check had taken it
    for a float checkpoint, and fairseq-train then failed with a raw ``KeyError: 'best_loss'``."""
    from qswap.errors import CheckpointError
    from qswap.integration.qat_start import stored_recipe

    path = tmp_path / "dict.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a fairseq checkpoint: it has neither 'cfg' nor 'args'"):
        stored_recipe(path)


def test_the_start_checkpoint_is_read_once_by_the_tasks_checks(converted, tmp_path, monkeypatch):
    """fairseq-train's start checks (its dictionary, its recipe for the transforms' structure, its
    recipe against the run's) each read the checkpoint fairseq-train loads; they share one read
    (``Start.state``): the task built in this process as fairseq-train builds it, every load counted."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from qswap.io import safe_load

    root, data, _, qckpt = converted
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap", "--qswap-recipe", RECIPE,
        *SMALL, *TRAIN, "--finetune-from-model", str(qckpt), "--save-dir", str(tmp_path / "run")])
    utils.import_user_module(args)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    loads = []
    real = safe_load.load_checkpoint
    monkeypatch.setattr(safe_load, "load_checkpoint", lambda path, *a, **k: loads.append(str(path)) or real(path, *a, **k))
    model = task.build_model(cfg.model)
    assert model.qswap_recipe.name == RECIPE
    assert loads == [str(qckpt)]


HADAMARD = ("version: 1\nname: w8a8_hadamard16\ndefaults:\n  weight: {bits: 8}\n  activation: {bits: 8}\n"
            "transforms:\n  - hadamard: {block: 16}\n")


def test_a_hadamard_recipe_needs_a_converted_start_not_a_float_one(converted, tmp_path):
    """hadamard needs no statistics, so it had been applied to the built model whatever fairseq-train
    then loaded into it: a float start's unrotated weights loaded over the folded per-head rotations
    (exit 0, the rotation lost) or failed in fairseq's own state_dict error (the FFN's online
    rotation). Trained from scratch (no start) it folds into the built weights; from a checkpoint
    converted with it, the structure only."""
    from qswap.cli import main

    _, data, float_ckpt, _ = converted
    path = tmp_path / "hadamard.yaml"
    path.write_text(HADAMARD)
    recipe = qswap.load_recipe(path)
    with pytest.raises(ConvertError, match=f"recipe w8a8_hadamard16: its transforms .hadamard.block=16.. are folded "
                                           f"into the weights, and --finetune-from-model {float_ckpt} is a float "
                                           f"checkpoint .its weights would load without the transforms."):
        converted_start(recipe, float_ckpt)
    assert converted_start(recipe, None) is None
    qckpt = tmp_path / "hadamard.pt"
    assert main(["convert", str(float_ckpt), "--recipe", str(path), "--data", str(data), "--calib-batches", "1",
                 "--max-sentences", "4", "-o", str(qckpt)]) == 0
    assert converted_start(recipe, qckpt) is STRUCTURE_ONLY
    with pytest.raises(ConvertError, match="converted with recipe w8a8_hadamard16, not with this one"):
        converted_start(qswap.load_recipe(RECIPE), qckpt)
