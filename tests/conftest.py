import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, datadir.py, fairseq_run.py


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory):
    """(root, data dir, float checkpoint path): a tiny real data directory and 2 updates of
    real fairseq-train on it, built once per session."""
    from datadir import make_s2t_datadir
    from fairseq_run import SMALL, TRAIN, run_tool

    root = tmp_path_factory.mktemp("fairseq")
    data = make_s2t_datadir(root / "data")
    run_tool("fairseq-train", data, "--task", "speech_to_text", *SMALL, *TRAIN, "--max-update", "2",
             "--save-dir", root / "float", cwd=root)
    return root, data, root / "float" / "checkpoint_last.pt"
