"""qswap.io.safe_load: what a path that is not a checkpoint file tells the caller to pass instead."""
import pytest

from qswap.errors import CheckpointError
from qswap.io.safe_load import load_checkpoint


def test_a_directory_is_refused_naming_a_checkpoint_file_in_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory; pass the checkpoint file \(e\.g\. .*checkpoint_best\.pt\)$"):
        load_checkpoint(tmp_path)


def test_an_onnx_export_directory_is_refused_pointing_at_the_onnxruntime_backend(tmp_path):
    """``qswap eval DIR`` on a 'qswap export --onnx' directory without ``--backend onnxruntime``."""
    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is a directory of ONNX graphs .*--backend onnxruntime .*--onnx") as e:
        load_checkpoint(tmp_path)
    assert "checkpoint_best.pt" not in str(e.value)  # no checkpoint file to suggest in there


def test_an_integer_export_directory_is_refused_pointing_at_qswap_eval(tmp_path):
    """A 'qswap export' directory (model.json + model.safetensors) where a checkpoint file is expected
    (qswap convert, audit): the hint had named a checkpoint_best.pt that cannot be in there."""
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is an integer model written by 'qswap export' .*'qswap eval ") as e:
        load_checkpoint(tmp_path)
    assert "checkpoint_best.pt" not in str(e.value)
