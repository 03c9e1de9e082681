"""Home DERP region in the netmap: stored by control (migration 4), sent in the map request and in updates,
pushed to peers as deltas; a real aiohttp server on 127.0.0.1 and a real SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.public
import pytest
from _schema import rewind
from hypothesis import given
from hypothesis import strategies as st

from tailpy.control import MIGRATIONS, ControlClient, ControlServer, Store
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError, ParseError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.netmap import MAX_REGION_ID, NetMap, Node, parse_home_derp

STEP = 5.0


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str]]:
    store = Store(tmp_path)
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    yield srv, f"http://{host}:{port}"
    await srv.stop()
    store.close()


async def _next(it: AsyncIterator[NetMap]) -> NetMap:
    return await asyncio.wait_for(it.__anext__(), STEP)


async def test_home_derp_from_map_request_and_update_reaches_peers(server: tuple[ControlServer, str]) -> None:
    srv, url = server
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    a, b = ControlClient(url, mkey()), ControlClient(url, mkey())
    try:
        na = await a.register(nkey(), "alpha", key)
        nb = await b.register(nkey(), "beta", key)
        assert na.home_derp == 0
        sa = a.stream_map(na.node_key, [], "alpha", home_derp=900)
        nm = await _next(sa)
        assert nm.self_node.home_derp == 900
        sb = b.stream_map(nb.node_key, [], "beta")  # no home_derp: the server keeps what it had (0)
        nm_b = await _next(sb)
        assert nm_b.peers[na.id].home_derp == 900 and nm_b.self_node.home_derp == 0

        await a.update(home_derp=901)  # a new home: peers learn it in a delta
        while (nm_b := await _next(sb)).peers[na.id].home_derp != 901:
            pass
        assert srv.store.node(na.id) is not None and srv.store.node(na.id).home_derp == 901  # type: ignore[union-attr]
        # An update of the endpoints alone leaves the home region as it is.
        await a.update(endpoints=[Endpoint.parse("192.0.2.1:41641")])
        while not (nm_b := await _next(sb)).peers[na.id].endpoints:
            pass
        assert nm_b.peers[na.id].home_derp == 901
        # Bad values are refused with a sentence; nothing changes.
        for bad in (-1, True, "900", MAX_REGION_ID + 1):
            with pytest.raises(ControlError, match="home_derp"):
                await a._call("/machine/update", {"home_derp": bad})
        with pytest.raises(ControlError, match="endpoints' or 'home_derp"):
            await a._call("/machine/update", {})
        await sa.aclose()
        await sb.aclose()
    finally:
        await a.close()
        await b.close()


def test_migration_4_adds_home_derp_to_existing_nodes(tmp_path: Path) -> None:
    """A database at version 3 with a node gains home_derp = 0 for it."""
    store = Store(tmp_path)
    now = time.time()
    key = store.create_auth_key(reusable=False, expires=None, now=now).key
    node = store.register(
        MachinePrivate.generate().public, NodePrivate.generate().public, "old", key, now=now
    )
    store.close()
    db = tmp_path / "control.db"
    rewind(db, 3)  # as an older tailpy left it
    store = Store(tmp_path)
    try:
        assert store.schema_version() == len(MIGRATIONS) >= 4
        got = store.node(node.id)
        assert got is not None and got.home_derp == 0
        updated = store.update_node(node.machine_key, home_derp=7, now=now)
        assert updated is not None and updated.home_derp == 7
    finally:
        store.close()


def test_node_json_home_derp_round_trip_and_default() -> None:
    n = Node(1, "a", "a", NodePrivate.generate().public, MachinePrivate.generate().public, ("100.64.0.1/32",))
    assert n.home_derp == 0
    m = Node(**{**n.__dict__, "home_derp": 900})
    assert Node.from_json(m.to_json()) == m
    legacy = n.to_json()
    del legacy["home_derp"]  # a server that predates home DERP
    assert Node.from_json(legacy).home_derp == 0


@given(st.one_of(st.integers(), st.booleans(), st.text(), st.none(), st.floats()))
def test_parse_home_derp_only_parse_errors(v: object) -> None:
    try:
        got = parse_home_derp(v)
    except ParseError:
        return
    assert isinstance(got, int) and 0 <= got <= MAX_REGION_ID


async def test_stream_alive_tells_whether_control_holds_the_map_stream(
    server: tuple[ControlServer, str],
) -> None:
    """tailpyd's check that its map stream still reaches it: true while a stream is open, false once the
    server has closed it; the check changes nothing and pushes nothing to peers."""
    srv, url = server
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    a = ControlClient(url, mkey())
    try:
        na = await a.register(nkey(), "alpha", key)
        assert await a.stream_alive() is False  # no stream yet
        sa = a.stream_map(na.node_key, [Endpoint.parse("192.0.2.1:41641")], "alpha")
        await _next(sa)
        before = srv.store.node(na.id)
        assert await a.stream_alive() is True
        assert srv.store.node(na.id) == before  # nothing changed
        await sa.aclose()
        for _ in range(50):  # the server notices the closed stream
            if not await a.stream_alive():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the server still holds a closed map stream")
        stranger = ControlClient(url, mkey())
        try:
            with pytest.raises(ControlError, match="not registered"):
                await stranger.stream_alive()
        finally:
            await stranger.close()
    finally:
        await a.close()
