import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # rel_fixtures.py, rel_cases.py

from rel_fixtures import Shared  # noqa: E402


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("reliability"))
