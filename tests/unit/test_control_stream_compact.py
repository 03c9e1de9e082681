"""Compact map streams end to end (a real control server on 127.0.0.1 with SQLite, real clients): a client
that accepts zstd and peer patches and one that asks for plain JSON see the same netmaps after the same
changes (joins, endpoint changes, routes, a policy, a deletion, a reconnect that resumes), and each
matches the server's view."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.client import MapMessage, MapState, apply_message
from tailpy.control.policy import Policy
from tailpy.endpoint import Endpoint
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.netmap import NetMap
from tailpy.proto import mapcodec

STEP = 10.0  # seconds to wait for one expected stream message
needs_zstd = pytest.mark.skipif(not mapcodec.ZSTD, reason="the zstandard package is not installed")


class Watcher:
    """One node's map stream, opened with ``ControlClient.stream_messages`` and applied as ``stream_map``
    does; remembers what kinds of messages came."""

    def __init__(self, client: ControlClient, node_id: int, it: AsyncGenerator[MapMessage, None]) -> None:
        self.client, self.node_id, self.it = client, node_id, it
        self.state: MapState | None = None
        self.patched = 0  # deltas that carried peers_patched
        self.compressed = 0  # messages whose line was smaller than their JSON

    @property
    def netmap(self) -> NetMap | None:
        return None if self.state is None else self.state.netmap

    async def until_server_view(self, server: ControlServer) -> NetMap:
        """Read messages until this node's netmap is the server's view of it."""
        while self.state is None or self.state.netmap != server.netmap(self.node_id):
            msg = await asyncio.wait_for(self.it.__anext__(), STEP)
            self.patched += b'"peers_patched"' in msg.raw
            self.compressed += msg.wire_bytes < len(msg.raw)
            self.state = self.client.map_state = apply_message(
                None if msg.type == "netmap" else self.state, msg
            )
        return self.state.netmap


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str, list[ControlClient]]]:
    store = Store(tmp_path)
    server = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await server.start("127.0.0.1", 0)
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    clients: list[ControlClient] = []
    yield server, f"http://{host}:{port}|{key}", clients
    for c in clients:
        await c.close()
    await server.stop()
    store.close()


async def join(
    ctl: tuple[ControlServer, str, list[ControlClient]],
    name: str,
    accept: list[str] | None = None,
    routes: list[str] | None = None,
) -> tuple[ControlClient, NodePublic, Watcher]:
    _, where, clients = ctl
    url, key = where.split("|")
    c = ControlClient(url, MachinePrivate.generate())
    clients.append(c)
    nk = NodePrivate.generate().public
    node = await c.register(nk, name, key, routable_ips=routes)
    it = c.stream_messages(nk, [Endpoint.parse("192.0.2.1:41641")], name, routable_ips=routes, accept=accept)
    return c, nk, Watcher(c, node.id, it)


def same_peers(a: NetMap, b: NetMap) -> None:
    """``a`` and ``b`` (two observers' netmaps) hold the same records of the same third nodes, the same
    filter, domain and DNS."""
    others = {a.self_node.id, b.self_node.id}
    assert {i: p for i, p in a.peers.items() if i not in others} == {
        i: p for i, p in b.peers.items() if i not in others
    }
    assert a.peers[b.self_node.id] == b.self_node and b.peers[a.self_node.id] == a.self_node
    assert (a.packet_filters, a.domain, a.dns) == (b.packet_filters, b.domain, b.dns)


@needs_zstd
async def test_compact_and_plain_clients_see_the_same_netmaps(
    control: tuple[ControlServer, str, list[ControlClient]],
) -> None:
    server = control[0]
    _, _, compact = await join(control, "compact")  # accepts all it can: zstd and patches
    _, _, plain = await join(control, "plain", accept=[])
    watchers = [compact, plain]

    async def settle() -> None:
        while True:  # (the server's view may move while the second catches up)
            maps = [await w.until_server_view(server) for w in watchers]
            if all(w.netmap == server.netmap(w.node_id) for w in watchers):
                break
        same_peers(maps[0], maps[1])

    await settle()
    flags = {s.node_id: (s.zstd, s.patches) for s in server.mapper._streams}
    assert flags == {compact.node_id: (True, True), plain.node_id: (False, False)}

    peers = [await join(control, f"peer{i}") for i in range(3)]
    router = await join(control, "router", routes=["198.51.100.0/24"])
    await settle()
    await peers[0][0].update_endpoints([Endpoint.parse("203.0.113.5:1"), Endpoint.parse("[2001:db8::5]:2")])
    await peers[1][0].update(home_derp=7)
    await settle()
    assert compact.netmap is not None
    assert [str(e) for e in compact.netmap.peers[peers[0][2].node_id].endpoints] == [
        "203.0.113.5:1",
        "[2001:db8::5]:2",
    ]

    server.store.approve_routes(router[2].node_id, ["198.51.100.0/24"])
    server.publish_node(router[2].node_id)
    server._apply_policy(
        Policy.parse('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22", "198.51.100.0/24:*"]}]}')
    )
    await settle()
    await peers[2][0].close()  # its stream ends: offline
    await settle()
    server.admin_removed(peers[1][2].node_id)
    await settle()
    server._apply_policy(None)
    await settle()
    assert compact.patched and compact.compressed and not plain.patched and not plain.compressed


@needs_zstd
async def test_a_compact_stream_resumes_with_patches(
    control: tuple[ControlServer, str, list[ControlClient]],
) -> None:
    server = control[0]
    c, nk, w = await join(control, "compact")
    peer = await join(control, "peer")
    await w.until_server_view(server)
    await peer[2].until_server_view(server)
    state = c.map_state
    await c.close()  # the stream ends; the client keeps its state and resumes
    await peer[0].update_endpoints([Endpoint.parse("203.0.113.9:9")])
    c2 = ControlClient(c.server_url, c.machine_key)
    control[2].append(c2)
    assert state is not None
    w2 = Watcher(
        c2,
        w.node_id,
        c2.stream_messages(
            nk, [Endpoint.parse("192.0.2.1:41641")], "compact", resume=(state.generation, state.version)
        ),
    )
    w2.state = state
    nm = await w2.until_server_view(server)
    assert [str(e) for e in nm.peers[peer[2].node_id].endpoints] == ["203.0.113.9:9"]
