"""Files tailpy keeps, written so that a full disk, a read-only filesystem or a crash loses nothing already
saved: :func:`write_atomic` (temporary file in the same directory, fsync, rename, fsync of the directory,
as POSIX ``rename(2)`` guarantees and as SQLite's and etcd's WAL writers do), and :func:`storage_error`, the
one sentence for an ``OSError`` on such a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from tailpy.errors import StorageError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)


def storage_error(e: OSError, path: str | os.PathLike[str], what: str) -> StorageError:
    """One sentence for OSError ``e`` on ``what`` (e.g. "state file") at ``path``: what is wrong and what to
    do. ENOSPC/EDQUOT: the filesystem is full; EROFS: read-only; EACCES/EPERM: permission; else strerror."""
    where = Path(path)
    if e.errno in _FULL:
        return StorageError(
            f"cannot write {what} {where}: no space left on its filesystem; free some space there and try "
            "again (the previous copy is kept)"
        )
    if e.errno in _READ_ONLY:
        return StorageError(
            f"cannot write {what} {where}: its filesystem is read-only; remount it read-write or point "
            "--state-dir at a writable directory"
        )
    if e.errno in _DENIED:
        return StorageError(
            f"cannot write {what} {where}: permission denied; run as root or fix the permissions of "
            f"{where.parent}"
        )
    return StorageError(f"cannot write {what} {where}: {e.strerror or e}")


def is_storage_errno(e: BaseException) -> bool:
    """Whether ``e`` is an OSError of a full, read-only or forbidden filesystem."""
    return isinstance(e, OSError) and e.errno in (*_FULL, *_READ_ONLY, *_DENIED)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, what: str = "file") -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) so that readers see the old or the new content,
    never a part, even across a crash or power loss. On failure the temporary file is removed, ``path`` is
    left as it was, and StorageError (:func:`storage_error`, naming ``what``) is raised."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(e, target, what) from None
    with contextlib.suppress(OSError):  # the rename itself durable (not all filesystems allow this)
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def directory_problem(path: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written in directory ``path`` now, one sentence, or None: a read-only
    filesystem or one with no space left (``statvfs(3)``). For saying why a process that could not even
    write its log failed."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return f"{path} is on a read-only filesystem; remount it read-write or use a writable --state-dir"
    if st.f_bavail * st.f_frsize < 8192 or (st.f_files and st.f_favail == 0):
        return f"no space left on the filesystem of {path}; free some space there and try again"
    return None


__all__ = ["directory_problem", "is_storage_errno", "storage_error", "write_atomic"]
