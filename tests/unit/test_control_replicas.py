"""Replica plumbing on SQLite: the change feed's triggers, two control servers on one database file (as two
processes would be), and a client given several control URLs."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.public
import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.client import control_urls
from tailpy.control.store import changes
from tailpy.daemon.backend import check_login_server, same_control
from tailpy.errors import ConfigError, ControlError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.netmap import NetMap

STEP = 10.0


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def _refused_url() -> str:
    """A URL where nothing listens (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_feed_rows_come_from_every_writer(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        with store.engine.begin() as conn:
            start = changes.last_seq(conn)
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
        node = store.register(mkey().public, nkey(), "alpha", key, time.time())
        with store.engine.begin() as conn:
            first = changes.read_since(conn, start)
        assert first.nodes == {node.id} and first.seq > start
        store.rename_node(node.id, "beta")
        store.add_policy('{"acls": []}', "admin", time.time())
        store.configure(domain="example.internal")
        with store.engine.begin() as conn:
            later = changes.read_since(conn, first.seq)
        assert later.nodes == {node.id} and {"policy", "settings"} <= later.kinds
        with store.engine.begin() as conn:
            assert changes.read_since(conn, later.seq).seq == later.seq  # nothing new
            assert changes.prune(conn, keep=1) > 0
            assert changes.read_since(conn, start).lost
    finally:
        store.close()


class Pair:
    def __init__(self, tmp: Path) -> None:
        self.stores = [Store(tmp), Store(tmp)]
        self.servers = [
            ControlServer(s, keepalive=0.5, poll_interval=0.2, replica_id=f"r{i}", heartbeat=0.3)
            for i, s in enumerate(self.stores)
        ]
        self.urls: list[str] = []
        self.clients: list[ControlClient] = []

    async def start(self) -> None:
        for srv in self.servers:
            host, port = await srv.start("127.0.0.1", 0)
            self.urls.append(f"http://{host}:{port}")

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        for srv in self.servers:
            await srv.stop()
        for s in self.stores:
            s.close()

    def client(self, url: str) -> ControlClient:
        c = ControlClient(url, mkey())
        self.clients.append(c)
        return c


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)
    await p.start()
    yield p
    await p.stop()


async def _until(stream: AsyncIterator[NetMap], cond: object) -> NetMap:
    assert callable(cond)
    while True:
        nm = await asyncio.wait_for(stream.__anext__(), STEP)
        if cond(nm):
            return nm


def test_reaped_replica_leaves_its_nodes_last_seen_at_its_last_heartbeat(tmp_path: Path) -> None:
    """A replica that died never closed its streams: its nodes were last seen at its last heartbeat, not
    when their streams opened (an ephemeral node's offline time counts from then), unless they were seen
    later elsewhere (a node that moved keeps its newer last seen)."""
    store = Store(tmp_path)
    try:
        key = store.create_auth_key(reusable=True, expires=None, now=1000.0).key
        stranded = store.register(mkey().public, nkey(), "stranded", key, 1000.0)
        moved = store.register(mkey().public, nkey(), "moved", key, 1000.0)
        with store.engine.begin() as conn:
            changes.heartbeat(conn, "r-dead", "http://192.0.2.1", 1500.0, started=900.0)
            changes.streams_opened(conn, [stranded.id, moved.id], "r-dead", 1000.0)
            changes.stream_opened(conn, moved.id, "r-live", 1510.0)
        store.update_node(moved.machine_key, now=1510.0)  # (its stream opened on the other replica)
        with store.engine.begin() as conn:
            assert changes.reap(conn, 1600.0, 6.0) == ["r-dead"]
            left = changes.streaming_elsewhere(conn, None, "r-x", ["r-dead", "r-live"])
        assert left == {moved.id: "r-live"}
        by_name = {n.hostname: n for n in store.list_nodes()}
        assert by_name["stranded"].last_seen == 1500.0
        assert by_name["moved"].last_seen == 1510.0
    finally:
        store.close()


async def test_two_servers_on_one_sqlite_file(pair: Pair) -> None:
    key = pair.stores[0].create_auth_key(reusable=True, expires=None, now=time.time()).key
    a, b = pair.client(pair.urls[0]), pair.client(pair.urls[1])
    na = await a.register(nkey(), "alpha", key)
    nb = await b.register(nkey(), "beta", key)
    sa = a.stream_map(na.node_key, [], "alpha")
    sb = b.stream_map(nb.node_key, [], "beta")
    await _until(sa, lambda nm: nm.self_node.id == na.id)
    # b, on the other server, sees alpha online (its stream is on server 0)
    await _until(sb, lambda nm: na.id in nm.peers and nm.peers[na.id].online)
    assert pair.servers[1].replicas.online(na.id) and not pair.servers[1].is_online(na.id)
    assert pair.servers[1].replicas.alive().keys() == {"r0", "r1"}
    seen = pair.servers[1].replicas.live()
    assert seen.node_online(na.id) and seen.replicas.keys() == {"r0", "r1"}
    pair.stores[0].rename_node(na.id, "renamed")
    pair.servers[0].admin_changed(na.id)
    await _until(sb, lambda nm: nm.peers[na.id].name == "renamed")
    await sa.aclose()
    await _until(sb, lambda nm: not nm.peers[na.id].online)


async def test_client_moves_to_the_next_url(pair: Pair) -> None:
    dead = _refused_url()
    key = pair.stores[0].create_auth_key(reusable=True, expires=None, now=time.time()).key
    c = pair.client(f"{dead},{pair.urls[1]}")
    node = await c.register(nkey(), "alpha", key)  # the first URL refuses: the second takes it
    assert c.server_url == pair.urls[1]
    # a later client of the same list starts where this one ended
    again = pair.client(f"{dead},{pair.urls[1]}")
    assert again.server_url == pair.urls[1]
    stream = again.stream_map(node.node_key, [], "alpha")
    with pytest.raises(ControlError):  # (another machine key: not registered)
        await asyncio.wait_for(stream.__anext__(), STEP)
    nobody = pair.client(f"{dead},{_refused_url()}")
    with pytest.raises(ControlError, match="cannot reach control server"):
        await nobody.register(nkey(), "beta", key)


def test_url_lists() -> None:
    assert control_urls("http://a:1/, http://b:2") == ("http://a:1", "http://b:2")
    assert control_urls("http://a:1") == ("http://a:1",)
    assert check_login_server("http://a:1/,http://b:2/") == "http://a:1,http://b:2"
    with pytest.raises(ConfigError):
        check_login_server("http://a:1,ftp://b")
    assert same_control("http://a:1", "http://b:2,http://a:1")
    assert not same_control("http://a:1", "http://b:2") and not same_control("", "http://a:1")


async def test_restarted_replica_forgets_the_streams_of_its_killed_predecessor(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    node = store.register(mkey().public, nkey(), "alpha", key, time.time())
    with store.engine.begin() as conn:  # as a replica "r0" killed while node streamed from it left it
        changes.heartbeat(conn, "r0", "http://old", time.time(), started=time.time())
        changes.stream_opened(conn, node.id, "r0", time.time())
    server = ControlServer(store, replica_id="r0", heartbeat=0.3)
    await server.start("127.0.0.1", 0)
    try:
        assert not server.replicas.online(node.id)
        with store.engine.begin() as conn:
            assert changes.streaming_elsewhere(conn, [node.id], "other", ["r0"]) == {}
    finally:
        await server.stop()
        store.close()
