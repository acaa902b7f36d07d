"""``--integer`` on the command line (issue 16): ``qswap eval`` decodes the integer model of a
recipe or of a quantized checkpoint, ``qswap compare --integer`` adds the integer columns,
``qswap audit --integer`` is the integer audit level; models without an integer form and float
checkpoints are usage errors (exit 2, one line, no traceback). On a real fairseq checkpoint
(2 updates of fairseq-train) and data directory."""
import json

import pytest

from fairseq_run import convert_small
from qswap.cli import main

pytest.importorskip("fairseq")


@pytest.fixture(scope="module")
def quantized_checkpoint(float_checkpoint, tmp_path_factory):
    _, data, ckpt = float_checkpoint
    return convert_small(ckpt, data, tmp_path_factory.mktemp("integer_cli") / "w8a8.pt")


def eval_json(args, path) -> dict:
    assert main(["eval", *args, "--beam", "2", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_eval_recipe_integer_decodes_the_integer_model(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    common = [str(ckpt), "--data", str(data), "--recipe", "w8a8", "--calib-batches", "2"]
    integer = eval_json([*common, "--integer"], tmp_path / "i.json")
    assert integer["model"] == "w8a8 (integer)" and "w8a8 (integer):" in capsys.readouterr().out
    fake = eval_json(common, tmp_path / "f.json")
    assert [u["ref"] for u in integer["utterances"]] == [u["ref"] for u in fake["utterances"]]
    assert integer["counts"]["utterances"] == fake["counts"]["utterances"] == 6


def test_eval_quantized_checkpoint_integer(quantized_checkpoint, float_checkpoint, tmp_path):
    _, data, _ = float_checkpoint
    out = eval_json([str(quantized_checkpoint), "--data", str(data), "--integer"], tmp_path / "q.json")
    assert out["model"] == "w8a8 (integer)" and out["counts"]["utterances"] == 6


def test_eval_integer_of_a_float_model_is_exit_2(float_checkpoint, capsys):
    _, data, ckpt = float_checkpoint
    assert main(["eval", str(ckpt), "--data", str(data), "--integer"]) == 2
    err = capsys.readouterr().err
    assert "--integer runs a quantized model on integers: pass --recipe R" in err and "Traceback" not in err


def test_eval_integer_of_a_weight_only_recipe_names_the_modules(float_checkpoint, capsys):
    _, data, ckpt = float_checkpoint
    assert main(["eval", str(ckpt), "--data", str(data), "--recipe", "w8_weight_only", "--integer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qswap eval: error: ") and "Traceback" not in err
    assert "recipe w8_weight_only quantizes no activation (every activation site left float)" in err


def test_compare_integer_adds_the_integer_columns(float_checkpoint, tmp_path):
    _, data, ckpt = float_checkpoint
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    assert main(["compare", str(ckpt), "--data", str(data), "--recipes", "w8a8", "w8_weight_only", "--integer",
                 "--calib-batches", "2", "--beam", "2", "--max-sentences", "4",
                 "--markdown", str(md), "--json", str(js)]) == 0
    table = json.loads(js.read_text())
    assert table["settings"]["integer"] is True
    rows = {r["recipe"]: r for r in table["rows"]}
    assert rows["fp32"]["integer"] is None
    w8a8 = rows["w8a8"]["integer"]
    assert w8a8["integer_only"] is True and w8a8["note"] is None
    assert w8a8["delta_vs_fake"] == pytest.approx(w8a8["wer"] - rows["w8a8"]["wer"])
    low, high = w8a8["delta_vs_fake_ci"]
    assert low <= w8a8["delta_vs_fake"] <= high
    weight_only = rows["w8_weight_only"]["integer"]
    assert weight_only["wer"] is None and weight_only["note"].startswith("no integer form")
    text = md.read_text()
    assert "| integer WER % | integer - fake [95 % CI] | integer-only |" in text
    assert text.splitlines()[1].count("---") == text.splitlines()[0].count(" |")
    assert "| yes |" in [line for line in text.splitlines() if line.startswith("| w8a8 ")][0]


def test_audit_integer_is_integer_only_with_json_and_markdown(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    js, md = tmp_path / "a.json", tmp_path / "a.md"
    assert main(["audit", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--subset", "test", "--integer",
                 "--json", str(js), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "integer-only" in out and "declared float steps" in out
    report = json.loads(js.read_text())
    assert report["integer_only"] is True and report["findings"] == []
    paths = {p["name"] for p in report["paths"]}
    assert {"batch forward (teacher-forced)", "reorder_incremental_state (beam reorder)",
            "reorder_encoder_out", "incremental decoding (3 steps)"} <= paths
    assert {d["module"] for d in report["declared_float_steps"]} == {"encoder.input", "decoder.output",
                                                                      "get_normalized_probs"}
    assert "Verdict: **integer-only**" in md.read_text()


def test_audit_integer_of_a_quantized_checkpoint(quantized_checkpoint):
    assert main(["audit", str(quantized_checkpoint), "--integer"]) == 0


@pytest.mark.parametrize("extra", [["--values"], ["--strict"]])
def test_audit_integer_with_honesty_options_is_exit_2(float_checkpoint, capsys, extra):
    _, _, ckpt = float_checkpoint
    assert main(["audit", str(ckpt), "--recipe", "w8a8", "--integer", *extra]) == 2
    assert "apply to the honesty audit" in capsys.readouterr().err


def test_audit_integer_of_a_weight_only_recipe_is_exit_2_naming_modules(float_checkpoint, capsys):
    _, _, ckpt = float_checkpoint
    assert main(["audit", str(ckpt), "--recipe", "w8_weight_only", "--integer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qswap audit: error: cannot integerize") or "has no grid" in err
    assert "Traceback" not in err


def test_eval_simulate_integer_decodes_what_the_integer_model_decodes(quantized_checkpoint, float_checkpoint,
                                                                       tmp_path):
    """``--simulate integer`` runs the fake-quant model with the integer insides (the checkpoint's
    recipe has the default); its transcripts are the integer model's, and ``--simulate float`` is
    the default's."""
    from qswap.nn.simulate import SIMULATIONS
    _, data, _ = float_checkpoint
    common = [str(quantized_checkpoint), "--data", str(data)]
    hyps = {name: [u["hyp"] for u in eval_json([*common, *extra], tmp_path / f"{name.replace(' ', '_')}.json")["utterances"]]
            for name, extra in (("integer", ["--integer"]), ("simulate integer", ["--simulate", "integer"]),
                                ("simulate float", ["--simulate", "float"]), ("default", []))}
    assert hyps["simulate integer"] == hyps["integer"]
    assert hyps[f"simulate {SIMULATIONS[0]}"] == hyps["default"]
    out = eval_json([*common, "--simulate", "float"], tmp_path / "label.json")
    assert out["model"] == "w8a8 (simulate: float)"


@pytest.mark.parametrize("extra, message", [
    (["--integer"], "--simulate picks the fake-quant model's arithmetic; drop it with --integer"),
    ([], "--simulate picks a quantized model's arithmetic: pass --recipe R"),
])
def test_eval_simulate_without_a_fake_quant_model_is_exit_2(float_checkpoint, capsys, extra, message):
    _, data, ckpt = float_checkpoint
    args = ["eval", str(ckpt), "--data", str(data), "--simulate", "integer", *extra]
    if extra:
        args += ["--recipe", "w8a8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_simulate_choices_are_the_simulations():
    from qswap.cli import eval_cmd
    from qswap.nn.simulate import SIMULATIONS
    import argparse
    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "simulate")
    assert set(choices) == set(SIMULATIONS)
