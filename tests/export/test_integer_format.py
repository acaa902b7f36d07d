"""The integer model export (issue 16 item 5): safetensors + JSON written and read back bit-exact
on a small real fairseq s2t_transformer and on an integerized chain, without pickle."""
import json
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import qswap
from export_testkit import calibrated, same_tree
from qswap.export.integer_format import FORMAT_VERSION, JSON_FILE, tensor_path, write_integer_model
from qswap.export.integer_load import is_integer_export, load_integer_model
from qswap.honesty.integer import check_integer
from qswap.models import s2t_net_input


@pytest.fixture(scope="module", params=["w8a8", "w8a8_per_channel", "w4a8", "w4a4_edges8_stream_smoothquant"])
def integer_model(request, qmodel):
    """The integer form of the small s2t_transformer under each recipe (w8a8: the shared fixture;
    the last: per-channel residual-stream grids, ``ChannelGrid`` and ``CommonGridParams``)."""
    from qswap.models import build_s2t_transformer
    q = qmodel if request.param == "w8a8" else calibrated(build_s2t_transformer(), request.param)
    return qswap.integerize(q)


def test_round_trip_is_bit_exact(integer_model, tmp_path):
    path = write_integer_model(integer_model, tmp_path)
    assert path == tmp_path / JSON_FILE and tensor_path(tmp_path).is_file() and is_integer_export(tmp_path)
    loaded = load_integer_model(tmp_path).model
    same_tree(integer_model, loaded)
    net = s2t_net_input(3, 70, seed=5)
    with torch.no_grad():
        codes = [m.forward_codes(m.quantize_input(net)) for m in (integer_model, loaded)]
        memory = [m.encoder.forward_codes(m.encoder.quantize_input(net["src_tokens"]), net["src_lengths"])
                  for m in (integer_model, loaded)]
    assert codes[0].dtype in (torch.int8, torch.uint8, torch.int32) and torch.equal(codes[0], codes[1])
    for a, b in zip(memory[0][0], memory[1][0]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_description_names_format_hash_float_steps_and_every_tensor(qmodel, tmp_path):
    imodel = qswap.integerize(qmodel)
    write_integer_model(imodel, tmp_path, source="test")
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["tensor_file"]["name"] == tensor_path(tmp_path).name == f"model.{meta['tensor_file']['sha256'][:16]}.safetensors"
    assert set(meta["float_steps"]) == {"quantize_input", "dequantize_output"}
    # the loaded model computes on integers everywhere but in the float steps the JSON declares
    report = check_integer(load_integer_model(tmp_path).model, s2t_net_input(2, 60, seed=1))
    assert report.ok, [str(r) for r in report.findings[:5]]
    assert {r.phase for r in report.declared} == set(meta["float_steps"])
    q_proj = meta["model"]["args"]["encoder"]["args"]["layers"][0]["args"]["attn"]["args"]["projections"][0]
    assert q_proj["class"] == "IntegerLinear"
    assert q_proj["args"]["weight"] == {"tensor": "model.encoder.layers.0.attn.projections.0.weight",
                                        "dtype": "int8", "shape": [64, 64]}
    assert set(q_proj["args"]["requant"]["args"]) == {"m0", "shift", "zero_point", "qmin", "qmax", "rounding"}
    from safetensors import safe_open
    with safe_open(str(tensor_path(tmp_path)), "pt") as f:
        floats = [k for k in f.keys() if f.get_tensor(k).dtype.is_floating_point]
    assert floats and all(k.endswith(".acc_scale") for k in floats)  # the declared output step's scale only


def mlp_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    q = qswap.convert(model, "w8a8")
    qswap.calibrate(q, [x, x.flip(0)])
    return qswap.integerize(q), x


def test_a_chain_round_trips_and_loads_without_pickle_or_fairseq(tmp_path):
    imodel, x = mlp_chain()
    write_integer_model(imodel, tmp_path)
    code = (
        "import pickle, sys, torch\n"
        "def refuse(*a, **k): raise AssertionError('pickle used')\n"
        "pickle.load = pickle.loads = torch.load = refuse\n"
        "from qswap.export.integer_load import load_integer_model\n"
        f"m = load_integer_model({str(tmp_path)!r}).model\n"
        "assert 'fairseq' not in sys.modules, 'fairseq imported'\n"
        "print(type(m).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "IntegerModel"
    loaded = load_integer_model(tmp_path).model
    same_tree(imodel, loaded)
    assert torch.equal(imodel.forward_codes(imodel.quantize_input(x)), loaded.forward_codes(loaded.quantize_input(x)))
    assert torch.equal(imodel(x), loaded(x))


def test_loading_builds_no_fairseq_module(qmodel, tmp_path, monkeypatch):
    write_integer_model(qswap.integerize(qmodel), tmp_path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    loaded = load_integer_model(tmp_path).model
    assert all(type(m).__module__.startswith(("qswap.", "torch.nn.")) for m in loaded.modules())


def test_a_failed_write_into_a_fresh_nested_folder_takes_the_folders_back(integer_model, tmp_path, monkeypatch):
    """A write that fails after the folders were made (a full disk writing the JSON) leaves none of
    them, nor the tensor file it wrote first."""
    import qswap.export.integer_format as integer_format
    from qswap.errors import OutputError

    def full_disk(path, text):
        raise OutputError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(integer_format, "atomic_write_text", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        write_integer_model(integer_model, tmp_path / "new" / "deploy")
    assert not (tmp_path / "new").exists()


def test_a_re_export_stopped_before_its_json_leaves_the_previous_export_whole(qmodel, tmp_path, monkeypatch):
    """The tensor file was renamed into place first, then the JSON: a re-export stopped between
    the two (a full disk, SIGTERM) left the new tensors beside the old JSON, and the previous
    export no longer loaded ("model.safetensors has N bytes, model.json records M")."""
    import qswap.export.integer_format as integer_format
    from qswap.cli import Terminated

    old = qswap.integerize(qmodel)
    write_integer_model(old, tmp_path, source="old")
    old_tensors = tensor_path(tmp_path)
    from qswap.models import build_s2t_transformer
    new = qswap.integerize(calibrated(build_s2t_transformer(), "w4a8"))

    def stopped(path, text):
        raise Terminated()
    with monkeypatch.context() as m:
        m.setattr(integer_format, "atomic_write_text", stopped)
        with pytest.raises(Terminated):
            write_integer_model(new, tmp_path, source="new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([JSON_FILE, old_tensors.name])
    assert load_integer_model(tmp_path).source == "old"
    write_integer_model(new, tmp_path, source="new")  # completed: the old tensor file goes last
    assert load_integer_model(tmp_path).source == "new" and not old_tensors.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([JSON_FILE, tensor_path(tmp_path).name])
    (tmp_path / old_tensors.name).write_bytes(b"left by a killed re-export")  # qswap's name: cleared next time
    write_integer_model(old, tmp_path, source="old again")
    assert len(list(tmp_path.iterdir())) == 2 and load_integer_model(tmp_path).source == "old again"
    killed = tmp_path / "killed"  # a first export killed outright after its tensor file: refused no more
    killed.mkdir()
    (killed / "model.0123456789abcdef.safetensors").write_bytes(b"half")
    write_integer_model(old, killed)
    assert sorted(p.name for p in killed.iterdir()) == sorted([JSON_FILE, old_tensors.name])


def test_an_export_into_a_folder_of_other_files_is_refused(qmodel, tmp_path):
    """A folder holding a model.json or model.safetensors qswap did not write lost them to the
    export; refused, every file kept. A new, an empty, and an earlier integer export's folder take it."""
    from qswap.errors import OutputError

    imodel = qswap.integerize(qmodel)
    for files in ({JSON_FILE: '{"weights": "mine"}', "model.safetensors": "mine"}, {"notes.txt": "mine"},
                  {JSON_FILE: "not json"}):
        folder = tmp_path / f"foreign{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        with pytest.raises(OutputError, match="is a folder with other files, not an integer model export"):
            write_integer_model(imodel, folder)
        assert {p.name: p.read_text() for p in folder.iterdir()} == files
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new", tmp_path / "new"):  # the last: a re-export
        write_integer_model(imodel, folder, source=folder.name)
        assert json.loads((folder / JSON_FILE).read_text())["source"] == folder.name
