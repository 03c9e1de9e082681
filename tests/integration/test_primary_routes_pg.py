"""Primary subnet routers across control replicas on one PostgreSQL database (started here, removed
afterwards): routers streaming on different replicas, in different orders, and a replica started later all
show the same primary on every replica's streams; when the primary's stream closes or its replica dies
every replica's streams move to the standby; the primary that returns takes nothing back; with both routers
gone nobody serves the prefix anywhere."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from _replicas import Follower, Replica, empty_database, mkey, nkey, peer_online
from _replicas import pg_url as pg_url

from tailpy.control import ControlClient
from tailpy.control.store import primaries
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.netmap import NetMap

log = logging.getLogger(__name__)

LAN = "198.51.100.0/24"


@pytest.fixture
async def trio(pg_url: str, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    empty_database(pg_url)
    rs = [Replica(name, tmp_path / name, pg_url) for name in ("a", "b", "c")]
    try:
        for r in rs[:2]:  # (c starts later in the tests: a replica with no history)
            await r.start()
        yield rs
    finally:
        for r in rs:
            if r.server.addresses:
                await r.server.stop()
            r.store.close()


class Tailnet:
    """Nodes registered through the replicas' database, each followed on the replica URLs given."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.followers: list[Follower] = []
        self.ids: dict[str, int] = {}
        self._keys: dict[str, tuple[MachinePrivate, NodePublic]] = {}

    def register(self, hostname: str) -> int:
        store = self.replicas[0].store
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
        machine, node_key = mkey(), nkey()
        node = store.register(machine.public, node_key, hostname, key, time.time())
        self.ids[hostname] = node.id
        self._keys[hostname] = (machine, node_key)
        return node.id

    async def follow(self, hostname: str, urls: str, routes: tuple[str, ...] | None = None) -> Follower:
        """Start a map stream of the registered node ``hostname`` at ``urls`` (advertising ``routes``)."""
        machine, node_key = self._keys[hostname]
        f = Follower(ControlClient(urls, machine), node_key, hostname, routable_ips=routes)
        self.followers.append(f)
        f.start()
        await f.until(lambda nm: nm.self_node.name == hostname)
        return f

    async def drop(self, f: Follower) -> None:
        await f.stop()
        self.followers.remove(f)

    async def close(self) -> None:
        for f in self.followers:
            await f.stop()


def primary_of(nm: NetMap, prefix: str) -> int | None:
    """The peer that is primary for ``prefix`` in ``nm`` (None: nobody); asserts there is at most one and
    that no other peer has the prefix in its allowed IPs."""
    owners = [p.id for p in nm.peers.values() if prefix in p.primary_routes]
    assert len(owners) <= 1, f"two primaries for {prefix}: {owners}"
    allowed = [p.id for p in nm.peers.values() if prefix in (p.allowed_ips or ())]
    assert allowed == owners, f"{prefix} in the allowed IPs of {allowed}, primary {owners}"
    return owners[0] if owners else None


def is_primary(node_id: int | None) -> Callable[[NetMap], bool]:
    return lambda nm: primary_of(nm, LAN) == node_id


async def all_see(
    observers: list[Follower], cond: Callable[[NetMap], bool], timeout: float = 15.0
) -> list[float]:
    """Wait until every observer's netmap satisfies ``cond``; returns the seconds each took (measured from
    the same start)."""
    t0 = time.monotonic()
    out = []
    for o in observers:
        await o.until(cond, timeout)
        out.append(time.monotonic() - t0)
    return out


def stored(r: Replica) -> dict[str, int]:
    with r.store.engine.begin() as conn:
        return primaries.read_all(conn)


async def test_replicas_agree_on_primary_failover_and_no_flapping(trio: list[Replica]) -> None:
    a, b, c = trio
    net = Tailnet(trio)
    try:
        net.register("r1")
        net.register("r2")
        net.register("oa")
        net.register("ob")
        net.register("oc")
        r1, r2 = net.ids["r1"], net.ids["r2"]
        assert r1 < r2  # (the lowest id would win a fresh election: stickiness must keep r2)
        for i in (r1, r2):
            a.store.approve_routes(i, [LAN], time.time())
        oa = await net.follow("oa", a.url)
        ob = await net.follow("ob", b.url)

        # r2 streams first (on b), then r1 (on a): r2 is primary on both replicas
        f2 = await net.follow("r2", b.url, (LAN,))
        await all_see([oa, ob], is_primary(r2))
        f1 = await net.follow("r1", a.url, (LAN,))
        await all_see([oa, ob], lambda nm: peer_online(nm, r1) and primary_of(nm, LAN) == r2)
        assert stored(a) == {LAN: r2}

        # a replica with no history (it never saw r2 come first) shows r2 too
        await c.start()
        oc = await net.follow("oc", c.url)
        await oc.until(lambda nm: peer_online(nm, r1) and peer_online(nm, r2))
        assert oc.netmap is not None and primary_of(oc.netmap, LAN) == r2
        assert c.server.mapper.primary.primary_of(LAN) == r2

        # the primary's stream closes (on b): every replica's streams move to r1
        await net.drop(f2)
        took = await all_see([oa, ob, oc], is_primary(r1))
        log.info("primary stream closed on b: standby primary on a, b, c after %s s", _fmt(took))
        assert stored(b) == {LAN: r1}

        # r2 returns (now on c): r1 stays primary everywhere
        f2 = await net.follow("r2", c.url, (LAN,))
        await all_see([oa, ob, oc], lambda nm: peer_online(nm, r2))
        for o in (oa, ob, oc):
            assert o.netmap is not None and primary_of(o.netmap, LAN) == r1
        assert stored(a) == {LAN: r1}

        # both routers gone: nobody serves the prefix on any replica
        await net.drop(f1)
        await net.drop(f2)
        await all_see([oa, ob, oc], lambda nm: not peer_online(nm, r1) and not peer_online(nm, r2))
        await all_see([oa, ob, oc], is_primary(None))
        assert stored(a) == {}

        # r2 alone returns: it serves again, everywhere
        await net.follow("r2", a.url, (LAN,))
        took = await all_see([oa, ob, oc], is_primary(r2))
        log.info("router back on a: primary on a, b, c after %s s", _fmt(took))
    finally:
        await net.close()


async def test_routers_opening_at_once_on_two_replicas(trio: list[Replica]) -> None:
    """Both routers' streams open at the same moment, each on its own replica (each replica notices its
    own router first): both replicas' streams still agree on one primary, and it is the stored one."""
    a, b, _ = trio
    net = Tailnet(trio)
    try:
        ids = [net.register(h) for h in ("r1", "r2", "oa", "ob")]
        for i in ids[:2]:
            a.store.approve_routes(i, [LAN], time.time())
        oa = await net.follow("oa", a.url)
        ob = await net.follow("ob", b.url)
        await asyncio.gather(net.follow("r1", a.url, (LAN,)), net.follow("r2", b.url, (LAN,)))
        await all_see([oa, ob], lambda nm: peer_online(nm, ids[0]) and peer_online(nm, ids[1]))
        primary = stored(a)[LAN]
        assert primary in ids[:2]
        await all_see([oa, ob], is_primary(primary))
    finally:
        await net.close()


async def test_primary_replica_dies(trio: list[Replica]) -> None:
    """The replica holding the primary's stream stops beating without leaving (as after SIGKILL) and its
    router cannot reach another replica: the others' streams move to the standby once it is reaped; the
    router coming back through another replica takes nothing back."""
    a, b, c = trio
    await c.start()
    net = Tailnet(trio)
    try:
        net.register("r1")
        net.register("r2")
        net.register("ob")
        net.register("oc")
        r1, r2 = net.ids["r1"], net.ids["r2"]
        for i in (r1, r2):
            b.store.approve_routes(i, [LAN], time.time())
        ob = await net.follow("ob", b.url)
        oc = await net.follow("oc", c.url)
        await net.follow("r1", a.url, (LAN,))  # (knows only replica a)
        await all_see([ob, oc], is_primary(r1))
        await net.follow("r2", b.url, (LAN,))
        await all_see([ob, oc], lambda nm: peer_online(nm, r2) and primary_of(nm, LAN) == r1)

        # a dies: no heartbeat, no leave; its stream rows stay until a live replica reaps it
        for t in a.server.replicas._tasks:
            t.cancel()
        a.server.replicas.liveness = False  # (its stop() neither leaves nor removes stream rows)
        await a.server.stop()
        took = await all_see([ob, oc], is_primary(r2))
        log.info("primary's replica killed: standby primary on b, c after %s s (heartbeat 0.5 s)", _fmt(took))
        assert "a" not in b.server.replicas.alive()

        # r1 returns through c: r2 stays primary on both
        await net.follow("r1", c.url, (LAN,))
        await all_see([ob, oc], lambda nm: peer_online(nm, r1))
        for o in (ob, oc):
            assert o.netmap is not None and primary_of(o.netmap, LAN) == r2
        assert stored(b) == {LAN: r2}
    finally:
        await net.close()


def _fmt(took: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in took)
