"""qswap checkpoints load as they were written: a stored recipe with ``strict: true`` whose
checks a later qswap makes stricter still loads (the checks ran when it was converted), through
qswap's loader and through fairseq's with the plugin's task."""
import warnings
from pathlib import Path

import pytest

import qswap
from qswap.convert import QswapWarning

pytest.importorskip("fairseq")

from qswap.io import load_fairseq_model, save_qswap_checkpoint  # noqa: E402

ASSET = Path(qswap.__file__).parent / "assets" / "s2t_demo"


def test_a_strict_recipe_the_checks_now_refuse_still_loads(tmp_path):
    model, cfg, _ = load_fairseq_model(ASSET / "checkpoint.pt", arg_overrides={"data": str(ASSET)})
    recipe = {"version": 1, "name": "lin4_strict", "strict": True,
              "defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}},
              "rules": [{"match": {"class": "Linear"}, "weight": {"bits": 4}}]}
    with pytest.raises(qswap.errors.ConvertError, match="strict mode: .*first rule of"):
        qswap.convert(model, recipe)  # the recipe's strict refuses it today
    with pytest.warns(QswapWarning, match="first rule of"):  # as an older qswap converted it: no such check
        qmodel = qswap.convert(model, recipe, strict=False)
    path = save_qswap_checkpoint(tmp_path / "q.pt", qmodel, {"cfg": cfg})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _, _ = load_fairseq_model(path, arg_overrides={"data": str(ASSET)})
    assert loaded.qswap_recipe.strict and loaded.qswap_recipe.name == "lin4_strict"
    layer = loaded.encoder.transformer_layers[0]
    assert layer.fc1.weight_quant.spec.bits == 4 and layer.self_attn.q_proj.weight_quant.spec.bits == 8


@pytest.mark.parametrize("checkpoint", [None, "other.pt"])
def test_a_checkpoint_error_from_fairseqs_build_names_the_checkpoint_once(monkeypatch, checkpoint):
    """A CheckpointError raised while fairseq builds the model is re-raised naming the checkpoint,
    unless it says it names one already (its ``checkpoint``); what its message says is not read."""
    from fairseq import checkpoint_utils

    from qswap.errors import CheckpointError
    from qswap.integration.qat_start import load_recipe_of

    path = ASSET / "checkpoint.pt"
    raised = CheckpointError(f"the recipe file beside {path} is gone", kind="build", checkpoint=checkpoint)

    def build(*args, **kwargs):
        raise raised

    monkeypatch.setattr(checkpoint_utils, "load_model_ensemble_and_task", build)
    with pytest.raises(CheckpointError) as info:
        load_fairseq_model(path, arg_overrides={"data": str(ASSET)})
    if checkpoint is None:
        assert str(info.value) == f"{path}: {raised}" and info.value.checkpoint == path
        assert info.value.kind == "build"
    else:
        assert info.value is raised
    with pytest.raises(CheckpointError) as info:
        load_recipe_of("q.pt", "gone.yaml")
    assert info.value.checkpoint == "q.pt" and str(info.value).startswith("q.pt: cannot load the recipe")
    with pytest.raises(CheckpointError) as info:
        load_recipe_of(None, "gone.yaml")
    assert info.value.checkpoint is None


def test_a_path_of_another_kind_is_a_typed_error_for_checkpoints_and_export_directories():
    """None had been a raw TypeError from pathlib in both."""
    from qswap.errors import CheckpointError, ExportError
    from qswap.export.package import read_manifest

    with pytest.raises(CheckpointError, match="a checkpoint is a path .* got NoneType"):
        load_fairseq_model(None)
    with pytest.raises(ExportError, match="an export directory is a path .* got int"):
        read_manifest(5)


def _swapped_data_dir(tmp_path: Path) -> Path:
    """The shipped model's data directory as far as loading reads it, with two symbols of the
    target dictionary swapped: the same size, other words."""
    import shutil

    data = tmp_path / "swapped"
    data.mkdir()
    for name in ("config.yaml", "spm_unigram200.model", "gcmvn.npz"):
        shutil.copy(ASSET / name, data / name)
    lines = (ASSET / "spm_unigram200.txt").read_text().splitlines(keepends=True)
    lines[4], lines[5] = lines[5], lines[4]
    (data / "spm_unigram200.txt").write_text("".join(lines))
    return data


def test_a_checkpoint_records_its_dictionary_and_refuses_another(tmp_path):
    """A data directory whose dictionary has the same size and two symbols swapped had loaded and
    decoded other words with no error: the qswap checkpoint records the dictionary's facts."""
    from qswap.errors import DataError
    from qswap.io.dictionary import CFG_KEY, dictionary_facts

    model, cfg, task = load_fairseq_model(ASSET / "checkpoint.pt", arg_overrides={"data": str(ASSET)})
    path = save_qswap_checkpoint(tmp_path / "q.pt", qswap.convert(model, "w8a8"), {"cfg": cfg})
    state = qswap.io.load_checkpoint(path)
    assert state["cfg"]["model"][CFG_KEY] == dictionary_facts(task.target_dictionary)
    with pytest.raises(DataError, match=r"target dictionary \(200 symbols\) is not the one the model was made "
                                        r"with \(200 symbols, other symbols, recorded in the checkpoint"):
        load_fairseq_model(path, arg_overrides={"data": str(_swapped_data_dir(tmp_path))})
    loaded, _, _ = load_fairseq_model(path, arg_overrides={"data": str(ASSET)})  # its own loads
    assert loaded.qswap_recipe.name == "w8a8"


def _w8a8_checkpoint(tmp_path):
    from qswap.integration.data import load_model_cfg_task, net_inputs

    model, cfg, task = load_model_cfg_task(ASSET / "checkpoint.pt", str(ASSET))
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, net_inputs(task, "train_calib", 1))
    return save_qswap_checkpoint(tmp_path / "q.pt", qmodel, {"cfg": cfg})


def test_a_quantizer_state_of_a_shape_its_grid_cannot_have_is_a_checkpoint_error(tmp_path):
    """A per-tensor scale stored as 5 numbers had loaded (a quantizer's buffers take the file's
    shape) and the first forward raised a raw ValueError."""
    import torch

    from qswap.errors import CheckpointError

    state = torch.load(_w8a8_checkpoint(tmp_path), weights_only=False)
    key = "encoder.transformer_layers.0.fc1.input_quant"
    state["model"][f"{key}.scale"] = torch.full((5,), 0.1)
    state["model"][f"{key}.zero_point"] = torch.zeros(5, dtype=torch.int32)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"quantizer {key} holds a scale of shape \\(5,\\) for a per_tensor "
                                              f"grid; the file is damaged"):
        load_fairseq_model(tmp_path / "bad.pt", arg_overrides={"data": str(ASSET)})


@pytest.mark.parametrize("cfg", ["no task", "a string"])
def test_a_cfg_without_its_task_section_is_a_checkpoint_error(tmp_path, cfg):
    """omegaconf's 'Missing key task' had come through as a raw traceback."""
    import torch

    from qswap.errors import CheckpointError

    state = torch.load(ASSET / "checkpoint.pt", weights_only=False)
    if cfg == "no task":
        del state["cfg"]["task"]
        match = "its cfg has no 'task' section"
    else:
        state["cfg"] = "garbage"
        match = "its cfg is a str, not a config with 'model' and 'task' sections"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match):
        load_fairseq_model(tmp_path / "bad.pt", arg_overrides={"data": str(ASSET)})
