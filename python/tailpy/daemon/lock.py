"""One tailpyd per state directory: an exclusive ``flock(2)`` on ``<state_dir>/tailpyd.lock``, held for the
daemon's whole life and taken before it touches its socket, TUN, DNS or state file.

The lock file also records the running daemon (JSON ``{"pid", "tun", "socket", "netfilter_table"}``), so
that ``tailpy down`` can signal a daemon that no longer answers, and the next start (or ``tailpyd
--cleanup``) knows what a crashed one left behind. A daemon that exits cleanly empties the file; the kernel
drops the lock when the process dies however it dies (kill -9 included), so a lock is never stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailpy.errors import DaemonRunningError
from tailpy.storage import storage_error

log = logging.getLogger("tailpy.daemon")

LOCK_FILE = "tailpyd.lock"

EXIT_ALREADY_RUNNING = 3
"""tailpyd's exit status when another daemon holds the lock (``tailpy up`` tells it from other failures)."""


@dataclass(frozen=True)
class RunRecord:
    """What a daemon wrote into the lock file about itself: its pid, TUN name, socket path and nftables
    table (``""``: none)."""

    pid: int | None = None
    tun: str = ""
    socket: str = ""
    netfilter_table: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "tun": self.tun,
            "socket": self.socket,
            "netfilter_table": self.netfilter_table,
        }

    @classmethod
    def parse(cls, text: str) -> RunRecord | None:
        """The record in lock file ``text``; None for an empty or unreadable one (a clean exit)."""
        try:
            obj = json.loads(text)
            pid = obj.get("pid")
            return cls(
                pid=int(pid) if pid is not None else None,
                tun=str(obj.get("tun") or ""),
                socket=str(obj.get("socket") or ""),
                netfilter_table=str(obj.get("netfilter_table") or ""),
            )
        except (ValueError, TypeError, AttributeError):
            return None


class DaemonLock:
    """The lock on ``state_dir`` (created mode 0700 if missing)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / LOCK_FILE
        self._fd: int | None = None
        self.previous: RunRecord | None = None
        """The record a daemon that did not exit cleanly left (read by :meth:`acquire`), else None."""

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting. Raises DaemonRunningError (with the holder's pid) when another
        process holds it, StorageError when the directory or file cannot be made."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise storage_error(e, self.path, "lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            record = RunRecord.parse(_read(fd))
            pid = record.pid if record is not None and record.pid is not None else None
            if pid is None:
                pid = _flock_owner(os.fstat(fd).st_ino)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DaemonRunningError(pid) from None
            raise storage_error(e, self.path, "lock file") from None
        self._fd = fd
        self.previous = RunRecord.parse(_read(fd))
        self.record(RunRecord(pid=os.getpid()))

    def record(self, record: RunRecord) -> None:
        """Write ``record`` into the lock file (the pid always). A full disk is logged, not raised: the lock
        itself holds without it."""
        if self._fd is None:
            return
        data = json.dumps(record.to_json()).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as e:
            log.warning("%s", storage_error(e, self.path, "lock file"))

    def release(self) -> None:
        """Clean exit: empty the record (nothing left to clean up) and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # frees blocks: works on a full disk too
        os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


def holder(state_dir: str | os.PathLike[str]) -> RunRecord | None:
    """The record of the daemon holding ``state_dir``'s lock now, or None when no process holds it (the
    record then may describe a crashed daemon: see :func:`leftover`)."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            record = RunRecord.parse(_read(fd)) or RunRecord()
            if record.pid is None:  # the holder could not write its record (a full disk): ask the kernel
                record = RunRecord(pid=_flock_owner(os.fstat(fd).st_ino))
            return record
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _flock_owner(inode: int) -> int | None:
    """The pid holding an exclusive flock on ``inode``, from ``/proc/locks`` (proc(5)): lines like
    ``1: FLOCK  ADVISORY  WRITE 4242 00:2e:1234 0 EOF``."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE" and f[5].rsplit(":", 1)[-1] == str(inode):
            with contextlib.suppress(ValueError):
                return int(f[4])
    return None


def leftover(state_dir: str | os.PathLike[str]) -> RunRecord | None:
    """The record of a daemon that did not exit cleanly (no one holds the lock but its record is there)."""
    path = Path(state_dir) / LOCK_FILE
    if holder(state_dir) is not None:
        return None
    try:
        return RunRecord.parse(path.read_text(errors="replace"))
    except OSError:
        return None


STATE_DIR_SUFFIX = ".state-dir"
"""Suffix of the file beside tailpyd's socket that names its state directory (``<socket>.state-dir``), so
that ``tailpy down --socket S`` finds the lock, and so the record, of a daemon that died on ``S``."""


def write_state_dir_pointer(socket_path: str, state_dir: str | os.PathLike[str]) -> None:
    """Record ``state_dir`` beside ``socket_path`` (``<socket>.state-dir``, its absolute path). A failure is
    logged, not raised: only ``tailpy down`` without ``--state-dir`` needs it."""
    path = Path(socket_path + STATE_DIR_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(Path(state_dir).absolute()) + "\n")
    except OSError as e:
        log.warning("cannot write %s: %s", path, e.strerror or e)


def state_dir_of_socket(socket_path: str) -> str | None:
    """The state directory the tailpyd that last served on ``socket_path`` recorded beside it; None when
    none did (or the file is unreadable)."""
    try:
        text = Path(socket_path + STATE_DIR_SUFFIX).read_text(errors="replace").strip()
    except OSError:
        return None
    return text if text and os.path.isabs(text) else None


__all__ = [
    "EXIT_ALREADY_RUNNING",
    "LOCK_FILE",
    "STATE_DIR_SUFFIX",
    "DaemonLock",
    "RunRecord",
    "holder",
    "leftover",
    "state_dir_of_socket",
    "write_state_dir_pointer",
]
