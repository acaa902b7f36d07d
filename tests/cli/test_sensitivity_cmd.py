"""qswap sensitivity's --plot: a format the chart is not written in is refused before any work."""
import pytest

from qswap.cli import main


@pytest.mark.parametrize("name, given", [("s.pdf", "not a .pdf file"), ("chart", "not a path with no extension")])
def test_plot_in_a_format_it_does_not_write_is_refused_before_the_run(tmp_path, capsys, name, given):
    """--plot x.pdf had probed every site, then written a PNG named .pdf; now refused first (the
    checkpoint, missing here, is never loaded)."""
    plot = tmp_path / name
    assert main(["sensitivity", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert f"--plot {plot}: the chart is written as .png or .svg, {given}" in err
    assert "missing.pt" not in err and "Traceback" not in err and not plot.exists()


def test_the_wer_column_says_which_way_its_difference_goes():
    """The column read 'ΔWER' with WER(all quantized) - WER(all but this site) in it: positive where
    the site hurts, the opposite sign of compare's ΔWER (recipe - float), and nothing said so."""
    from rich.console import Console

    from qswap.cli.sensitivity_cmd import sensitivity_table
    from qswap.sensitivity import SensitivityReport, SiteResult

    site = SiteResult("encoder.fc1.weight_quant", "weight", 4, "encoder", 30.0, 20.0, 0.5, delta_wer=1.25)
    report = SensitivityReport("w4a8", "wer", 19.5, [site], full_wer=12.0, float_wer=10.0)
    console = Console(width=400, record=True)
    console.print(sensitivity_table(report, "ckpt.pt", 10))
    text = console.export_text()
    assert "ΔWER (all - all-but)" in text and "+1.25" in text
    assert "WER with every site quantized minus WER with this site alone kept float" in text
    assert "positive: the site hurts" in text and "opposite of compare's ΔWER" in text


@pytest.mark.parametrize("options, named", [(["--top-k", "3"], "--top-k"), (["--beam", "7"], "--beam"),
                                            (["--top-k", "3", "--beam", "7"], "--top-k and --beam")])
def test_wer_options_with_the_sqnr_metric_are_refused(tmp_path, capsys, options, named):
    """--top-k and --beam had been ignored without a word under --metric sqnr (the default);
    refused before the checkpoint (missing here) is loaded."""
    assert main(["sensitivity", str(tmp_path / "missing.pt"), "--data", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    verb = "apply" if " and " in named else "applies"
    assert f"{named} {verb} to --metric wer" in err and f"drop {named}" in err and "missing.pt" not in err
