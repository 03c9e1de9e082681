"""Opening the control database and the files of the state directory.

SQLite (``<state_dir>/control.db``, WAL, ``synchronous=FULL``: a commit that returned is on disk and survives
kill -9 and power loss) by default, or PostgreSQL (``--db postgresql://user@host/db``) through psycopg. Every
transaction is serialized against every other writer: SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's
``pg_advisory_xact_lock``, so the server, several servers and admin commands can share one database, and two
concurrent registrations never get one address or one name.

The SQLite files (``control.db`` and its ``-wal`` and ``-shm``) are mode 0600: they are created so, and
opening a database made by an older tailpy tightens them. The server's machine key lives in
``<state_dir>/control.key`` (``privkey:<hex>``, mode 0600).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import nacl.public
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tailpy.control.pgdriver import require_psycopg
from tailpy.errors import ConfigError, ControlError, StorageError, TailpyError
from tailpy.keys import MachinePrivate
from tailpy.storage import directory_problem

DB_NAME = "control.db"
KEY_NAME = "control.key"
PG_LOCK = 0x7A11_9C
"""The ``pg_advisory_xact_lock`` id every PostgreSQL transaction takes: one writer at a time, like SQLite's
``BEGIN IMMEDIATE``."""
PG_IDLE_IN_TRANSACTION = 3.0
"""Seconds a PostgreSQL session may sit idle inside a transaction before the server ends it
(``idle_in_transaction_session_timeout``), releasing the writer lock. A control process that hangs in the
middle of a transaction (SIGSTOP, a frozen VM, a host gone from the network) would otherwise hold
:data:`PG_LOCK` for good and stall every other replica's writes, heartbeats included. Our transactions run
their statements back to back (no waiting on the network or on users inside one), so a live process is
never idle this long; it is below the replicas' stale window (three heartbeats) so the others carry on
before they would count each other dead."""
PG_LOCK_TIMEOUT = 10.0
"""Seconds a PostgreSQL statement waits for a lock (``lock_timeout``) before it fails: a write that cannot
get :data:`PG_LOCK` ends with an error (the request is refused, a heartbeat counts as failed) instead of
blocking its process without end."""


def database_url(db: str | None, state_dir: Path) -> str:
    """The SQLAlchemy URL for ``--db``: None -> SQLite in ``state_dir``; ``postgresql://…`` (or
    ``postgres://``) -> PostgreSQL through psycopg; ``sqlite:///path``. Raises ConfigError otherwise."""
    if db is None:
        return f"sqlite:///{state_dir / DB_NAME}"
    for scheme in ("postgresql://", "postgres://", "postgresql+psycopg://"):
        if db.startswith(scheme):
            return "postgresql+psycopg://" + db[len(scheme) :]
    if db.startswith("sqlite:///"):
        return db
    raise ConfigError(f"--db {db!r} is not a postgresql://user@host/dbname or sqlite:///path URL")


def create_engine(url: str) -> Engine:
    """An engine for ``url`` whose every transaction (``engine.begin()``) holds the database's one writer
    lock: PostgreSQL's advisory lock :data:`PG_LOCK` (released by the server when its holder hangs idle
    in its transaction, :data:`PG_IDLE_IN_TRANSACTION`; waited for at most :data:`PG_LOCK_TIMEOUT`),
    SQLite's ``BEGIN IMMEDIATE`` (WAL, 30 s busy timeout, ``synchronous=FULL``). Raises ConfigError for
    PostgreSQL without its driver (the ``tailpy[postgres]`` extra)."""
    if url.startswith("postgresql"):
        require_psycopg()
        engine = sa.create_engine(url, pool_pre_ping=True)

        @sa.event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET idle_in_transaction_session_timeout = {int(PG_IDLE_IN_TRANSACTION * 1000)}")
                cur.execute(f"SET lock_timeout = {int(PG_LOCK_TIMEOUT * 1000)}")
            dbapi_conn.commit()

        @sa.event.listens_for(engine, "begin")
        def _on_pg_begin(conn: Connection) -> None:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK})")

        return engine
    engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own handling is broken)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=FULL")  # a returned commit is on disk (WAL fsync per commit)
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (None for other databases and in-memory SQLite)."""
    u = sa.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def secure_sqlite_files(path: Path, *, create: bool) -> None:
    """Create the SQLite database ``path`` empty with mode 0600 (when ``create`` and it is missing), and
    take group and other access away from it and its ``-wal`` and ``-shm`` (databases of older versions
    were 0644 and hold auth keys). Raises ConfigError when it cannot be created."""
    if create and not path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(
                f"cannot create control database {path}: {e.strerror or e}; pass a --state-dir this user "
                f"(uid {os.getuid()}) can write"
            ) from None
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):  # missing, or not ours: SQLite's own error says more
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)


def open_error(e: sa.exc.OperationalError, where: str, path: Path | None) -> TailpyError:
    """The one-sentence error for a database that cannot be opened (``where``: how to name it; ``path``:
    the SQLite file, for a hint about permissions): StorageError when its directory is full or read-only,
    else ConfigError."""
    detail = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
    problem = directory_problem(path.parent) if path is not None else None
    if problem:
        return StorageError(f"cannot open control database {where}: {problem}")
    hint = ""
    if path is not None and ("unable to open" in detail or "readonly" in detail):
        hint = f"; check that this user (uid {os.getuid()}) can write {path.parent} and its files"
    return ConfigError(f"cannot open control database {where}: {detail}{hint}")


def db_error(e: Exception, where: str) -> TailpyError | None:
    """The one sentence for a database error ``e`` met while serving (None: not a database error): a full
    disk or a read-only database is a StorageError, anything else a ControlError naming the database."""
    if not isinstance(e, sa.exc.DBAPIError):
        return None
    detail = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
    low = detail.lower()
    if "disk i/o error" in low:  # SQLite's word for a -wal or -shm file it could not grow
        problem = directory_problem(Path(where).parent)
        if problem:
            return StorageError(
                f"control database {where} cannot be written: {problem} (nothing was changed)"
            )
    if "disk is full" in low or "no space left" in low or "could not extend file" in low:
        return StorageError(
            f"control database {where} cannot be written: its disk is full; free some space there and try "
            "again (nothing was changed)"
        )
    if "readonly database" in low or "read-only" in low:
        return StorageError(
            f"control database {where} is read-only; make it and its directory writable for this user "
            f"(uid {os.getuid()}) and try again (nothing was changed)"
        )
    return ControlError(f"control database {where} failed: {detail}")


def load_or_create_server_key(state_dir: Path) -> MachinePrivate:
    """The server's machine private key from ``<state_dir>/control.key`` (created, mode 0600, on first
    use). Raises ConfigError when the file is damaged, unreadable or cannot be created."""
    path = state_dir / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            return MachinePrivate.from_text(path.read_text().strip())
        except ValueError as e:
            raise ConfigError(f"server key file {path} is damaged ({e}); restore it from backup") from None
        except OSError as e:
            raise ConfigError(f"cannot read server key file {path}: {e.strerror or e}") from None
    except OSError as e:
        raise ConfigError(
            f"cannot create server key file {path}: {e.strerror or e}; pass a --state-dir this user "
            f"(uid {os.getuid()}) can write"
        ) from None
    key = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
    with os.fdopen(fd, "w") as f:
        f.write(key.text() + "\n")
    return key


__all__ = [
    "DB_NAME",
    "KEY_NAME",
    "PG_LOCK",
    "create_engine",
    "database_url",
    "load_or_create_server_key",
    "open_error",
    "secure_sqlite_files",
    "sqlite_path",
]
