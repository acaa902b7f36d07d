"""Nothing lost: every qswap write goes through a temporary file and a rename."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qswap.errors import OutputError
from qswap.io import atomic_open, atomic_write_bytes, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from qswap.io import atomic_open
with atomic_open({target!r}, "wb") as f:
    f.write(b"new" * 1_000_000)
    f.flush()
    print("half written", flush=True)
    time.sleep(120)
    f.write(b"the end")
"""


def _leftovers(directory: Path, target: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p != target]


def test_a_write_killed_midway_leaves_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous checkpoint")
    child = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), target=str(target))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half written"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
    for temp in _leftovers(tmp_path, target):  # the killed writer's temporary file
        assert temp.name.startswith(".checkpoint.pt.") and temp.name.endswith(".tmp")
        assert temp.suffix != target.suffix, "a temporary file must not pass for a checkpoint"


def test_a_writer_that_raises_leaves_the_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target, "w") as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and not _leftovers(tmp_path, target)


def test_writes_replace_the_file_and_keep_its_permissions(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "version: 1\n")
    assert target.read_text() == "version: 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    atomic_write_bytes(tmp_path / "new.bin", b"\x00\x01")
    assert (tmp_path / "new.bin").read_bytes() == b"\x00\x01" and not _leftovers(tmp_path, target)[1:]


def test_torch_save_through_atomic_open(tmp_path):
    target = tmp_path / "state.pt"
    with atomic_open(target, "wb") as f:
        torch.save({"w": torch.arange(4.0)}, f)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(4.0))


def test_save_qswap_checkpoint_is_atomic(shared, tmp_path, monkeypatch):
    import qswap
    from qswap.io import load_fairseq_model, save_qswap_checkpoint

    model, cfg, _task = load_fairseq_model(shared.checkpoint())
    qmodel = qswap.convert(model, "w8_weight_only")
    target = tmp_path / "q.pt"
    target.write_bytes(b"previous")

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OutputError, match=r"cannot write .*q\.pt: No space left on device"):
        save_qswap_checkpoint(target, qmodel, {"cfg": cfg})
    assert target.read_bytes() == b"previous" and not _leftovers(tmp_path, target)


def test_a_target_under_a_regular_file_is_an_output_error_and_leaves_no_temp(tmp_path):
    parent = tmp_path / "report.json"  # a file where a directory is expected (root cannot write there either)
    parent.write_text("a file")
    with pytest.raises(OutputError, match="cannot write .*audit.json"):
        atomic_write_text(parent / "audit.json", "{}")
    assert parent.read_text() == "a file" and not _leftovers(tmp_path, parent)


def test_a_rename_that_fails_is_an_output_error_and_leaves_no_temp(tmp_path):
    """os.replace fails for real (EISDIR / ENOTEMPTY: the target became a non-empty directory
    while the file was written): a typed error, not a raw OSError, and no temporary file."""
    target = tmp_path / "model.pt"
    with pytest.raises(OutputError, match=f"cannot write {target}: ") as info:
        with atomic_open(target, "wb") as f:
            f.write(b"weights")
            target.mkdir()
            (target / "keep").write_text("someone else's")
    assert "\n" not in str(info.value)
    assert (target / "keep").read_text() == "someone else's" and not _leftovers(tmp_path, target)


@pytest.mark.parametrize("errno_, strerror", [(28, "No space left on device"), (13, "Permission denied")])
def test_a_failing_fsync_is_an_output_error_and_keeps_the_previous_file(tmp_path, monkeypatch, errno_, strerror):
    target = tmp_path / "recipe.yaml"
    target.write_text("previous")

    def failing_fsync(fd):
        raise OSError(errno_, strerror)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match=f"cannot write {target}: {strerror}$"):
        atomic_write_text(target, "version: 1\n")
    assert target.read_text() == "previous" and not _leftovers(tmp_path, target)


def test_make_directory_returns_the_folders_it_made_and_remove_made_takes_back_the_empty_ones(tmp_path):
    from qswap.io.atomic import make_directory, remove_made

    made = make_directory(tmp_path / "a" / "b" / "c")
    assert made == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "keep.txt").write_text("someone else's")  # written meanwhile: "a" stays
    remove_made(made)
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "keep.txt").is_file()
    assert make_directory(tmp_path / "a") == []  # nothing made: nothing to take back
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output directory"):
        make_directory(tmp_path / "file" / "sub")


def test_make_directory_normalizes_the_path_before_it_lists_what_it_made(tmp_path, monkeypatch):
    """``new/../keep``, keep existing: only ``new`` is made (and taken back); keep is not listed,
    so a failed write cannot remove it (nor an export's file in it)."""
    from qswap.io.atomic import make_directory, remove_made

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old.txt").write_text("an earlier export")
    made = make_directory("keep/new/../sub")
    assert made == [tmp_path / "keep" / "sub"]
    remove_made(made)
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["old.txt"]
    assert make_directory("new/../keep") == []


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path):
    """``-o latest.pt`` where latest.pt links to runs/x.pt: the file it names gets the new content
    (atomically, next to it), the link stays (it had been replaced by a regular file)."""
    from qswap.io.atomic import check_output

    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "x.pt"
    real.write_bytes(b"previous")
    link = tmp_path / "latest.pt"
    link.symlink_to(Path("runs") / "x.pt")
    check_output(link)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert not _leftovers(tmp_path / "runs", real) and sorted(os.listdir(tmp_path)) == ["latest.pt", "runs"]


def test_a_fifo_is_written_as_a_stream_not_replaced_by_a_file(tmp_path):
    """A target that exists and is not a regular file (a FIFO here; ``/dev/null``, ``/dev/stdout``
    alike) is written directly: a rename over it had put a regular file in its place (as root,
    over /dev/null itself)."""
    import threading

    from qswap.io.atomic import check_output

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    check_output(fifo)
    atomic_write_text(fifo, "report\n")
    reader.join(timeout=30)
    assert got == [b"report\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # no temporary file made


def test_a_device_is_written_as_a_stream_and_a_full_one_is_an_output_error(tmp_path):
    """Device nodes made here (mknod needs root: skipped without it): a null device takes the
    write and stays a device; a full one (ENOSPC on every write) is an OutputError, and stays."""
    null, full = tmp_path / "null", tmp_path / "full"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making device nodes needs root")
    atomic_write_bytes(null, b"x" * 100_000)
    with pytest.raises(OutputError, match=f"cannot write {full}: No space left on device"):
        atomic_write_bytes(full, b"x" * 100_000)
    assert stat.S_ISCHR(os.stat(null).st_mode) and stat.S_ISCHR(os.stat(full).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["full", "null"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_check_output_tries_the_temporary_file_a_write_makes_first():
    """/proc exists and passes the access test (as root), yet takes no new file: refused before the
    work, saying so (it had failed after calibrating, naming a missing file)."""
    from qswap.io.atomic import check_output

    # root passes the access test and meets the probe; anyone else the access test
    with pytest.raises(OutputError, match=r"cannot write /proc/qswap-out\.pt: (cannot create a file in /proc|"
                                          r"/proc is not writable)"):
        check_output("/proc/qswap-out.pt")


STDOUT_WRITER = """
import sys
sys.path.insert(0, {repo!r})
from qswap.io.atomic import atomic_write_text, check_output
print("before")
check_output("/dev/stdout")
atomic_write_text("/dev/stdout", "report\\n")
print("after")
"""


@pytest.mark.skipif(not Path("/dev/stdout").exists(), reason="needs /dev/stdout")
@pytest.mark.parametrize("into", ["file", "pipe"])
def test_dev_stdout_writes_where_the_process_output_goes_in_order(tmp_path, into):
    """``--json /dev/stdout`` with stdout redirected to a file had replaced that file (the link
    resolved to it, then renamed over), and with stdout a pipe was refused: it is written through
    the process's own descriptor, after what it printed before."""
    script = STDOUT_WRITER.format(repo=str(REPO))
    if into == "file":
        log = tmp_path / "run.log"
        with open(log, "w") as out:
            subprocess.run([sys.executable, "-c", script], stdout=out, check=True, timeout=120)
        text = log.read_text()
    else:
        text = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              timeout=120).stdout
    assert text == "before\nreport\nafter\n"
