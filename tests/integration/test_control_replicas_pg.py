"""Control replicas in this process on one PostgreSQL database (started here, removed afterwards): one
server key, changes made on one replica reach the streams of the other, online state across replicas, a
replica that stops (its nodes go offline on the other, then move to it), concurrent registrations."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from _replicas import (
    Follower,
    Replica,
    empty_database,
    join,
    mkey,
    nkey,
    peer_named,
    peer_online,
)
from _replicas import pg_url as pg_url

from tailpy.control import Store
from tailpy.control.replicas import ReplicaConflict
from tailpy.control.store import changes
from tailpy.netmap import NetMap

log = logging.getLogger(__name__)

POLICY_SSH_ONLY = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}'


@pytest.fixture
async def pair(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Replica, Replica]]:
    empty_database(pg_url)
    a = Replica("a", tmp_path / "a", pg_url)
    b = Replica("b", tmp_path / "b", pg_url)
    await a.start()
    await b.start()
    yield a, b
    for r in (a, b):
        await r.stop()


def policy_applied(nm: NetMap) -> bool:
    """The netmap's filter came from a policy (not the allow-all part of a tailnet without one)."""
    return nm.packet_filters is not None and "allow-all" not in nm.packet_filters


async def test_replicas_share_key_changes_and_online_state(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    assert a.server.public_key == b.server.public_key  # (separate state dirs: the database's key)
    followers: list[Follower] = []
    try:
        fa = await join(a.store, "alpha", a.url, followers)
        fb = await join(b.store, "beta", b.url, followers)
        assert fa.netmap is not None and fb.netmap is not None
        ida, idb = fa.netmap.self_node.id, fb.netmap.self_node.id
        # each sees the other, online, though it streams from the other replica
        await fa.until(lambda nm: peer_online(nm, idb))
        await fb.until(lambda nm: peer_online(nm, ida))
        assert a.server.replicas.alive().keys() == {"a", "b"}
        assert a.server.replicas.online(idb) and b.server.replicas.online(ida)

        # an admin rename on a reaches b's stream
        a.store.rename_node(ida, "alpha-renamed")
        a.server.admin_changed(ida)
        took = await fb.until(lambda nm: peer_named(nm, "alpha-renamed"))
        log.info("rename on replica a reached a stream on replica b in %.3f s", took)

        # a new node on b reaches a's stream
        fc = await join(b.store, "gamma", b.url, followers)
        assert fc.netmap is not None
        idc = fc.netmap.self_node.id
        took = await fa.until(lambda nm: peer_online(nm, idc))
        log.info("new node on replica b reached a stream on replica a in %.3f s", took)

        # a policy stored through a reaches the filters of b's nodes
        a.store.add_policy(POLICY_SSH_ONLY, "admin", time.time())
        took = await fb.until(policy_applied)
        log.info("policy set on replica a reached a stream on replica b in %.3f s", took)
        assert b.server.policy.policy is not None

        # a stream that ends on b: offline on a
        await fc.stop()
        followers.remove(fc)
        await fa.until(lambda nm: peer_online(nm, idc, False))
    finally:
        for f in followers:
            await f.stop()


async def test_stopped_replica_nodes_move_and_keep_addresses(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    followers: list[Follower] = []
    try:
        fa = await join(a.store, "alpha", f"{a.url},{b.url}", followers)
        fb = await join(b.store, "beta", f"{b.url},{a.url}", followers)
        assert fa.netmap is not None and fb.netmap is not None
        me = fa.netmap.self_node
        await fb.until(lambda nm: peer_online(nm, me.id))
        await a.server.stop()  # (graceful: its stream rows go at once)
        t0 = time.monotonic()
        await fa.until(lambda nm: fa.url == b.url and nm.self_node.id == me.id)
        log.info("node of a stopped replica streams from the other after %.2f s", time.monotonic() - t0)
        assert fa.netmap.self_node.addresses == me.addresses
        await fb.until(lambda nm: peer_online(nm, me.id))
        assert b.server.replicas.online(me.id)
    finally:
        for f in followers:
            await f.stop()


async def test_dead_replica_is_reaped(pair: tuple[Replica, Replica]) -> None:
    """A replica that stops beating without leaving (as after SIGKILL): the other marks its nodes offline
    after three heartbeats."""
    a, b = pair
    followers: list[Follower] = []
    try:
        fb = await join(b.store, "beta", b.url, followers)
        fa = await join(a.store, "alpha", a.url, followers)
        assert fa.netmap is not None
        ida = fa.netmap.self_node.id
        await fb.until(lambda nm: peer_online(nm, ida))
        # a freezes: no heartbeat, no leave, its stream rows stay
        for t in a.server.replicas._tasks:
            t.cancel()
        a.server.replicas.liveness = False  # (its stop() neither leaves nor records streams)
        took = await fb.until(lambda nm: peer_online(nm, ida, False), timeout=10)
        log.info("node of a frozen replica offline on the other after %.2f s", took)
        assert "a" not in b.server.replicas.alive()
    finally:
        for f in followers:
            await f.stop()


def test_concurrent_registrations_never_share_address_or_name(pg_url: str, tmp_path: Path) -> None:
    """Threads registering through two stores (two replicas' connections) at once, all with one hostname:
    distinct addresses, distinct names."""
    empty_database(pg_url)
    stores = []
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
        stores.append(Store(tmp_path / f"s{i}", db=pg_url))
    key = stores[0].create_auth_key(reusable=True, expires=None, now=time.time()).key
    out: list[tuple[int, str, str | None, str | None]] = []
    errors: list[BaseException] = []

    def worker(store: Store) -> None:
        try:
            for _ in range(15):
                n = store.register(mkey().public, nkey(), "box", key, time.time())
                out.append((n.id, n.name, n.ipv4, n.ipv6))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(stores[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors
    assert len(out) == 90
    for col in range(4):
        assert len({row[col] for row in out}) == 90


def test_feed_records_every_kind(pg_url: str, tmp_path: Path) -> None:
    empty_database(pg_url)
    store = Store(tmp_path, db=pg_url)
    try:
        with store.engine.begin() as conn:
            start = changes.last_seq(conn)
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
        node = store.register(mkey().public, nkey(), "alpha", key, time.time())
        store.add_policy(POLICY_SSH_ONLY, "admin", time.time())
        store.configure(domain="example.internal")
        store.create_user("bob", time.time())
        with store.engine.begin() as conn:
            batch = changes.read_since(conn, start)
        assert node.id in batch.nodes
        assert {"policy", "settings", "users"} <= batch.kinds
        assert not batch.lost
    finally:
        store.close()


async def test_listen_wakes_feed_quickly(pair: tuple[Replica, Replica]) -> None:
    """A write by another process (here: a store that is no replica, as `tailpy control nodes rename
    --db ...` is) reaches the replicas' streams through NOTIFY."""
    a, b = pair
    followers: list[Follower] = []
    try:
        fa = await join(a.store, "alpha", a.url, followers)
        assert fa.netmap is not None
        ida = fa.netmap.self_node.id
        fb = await join(b.store, "beta", b.url, followers)
        await fb.until(lambda nm: peer_online(nm, ida))
        admin = Store(a.store.state_dir, db=a.store.url)
        try:
            admin.rename_node(ida, "renamed-outside")
        finally:
            admin.close()
        await asyncio.gather(
            fa.until(lambda nm: nm.self_node.name == "renamed-outside"),
            fb.until(lambda nm: peer_named(nm, "renamed-outside")),
        )
    finally:
        for f in followers:
            await f.stop()


def _cut_from_database(replica: Replica) -> Callable[[], None]:
    """Make ``replica``'s heartbeats fail as when it cannot reach the database (its other queries still
    work); returns the function that mends it."""
    r = replica.server.replicas
    beat = r._beat_db

    def failing(*_args: object) -> tuple[list[str], dict[str, str] | None]:
        raise sa.exc.OperationalError("SELECT 1", {}, OSError("connection refused (simulated)"))

    r._beat_db = failing  # type: ignore[method-assign,assignment]

    def mend() -> None:
        r._beat_db = beat  # type: ignore[method-assign]

    return mend


async def test_replica_cut_from_database_ends_its_streams(pair: tuple[Replica, Replica]) -> None:
    """A replica whose heartbeats fail (cut from the database, streams still open) ends its map streams
    after the stale window: its nodes move to the other replica instead of being shown offline there."""
    a, b = pair
    followers: list[Follower] = []
    try:
        fa = await join(a.store, "alpha", f"{a.url},{b.url}", followers)
        fb = await join(b.store, "beta", b.url, followers)
        assert fa.netmap is not None and fa.url == a.url
        ida = fa.netmap.self_node.id
        await fb.until(lambda nm: peer_online(nm, ida))
        maps = fa.maps
        _cut_from_database(a)
        t0 = time.monotonic()
        await fa.until(lambda _nm: fa.url == b.url and fa.maps > maps, timeout=15)
        log.info(
            "node of a replica cut from the database streams from the other after %.2f s",
            time.monotonic() - t0,
        )
        assert a.server.replicas.severed
        await fb.until(lambda nm: peer_online(nm, ida))
        assert not a.server.streaming()
    finally:
        for f in followers:
            await f.stop()


async def test_replica_back_from_outage_reaps_nobody(
    pair: tuple[Replica, Replica], caplog: pytest.LogCaptureFixture
) -> None:
    """After a database outage longer than the stale window, the first replica back does not take the
    others for dead (their heartbeats are old only because of the outage): it judges only after beating
    for a whole window itself. The failing heartbeats are logged once per outage, not once per beat."""
    caplog.set_level(logging.INFO, "tailpy.control")
    a, b = pair
    ra, rb = a.server.replicas, b.server.replicas
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not ("b" in ra.alive() and "a" in rb.alive()) and loop.time() < end:
        await asyncio.sleep(0.05)
    mend_a, mend_b = _cut_from_database(a), _cut_from_database(b)
    await asyncio.sleep(ra.stale_window * 2)  # (both rows are older than the window now)
    mend_a()
    end = loop.time() + ra.heartbeat_interval * 1.5
    reaped: set[str] = set()
    while loop.time() < end:  # a beats again; b not yet (it comes back a heartbeat later)
        reaped |= {"b"} - set(ra.alive())
        await asyncio.sleep(0.05)
    mend_b()
    end = loop.time() + ra.stale_window * 2
    while loop.time() < end:
        reaped |= {"b"} - set(ra.alive())
        reaped |= {"a"} - set(rb.alive())
        await asyncio.sleep(0.05)
    assert not reaped
    for name in ("a", "b"):
        assert caplog.text.count(f"replica {name}: heartbeat failed") == 1
        assert caplog.text.count(f"replica {name}: heartbeat succeeded again") == 1
    with a.store.engine.begin() as conn:
        rows = {r.id for r in conn.execute(sa.select(changes.replicas.c.id))}
    assert rows == {"a", "b"}


async def test_second_process_with_one_replica_id_is_refused(
    pair: tuple[Replica, Replica], tmp_path: Path
) -> None:
    """A second process started with a replica id that a live process holds is refused with one sentence;
    a process whose row another process took over stops (``on_fatal``)."""
    a, _b = pair
    twin = Replica("a", tmp_path / "twin", a.store.url)
    with pytest.raises(ReplicaConflict, match="another control process is running as replica 'a'"):
        await twin.start()
    await twin.stop()
    assert "a" in a.server.replicas.alive()

    fatal: list[str] = []
    a.server.replicas.on_fatal = fatal.append
    with a.store.engine.begin() as conn:  # (what a second process of this id, started meanwhile, writes)
        conn.execute(changes.replicas.update().where(changes.replicas.c.id == "a").values(token="other"))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not fatal and loop.time() < end:
        await asyncio.sleep(0.05)
    assert fatal and "another process took over this replica id" in fatal[0]
    assert a.server.replicas.severed


async def test_replica_restarted_at_once_takes_its_id_back(pg_url: str, tmp_path: Path) -> None:
    """A process of a replica id killed just now (its row still fresh, no longer beating) does not keep
    its successor from starting."""
    empty_database(pg_url)
    a = Replica("a", tmp_path / "a", pg_url)
    await a.start()
    for t in a.server.replicas._tasks:  # (killed: no more heartbeats, no leave)
        t.cancel()
    a.server.replicas.liveness = False
    await a.stop()
    again = Replica("a", tmp_path / "again", pg_url)
    await again.start()
    try:
        assert "a" in again.server.replicas.alive()
    finally:
        await again.stop()
