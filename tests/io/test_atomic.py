"""qswap.io.atomic: a file output written as a directory's path is refused, not written as a file."""
import pytest

from qswap.errors import OutputError
from qswap.io.atomic import atomic_open, atomic_write_text, check_output


@pytest.mark.parametrize("name", ["newout/", "newout//", "sub/newout/"])
def test_a_file_path_ending_in_a_separator_is_refused(tmp_path, name):
    """'newout/' wrote a file named newout (Path drops the trailing '/'); refused by the pre-check
    and by the writer, nothing written."""
    (tmp_path / "sub").mkdir()
    path = f"{tmp_path}/{name}"
    with pytest.raises(OutputError, match="names a directory, and this output is a file; pass a file path"):
        check_output(path)
    with pytest.raises(OutputError, match="pass a file path"):
        atomic_write_text(path, "x")
    with pytest.raises(OutputError, match="pass a file path"):
        with atomic_open(path, "wb") as f:
            f.write(b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]


def test_a_directory_output_may_end_in_a_separator(tmp_path):
    check_output(f"{tmp_path}/new/", directory=True)
    atomic_write_text(tmp_path / "a.txt", "x")  # a Path, and a plain file path, still write
    atomic_write_text(f"{tmp_path}/b.txt", "y")
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "b.txt").read_text() == "y"


def test_a_path_through_a_file_names_that_file_not_a_missing_directory(tmp_path):
    (tmp_path / "victim.pt").write_bytes(b"keep")
    with pytest.raises(OutputError, match="victim.pt is a file, not a directory"):
        check_output(tmp_path / "victim.pt" / "r.json")
    with pytest.raises(OutputError, match="victim.pt is a file, not a directory"):
        check_output(tmp_path / "victim.pt" / "sub" / "r.json")
    with pytest.raises(OutputError, match="no directory .*missing; create it first"):
        check_output(tmp_path / "missing" / "r.json")
    with pytest.raises(OutputError, match="into .*victim.pt is a file, not a directory"):
        check_output(tmp_path / "victim.pt" / "export", directory=True)
    assert (tmp_path / "victim.pt").read_bytes() == b"keep"


def test_a_dangling_symbolic_link_as_an_output_directory_is_refused_up_front(tmp_path):
    """It passed the check (it does not 'exist') and the export failed after its work, with mkdir's
    'File exists'."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" / "export")
    with pytest.raises(OutputError, match="it is a symbolic link to .*nowhere/export, which does not exist"):
        check_output(link, directory=True)


def test_a_long_file_name_the_file_system_takes_is_written(tmp_path):
    """A 246-byte name: the temporary file's name (14 bytes longer) went beyond NAME_MAX (255)."""
    target = tmp_path / ("r" * 241 + ".json")
    check_output(target)
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == [target.name]
