"""qswap convert / eval / compare on a real (tiny) fairseq model and data directory."""
import json

import pytest
import torch

import qswap
from fairseq_run import run_tool
from qswap.cli import main


def test_convert_writes_a_checkpoint_fairseq_generate_loads(float_checkpoint, tmp_path):
    root, data, ckpt = float_checkpoint
    out = tmp_path / "w8a8.pt"
    assert main(["convert", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--calib-batches", "2",
                 "--max-sentences", "4", "-o", str(out)]) == 0
    state = torch.load(out, weights_only=True)  # no opt-in needed for qswap checkpoints
    assert state["qswap"]["recipe"]["name"] == "w8a8"
    assert state["cfg"]["task"]["data"] == str(data.resolve())  # --data, for a later command without it
    log = run_tool("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", out, "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--cpu",
                   "--required-batch-size-multiple", "1", "--qswap-audit", cwd=root)
    assert "qswap audit: HONEST" in log


def test_eval_shards_merge_to_the_single_process_wer(float_checkpoint, tmp_path):
    _, data, ckpt = float_checkpoint
    common = [str(ckpt), "--data", str(data), "--subset", "test", "--beam", "2", "--max-sentences", "2"]
    assert main(["eval", *common, "--json", str(tmp_path / "all.json")]) == 0
    for shard in (0, 1):
        assert main(["eval", *common, "--num-shards", "2", "--shard-id", str(shard),
                     "--json", str(tmp_path / f"s{shard}.json")]) == 0
    assert main(["eval", "--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
                 "--json", str(tmp_path / "merged.json")]) == 0
    single = json.loads((tmp_path / "all.json").read_text())["counts"]
    merged = json.loads((tmp_path / "merged.json").read_text())["counts"]
    shards = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in (0, 1)]
    assert all(s["counts"]["utterances"] > 0 for s in shards)
    assert merged["utterances"] == single["utterances"] == 6
    assert merged["word_errors"] == single["word_errors"] and merged["wer"] == pytest.approx(single["wer"])


def test_merge_writes_the_merged_markdown_row_and_refuses_shard_options(float_checkpoint, tmp_path, capsys):
    """--merge --markdown writes the merged result's row, as one decode of the whole subset writes
    it (it had been ignored); --num-shards / --shard-id belong to the shards' decodes: refused."""
    _, data, ckpt = float_checkpoint
    common = [str(ckpt), "--data", str(data), "--subset", "test", "--beam", "2", "--max-sentences", "2"]
    assert main(["eval", *common, "--json", str(tmp_path / "all.json"), "--markdown", str(tmp_path / "all.md")]) == 0
    shards = [str(tmp_path / f"s{i}.json") for i in (0, 1)]
    for i, path in enumerate(shards):
        assert main(["eval", *common, "--num-shards", "2", "--shard-id", str(i), "--json", path]) == 0
    md = tmp_path / "merged.md"
    assert main(["eval", "--merge", *shards, "--markdown", str(md)]) == 0
    assert md.read_text() == (tmp_path / "all.md").read_text()
    capsys.readouterr()
    for extra in (["--num-shards", "7"], ["--shard-id", "3"]):
        assert main(["eval", "--merge", *shards, *extra, "--markdown", str(tmp_path / "x.md")]) == 2
        assert f"{extra[0]} applies when decoding" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def _edited_shard(tmp_path, name: str, **changes) -> str:
    """``_shard``'s result of shard 0 of 1 with two utterances, ``changes`` made: counts fields, or
    'ref' for the first utterance's reference."""
    path = _shard(tmp_path, name, 0, 1, ids=(0, 1))
    payload = json.loads(open(path).read())
    if "ref" in changes:
        payload["utterances"][0]["ref"] = changes.pop("ref")
    payload["counts"].update(changes)
    open(path, "w").write(json.dumps(payload))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"word_errors": None}, "counts.word_errors must be a whole number >= 0, got None"),
    ({"words": -6}, "counts.words must be a whole number >= 0, got -6"),
    ({"chars": 2.5}, "counts.chars must be a whole number >= 0, got 2.5"),
    ({"utterances": True}, "counts.utterances must be a whole number >= 0, got True"),
    ({"ref": ""}, "utterance 0: 'ref' must be a non-empty transcript"),
    ({"ref": None}, "utterance 0: 'ref' must be a non-empty transcript"),
])
def test_merge_refuses_a_shard_with_malformed_contents(tmp_path, capsys, changes, field):
    """A shard's counts and transcripts are checked as it is read: a DataError naming the file and
    the field (null counts had been a raw TypeError, an empty reference a WER interval [0, 2100])."""
    assert main(["eval", "--merge", _edited_shard(tmp_path, "good.json")]) == 0
    bad = _edited_shard(tmp_path, "bad.json", **changes)
    capsys.readouterr()
    assert main(["eval", "--merge", bad]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a shard result written by 'qswap eval --json'" in err and field in err


def test_a_shard_with_no_batches_writes_an_empty_result_that_merges(float_checkpoint, tmp_path, capsys):
    """More shards than batches: fairseq gives some shard nothing to decode. Its run says so, exits
    0 and writes a result with no utterances, and the merge of all shards is the single run's."""
    _, data, ckpt = float_checkpoint
    common = [str(ckpt), "--data", str(data), "--subset", "test", "--beam", "2", "--max-sentences", "4"]
    assert main(["eval", *common, "--json", str(tmp_path / "all.json")]) == 0
    shards = [tmp_path / f"s{i}.json" for i in range(4)]  # 6 utterances in batches of 4: 2 batches
    for i, path in enumerate(shards):
        assert main(["eval", *common, "--num-shards", "4", "--shard-id", str(i), "--json", str(path)]) == 0
    results = [json.loads(p.read_text()) for p in shards]
    assert [r["counts"]["utterances"] for r in results].count(0) == 2
    assert "fairseq gave every batch to the other shards" in capsys.readouterr().out
    assert main(["eval", "--merge", *map(str, shards), "--json", str(tmp_path / "merged.json")]) == 0
    single = json.loads((tmp_path / "all.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["counts"] == single["counts"] and merged["wer_ci"] == single["wer_ci"]


def test_eval_with_recipe_reports_wer(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    assert main(["eval", str(ckpt), "--data", str(data), "--recipe", "w8a8", "--calib-batches", "2",
                 "--beam", "2", "--json", str(tmp_path / "q.json")]) == 0
    assert "w8a8:" in capsys.readouterr().out
    assert json.loads((tmp_path / "q.json").read_text())["model"] == "w8a8"


def test_eval_vs_float_reports_a_paired_interval(float_checkpoint, tmp_path, capsys):
    _, data, ckpt = float_checkpoint
    common = [str(ckpt), "--data", str(data), "--beam", "2"]
    assert main(["eval", *common, "--recipe", "w8a8", "--calib-batches", "2", "--vs-float", "--json", str(tmp_path / "q.json"),
                 "--markdown", str(tmp_path / "q.md")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["baseline"] == "float" and out["bootstrap"]["resamples"] >= 1000
    low, high = out["wer_ci"]
    assert low <= out["counts"]["wer"] <= high
    d_low, d_high = out["delta_wer_ci"]
    assert d_low <= out["delta_wer"] <= d_high and out["significant"] == (not d_low <= 0 <= d_high)
    assert "ΔWER vs float" in capsys.readouterr().out and "| w8a8 | test |" in (tmp_path / "q.md").read_text()
    # the float model against itself, via --baseline: a zero-width interval at 0, not significant
    assert main(["eval", *common, "--json", str(tmp_path / "f.json")]) == 0
    assert main(["eval", *common, "--baseline", str(tmp_path / "f.json"), "--json", str(tmp_path / "ff.json")]) == 0
    same = json.loads((tmp_path / "ff.json").read_text())
    assert same["delta_wer_ci"] == [0.0, 0.0] and same["significant"] is False
    # both references at once: refused before anything is decoded, not one silently dropped
    assert main(["eval", *common, "--recipe", "w8a8", "--vs-float", "--baseline", str(tmp_path / "f.json")]) == 2
    assert "--baseline and --vs-float each give the ΔWER its reference" in capsys.readouterr().err


def _one_utterance_data(data, tmp_path):
    """A data directory whose subset 'one' is the first utterance of ``data``'s test subset."""
    one = tmp_path / "one_data"
    one.mkdir()
    for name in ("config.yaml", "spm.model", "spm.txt"):
        (one / name).symlink_to(data / name)
    (one / "one.tsv").write_text("".join((data / "test.tsv").read_text().splitlines(keepends=True)[:2]))
    return one


def test_eval_of_one_utterance_gives_no_interval_and_no_verdict(float_checkpoint, tmp_path, capsys):
    """One utterance resamples only to itself: no interval, significance '-', and a note saying how
    many utterances an interval needs (was a zero-width interval calling any ΔWER significant)."""
    _, data, ckpt = float_checkpoint
    one = _one_utterance_data(data, tmp_path)
    common = [str(ckpt), "--data", str(one), "--subset", "one", "--beam", "2", "--calib-subset", "train",
              "--calib-batches", "1"]
    (one / "train.tsv").symlink_to(data / "train.tsv")
    assert main(["eval", *common, "--recipe", "w8a8", "--vs-float", "--json", str(tmp_path / "q.json"),
                 "--markdown", str(tmp_path / "q.md")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["wer_ci"] is None and out["delta_wer_ci"] is None and out["significant"] is None
    assert "at least 2 utterances" in out["note"]
    md = (tmp_path / "q.md").read_text()
    assert "| - |" in md and "at least 2 utterances" in md
    stdout = capsys.readouterr().out
    assert "(significance: -)" in stdout and "note: no confidence interval" in stdout


def test_eval_missing_data_dir_is_exit_2(float_checkpoint, tmp_path, capsys):
    _, _, ckpt = float_checkpoint
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_table_is_internally_consistent(float_checkpoint, tmp_path):
    _, data, ckpt = float_checkpoint
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    assert main(["compare", str(ckpt), "--data", str(data), "--recipes", "w8a8", "w4a8", "w8_weight_only",
                 "--calib-batches", "2", "--beam", "2", "--max-sentences", "4",
                 "--markdown", str(md), "--json", str(js)]) == 0
    rows = {r["recipe"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["fp32", "w8a8", "w4a8", "w8_weight_only"]
    assert rows["fp32"]["delta_wer"] == 0.0 and not rows["fp32"]["honest"]
    assert rows["w8a8"]["honest"] and rows["w4a8"]["honest"]
    assert not rows["w8_weight_only"]["honest"] and rows["w8_weight_only"]["float_ops"] > 0
    for name in ("w8a8", "w4a8", "w8_weight_only"):
        assert rows[name]["delta_wer"] == pytest.approx(rows[name]["wer"] - rows["fp32"]["wer"])
    # sizes follow from bit widths: int8 weights ~1/4 of float, int4 ~1/8 (biases, norms stay wider)
    fp32 = rows["fp32"]["weight_mb"]
    assert 0.24 * fp32 < rows["w8a8"]["weight_mb"] < 0.30 * fp32
    assert 0.12 * fp32 < rows["w4a8"]["weight_mb"] < rows["w8a8"]["weight_mb"]
    # the same matmuls run (fused SDPA in float, explicit matmuls quantized: counted alike within 10%)
    assert rows["w8a8"]["mmacs_per_s"] == pytest.approx(rows["fp32"]["mmacs_per_s"], rel=0.1)
    bops_per_mac = {n: r["gbops_per_s"] * 1e3 / r["mmacs_per_s"] for n, r in rows.items()}
    assert bops_per_mac["fp32"] == pytest.approx(32 * 32)
    assert bops_per_mac["w8a8"] == pytest.approx(8 * 8)  # every matmul operand on an 8-bit grid
    assert 4 * 8 <= bops_per_mac["w4a8"] < 8 * 8
    assert "| w8_weight_only |" in md.read_text()
    # paired bootstrap intervals: every WER inside its interval, ΔWER against fp32, significance
    assert rows["fp32"]["significant"] is None and rows["fp32"]["delta_wer_ci"] is None
    for name, row in rows.items():
        assert row["wer_ci"][0] <= row["wer"] <= row["wer_ci"][1]
        assert len(row["utterance_errors"]) == row["utterances"] and sum(row["utterance_words"]) > 0
        if name != "fp32":
            low, high = row["delta_wer_ci"]
            assert low <= row["delta_wer"] <= high and row["significant"] == (not low <= 0 <= high)
    assert "| significant |" in md.read_text()


def test_compare_adds_a_row_for_a_quantized_checkpoint_as_it_is(float_checkpoint, tmp_path):
    """--quantized NAME=QCKPT: a checkpoint qswap convert wrote is a row of its own, after the
    recipes, evaluated as it is (its grids, no recalibration): the same WER as the same recipe
    converted with the same calibration, with its interval against fp32."""
    _, data, ckpt = float_checkpoint
    qckpt, js = tmp_path / "w8a8.pt", tmp_path / "table.json"
    common = ["--data", str(data), "--calib-batches", "2", "--max-sentences", "4"]
    assert main(["convert", str(ckpt), "--recipe", "w8a8", *common, "-o", str(qckpt)]) == 0
    assert main(["compare", str(ckpt), "--recipes", "w8a8", *common, "--beam", "2",
                 "--quantized", f"converted={qckpt}", "--json", str(js)]) == 0
    rows = {r["recipe"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["fp32", "w8a8", "converted"]
    assert rows["converted"]["honest"]
    assert rows["converted"]["utterance_errors"] == rows["w8a8"]["utterance_errors"]
    assert rows["converted"]["delta_wer"] == pytest.approx(rows["converted"]["wer"] - rows["fp32"]["wer"])
    assert rows["converted"]["delta_wer_ci"] is not None


def test_compare_of_a_quantized_checkpoint_points_to_the_quantized_row(float_checkpoint, tmp_path, capsys):
    """The checkpoint compare converts with each recipe is a quantized one: the message had been
    convert's ('already contains qswap quantizers'), with no word of --quantized."""
    _, data, ckpt = float_checkpoint
    qckpt = tmp_path / "w8a8.pt"
    assert main(["convert", str(ckpt), "--recipe", "w8_weight_only", "--data", str(data), "-o", str(qckpt)]) == 0
    capsys.readouterr()
    assert main(["compare", str(qckpt), "--data", str(data), "--recipes", "w8a8"]) == 2
    assert "is a quantized checkpoint (recipe w8_weight_only); compare converts the float checkpoint" in \
        capsys.readouterr().err


@pytest.mark.parametrize("item, message", [("converted", "takes NAME=QCKPT"), ("q=missing.pt", "no file missing.pt")])
def test_compare_refuses_a_malformed_quantized_row(float_checkpoint, capsys, item, message):
    _, data, ckpt = float_checkpoint
    assert main(["compare", str(ckpt), "--data", str(data), "--quantized", item]) == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_a_float_checkpoint_as_a_quantized_row_before_any_row(float_checkpoint, capsys):
    """``--quantized NAME=CKPT`` with a float checkpoint: a DataError that says what to pass, raised
    when the rows' checkpoints are loaded, before the recipes' rows are decoded."""
    _, data, ckpt = float_checkpoint
    assert main(["compare", str(ckpt), "--data", str(data), "--recipes", "w8a8", "--quantized", f"f={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert "a float checkpoint (no qswap recipe inside)" in err and "Traceback" not in err


@pytest.mark.parametrize("recipes, name, whose", [
    (["w8a8"], "w8a8", "recipe w8a8's"), (["w8a8"], "fp32", "the float model's"),
    (["fp32", "w4a8"], "fp32", "the float model's"), ([], "w8a8", "recipe w8a8's"),  # the default recipes
])
def test_compare_refuses_a_quantized_row_named_as_a_recipe_row(tmp_path, capsys, recipes, name, whose):
    """--recipes w8a8 --quantized w8a8=QCKPT had given two rows named w8a8; refused before anything
    is loaded or decoded (the checkpoint here does not even exist)."""
    qckpt = tmp_path / "q.pt"
    qckpt.write_bytes(b"")
    argv = ["compare", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--quantized", f"{name}={qckpt}"]
    assert main(argv + (["--recipes", *recipes] if recipes else [])) == 2
    err = capsys.readouterr().err
    assert f"--quantized {name}={qckpt}: {name!r} is already {whose} row name" in err
    assert "missing.pt" not in err and "Traceback" not in err


@pytest.mark.parametrize("recipes, message", [
    (["w8a8", "w8a9"], "no shipped recipe named 'w8a9'"),
    (["w8a8", "w4a8", "w8a8"], "w8a8 given more than once"),
])
def test_compare_refuses_a_misspelled_or_repeated_recipe_before_it_loads_the_model(tmp_path, capsys, recipes,
                                                                                   message):
    """Every recipe is read before anything is loaded or decoded (the checkpoint here does not
    even exist): a typo late in the list costs no decoding of the rows before it."""
    assert main(["compare", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--recipes", *recipes]) == 2
    err = capsys.readouterr().err
    assert message in err and "missing.pt" not in err and "Traceback" not in err


def test_compare_refuses_integer_with_no_quantized_row(tmp_path, capsys):
    """--recipes fp32 --integer had decoded the float row and written integer columns of '-': nothing
    was integerized. Refused before the checkpoint (missing here) is loaded."""
    assert main(["compare", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--recipes", "fp32",
                 "--integer"]) == 2
    err = capsys.readouterr().err
    assert "(--integer) integerizes the quantized rows, and the recipe fp32 alone gives none" in err
    assert "missing.pt" not in err


def test_compare_of_fp32_and_a_quantized_checkpoint_records_no_calibration(float_checkpoint, tmp_path, capsys):
    """--recipes fp32 with --quantized rows converts and calibrates nothing: the table had recorded
    the calibration subset and batches (and warned that --calib-batches 999 asked for more batches
    than the subset makes) for a calibration that never ran."""
    _, data, ckpt = float_checkpoint
    qckpt, js = tmp_path / "w8a8.pt", tmp_path / "table.json"
    assert main(["convert", str(ckpt), "--recipe", "w8a8", "--data", str(data), "--calib-batches", "2",
                 "--max-sentences", "4", "-o", str(qckpt)]) == 0
    capsys.readouterr()
    assert main(["compare", str(ckpt), "--recipes", "fp32", "--data", str(data), "--calib-batches", "999",
                 "--max-sentences", "4", "--beam", "1", "--quantized", f"converted={qckpt}", "--json", str(js)]) == 0
    settings = json.loads(js.read_text())["settings"]
    assert settings["calib_subset"] is None and settings["calib_batches_used"] == 0
    assert "--calib-batches 999" not in capsys.readouterr().err


def _shard(tmp_path, name, shard_id, num_shards, subset="test", model="w8a8", words=10, beam=5, ids=None):
    """A shard result of two utterances (``ids``; two of its own by default) of ``words`` reference
    words in all, one of them missed, with the counts 'qswap eval --json' writes for them."""
    from qswap.integration.metrics import error_counts

    path = tmp_path / name
    ids = (2 * shard_id, 2 * shard_id + 1) if ids is None else ids
    refs = [" ".join(["word"] * (words // 2)), " ".join(["word"] * (words - words // 2))]
    hyps = [refs[0].rsplit(" ", 1)[0], refs[1]]
    counts = error_counts(refs, hyps).to_dict()
    settings = {"checkpoint": "/c.pt", "data": "/d", "recipe": model, "beam": beam, "max_sentences": 32,
                "backend": "torch", "integer": False, "simulate": None}
    utterances = [{"id": i, "ref": r, "hyp": h} for i, r, h in zip(ids, refs, hyps)]
    path.write_text(json.dumps({"counts": counts, "subset": subset, "model": model, "settings": settings,
                                "shard": [shard_id, num_shards], "utterances": utterances}))
    return str(path)


def test_merge_adds_the_counts_of_all_shards(tmp_path, capsys):
    paths = [_shard(tmp_path, f"s{i}.json", i, 3) for i in (2, 0, 1)]  # any order
    assert main(["eval", "--merge", *paths, "--json", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["counts"]["words"] == 30 and merged["counts"]["utterances"] == 6
    assert merged["subset"] == "test" and merged["model"] == "w8a8"


@pytest.mark.parametrize("shards, message", [
    ([(0, 3), (1, 3)], "shard(s) 2 of 3 missing"),
    ([(0, 2), (0, 2), (1, 2)], "shard 0 of 2 is given twice"),
    ([(0, 2), (1, 3)], "has num_shards 3"),
    ([(0, 2), (2, 2)], "outside 0..1"),
    ([(0, 2, "test", "w8a8"), (1, 2, "dev", "w8a8")], "has subset 'dev'"),
    ([(0, 2, "test", "w8a8"), (1, 2, "test", "float")], "has model 'float'"),
    ([(0, 2, "test", "w8a8", 10, 5), (1, 2, "test", "w8a8", 10, 1)], "has settings"),  # another beam
    ([(0, 2, "test", "w8a8", 10, 5, (1, 2)), (1, 2, "test", "w8a8", 10, 5, (2, 3))], "utterance 2 is in"),
])
def test_merge_refuses_shards_of_different_runs_or_an_incomplete_set(tmp_path, capsys, shards, message):
    paths = [_shard(tmp_path, f"s{i}.json", *shard) for i, shard in enumerate(shards)]
    assert main(["eval", "--merge", *paths, "--json", str(tmp_path / "merged.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged.json").exists()


@pytest.mark.parametrize("extra, named", [(["--simulate", "float"], "--simulate"), (["--integer"], "--integer"),
                                          (["--recipe", "w8a8"], "--recipe"),
                                          # they had been ignored: --subset test_heldout printed the shards' subset
                                          (["--subset", "test_heldout"], "--subset"), (["--beam", "7"], "--beam"),
                                          (["--max-sentences", "3"], "--max-sentences"),
                                          (["--threads", "4"], "--threads"),
                                          (["--trust-checkpoint"], "--trust-checkpoint")])
def test_merge_refuses_options_that_only_decoding_reads(tmp_path, capsys, extra, named):
    paths = [_shard(tmp_path, f"s{i}.json", i, 2) for i in (0, 1)]
    assert main(["eval", "--merge", *paths, *extra, "--json", str(tmp_path / "merged.json")]) == 2
    err = capsys.readouterr().err
    assert named in err and "each shard's" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged.json").exists()


def test_merge_with_a_baseline_gives_the_paired_difference_of_stored_results(tmp_path, capsys):
    """--merge R.json --baseline B.json: ΔWER and its paired interval of two stored results, nothing
    decoded (it had been refused as a decoding option): the number a page quotes has a command."""
    from qswap.integration.bootstrap import Bootstrap, delta_interval

    paths = [_shard(tmp_path, f"s{i}.json", i, 2) for i in (0, 1)]
    base = tmp_path / "base.json"
    shards = [json.loads(open(p).read()) for p in paths]
    perfect = [{**u, "hyp": u["ref"]} for s in shards for u in s["utterances"]]  # no error at all
    base.write_text(json.dumps({"counts": {}, "subset": "test", "model": "float", "utterances": perfect}))
    assert main(["eval", "--merge", *paths, "--baseline", str(base), "--json", str(tmp_path / "m.json")]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["baseline"] == "float" and merged["delta_wer"] == pytest.approx(10.0)  # 2 errors in 20 words
    want = delta_interval([1, 0, 1, 0], [0, 0, 0, 0], [5, 5, 5, 5], Bootstrap())
    assert merged["delta_wer_ci"] == [want.low, want.high]
    assert "ΔWER vs float +10.00" in capsys.readouterr().out


def test_merge_refuses_a_file_without_shard_information(tmp_path, capsys):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"counts": {"word_errors": 0, "words": 1, "char_errors": 0, "chars": 1,
                                          "utterances": 1}}))
    assert main(["eval", "--merge", str(bad)]) == 2
    assert "old.json is not a shard result" in capsys.readouterr().err


ASSET = f"{qswap.__path__[0]}/assets/s2t_demo"
ASSET_CKPT = [f"{ASSET}/checkpoint.pt", "--data", ASSET]  # the shipped model, its data directory


def test_convert_without_calibration_of_activation_quantizers_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "w8a8.pt"
    assert main(["convert", *ASSET_CKPT, "--recipe", "w8a8", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--calib-batches N" in err and "--no-calibrate" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_convert_no_calibrate_writes_a_dynamic_range_model_on_purpose(tmp_path, capsys):
    from qswap.calibrate import activation_quantizers
    from qswap.io import load_fairseq_model

    out = tmp_path / "w8a8.pt"
    assert main(["convert", *ASSET_CKPT, "--recipe", "w8a8", "--no-calibrate", "-o", str(out)]) == 0
    assert "left uncalibrated" in capsys.readouterr().out
    model, _, _ = load_fairseq_model(out, arg_overrides={"data": ASSET})
    assert model.qswap_recipe.name == "w8a8"
    assert activation_quantizers(model) and not any(q.initialized for q in activation_quantizers(model))


def test_convert_weight_only_needs_no_calibration(tmp_path):
    assert main(["convert", *ASSET_CKPT, "--recipe", "w8_weight_only", "-o", str(tmp_path / "w8.pt")]) == 0


def test_convert_calibration_flags_that_contradict_exit_2(tmp_path, capsys):
    assert main(["convert", *ASSET_CKPT, "--recipe", "w8a8", "-o", str(tmp_path / "q.pt"), "--no-calibrate",
                 "--calib-batches", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_transformed_recipe_converts_saves_and_reloads_honest_in_fairseq_generate(float_checkpoint, tmp_path):
    """smoothquant reads the --calib-batches; the saved checkpoint holds the folded weights and
    the rotated fc2, which loading rebuilds (structure only) before the state is read."""
    root, data, ckpt = float_checkpoint
    recipe = tmp_path / "w8a8_rot.yaml"
    recipe.write_text("version: 1\ndefaults:\n  weight: {bits: 8}\n  activation: {bits: 8, symmetric: false}\n"
                      "rules:\n  - match: {class: Hadamard}\n    weight: {bits: 2, observer: minmax}\n"
                      "transforms:\n  - smoothquant: {alpha: 0.5}\n  - hadamard: {block: 16}\n")
    out = tmp_path / "rot.pt"
    assert main(["convert", str(ckpt), "--recipe", str(recipe), "--data", str(data), "--calib-batches", "2",
                 "--max-sentences", "4", "-o", str(out)]) == 0
    stored = torch.load(out, weights_only=True)["model"]
    assert any(k.endswith("fc2.rotate.matrix") for k in stored)
    log = run_tool("fairseq-generate", data, "--user-dir", qswap.plugin_dir(), "--task", "speech_to_text_qswap",
                   "--path", out, "--gen-subset", "test", "--beam", "2", "--max-tokens", "4000", "--cpu",
                   "--required-batch-size-multiple", "1", "--qswap-audit", cwd=root)
    assert "qswap audit: HONEST" in log


def test_a_recipe_that_observes_float_keeps_its_mode_in_the_checkpoint_and_calibrate_can_override_it(
        float_checkpoint, tmp_path, capsys):
    """convert with ``observe: float``; ``qswap calibrate`` of the written checkpoint on the same
    batches reads the mode from the stored recipe (the same grids), and ``--observe quantized``
    observes the quantized model instead (other grids)."""
    root, data, ckpt = float_checkpoint
    recipe = tmp_path / "w8a8_observe_float.yaml"
    recipe.write_text("version: 1\nobserve: float\ndefaults:\n  weight: {bits: 8}\n"
                      "  activation: {bits: 8, symmetric: false, observer: minmax}\n")
    out = tmp_path / "float_observed.pt"
    batches = ["--data", str(data), "--max-sentences", "4"]
    assert main(["convert", str(ckpt), "--recipe", str(recipe), "--calib-batches", "2", *batches, "-o", str(out)]) == 0
    assert "calibrated on 2 batches of train (observing float activation sites)" in capsys.readouterr().out
    again, other = tmp_path / "again.pt", tmp_path / "quantized.pt"
    assert main(["calibrate", str(out), "--batches", "2", *batches, "-o", str(again)]) == 0
    assert "(observing float activation sites); wrote" in capsys.readouterr().out
    assert main(["calibrate", str(out), "--batches", "2", "--observe", "quantized", *batches, "-o", str(other)]) == 0
    assert "calibrated on 2 batches of train; wrote" in capsys.readouterr().out

    def scales(path):
        state = torch.load(path, weights_only=True)
        assert state["qswap"]["recipe"]["observe"] == "float"
        return {k: v for k, v in state["model"].items() if k.endswith("input_quant.scale") and v.numel()}
    first, second, third = scales(out), scales(again), scales(other)
    assert len(first) > 10 and first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_eval_of_a_subset_whose_references_are_all_empty_is_a_data_error(float_checkpoint, tmp_path, capsys):
    """No reference words at all: a typed error naming the utterances, not a WER of 0 words."""
    _, data, ckpt = float_checkpoint
    blank = tmp_path / "blank_data"
    blank.mkdir()
    for name in ("config.yaml", "spm.model", "spm.txt"):
        (blank / name).symlink_to(data / name)
    head, *rows = (data / "test.tsv").read_text().splitlines()
    column = head.split("\t").index("tgt_text")
    cleared = ["\t".join("" if i == column else f for i, f in enumerate(r.split("\t"))) for r in rows]
    (blank / "blank.tsv").write_text("\n".join([head, *cleared]) + "\n")
    assert main(["eval", str(ckpt), "--data", str(blank), "--subset", "blank", "--beam", "1",
                 "--max-sentences", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{len(rows)} of {len(rows)} utterances have none (utterance ids" in err and "Traceback" not in err


def test_compare_records_the_calibration_batches_it_used(float_checkpoint, tmp_path, capsys):
    """train holds 12 utterances: --calib-batches 5 at --max-sentences 4 calibrates on 3 batches. The
    JSON had recorded the 5 asked for (and not the batch size), and nothing said fewer were used."""
    _, data, ckpt = float_checkpoint
    js = tmp_path / "table.json"
    assert main(["compare", str(ckpt), "--data", str(data), "--recipes", "w8a8", "--calib-batches", "5",
                 "--beam", "1", "--max-sentences", "4", "--json", str(js)]) == 0
    settings = json.loads(js.read_text())["settings"]
    assert (settings["calib_batches_used"], settings["calib_batches"], settings["max_sentences"]) == (3, 5, 4)
    assert "--calib-batches 5: train makes 3 batch(es) of up to 4 utterances, so calibration uses 3" in \
        capsys.readouterr().err


def test_calibrate_of_a_weight_only_checkpoint_is_refused(float_checkpoint, tmp_path, capsys):
    """w8_weight_only has no activation quantizers: 'qswap calibrate' had run the batches, printed
    'calibrated on 1 batches' and rewritten the file, calibrating nothing."""
    _, data, ckpt = float_checkpoint
    out, again = tmp_path / "wo.pt", tmp_path / "again.pt"
    assert main(["convert", str(ckpt), "--recipe", "w8_weight_only", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(out), "--data", str(data), "--batches", "1", "--max-sentences", "4",
                 "-o", str(again)]) == 2
    err = capsys.readouterr().err
    assert "(recipe w8_weight_only) has no activation quantizers: nothing to calibrate" in err
    assert not again.exists()
