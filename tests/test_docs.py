"""The README's and the asset README's numbers are the outputs of the repo's commands.

`python -m qswap.demo --markdown docs/demo.md` (`make docs`) writes docs/demo.md (+ demo.json), `tools/accuracy_doc.py` writes docs/accuracy.md
(+ accuracy_*.json), `tools/train_s2t.py evaluate` writes the shipped model's metrics.json. Copies of those numbers in prose go stale when the
model or the code changes; these tests fail until the prose is updated from a fresh run.
"""
import json
import re
from pathlib import Path

import pytest

from qswap.demo import RECIPES

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
    rows = _table_rows(README, "| recipe | WER % [95 % CI] | ΔWER [95 % CI] | significant | CER %")
    assert rows and rows == _table_rows(demo, "| recipe |")


def test_demo_table_is_its_json():
    """docs/demo.md's intervals and significance are those of the run's JSON (the bootstrap's)."""
    rows = json.loads((REPO / "docs" / "demo.json").read_text())["rows"]
    demo = _table_rows((REPO / "docs" / "demo.md").read_text(), "| recipe |")
    for line, row in zip(demo, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{row['wer']:.2f} [{row['wer_ci'][0]:.2f}, {row['wer_ci'][1]:.2f}]"
        low, high = row["delta_wer_ci"] or (None, None)
        assert cells[3] == ("-" if low is None else ("no" if low <= 0 <= high else "yes"))


def test_readme_large_set_table_is_the_accuracy_doc():
    doc = (REPO / "docs" / "accuracy.md").read_text()
    header = "| recipe | In-voice: ΔWER [95 % CI] | significant | Held-out voices: ΔWER [95 % CI]"
    rows = _table_rows(README, header)
    assert len(rows) == len(RECIPES) + 1 and rows == _table_rows(doc, header)  # + the searched recipe
    assert "(docs/accuracy.md)" in README


def test_accuracy_doc_is_its_json_and_states_set_sizes():
    doc = (REPO / "docs" / "accuracy.md").read_text()
    for subset, minimum in (("test_large", 1000), ("test_heldout_large", 600)):
        payload = json.loads((REPO / "docs" / f"accuracy_{subset}.json").read_text())
        rows = payload["rows"]
        assert rows[0]["utterances"] >= minimum and len(rows) == len(RECIPES) + 1
        assert f"{rows[0]['utterances']:,} utterances, {sum(rows[0]['utterance_words']):,} words, " in doc
        for row in rows[1:]:
            low, high = row["delta_wer_ci"]
            assert row["significant"] == (not low <= 0 <= high)
            assert f"| {Path(row['recipe']).stem} | {row['wer']:.2f} [{row['wer_ci'][0]:.2f}, " in doc
        reference = rows[0]  # fp32: the difference's zero, no interval to give (and no note saying one is missing)
        assert f"| fp32 | {reference['wer']:.2f} [{reference['wer_ci'][0]:.2f}, {reference['wer_ci'][1]:.2f}] | +0.00 | - |" in doc
        # quantization changes no multiply-accumulate: every row counts the fp32 model's MACs (its fused
        # attention included: tools/accuracy_doc.py --refresh-cost)
        assert len({round(row["mmacs_per_s"], 6) for row in rows}) == 1


@pytest.mark.parametrize("text", [README, (ASSET / "README.md").read_text()], ids=["README", "asset-README"])
def test_float_wer_in_prose_is_metrics_json(text):
    in_voice = f"**{METRICS['test']['wer']:.2f} %**"
    held_out = f"**{METRICS['test_heldout']['wer']:.2f} %**"
    assert re.search(re.escape(in_voice) + r"\s+on\s+the\s+in-voice\s+test\s+set", text), in_voice
    assert re.search(re.escape(held_out) + r"\s+on\s+the\s+(two\s+)?held-out\s+voices", text), held_out


def test_integer_doc_decode_table_is_its_json():
    """docs/integer.md's beam-decode table (integer against fake-quant on the shipped model) is
    tools/integer_doc.py's rendering of the JSON its run wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("integer_doc", REPO / "tools" / "integer_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = {s: json.loads((REPO / "docs" / f"integer_{s}.json").read_text()) for s in tool.SUBSETS}
    assert all(p["settings"]["integer"] and p["settings"]["beam"] == 5 for p in results.values())
    layers = json.loads(tool.LAYERS.read_text())
    assert tool.table(results, layers) in (REPO / "docs" / "integer.md").read_text()
    assert "\n".join(tool.rows_table(results)) in README and "tools/integer_doc.py" in README


def test_integer_doc_stream_tables_are_their_json():
    """docs/integer.md's per-channel stream recipe tables (decode, layer agreement) are
    tools/integer_doc.py --stream's rendering of the JSON its runs wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("integer_doc", REPO / "tools" / "integer_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = {s: json.loads((REPO / "docs" / f"stream_integer_{s}.json").read_text()) for s in tool.SUBSETS}
    assert all([Path(r["recipe"]).stem for r in p["rows"]] == ["fp32", tool.STREAM] for p in results.values())
    doc = (REPO / "docs" / "integer.md").read_text()
    assert tool.stream_table(results) in doc
    assert tool.stream_layers_table(json.loads(tool.STREAM_LAYERS.read_text())) in doc


def test_sensitivity_page_says_why_search_and_compare_read_the_searched_recipe_differently():
    """The page's search row (9.90) and compare row (10.04) of one recipe were calibrated on batches
    of 16 and one batch of 32; the page said neither. Its commands pin --max-sentences 16 where they
    ran at search's and sensitivity's old default, so the page reproduces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sensitivity_doc", REPO / "tools" / "sensitivity_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = " ".join((REPO / "docs" / "sensitivity.md").read_text().split())
    search_row = json.loads((REPO / "docs" / "searched.json").read_text())["row"]
    compare_rows = json.loads((REPO / "docs" / "searched_compare_test.json").read_text())["rows"]
    compare_row = next(r for r in compare_rows if Path(r["recipe"]).stem == "searched")
    assert tool.calibration_note(search_row, compare_row) in page
    for command in ("qswap sensitivity ", "qswap search "):
        shown = next(line for line in page.split("$ ")[1:] if line.startswith(command))
        assert "--max-sentences 16" in shown.split("```")[0]


def test_readme_python_example_runs():
    """The README's Python block, run as written on the shipped model (its names bound to the
    model, a calibration batch and the float model): it had regridded w8a8 to w4a8, whose
    activation grids are w8a8's, and calibrate refused the empty list of changed sites."""
    import contextlib
    import io
    import logging

    from qswap.integration import data as fdata

    block = re.search(r"## Python\n\n```python\n(.*?)```", README, re.S).group(1)
    model, task = fdata.load_model_and_task(ASSET / "checkpoint.pt", ASSET)
    batches = list(fdata.net_inputs(task, "train_calib", 1, max_sentences=4))
    names = {"model": model, "float_model": model, "batches": batches, "net_input": batches[0]}
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block, "README.md", "exec"), names)
    finally:
        logging.disable(logging.NOTSET)
    assert names["report"].honest and names["moved"].model.qswap_recipe.name == "w4a4_edges8"
    assert names["moved"].fresh_activations()  # the changed sites, calibrated alone
