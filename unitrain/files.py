"""Writing files without losing any: atomic writes, and outputs that never clobber.

Everything unitrain writes goes through here. :func:`atomic_write` replaces a file so that a crash
at any instant leaves the old or the complete new one. An output the user names (``--save``,
``--metrics``, ``--json``) is checked at start-up (:func:`check_output`) and, since a file may
appear at that path while a run takes hours, published without ever replacing what appeared
(:func:`publish`, :func:`create_output`): the new file goes beside it as ``name.1.ext``. Only a
regular file is ever replaced, and only with the user's consent (``overwrite``): never a symbolic
link, a device node (``--save /dev/null --overwrite`` as root would replace the system's), a FIFO
or a directory. An OSError while writing carries the path it concerns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from .reading import path_kind


class OutputError(Exception):
    """An output path that cannot be written as asked (exists, is not a regular file, no folder)."""


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, chunks: Iterable) -> None:
    """Write ``chunks`` (bytes-likes) to ``path`` so that a crash at any instant leaves either
    the old file or the complete new one: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    with naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from others
            with os.fdopen(fd, "wb") as file:
                for chunk in chunks:
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError that lacks a file name (a full disk: ``[Errno 28]`` from write or
    fsync) with ``path``, so that the message says which file could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def describe(path: Path) -> str:
    """What is at ``path`` itself, in :func:`~unitrain.reading.path_kind`'s words, except that a
    symbolic link is not followed: ``"a symbolic link"``, ``"a regular file"``, ``"nothing"``, ..."""
    return "a symbolic link" if os.path.islink(path) else path_kind(path)


def check_output(path: Path | None, flag: str, overwrite: bool, reads: Iterable[tuple[str, object]] = ()) -> None:
    """At start-up: ``path`` can be created, or replaced (a regular file, with ``overwrite``), and
    is none of the files the command ``reads`` (``(what, path)`` pairs; a path that is None or
    not a file is skipped): not the same file through any link or path, which writing destroys."""
    if path is None:
        return
    for what, source in reads:
        if isinstance(source, (str, os.PathLike)) and _same_file(path, source):
            raise OutputError(f"{flag} {path} is {what} ({source}), which this command reads; expected another file")
    kind = describe(path)
    if kind == "a directory":
        raise OutputError(f"{flag} {path} is a directory, expected a file path")
    if kind not in ("nothing", "a regular file"):
        raise OutputError(f"{flag} {path} is {kind}; only a regular file is ever replaced, choose another path")
    if kind != "nothing" and not overwrite:
        raise OutputError(f"{flag} {path} already exists; pass --overwrite to replace it")
    parent = path.parent
    if (found := path_kind(parent)) == "nothing":
        raise OutputError(f"{flag} {path}: directory {parent} does not exist")
    if found != "a directory":
        raise OutputError(f"{flag} {path}: {parent} is {found}, expected a directory")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: directory {parent} is not writable")


def _same_file(a, b) -> bool:
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except (OSError, ValueError):  # either is missing (or no path at all): not one file
        return False


def check_output_dir(path: Path | None, flag: str, overwrite: bool) -> None:
    """At start-up: ``path`` is a directory to write several outputs into (``--report``): nothing
    yet (its parent exists), an empty directory, or with ``overwrite`` a directory whose files of
    the same names may be replaced (others are left alone)."""
    if path is None:
        return
    kind = describe(path)
    if kind == "nothing":
        check_output(path, flag, overwrite)  # the parent exists and is writable
        return
    if kind != "a directory":
        raise OutputError(f"{flag} {path} is {kind}, expected a directory (new or empty)")
    if not overwrite and any(Path(path).iterdir()):
        raise OutputError(f"{flag} {path} is a directory that is not empty; pass --overwrite to write into it")
    if not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path} is not writable")


def _beside(path: Path) -> Iterator[Path]:
    """``path``, then ``stem.1.ext``, ``stem.2.ext``, ... in the same folder."""
    yield path
    for number in itertools.count(1):
        yield path.with_name(f"{path.stem}.{number}{path.suffix}")


def publish(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Create the file ``path`` by ``write(staged)`` into a temporary file beside it, then
    publish that without replacing anything: when something appeared at ``path`` meanwhile (or,
    with ``overwrite``, something other than a regular file), it is kept and the file goes to
    the first free ``stem.N.ext`` instead. Returns where the file went. On failure (a full disk)
    nothing is left behind and the OSError names ``path``."""
    return publish_together([(path, write)], overwrite=overwrite)[0]


def publish_together(outputs: Sequence[tuple[Path, Callable[[Path], None]]], *, overwrite: bool) -> list[Path]:
    """:func:`publish` for files that make one output (a multi-model run's weights, one file per
    model): every file is written and on disk before any is published, so that a failure (a full
    disk at the last one) leaves none of them, and replaces nothing. Returns where each went."""
    outputs = [(Path(path), write) for path, write in outputs]
    staged: list[Path] = []
    published: list[tuple[Path, bool]] = []  # where each went, and whether it replaced a file there
    try:
        for path, write in outputs:
            staged.append(_stage(path, write))
        for (path, _), file in zip(outputs, staged, strict=True):
            published.append(_place(path, file, overwrite))
        for path in {path.parent: path for path, _ in outputs}.values():  # one sync per folder
            with _named_after(path):
                fsync_dir(path.parent)
    except BaseException:
        for final, replaced in published:  # a file named before a later one failed: it goes again
            if not replaced:
                Path(final).unlink(missing_ok=True)
        raise
    finally:
        for file in staged:
            file.unlink(missing_ok=True)
    return [final for final, _ in published]


@contextlib.contextmanager
def _named_after(path: Path) -> Iterator[None]:
    """Re-raise an OSError as one about ``path``, the file asked for, not our temporary one."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None


def _stage(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(staged)`` into a new temporary file beside ``path``, readable as a file created
    there would be, and on disk; removed again if anything fails."""
    with _named_after(path):
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        staged = Path(name)
        try:
            write(staged)
            os.chmod(staged, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from others
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)  # whatever ``write`` did: the bytes are on disk before the name is
            finally:
                os.close(fd)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    return staged


def _place(path: Path, staged: Path, overwrite: bool) -> tuple[Path, bool]:
    """Give the ``staged`` file the name ``path`` (see :func:`publish`): where it went, and
    whether it replaced a file there (only with ``overwrite``)."""
    with _named_after(path):
        if overwrite and (found := describe(path)) in ("nothing", "a regular file"):
            os.replace(staged, path)  # replaces a symbolic link itself, never what it points to
            return path, found != "nothing"
        return next(target for target in _beside(path) if _link_no_replace(staged, target)), False


@contextmanager
def output_directory(path: Path) -> Iterator[Path]:
    """The directory ``path`` (``--save DIR``), created if missing, for the block to publish into;
    if the block raises, a directory it created goes again (unless something else appeared in it)."""
    path = Path(path)
    created = not os.path.lexists(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            with suppress(OSError):  # not empty: another process's files, kept
                path.rmdir()
        raise


def create_output(path: Path, *, overwrite: bool) -> tuple[BinaryIO, Path]:
    """Open a new file at ``path`` for writing as it goes, unbuffered (``--metrics``): created
    exclusively, or with ``overwrite`` a regular file truncated; when something else is there now,
    it is kept and the file is created at the first free ``stem.N.ext``. Returns it and its path."""
    for target in _beside(Path(path)):
        replace = overwrite and target == path and describe(target) == "a regular file"
        # O_NOFOLLOW: never through a symbolic link; O_NONBLOCK: a FIFO put there cannot hang us
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | (0 if replace else os.O_EXCL)
        try:
            fd = os.open(target, flags, 0o666)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ELOOP, errno.ENXIO):
                continue
            raise OutputError(f"cannot create {target}: {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue
        os.set_blocking(fd, True)
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb", buffering=0), target


def write_all(file: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file, whose ``write`` may take only part of it."""
    view = memoryview(data)
    while view:
        view = view[file.write(view) :]


def cut_back(file: BinaryIO, path: Path, size: int) -> None:
    """After a failed write to ``file``, created at ``path`` by :func:`create_output`: cut it back to
    its first ``size`` bytes (what was written whole), and remove it if that is nothing and it is
    still the file at ``path``. Closes ``file``."""
    with file, contextlib.suppress(OSError):  # the write's error is the one to report
        os.ftruncate(file.fileno(), size)
        if size == 0 and os.path.samestat(os.fstat(file.fileno()), os.lstat(path)):
            os.unlink(path)


def _link_no_replace(source: Path, target: Path) -> bool:
    """Give ``source``'s file the name ``target`` unless that name exists (False then)."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    return _rename_no_replace(source, target)  # a filesystem without hard links (FAT, some network mounts)


_RENAME_NOREPLACE, _AT_FDCWD = 1, -100  # from <linux/fs.h> and <fcntl.h>


def _rename_no_replace(source: Path, target: Path) -> bool:
    """Linux's ``renameat2(RENAME_NOREPLACE)``: an atomic rename that fails if ``target`` exists."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOTSUP, "the filesystem has no hard links and the C library no renameat2", str(target))
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    raise OSError(code, os.strerror(code), str(target))


#: the file in a directory that :func:`directory_lock` locks (it stays: deleting a lock file races
#: with a process that has just opened it)
LOCK_FILE = ".unitrain.lock"
#: directories this process holds, by resolved path: [lock file descriptor, holds, created by the first]
_HELD: dict[str, list[int]] = {}


@contextmanager
def directory_lock(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``directory`` (created if missing) for this process while the block runs, so that two
    runs never write into it at once: an exclusive ``flock`` on its :data:`LOCK_FILE`, which holds
    the holder's pid and which the system releases when the process ends however it ends (SIGKILL
    included). Re-entrant within a process. Another process holding it raises OutputError naming
    ``what`` (``--checkpoint-dir DIR``) and that process's pid."""
    import fcntl  # POSIX only; unitrain runs on Linux and macOS

    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if key not in _HELD:
        descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            os.close(descriptor)
            raise OutputError(f"{what} is in use by another run (pid {holder or 'unknown'}); wait for it to end, or "
                              "choose another directory") from None  # fmt: skip
        try:  # on a full disk: the lock file named, and what this call made goes again
            with naming(directory / LOCK_FILE):
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(descriptor)
            if created:
                with suppress(OSError):
                    os.unlink(directory / LOCK_FILE)
                    directory.rmdir()
            raise
        _HELD[key] = [descriptor, 0, created]
    _HELD[key][1] += 1
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if not _HELD[key][1]:
            descriptor, _, created = _HELD.pop(key)
            # a directory made for a run that wrote nothing there (it failed first) goes again
            emptied = created and os.listdir(directory) == [LOCK_FILE]
            if emptied:
                os.unlink(directory / LOCK_FILE)
            os.close(descriptor)  # releases the lock
            if emptied:
                with suppress(OSError):  # another run's files appeared meanwhile: it stays
                    directory.rmdir()
