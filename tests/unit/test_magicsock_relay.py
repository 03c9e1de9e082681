"""magicsock.Conn's DERP side against real tailpy DERP servers on 127.0.0.1: home region, relay routing of
the device's datagrams, DERP packets injected (disco to disco), peers without disco, on-demand and idle
connections, latency, the home region's hysteresis (:class:`tailpy.magicsock.Relay`).

The data plane is a recording stand-in (tests/unit/_conn_device.py; the real one needs a TUN, the lab tests
use it)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from _conn_device import FakeDevice

from tailpy.derp.server import DerpServer
from tailpy.endpoint import Endpoint
from tailpy.keys import DiscoPrivate, MachinePrivate, NodePrivate, NodePublic
from tailpy.magicsock import DISCO_MAGIC, Conn, DerpConnections, Options, Relay, measure_latency
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, NetMap, Node

WG_DATA = bytes([4, 0, 0, 0]) + os.urandom(60)  # looks like a WireGuard transport message


def node(i: int, key: NodePrivate, home: int) -> Node:
    return Node(
        i,
        f"n{i}",
        f"n{i}",
        key.public,
        MachinePrivate.generate().public,
        (f"100.64.0.{i}/32",),
        (Endpoint.parse(f"192.0.2.{i}:41641"),),
        home_derp=home,
    )


def region(rid: int, port: int) -> DerpRegion:
    n = DerpNode(f"{rid}a", rid, "127.0.0.1", ipv4="127.0.0.1", derp_port=port, stun_port=-1,
                 insecure_for_tests=True)  # fmt: skip
    return DerpRegion(rid, f"r{rid}", f"region {rid}", (n,))


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def servers() -> AsyncIterator[list[DerpServer]]:
    out = []
    for _ in range(2):
        s = DerpServer(MachinePrivate.generate())
        await s.start("127.0.0.1", 0)
        out.append(s)
    yield out
    for s in out:
        await s.stop()


def conn(dev: FakeDevice, key: NodePrivate, homes: list[int] | None = None) -> Conn:
    return Conn(
        dev,
        key,
        Options(
            DiscoPrivate.generate(),
            on_home_changed=homes.append if homes is not None else None,
            monitor_links=False,
        ),
    )


async def test_two_nodes_relay_through_their_home_region(servers: list[DerpServer]) -> None:
    dm = DerpMap({900: region(900, servers[0].addresses[0][1])})
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    dev_a, dev_b = FakeDevice(), FakeDevice()
    dev_a.add(kb.public.raw)
    dev_b.add(ka.public.raw)
    homes: list[int] = []
    a = conn(dev_a, ka, homes)
    b = conn(dev_b, kb)
    a.start()
    b.start()
    a.set_netmap(NetMap(node(1, ka, 0), {2: node(2, kb, 900)}, derp_map=dm))
    b.set_netmap(NetMap(node(2, kb, 0), {1: node(1, ka, 900)}, derp_map=dm))
    try:
        # Neither peer has disco: each is sent to directly at its netmap endpoint.
        assert dev_a.endpoints[kb.public.raw] == "192.0.2.2:41641" and dev_a.paths[kb.public.raw] == "direct"
        await until(lambda: a.home_region == 900 and b.home_region == 900, "both homes")
        assert homes == [900]
        await until(lambda: a.relay.connected(900) and b.relay.connected(900), "home connections")
        derp = a.status().derp
        assert derp.home_derp_code == "r900" and derp.latency_ms[900] >= 0
        # A relay datagram drained from A's device reaches B's device as an injected datagram from A.
        dev_a.queue_relay(kb.public.raw, WG_DATA)
        await until(lambda: bool(dev_b.injected), "B's inject")
        assert dev_b.injected == [(ka.public.raw, WG_DATA)]
        # B had no handshake with A: a WireGuard datagram over DERP puts A on the relay path for B.
        assert dev_b.paths[ka.public.raw] == "relay"
        assert dev_a.paths[kb.public.raw] == "direct"  # A decides for itself (here: nothing sent yet)
        # Disco over DERP goes to disco (here: from no disco peer, so counted and dropped), not to the device.
        probe = DISCO_MAGIC + os.urandom(80)
        assert a.relay.send(kb.public, probe)
        await until(lambda: b.disco.counters.received == 1, "disco to receive it")
        assert len(dev_b.injected) == 1
        # A node that is not a peer is dropped and counted.
        stranger = NodePrivate.generate()
        other = DerpConnections(stranger, lambda *_: None)
        try:
            await other.set_derp_map(dm)
            assert other.send(900, kb.public, WG_DATA)
            await until(lambda: b.relay.derp_dropped == 1, "the stranger's packet to be dropped")
        finally:
            await other.close()
        assert len(dev_b.injected) == 1
        # No region for a peer without a home DERP: the datagram is dropped and counted.
        a.set_netmap(NetMap(node(1, ka, 900), {2: node(2, kb, 0)}, derp_map=dm))
        dev_a.queue_relay(kb.public.raw, WG_DATA)
        await until(lambda: a.relay.relay_dropped == 1, "the datagram to be dropped")
    finally:
        await a.close()
        await b.close()
        dev_a.close()
        dev_b.close()


async def test_peer_without_disco_is_relayed_while_it_has_no_endpoint(servers: list[DerpServer]) -> None:
    dm = DerpMap({900: region(900, servers[0].addresses[0][1])})
    me, kb, kc = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    dev = FakeDevice()
    dev.add(kb.public.raw)
    dev.add(kc.public.raw)
    ms = conn(dev, me)
    ms.start()
    no_endpoint = replace(node(2, kb, 900), endpoints=())
    ms.set_netmap(NetMap(node(1, me, 0), {2: no_endpoint, 3: node(3, kc, 900)}, derp_map=dm))
    try:
        assert dev.paths[kb.public.raw] == "relay"  # no endpoint: relay at once
        assert dev.paths[kc.public.raw] == "direct" and dev.endpoints[kc.public.raw] == "192.0.2.3:41641"
        # Control brings an endpoint: direct to it.
        ms.set_netmap(NetMap(node(1, me, 0), {2: node(2, kb, 900), 3: node(3, kc, 900)}, derp_map=dm))
        assert dev.paths[kb.public.raw] == "direct" and dev.endpoints[kb.public.raw] == "192.0.2.2:41641"
        # A peer with a disco key is disco's: relay from the first packet, whatever its endpoints.
        kd = NodePrivate.generate()
        dev.add(kd.public.raw)
        with_disco = replace(node(4, kd, 900), disco_key=DiscoPrivate.generate().public)
        ms.set_netmap(NetMap(node(1, me, 0), {2: node(2, kb, 900), 4: with_disco}, derp_map=dm))
        assert dev.paths[kd.public.raw] == "relay"
        await asyncio.sleep(0.6)  # two looks at the counters: nothing moves it
        assert dev.paths[kd.public.raw] == "relay" and dev.paths[kb.public.raw] == "direct"
    finally:
        await ms.close()
        dev.close()


async def test_on_demand_region_connection_closes_when_idle(servers: list[DerpServer]) -> None:
    dm = DerpMap({900: region(900, servers[0].addresses[0][1]), 901: region(901, servers[1].addresses[0][1])})
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    got: list[tuple[NodePublic, bytes, int]] = []
    a = DerpConnections(ka, lambda *_: None, idle_timeout=0.5)
    b = DerpConnections(kb, lambda src, data, rid: got.append((src, data, rid)))
    try:
        await a.set_derp_map(dm)
        await b.set_derp_map(dm)
        await a.set_home(900)
        await b.set_home(901)
        await until(lambda: b.connected(901), "B at home in 901")
        assert a.send(901, kb.public, b"hello")  # A connects to B's home on demand
        await until(lambda: bool(got), "B to receive")
        assert got == [(ka.public, b"hello", 901)]
        assert {c.region_id: c.home for c in a.status()} == {900: True, 901: False}
        await asyncio.sleep(0.6)
        assert await a.sweep() == [901]  # idle non-home connection closed; the home stays
        assert [c.region_id for c in a.status()] == [900]
        assert await b.sweep() == []
        # Moving home: the old home becomes an ordinary connection and idles out.
        await a.set_home(901)
        await asyncio.sleep(0.6)
        assert await a.sweep() == [900]
        assert [c.region_id for c in a.status()] == [901]
    finally:
        await a.close()
        await b.close()


async def test_latency_check_over_http_and_none_for_a_closed_port(servers: list[DerpServer]) -> None:
    up = region(900, servers[0].addresses[0][1])
    d = await measure_latency(up)
    assert d is not None and 0 <= d < 3
    s = DerpServer(MachinePrivate.generate())
    await s.start("127.0.0.1", 0)
    port = s.addresses[0][1]
    await s.stop()
    assert await measure_latency(region(901, port), timeout=2.0) is None


async def test_home_moves_after_slow_reports_old_home_delivers(servers: list[DerpServer]) -> None:
    """Home region hysteresis on the DERP side (tailscale/tailscale#8603): the home moves only after three
    slow reports, the new relay hears NotePreferred, and a peer still sending to the old home region reaches
    us there."""
    s900, s901 = servers
    dm = DerpMap({900: region(900, s900.addresses[0][1]), 901: region(901, s901.addresses[0][1])})
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    got: list[tuple[NodePublic, bytes, int]] = []
    a = Relay(ka, lambda src, data, rid: got.append((src, data, rid)), clock=time.monotonic)
    a.set_peers([node(2, kb, 900)])
    assert a.set_derp_map(dm)
    await a.apply_derp_map()  # driven by hand: no probes measuring loopback
    b = DerpConnections(kb, lambda *_: None)

    async def report(latencies: dict[int, float]) -> int:
        home, moved = a.report(latencies)
        if moved:  # what Conn does: connect there with NotePreferred (and tell control)
            await a.derp.set_home(home)
        return home

    try:
        assert await report({900: 0.030, 901: 0.032}) == 900
        await until(lambda: s900.metrics.home_clients == 1, "NotePreferred at region 900")
        assert await report({901: 0.032}) == 900  # probe lost, frames recent (the connect)
        assert await report({900: 0.080, 901: 0.032}) == 900
        assert await report({900: 0.080, 901: 0.032}) == 900
        assert await report({900: 0.080, 901: 0.032}) == 901
        await until(
            lambda: s901.metrics.home_clients == 1 and s900.metrics.home_clients == 0, "preferred moved"
        )
        # B still thinks A is at home in 900: the old home connection stays open and delivers.
        await b.set_derp_map(dm)
        assert b.send(900, ka.public, WG_DATA)
        await until(lambda: bool(got), "the packet sent to the old home")
        assert got == [(kb.public, WG_DATA, 900)]
    finally:
        await b.close()
        await a.close()


async def test_peer_gone_not_here_stops_sending_there_until_the_netmap_entry_changes(
    servers: list[DerpServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The relay core answers a packet for a peer not connected there with PeerGone "not here"; the node
    stops sending to that peer through that region (counted, logged once) until its netmap entry changes."""
    caplog.set_level(logging.INFO, "tailpy.magicsock")
    dm = DerpMap({900: region(900, servers[0].addresses[0][1])})
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    got: list[bytes] = []
    relay = Relay(ka, lambda src, payload, rid: None, clock=time.monotonic)
    b_relay = Relay(kb, lambda src, payload, rid: got.append(payload), clock=time.monotonic)
    try:
        relay.set_derp_map(dm)
        await relay.apply_derp_map()
        peer_b = node(2, kb, 900)
        relay.set_peers([peer_b])
        assert relay.send(kb.public, WG_DATA)  # b is not connected to region 900
        await until(lambda: relay.not_here == 1, "PeerGone not here")
        assert relay.not_here_region(kb.public.raw) == 900
        for _ in range(3):
            assert not relay.send(kb.public, WG_DATA)
        assert relay.not_here_dropped == 3 and relay.not_here == 1
        st = relay.status()
        assert st.not_here == 1 and st.not_here_peers == (kb.public.text(),)
        assert st.to_json()["not_here"] == 1
        assert sum("PeerGone: not here" in r.getMessage() for r in caplog.records) == 1
        relay.set_peers([peer_b])  # the same entry again: still not sent there
        assert not relay.send(kb.public, WG_DATA)

        # b comes up there and control's netmap shows its new endpoints: sending resumes and arrives.
        b_relay.set_derp_map(dm)
        await b_relay.apply_derp_map()
        await b_relay.derp.set_home(900)
        await until(lambda: b_relay.connected(900), "b connected to region 900")
        relay.set_peers([replace(peer_b, endpoints=(Endpoint.parse("198.51.100.2:41641"),))])
        assert relay.not_here_region(kb.public.raw) == 0 and relay.status().not_here_peers == ()
        b_relay.set_peers([node(1, ka, 900)])
        assert relay.send(kb.public, WG_DATA)
        await until(lambda: WG_DATA in got, "the datagram at b")
    finally:
        await relay.close()
        await b_relay.close()
