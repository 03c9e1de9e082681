"""The coordination server's state through SQLAlchemy 2 Core: SQLite (``<state_dir>/control.db``, WAL) by
default, or PostgreSQL (``--db postgresql://user@host/db``).

Schema changes are the ordered, dialect-neutral :data:`MIGRATIONS`; ``schema_version`` records how many have
run. Every transaction is serialized against every other writer: SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's
``pg_advisory_xact_lock``, so the server, several servers and admin commands can share one database, and two
concurrent registrations never get one address or one name. SQLite runs with ``synchronous=FULL``: a commit
that returned is on disk (it survives kill -9 and power loss).

The server's machine key lives in ``<state_dir>/control.key`` (``privkey:<hex>``, mode 0600). The SQLite
files (``control.db`` and its ``-wal`` and ``-shm``) are mode 0600 too: they are created so, and opening a
database made by an older tailpy tightens them. Auth keys are stored only as a SHA-256 hash (plus a short
visible prefix for listings): the full ``tskey-auth-…`` text is shown once, when it is created.

Addresses: IPv4 from the tailnet's IPv4 prefix (default 100.64.0.0/10) and IPv6 from its IPv6 prefix (default
fd7a:115c:a1e0::/48), each the lowest free one, skipping the network address, 100.100.100.100 and
fd7a:115c:a1e0::53 (MagicDNS). A node keeps its row (id, addresses) for the life of its machine key, even when
deleted, so an address is never given to two nodes; a deleted node gives up its name (see :mod:`names`).

Users own nodes; a node registered with a tagged auth key carries the tags and no user. Node keys expire
``key_lifetime`` seconds after (re-)registration unless expiry is disabled for the node (and, as in
Tailscale, by default for tagged nodes); a logged-out node counts as expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tailpy.control import names
from tailpy.control.pgdriver import require_psycopg
from tailpy.endpoint import Endpoint, parse_valid
from tailpy.errors import AuthKeyError, ConfigError, ControlError
from tailpy.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import Node

DB_NAME = "control.db"
KEY_NAME = "control.key"
AUTH_KEY_PREFIX = "tskey-auth-"
CREATE_HINT = "`tailpy control authkey create`"
DEFAULT_USER = "default"
DEFAULT_KEY_LIFETIME = 180 * 86400.0
"""Seconds a node key is valid after (re-)registration (180 days, as Tailscale)."""

IPV4_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_RANGE = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
RESERVED = frozenset(
    {
        ipaddress.ip_address("100.100.100.100"),  # MagicDNS
        ipaddress.ip_address("fd7a:115c:a1e0::53"),  # MagicDNS
        IPV4_RANGE.broadcast_address,
    }
)
_BATCH = 16  # candidate names / addresses looked up per query
_PG_LOCK = 0x7A11_9C  # pg_advisory_xact_lock id: one writer at a time, like SQLite's BEGIN IMMEDIATE
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_TAG = re.compile(r"tag:[a-z0-9][a-z0-9-]{0,62}")

# --- schema -------------------------------------------------------------------------------------------------


def _add_columns(conn: Connection, table: str, *columns: sa.Column[Any]) -> None:
    for col in columns:
        ddl = sa.schema.CreateColumn(col).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {ddl}")


def _m1(conn: Connection) -> None:
    """1: auth keys and nodes."""
    md = sa.MetaData()
    sa.Table(
        "auth_keys",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("reusable", sa.Boolean, nullable=False),
        sa.Column("expires", sa.Float),
        sa.Column("used", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "nodes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("machine_key", sa.Text, nullable=False, unique=True),
        sa.Column("node_key", sa.Text, nullable=False),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("ipv4", sa.Text, nullable=False, unique=True),
        sa.Column("ipv6", sa.Text, nullable=False, unique=True),
        sa.Column("endpoints", sa.Text, nullable=False, server_default="[]"),
        sa.Column("last_seen", sa.Float),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("deleted", sa.Float),
        sqlite_autoincrement=True,
    )
    md.create_all(conn)


def _m2(conn: Connection) -> None:
    """2: users, settings (domain, prefixes); owner, tags, ephemeral on keys and nodes; os, key expiry,
    logout on nodes."""
    md = sa.MetaData()
    sa.Table(
        "users",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("created", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    sa.Table(
        "settings",
        md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    md.create_all(conn)

    def owner() -> list[sa.Column[Any]]:
        return [
            sa.Column("user_id", sa.Integer),
            sa.Column("tags", sa.Text, nullable=False, server_default="[]"),
            sa.Column("ephemeral", sa.Boolean, nullable=False, server_default=sa.false()),
        ]

    _add_columns(conn, "auth_keys", *owner())
    _add_columns(
        conn,
        "nodes",
        *owner(),
        sa.Column("os", sa.Text, nullable=False, server_default=""),
        sa.Column("key_expiry", sa.Float),
        sa.Column("expiry_disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("logged_out", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def hash_auth_key(key: str) -> str:
    """What the database stores for auth key ``key``: ``sha256:<hex>`` of its text."""
    return "sha256:" + hashlib.sha256(key.strip().encode()).hexdigest()


def auth_key_prefix(key: str) -> str:
    """The visible part of auth key ``key`` kept for listings: ``tskey-auth-`` and 4 characters."""
    return key[: len(AUTH_KEY_PREFIX) + 4]


def _m3(conn: Connection) -> None:
    """3: auth keys stored as a SHA-256 hash (``key``) and a visible ``prefix``; ``uses`` (successful
    registrations) and ``last_used`` on keys. Existing keys are hashed in place."""
    _add_columns(
        conn,
        "auth_keys",
        sa.Column("prefix", sa.Text, nullable=False, server_default=""),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_used", sa.Float),
    )
    t = sa.table("auth_keys", sa.column("id"), sa.column("key"), sa.column("used"))
    for r in conn.execute(sa.select(t.c.id, t.c.key, t.c.used)).all():
        if str(r.key).startswith(AUTH_KEY_PREFIX):
            conn.execute(
                sa.text("UPDATE auth_keys SET key = :h, prefix = :p, uses = :u WHERE id = :id"),
                {"h": hash_auth_key(r.key), "p": auth_key_prefix(r.key), "u": 1 if r.used else 0, "id": r.id},
            )


def _m4(conn: Connection) -> None:
    """4: ``home_derp`` on nodes: the DERP region id the node reports as its home (0 = none)."""
    _add_columns(conn, "nodes", sa.Column("home_derp", sa.Integer, nullable=False, server_default="0"))


def _m5_disco_key(conn: Connection) -> None:
    """5: ``disco_key`` on nodes: the node's current disco public key, ``discokey:<hex>`` ("" = none sent)."""
    _add_columns(conn, "nodes", sa.Column("disco_key", sa.Text, nullable=False, server_default=""))


def _m6_oidc(conn: Connection) -> None:
    """6 (OpenID Connect login): users get ``oidc_issuer``, ``oidc_subject`` (unique together),
    ``email`` and ``display_name``; ``pending_nodes`` holds logins waiting for an admin's approval (see
    :mod:`tailpy.control.identity`)."""
    _add_columns(
        conn,
        "users",
        sa.Column("oidc_issuer", sa.Text),
        sa.Column("oidc_subject", sa.Text),
        sa.Column("email", sa.Text, nullable=False, server_default=""),
        sa.Column("display_name", sa.Text, nullable=False, server_default=""),
    )
    conn.exec_driver_sql("CREATE UNIQUE INDEX ux_users_oidc ON users (oidc_issuer, oidc_subject)")
    md = sa.MetaData()
    sa.Table(
        "pending_nodes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("machine_key", sa.Text, nullable=False, unique=True),
        sa.Column("node_key", sa.Text, nullable=False),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("os", sa.Text, nullable=False, server_default=""),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("key_expiry", sa.Float),
        sa.Column("created", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    md.create_all(conn)


def _m7_expiry_fixed(conn: Connection) -> None:
    """7: ``key_expiry_fixed`` on nodes and pending nodes: the key expiry came from the login's ID
    token, so rotating the node key keeps it (only a new login renews it)."""
    for table in ("nodes", "pending_nodes"):
        _add_columns(
            conn, table, sa.Column("key_expiry_fixed", sa.Boolean, nullable=False, server_default=sa.false())
        )


MIGRATIONS: Sequence[Callable[[Connection], None]] = (
    _m1,
    _m2,
    _m3,
    _m4,
    _m5_disco_key,
    _m6_oidc,
    _m7_expiry_fixed,
)
"""Ordered schema steps, each run in one transaction on SQLite and PostgreSQL alike; step i (1-based) brings
the database to version i. Append, never edit."""

_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_nodes_node_key ON nodes (node_key)",
    "CREATE INDEX IF NOT EXISTS ix_nodes_key_expiry ON nodes (key_expiry)",
    "CREATE INDEX IF NOT EXISTS ix_nodes_ephemeral ON nodes (ephemeral)",
)
"""Indexes for the per-registration node queries (node key clash, expiry and ephemeral timers), so that a
registration costs O(log nodes). Created when missing on every open (idempotent, SQLite and PostgreSQL
alike); they change no data, so they are not a schema version."""

_meta = sa.MetaData()
schema_version = sa.Table("schema_version", _meta, sa.Column("version", sa.Integer, nullable=False))
users = sa.Table(
    "users",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("created", sa.Float),
    sa.Column("oidc_issuer", sa.Text),  # migration 6: an identity provider's user (issuer, subject)
    sa.Column("oidc_subject", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("display_name", sa.Text),
)
pending_nodes = sa.Table(  # migration 6: logins waiting for an admin's approval (tailpy.control.identity)
    "pending_nodes",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("machine_key", sa.Text),
    sa.Column("node_key", sa.Text),
    sa.Column("hostname", sa.Text),
    sa.Column("os", sa.Text),
    sa.Column("user_id", sa.Integer),
    sa.Column("key_expiry", sa.Float),
    sa.Column("created", sa.Float),
    sa.Column("key_expiry_fixed", sa.Boolean),
)
settings = sa.Table("settings", _meta, sa.Column("name", sa.Text), sa.Column("value", sa.Text))
auth_keys = sa.Table(
    "auth_keys",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.Text),
    sa.Column("reusable", sa.Boolean),
    sa.Column("expires", sa.Float),
    sa.Column("used", sa.Boolean),
    sa.Column("created", sa.Float),
    sa.Column("user_id", sa.Integer),
    sa.Column("tags", sa.Text),
    sa.Column("ephemeral", sa.Boolean),
    sa.Column("prefix", sa.Text),
    sa.Column("uses", sa.Integer),
    sa.Column("last_used", sa.Float),
)
nodes = sa.Table(
    "nodes",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("machine_key", sa.Text),
    sa.Column("node_key", sa.Text),
    sa.Column("hostname", sa.Text),
    sa.Column("name", sa.Text),
    sa.Column("ipv4", sa.Text),
    sa.Column("ipv6", sa.Text),
    sa.Column("endpoints", sa.Text),
    sa.Column("last_seen", sa.Float),
    sa.Column("created", sa.Float),
    sa.Column("deleted", sa.Float),
    sa.Column("user_id", sa.Integer),
    sa.Column("tags", sa.Text),
    sa.Column("ephemeral", sa.Boolean),
    sa.Column("os", sa.Text),
    sa.Column("key_expiry", sa.Float),
    sa.Column("expiry_disabled", sa.Boolean),
    sa.Column("logged_out", sa.Boolean),
    sa.Column("home_derp", sa.Integer),
    sa.Column("disco_key", sa.Text),
    sa.Column("key_expiry_fixed", sa.Boolean),
)


@dataclass(frozen=True)
class AuthKey:
    """A pre-auth key. ``key`` is the full ``tskey-auth-…`` text only as :meth:`Store.create_auth_key` returns
    it; read back from the database it is the visible prefix and "…" (only a hash of the rest is stored).
    ``expires`` and ``created`` are unix seconds (``expires`` None: never); ``user`` the owner's name of nodes
    it registers ("" for a tagged key); ``tags`` like ("tag:server",); ``uses`` how many registrations it
    made, the last at ``last_used``."""

    key: str
    reusable: bool
    expires: float | None
    used: bool
    created: float
    id: int = 0
    user: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    uses: int = 0
    last_used: float | None = None

    @property
    def shown(self) -> str:
        """The key as listings show it: ``tskey-auth-AbCd…``."""
        return auth_key_prefix(self.key) + "…"

    def to_json(self, *, full_key: bool = False) -> dict[str, Any]:
        """JSON for admin output; the key shown as a prefix unless ``full_key`` (right after creation)."""
        return {
            "id": self.id,
            "key": self.key if full_key else self.shown,
            "user": self.user,
            "tags": list(self.tags),
            "reusable": self.reusable,
            "ephemeral": self.ephemeral,
            "used": self.used,
            "uses": self.uses,
            "last_used": self.last_used,
            "expires": self.expires,
            "created": self.created,
        }


@dataclass(frozen=True)
class User:
    """A user: ``id``, login ``name`` ("alice" or "alice@example.com"), ``created`` unix seconds."""

    id: int
    name: str
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created": self.created}


@dataclass(frozen=True)
class Settings:
    """Tailnet-wide settings stored in the database: DNS ``domain`` and the address prefixes."""

    domain: str = names.DEFAULT_DOMAIN
    prefix_v4: ipaddress.IPv4Network = IPV4_RANGE
    prefix_v6: ipaddress.IPv6Network = IPV6_RANGE


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


def _engine(url: str) -> Engine:
    if url.startswith("postgresql"):
        require_psycopg()
        engine = sa.create_engine(url, pool_pre_ping=True)

        @sa.event.listens_for(engine, "begin")
        def _on_pg_begin(conn: Connection) -> None:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")

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


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (None for other databases and in-memory SQLite)."""
    u = sa.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _secure_sqlite_files(path: Path, *, create: bool) -> None:
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


def _version(conn: Connection) -> int:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    v = conn.execute(sa.select(schema_version.c.version)).scalar()
    if v is None:
        conn.execute(schema_version.insert().values(version=0))
        return 0
    return int(v)


def dns_label(hostname: str) -> str:
    """``hostname`` as a DNS label (see :func:`tailpy.control.names.sanitize`)."""
    return names.sanitize(hostname)


def parse_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate tags ``tag:<lowercase label>``; sorted, without duplicates. Raises ConfigError."""
    out = set()
    for t in tags:
        t = t.strip()
        if not t:
            continue
        if not t.startswith("tag:"):
            t = "tag:" + t
        if not _TAG.fullmatch(t):
            raise ConfigError(f"tag {t!r} is not tag:<name> with lowercase letters, digits and hyphens")
        out.add(t)
    return tuple(sorted(out))


class Store:
    """Synchronous access to the control database. Methods take ``now`` (unix seconds) where time matters.

    ``db``: None for SQLite in ``state_dir``, or a URL (:func:`database_url`); ``state_dir`` holds the server
    key either way. Raises ConfigError when ``state_dir`` does not exist or (``create`` False) holds no
    database, or the database cannot be reached; ControlError when the database is newer than this code.
    Admin mistakes (unknown node, taken name) raise ConfigError with a sentence; AuthKeyError from
    :meth:`register` for a refused auth key.
    """

    def __init__(self, state_dir: Path | str, *, create: bool = True, db: str | None = None) -> None:
        self.state_dir = Path(state_dir)
        if not self.state_dir.is_dir():
            raise ConfigError(
                f"control state directory {self.state_dir} does not exist; pass the --state-dir that "
                "`tailpy control serve` uses"
            )
        url = database_url(db, self.state_dir)
        self.url = url
        self.where = str(self.state_dir / DB_NAME) if db is None else sa.make_url(url).render_as_string()
        if db is None and not create and not (self.state_dir / DB_NAME).exists():
            raise ConfigError(
                f"no control database in {self.state_dir}; run `tailpy control serve --state-dir "
                f"{self.state_dir}` once, or pass the right --state-dir"
            )
        sqlite_path = _sqlite_path(url)
        if sqlite_path is not None:
            _secure_sqlite_files(sqlite_path, create=create)
        self._hint: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}  # see _free_address
        self.engine = _engine(url)
        old_umask = os.umask(0o077)  # -wal and -shm (SQLite gives them the database file's mode anyway)
        try:
            self.migrate()
        except sa.exc.OperationalError as e:
            self.engine.dispose()
            detail = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
            hint = ""
            if sqlite_path is not None and ("unable to open" in detail or "readonly" in detail):
                who = f"this user (uid {os.getuid()})"
                hint = f"; check that {who} can write {sqlite_path.parent} and its files"
            raise ConfigError(f"cannot open control database {self.where}: {detail}{hint}") from None
        except BaseException:
            self.engine.dispose()  # a newer schema, say: no pooled connection may outlive the error
            raise
        finally:
            os.umask(old_umask)

    def close(self) -> None:
        self.engine.dispose()

    # --- migrations ---

    def migrate(self) -> int:
        """Run the migrations the database lacks; returns the resulting version (== len(MIGRATIONS))."""
        with self.engine.begin() as conn:
            v = _version(conn)
            if v > len(MIGRATIONS):
                raise ControlError(
                    f"control database {self.where} has schema version {v}, newer than this "
                    f"tailpy knows ({len(MIGRATIONS)}); upgrade tailpy"
                )
            for step in MIGRATIONS[v:]:
                step(conn)
            conn.execute(schema_version.update().values(version=len(MIGRATIONS)))
            for ddl in _INDEXES:
                conn.exec_driver_sql(ddl)
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        with self.engine.begin() as conn:
            return _version(conn)

    # --- server key and settings ---

    def server_key(self) -> MachinePrivate:
        """The server's machine private key from ``control.key`` (created, mode 0600, on first use)."""
        path = self.state_dir / KEY_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                return MachinePrivate.from_text(path.read_text().strip())
            except ValueError as e:
                raise ConfigError(
                    f"server key file {path} is damaged ({e}); restore it from backup"
                ) from None
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

    def settings(self) -> Settings:
        """The stored tailnet settings (defaults where none is stored)."""
        with self.engine.begin() as conn:
            return self._settings(conn)

    def _settings(self, conn: Connection) -> Settings:
        kv = {r.name: r.value for r in conn.execute(sa.select(settings))}
        d = Settings()
        return Settings(
            kv.get("domain", d.domain),
            ipaddress.IPv4Network(kv.get("prefix_v4", str(d.prefix_v4))),
            ipaddress.IPv6Network(kv.get("prefix_v6", str(d.prefix_v6))),
        )

    def configure(
        self, *, domain: str | None = None, prefix_v4: str | None = None, prefix_v6: str | None = None
    ) -> Settings:
        """Store the settings given (the rest stay); returns all. Nodes keep the addresses they have.

        ``prefix_v4`` must lie within 100.64.0.0/10 and ``prefix_v6`` within fd7a:115c:a1e0::/48 (the ranges
        tailpy routes and MagicDNS assume). Raises ConfigError.
        """
        values: dict[str, str] = {}
        if domain is not None:
            values["domain"] = names.check_domain(domain)
        for opt, text, full in (("prefix_v4", prefix_v4, IPV4_RANGE), ("prefix_v6", prefix_v6, IPV6_RANGE)):
            if text is None:
                continue
            flag = opt.replace("_", "-")
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                raise ConfigError(f"--{flag} {text!r} is not a network prefix: {e}") from None
            if net.version != full.version or not net.subnet_of(full):  # type: ignore[arg-type]
                raise ConfigError(f"--{flag} {text} must lie within {full}")
            values[opt] = str(net)
        with self.engine.begin() as conn:
            for k, v in values.items():
                conn.execute(settings.delete().where(settings.c.name == k))
                conn.execute(settings.insert().values(name=k, value=v))
            return self._settings(conn)

    # --- users ---

    def create_user(self, name: str, now: float) -> User:
        """Create user ``name`` (1-64 of letters, digits, ``.``, ``_``, ``@``, ``+``, ``-``). Raises
        ConfigError for a bad or taken name."""
        if not _USER_NAME.fullmatch(name):
            raise ConfigError(
                f"user name {name!r} must be 1-64 letters, digits, '.', '_', '@', '+' or '-' (alice, "
                "alice@example.com)"
            )
        with self.engine.begin() as conn:
            if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first() is not None:
                raise ConfigError(f"user {name} already exists")
            res = conn.execute(users.insert().values(name=name, created=now))
            pk = res.inserted_primary_key
            assert pk is not None
            return User(int(pk[0]), name, now)

    def list_users(self) -> list[User]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(users).order_by(users.c.id)).all()
        return [User(int(r.id), r.name, r.created) for r in rows]

    def _user_id(self, conn: Connection, name: str) -> int:
        row = conn.execute(sa.select(users.c.id).where(users.c.name == name)).first()
        if row is None:
            raise ConfigError(f"there is no user {name}; create it with `tailpy control users create {name}`")
        return int(row.id)

    def delete_user(self, name: str) -> None:
        """Delete user ``name`` and its auth keys. Raises ConfigError when it is unknown or still owns nodes
        (delete those first)."""
        with self.engine.begin() as conn:
            uid = self._user_id(conn, name)
            n = len(
                conn.execute(
                    sa.select(nodes.c.id).where(nodes.c.user_id == uid, nodes.c.deleted.is_(None))
                ).all()
            )
            if n:
                raise ConfigError(
                    f"user {name} still owns {n} node(s); delete them first (`tailpy control nodes list`)"
                )
            conn.execute(auth_keys.delete().where(auth_keys.c.user_id == uid))
            conn.execute(nodes.update().where(nodes.c.user_id == uid).values(user_id=None))
            conn.execute(users.delete().where(users.c.id == uid))

    # --- auth keys ---

    def create_auth_key(
        self,
        *,
        reusable: bool,
        expires: float | None,
        now: float,
        user: str | None = None,
        tags: Iterable[str] = (),
        ephemeral: bool = False,
    ) -> AuthKey:
        """A new pre-auth key ``tskey-auth-<32 url-safe characters>``; ``expires`` unix seconds or None.

        Nodes it registers belong to ``user`` (which must exist), or carry ``tags`` and no user; with neither,
        to the user "default" (created when missing). ``ephemeral`` nodes are removed after they have been
        offline for the server's ``--ephemeral-timeout``. Raises ConfigError (unknown user, bad tag).
        """
        tag_list = parse_tags(tags)
        if user is not None and tag_list:
            raise ConfigError(
                "give an auth key either --user or --tags, not both (tagged nodes have no user)"
            )
        key = AUTH_KEY_PREFIX + secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            uid: int | None = None
            if user is not None:
                uid = self._user_id(conn, user)
            elif not tag_list:
                user = DEFAULT_USER
                row = conn.execute(sa.select(users.c.id).where(users.c.name == user)).first()
                if row is None:
                    res = conn.execute(users.insert().values(name=user, created=now))
                    assert res.inserted_primary_key is not None
                    uid = int(res.inserted_primary_key[0])
                else:
                    uid = int(row.id)
            res = conn.execute(
                auth_keys.insert().values(
                    key=hash_auth_key(key),
                    prefix=auth_key_prefix(key),
                    uses=0,
                    reusable=reusable,
                    expires=expires,
                    used=False,
                    created=now,
                    user_id=uid,
                    tags=json.dumps(list(tag_list)),
                    ephemeral=ephemeral,
                )
            )
            assert res.inserted_primary_key is not None
            kid = int(res.inserted_primary_key[0])
        return AuthKey(key, reusable, expires, False, now, kid, user or "", tag_list, ephemeral)

    def _keys_query(self) -> sa.Select[Any]:
        return sa.select(auth_keys, users.c.name.label("user_name")).select_from(
            auth_keys.outerjoin(users, auth_keys.c.user_id == users.c.id)
        )

    def list_auth_keys(self) -> list[AuthKey]:
        with self.engine.begin() as conn:
            rows = conn.execute(self._keys_query().order_by(auth_keys.c.id)).all()
        return [_to_auth_key(r) for r in rows]

    def expire_auth_key(self, key_or_id: str, now: float) -> AuthKey:
        """Make a key (by id, or the full ``tskey-auth-…`` text) expire now. Raises ConfigError if unknown."""
        where = (
            auth_keys.c.id == int(key_or_id)
            if key_or_id.isdigit()
            else auth_keys.c.key == hash_auth_key(key_or_id)
        )
        with self.engine.begin() as conn:
            res = conn.execute(auth_keys.update().where(where).values(expires=now))
            if not res.rowcount:
                raise ConfigError(f"there is no auth key {key_or_id}; see `tailpy control authkey list`")
            return _to_auth_key(conn.execute(self._keys_query().where(where)).one())

    def _take_auth_key(self, conn: Connection, key: str | None, now: float, why: str) -> Any:
        if not key:
            raise AuthKeyError(f"{why}: pass an auth key (create one with {CREATE_HINT})")
        shown = auth_key_prefix(key) + "…"
        row = conn.execute(sa.select(auth_keys).where(auth_keys.c.key == hash_auth_key(key))).first()
        if row is None:
            raise AuthKeyError(
                f"auth key {shown} is not known to this control server; create one with {CREATE_HINT}"
            )
        if row.expires is not None and row.expires <= now:
            raise AuthKeyError(f"auth key {shown} is expired; create a new one with {CREATE_HINT}")
        if row.used and not row.reusable:
            raise AuthKeyError(
                f"auth key {shown} was already used and is single-use; create a new one with {CREATE_HINT}"
                " (add --reusable for several machines)"
            )
        return row

    # --- nodes ---

    def register(
        self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostname: str,
        auth_key: str | None,
        now: float,
        *,
        os_name: str = "",
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
    ) -> Node:
        """Register ``machine_key`` (or re-register it) and return its node (``online`` False).

        A live machine whose node key is unchanged, not expired and not logged out needs no auth key (any
        given is not used: a restart). Otherwise (new machine, new node key, expired or logged-out key,
        deleted node) it needs a valid auth key, which only a successful registration uses up when
        single-use; the machine keeps its one record (id, addresses, and its name unless it was deleted),
        takes owner, tags and ephemerality from the key, and its key expiry is set ``key_lifetime`` seconds
        ahead (None: never; also never when disabled for the node or the node is tagged). ``os_name`` is
        stored ("linux"). Raises AuthKeyError, ControlError (node key of another machine, address pool
        exhausted).
        """
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.machine_key == machine_key.text())).first()
            if (
                row is not None
                and row.deleted is None
                and row.node_key == node_key.text()
                and not row.logged_out
                and not (row.key_expiry is not None and row.key_expiry <= now)
            ):
                values: dict[str, Any] = {"hostname": hostname, "last_seen": now}
                if os_name:
                    values["os"] = os_name
                conn.execute(nodes.update().where(nodes.c.id == row.id).values(**values))
                return self._node(conn, int(row.id), now)
            clash = conn.execute(
                sa.select(nodes.c.id).where(
                    nodes.c.node_key == node_key.text(), nodes.c.machine_key != machine_key.text()
                )
            ).first()
            if clash is not None:
                raise ControlError(
                    f"node key {node_key.short()} belongs to another machine; generate a new node key"
                )
            why = "this machine is not registered"  # (new machine, deleted node, or a new node key)
            if row is not None and row.deleted is None and row.node_key == node_key.text():
                why = "this machine logged out" if row.logged_out else "this machine's node key expired"
            key = self._take_auth_key(conn, auth_key, now, why)
            tags = tuple(json.loads(key.tags or "[]"))
            disabled = bool(row.expiry_disabled) if row is not None else False
            expiry = None if key_lifetime is None or disabled or tags else now + key_lifetime
            values = {
                "node_key": node_key.text(),
                "hostname": hostname,
                "last_seen": now,
                "user_id": key.user_id,
                "tags": key.tags or "[]",
                "ephemeral": bool(key.ephemeral),
                "key_expiry": expiry,
                "key_expiry_fixed": False,
                "logged_out": False,
            }
            if os_name:
                values["os"] = os_name
            node_id = self._write_node(conn, row, machine_key, hostname, values, now)
            conn.execute(
                auth_keys.update()
                .where(auth_keys.c.id == key.id)
                .values(used=True, uses=auth_keys.c.uses + 1, last_used=now)
            )
            return self._node(conn, node_id, now)

    def _unique_name(self, conn: Connection, base: str) -> str:
        """``base``, else the first of ``base-1``, ``base-2``, ... no node has: indexed lookups of the
        candidates, ``_BATCH`` at a time (O(log nodes) per batch; one batch unless the name is common)."""
        n = 0
        while True:
            batch = [base if i == 0 else names.with_suffix(base, i) for i in range(n, n + _BATCH)]
            taken = {r.name for r in conn.execute(sa.select(nodes.c.name).where(nodes.c.name.in_(batch)))}
            free = next((c for c in batch if c not in taken), None)
            if free is not None:
                return free
            n += _BATCH

    def _free_address(
        self, conn: Connection, net: ipaddress.IPv4Network | ipaddress.IPv6Network, column: sa.Column[Any]
    ) -> Any:
        """The lowest free address of ``net`` (see :func:`first_free`), O(log nodes): addresses are never
        given back (a node's row outlives its deletion), so the lowest free one only grows; the search
        starts at the last one found here (once per prefix and process: a scan of every address) and checks
        candidates ``_BATCH`` at a time against the unique index, inside the caller's serialized
        transaction. The hint is the address found, not the next one, so a rolled-back registration leaves
        no gap."""
        start = self._hint.get(net)
        if start is None:
            used = {r[0] for r in conn.execute(sa.select(column))}
            start = int(first_free(net, used))
        hosts = _hosts(net, start)
        while True:
            batch = [str(h) for h in itertools.islice(hosts, _BATCH)]
            if not batch:
                count = conn.execute(sa.select(sa.func.count()).select_from(nodes)).scalar() or 0
                raise _exhausted(net, count)
            taken = {r[0] for r in conn.execute(sa.select(column).where(column.in_(batch)))}
            free = next((a for a in batch if a not in taken), None)
            if free is not None:
                addr = ipaddress.ip_address(free)
                self._hint[net] = int(addr)
                return addr

    def _write_node(
        self,
        conn: Connection,
        row: Any,
        machine_key: MachinePublic,
        hostname: str,
        values: dict[str, Any],
        now: float,
    ) -> int:
        """Write a registration's ``values`` into the machine's one node record ``row`` (None: make it,
        with addresses and a name); a deleted record comes back under a fresh unique name. Returns its id."""
        if row is None:
            return self._insert(conn, machine_key, hostname, values, now)
        if row.deleted is not None:
            values = {**values, "deleted": None, "name": self._unique_name(conn, names.sanitize(hostname))}
        conn.execute(nodes.update().where(nodes.c.id == row.id).values(**values))
        return int(row.id)

    def _insert(
        self, conn: Connection, machine_key: MachinePublic, hostname: str, values: dict[str, Any], now: float
    ) -> int:
        cfg = self._settings(conn)
        res = conn.execute(
            nodes.insert().values(
                machine_key=machine_key.text(),
                name=self._unique_name(conn, names.sanitize(hostname)),
                ipv4=str(self._free_address(conn, cfg.prefix_v4, nodes.c.ipv4)),
                ipv6=str(self._free_address(conn, cfg.prefix_v6, nodes.c.ipv6)),
                endpoints="[]",
                created=now,
                **values,
            )
        )
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def rotate_node_key(
        self,
        machine_key: MachinePublic,
        old_node_key: NodePublic,
        new_node_key: NodePublic,
        now: float,
        *,
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
    ) -> Node:
        """Replace the live node's current key ``old_node_key`` by ``new_node_key`` (the caller has checked
        the rotation proof) and set a new expiry (kept as it is when it came from a login's ID token:
        ``key_expiry_fixed``); id, addresses and name stay. Raises ControlError when
        ``old_node_key`` is not the machine's current key or the node is logged out, or the new key belongs
        to another machine."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(nodes).where(nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
            ).first()
            if row is None or row.node_key != old_node_key.text() or row.logged_out:
                raise ControlError(
                    f"node key {old_node_key.short()} is not this machine's current key; log in again "
                    "(`tailpy login`, or `tailpy up --auth-key KEY`)"
                )
            clash = conn.execute(
                sa.select(nodes.c.id).where(nodes.c.node_key == new_node_key.text(), nodes.c.id != row.id)
            ).first()
            if clash is not None:
                raise ControlError(f"node key {new_node_key.short()} belongs to another machine")
            tagged = bool(json.loads(row.tags or "[]"))
            expiry = None if key_lifetime is None or row.expiry_disabled or tagged else now + key_lifetime
            if row.key_expiry_fixed and not row.expiry_disabled:
                expiry = row.key_expiry  # set by the identity provider's token: never extended by rotation
            conn.execute(
                nodes.update()
                .where(nodes.c.id == row.id)
                .values(node_key=new_node_key.text(), key_expiry=expiry, last_seen=now)
            )
            return self._node(conn, int(row.id), now)

    def logout(self, machine_key: MachinePublic, now: float) -> Node | None:
        """Log ``machine_key``'s live node out: its key counts as expired from ``now`` and a new
        registration needs an auth key; the record stays. None if there is no live node."""
        where = (nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(nodes.c.id).where(*where)).first()
            if row is None:
                return None
            conn.execute(nodes.update().where(*where).values(logged_out=True, key_expiry=now, last_seen=now))
            return self._node(conn, int(row.id), now)

    def _query(self) -> sa.Select[Any]:
        return sa.select(nodes, users.c.name.label("user_name")).select_from(
            nodes.outerjoin(users, nodes.c.user_id == users.c.id)
        )

    def _node(self, conn: Connection, node_id: int, now: float | None = None) -> Node:
        row = conn.execute(self._query().where(nodes.c.id == node_id)).one()
        return _to_node(row, _now(now))

    def node(self, node_id: int, now: float | None = None) -> Node | None:
        """Live node ``node_id`` (``expired`` as of ``now``, default the wall clock), or None."""
        with self.engine.begin() as conn:
            row = conn.execute(self._query().where(nodes.c.id == node_id, nodes.c.deleted.is_(None))).first()
        return None if row is None else _to_node(row, _now(now))

    def get_node(self, node_id: int, now: float | None = None) -> Node:
        """Live node ``node_id``. Raises ConfigError when there is none (for admin commands)."""
        node = self.node(node_id, now)
        if node is None:
            raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
        return node

    def node_by_machine_key(self, machine_key: MachinePublic, now: float | None = None) -> Node | None:
        """The live (not deleted) node of ``machine_key``, or None (``now`` decides ``expired``)."""
        with self.engine.begin() as conn:
            row = conn.execute(
                self._query().where(nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
            ).first()
        return None if row is None else _to_node(row, _now(now))

    def update_node(
        self,
        machine_key: MachinePublic,
        *,
        now: float,
        endpoints: Sequence[Endpoint] | None = None,
        hostname: str | None = None,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
    ) -> Node | None:
        """Set the endpoints, hostname, home DERP region id (0: none) and/or disco public key of
        ``machine_key``'s live node and its last_seen; None if there is no such node. (The node's name stays:
        only an admin rename changes it.)"""
        values: dict[str, Any] = {"last_seen": now}
        if disco_key is not None:
            values["disco_key"] = disco_key.text()
        if endpoints is not None:
            values["endpoints"] = json.dumps([str(e) for e in endpoints])
        if home_derp is not None:
            values["home_derp"] = home_derp
        if hostname is not None:
            values["hostname"] = hostname
        where = (nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
        with self.engine.begin() as conn:
            conn.execute(nodes.update().where(*where).values(**values))
            row = conn.execute(self._query().where(*where)).first()
        return None if row is None else _to_node(row, now)

    def list_nodes(self, now: float | None = None) -> list[Node]:
        """All live nodes, by id (``online`` False: the server knows who is online; ``expired`` as of
        ``now``, default the wall clock)."""
        with self.engine.begin() as conn:
            rows = conn.execute(self._query().where(nodes.c.deleted.is_(None)).order_by(nodes.c.id)).all()
        t = _now(now)
        return [_to_node(r, t) for r in rows]

    def delete_node(self, node_id: int, now: float) -> bool:
        """Remove node ``node_id`` from the tailnet: its row and addresses stay reserved for its machine key
        (which may rejoin with an auth key), its name is freed. True if it was live."""
        with self.engine.begin() as conn:
            res = conn.execute(
                nodes.update()
                .where(nodes.c.id == node_id, nodes.c.deleted.is_(None))
                .values(deleted=now, name=f"~deleted-{node_id}")  # not a DNS label: never collides
            )
        return bool(res.rowcount)

    def rename_node(self, node_id: int, name: str) -> Node:
        """Give live node ``node_id`` the name ``name`` (a valid DNS label). Raises ConfigError when the node
        does not exist or the name is taken ("name pi is taken by node 3")."""
        names.check_label(name)
        with self.engine.begin() as conn:
            self._live(conn, node_id)
            other = conn.execute(sa.select(nodes.c.id).where(nodes.c.name == name)).first()
            if other is not None and int(other.id) != node_id:
                raise ConfigError(f"name {name} is taken by node {other.id}")
            conn.execute(nodes.update().where(nodes.c.id == node_id).values(name=name))
            return self._node(conn, node_id)

    def _live(self, conn: Connection, node_id: int) -> Any:
        row = conn.execute(sa.select(nodes).where(nodes.c.id == node_id, nodes.c.deleted.is_(None))).first()
        if row is None:
            raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
        return row

    def expire_node(self, node_id: int, now: float) -> Node:
        """Expire node ``node_id``'s key now (it must log in again with an auth key). Raises ConfigError."""
        with self.engine.begin() as conn:
            self._live(conn, node_id)
            conn.execute(
                nodes.update().where(nodes.c.id == node_id).values(key_expiry=now, expiry_disabled=False)
            )
            return self._node(conn, node_id, now)

    def set_key_expiry(
        self, node_id: int, *, disabled: bool, now: float, key_lifetime: float = DEFAULT_KEY_LIFETIME
    ) -> Node:
        """Disable key expiry for node ``node_id`` (its key then never expires; an expired key becomes valid
        again), or enable it (expiring ``key_lifetime`` seconds from ``now``). Raises ConfigError."""
        with self.engine.begin() as conn:
            row = self._live(conn, node_id)
            if row.logged_out and disabled:
                raise ConfigError(f"node {node_id} is logged out; it must log in again first")
            conn.execute(
                nodes.update()
                .where(nodes.c.id == node_id)
                .values(expiry_disabled=disabled, key_expiry=None if disabled else now + key_lifetime)
            )
            return self._node(conn, node_id, now)

    # --- lifecycle (timers) ---

    def ephemeral_gc(
        self, now: float, timeout: float, online: Collection[int], not_before: float = 0.0
    ) -> list[int]:
        """Delete every live ephemeral node not in ``online`` last seen ``timeout`` seconds or more before
        ``now``; returns their ids. Offline time counts from ``not_before`` at the earliest (the server's
        start: a node connected when the server stopped has a stale ``last_seen``)."""
        gone = [
            n.id
            for n in self._ephemeral()
            if n.id not in online and max(n.last_seen or 0.0, not_before) + timeout <= now
        ]
        for node_id in gone:
            self.delete_node(node_id, now)
        return gone

    def _ephemeral(self) -> list[Any]:
        with self.engine.begin() as conn:
            return list(
                conn.execute(
                    sa.select(nodes.c.id, nodes.c.last_seen).where(
                        nodes.c.ephemeral.is_(True), nodes.c.deleted.is_(None)
                    )
                ).all()
            )

    def next_deadline(
        self, now: float, ephemeral_timeout: float, online: Collection[int], not_before: float = 0.0
    ) -> float | None:
        """The earliest moment after ``now`` when something changes by itself: a live node's key expires, or
        an offline ephemeral node's timeout ends (unix seconds; None: nothing pending)."""
        with self.engine.begin() as conn:
            expiry = conn.execute(
                sa.select(sa.func.min(nodes.c.key_expiry)).where(
                    nodes.c.deleted.is_(None), nodes.c.key_expiry > now
                )
            ).scalar()
        times = [float(expiry)] if expiry is not None else []
        times += [
            max(n.last_seen or 0.0, not_before) + ephemeral_timeout
            for n in self._ephemeral()
            if n.id not in online
        ]
        return min(times) if times else None

    def expired_between(self, since: float, now: float) -> list[int]:
        """Ids of live nodes whose key expired in (``since``, ``now``]."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(nodes.c.id).where(
                    nodes.c.deleted.is_(None), nodes.c.key_expiry > since, nodes.c.key_expiry <= now
                )
            ).all()
        return [int(r.id) for r in rows]


def first_free(net: ipaddress.IPv4Network | ipaddress.IPv6Network, used: set[str]) -> Any:
    """The lowest host address of ``net`` not in ``used`` (text forms) and not reserved (MagicDNS, the
    network and broadcast addresses). Raises ControlError when none is left."""
    for host in _hosts(net):
        if str(host) not in used:
            return host
    raise _exhausted(net, len(used))


def _exhausted(net: ipaddress.IPv4Network | ipaddress.IPv6Network, given: int) -> ControlError:
    return ControlError(
        f"address pool {net} is exhausted ({given} addresses given out); serve with a wider "
        f"--prefix-v{net.version} or delete nodes"
    )


def _hosts(net: ipaddress.IPv4Network | ipaddress.IPv6Network, start: int = 0) -> Iterator[Any]:
    """The host addresses of ``net`` from ``start`` (an int; default the first), reserved ones skipped."""
    first = max(int(net.network_address) + 1, start)
    cls: Callable[[int], Any] = type(net.network_address)
    return (a for a in (cls(i) for i in range(first, int(net.broadcast_address))) if a not in RESERVED)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _to_auth_key(r: Any) -> AuthKey:
    return AuthKey(
        (r.prefix or AUTH_KEY_PREFIX) + "…",
        bool(r.reusable),
        r.expires,
        bool(r.used),
        r.created,
        int(r.id),
        r.user_name or "",
        tuple(json.loads(r.tags or "[]")),
        bool(r.ephemeral),
        int(r.uses or 0),
        r.last_used,
    )


def _to_node(row: Any, now: float) -> Node:
    v4, v6 = row.ipv4, row.ipv6
    tags = tuple(json.loads(row.tags or "[]"))
    return Node(
        id=int(row.id),
        name=row.name,
        hostname=row.hostname,
        node_key=NodePublic.from_text(row.node_key),
        machine_key=MachinePublic.from_text(row.machine_key),
        addresses=(f"{v4}/32", f"{v6}/128"),
        endpoints=parse_valid(json.loads(row.endpoints)),
        online=False,
        last_seen=row.last_seen,
        user="" if tags else (row.user_name or ""),
        tags=tags,
        os=row.os or "",
        key_expiry=row.key_expiry,
        expired=bool(row.logged_out) or (row.key_expiry is not None and row.key_expiry <= now),
        home_derp=int(row.home_derp or 0),
        disco_key=DiscoPublic.from_text(row.disco_key) if row.disco_key else None,
    )


def now() -> float:
    """The wall clock, unix seconds (the default clock of the server and admin commands)."""
    return time.time()


__all__ = [
    "DEFAULT_KEY_LIFETIME",
    "MIGRATIONS",
    "AuthKey",
    "Settings",
    "Store",
    "User",
    "auth_key_prefix",
    "database_url",
    "dns_label",
    "hash_auth_key",
    "parse_tags",
]
