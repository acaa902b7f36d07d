"""The command line checks the files it will write before it loads, calibrates or decodes anything
(qswap.cli._check_outputs, qswap.io.atomic.check_output): a bad output path costs no work."""
import pytest

from qswap.cli import main


@pytest.mark.parametrize("argv, message", [
    (["eval", "missing.pt", "--data", "d", "--json", "{tmp}/no/such/dir/r.json"], "no directory {tmp}/no/such/dir"),
    (["eval", "missing.pt", "--data", "d", "--markdown", "{tmp}"], "cannot write {tmp}: it is a directory"),
    (["convert", "missing.pt", "--recipe", "w8a8", "-o", "{tmp}"], "cannot write {tmp}: it is a directory"),
    (["audit", "missing.pt", "--recipe", "w8a8", "--json", "{tmp}/none/a.json"], "no directory {tmp}/none"),
    (["compare", "missing.pt", "--data", "d", "--markdown", "{tmp}/x/t.md"], "no directory {tmp}/x"),
    (["export", "missing.pt", "-o", "{tmp}/file.txt"], "cannot write into {tmp}/file.txt: it is a file"),
    (["sensitivity", "missing.pt", "--data", "d", "--plot", "{tmp}/no/s.png"], "no directory {tmp}/no"),
    (["audit", "missing", "--onnx", "--optimized-dir", "{tmp}/file.txt"], "cannot write into {tmp}/file.txt: it is a file"),
])
def test_a_bad_output_path_is_refused_before_the_input_is_read(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "missing.pt" not in err


def test_standard_output_and_a_new_export_directory_pass_the_check(tmp_path, capsys):
    """'-' is standard output; an export directory that does not exist yet is made by the export:
    the errors are then about the inputs, the first things read."""
    assert main(["eval", "missing.pt", "--data", "d", "--json", "-"]) == 2
    assert main(["export", "missing.pt", "-o", str(tmp_path / "a" / "b")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["qswap eval: error: data directory d does not exist; pass --data DIR with the config.yaml and "
                   "TSV manifests the model was trained with", "qswap export: error: missing.pt: no such checkpoint file"]
