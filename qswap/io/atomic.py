"""Atomic file writes: a temporary file in the target's directory, flushed, fsynced and renamed.

A reader (or a crash, or a SIGKILL) sees either the previous file or the complete new one, never
a half-written target. The temporary file is hidden (``.name.XXXXXXXX.tmp``), so it cannot pass
for the target; it is removed when the writer raises. A symbolic link is written through: the
file it names is replaced, the link stays. A target that exists and is not a regular file (a
device such as ``/dev/null`` or ``/dev/stdout``, a FIFO) is a stream with no previous content to
keep: it is written directly, never replaced by a file (a rename over ``/dev/null`` run as root
would put a regular file in its place).

>>> atomic_write_text("report.json", json.dumps(report))
>>> with atomic_open("model.pt", "wb") as f:     # for writers that take a file: torch.save
...     torch.save(state, f)
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import IO, Iterator

from qswap.errors import OutputError

_MODES = ("w", "wt", "wb")


@contextlib.contextmanager
def atomic_open(path: "str | os.PathLike[str]", mode: str = "wb", *,
                encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit it replaces ``path`` (a symbolic
    link: the file it names). A stream (a device, a FIFO, ``/dev/stdout``) is written directly.

    Raises OutputError when the directory does not exist or is not writable, or when writing,
    flushing or renaming fails (a full disk: ENOSPC, a permission: EACCES). If the ``with`` body
    raises, or the write fails, the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_open writes whole files; mode must be one of {_MODES}, got {mode!r}")
    _refuse_directory_syntax(path)
    target, stream = _resolved(path)
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a directory")
    kwargs = {} if "b" in mode else {"encoding": encoding}
    if stream:
        yield from _write_stream(target, mode, kwargs)
        return
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _copy_mode(target, tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(target.parent)


def _write_stream(target: Path, mode: str, kwargs: dict) -> Iterator[IO]:
    """``atomic_open``'s body for a target that is a stream (a device, a FIFO, ``/dev/stdout``):
    written as it is, with no temporary file; a failing write (``/dev/full``: ENOSPC) an
    OutputError. This process's own descriptor (``/dev/stdout``, ``/dev/fd/N``) is written through
    a duplicate of it, after Python's buffered streams are flushed, so the write lands where the
    process's output is (a file the shell redirected it to keeps what was written before, in
    order); another stream is opened for appending."""
    fd = _own_descriptor(os.fspath(target))
    try:
        if fd is not None:
            import sys
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            opened = os.fdopen(os.dup(fd), mode, **kwargs)
        else:
            opened = open(target, mode.replace("w", "a"), **kwargs)
        with opened as f:
            yield f
            f.flush()
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None


def _own_descriptor(text: str) -> int | None:
    """The descriptor of this process that ``text`` names (``/dev/stdout`` 1, ``/dev/stderr`` 2,
    ``/dev/fd/N``, ``/proc/self/fd/N`` or this process's ``/proc/PID/fd/N``), else None."""
    match = _PROCESS_STREAM.fullmatch(text)
    if match is None:
        return None
    if match.group(1) in ("stdout", "stderr"):
        return 1 if match.group(1) == "stdout" else 2
    fd = int(text.rsplit("/", 1)[1])
    pid = match.group(2)
    return fd if pid is None or pid == "self" or int(pid) == os.getpid() else None


# a process's own streams: whatever they are opened on (a terminal, a pipe, a file the shell
# redirected them to), written as streams, never resolved to that file and replaced
_PROCESS_STREAM = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/(self|\d+)/fd/\d+")


def _resolved(path: "str | os.PathLike[str]") -> tuple[Path, bool]:
    """(the file a write of ``path`` goes to: the target of a symbolic link, resolved; whether it
    is a stream: a process's own stream (``/dev/stdout``), or a target that exists and is neither
    a regular file nor a directory)."""
    if _PROCESS_STREAM.fullmatch(os.fspath(path)) and os.path.exists(path):
        return Path(path), True
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        mode = os.stat(target).st_mode
    except OSError:  # not there yet (or not readable: the write says why)
        return target, False
    return target, not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(path: "str | os.PathLike[str]", *, directory: bool = False) -> None:
    """OutputError now for an output ``atomic_open`` would refuse after the work (a directory where a
    file goes, a missing or read-only parent directory): the command line checks its outputs
    before it calibrates or decodes. ``directory``: ``path`` is a directory to write into (made if
    missing): it must not be a file, and its nearest existing ancestor must be writable."""
    target = Path(path)
    if directory:
        if target.exists() and not target.is_dir():
            raise OutputError(f"cannot write into {target}: it is a file; pass a directory")
        if target.is_symlink() and not target.exists():  # mkdir would fail after the work ('File exists')
            raise OutputError(f"cannot write into {target}: it is a symbolic link to {os.readlink(target)}, which "
                              f"does not exist; create that directory or pass another path")
        parent = _nearest_existing(target)
        if not parent.is_dir():
            raise OutputError(f"cannot write into {target}: {parent} is a file, not a directory; pass a directory")
    else:
        _refuse_directory_syntax(path)
        target, stream = _resolved(path)
        if target.is_dir():
            raise OutputError(f"cannot write {target}: it is a directory; pass a file path")
        if stream:  # a device or a FIFO, written as it is (``atomic_open``)
            if not os.access(target, os.W_OK):
                raise OutputError(f"cannot write {target}: it is not writable")
            return
        parent = target.parent
        if not parent.is_dir():
            above = _nearest_existing(parent)
            if not above.is_dir():
                raise OutputError(f"cannot write {target}: {above} is a file, not a directory; pass a path "
                                  f"in a directory")
            raise OutputError(f"cannot write {target}: no directory {parent}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {parent} is not writable")
    if not directory:  # what atomic_open will do first: a directory that takes no new file (/proc)
        fd, tmp = _create_temp(target)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def is_stream(path: "str | os.PathLike[str]") -> bool:
    """Whether a write of ``path`` goes to a stream (written as it is, not replaced: ``atomic_open``)."""
    return _resolved(path)[1]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a directory, or a file in the way)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _refuse_directory_syntax(path: "str | os.PathLike[str]") -> None:
    """OutputError for a file path written as a directory's (``out/``): Path drops the trailing
    separator, so it would write a file named ``out``."""
    text = os.fspath(path)
    if isinstance(text, str) and text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise OutputError(f"cannot write {text}: a path ending in {text[-1]!r} names a directory, and this output "
                          f"is a file; pass a file path (for example {text.rstrip(os.sep + (os.altsep or ''))}"
                          f"{os.sep}NAME)")


def make_directory(path: "str | os.PathLike[str]") -> list[Path]:
    """``path`` made with its missing parents (OutputError where that fails); returns the folders
    it made, deepest first, for ``remove_made`` to take away again after a failed write."""
    directory = Path(os.path.abspath(path))  # normalized: "new/../keep" is keep, which may exist
    made = [p for p in (directory, *directory.parents) if not p.exists()]  # the missing ones: deepest first
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output directory {directory}: {e.strerror}") from e
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders ``make_directory`` made, deepest first, while they are empty: a folder
    something else wrote into meanwhile stays, and so do its parents."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


TEMP_NAME_BYTES = 200  # of the target's name in its temporary file's: NAME_MAX is 255 bytes


def _create_temp(target: Path) -> tuple[int, str]:
    """A new hidden file in the target's directory, created with the usual umask-derived mode."""
    directory = target.parent
    name = target.name
    while len(os.fsencode(name)) > TEMP_NAME_BYTES:  # a name the file system takes, plus 14 bytes, may not be
        name = name[:-1]
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write {target}: cannot create a file in {directory} ({exc.strerror})") from None
    raise OutputError(f"cannot write {target}: no free temporary file name in {directory}")


def _copy_mode(target: Path, tmp: str) -> None:
    """Keep the permissions of the file being replaced."""
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
