"""Atomic file writes: a temporary file beside the target, fsync, rename, fsync of the folder;
checks that an output path can be written before any work is done.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from latentdiff.errors import ConfigError, WriteError


def write_failure(path: Path, err: BaseException) -> WriteError:
    """A one-line, actionable error for a failed write of `path` (disk full, permissions, ...)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"{reason} (the disk or your quota is full: free some space)"
    return WriteError(f"cannot write {path}: {reason}; any previous {path.name} is intact and "
                      "no partial file was left behind")


_OS_ADVICE = {
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "your disk quota is full: free some space",
    errno.ENAMETOOLONG: "a file name is too long for this file system: choose a shorter one",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def describe_os_error(err: OSError) -> str:
    """One actionable line for an error of the environment: what failed, on which path, and what to do
    (instead of a bare ``[Errno 30] Read-only file system: 'x'``)."""
    where = " and ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    what = _OS_ADVICE.get(err.errno) or (err.strerror or str(err)).lower()
    return f"{where}: {what}" if where else what


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (downloads, cache shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; best effort (not possible on every OS / file system)."""
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


def name_max(directory: Path) -> int:
    """The longest file name (in bytes) that `directory`'s file system accepts (255 where it cannot be asked)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def temporary_prefix(path: Path) -> str:
    """The prefix of a temporary file written beside `path`: ``.NAME.`` (mkstemp adds 8 random characters and
    ``.tmp``), with NAME cut short when the full name would pass the file system's limit, so a legal long name
    can still be written atomically. A name that is itself too long is refused in one line."""
    limit = name_max(path.parent if path.parent.is_dir() else Path("."))
    size = len(os.fsencode(path.name))
    if size > limit:
        raise WriteError(f"cannot write {path}: its file name is {size} bytes long, more than the {limit} bytes "
                         "this file system allows; choose a shorter name")
    keep = limit - len(".") - len(".") - 8 - len(".tmp")  # room left for NAME in .NAME.XXXXXXXX.tmp
    name = os.fsencode(path.name)[:keep].decode("utf-8", errors="ignore")  # never split a character
    return f".{name}."


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A crash or exception leaves any previous file at `path` intact and no partial file behind;
    an OSError while writing (e.g. ENOSPC) becomes a :class:`WriteError` that says so.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and writers that recreate the file) leave 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise write_failure(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output(path: str | Path, suffixes: tuple[str, ...] = (), *, option: str = "--out") -> Path:
    """Refuse an output path that cannot be written, before any work is done: wrong suffix, an existing
    folder, or a parent that is a file or not writable. Missing parent folders are fine (they are created)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} must end in {' or '.join(suffixes)}, got {path}")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    _check_writable_parent(path, option)
    return path


def check_output_dir(path: str | Path, *, option: str) -> Path:
    """Like :func:`check_output`, for a folder that results will be written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} exists and is not a folder")
    _check_writable_parent(path / "x", option)
    return path


def _check_writable_parent(path: Path, option: str):
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: no permission to write in {parent}")


def write_text_atomic(path: str | Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def staged_dir(directory: str | Path):
    """Write a set of files as a unit: yields a temporary folder beside `directory`; on success its files are
    moved into `directory` (created if needed), on any failure or interrupt the temporary folder is removed, so
    either the whole set arrives or none of it."""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=temporary_prefix(directory), suffix=".tmp", dir=directory.parent))
    try:
        yield stage
        if not directory.exists():
            os.replace(stage, directory)  # one rename: the folder appears with every file in it
        else:
            for f in sorted(stage.iterdir()):
                os.replace(f, directory / f.name)
        fsync_dir(directory.parent)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failure(directory, e) from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # empty after the moves; gone after a rename
