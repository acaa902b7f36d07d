"""qswap recipes NAME: what a recipe sets besides its rules' widths is shown too."""
import sys
from pathlib import Path

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


RECIPE_WITH_BRACKETS = """version: 1
name: "x[/]"
description: "brackets [bold] as written [/]"
defaults:
  weight: {bits: 8}
  activation: {bits: 8, symmetric: false}
rules:
  - match: {path: decoder.layers.0}
    note: "int8 [red] zone [/] kept :fire:"
"""


def test_recipe_text_with_brackets_prints_as_written(capsys, tmp_path):
    """A recipe's name, description and notes are the user's text, printed as written: rich read
    ``[/]`` as markup and raised MarkupError (``qswap recipes``, and ``qswap convert`` after it had
    written the checkpoint), and ``[red]`` silently dropped the text (``:fire:``, an emoji code, is
    text too)."""
    asset = Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo"
    path = tmp_path / "brackets.yaml"
    path.write_text(RECIPE_WITH_BRACKETS)
    assert main(["recipes", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x[/]" in out and "int8 [red] zone [/] kept :fire:" in out
    out_ckpt = tmp_path / "q.pt"
    assert main(["convert", str(asset / "checkpoint.pt"), "--recipe", str(path), "--data", str(asset),
                 "--no-calibrate", "-o", str(out_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "convert report: recipe x[/]" in out and f"wrote {out_ckpt}" in out and out_ckpt.is_file()



def test_a_rules_pattern_is_folded_not_cut(capsys):
    """A match pattern has no space to wrap at: the table had cut it with '…' (at the command's own
    160 columns), so the rule could not be read."""
    assert main(["recipes", "w4a8_edges8"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    joined = "".join(line.strip("│ ").split("│")[0].strip() for line in out.splitlines())
    assert "subsample|w2v_model\\.feature_extractor)(\\..*)?" in joined
