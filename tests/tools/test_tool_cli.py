"""tools/tool_cli.py: what the tools' command lines share."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.tool_cli import positive_int  # noqa: E402


def test_a_count_is_one_or_more():
    assert positive_int("1") == 1 and positive_int("25") == 25
    for text, said in (("0", "expected 1 or more, got 0"), ("-3", "got -3"), ("two", "a whole number, got 'two'"),
                       ("1.5", "a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            positive_int(text)
