"""The control server and client end to end: a real aiohttp server on 127.0.0.1 and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nacl.public
import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.endpoint import Endpoint
from tailpy.errors import AuthKeyError, ControlError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.netmap import NetMap
from tailpy.proto import control as proto

STEP = 5.0  # seconds to wait for one expected stream message


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


class Control:
    """A running server on a state dir, restartable."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.store: Store | None = None
        self.server: ControlServer | None = None
        self.url = ""
        self.clients: list[ControlClient] = []

    async def start(self) -> None:
        self.store = Store(self.state_dir)
        self.server = ControlServer(self.store, keepalive=0.5, poll_interval=0.2)
        host, port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.store is not None:
            self.store.close()
        self.server = self.store = None

    def authkey(self, *, reusable: bool = False, expires: float | None = None) -> str:
        assert self.store is not None
        return self.store.create_auth_key(reusable=reusable, expires=expires, now=time.time()).key

    def client(self, machine_key: MachinePrivate | None = None) -> ControlClient:
        """A client, closed when the test ends."""
        c = ControlClient(self.url, machine_key or mkey())
        self.clients.append(c)
        return c


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    c = Control(tmp_path)
    await c.start()
    yield c
    for client in c.clients:
        await client.close()
    await c.stop()


async def next_map(it: AsyncIterator[NetMap]) -> NetMap:
    return await asyncio.wait_for(it.__anext__(), STEP)


async def test_register_two_nodes_distinct_stable_addresses(control: Control) -> None:
    a, b = control.client(), control.client()
    try:
        key = control.authkey(reusable=True)
        na = await a.register(nkey(), "alpha", key)
        nb = await b.register(nkey(), "beta", key)
        assert (na.ipv4, na.ipv6) == ("100.64.0.1", "fd7a:115c:a1e0::1")
        assert (nb.ipv4, nb.ipv6) == ("100.64.0.2", "fd7a:115c:a1e0::2")
        assert (na.name, nb.name) == ("alpha", "beta")
        assert na.machine_key == a.machine_key.public
        # Re-registering with the same node key needs no auth key and keeps id, name and addresses.
        again = await a.register(na.node_key, "alpha", None)
        assert (again.id, again.name, again.addresses) == (na.id, na.name, na.addresses)
        # A new node key needs a valid auth key ...
        new_key = nkey()
        with pytest.raises(AuthKeyError, match="not registered: pass an auth key"):
            await a.register(new_key, "alpha", None)
        again = await a.register(new_key, "alpha", control.authkey())  # single-use key
        # ... and keeps the record.
        assert (again.id, again.addresses, again.name, again.node_key) == (
            na.id,
            na.addresses,
            na.name,
            new_key,
        )
    finally:
        await a.close()
        await b.close()


async def test_restart_keeps_state(control: Control) -> None:
    m = mkey()
    c = control.client(m)
    first = await c.register(nkey(), "alpha", control.authkey())
    server_key = await c.server_key()
    await c.close()
    await control.stop()
    await control.start()  # new app, same state dir
    c = control.client(m)
    try:
        assert await c.server_key() == server_key
        again = await c.register(first.node_key, "alpha", None)
        assert (again.id, again.addresses, again.name) == (first.id, first.addresses, first.name)
        other = await control.client().register(nkey(), "alpha", control.authkey())
        assert other.ipv4 == "100.64.0.2" and other.name == "alpha-1"
    finally:
        await c.close()


async def test_stream_pushes_joins_endpoints_and_leaves(control: Control) -> None:
    a, b = control.client(), control.client()
    key = control.authkey(reusable=True)
    na = await a.register(nkey(), "alpha", key)
    sa = a.stream_map(na.node_key, [Endpoint.parse("192.0.2.1:41641")], "alpha")
    try:
        nm = await next_map(sa)
        assert nm.self_node.id == na.id and nm.self_node.online and nm.peers == {}
        assert tuple(map(str, nm.self_node.endpoints)) == ("192.0.2.1:41641",)
        assert nm.domain

        nb = await b.register(nkey(), "beta", key)  # B joins
        nm = await next_map(sa)
        assert nm.peers[nb.id].node_key == nb.node_key and not nm.peers[nb.id].online

        sb = b.stream_map(nb.node_key, [Endpoint.parse("198.51.100.2:41641")], "beta")  # B comes online
        nm_b = await next_map(sb)
        assert set(nm_b.peers) == {na.id} and nm_b.peers[na.id].online
        while not (nm := await next_map(sa)).peers[nb.id].online:
            pass
        assert tuple(map(str, nm.peers[nb.id].endpoints)) == ("198.51.100.2:41641",)

        await b.update_endpoints(
            [Endpoint.parse("198.51.100.2:41641"), Endpoint.parse("[2001:db8::2]:41641")]
        )  # B's endpoints change
        nm = await next_map(sa)
        assert tuple(map(str, nm.peers[nb.id].endpoints)) == ("198.51.100.2:41641", "[2001:db8::2]:41641")
        assert (await next_map(sb)).self_node.endpoints == nm.peers[nb.id].endpoints

        await sb.aclose()  # B leaves: A sees it offline
        await b.close()
        nm = await next_map(sa)
        assert not nm.peers[nb.id].online
    finally:
        await sa.aclose()
        await a.close()
        await b.close()


async def test_deleted_node_leaves_netmaps_and_its_stream_ends(control: Control) -> None:
    a, b = control.client(), control.client()
    key = control.authkey(reusable=True)
    na = await a.register(nkey(), "alpha", key)
    nb = await b.register(nkey(), "beta", key)
    sa = a.stream_map(na.node_key, [], "alpha")
    sb = b.stream_map(nb.node_key, [], "beta")
    try:
        assert nb.id in (await next_map(sa)).peers
        await next_map(sb)
        assert control.store is not None
        assert control.store.delete_node(nb.id, time.time())  # as `tailpy control nodes delete` does
        while nb.id in (await next_map(sa)).peers:
            pass
        with pytest.raises(ControlError, match="closed the map stream"):
            while True:
                await next_map(sb)
        with pytest.raises(ControlError, match="not registered"):
            await b.update_endpoints([Endpoint.parse("192.0.2.2:2")])
    finally:
        await sa.aclose()
        await sb.aclose()


async def test_keepalives_are_consumed_and_stream_survives(control: Control) -> None:
    a = control.client()
    try:
        na = await a.register(nkey(), "alpha", control.authkey())
        sa = a.stream_map(na.node_key, [], "alpha")
        await next_map(sa)
        pending = asyncio.ensure_future(sa.__anext__())
        await asyncio.sleep(1.6)  # three keepalives (every 0.5 s here) arrive and are not yielded
        assert not pending.done()
        await a.update_endpoints([Endpoint.parse("192.0.2.1:1")])
        nm = await asyncio.wait_for(pending, STEP)
        assert tuple(map(str, nm.self_node.endpoints)) == ("192.0.2.1:1",)
        await sa.aclose()
    finally:
        await a.close()


async def test_auth_key_errors(control: Control) -> None:
    c = control.client()
    try:
        with pytest.raises(AuthKeyError, match="is not known to this control server"):
            await c.register(nkey(), "x", "tskey-auth-wrong")
        with pytest.raises(
            AuthKeyError, match="is expired; create a new one with `tailpy control authkey create`"
        ):
            await c.register(nkey(), "x", control.authkey(expires=time.time() - 1))
        used = control.authkey()
        await control.client().register(nkey(), "first", used)
        with pytest.raises(AuthKeyError, match="already used"):
            await c.register(nkey(), "x", used)
        assert control.store is not None
        assert [n.name for n in control.store.list_nodes()] == ["first"]
    finally:
        await c.close()


async def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ControlClient(f"http://127.0.0.1:{port}", mkey())
    try:
        with pytest.raises(ControlError, match=f"cannot reach control server at http://127.0.0.1:{port}"):
            await c.register(nkey(), "x", None)
    finally:
        await c.close()


async def test_unregistered_map_refused(control: Control) -> None:
    c = control.client()
    try:
        with pytest.raises(ControlError, match="not registered"):
            await anext_or_fail(c.stream_map(nkey(), [], "x"))
    finally:
        await c.close()


async def anext_or_fail(it: AsyncIterator[NetMap]) -> NetMap:
    return await asyncio.wait_for(it.__anext__(), STEP)


def records(store: Store) -> list[tuple[object, ...]]:
    return [(n.id, n.name, n.node_key, n.addresses, n.endpoints) for n in store.list_nodes()]


async def _post(url: str, data: bytes) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.post(url, data=data) as r:
        return r.status, json.loads(await r.read())


async def test_forged_replayed_and_impersonating_requests_change_nothing(control: Control) -> None:
    a_key, b_key = mkey(), mkey()
    a, b = control.client(a_key), control.client(b_key)
    try:
        key = control.authkey(reusable=True)
        await a.register(nkey(), "alpha", key)
        await b.register(nkey(), "beta", key)
        await b.update_endpoints([Endpoint.parse("198.51.100.2:1")])
        server_key = await a.server_key()
        assert control.store is not None
        before = records(control.store)
        url = control.url + "/machine/update"

        # A seals a request but names B's machine key in the envelope: the box does not open.
        req = proto.seal_request(
            a_key, server_key, "/machine/update", {"endpoints": ["203.0.113.9:1"]}, now=time.time()
        )
        env = json.loads(req.data)
        env["machine_key"] = b_key.public.text()
        status, body = await _post(url, json.dumps(env).encode())
        assert status == 401 and "does not open with machine key" in str(body["error"])

        # A forged box (random bytes) under B's machine key.
        env["box"] = "A" * 100
        status, body = await _post(url, json.dumps(env).encode())
        assert status == 401 and "error" in body

        # A replayed request: the first copy works, the second is refused.
        req = proto.seal_request(
            b_key, server_key, "/machine/update", {"endpoints": ["203.0.113.7:7"]}, now=time.time()
        )
        assert (await _post(url, req.data))[0] == 200
        await b.update_endpoints([Endpoint.parse("198.51.100.2:1")])
        status, body = await _post(url, req.data)
        assert status == 401 and "replay" in str(body["error"])

        # A stale request (clock far off) is refused with a sentence about the clock.
        stale = ControlClient(control.url, b_key, clock=lambda: time.time() - 1000)
        with pytest.raises(ControlError, match="clock"):
            await stale.update_endpoints([Endpoint.parse("203.0.113.8:8")])
        await stale.close()

        assert records(control.store) == before
    finally:
        await a.close()
        await b.close()


async def test_reconnect_resumes_with_a_delta(control: Control) -> None:
    a, b = control.client(), control.client()
    key = control.authkey(reusable=True)
    na = await a.register(nkey(), "alpha", key)
    nb = await b.register(nkey(), "beta", key)
    sa = a.stream_map(na.node_key, [], "alpha")
    first = await next_map(sa)
    await sa.aclose()  # the stream breaks; the client keeps what it applied
    assert a.map_state is not None and a.map_state.netmap == first
    await b.update_endpoints([Endpoint.parse("198.51.100.2:2")])  # changes while A is away

    kinds: list[str] = []
    state = a.map_state
    msgs = a.stream_messages(na.node_key, [], "alpha", resume=(state.generation, state.version))
    msg = await asyncio.wait_for(msgs.__anext__(), STEP)
    kinds.append(msg.type)
    await msgs.aclose()
    assert kinds == ["delta"] and msg.body["generation"] == state.generation
    assert [n["id"] for n in msg.body["peers_changed"]] == [nb.id]

    sa = a.stream_map(na.node_key, [], "alpha")  # stream_map resumes from map_state by itself
    try:
        nm = await next_map(sa)
        assert tuple(map(str, nm.peers[nb.id].endpoints)) == ("198.51.100.2:2",)
        assert a.map_state is not None and a.map_state.generation == state.generation
    finally:
        await sa.aclose()


async def test_server_restart_means_a_full_netmap(control: Control) -> None:
    m = mkey()
    a = control.client(m)
    na = await a.register(nkey(), "alpha", control.authkey())
    sa = a.stream_map(na.node_key, [], "alpha")
    await next_map(sa)
    await sa.aclose()
    assert a.map_state is not None
    await control.stop()
    await control.start()
    a.server_url = control.url
    sa = a.stream_map(na.node_key, [], "alpha")
    try:
        nm = await next_map(
            sa
        )  # another generation: the server sends the full netmap, the client starts over
        assert nm.self_node.id == na.id and a.map_state is not None
        assert control.server is not None and a.map_state.generation == control.server.mapper.generation
    finally:
        await sa.aclose()


@pytest.mark.parametrize("path", ["/machine/register", "/machine/map", "/machine/update"])
async def test_deeply_nested_json_is_a_400_and_one_log_line(
    control: Control, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, body = await _post(control.url + path, b'{"a":' * 5000)
    assert status == 400 and body == {"error": "control request is nested too deeply"}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"refused {path} from 127.0.0.1: control request is nested too deeply"
    ]
    assert not any(r.exc_info for r in caplog.records)


async def test_unfinished_request_head_is_closed(tmp_path: Path) -> None:
    """A connection that never finishes its request head (slowloris) is closed after header_timeout, while a
    complete request on another connection is answered."""
    store = Store(tmp_path)
    srv = ControlServer(store, header_timeout=0.5)
    host, port = await srv.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server, nothing answered
        writer.close()
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/health") as r:
            assert r.status == 200
    finally:
        await srv.stop()
        store.close()
