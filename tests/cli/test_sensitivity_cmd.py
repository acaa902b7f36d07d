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
