"""The plugin's ``audio_finetuning_qswap`` task through fairseq's real entry points: wav2vec 2.0
CTC fine-tuning with QAT in fairseq-train (from a tiny pretraining checkpoint made here), resuming
it, and reading the checkpoint it saves back with qswap. No mocks: real 16 kHz wav files read by
fairseq's FileAudioDataset (which needs soundfile), letter targets, fairseq's CTC criterion."""
import json
import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

import qswap
from fairseq_run import BIN, run_tool as _run

WORDS = "set a timer turn on the lights call anna".split()
FIRST_OBSERVER = "w2v_encoder.w2v_model.feature_extractor.conv_layers.0.0.input_quant.observer"
W2V_SMALL = dict(conv_feature_layers="[(32, 10, 5), (32, 3, 2), (32, 2, 2)]", encoder_embed_dim=32,
                 encoder_ffn_embed_dim=64, encoder_layers=2, encoder_attention_heads=4, conv_pos=16,
                 conv_pos_groups=4, final_dim=16, latent_vars=8, latent_groups=2)


def make_w2v_datadir(root, splits=None, seed=0):
    """An audio_finetuning data directory: noise wavs, TSV manifests, letter targets, dict."""
    sf = pytest.importorskip("soundfile", reason="fairseq's FileAudioDataset reads audio with soundfile")
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    (root / "wav").mkdir(parents=True)
    letters = set()
    for split, n in (splits or {"train": 4, "valid": 2}).items():
        tsv, ltr = [str(root.resolve())], []
        for i in range(n):
            samples = rng.randint(8000, 12000)  # 0.5 to 0.75 s
            rel = f"wav/{split}_{i}.wav"
            sf.write(root / rel, (0.1 * nprng.standard_normal(samples)).astype(np.float32), 16000)
            words = [rng.choice(WORDS).upper() for _ in range(rng.randint(2, 3))]
            tsv.append(f"{rel}\t{samples}")
            ltr.append(" | ".join(" ".join(w) for w in words) + " |")
            letters |= set("".join(words))
        (root / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
        (root / f"{split}.ltr").write_text("\n".join(ltr) + "\n")
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in ["|", *sorted(letters)]))
    return root


def make_pretrained_w2v(path):
    """A small random wav2vec 2.0 *pretraining* checkpoint, as fairseq saves one: plain-dict cfg
    (a FairseqConfig with the wav2vec2 model and audio_pretraining task), state dict, history."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
    from omegaconf import OmegaConf

    model_cfg = Wav2Vec2Config(**W2V_SMALL)
    model_cfg._name = "wav2vec2"
    task_cfg = AudioPretrainingConfig(data=".", normalize=False, tpu=False, seed=1)
    task_cfg._name = "audio_pretraining"
    cfg = OmegaConf.structured(FairseqConfig(model=model_cfg, task=task_cfg))
    torch.manual_seed(0)
    model = Wav2Vec2Model.build_model(model_cfg)
    torch.save({"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "args": None,
                "model": model.state_dict(), "extra_state": {"train_iterator": None},
                "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "adam",
                                       "lr_scheduler_state": {}, "num_updates": 0}]}, path)
    return path


def _train_args(root, data, save_dir, updates, recipe="w8a8"):
    return ["fairseq-train", data, "--user-dir", qswap.plugin_dir(), "--task", "audio_finetuning_qswap",
            "--labels", "ltr", "--arch", "wav2vec_ctc", "--w2v-path", root / "pre.pt",
            "--criterion", "ctc", "--post-process", "letter", "--qswap-recipe", recipe,
            "--qswap-calib-batches", "1", "--optimizer", "adam", "--lr", "1e-4", "--lr-scheduler",
            "fixed", "--max-update", str(updates), "--max-tokens", "100000", "--cpu",
            "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--train-subset", "train", "--valid-subset", "valid", "--required-batch-size-multiple",
            "1", "--seed", "1", "--log-format", "simple", "--no-progress-bar"]


def _train(root, data, save_dir, updates):
    return _run(*_train_args(root, data, save_dir, updates), cwd=root)


def _refused(tool, *args, cwd):
    """stderr of a fairseq command that must fail."""
    result = subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, data dir, QAT checkpoint, fairseq-train log): 2 updates, the first a calibration step."""
    root = tmp_path_factory.mktemp("w2v")
    data = make_w2v_datadir(root / "data")
    make_pretrained_w2v(root / "pre.pt")
    log = _train(root, data, root / "qat", 2)
    return root, data, root / "qat" / "checkpoint_last.pt", log


def _model_state(path):
    return torch.load(path, weights_only=False, map_location="cpu")["model"]


def test_qat_fine_tuning_converts_calibrates_and_saves_quantizer_state(trained):
    """fairseq-train logs the conversion and the calibration; the checkpoint holds frozen
    activation grids and names the recipe in the task cfg, where fairseq's loader finds it."""
    _, _, ckpt, log = trained
    assert "qswap: converted with recipe w8a8" in log
    assert "qswap: calibrated and froze" in log
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert any(k.endswith("input_quant.scale") for k in state["model"])
    frozen = [v for k, v in state["model"].items() if k.endswith("input_quant.frozen")]
    assert frozen and all(bool(v) for v in frozen)
    assert state["cfg"]["task"]["_name"] == "audio_finetuning_qswap"
    assert state["cfg"]["task"]["qswap_recipe"] == "w8a8"


def test_qswap_loads_the_checkpoint_back_as_the_same_quantized_model(trained):
    """load_model_and_task rebuilds the fake-quant model with exactly the saved state (quantizer
    buffers included), and a forward on a real batch of the data is finite."""
    from qswap.integration.data import batches, load_model_and_task

    _, data, ckpt, _ = trained
    model, task = load_model_and_task(ckpt, data)  # its pickled Dictionary is on the allowlist
    assert model.qswap_recipe.name == "w8a8"
    assert any(isinstance(m, qswap.FakeQuantize) for m in model.modules())
    saved, loaded = _model_state(ckpt), model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        out = model(**next(batches(task, "valid"))["net_input"])
    assert out["encoder_out"].shape[-1] == len(task.target_dictionary)
    assert torch.isfinite(out["encoder_out"]).all()


def test_qswap_eval_decodes_the_qat_checkpoint(trained, tmp_path):
    """qswap eval greedy-CTC decodes every valid utterance with the model rebuilt as w8a8."""
    from qswap.cli import main

    _, data, ckpt, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--subset", "valid",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "w8a8"
    assert result["counts"]["utterances"] == 2


def test_qswap_eval_integer_decodes_the_integer_wav2vec2_ctc_model(trained, tmp_path):
    """qswap eval QCKPT --integer: the integer wav2vec 2.0 CTC model, greedy CTC, every utterance;
    its transcripts are those of decoding ``qswap.integerize`` of the checkpoint directly."""
    from qswap.cli import main
    from qswap.integration.data import batches, load_model_and_task
    from qswap.integration.decode import decode

    _, data, ckpt, _ = trained
    out = tmp_path / "eval_integer.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--subset", "valid", "--integer",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "w8a8 (integer)" and result["counts"]["utterances"] == 2
    model, task = load_model_and_task(ckpt, data)
    direct = decode(task, qswap.integerize(model), batches(task, "valid"))
    assert sorted((u["id"], u["hyp"]) for u in result["utterances"]) == sorted(
        (u.id, u.hyp) for u in direct.utterances)


def test_qswap_export_writes_the_qat_checkpoint_as_an_integer_model(trained, tmp_path):
    """``qswap export QCKPT -o DIR`` on the fairseq-trained checkpoint: the loaded integer wav2vec 2.0
    CTC model gives the codes of ``qswap.integerize`` of the checkpoint on a real batch."""
    from qswap.cli import main
    from qswap.export.integer_load import load_integer_model
    from qswap.integration.data import batches, load_model_and_task

    _, data, ckpt, _ = trained
    assert main(["export", str(ckpt), "-o", str(tmp_path / "export"), "--data", str(data)]) == 0
    exported = load_integer_model(tmp_path / "export")
    assert type(exported.model).__name__ == "IntegerWav2VecCtc" and set(exported.float_steps) == {
        "quantize_input", "dequantize_output"}
    model, task = load_model_and_task(ckpt, data)
    imodel = qswap.integerize(model)
    net_input = next(batches(task, "valid"))["net_input"]
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net_input)) for m in (imodel, exported.model)]
    assert codes[0]["encoder_out"].dtype in (torch.int8, torch.uint8)
    assert torch.equal(codes[0]["encoder_out"], codes[1]["encoder_out"])
    assert exported.decoding["size"] == len(task.target_dictionary)


def test_qswap_eval_decodes_the_exported_integer_wav2vec2_ctc_model(trained, tmp_path):
    """``qswap eval EXPORT_DIR``: greedy CTC on the exported integer model, the task set up from
    the export's record; the transcripts of ``qswap eval QCKPT --integer``."""
    from qswap.cli import main

    _, data, ckpt, _ = trained
    assert main(["export", str(ckpt), "-o", str(tmp_path / "export"), "--data", str(data)]) == 0
    for args, out in ((["--integer"], "direct.json"), ([], "exported.json")):
        source = str(ckpt) if args else str(tmp_path / "export")
        assert main(["eval", source, *args, "--data", str(data), "--subset", "valid",
                     "--json", str(tmp_path / out)]) == 0
    direct, exported = (json.loads((tmp_path / out).read_text()) for out in ("direct.json", "exported.json"))
    assert exported["model"] == "integer export (greedy CTC)" and exported["counts"]["utterances"] == 2
    assert [(u["id"], u["hyp"]) for u in exported["utterances"]] == [(u["id"], u["hyp"]) for u in direct["utterances"]]


def test_qswap_export_onnx_and_eval_onnxruntime_on_the_qat_checkpoint(trained, tmp_path):
    """``qswap export QCKPT --onnx`` writes the fairseq-trained CTC model as one QDQ graph;
    ``qswap eval DIR --backend onnxruntime`` greedy-CTC decodes every valid utterance with it
    (the task set up from export.json), giving the transcripts of the fake-quant model with the
    float insides (``--simulate float``: what a QDQ graph computes); ``qswap audit DIR --onnx``
    audits the graph."""
    pytest.importorskip("onnxruntime")
    from qswap.cli import main

    _, data, ckpt, _ = trained
    deploy = tmp_path / "deploy"
    assert main(["export", str(ckpt), "--onnx", "-o", str(deploy), "--data", str(data)]) == 0
    assert sorted(p.name for p in deploy.iterdir()) == ["ctc.onnx", "export.json"]
    out = tmp_path / "eval_onnx.json"
    assert main(["eval", str(deploy), "--backend", "onnxruntime", "--data", str(data), "--subset", "valid",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "w8a8 (onnxruntime)" and result["counts"]["utterances"] == 2
    assert main(["eval", str(ckpt), "--data", str(data), "--subset", "valid", "--simulate", "float",
                 "--json", str(tmp_path / "fq.json")]) == 0
    fake_quant = json.loads((tmp_path / "fq.json").read_text())
    assert [u["hyp"] for u in result["utterances"]] == [u["hyp"] for u in fake_quant["utterances"]]
    assert main(["audit", str(deploy), "--onnx", "--json", str(tmp_path / "audit.json")]) == 1  # float LayerNorms
    assert json.loads((tmp_path / "audit.json").read_text())["graphs"][0]["graph"] == "ctc.onnx"


def test_fairseq_resumes_qat_from_the_saved_checkpoint(trained, tmp_path):
    """fairseq's own torch.load (with the plugin's allowlist) resumes from checkpoint_last.pt:
    the model is converted again, the frozen grids load and are not recalibrated, though a few
    activation quantizers off wav2vec 2.0's forward path never got a grid to freeze."""
    root, data, ckpt, _ = trained
    shutil.copytree(ckpt.parent, tmp_path / "qat")
    log = _train(root, data, tmp_path / "qat", 3)
    assert "Loaded checkpoint" in log
    assert "qswap: converted with recipe w8a8" in log
    assert "calibrated and froze" not in log
    before, after = _model_state(ckpt), _model_state(tmp_path / "qat" / "checkpoint_last.pt")
    assert torch.load(tmp_path / "qat" / "checkpoint_last.pt", weights_only=False)[
        "optimizer_history"][-1]["num_updates"] == 3
    grid = [f"{FIRST_OBSERVER}.min_val", f"{FIRST_OBSERVER}.max_val", FIRST_OBSERVER.replace("observer", "scale")]
    assert all(torch.equal(before[k], after[k]) for k in grid)
    assert bool(after[FIRST_OBSERVER.replace("observer", "frozen")])


def test_resuming_with_another_recipe_is_refused(trained, tmp_path):
    """fairseq-train resuming a w8a8 run (SAVE_DIR/checkpoint_last.pt, or --restore-file PATH) with
    --qswap-recipe w4a4 would load 8-bit grids into 4-bit quantizers: a ConvertError naming both
    recipes and the checkpoint, before any update (resuming with w8a8 itself works:
    test_fairseq_resumes_qat_from_the_saved_checkpoint)."""
    root, data, ckpt, _ = trained
    shutil.copytree(ckpt.parent, tmp_path / "qat")
    last = tmp_path / "qat" / "checkpoint_last.pt"
    err = _refused(*_train_args(root, data, tmp_path / "qat", 3, recipe="w4a4"), cwd=root)
    assert f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {last} was" in err
    assert torch.load(last, weights_only=False)["optimizer_history"][-1]["num_updates"] == 2
    err = _refused(*_train_args(root, data, tmp_path / "other", 3, recipe="w4a4"), "--restore-file", ckpt, cwd=root)
    assert f"ConvertError: --qswap-recipe w4a4 is not the recipe w8a8 that the checkpoint {ckpt} was" in err
    assert not (tmp_path / "other" / "checkpoint_last.pt").exists()


def test_audio_finetuning_options_parse_from_the_dataclass():
    """fairseq builds --qswap-* options from AudioFinetuningQswapConfig's field types (string
    annotations crash it), each with its help text; no audio needed."""
    from argparse import ArgumentParser

    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from qswap.integration.fairseq_task import AudioFinetuningQswapConfig
    parser = ArgumentParser()
    gen_parser_from_dataclass(parser, AudioFinetuningQswapConfig())
    args = parser.parse_args(["DATA", "--qswap-recipe", "w4a8", "--qswap-calib-batches", "3", "--qswap-strict"])
    assert (args.qswap_recipe, args.qswap_calib_batches, args.qswap_strict, args.qswap_audit) == \
        ("w4a8", 3, True, False)
    assert "qswap recipe (shipped name such as w8a8" in parser.format_help()


def test_audio_finetuning_task_sees_fairseqs_checkpoint_options(tmp_path):
    """build_model reads --finetune-from-model (a recipe with data-dependent transforms trains only
    from a qswap convert checkpoint) and --save-dir / --restore-file (the checkpoint a resumed run
    loads must hold the recipe's grids): the dataclass task's cfg takes them from fairseq's
    checkpoint section, through the config fairseq-train builds."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf, merge_with_parent
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    from qswap.integration.fairseq_task import register_tasks
    register_tasks()
    argv = [str(tmp_path), "--task", "audio_finetuning_qswap", "--arch", "wav2vec_ctc", "--labels", "ltr"]
    for extra, want in (([], None), (["--finetune-from-model", "qckpt.pt"], "qckpt.pt")):
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv + extra))
        task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY["audio_finetuning_qswap"](), cfg.task)
        assert task_cfg.finetune_from_model == want
    # and the run's --save-dir and --restore-file: build_model checks the checkpoint a resumed run loads
    run = ["--save-dir", str(tmp_path / "run"), "--restore-file", "mine.pt"]
    for extra, want in (([], ("checkpoints", "checkpoint_last.pt")), (run, (str(tmp_path / "run"), "mine.pt"))):
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv + extra))
        task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY["audio_finetuning_qswap"](), cfg.task)
        assert (task_cfg.save_dir, task_cfg.restore_file) == want
    # and --checkpoint-suffix / --continue-once, with which fairseq's loader picks the checkpoint
    run = ["--checkpoint-suffix", "_x", "--continue-once", "other.pt"]
    for extra, want in (([], ("", None)), (run, ("_x", "other.pt"))):
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv + extra))
        task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY["audio_finetuning_qswap"](), cfg.task)
        assert (task_cfg.checkpoint_suffix, task_cfg.continue_once) == want
    # and --max-update, against which --qswap-calib-batches is checked
    for extra, want in (([], 0), (["--max-update", "7"], 7)):
        parser = options.get_training_parser()
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv + extra))
        task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY["audio_finetuning_qswap"](), cfg.task)
        assert task_cfg.max_update == want


def test_more_calibration_updates_than_the_run_makes_are_said(tmp_path):
    """audio_finetuning_qswap's cfg had not carried --max-update: --qswap-calib-batches 3 with
    --max-update 1 ended calibrating (no grid frozen, no weight trained) with nothing said, as
    speech_to_text_qswap's runs no longer do."""
    root = tmp_path
    data = make_w2v_datadir(root / "data")
    make_pretrained_w2v(root / "pre.pt")
    args = _train_args(root, data, root / "short", 1)
    args[args.index("--qswap-calib-batches") + 1] = "3"
    log = _run(*args, cwd=root)
    assert ("--qswap-calib-batches 3 is more than --max-update 1: this run ends before calibration does") in log


def test_qswap_loads_the_checkpoint_without_trust(trained):
    from qswap.integration.data import load_model_and_task

    _, data, ckpt, _ = trained
    model, _ = load_model_and_task(ckpt, data)
    assert model.qswap_recipe.name == "w8a8"


def test_qswap_eval_reads_letter_targets_as_words(trained, tmp_path):
    from qswap.cli import main

    _, data, ckpt, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--data", str(data), "--subset", "valid",
                 "--json", str(out)]) == 0
    utterances = json.loads(out.read_text())["utterances"]
    refs = [u["ref"] for u in utterances]
    assert not any(special in u["hyp"] for u in utterances for special in ("<pad>", "</s>", "<s>", "|"))
    letters = (data / "valid.ltr").read_text().splitlines()
    assert refs == [line.replace(" ", "").replace("|", " ").strip() for line in letters]


def test_a_checkpoint_without_the_tasks_checkpoint_options_still_loads(trained, tmp_path):
    """A checkpoint saved before the task cfg carried save_dir and restore_file (or with them
    removed) loads and decodes as before: the task rebuilt from it never resolves them."""
    from qswap.cli import main
    from qswap.integration.data import load_model_and_task

    _, data, ckpt, _ = trained
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert state["cfg"]["task"]["save_dir"] == str(ckpt.parent)  # stored resolved, as a plain value
    assert state["cfg"]["task"]["restore_file"] == "checkpoint_last.pt"
    assert (state["cfg"]["task"]["checkpoint_suffix"], state["cfg"]["task"]["continue_once"]) == ("", None)
    assert state["cfg"]["task"]["max_update"] == 2
    for key in ("save_dir", "restore_file", "finetune_from_model", "checkpoint_suffix", "continue_once", "max_update"):
        del state["cfg"]["task"][key]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    model, _ = load_model_and_task(old, data)
    assert model.qswap_recipe.name == "w8a8"
    assert main(["eval", str(old), "--data", str(data), "--subset", "valid", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["counts"]["utterances"] == 2
    # its export records the task cfg without them; decoding the export sets the task up again
    assert main(["export", str(old), "-o", str(tmp_path / "export"), "--data", str(data)]) == 0
    assert main(["eval", str(tmp_path / "export"), "--data", str(data), "--subset", "valid",
                 "--json", str(tmp_path / "x.json")]) == 0
    assert json.loads((tmp_path / "x.json").read_text())["counts"]["utterances"] == 2
