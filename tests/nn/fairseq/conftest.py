import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # fairseq_testkit.py (pytest runs with --import-mode=importlib)

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small models spend more time in thread hand-offs than in kernels on a shared
    2-core machine: run them on one intra-op thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
