"""Disco key in the netmap: stored by control (schema migration 5), sent in the map request and in
updates, pushed to peers as deltas; a real aiohttp server on 127.0.0.1 and a real SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _schema import rewind
from hypothesis import given
from hypothesis import strategies as st

from tailpy.control import MIGRATIONS, ControlClient, ControlServer, Store
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError, ParseError
from tailpy.keys import DiscoPrivate, DiscoPublic, MachinePrivate, NodePrivate
from tailpy.netmap import NetMap, Node, parse_disco_key

STEP = 5.0


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


async def test_disco_key_from_map_request_and_update_reaches_peers(server: tuple[ControlServer, str]) -> None:
    srv, url = server
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    a, b = ControlClient(url, MachinePrivate.generate()), ControlClient(url, MachinePrivate.generate())
    d1, d2 = DiscoPrivate.generate().public, DiscoPrivate.generate().public
    try:
        na = await a.register(NodePrivate.generate().public, "alpha", key)
        nb = await b.register(NodePrivate.generate().public, "beta", key)
        assert na.disco_key is None
        sa = a.stream_map(na.node_key, [], "alpha", disco_key=d1)
        nm = await _next(sa)
        assert nm.self_node.disco_key == d1
        sb = b.stream_map(nb.node_key, [], "beta")  # no disco key: an old node
        nm_b = await _next(sb)
        assert nm_b.peers[na.id].disco_key == d1 and nm_b.self_node.disco_key is None

        await a.update(disco_key=d2)  # a restarted daemon's new disco key: peers learn it in a delta
        while (nm_b := await _next(sb)).peers[na.id].disco_key != d2:
            pass
        got = srv.store.node(na.id)
        assert got is not None and got.disco_key == d2
        # An update of the endpoints alone leaves the disco key as it is.
        await a.update(endpoints=[Endpoint.parse("192.0.2.1:41641")])
        while not (nm_b := await _next(sb)).peers[na.id].endpoints:
            pass
        assert nm_b.peers[na.id].disco_key == d2
        for bad in ("nodekey:" + "00" * 32, "discokey:zz", 5, ["discokey:"]):
            with pytest.raises(ControlError, match="disco_key"):
                await a._call("/machine/update", {"disco_key": bad})
        got = srv.store.node(na.id)
        assert got is not None and got.disco_key == d2
        await sa.aclose()
        await sb.aclose()
    finally:
        await a.close()
        await b.close()


def test_disco_key_migration_adds_empty_key_to_existing_nodes(tmp_path: Path) -> None:
    """A database from before the disco key migration keeps its node, with no disco key."""
    store = Store(tmp_path)
    now = time.time()
    key = store.create_auth_key(reusable=False, expires=None, now=now).key
    node = store.register(
        MachinePrivate.generate().public, NodePrivate.generate().public, "old", key, now=now
    )
    store.close()
    rewind(tmp_path / "control.db", 4)  # before migration 5, which adds the disco key
    store = Store(tmp_path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        got = store.node(node.id)
        assert got is not None and got.disco_key is None
        dk = DiscoPrivate.generate().public
        updated = store.update_node(node.machine_key, disco_key=dk, now=now)
        assert updated is not None and updated.disco_key == dk
    finally:
        store.close()


def test_node_json_disco_key_round_trip_and_absent() -> None:
    n = Node(1, "a", "a", NodePrivate.generate().public, MachinePrivate.generate().public, ("100.64.0.1/32",))
    assert "disco_key" not in n.to_json()
    dk = DiscoPrivate.generate().public
    m = Node(**{**n.__dict__, "disco_key": dk})
    assert m.to_json()["disco_key"] == dk.text() and dk.text().startswith("discokey:")
    assert Node.from_json(m.to_json()) == m
    assert Node.from_json({**n.to_json(), "disco_key": None}).disco_key is None
    with pytest.raises(ParseError):
        Node.from_json({**n.to_json(), "disco_key": "discokey:00"})


@given(st.one_of(st.text(), st.none(), st.integers(), st.binary().map(lambda b: "discokey:" + b.hex())))
def test_parse_disco_key_only_parse_errors(v: object) -> None:
    try:
        got = parse_disco_key(v)
    except ParseError:
        return
    assert got is None or isinstance(got, DiscoPublic)
