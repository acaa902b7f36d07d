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


@pytest.mark.parametrize("argv, message", [
    (["convert", "{tmp}/ck.pt", "--recipe", "w8a8", "-o", "{tmp}/ck.pt"], "--output {tmp}/ck.pt is also an input"),
    (["convert", "{tmp}/ck.pt", "--recipe", "w8a8", "-o", "{tmp}/link.pt"], "--output {tmp}/link.pt is also an input"),
    (["eval", "{tmp}/ck.pt", "--data", "d", "--json", "{tmp}/ck.pt"], "--json {tmp}/ck.pt is also an input"),
    (["convert", "{tmp}/ck.pt", "--recipe", "{tmp}/r.yaml", "-o", "{tmp}/r.yaml"], "--output {tmp}/r.yaml is also"),
    (["eval", "--merge", "{tmp}/s0.json", "--json", "{tmp}/s0.json"], "--json {tmp}/s0.json is also an input"),
    (["search", "{tmp}/ck.pt", "--data", "d", "--target-mb", "1", "--high", "{tmp}/r.yaml", "-o", "{tmp}/r.yaml"],
     "--output {tmp}/r.yaml is also an input"),
    (["eval", "{tmp}/ck.pt", "--data", "d", "--json", "{tmp}/r.md", "--markdown", "{tmp}/r.md"],
     "--json {tmp}/r.md and --markdown {tmp}/r.md are the same file"),
    (["search", "{tmp}/ck.pt", "--data", "d", "--target-mb", "1", "-o", "{tmp}/a.yaml", "--json", "{tmp}/x/../a.yaml"],
     "--output {tmp}/a.yaml and --json {tmp}/x/../a.yaml are the same file"),
])
def test_an_output_that_is_an_input_or_another_output_is_refused(tmp_path, capsys, argv, message):
    """Writing an input would replace the caller's file (convert -o onto its own float checkpoint);
    two outputs naming one file would overwrite each other. Both refused, every file untouched."""
    for name in ("ck.pt", "r.yaml", "s0.json", "r.md", "a.yaml"):
        (tmp_path / name).write_text(name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ck.pt")
    (tmp_path / "x").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert all((tmp_path / name).read_text() == name for name in ("ck.pt", "r.yaml", "s0.json", "r.md", "a.yaml"))


def test_a_shipped_recipe_name_is_not_taken_for_an_output_file(tmp_path, capsys, monkeypatch):
    """--recipe w8a8 names a shipped recipe, not the file w8a8 the command is asked to write."""
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "missing.pt", "--recipe", "w8a8", "-o", "w8a8"]) == 2
    assert "missing.pt: no such checkpoint file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["audit", "missing.pt", "--recipe", "w8a8", "--json", "-"], "--json"),
    (["audit", "missing.pt", "--recipe", "w8a8", "--markdown", "-"], "--markdown"),
    (["convert", "missing.pt", "--recipe", "w8a8", "-o", "-"], "--output"),
    (["eval", "missing.pt", "--data", "d", "--markdown", "-"], "--markdown"),
    (["sensitivity", "missing.pt", "--data", "d", "--json", "-"], "--json"),
    (["search", "missing.pt", "--data", "d", "--target-mb", "1", "-o", "-"], "--output"),
])
def test_standard_output_is_refused_where_the_command_writes_only_files(tmp_path, capsys, monkeypatch, argv, option):
    """'-' means standard output for eval's and compare's --json only; elsewhere it was a file named '-'."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert f"qswap {argv[0]} writes {option} to a file, not to standard output" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/export", "--data", "d", "--json", "{tmp}/export/model.json"],
     "--json {tmp}/export/model.json is inside {tmp}/export, an input directory"),
    (["eval", "{tmp}/export", "--data", "d", "--markdown", "{tmp}/export/new.md"],
     "--markdown {tmp}/export/new.md is inside {tmp}/export, an input directory"),
    (["audit", "{tmp}/onnx", "--onnx", "--json", "{tmp}/onnx/export.json"],
     "--json {tmp}/onnx/export.json is inside {tmp}/onnx, an input directory"),
    (["audit", "{tmp}/onnx", "--onnx", "--json", "{tmp}/link/export.json"],
     "--json {tmp}/link/export.json is inside {tmp}/onnx, an input directory"),
])
def test_an_output_inside_an_input_directory_is_refused(tmp_path, capsys, argv, message):
    """An export directory is an input: a file written into it replaced the export's own model.json
    (eval) or export.json (audit --onnx). Refused before anything is read, the files untouched."""
    for folder, name in (("export", "model.json"), ("onnx", "export.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(name)
    (tmp_path / "link").symlink_to(tmp_path / "onnx")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.json"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["export.json"]
    assert (tmp_path / "export" / "model.json").read_text() == "model.json"
    assert (tmp_path / "onnx" / "export.json").read_text() == "export.json"


def test_the_optimized_graphs_folder_inside_the_export_passes_the_check(tmp_path, capsys):
    """--optimized-dir DIR/optimized is audit's own default: a folder of its own, not an input's file."""
    (tmp_path / "onnx").mkdir()
    assert main(["audit", str(tmp_path / "onnx"), "--onnx", "--optimized-dir", str(tmp_path / "onnx" / "optimized")]) == 2
    err = capsys.readouterr().err
    assert "no export.json there" in err and "input directory" not in err


@pytest.mark.parametrize("argv, name", [
    (["convert", "missing.pt", "--recipe", "w8a8", "--data", "{tmp}/d", "--calib-subset", "train_calib",
      "--calib-batches", "1", "-o", "{tmp}/d/train_calib.tsv"], "train_calib.tsv"),
    (["eval", "missing.pt", "--data", "{tmp}/d", "--json", "{tmp}/d/config.yaml"], "config.yaml"),
    (["calibrate", "missing.pt", "--data", "{tmp}/d", "--subset", "test", "-o", "{tmp}/d/sub/../fbank80.zip"],
     "sub/../fbank80.zip"),
    (["search", "missing.pt", "--data", "{tmp}/d", "--target-mb", "1", "-o", "r.yaml", "--json", "{tmp}/d/test.ltr"],
     "test.ltr"),
    (["compare", "missing.pt", "--data", "{tmp}/d", "--markdown", "{tmp}/d/spm.txt"], "spm.txt"),
])
def test_a_data_file_inside_the_data_directory_is_refused(tmp_path, capsys, argv, name):
    """convert -o D/train_calib.tsv replaced the calibration manifest it was about to read."""
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    for file in ("train_calib.tsv", "test.tsv", "config.yaml", "fbank80.zip"):
        (data / file).write_text(file)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data / name} is inside {data}, the --data directory" in err and "missing.pt" not in err
    assert all((data / file).read_text() == file for file in ("train_calib.tsv", "test.tsv", "config.yaml",
                                                                "fbank80.zip"))


def test_a_recipe_or_report_beside_the_data_passes_the_check(tmp_path, capsys):
    """A searched recipe written beside the data (as tools/sensitivity_doc.py writes searched.yaml
    into the shipped model's folder) is no data file: the error is then about the checkpoint."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "searched.yaml").write_text("old")
    assert main(["search", "missing.pt", "--data", str(tmp_path / "d"), "--target-mb", "1",
                 "-o", str(tmp_path / "d" / "searched.yaml"), "--json", str(tmp_path / "d" / "searched.json")]) == 2
    assert "the --data directory" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["convert", "missing.pt", "--recipe", "w8a8", "-o", "newout/"],
    ["eval", "missing.pt", "--data", "d", "--json", "newout/"],
])
def test_a_file_output_ending_in_a_separator_is_refused(tmp_path, capsys, monkeypatch, argv):
    """-o newout/ wrote a file named newout and said 'wrote .../newout/'."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write newout/: a path ending in '/' names a directory" in err and "missing.pt" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("onnx", [[], ["--onnx"]])
def test_an_export_into_a_folder_of_other_files_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, onnx):
    """qswap export -o DIR replaced a model.json / encoder.onnx it had not written."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("model.safetensors", "encoder.onnx", "readme.md"):
        (folder / name).write_text(name)
    assert main(["export", "missing.pt", *onnx, "-o", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder} is a folder with other files, not an" in err and "missing.pt" not in err
    assert {p.name: p.read_text() for p in folder.iterdir()} == {n: n for n in ("model.safetensors", "encoder.onnx",
                                                                                  "readme.md")}
