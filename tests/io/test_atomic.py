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
