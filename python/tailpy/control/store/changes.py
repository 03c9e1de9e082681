"""The change feed, replica liveness and the per-database server key: what lets several control processes
(replicas) serve one tailnet from one database.

* ``changes (seq, kind, node_id)``: one row per write that changes what nodes see, appended by database
  triggers in the writing transaction itself (so every writer counts: a replica, ``tailpy control`` admin
  commands, a future column): ``kind`` ``"node"`` (a ``nodes`` row inserted, updated or deleted, or a
  ``node_streams`` row: the node went online or offline; ``node_id`` set), ``"routes"`` (a primary subnet
  router changed, :mod:`tailpy.control.store.primaries`: ``node_id`` the old or the new router; its record
  changes too), ``"policy"`` (``policies``),
  ``"settings"`` (domain, prefixes, DNS) or ``"users"``. ``seq`` grows with commit order, because every
  transaction holds the database's one writer lock (:mod:`tailpy.control.store.database`), so a reader that
  keeps the last ``seq`` it applied and reads ``WHERE seq > last`` misses nothing. On PostgreSQL the trigger
  also sends ``NOTIFY`` :data:`CHANNEL` (delivered at commit) to wake the replicas' ``LISTEN`` connections.
* ``replicas (id, url, started, heartbeat, derp)``: each replica's row, its ``heartbeat`` (unix seconds by
  the database's clock, :func:`db_now`) refreshed every few seconds; a replica whose heartbeat is older than
  three intervals is dead, and the first live one to notice removes it and its streams (:func:`reap`).
  ``derp``: its embedded DERP relay as a one-node region of the DERP map (JSON, Tailscale's ``DERPRegion``
  form; NULL: none), from which the replicas of one region mesh (:mod:`tailpy.control.derpmesh`).
* ``node_streams (node_id, replica_id, opened)``: which replica holds a map stream of which node. A node is
  online while it has a row on a live replica.
* ``control_keys (name, value)``: the server's machine private key (``server``), shared by every replica
  of the database so that a node's sealed requests open on any of them, and the DERP mesh key of the
  replicas' relays (``derp_mesh``, 64 hex digits; :func:`shared_mesh_key`), and the feed's id (``feed``,
  :func:`feed_id`).

These tables and triggers are created on every open when missing (idempotent DDL, like the indexes of
:mod:`tailpy.control.store.schema`): they hold no tailnet data, so they are not a schema version.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import nodes as _nodes

CHANNEL = "tailpy_changes"
"""The PostgreSQL ``NOTIFY`` channel of the change feed (payload empty)."""

KEEP = 100_000
"""Rows of the change feed kept (older ones are pruned; a replica further behind reloads every node)."""

NODE, POLICY, ROUTES, SETTINGS, USERS = "node", "policy", "routes", "settings", "users"

_meta = sa.MetaData()
changes = sa.Table(
    "changes",
    _meta,
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text),
    sa.Column("node_id", sa.Integer),
)
replicas = sa.Table(
    "replicas",
    _meta,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("url", sa.Text),
    sa.Column("started", sa.Float),
    sa.Column("heartbeat", sa.Float),
    sa.Column("derp", sa.Text),
    sa.Column("token", sa.Text),
)
node_streams = sa.Table(
    "node_streams",
    _meta,
    sa.Column("node_id", sa.Integer),
    sa.Column("replica_id", sa.Text),
    sa.Column("opened", sa.Float),
)
control_keys = sa.Table("control_keys", _meta, sa.Column("name", sa.Text), sa.Column("value", sa.Text))

# (table, kind, the column naming the node or None)
_WATCHED = (
    ("nodes", NODE, "id"),
    ("node_streams", NODE, "node_id"),
    ("policies", POLICY, None),
    ("settings", SETTINGS, None),
    ("users", USERS, None),
)

_SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
    "node_id INTEGER)",
    "CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, url TEXT NOT NULL, started REAL NOT NULL, "
    "heartbeat REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS node_streams (node_id INTEGER NOT NULL, replica_id TEXT NOT NULL, "
    "opened REAL NOT NULL, PRIMARY KEY (node_id, replica_id))",
    "CREATE TABLE IF NOT EXISTS control_keys (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ix_node_streams_replica ON node_streams (replica_id)",
)

_PG_DDL = (
    "CREATE TABLE IF NOT EXISTS changes (seq BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, node_id INTEGER)",
    "CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, url TEXT NOT NULL, "
    "started DOUBLE PRECISION NOT NULL, heartbeat DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS node_streams (node_id INTEGER NOT NULL, replica_id TEXT NOT NULL, "
    "opened DOUBLE PRECISION NOT NULL, PRIMARY KEY (node_id, replica_id))",
    "CREATE TABLE IF NOT EXISTS control_keys (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ix_node_streams_replica ON node_streams (replica_id)",
    f"""CREATE OR REPLACE FUNCTION tailpy_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  r RECORD;
  nid INTEGER;
BEGIN
  IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
  IF TG_TABLE_NAME = 'nodes' THEN nid := r.id;
  ELSIF TG_TABLE_NAME = 'node_streams' THEN nid := r.node_id;
  END IF;
  INSERT INTO changes (kind, node_id) VALUES (TG_ARGV[0], nid);
  PERFORM pg_notify('{CHANNEL}', '');
  RETURN NULL;
END $$""",
)


def _sqlite_triggers() -> list[str]:
    out = []
    for table, kind, col in _WATCHED:
        for op, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")):
            node = f"{row}.{col}" if col else "NULL"
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS tailpy_{table}_{op.lower()} AFTER {op} ON {table} "
                f"BEGIN INSERT INTO changes (kind, node_id) VALUES ('{kind}', {node}); END"
            )
    return out


def _pg_triggers() -> list[str]:
    return [
        f"CREATE OR REPLACE TRIGGER tailpy_{table}_change AFTER INSERT OR UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION tailpy_change('{kind}')"
        for table, kind, _ in _WATCHED
    ]


def install(conn: Connection) -> None:
    """Create the feed, liveness and key tables and the triggers when missing (SQLite or PostgreSQL, in the
    caller's transaction, after the migrations)."""
    pg = conn.dialect.name == "postgresql"
    ddl = (*_PG_DDL, *_pg_triggers()) if pg else (*_SQLITE_DDL, *_sqlite_triggers())
    for stmt in ddl:
        conn.exec_driver_sql(stmt)
    # (a replicas table made before the relay or the process token column)
    have = None if pg else {c["name"] for c in sa.inspect(conn).get_columns("replicas")}
    for column in ("derp", "token"):
        if pg:
            conn.exec_driver_sql(f"ALTER TABLE replicas ADD COLUMN IF NOT EXISTS {column} TEXT")
        elif have is not None and column not in have:
            conn.exec_driver_sql(f"ALTER TABLE replicas ADD COLUMN {column} TEXT")


# --- the feed -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """What the feed holds after a sequence number: ``seq`` the last one read (unchanged when nothing new),
    ``nodes`` the ids of nodes changed, ``kinds`` the other kinds seen (``"policy"``, ...), ``lost`` True
    when the feed was pruned past the reader's position (reload everything)."""

    seq: int
    nodes: frozenset[int]
    kinds: frozenset[str]
    lost: bool = False


def last_seq(conn: Connection) -> int:
    """The newest sequence number of the feed (0: empty)."""
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(changes.c.seq), 0))).scalar() or 0)


def read_since(conn: Connection, seq: int, limit: int = 50_000) -> Batch:
    """The changes after ``seq`` (at most ``limit`` rows: the next read continues from the returned
    ``seq``); ``lost`` when rows after ``seq`` were pruned."""
    rows = conn.execute(
        sa.select(changes.c.seq, changes.c.kind, changes.c.node_id)
        .where(changes.c.seq > seq)
        .order_by(changes.c.seq)
        .limit(limit)
    ).all()
    if not rows:
        return Batch(seq, frozenset(), frozenset())
    pruned = conn.execute(sa.select(control_keys.c.value).where(control_keys.c.name == "pruned")).first()
    lost = pruned is not None and seq < int(pruned.value)
    nodes = frozenset(int(r.node_id) for r in rows if r.kind in (NODE, ROUTES) and r.node_id is not None)
    kinds = frozenset(str(r.kind) for r in rows if r.kind != NODE)
    return Batch(int(rows[-1].seq), nodes, kinds, lost)


def prune(conn: Connection, keep: int = KEEP) -> int:
    """Delete all but the newest ``keep`` rows of the feed; returns how many went."""
    top = last_seq(conn)
    res = conn.execute(changes.delete().where(changes.c.seq <= top - keep))
    if res.rowcount:
        _put_key(conn, "pruned", str(top - keep))
    return int(res.rowcount or 0)


# --- liveness -----------------------------------------------------------------------------------------------


def db_now(conn: Connection) -> float:
    """Unix seconds by the database's clock (PostgreSQL's ``clock_timestamp()``; SQLite, a file on this host:
    this host's clock), so that heartbeats of replicas on hosts whose clocks differ compare."""
    if conn.dialect.name == "postgresql":
        return float(conn.exec_driver_sql("SELECT EXTRACT(EPOCH FROM clock_timestamp())").scalar_one())
    return time.time()


def heartbeat(
    conn: Connection,
    replica_id: str,
    url: str,
    now: float,
    *,
    started: float,
    derp: str | None = None,
    token: str | None = None,
) -> bool:
    """Insert or refresh replica ``replica_id``'s row (``url``: where nodes reach it; ``derp``: its relay's
    region JSON, None: no relay; ``token``: the process's own token, None: any). Returns False, changing
    nothing, when the row is held by a process with another token (two processes given one replica id)."""
    values = {"url": url, "heartbeat": now, "derp": derp}
    mine = replicas.c.id == replica_id
    if token is not None:
        mine = mine & ((replicas.c.token == token) | replicas.c.token.is_(None))
    res = conn.execute(replicas.update().where(mine).values(**values, token=token))
    if not res.rowcount:
        if conn.execute(sa.select(replicas.c.id).where(replicas.c.id == replica_id)).first() is not None:
            return False
        conn.execute(replicas.insert().values(id=replica_id, started=started, token=token, **values))
    return True


def holder(conn: Connection, replica_id: str) -> tuple[str | None, float] | None:
    """(process token, heartbeat in unix seconds) of replica ``replica_id``'s row; None: no row."""
    row = conn.execute(
        sa.select(replicas.c.token, replicas.c.heartbeat).where(replicas.c.id == replica_id)
    ).first()
    return None if row is None else (row.token, float(row.heartbeat or 0.0))


def alive(conn: Connection, now: float, stale: float) -> dict[str, str]:
    """Replica id -> advertised URL of every replica whose heartbeat is younger than ``stale`` seconds."""
    rows = conn.execute(sa.select(replicas.c.id, replicas.c.url).where(replicas.c.heartbeat > now - stale))
    return {str(r.id): str(r.url) for r in rows}


def relays(conn: Connection, now: float, stale: float) -> dict[str, str]:
    """Replica id -> recorded relay (region JSON, :func:`heartbeat`) of every live replica that has one."""
    rows = conn.execute(
        sa.select(replicas.c.id, replicas.c.derp).where(
            replicas.c.heartbeat > now - stale, replicas.c.derp.is_not(None)
        )
    )
    return {str(r.id): str(r.derp) for r in rows}


def reap(conn: Connection, now: float, stale: float) -> list[str]:
    """Remove the replicas whose heartbeat is ``stale`` seconds old or older, and their streams (each stream
    row deleted is a change of its node: it is offline unless it streams elsewhere). Their nodes' last seen
    becomes the dead replica's last heartbeat where it was older (the stream's opening), so that an
    ephemeral node's offline time counts from then. Returns their ids."""
    rows = conn.execute(
        sa.select(replicas.c.id, replicas.c.heartbeat).where(replicas.c.heartbeat <= now - stale)
    ).all()
    dead = [str(r.id) for r in rows]
    for r in rows:  # (its nodes were last seen when it last beat, not when their streams opened)
        held = sa.select(node_streams.c.node_id).where(node_streams.c.replica_id == r.id)
        conn.execute(
            _nodes.update()
            .where(
                _nodes.c.id.in_(held),
                sa.or_(_nodes.c.last_seen.is_(None), _nodes.c.last_seen < r.heartbeat),
            )
            .values(last_seen=r.heartbeat)
        )
    if dead:
        conn.execute(node_streams.delete().where(node_streams.c.replica_id.in_(dead)))
        conn.execute(replicas.delete().where(replicas.c.id.in_(dead)))
    return dead


def leave(conn: Connection, replica_id: str) -> None:
    """Replica ``replica_id`` stops: its streams and its row go."""
    conn.execute(node_streams.delete().where(node_streams.c.replica_id == replica_id))
    conn.execute(replicas.delete().where(replicas.c.id == replica_id))


def stream_opened(conn: Connection, node_id: int, replica_id: str, now: float) -> None:
    """:func:`streams_opened` for one node."""
    streams_opened(conn, (node_id,), replica_id, now)


def streams_opened(conn: Connection, node_ids: Iterable[int], replica_id: str, now: float) -> None:
    """Record that ``replica_id`` holds a map stream of each of ``node_ids`` (idempotent: one query for the
    rows there are, one insert of the others)."""
    ids = sorted(set(node_ids))
    have: set[int] = set()
    for i in range(0, len(ids), 500):
        q = sa.select(node_streams.c.node_id).where(
            node_streams.c.replica_id == replica_id, node_streams.c.node_id.in_(ids[i : i + 500])
        )
        have.update(int(r.node_id) for r in conn.execute(q))
    rows = [{"node_id": i, "replica_id": replica_id, "opened": now} for i in ids if i not in have]
    if rows:
        conn.execute(node_streams.insert(), rows)


def stream_closed(conn: Connection, node_id: int, replica_id: str) -> None:
    """``replica_id`` holds no map stream of ``node_id`` any more."""
    mine = (node_streams.c.node_id == node_id, node_streams.c.replica_id == replica_id)
    conn.execute(node_streams.delete().where(*mine))


def streaming_elsewhere(
    conn: Connection, node_ids: Iterable[int] | None, replica_id: str, live: Sequence[str]
) -> dict[int, str]:
    """Node id -> replica for the nodes (of ``node_ids``; None: all) with a stream on a live replica other
    than ``replica_id`` (``live``: the live replicas' ids)."""
    others = [r for r in live if r != replica_id]
    if not others:
        return {}
    q = sa.select(node_streams.c.node_id, node_streams.c.replica_id).where(
        node_streams.c.replica_id.in_(others)
    )
    out: dict[int, str] = {}
    if node_ids is None:
        for r in conn.execute(q):
            out[int(r.node_id)] = str(r.replica_id)
        return out
    ids = sorted(set(node_ids))
    for i in range(0, len(ids), 500):
        for r in conn.execute(q.where(node_streams.c.node_id.in_(ids[i : i + 500]))):
            out[int(r.node_id)] = str(r.replica_id)
    return out


# --- the server key -----------------------------------------------------------------------------------------


def _put_key(conn: Connection, name: str, value: str) -> None:
    conn.execute(control_keys.delete().where(control_keys.c.name == name))
    conn.execute(control_keys.insert().values(name=name, value=value))


def shared_key(conn: Connection, fallback: str) -> str:
    """The database's server key (``privkey:<hex>``); a database that has none takes ``fallback`` (the
    first replica's key file), so the first replica's key becomes every replica's."""
    row = conn.execute(sa.select(control_keys.c.value).where(control_keys.c.name == "server")).first()
    if row is not None:
        return str(row.value)
    _put_key(conn, "server", fallback)
    return fallback


def feed_id(conn: Connection) -> str:
    """The database's change feed id (16 hex digits, made by the first replica that asks): names the feed in
    the resume points of map streams (:mod:`tailpy.control.mapper`), so that a stream resumes on another
    replica only when both read the same feed (not a database made anew, whose sequence numbers mean other
    changes). A database restored from a backup keeps its id: a node holding a point past the restored
    feed gets a full netmap until the feed passes that point again."""
    row = conn.execute(sa.select(control_keys.c.value).where(control_keys.c.name == "feed")).first()
    if row is not None:
        return str(row.value)
    value = secrets.token_hex(8)
    _put_key(conn, "feed", value)
    return value


def shared_mesh_key(conn: Connection, given: str | None = None) -> str:
    """The database's DERP mesh key (64 hex digits, derper's ``--mesh-psk-file`` form), made by the first
    replica that asks (``given``, its ``--mesh-psk-file`` key, else random): the embedded relays of every
    replica of the database share it. A database that has one keeps it (the caller compares)."""
    row = conn.execute(sa.select(control_keys.c.value).where(control_keys.c.name == "derp_mesh")).first()
    if row is not None:
        return str(row.value)
    key = given if given is not None else secrets.token_hex(32)
    _put_key(conn, "derp_mesh", key)
    return key


__all__ = [
    "CHANNEL",
    "KEEP",
    "NODE",
    "POLICY",
    "ROUTES",
    "SETTINGS",
    "USERS",
    "Batch",
    "alive",
    "db_now",
    "feed_id",
    "heartbeat",
    "install",
    "last_seq",
    "leave",
    "prune",
    "read_since",
    "reap",
    "relays",
    "shared_key",
    "shared_mesh_key",
    "stream_closed",
    "stream_opened",
    "streaming_elsewhere",
    "streams_opened",
]
