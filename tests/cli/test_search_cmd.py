"""qswap search's --low-bits: checked at the parser (the widths qswap quantizes to) and against
--high's weights before the model is loaded (the checkpoint here does not even exist)."""
import pytest

from qswap.cli import build_parser, main


@pytest.mark.parametrize("value, message", [("99", "must be 16 or less, got 99"), ("1", "must be 2 or more, got 1"),
                                            ("0", "must be 2 or more, got 0")])
def test_low_bits_outside_the_widths_qswap_quantizes_to_is_a_usage_error(capsys, value, message):
    """--low-bits 99 had run the search and said "with every unit at 99-bit weights"."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["search", "c.pt", "--data", "d", "--target-mb", "1", "-o", "r.yaml",
                                   "--low-bits", value])
    assert exc.value.code == 2
    assert f"argument --low-bits: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("high, low, message", [
    ("w8a8_per_channel", "8", "--low-bits 8: --high w8a8_per_channel quantizes weights at 8 bits at most, and "
                              "units move down to fewer bits; pass --low-bits below 8 (e.g. 4)"),
    ("w8a8", "12", "pass --low-bits below 8"),
    ("w4a8_edges8", "8", "quantizes weights at 8 bits at most"),  # its edge rules' 8 bits, not its 4-bit defaults
    ("fp32", "4", "--high fp32 quantizes no weights"),
])
def test_low_bits_not_below_the_high_recipes_weights_is_refused_before_loading(tmp_path, capsys, high, low, message):
    argv = ["search", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--target-mb", "1",
            "-o", str(tmp_path / "r.yaml"), "--high", high, "--low-bits", low]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "missing.pt" not in err and "Traceback" not in err
    assert not (tmp_path / "r.yaml").exists()


def test_low_bits_below_an_edge_rules_width_passes_the_check(tmp_path, capsys):
    """w4a8_edges8 keeps its edges at 8 bits: --low-bits 6 can still move them; the error is then
    the missing checkpoint's."""
    argv = ["search", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--target-mb", "1",
            "-o", str(tmp_path / "r.yaml"), "--high", "w4a8_edges8", "--low-bits", "6"]
    assert main(argv) == 2
    assert "--low-bits" not in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("fp32", "--name fp32: a shipped recipe's name"), ("w4a8_edges8", "--name w4a8_edges8: a shipped recipe's name"),
    (" ", "--name is blank"),
])
def test_a_name_the_rows_could_not_be_told_apart_by_is_refused_before_loading(tmp_path, capsys, name, message):
    """--name fp32 had run the whole search and written a table of two fp32 rows and a recipe that
    qswap compare then refused beside fp32."""
    argv = ["search", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--target-mb", "1",
            "-o", str(tmp_path / "r.yaml"), "--name", name]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "pass" in err and not (tmp_path / "r.yaml").exists()
