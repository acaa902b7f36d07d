"""A tiny real data directory and a float checkpoint made by fairseq-train, shared by the
integration tests (built once per session)."""
import pytest

from datadir import make_s2t_datadir
from fairseq_run import SMALL, TRAIN, run_tool


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory):
    """(root, data dir, float checkpoint path) after 2 updates of real fairseq-train."""
    root = tmp_path_factory.mktemp("fairseq")
    data = make_s2t_datadir(root / "data")
    run_tool("fairseq-train", data, "--task", "speech_to_text", *SMALL, *TRAIN, "--max-update", "2",
             "--save-dir", root / "float", cwd=root)
    return root, data, root / "float" / "checkpoint_last.pt"
