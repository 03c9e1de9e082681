"""Primary subnet routers kept in the database (SQLite here; PostgreSQL in the replica integration tests):
the compare-and-set settlement, eligibility as the database has it (served, key valid, streaming on a live
replica), the change feed rows of a change, and :class:`StoredPrimaries` deciding through the table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.public
import pytest
import sqlalchemy as sa

from tailpy.control import Store
from tailpy.control.primaries import StoredPrimaries
from tailpy.control.store import changes, primaries
from tailpy.keys import MachinePrivate, NodePublic

LAN = "198.51.100.0/24"
LAN6 = "2001:db8:1::/64"
STALE = 6.0


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def router(store: Store, name: str, routes: tuple[str, ...] = (LAN,), *, approve: bool = True) -> int:
    """A registered node advertising ``routes`` (approved unless told otherwise); returns its id."""
    key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    machine = mkey()
    node = store.register(machine.public, nkey(), name, key, time.time())
    store.update_node(machine.public, now=time.time(), routable_ips=routes)
    if approve:
        store.approve_routes(node.id, routes, time.time())
    return node.id


def settle(store: Store, eligible: dict[str, set[int]] | None = None, **kw: Any) -> dict[str, int | None]:
    with store.engine.begin() as conn:
        return primaries.settle(
            conn, kw.get("prefixes"), kw.get("now", time.time()), stale=STALE, eligible=eligible
        )


def stored(store: Store) -> dict[str, int]:
    with store.engine.begin() as conn:
        return primaries.read_all(conn)


def feed_after(store: Store, seq: int) -> list[tuple[str, int]]:
    with store.engine.begin() as conn:
        rows = conn.execute(
            sa.select(changes.changes.c.kind, changes.changes.c.node_id).where(changes.changes.c.seq > seq)
        )
        return [(str(r.kind), int(r.node_id)) for r in rows]


def last_seq(store: Store) -> int:
    with store.engine.begin() as conn:
        return changes.last_seq(conn)


def test_settle_is_sticky_lowest_otherwise_and_deletes_when_nobody(store: Store) -> None:
    assert settle(store, {LAN: {7}}) == {LAN: 7}
    assert settle(store, {LAN: {3, 7}}) == {LAN: 7}  # the stored primary stays while eligible
    seq = last_seq(store)
    assert settle(store, {LAN: {3, 5}}) == {LAN: 3}
    assert stored(store) == {LAN: 3}
    assert sorted(feed_after(store, seq)) == [("routes", 3), ("routes", 7)]  # old and new router
    seq = last_seq(store)
    assert settle(store, {LAN: {3, 5}}) == {LAN: 3}
    assert feed_after(store, seq) == []  # no change, no row
    assert settle(store, {LAN: set()}) == {LAN: None}
    assert stored(store) == {}
    assert feed_after(store, seq) == [("routes", 3)]


def test_feed_names_routers_of_a_primary_change(store: Store) -> None:
    seq = last_seq(store)
    settle(store, {LAN: {4}})
    with store.engine.begin() as conn:
        batch = changes.read_since(conn, seq)
    assert batch.nodes == {4} and changes.ROUTES in batch.kinds


def test_eligibility_from_the_database(store: Store) -> None:
    r1 = router(store, "r1", (LAN, LAN6))
    r2 = router(store, "r2")
    r3 = router(store, "r3", approve=False)  # advertised, not approved: serves nothing
    now = time.time()
    with store.engine.begin() as conn:
        db_now = changes.db_now(conn)
        changes.heartbeat(conn, "live", "", db_now, started=db_now)
        changes.heartbeat(conn, "dead", "", db_now - 100, started=db_now - 100)
        changes.stream_opened(conn, r2, "live", now)
        changes.stream_opened(conn, r3, "live", now)
        changes.stream_opened(conn, r1, "dead", now)  # (a dead replica's stream: offline)
        assert primaries.eligible_routers(conn, now, STALE) == {LAN: {r2}}
        changes.stream_opened(conn, r1, "live", now)
        assert primaries.eligible_routers(conn, now, STALE) == {LAN: {r1, r2}, LAN6: {r1}}
    assert settle(store) == {LAN: r1, LAN6: r1}
    store.expire_node(r1, time.time())  # an expired key is not eligible
    assert settle(store, prefixes=[LAN]) == {LAN: r2}
    assert settle(store) == {LAN: r2, LAN6: None}
    assert stored(store) == {LAN: r2}


class _Down:
    """An engine whose database cannot be reached."""

    def begin(self) -> Any:
        raise sa.exc.OperationalError("BEGIN", {}, Exception("database is down"))


def test_stored_primaries_decide_through_the_table(tmp_path: Path, store: Store) -> None:
    local = StoredPrimaries(store.engine, shared=False, clock=time.time, stale=lambda: STALE)
    assert local.update(1, [LAN]) == {1}
    assert local.update(2, [LAN]) == set()
    assert stored(store) == {LAN: 1}
    # another process's view, started later: it shows the table's primary, not its own history's
    other = StoredPrimaries(store.engine, shared=False, clock=time.time, stale=lambda: STALE)
    assert other.primary_of(LAN) == 1
    assert local.update(1, []) == {1, 2}
    assert stored(store) == {LAN: 2} and local.primary_of(LAN) == 2
    assert other.sync(stored(store)) == {1, 2} and other.primary_of(LAN) == 2
    assert local.update(1, [LAN]) == set()  # back: takes nothing back
    assert local.remove(1) == set() and local.remove(2) == {2}
    assert stored(store) == {} and local.primaries() == {}


def test_stored_primaries_fall_back_to_the_local_view(store: Store) -> None:
    p = StoredPrimaries(store.engine, shared=False, clock=time.time, stale=lambda: STALE)
    p.update(1, [LAN])
    p.update(2, [LAN])
    p.engine = _Down()  # type: ignore[assignment]
    assert p.update(1, []) == {1, 2}  # an offline router never keeps serving
    assert p.primary_of(LAN) == 2
    p.engine = store.engine
    assert p.sync(stored(store)) == set()  # the table still says 1: settled again, it says 2
    assert stored(store) == {LAN: 2} and p.primary_of(LAN) == 2
