"""Determinism, and convert leaving the caller's model alone."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

import qswap
from qswap.io import load_fairseq_model, save_qswap_checkpoint
from rel_fixtures import calibration_batches

HERE = Path(__file__).resolve().parent
RUN = """
import sys, hashlib, json
import torch
torch.set_num_threads({threads})  # float sums are bit-identical only for the same thread count
sys.path.insert(0, {here!r})
from test_rel_determinism import convert_calibrate_save
path, report = convert_calibrate_save({ckpt!r}, {recipe!r}, {out!r})
print(json.dumps([hashlib.sha256(open(path, "rb").read()).hexdigest(), report]))
"""


def convert_calibrate_save(checkpoint, recipe, out):
    model, cfg, _task = load_fairseq_model(checkpoint)
    qmodel = qswap.convert(model, recipe)
    qswap.calibrate(qmodel, calibration_batches(2))
    return save_qswap_checkpoint(out, qmodel, {"cfg": cfg}), qmodel.qswap_report.to_dict()


def test_twice_in_one_process_gives_identical_checkpoints_and_reports(shared, tmp_path):
    first = shared.qswap_checkpoint()  # the same steps, run earlier for other tests
    again, report = convert_calibrate_save(shared.checkpoint(), "w8a8", tmp_path / "again.pt")
    assert again.read_bytes() == first.read_bytes()
    assert report == shared.qswap_report


def test_a_fresh_process_writes_the_same_bytes_and_report(shared, tmp_path):
    path, report = convert_calibrate_save(shared.checkpoint(), "w4a8", tmp_path / "here.pt")
    code = RUN.format(threads=torch.get_num_threads(), here=str(HERE), ckpt=str(shared.checkpoint()), recipe="w4a8",
                      out=str(tmp_path / "there.pt"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(HERE.parents[1])).stdout.strip().splitlines()[-1]
    digest, their_report = json.loads(out)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert their_report == json.loads(json.dumps(report))


def test_reloaded_checkpoint_gives_the_same_outputs(shared):
    model, _cfg, _task = load_fairseq_model(shared.qswap_checkpoint())
    again, _cfg, _task = load_fairseq_model(shared.qswap_checkpoint())
    x = calibration_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(model(**x)[0], again(**x)[0])


def test_convert_leaves_the_callers_fairseq_model_untouched(shared):
    model, _cfg, _task = load_fairseq_model(shared.checkpoint())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    x = calibration_batches(1)[0]
    with torch.no_grad():
        y = model(**x)[0]
    qmodel = qswap.convert(model, "w8a8")
    qswap.calibrate(qmodel, calibration_batches(2))
    assert [type(m) for m in model.modules()] == classes
    assert not hasattr(model, "qswap_recipe") and not model.training
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**x)[0], y)
    qswap.convert(model, "w8a8", inplace=True)  # the only way to change the caller's model
    assert any(isinstance(m, qswap.FakeQuantize) for m in model.modules())
