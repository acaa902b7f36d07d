"""qswap convert: options the command adds to the library's convert and calibrate."""
from pathlib import Path

from qswap.cli import main


def test_convert_simulate_stores_the_recipe_with_that_simulation_and_calibrates_under_it(tmp_path, capsys):
    """``qswap convert --simulate float``: the checkpoint's recipe has simulate float (the models
    docs/deploy.md compares onnxruntime with are calibrated so), the name kept."""
    import qswap
    from qswap.io.checkpoint import load_fairseq_model

    asset = Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo"
    out = tmp_path / "q.pt"
    assert main(["convert", str(asset / "checkpoint.pt"), "--recipe", "w8a8", "--simulate", "float", "--data",
                 str(asset), "--calib-subset", "train_calib", "--calib-batches", "1", "--max-sentences", "4",
                 "-o", str(out)]) == 0
    model = load_fairseq_model(out, arg_overrides={"data": str(asset)})[0]
    assert model.qswap_recipe.name == "w8a8" and model.qswap_recipe.simulate == "float"
    assert qswap.load_recipe("w8a8").simulate == "integer"


def test_convert_simulate_of_a_quantized_checkpoint_is_refused(tmp_path, capsys):
    """A quantized checkpoint's grids were calibrated under its own recipe's simulation: a move
    onto a recipe keeps them, so --simulate would store an arithmetic they were not calibrated
    under."""
    asset = Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo"
    qckpt = tmp_path / "q.pt"
    assert main(["convert", str(asset / "checkpoint.pt"), "--recipe", "w8_weight_only", "--data", str(asset),
                 "-o", str(qckpt)]) == 0
    capsys.readouterr()
    assert main(["convert", str(qckpt), "--recipe", "w8a8", "--simulate", "float", "--data", str(asset),
                 "--calib-batches", "1", "--calib-subset", "train_calib", "-o", str(tmp_path / "r.pt")]) == 2
    assert "--simulate sets the arithmetic a float checkpoint is converted and calibrated under" in \
        capsys.readouterr().err
    assert not (tmp_path / "r.pt").exists()


ASSET = Path(__file__).resolve().parents[2] / "qswap" / "assets" / "s2t_demo"


def test_calibration_options_without_calibration_batches_are_refused(tmp_path, capsys):
    """--calib-subset and --max-sentences shape calibration batches: with --no-calibrate (or no
    --calib-batches) they had been ignored without a word, the checkpoint written."""
    for extra, named in ((["--no-calibrate", "--calib-subset", "nosuch"], "--calib-subset shapes"),
                         (["--max-sentences", "3"], "--max-sentences shapes"),
                         (["--no-calibrate", "--calib-subset", "x", "--max-sentences", "3"],
                          "--calib-subset and --max-sentences shape")):
        assert main(["convert", str(ASSET / "checkpoint.pt"), "--recipe", "w8a8", "--data", str(ASSET), *extra,
                     "-o", str(tmp_path / "q.pt")]) == 2
        assert f"{named} the calibration batches, and there are none" in capsys.readouterr().err
    assert not (tmp_path / "q.pt").exists()


def test_show_all_for_a_quantized_checkpoint_is_refused(tmp_path, capsys):
    """A quantized checkpoint moved onto another recipe prints no module table: --show-all had
    changed nothing."""
    qckpt = tmp_path / "q.pt"
    assert main(["convert", str(ASSET / "checkpoint.pt"), "--recipe", "w8_weight_only", "--data", str(ASSET),
                 "-o", str(qckpt)]) == 0
    capsys.readouterr()
    assert main(["convert", str(qckpt), "--recipe", "w8_weight_only", "--data", str(ASSET), "--show-all",
                 "-o", str(tmp_path / "r.pt")]) == 2
    assert "--show-all lists the modules a float checkpoint's conversion leaves" in capsys.readouterr().err


def test_the_summary_of_a_recipe_that_quantizes_nothing_counts_no_quantized_module():
    """fp32 converts the model's root to its counterpart with no quantizer: the summary had said
    '1 quantized' next to the note that the recipe quantizes nothing."""
    import qswap
    from qswap.cli.render import convert_summary
    from qswap.models import build_s2t_transformer

    report = qswap.convert(build_s2t_transformer(), "fp32").qswap_report
    summary = convert_summary(report)
    assert summary.startswith("0 quantized, 1 converted with no quantizer (null specs), ")
    # the report's own action, counted and written to JSON (not told from the labels' text)
    assert report.counts()["no_quantizer"] == 1 and report.counts()["quantized"] == 0
    assert [e.path for e in report.by_action("no_quantizer")] == [""]
    assert report.to_dict()["counts"]["no_quantizer"] == 1
    assert "converted with no quantizer" not in convert_summary(qswap.convert(build_s2t_transformer(), "w8a8").qswap_report)


def test_tables_off_a_terminal_keep_every_module_path_whole(capsys):
    """At 160 columns off a terminal, the convert table had folded module paths mid-word
    ('decoder.dropout_modul' / 'e'), and a grep of the log found nothing."""
    import qswap
    from qswap.cli.render import console, convert_table
    from qswap.models import build_s2t_transformer

    report = qswap.convert(build_s2t_transformer(), "w4a8_edges8").qswap_report
    console().print(convert_table(report, show_all=True))
    out = capsys.readouterr().out
    for entry in report.entries:
        if entry.path:
            assert f" {entry.path} " in out, entry.path
