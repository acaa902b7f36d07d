"""Run sensitivity analysis and a recipe search on the shipped model; write docs/sensitivity.md.

    .venv/bin/python tools/sensitivity_doc.py

Runs, on qswap/assets/s2t_demo (measuring on its ``calib`` subset, never on a test set):
  qswap sensitivity ... --recipe w4a8 --plot docs/sensitivity.png --json docs/sensitivity.json
  qswap search ... --target-mb <weight MB of w4a8_edges8> -o qswap/assets/s2t_demo/searched.yaml
and compares the searched recipe with the uniform w4a8_edges8 recipe of the same budget on the
in-voice and the held-out-voice test sets. Every table in the doc is output of these commands.
The searched recipe ships with the model, so `make demo` puts its row in the README's table.
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import qswap
from qswap.errors import CommandError
from qswap.io.checkpoint import load_fairseq_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_cli import exit_status  # noqa: E402  (tools/tool_cli.py)

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "qswap" / "assets" / "s2t_demo"  # this checkout's, as DOCS (not the installed package's)
QSWAP = str(Path(sys.executable).parent / "qswap")
DOCS = REPO / "docs"


def run(args: list[str]) -> str:
    print("$ qswap " + " ".join(args), flush=True)
    proc = subprocess.run([QSWAP, *args], capture_output=True, text=True, env={"COLUMNS": "150", "PATH": ""})
    if proc.returncode != 0:
        raise CommandError(f"{shown(args)} failed with exit code {proc.returncode}:\n"
                           + proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout


def shown(args: list[str]) -> str:
    return "qswap " + " ".join(a.replace(str(ASSET), "$ASSET").replace(str(REPO) + "/", "") for a in args)


def calibration_note(search_row: dict, compare_row: dict) -> str:
    """Why the searched recipe's in-voice WER in ``qswap search``'s table (its row calibrated on
    ``train_calib`` in batches of 16, ``--max-sentences 16``) differs from ``qswap compare``'s (one
    batch of 32, its default): the difference in words of the set."""
    words = sum(compare_row["utterance_words"])
    diff = abs(sum(compare_row["utterance_errors"]) - sum(search_row["utterance_errors"]))
    return (f"The search's row was calibrated on batches of 16 (`--max-sentences 16`), compare's on one batch "
            f"of 32, which is why the same recipe reads {search_row['wer']:.2f}% in the first and "
            f"{compare_row['wer']:.2f}% in the second ({diff} word{'s' if diff != 1 else ''} of {words:,}).")


def budget_text(rows: dict) -> str:
    """The searched recipe against the uniform ``w4a8_edges8`` on each test set (``rows``: subset ->
    recipe -> ``qswap compare --json`` row), as far as the paired interval supports: lower or
    higher only where it excludes 0 (the point estimates' direction alone had been said)."""
    from qswap.integration.bootstrap import Bootstrap, delta_interval, value_text

    def one(r: dict) -> str:
        s, u = r["searched"], r["w4a8_edges8"]
        interval = delta_interval(s["utterance_errors"], u["utterance_errors"], s["utterance_words"], Bootstrap())
        delta = 100.0 * (sum(s["utterance_errors"]) - sum(u["utterance_errors"])) / max(sum(s["utterance_words"]), 1)
        reading = ("no interval" if interval is None else "not distinguishable" if interval.contains(0.0)
                   else "lower" if interval.high < 0 else "higher")
        return f"{s['wer']:.2f}% vs {u['wer']:.2f}%, ΔWER {value_text(delta, interval, '+')}: {reading}"

    return (f"At the same weight budget, the searched recipe against the uniform `w4a8_edges8` recipe (ΔWER = "
            f"searched − w4a8_edges8, paired bootstrap 95 % interval over the utterances of compare's rows): "
            f"{one(rows['test'])} on the in-voice test set, {one(rows['test_heldout'])} on the held-out voices,")


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, and no stray options
    ckpt = str(ASSET / "checkpoint.pt")
    sens = ["sensitivity", ckpt, "--data", str(ASSET), "--subset", "train_calib", "--calib-subset", "train_calib",
            "--batches", "1", "--max-sentences", "16", "--recipe", "w4a8", "--show", "20", "--plot", str(DOCS / "sensitivity.png"),
            "--json", str(DOCS / "sensitivity.json")]
    sens_out = run(sens)
    uniform = qswap.convert(load_fairseq_model(ckpt, arg_overrides={"data": str(ASSET)})[0],
                            "w4a8_edges8").qswap_report.quantized_bytes / 1e6
    search = ["search", ckpt, "--data", str(ASSET), "--subset", "train_calib", "--calib-subset", "train_calib",
              "--calib-batches", "4", "--max-sentences", "16", "--target-mb", f"{uniform:.4f}", "--eval-subset", "test",
              "-o", str(ASSET / "searched.yaml"), "--json", str(DOCS / "searched.json")]
    search_out = run(search)
    searched_row = json.loads((DOCS / "searched.json").read_text())["row"]
    compares, rows = {}, {}
    for subset in ("test", "test_heldout"):
        compares[subset] = ["compare", ckpt, "--data", str(ASSET), "--subset", subset, "--calib-subset", "train_calib",
                            "--calib-batches", "4", "--recipes", "w4a8_edges8", str(ASSET / "searched.yaml"),
                            "--json", str(DOCS / f"searched_compare_{subset}.json")]
        compare_out = run(compares[subset])
        rows[subset] = {r["recipe"]: r for r in json.loads((DOCS / f"searched_compare_{subset}.json").read_text())["rows"]}
        compares[subset] = (compares[subset], compare_out)

    titles = {"test": "In-voice test set (voices seen in training, sentences not):", "test_heldout": "Held-out voices:"}
    compare_blocks = "\n\n".join(f"{titles[k]}\n\n```\n$ {shown(cmd)}\n```\n\n```\n{out.rstrip()}\n```"
                                   for k, (cmd, out) in compares.items())

    text = f"""# Sensitivity analysis and recipe search

Generated by `.venv/bin/python tools/sensitivity_doc.py` on {datetime.date.today().isoformat()} with the
shipped model (`$ASSET` = `qswap/assets/s2t_demo`). Sites are measured on its `train_calib` subset;
the test sets are only used for the final comparison.

## Which sites hurt: `qswap sensitivity`

For every quantizer site of the recipe, two probes: that site alone quantized (`alone dB`,
output SQNR against the float model), and every site but that one quantized (`all-but dB`).
`gain dB` is what keeping only that site float buys; the table is ranked by it.

```
$ {shown(sens)}
```

```
{sens_out.rstrip()}
```

![per-site SQNR gain](sensitivity.png)

All sites with their numbers: [sensitivity.json](sensitivity.json). `--metric wer` also decodes
the subset with the top sites kept float one at a time (slower).

## A recipe from the measurements: `qswap search`

Budget: the weight memory of the uniform `w4a8_edges8` recipe ({uniform:.4f} MB), whose 8-bit
layers are chosen by position (first and last). The search starts from `w8a8_per_channel`
and moves to 4 bits the units whose weights add the least output noise per weight (each unit
measured alone at 4 and at 8 bits, everything else float; noises of different units add up),
until the budget is met; the result is an ordinary recipe, [searched.yaml](../qswap/assets/s2t_demo/searched.yaml).

```
$ {shown(search)}
```

```
{search_out.rstrip()}
```

## Same budget, measured on the test sets

{compare_blocks}

{budget_text(rows)}
with weights of {rows['test']['searched']['weight_mb']:.2f} vs {rows['test']['w4a8_edges8']['weight_mb']:.2f} MB;
it audits as {'honest' if rows['test']['searched']['honest'] else 'NOT honest'}. {calibration_note(searched_row, rows['test']['searched'])} The recipe ships with the model
(`qswap/assets/s2t_demo/searched.yaml`), so `make demo` evaluates it next to the uniform recipes.
These are 100-utterance sets, on which a word is about 0.14 points: [accuracy.md](accuracy.md) compares
the two recipes on the large evaluation sets with paired confidence intervals, which say whether
a difference is more than noise.
"""
    from qswap.io.atomic import atomic_write_text
    atomic_write_text(DOCS / "sensitivity.md", text)
    print("wrote docs/sensitivity.md")
    return 0


def cli() -> int:
    """``main``; a failed command is one ``error:`` message (with the end of its output), exit 2."""
    return exit_status(main)


if __name__ == "__main__":
    raise SystemExit(cli())
