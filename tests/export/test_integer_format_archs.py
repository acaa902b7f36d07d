"""The integer model export (issue 16 item 5) of the architectures beyond the pre-norm S2T
transformer: the S2T conformer (ESPnet abs, rel_pos and rope attention) and wav2vec 2.0 CTC
(GroupNorm and LayerNorm feature extractors, with and without ``post_extract_proj``), each a
small real fairseq model, written and read back bit-exact: the same declared tree and the same
codes on a batch, and the loaded model still integer-only outside its declared float steps;
a fresh interpreter loads them (importing only what the loader imports), and ``qswap export``
writes a fairseq-trained conformer checkpoint."""
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("fairseq")

import qswap  # noqa: E402
from export_testkit import same_description, same_tree  # noqa: E402
from qswap.cli import main  # noqa: E402
from qswap.export.integer_format import write_integer_model  # noqa: E402
from qswap.export.integer_load import load_integer_model  # noqa: E402
from qswap.honesty.integer import audit_integer  # noqa: E402
from qswap.models import build_s2t_conformer, build_wav2vec2_ctc, s2t_net_input, wav2vec2_net_input  # noqa: E402

CONFORMERS = {"abs": {"pos_enc_type": "abs"}, "rel_pos": {}, "rope": {"pos_enc_type": "rope"}}
WAV2VEC2 = {"group_norm": {},  # encoder dim = conv dim: no post_extract_proj
            "layer_norm": {"extractor_mode": "layer_norm", "layer_norm_first": True, "conv_bias": True},
            "projected": {"encoder_embed_dim": 48}}  # post_extract_proj 32 -> 48


def calibrated(model, batches, recipe):
    qmodel = qswap.convert(model, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantizers on paths the batches never take keep observing
        qswap.calibrate(qmodel, batches)
    return qmodel


def exported(imodel, tmp_path):
    write_integer_model(imodel, tmp_path)
    loaded = load_integer_model(tmp_path).model
    same_tree(imodel, loaded)
    same_description(imodel, loaded)
    return loaded


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel"])
@pytest.mark.parametrize("attention", sorted(CONFORMERS))
def test_the_conformer_round_trips_bit_exact(attention, recipe, tmp_path):
    model = build_s2t_conformer(seed=0, **CONFORMERS[attention])
    imodel = qswap.integerize(calibrated(model, [s2t_net_input(2, 60, seed=s) for s in range(2)], recipe))
    loaded = exported(imodel, tmp_path)
    net = s2t_net_input(3, 70, seed=5)  # another batch, longer
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net)) for m in (imodel, loaded)]
        memory = [m.encoder.forward_codes(m.encoder.quantize_input(net["src_tokens"]), net["src_lengths"])[0]
                  for m in (imodel, loaded)]
        logits = [m(**net)[0] for m in (imodel, loaded)]
    assert not codes[0].dtype.is_floating_point and torch.equal(codes[0], codes[1])
    for a, b in zip(memory[0], memory[1], strict=True):  # one per decoder layer's key grid
        assert a.dtype in (torch.int8, torch.uint8) and torch.equal(a, b)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_per_channel"])
@pytest.mark.parametrize("extractor", sorted(WAV2VEC2))
def test_wav2vec2_ctc_round_trips_bit_exact(extractor, recipe, tmp_path):
    model = build_wav2vec2_ctc(seed=0, **WAV2VEC2[extractor])
    imodel = qswap.integerize(calibrated(model, [wav2vec2_net_input(seed=s) for s in range(2)], recipe))
    assert (imodel.w2v_model.proj is None) == (extractor != "projected")
    loaded = exported(imodel, tmp_path)
    net = wav2vec2_net_input(3, 2400, seed=7)
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net)) for m in (imodel, loaded)]
        logits = [m(**net)["encoder_out"] for m in (imodel, loaded)]
    assert codes[0]["encoder_out"].dtype in (torch.int8, torch.uint8)
    assert torch.equal(codes[0]["encoder_out"], codes[1]["encoder_out"])
    assert torch.equal(codes[0]["padding_mask"], codes[1]["padding_mask"])
    assert torch.equal(logits[0], logits[1])


def test_loaded_models_are_integer_only_outside_their_declared_steps(tmp_path):
    """The export keeps the declared float steps as the modules the integer audit recognises."""
    w2v = qswap.integerize(calibrated(build_wav2vec2_ctc(seed=1), [wav2vec2_net_input(seed=1)], "w8a8"))
    report = audit_integer(exported(w2v, tmp_path / "w2v"), wav2vec2_net_input(seed=2))
    assert report.integer_only and {d.module for d in report.declared} == {"input", "output"}
    conformer = qswap.integerize(calibrated(build_s2t_conformer(seed=1), [s2t_net_input(seed=1)], "w8a8"))
    report = audit_integer(exported(conformer, tmp_path / "conformer"), s2t_net_input(seed=2))
    assert report.integer_only, [(f.path, f.module, f.op) for f in report.findings[:5]]


def test_a_fresh_interpreter_loads_the_conformer_and_wav2vec2_exports(tmp_path):
    """Loading imports the modules that declare the forms (``IntegerChain`` included), nothing
    the file names."""
    models = {"conformer": (build_s2t_conformer(seed=2), [s2t_net_input(seed=2)]),
              "w2v": (build_wav2vec2_ctc(seed=2), [wav2vec2_net_input(seed=2)])}
    for name, (model, batches) in models.items():
        write_integer_model(qswap.integerize(calibrated(model, batches, "w8a8")), tmp_path / name)
    code = ("from qswap.export.integer_load import load_integer_model\n"
            f"print([type(load_integer_model(d).model).__name__ for d in {[str(tmp_path / n) for n in models]!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['IntegerS2TTransformerModel', 'IntegerWav2VecCtc']"


@pytest.fixture(scope="module")
def conformer_checkpoint(tmp_path_factory):
    """(data dir, w8a8 checkpoint): a tiny rel_pos s2t_conformer trained 2 updates by fairseq-train
    on a real data directory, converted and calibrated by ``qswap convert``."""
    from datadir import make_s2t_datadir
    from fairseq_run import SMALL, TRAIN, run_tool

    root = tmp_path_factory.mktemp("conformer")
    data = make_s2t_datadir(root / "data")
    arch = [("s2t_conformer" if a == "s2t_transformer" else a) for a in SMALL]
    run_tool("fairseq-train", data, "--task", "speech_to_text", *arch, "--attn-type", "espnet", "--pos-enc-type",
             "rel_pos", "--depthwise-conv-kernel-size", "7", *TRAIN, "--max-update", "2", "--save-dir",
             root / "float", cwd=root)
    assert main(["convert", str(root / "float" / "checkpoint_last.pt"), "--recipe", "w8a8", "--data", str(data),
                 "--calib-batches", "2", "--max-sentences", "4", "-o", str(root / "w8a8.pt")]) == 0
    return data, root / "w8a8.pt"


def test_qswap_export_writes_a_conformer_checkpoint(conformer_checkpoint, tmp_path):
    from qswap.integration import data as fdata

    data, qckpt = conformer_checkpoint
    assert main(["export", str(qckpt), "-o", str(tmp_path / "export"), "--data", str(data)]) == 0
    exported = load_integer_model(tmp_path / "export")
    model, task = fdata.load_model_and_task(qckpt, data)
    imodel = qswap.integerize(model)
    same_description(imodel, exported.model)
    assert exported.task["_name"] == "speech_to_text" and exported.decoding["size"] == len(task.target_dictionary)
    net = next(iter(fdata.batches(task, "test", max_sentences=3)))["net_input"]
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net)) for m in (imodel, exported.model)]
    assert torch.equal(codes[0], codes[1])
