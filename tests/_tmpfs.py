"""A tiny tmpfs for tests of a full or read-only disk, mounted under the test's own temporary directory and
unmounted when the test ends, pass or fail (lazily if something still holds it). Nothing else of the
machine's mounts is touched. Needs root and mount(8); :func:`tmpfs_reason` says why not."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def tmpfs_reason() -> str | None:
    """Why no tmpfs can be mounted here (one sentence), or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount(8) is not installed"
    return None


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on directory ``where`` (created), yield it, unmount it."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tailpy-test", str(where)],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until its filesystem is full (ENOSPC); returns the file."""
    path = directory / name
    chunk = b"\0" * 4096
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), open(path, "ab", buffering=0) as f:  # the last partial page
        while f.write(b"\0"):
            pass
    return path


def remount(where: Path, option: str) -> None:
    """Remount the tmpfs on ``where`` with ``option`` ("ro" or "rw")."""
    subprocess.run(["mount", "-o", f"remount,{option}", str(where)], check=True, capture_output=True)


__all__ = ["fill", "remount", "tiny_tmpfs", "tmpfs_reason"]
