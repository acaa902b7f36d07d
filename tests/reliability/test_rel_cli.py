"""CLI errors: exit code 2 and one line for input errors; --debug shows the traceback.

A real process, so the traceback is what Python prints; usage errors are in the corpus."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _qswap(*argv):
    return subprocess.run([sys.executable, "-m", "qswap.cli", *argv], capture_output=True, text=True,
                          cwd=str(REPO))


def test_input_error_is_exit_2_and_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {weight: {bits: 0}}\n")
    result = _qswap("recipes", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("qswap recipes: error: ") and "bits" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults: {weight: {bits: 0}}\n")
    result = _qswap("--debug", "recipes", str(bad))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr and "RecipeError" in result.stderr

