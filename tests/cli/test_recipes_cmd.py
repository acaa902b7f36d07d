"""qswap recipes NAME: what a recipe sets besides its rules' widths is shown too."""
import sys

import pytest
from rich.console import Console

from qswap.cli import main, recipes_cmd


@pytest.fixture
def wide(monkeypatch):
    """One table row per line (the command's console wraps at 160 columns off a terminal)."""
    monkeypatch.setattr(recipes_cmd, "console", lambda: Console(file=sys.stdout, width=1000))


def test_a_recipe_shows_its_sites_transforms_and_settings(capsys, wide):
    assert main(["recipes", "w4a4_edges8_stream_smoothquant"]) == 0
    out = capsys.readouterr().out
    assert "attn_residual: int4 affine per_channel(-1)," in out  # an activation site, shown as one
    assert "transforms (in order, before converting): smoothquant(alpha=0.5)" in out
    assert "simulate: integer; observe: quantized; strict: false" in out


def test_a_recipe_without_transforms_says_so(capsys, wide):
    assert main(["recipes", "w8a8"]) == 0
    assert "transforms: none" in capsys.readouterr().out
