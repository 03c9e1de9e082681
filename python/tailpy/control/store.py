"""The coordination server's state: SQLite (``<state_dir>/control.db``, WAL) through SQLAlchemy 2 Core.

Schema changes are ordered :data:`MIGRATIONS`; ``schema_version`` records how many have run. Every write is
one ``BEGIN IMMEDIATE`` transaction, so the server and admin commands (``tailpy control authkey create``)
can share the file safely.

The server's machine key lives in ``<state_dir>/control.key`` (``privkey:<hex>``, mode 0600).

Addresses: IPv4 from 100.64.0.0/10 and IPv6 from fd7a:115c:a1e0::/48, each the lowest free one, skipping the
network address, 100.100.100.100 and fd7a:115c:a1e0::53 (MagicDNS). A node keeps its row (id, name,
addresses) for the life of its machine key, even when deleted, so an address is never given to two nodes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.public
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tailpy.errors import AuthKeyError, ConfigError, ControlError
from tailpy.keys import MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import Node

DB_NAME = "control.db"
KEY_NAME = "control.key"
AUTH_KEY_PREFIX = "tskey-auth-"
CREATE_HINT = "`tailpy control authkey create`"

IPV4_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_RANGE = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
RESERVED = frozenset(
    {
        ipaddress.ip_address("100.100.100.100"),  # MagicDNS
        ipaddress.ip_address("fd7a:115c:a1e0::53"),  # MagicDNS
        IPV4_RANGE.broadcast_address,
    }
)

# --- schema -------------------------------------------------------------------------------------------------

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: auth keys and nodes
    (
        """CREATE TABLE auth_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            reusable BOOLEAN NOT NULL,
            expires REAL,
            used BOOLEAN NOT NULL DEFAULT 0,
            created REAL NOT NULL)""",
        """CREATE TABLE nodes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            machine_key TEXT NOT NULL UNIQUE,
            node_key TEXT NOT NULL,
            hostname TEXT NOT NULL,
            name TEXT NOT NULL UNIQUE,
            ipv4 TEXT NOT NULL UNIQUE,
            ipv6 TEXT NOT NULL UNIQUE,
            endpoints TEXT NOT NULL DEFAULT '[]',
            last_seen REAL,
            created REAL NOT NULL,
            deleted REAL)""",
    ),
)
"""Ordered schema steps; step i (1-based) brings the database to version i. Append, never edit."""

_meta = sa.MetaData()
schema_version = sa.Table("schema_version", _meta, sa.Column("version", sa.Integer, nullable=False))
auth_keys = sa.Table(
    "auth_keys",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.Text),
    sa.Column("reusable", sa.Boolean),
    sa.Column("expires", sa.Float),
    sa.Column("used", sa.Boolean),
    sa.Column("created", sa.Float),
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
)


@dataclass(frozen=True)
class AuthKey:
    """A pre-auth key. ``expires`` and ``created`` are unix seconds (``expires`` None: never)."""

    key: str
    reusable: bool
    expires: float | None
    used: bool
    created: float


def _engine(path: Path) -> Engine:
    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (pysqlite's own handling is broken)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across crashes in WAL mode; fsync at checkpoints
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _version(conn: Connection) -> int:
    conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    v = conn.execute(sa.select(schema_version.c.version)).scalar()
    if v is None:
        conn.execute(schema_version.insert().values(version=0))
        return 0
    return int(v)


def dns_label(hostname: str) -> str:
    """``hostname``'s first label as a DNS label: lowercase a-z, 0-9 and '-', at most 63 characters,
    no leading or trailing '-'; "node" when nothing is left."""
    label = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-")[:63].strip("-")
    return label or "node"


class Store:
    """Synchronous access to the control database. Methods take ``now`` (unix seconds) where time matters.

    Raises ConfigError when ``state_dir`` does not exist, ControlError when the database is newer than this
    code, AuthKeyError from :meth:`register` for a refused auth key.
    """

    def __init__(self, state_dir: Path | str, *, create: bool = True) -> None:
        self.state_dir = Path(state_dir)
        if not self.state_dir.is_dir():
            raise ConfigError(
                f"control state directory {self.state_dir} does not exist; pass the --state-dir that "
                "`tailpy control serve` uses"
            )
        path = self.state_dir / DB_NAME
        if not create and not path.exists():
            raise ConfigError(
                f"no control database in {self.state_dir}; run `tailpy control serve --state-dir "
                f"{self.state_dir}` once, or pass the right --state-dir"
            )
        self.engine = _engine(path)
        self.migrate()

    def close(self) -> None:
        self.engine.dispose()

    # --- migrations ---

    def migrate(self) -> int:
        """Run the migrations the database lacks; returns the resulting version (== len(MIGRATIONS))."""
        with self.engine.begin() as conn:
            v = _version(conn)
            if v > len(MIGRATIONS):
                raise ControlError(
                    f"control database {self.state_dir / DB_NAME} has schema version {v}, newer than this "
                    f"tailpy knows ({len(MIGRATIONS)}); upgrade tailpy"
                )
            for step in MIGRATIONS[v:]:
                for stmt in step:
                    conn.exec_driver_sql(stmt)
            conn.execute(schema_version.update().values(version=len(MIGRATIONS)))
        return len(MIGRATIONS)

    def schema_version(self) -> int:
        with self.engine.begin() as conn:
            return _version(conn)

    # --- server key ---

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
        key = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
        with os.fdopen(fd, "w") as f:
            f.write(key.text() + "\n")
        return key

    # --- auth keys ---

    def create_auth_key(self, *, reusable: bool, expires: float | None, now: float) -> AuthKey:
        """A new pre-auth key ``tskey-auth-<32 url-safe characters>``; ``expires`` unix seconds or None."""
        ak = AuthKey(AUTH_KEY_PREFIX + secrets.token_urlsafe(24), reusable, expires, False, now)
        with self.engine.begin() as conn:
            conn.execute(
                auth_keys.insert().values(
                    key=ak.key, reusable=reusable, expires=expires, used=False, created=now
                )
            )
        return ak

    def list_auth_keys(self) -> list[AuthKey]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(auth_keys).order_by(auth_keys.c.id)).all()
        return [AuthKey(r.key, bool(r.reusable), r.expires, bool(r.used), r.created) for r in rows]

    def _take_auth_key(self, conn: Connection, key: str | None, now: float) -> None:
        if not key:
            raise AuthKeyError(
                f"this machine is not registered: pass an auth key (create one with {CREATE_HINT})"
            )
        shown = key[: len(AUTH_KEY_PREFIX) + 4] + "…"
        row = conn.execute(sa.select(auth_keys).where(auth_keys.c.key == key)).first()
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
        if not row.reusable:
            conn.execute(auth_keys.update().where(auth_keys.c.id == row.id).values(used=True))

    # --- nodes ---

    def register(
        self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostname: str,
        auth_key: str | None,
        now: float,
    ) -> Node:
        """Register ``machine_key`` (or re-register it) and return its node (``online`` False).

        A machine already registered and not deleted needs no auth key while its node key is unchanged;
        a new node key, a deleted node or a new machine needs a valid auth key, which a successful
        registration uses up when single-use. The node keeps its id, name and addresses. Raises AuthKeyError.
        """
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(nodes).where(nodes.c.machine_key == machine_key.text())).first()
            if row is not None and row.deleted is None and row.node_key == node_key.text():
                conn.execute(
                    nodes.update().where(nodes.c.id == row.id).values(hostname=hostname, last_seen=now)
                )
                node_id = row.id
            else:
                clash = conn.execute(
                    sa.select(nodes.c.id).where(
                        nodes.c.node_key == node_key.text(), nodes.c.machine_key != machine_key.text()
                    )
                ).first()
                if clash is not None:
                    raise ControlError(
                        f"node key {node_key.short()} belongs to another machine; generate a new node key"
                    )
                self._take_auth_key(conn, auth_key, now)
                if row is not None:
                    conn.execute(
                        nodes.update()
                        .where(nodes.c.id == row.id)
                        .values(node_key=node_key.text(), hostname=hostname, last_seen=now, deleted=None)
                    )
                    node_id = row.id
                else:
                    node_id = self._insert(conn, machine_key, node_key, hostname, now)
            return self._node(conn, node_id)

    def _insert(
        self, conn: Connection, machine_key: MachinePublic, node_key: NodePublic, hostname: str, now: float
    ) -> int:
        used = conn.execute(sa.select(nodes.c.name, nodes.c.ipv4, nodes.c.ipv6)).all()
        names = {r.name for r in used}
        base = dns_label(hostname)
        name, n = base, 0
        while name in names:
            n += 1
            suffix = f"-{n}"
            name = base[: 63 - len(suffix)].rstrip("-") + suffix
        res = conn.execute(
            nodes.insert().values(
                machine_key=machine_key.text(),
                node_key=node_key.text(),
                hostname=hostname,
                name=name,
                ipv4=str(first_free(IPV4_RANGE, {r.ipv4 for r in used})),
                ipv6=str(first_free(IPV6_RANGE, {r.ipv6 for r in used})),
                endpoints="[]",
                last_seen=now,
                created=now,
            )
        )
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])

    def _node(self, conn: Connection, node_id: int) -> Node:
        row = conn.execute(sa.select(nodes).where(nodes.c.id == node_id)).one()
        return _to_node(row)

    def node_by_machine_key(self, machine_key: MachinePublic) -> Node | None:
        """The live (not deleted) node of ``machine_key``, or None."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(nodes).where(nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
            ).first()
        return None if row is None else _to_node(row)

    def update_node(
        self,
        machine_key: MachinePublic,
        *,
        now: float,
        endpoints: Sequence[str] | None = None,
        hostname: str | None = None,
    ) -> Node | None:
        """Set the endpoints and/or hostname of ``machine_key``'s live node and its last_seen; None if there
        is no such node."""
        values: dict[str, Any] = {"last_seen": now}
        if endpoints is not None:
            values["endpoints"] = json.dumps(list(endpoints))
        if hostname is not None:
            values["hostname"] = hostname
        where = (nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
        with self.engine.begin() as conn:
            conn.execute(nodes.update().where(*where).values(**values))
            row = conn.execute(sa.select(nodes).where(*where)).first()
        return None if row is None else _to_node(row)

    def list_nodes(self) -> list[Node]:
        """All live nodes, by id (``online`` False: the server knows who is online)."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(nodes).where(nodes.c.deleted.is_(None)).order_by(nodes.c.id)).all()
        return [_to_node(r) for r in rows]

    def delete_node(self, node_id: int, now: float) -> bool:
        """Remove node ``node_id`` from the tailnet (its row and addresses stay reserved for its machine key).
        True if it was live."""
        with self.engine.begin() as conn:
            res = conn.execute(
                nodes.update().where(nodes.c.id == node_id, nodes.c.deleted.is_(None)).values(deleted=now)
            )
        return bool(res.rowcount)


def first_free(net: ipaddress.IPv4Network | ipaddress.IPv6Network, used: set[str]) -> Any:
    """The lowest host address of ``net`` not in ``used`` (text forms) and not reserved (MagicDNS, the
    network and broadcast addresses). Raises ControlError when none is left."""
    for host in _hosts(net):
        if host not in RESERVED and str(host) not in used:
            return host
    raise ControlError(f"no free address left in {net}")


def _hosts(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    first = int(net.network_address) + 1
    cls: Callable[[int], Any] = type(net.network_address)
    return (cls(i) for i in range(first, int(net.broadcast_address)))


def _to_node(row: Any) -> Node:
    v4, v6 = row.ipv4, row.ipv6
    return Node(
        id=int(row.id),
        name=row.name,
        hostname=row.hostname,
        node_key=NodePublic.from_text(row.node_key),
        machine_key=MachinePublic.from_text(row.machine_key),
        addresses=(f"{v4}/32", f"{v6}/128"),
        endpoints=tuple(json.loads(row.endpoints)),
        online=False,
        last_seen=row.last_seen,
    )


def now() -> float:
    """The wall clock, unix seconds (the default clock of the server and admin commands)."""
    return time.time()


__all__ = ["MIGRATIONS", "AuthKey", "Store", "dns_label"]
