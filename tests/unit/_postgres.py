"""A throwaway PostgreSQL server for store tests: initdb into a temporary directory, run as the ``postgres``
user when root (initdb refuses root), listening only on a unix socket in that directory; stopped and
removed by :func:`postgres_server`'s context manager, pass or fail."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def unavailable_reason() -> str | None:
    """Why no PostgreSQL server can be started here, or None."""
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found: install Debian's postgresql package"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a ``postgresql://`` URL of a fresh, empty database (trust auth, unix socket only)."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    assert initdb and pg_ctl
    root = tempfile.mkdtemp(prefix="tailpy-pg-")
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    run_as: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = os.path.join(root, "data")
    try:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        subprocess.run(
            [*run_as, initdb, "-D", data, "-A", "trust", "-U", user, "--no-sync"],
            check=True,
            capture_output=True,
        )
        opts = f"-k {root} -c listen_addresses='' -c fsync=off -p 5432"
        subprocess.run(
            [*run_as, pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(root, "log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
        try:
            yield f"postgresql://{user}@/postgres?host={root}&port=5432"
        finally:
            subprocess.run(
                [*run_as, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
