"""The primary router of each subnet prefix, kept in the database so that every control replica of it shows
the same one.

* ``route_primaries (prefix, node_id, since)``: one row per subnet prefix (canonical CIDR text) that has a
  primary router: ``node_id`` the router, ``since`` unix seconds by the database's clock
  (:func:`tailpy.control.store.changes.db_now`) when it became primary. No row: nobody serves the prefix.
* Every insert, update or delete of a row appends a ``"routes"`` row to the change feed
  (:mod:`tailpy.control.store.changes`) for the old and the new router, in the writing transaction (and, on
  PostgreSQL, ``NOTIFY``), so every replica republishes both routers' records.

:func:`settle` is the compare-and-set: in one transaction (which holds the database's writer lock, see
:mod:`tailpy.control.store.database`, so settlements of all replicas are serialised) it reads the stored
primary, works out which routers are eligible, asks :func:`tailpy.control.routes.choose_primary` (the stored
primary stays while it is eligible, else the lowest eligible id, else none) and writes the outcome. Eligible
routers come from the database itself (a live node that serves the prefix, whose key is valid, with a
``node_streams`` row on a live replica) or, for a single process that keeps no stream rows, from the
caller's own view.

Like the change feed, the table and its triggers are created on every open when missing: they hold no
tailnet data (a lost row is settled again), so they are not a schema version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.routes import choose_primary, node_served
from tailpy.control.store import changes, schema
from tailpy.control.store import nodes as node_repo
from tailpy.routes import is_exit_route

ROUTES = "routes"
"""The change feed's kind of a ``route_primaries`` row change (``node_id``: the old or the new router)."""

_meta = sa.MetaData()
route_primaries = sa.Table(
    "route_primaries",
    _meta,
    sa.Column("prefix", sa.Text, primary_key=True),
    sa.Column("node_id", sa.Integer),
    sa.Column("since", sa.Float),
)

_SQLITE_DDL = (
    "CREATE TABLE IF NOT EXISTS route_primaries (prefix TEXT PRIMARY KEY, node_id INTEGER NOT NULL, "
    "since REAL NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS tailpy_route_primaries_insert AFTER INSERT ON route_primaries "
    f"BEGIN INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', NEW.node_id); END",
    "CREATE TRIGGER IF NOT EXISTS tailpy_route_primaries_update AFTER UPDATE ON route_primaries "
    f"BEGIN INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', OLD.node_id); "
    f"INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', NEW.node_id); END",
    "CREATE TRIGGER IF NOT EXISTS tailpy_route_primaries_delete AFTER DELETE ON route_primaries "
    f"BEGIN INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', OLD.node_id); END",
)

_PG_DDL = (
    "CREATE TABLE IF NOT EXISTS route_primaries (prefix TEXT PRIMARY KEY, node_id INTEGER NOT NULL, "
    "since DOUBLE PRECISION NOT NULL)",
    f"""CREATE OR REPLACE FUNCTION tailpy_route_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', OLD.node_id);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO changes (kind, node_id) VALUES ('{ROUTES}', NEW.node_id);
  END IF;
  PERFORM pg_notify('{changes.CHANNEL}', '');
  RETURN NULL;
END $$""",
    "CREATE OR REPLACE TRIGGER tailpy_route_primaries_change AFTER INSERT OR UPDATE OR DELETE "
    "ON route_primaries FOR EACH ROW EXECUTE FUNCTION tailpy_route_change()",
)


def install(conn: Connection) -> None:
    """Create the table and its triggers when missing (after :func:`tailpy.control.store.changes.install`,
    whose ``changes`` table the triggers write)."""
    for stmt in _PG_DDL if conn.dialect.name == "postgresql" else _SQLITE_DDL:
        conn.exec_driver_sql(stmt)


def read_all(conn: Connection) -> dict[str, int]:
    """prefix -> primary router, every row."""
    rows = conn.execute(sa.select(route_primaries.c.prefix, route_primaries.c.node_id))
    return {str(r.prefix): int(r.node_id) for r in rows}


def eligible_routers(conn: Connection, now: float, stale: float) -> dict[str, set[int]]:
    """Subnet prefix -> the ids of the routers eligible for it, as the database has them: live nodes that
    serve the prefix (advertised and approved), whose key is valid at ``now`` (unix seconds) and not logged
    out, with a map stream on a replica whose heartbeat is younger than ``stale`` seconds (by the database's
    clock). O(routers) rows read."""
    nodes = schema.nodes
    q = node_repo.query().where(nodes.c.deleted.is_(None), nodes.c.routable_ips != "[]")
    cands = {}
    for r in conn.execute(q):
        n = node_repo.to_node(r, now)
        served = [p for p in node_served(n) if not is_exit_route(p)]
        if served and not n.expired:
            cands[n.id] = served
    if not cands:
        return {}
    db_now = changes.db_now(conn)
    ns, reps = changes.node_streams, changes.replicas
    online: set[int] = set()
    ids = sorted(cands)
    for i in range(0, len(ids), 500):
        q2 = (
            sa.select(ns.c.node_id)
            .select_from(ns.join(reps, reps.c.id == ns.c.replica_id))
            .where(reps.c.heartbeat > db_now - stale, ns.c.node_id.in_(ids[i : i + 500]))
        )
        online.update(int(r.node_id) for r in conn.execute(q2))
    out: dict[str, set[int]] = {}
    for node_id in online:
        for p in cands[node_id]:
            out.setdefault(p, set()).add(node_id)
    return out


def settle(
    conn: Connection,
    prefixes: Iterable[str] | None,
    now: float,
    *,
    stale: float,
    eligible: Mapping[str, Iterable[int]] | None = None,
) -> dict[str, int | None]:
    """Re-run the election of each of ``prefixes`` (None: every prefix with a row or an eligible router)
    against the stored primaries and store the outcome (insert, update, or delete when nobody is
    eligible); returns prefix -> primary (None: nobody) for each. ``eligible``: prefix -> eligible router
    ids as the caller knows them (a single process without stream rows); None: from the database
    (:func:`eligible_routers` with ``now`` and ``stale``). Run it in its own transaction: the writer lock
    makes it a compare-and-set against every other replica's."""
    stored = read_all(conn)
    routers = (
        eligible_routers(conn, now, stale) if eligible is None else {p: set(v) for p, v in eligible.items()}
    )
    todo = sorted(set(stored) | set(routers)) if prefixes is None else sorted(set(prefixes))
    out: dict[str, int | None] = {}
    since: float | None = None
    t = route_primaries
    for p in todo:
        cur = stored.get(p)
        new = choose_primary(cur, routers.get(p, ()))
        out[p] = new
        if new == cur:
            continue
        if since is None:
            since = changes.db_now(conn)
        if new is None:
            conn.execute(t.delete().where(t.c.prefix == p))
        elif cur is None:
            conn.execute(t.insert().values(prefix=p, node_id=new, since=since))
        else:
            conn.execute(t.update().where(t.c.prefix == p).values(node_id=new, since=since))
    return out


__all__ = ["ROUTES", "eligible_routers", "install", "read_all", "route_primaries", "settle"]
