"""The control database's schema: the ordered migrations (:data:`MIGRATIONS`), the indexes created on every
open, and the SQLAlchemy Core tables the queries of :mod:`tailpy.control.store` use.

Migrations are dialect-neutral (SQLite and PostgreSQL alike); the table ``schema_version`` records how many
have run. Each step runs in the caller's transaction, which is serialized against every other writer (see
:mod:`tailpy.control.store.database`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.errors import ControlError

AUTH_KEY_PREFIX = "tskey-auth-"


def hash_auth_key(key: str) -> str:
    """What the database stores for auth key ``key``: ``sha256:<hex>`` of its text."""
    return "sha256:" + hashlib.sha256(key.strip().encode()).hexdigest()


def auth_key_prefix(key: str) -> str:
    """The visible part of auth key ``key`` kept for listings: ``tskey-auth-`` and 4 characters."""
    return key[: len(AUTH_KEY_PREFIX) + 4]


# --- migrations ---------------------------------------------------------------------------------------------


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
    """6 (OpenID Connect login): users get ``oidc_issuer``, ``oidc_subject`` (unique together), ``email``
    and ``display_name``; ``pending_nodes`` holds logins waiting for an admin's approval (see
    :mod:`tailpy.control.store.pending`)."""
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
    """7 (OpenID Connect login): ``key_expiry_fixed`` on nodes and pending nodes: the key expiry came from
    the login's ID token, so rotating the node key keeps it (only a new login renews it)."""
    for table in ("nodes", "pending_nodes"):
        _add_columns(
            conn, table, sa.Column("key_expiry_fixed", sa.Boolean, nullable=False, server_default=sa.false())
        )


def _m8_names_addresses(conn: Connection) -> None:
    """8: ``name_by_admin`` on nodes: an admin gave the node its name (``nodes rename``), so a new hostname
    from the node does not change it; and an index on ``deleted``, which the address allocator searches for
    addresses whose quarantine after deletion has ended."""
    _add_columns(
        conn, "nodes", sa.Column("name_by_admin", sa.Boolean, nullable=False, server_default=sa.false())
    )
    conn.exec_driver_sql("CREATE INDEX ix_nodes_deleted ON nodes (deleted)")


def _m9_policies(conn: Connection) -> None:
    """9 (access control): ``policies``, the tailnet policy's history: every accepted policy ``text`` (HuJSON
    as given), who set it (``set_by``) and when (``set_at``, unix seconds); the row with the highest ``id``
    is the running policy (none: no policy, every node may reach every other)."""
    md = sa.MetaData()
    sa.Table(
        "policies",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("set_by", sa.Text, nullable=False, server_default=""),
        sa.Column("set_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    md.create_all(conn)


def _m10_routes(conn: Connection) -> None:
    """10 (subnet routers and exit nodes): ``routable_ips`` on nodes, the routes the node advertises
    (JSON list of canonical CIDR text, exit routes included: Tailscale's ``Hostinfo.RoutableIPs``), and
    ``approved_routes``, those an admin or the policy's ``autoApprovers`` approved (JSON list; an approval
    stays when the node stops advertising the route)."""
    _add_columns(
        conn,
        "nodes",
        sa.Column("routable_ips", sa.Text, nullable=False, server_default="[]"),
        sa.Column("approved_routes", sa.Text, nullable=False, server_default="[]"),
    )


def _m11_api_keys(conn: Connection) -> None:
    """11 (admin API): ``api_keys``, the keys of the HTTP admin API (:mod:`tailpy.control.apikeys`): a
    visible ``prefix`` (unique; how listings and ``apikey expire`` name a key), ``hash`` (``sha256:<hex>``
    of the secret part: the secret itself is shown once and never stored), ``description``,
    ``created_by``, ``created_at``, ``expires_at`` (None: never) and ``last_used`` (unix seconds, updated
    at most once a minute)."""
    md = sa.MetaData()
    sa.Table(
        "api_keys",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("prefix", sa.Text, nullable=False, unique=True),
        sa.Column("hash", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("created_by", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("last_used", sa.Float),
        sqlite_autoincrement=True,
    )
    md.create_all(conn)


def _m12_console_revoked(conn: Connection) -> None:
    """12 (web console): ``console_revoked``, one-time console tokens no longer valid: the ids of signed-out
    sessions (``session:<id>``) and the one-time tokens of forms already sent (``form:<token>``), each kept
    until ``expires`` (unix seconds: when the session or form would have expired anyway), then pruned. Every
    replica of the database reads it, so a sign-out on one ends the session on all."""
    md = sa.MetaData()
    sa.Table(
        "console_revoked",
        md,
        sa.Column("token", sa.Text, primary_key=True),
        sa.Column("expires", sa.Float, nullable=False),
    )
    md.create_all(conn)
    conn.exec_driver_sql("CREATE INDEX ix_console_revoked_expires ON console_revoked (expires)")


MIGRATIONS: Sequence[Callable[[Connection], None]] = (
    _m1,
    _m2,
    _m3,
    _m4,
    _m5_disco_key,
    _m6_oidc,
    _m7_expiry_fixed,
    _m8_names_addresses,
    _m9_policies,
    _m10_routes,
    _m11_api_keys,
    _m12_console_revoked,
)
"""Ordered schema steps, each run in one transaction on SQLite and PostgreSQL alike; step i (1-based) brings
the database to version i. Append, never edit."""

INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_nodes_node_key ON nodes (node_key)",
    "CREATE INDEX IF NOT EXISTS ix_nodes_key_expiry ON nodes (key_expiry)",
    "CREATE INDEX IF NOT EXISTS ix_nodes_ephemeral ON nodes (ephemeral)",
)
"""Indexes for the per-registration node queries (node key clash, expiry and ephemeral timers), so that a
registration costs O(log nodes). Created when missing on every open (idempotent, SQLite and PostgreSQL
alike); they change no data, so they are not a schema version."""


def version(conn: Connection) -> int:
    """The database's schema version (0 for an empty database, whose ``schema_version`` is created)."""
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    v = conn.execute(sa.select(schema_version.c.version)).scalar()
    if v is None:
        conn.execute(schema_version.insert().values(version=0))
        return 0
    return int(v)


def migrate(conn: Connection, where: str) -> int:
    """Run the migrations the database lacks and create missing :data:`INDEXES`; returns the resulting
    version (== len(MIGRATIONS)). Raises ControlError when the database (``where``, for the message) is
    newer than this code."""
    v = version(conn)
    if v > len(MIGRATIONS):
        raise ControlError(
            f"control database {where} has schema version {v}, newer than this "
            f"tailpy knows ({len(MIGRATIONS)}); upgrade tailpy"
        )
    for step in MIGRATIONS[v:]:
        step(conn)
    conn.execute(schema_version.update().values(version=len(MIGRATIONS)))
    for ddl in INDEXES:
        conn.exec_driver_sql(ddl)
    return len(MIGRATIONS)


# --- tables (the schema as of the last migration) -----------------------------------------------------------

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
pending_nodes = sa.Table(  # migration 6: logins waiting for an admin's approval
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
policies = sa.Table(  # migration 8: the tailnet policy's history (newest id: the running policy)
    "policies",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text),
    sa.Column("set_by", sa.Text),
    sa.Column("set_at", sa.Float),
)
api_keys = sa.Table(  # migration 11: keys of the HTTP admin API
    "api_keys",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("prefix", sa.Text),
    sa.Column("hash", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("last_used", sa.Float),
)
console_revoked = sa.Table(  # migration 12: signed-out console sessions, used one-time form tokens
    "console_revoked",
    _meta,
    sa.Column("token", sa.Text, primary_key=True),
    sa.Column("expires", sa.Float),
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
    sa.Column("name_by_admin", sa.Boolean),  # migration 8
    sa.Column("routable_ips", sa.Text),  # migration 10: advertised routes (JSON list)
    sa.Column("approved_routes", sa.Text),  # migration 10: approved routes (JSON list)
)

__all__ = [
    "AUTH_KEY_PREFIX",
    "INDEXES",
    "MIGRATIONS",
    "api_keys",
    "auth_key_prefix",
    "auth_keys",
    "console_revoked",
    "hash_auth_key",
    "migrate",
    "nodes",
    "pending_nodes",
    "policies",
    "schema_version",
    "settings",
    "users",
    "version",
]
