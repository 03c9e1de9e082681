"""magicsock.Conn's disco, STUN and netcheck over real UDP sockets on loopback: a stand-in data plane (the
Rust device's Python-facing calls over an asyncio UDP socket, tests/unit/_conn_device.py), a real STUN
server. `tailpy ping` goes direct after discovery, netcheck over the node's own socket finds the mapped
endpoint and reports it, relayed handshakes are copied to the best-guess endpoint; netcheck reports parse
back from JSON (fuzzed: only ParseError)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from _conn_device import FakeDevice
from hypothesis import given
from hypothesis import strategies as st

from tailpy.derp.stun_server import StunServer
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.ipnstate import PingReply
from tailpy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tailpy.magicsock import Conn, Options
from tailpy.magicsock.netcheck import Report
from tailpy.magicsock.ping import ping_reply
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, NetMap, Node


class Side:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = NodePrivate.generate()
        self.disco = DiscoPrivate.generate()
        self.device = FakeDevice()
        self.endpoint = Endpoint.parse("0.0.0.0:0")
        self.reported: list[list[Endpoint]] = []
        self.conn: Conn | None = None

    async def start(self) -> None:
        self.endpoint = Endpoint.parse(await self.device.start())
        self.conn = Conn(
            self.device,
            self.key,
            Options(
                self.disco,
                local_endpoints=lambda: [self.endpoint],
                on_endpoints=self.reported.append,
                monitor_links=False,
            ),
        )
        self.conn.start()

    def node(self, node_id: int) -> Node:
        return Node(
            node_id,
            self.name,
            self.name,
            self.key.public,
            MachinePrivate.generate().public,
            (f"100.64.0.{node_id}/32",),
            endpoints=(self.endpoint,),
            disco_key=self.disco.public,
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        self.device.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Side, Side]]:
    a, b = Side("a"), Side("b")
    await a.start()
    await b.start()
    na, nb = a.node(1), b.node(2)
    for me, peer, side in ((na, nb, a), (nb, na, b)):
        assert side.conn is not None
        side.device.add(peer.node_key.raw)  # the backend's part: the peer's key and allowed IPs
        side.conn.set_netmap(NetMap(me, {peer.id: peer}))
    yield a, b
    await a.close()
    await b.close()


async def test_ping_goes_direct_after_discovery(pair: tuple[Side, Side]) -> None:
    a, b = pair
    assert a.conn is not None
    assert a.device.paths[b.key.public.raw] == "direct"  # no relay region: the netmap endpoint, direct
    replies = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = await a.conn.ping(b.key.public, timeout=2.0)
        replies.append(r)
        if r.direct:
            break
    assert replies[-1].direct, replies
    assert replies[-1].via == str(b.endpoint) and replies[-1].rtt is not None
    assert replies[-1].peer_saw == a.endpoint
    # The path machine put b on the direct path to the endpoint that answered.
    assert a.device.paths[b.key.public.raw] == "direct"
    assert a.device.endpoints[b.key.public.raw] == str(b.endpoint)
    st = a.conn.status().traversal
    assert st.peers[b.key.public].path == b.endpoint and st.disco["pongs"] >= 1
    with pytest.raises(KeyError):
        await a.conn.ping(NodePrivate.generate().public)


def _relayed_netmap(me: Node, peer: Node) -> NetMap:
    """``peer`` with home DERP region 900 (a relay nobody listens on): ``me`` relays it until disco finds a
    direct path."""
    node = DerpNode("900a", 900, "127.0.0.1", ipv4="127.0.0.1", derp_port=1, insecure_for_tests=True)
    dm = DerpMap({900: DerpRegion(900, "lab", "Lab", (node,))})
    return NetMap(me, {peer.id: dataclasses.replace(peer, home_derp=900)}, derp_map=dm)


async def test_relayed_handshake_is_copied_to_the_best_guess_endpoint(pair: tuple[Side, Side]) -> None:
    a, b = pair
    assert a.conn is not None
    a.conn.set_netmap(_relayed_netmap(a.node(1), b.node(2)))
    assert a.device.paths[b.key.public.raw] == "relay"
    b.device.received.clear()
    b.device.got.clear()
    handshake = b"\x01\x00\x00\x00" + bytes(144)  # a WireGuard handshake initiation's size and type
    a.device.queue_relay(b.key.public.raw, handshake)
    a.device.queue_relay(NodePrivate.generate().public.raw, handshake)
    await asyncio.wait_for(b.device.got.wait(), 5)
    assert b.device.received == [handshake] and a.conn.copied == 1


async def test_unconfirmed_direct_path_and_pending_handshakes(pair: tuple[Side, Side]) -> None:
    """With no relay region, a peer goes direct to its netmap endpoint unconfirmed (the data plane also
    relays its handshakes); a Pong confirms it. Each change of path re-sends a pending handshake at once,
    and the data plane's own relayed copy of a handshake is not copied to the endpoint a second time."""
    a, b = pair
    assert a.conn is not None
    key = b.key.public.raw
    assert (a.device.paths[key], a.device.confirmed[key]) == ("direct", False)
    a.device.pending.add(key)
    a.device.retried.clear()
    a.device.queue_relay(key, b"\x01\x00\x00\x00" + bytes(144))
    await asyncio.sleep(0.05)
    assert a.conn.copied == 0
    deadline = time.monotonic() + 30
    while not (r := await a.conn.ping(b.key.public, timeout=2.0)).direct:
        assert time.monotonic() < deadline, r
    assert a.device.confirmed[key] is True
    assert a.device.retried == [key] and a.conn.handshakes_retried == 1  # once, when the Pong confirmed it
    # A netmap in which the peer's entry changed (here: a home region) places it again and re-sends.
    a.conn.set_netmap(_relayed_netmap(a.node(1), b.node(2)))
    assert a.device.retried.count(key) >= 2


async def test_wireguard_over_derp_from_a_peer_without_region_moves_it_to_that_region(
    pair: tuple[Side, Side],
) -> None:
    """A disco peer whose home region is not known yet goes direct, unconfirmed; once its WireGuard arrives
    over DERP, answers go back through that region (not to an endpoint nothing confirmed)."""
    a, b = pair
    assert a.conn is not None
    key = b.key.public.raw
    assert (a.device.paths[key], a.device.confirmed[key]) == ("direct", False)
    initiation = b"\x01\x00\x00\x00" + bytes(144)
    a.conn._on_derp_packet(b.key.public, initiation, 900)
    assert a.device.paths[key] == "relay" and a.conn.relay_region(key) == 900
    assert a.device.injected[-1] == (key, initiation)


async def test_initiation_from_a_node_not_yet_in_the_netmap_is_held_until_it_is() -> None:
    side = Side("a")
    other = Side("b")
    try:
        await side.start()
        assert side.conn is not None
        me, peer = side.node(1), other.node(2)
        side.conn.set_netmap(NetMap(me, {}))
        initiation = b"\x01\x00\x00\x00" + bytes(144)
        side.conn._on_derp_packet(other.key.public, initiation, 900)  # over DERP, before its netmap entry
        side.conn._on_derp_packet(other.key.public, b"\x04\x00\x00\x00" + bytes(28), 900)  # data: dropped
        assert side.device.injected == []
        side.device.add(peer.node_key.raw)
        side.conn.set_netmap(NetMap(me, {peer.id: peer}))
        assert side.device.injected == [(peer.node_key.raw, initiation)]
        assert side.conn.relay_region(peer.node_key.raw) == 900  # answered the way it came
    finally:
        await side.close()


async def test_netcheck_over_the_nodes_socket_reports_its_endpoint() -> None:
    stun = StunServer()
    await stun.start("127.0.0.1", 0)
    side = Side("a")
    try:
        await side.start()
        assert side.conn is not None
        port = stun.addresses[0][1]
        node = DerpNode(
            "900a", 900, "127.0.0.1", ipv4="127.0.0.1", stun_port=port, derp_port=1, insecure_for_tests=True
        )
        dm = DerpMap({900: DerpRegion(900, "lab", "Lab", (node,))})
        nm = NetMap(side.node(1), {}, derp_map=dm)
        side.conn.set_netmap(nm)
        report = await side.conn.netcheck(timeout=2.0)
        assert report is not None and report.udp
        assert report.global_v4 == side.endpoint  # the node's own socket, as the STUN server saw it
        assert 900 in report.region_latency
        assert side.conn.endpoints == [side.endpoint]
        assert side.reported and side.reported[-1] == [side.endpoint]
        again = Report.from_json(report.to_json())
        assert again.global_v4 == report.global_v4 and again.region_latency == report.region_latency
    finally:
        await side.close()
        await stun.stop()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=20,
)


@given(_json)
def test_report_from_json_only_parse_errors(obj: object) -> None:
    try:
        got = Report.from_json(obj)
    except ParseError:
        return
    assert isinstance(got, Report)


def test_ping_reply_via_derp_has_no_peer_saw() -> None:
    """A Pong relayed by DERP carries the DERP placeholder 127.3.3.40:<region> as our source: `tailpy ping
    --json` says null there, not that address; a direct Pong keeps what the peer saw."""
    from ipaddress import ip_address

    from tailpy.magicsock.disco import PingResult, ViaDERP
    from tailpy.magicsock.paths import DERP_MAGIC_IP

    key = NodePrivate.generate().public
    codes = {900: "tailpy"}
    derp = PingResult(1, key, ViaDERP(900), 0.003, Endpoint(DERP_MAGIC_IP, 900))
    reply = ping_reply(derp, lambda r: codes.get(r, ""))
    assert reply.to_json() == {
        "direct": False,
        "via": "DERP(tailpy)",
        "rtt": 0.003,
        "peer_saw": None,
        "timeout": False,
    }
    assert ping_reply(derp, lambda r: "").via == "DERP(900)"
    seen = Endpoint(ip_address("203.0.113.5"), 41641)
    direct = PingResult(2, key, Endpoint(ip_address("198.51.100.7"), 41641), 0.001, seen)
    reply = ping_reply(direct, lambda r: "")
    assert reply.direct and reply.via == "198.51.100.7:41641" and str(reply.peer_saw) == "203.0.113.5:41641"
    assert PingReply(False, "", None, timeout=True).to_json()["peer_saw"] is None


def test_status_json_endpoint_is_null_while_relayed(tmp_path: Any) -> None:
    """`tailpy status --json`: the data plane keeps a relayed peer's would-be direct endpoint (often its
    unreachable LAN address); status shows an endpoint only with "path": "direct", for one that answered."""
    from tailpy.cli.status import peer_state
    from tailpy.daemon.backend import Backend
    from tailpy.daemon.state import StateStore

    def no_device(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no device in this test")

    backend = Backend(StateStore(tmp_path), no_device, configure_os=False)
    node = Node(
        2, "b", "b", NodePrivate.generate().public, MachinePrivate.generate().public, ("100.64.0.2/32",)
    )
    stats = {"endpoint": "192.168.1.20:41641", "tx_bytes": 0, "rx_bytes": 0}
    relayed = backend._peer_status(node, {**stats, "path": "relay"}, time.time())
    assert relayed.to_json()["path"] == "relay" and relayed.to_json()["endpoint"] is None
    assert peer_state(dataclasses.replace(relayed, online=True), time.time()) == "idle; relay"
    # Sent to directly but never answered there (nothing confirmed it): no path yet, not "direct".
    guess = backend._peer_status(node, {**stats, "path": "direct"}, time.time())
    assert guess.to_json()["path"] is None and guess.to_json()["endpoint"] is None
    assert peer_state(dataclasses.replace(guess, online=True), time.time()) == "idle; no path yet"


async def test_tick_rearms_for_the_earliest_deadline_and_periodic_jobs_run_on_request() -> None:
    """The tick (tailpy.magicsock.tick): one timer, re-armed for whatever deadline is earliest after each
    event; a periodic job runs at once when asked, and once more right after a run if asked during it."""
    import math
    import random

    from tailpy.magicsock.tick import Periodic, Tick

    loop = asyncio.get_running_loop()
    due = math.inf  # the owner's own deadline
    fired: list[float] = []
    runs: list[float] = []
    gate = asyncio.Event()

    async def job() -> None:
        runs.append(loop.time())
        await gate.wait()

    def on_timer(now: float) -> None:
        nonlocal due
        if now >= due:
            fired.append(now)
            due = math.inf  # done: the owner moves its deadline
        periodic.run_if_due(now)

    tick = Tick(loop.time, lambda: min(due, periodic.at), on_timer)
    periodic = Periodic(tick, "job", job, (3600.0, 3600.0), random.Random(1))
    tick.start()

    async def until(cond: Callable[[], bool]) -> None:
        for _ in range(100):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    try:
        due = loop.time() + 0.05
        tick.rearm()
        await until(lambda: len(fired) == 1)
        periodic.soon()
        await until(lambda: len(runs) == 1)
        periodic.soon()  # asked during the run: runs again right after it
        gate.set()
        await until(lambda: len(runs) == 2)
        assert periodic.at > loop.time() + 3000  # then the next run is a draw away
        assert len(fired) == 1
    finally:
        await tick.close()
