import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # export_testkit.py (pytest runs with --import-mode=importlib)

import pytest
import torch

from export_testkit import calibrated


@pytest.fixture(scope="session")
def qmodel():
    """A small fairseq s2t_transformer, w8a8, calibrated (exports copy it; nothing mutates it)."""
    pytest.importorskip("fairseq")
    from qswap.models import build_s2t_transformer

    torch.set_num_threads(1)
    return calibrated(build_s2t_transformer())
