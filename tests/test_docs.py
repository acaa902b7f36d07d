"""The README's and the asset README's numbers are the outputs of the repo's commands.

`make demo` writes docs/demo.md (+ demo.json), `tools/sensitivity_doc.py` writes the
searched-recipe comparisons (docs/searched_compare_*.json), `tools/train_s2t.py evaluate`
writes the shipped model's metrics.json. Copies of those numbers in prose go stale when the
model or the code changes; these tests fail until the prose is updated from a fresh run.
"""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ASSET = REPO / "qswap" / "assets" / "s2t_demo"
METRICS = json.loads((ASSET / "metrics.json").read_text())


def _table_rows(text: str, header_start: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_readme_demo_table_is_the_demo_output():
    demo = (REPO / "docs" / "demo.md").read_text()
    assert _table_rows(README, "| recipe | WER % | ΔWER | CER %") == _table_rows(demo, "| recipe |")


def test_readme_heldout_table_is_the_sensitivity_doc_run():
    rows = json.loads((REPO / "docs" / "searched_compare_test_heldout.json").read_text())["rows"]
    readme = _table_rows(README, "| recipe | WER % | ΔWER | honest | weights MB |")
    assert len(readme) == len(rows)
    for line, row in zip(readme, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == Path(row["recipe"]).stem
        assert cells[1] == f"{row['wer']:.2f}"
        assert cells[2] == f"{row['delta_wer']:+.2f}"
        assert cells[3] == ("yes" if row["honest"] else "no")
        assert cells[4] == f"{row['weight_mb']:.2f}"


@pytest.mark.parametrize("text", [README, (ASSET / "README.md").read_text()], ids=["README", "asset-README"])
def test_float_wer_in_prose_is_metrics_json(text):
    in_voice = f"**{METRICS['test']['wer']:.2f} %**"
    held_out = f"**{METRICS['test_heldout']['wer']:.2f} %**"
    assert re.search(re.escape(in_voice) + r"\s+on\s+the\s+in-voice\s+test\s+set", text), in_voice
    assert re.search(re.escape(held_out) + r"\s+on\s+the\s+(two\s+)?held-out\s+voices", text), held_out
