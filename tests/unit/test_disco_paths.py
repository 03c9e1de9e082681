"""Disco path selection (tailpy.magicsock.paths, tailpy.magicsock.disco) driven by a fake clock.

Two real :class:`DiscoNode` objects with real disco keys exchange sealed datagrams through a simulated network
(an event queue: per-endpoint latency, endpoints that drop everything, a DERP relay with its own latency), so
each scenario runs both sides of the protocol, NaCl boxes included, in virtual time.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.keys import DiscoPrivate, NodePrivate, NodePublic
from tailpy.magicsock import paths
from tailpy.magicsock.disco import Action, DiscoNode, PeerInfo, SendDERP, SendUDP
from tailpy.magicsock.paths import (
    HEARTBEAT_INTERVAL,
    SESSION_ACTIVE_TIMEOUT,
    TRUST_DURATION,
    AddrClass,
    LocalInfo,
    PeerPaths,
    PingResult,
    PingTimeout,
    Send,
    SetPath,
    ViaDERP,
)
from tailpy.proto import disco
from tailpy.proto.disco import CallMeMaybe, Endpoint, Ping, Pong


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


A_PUB, A_LAN = ep("192.0.2.1:41641"), ep("198.18.0.1:41641")
B_PUB, B_LAN = ep("203.0.113.2:41641"), ep("198.18.0.2:41641")
DERP_DELAY = 0.030


def counter_txids() -> Iterator[bytes]:
    for i in itertools.count(1):
        yield i.to_bytes(12, "big")


@dataclass
class Host:
    name: str
    node: DiscoNode
    node_key: NodePublic
    endpoints: tuple[Endpoint, ...]
    paths: dict[NodePublic, Endpoint | None] = field(default_factory=dict)
    results: list[PingResult | PingTimeout] = field(default_factory=list)
    sent_udp: list[SendUDP] = field(default_factory=list)
    sent_udp_at: list[float] = field(default_factory=list)
    sent_derp: list[SendDERP] = field(default_factory=list)
    path_log: list[tuple[float, Endpoint | None]] = field(default_factory=list)


class Net:
    """Virtual time and a network between hosts: UDP to an endpoint takes ``delay[endpoint]`` seconds (or is
    lost if the endpoint is in ``dropped``); DERP takes :data:`DERP_DELAY`. Traffic keeps peers active."""

    def __init__(self) -> None:
        self.now = 0.0
        self.hosts: dict[str, Host] = {}
        self.owner: dict[Endpoint, Host] = {}
        self.delay: dict[Endpoint, float] = {}
        self.dropped: set[Endpoint] = set()
        self.derp_down = False
        self.traffic: set[tuple[str, str]] = set()  # (from, to) pairs with data flowing
        # Hosts behind a port-restricted cone NAT: a datagram reaches them only from an endpoint they have
        # sent to (the mapping is endpoint-independent: their one public endpoint).
        self.natted: set[str] = set()
        self.opened: dict[str, set[Endpoint]] = {}
        self.nat_drops = 0
        self._q: list[tuple[float, int, str, tuple[Host, bytes, Any]]] = []
        self._seq = itertools.count()

    def add(self, name: str, endpoints: tuple[Endpoint, ...], delays: dict[Endpoint, float]) -> Host:
        txids = counter_txids()
        key = NodePrivate.generate().public
        node = DiscoNode(
            DiscoPrivate.generate(),
            key,
            endpoints=endpoints,
            txid=lambda: next(txids),
        )
        h = Host(name, node, key, endpoints)
        self.hosts[name] = h
        for e in endpoints:
            self.owner[e] = h
            self.delay[e] = delays.get(e, 0.010)
        return h

    def netmap(self) -> None:
        for h in self.hosts.values():
            peers = [
                PeerInfo(o.node_key, o.node.public, tuple(o.endpoints))
                for o in self.hosts.values()
                if o is not h
            ]
            self.act(h, h.node.on_netmap(peers, self.now))

    def act(self, h: Host, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, SendUDP):
                h.sent_udp.append(a)
                h.sent_udp_at.append(self.now)
                self.opened.setdefault(h.name, set()).add(a.endpoint)
                dst = self.owner.get(a.endpoint)
                if dst is None or a.endpoint in self.dropped:
                    continue
                # The source the receiver sees: our endpoint on the same network (LAN to LAN, else public).
                lan = a.endpoint.ip in ip_network("198.18.0.0/15")
                src = next(e for e in h.endpoints if (e.ip in ip_network("198.18.0.0/15")) == lan)
                if src in self.dropped:
                    continue
                self._at(self.now + self.delay[a.endpoint], "udp", (dst, a.datagram, src))
            elif isinstance(a, SendDERP):
                h.sent_derp.append(a)
                dst = next(o for o in self.hosts.values() if o.node_key == a.node_key)
                if not self.derp_down:
                    self._at(self.now + DERP_DELAY, "derp", (dst, a.datagram, h.node_key))
            elif isinstance(a, SetPath):
                h.paths[a.node_key] = a.endpoint
                h.path_log.append((self.now, a.endpoint))
            elif isinstance(a, (PingResult, PingTimeout)):
                h.results.append(a)
            else:  # pragma: no cover
                raise AssertionError(a)

    def _at(self, t: float, kind: str, what: tuple[Host, bytes, Any]) -> None:
        heapq.heappush(self._q, (t, next(self._seq), kind, what))

    def run(self, until: float, step: float = 0.25) -> None:
        """Advance to ``until``: deliver datagrams in time order, poll each node when its timer is due, and
        note activity every ``step`` seconds for the pairs in ``traffic``."""
        next_tick = self.now
        for _ in range(1_000_000):  # a guard: a timer that never advances would spin here
            timers = [(t, h) for h in self.hosts.values() if (t := h.node.next_timer()) is not None]
            t_q = self._q[0][0] if self._q else float("inf")
            t_timer = min((t for t, _ in timers), default=float("inf"))
            t = min(t_q, t_timer, next_tick)
            if t > until:
                break
            self.now = max(self.now, t)
            if t == next_tick:
                for a_name, b_name in sorted(self.traffic):
                    a, b = self.hosts[a_name], self.hosts[b_name]
                    a.node.note_activity(b.node_key, self.now)
                next_tick += step
            if t == t_q:
                _, _, kind, what = heapq.heappop(self._q)
                dst, datagram, src = what
                if kind == "udp":
                    if dst.name in self.natted and src not in self.opened.get(dst.name, set()):
                        self.nat_drops += 1
                        continue
                    self.act(dst, dst.node.feed(datagram, src, self.now))
                else:
                    self.act(dst, dst.node.feed(datagram, ViaDERP(1), self.now, derp_src=src))
            for h in self.hosts.values():
                nt = h.node.next_timer()
                if nt is not None and nt <= self.now:
                    self.act(h, h.node.poll(self.now))
        else:
            raise AssertionError("the simulation did not advance")
        self.now = until
        for h in self.hosts.values():
            self.act(h, h.node.poll(self.now))


def two_hosts(
    a_delays: dict[Endpoint, float] | None = None, b_delays: dict[Endpoint, float] | None = None
) -> tuple[Net, Host, Host]:
    net = Net()
    a = net.add("a", (A_PUB, A_LAN), a_delays or {})
    b = net.add("b", (B_PUB, B_LAN), b_delays or {})
    net.netmap()
    return net, a, b


# --- scenarios ----------------------------------------------------------------------------------------------


def test_relay_from_the_first_packet_then_direct_on_first_pong() -> None:
    net, a, b = two_hosts()
    assert a.paths == {b.node_key: None} and b.paths == {a.node_key: None}  # relay before anything is sent
    assert a.node.next_timer() is None  # nothing to do while no traffic flows
    net.traffic = {("a", "b")}
    net.run(0.0)
    # The first packet: pings to every endpoint of b at once, and a CallMeMaybe via DERP.
    pinged = {s.endpoint for s in a.sent_udp if isinstance(s.message, Ping)}
    assert pinged == {B_PUB, B_LAN}
    assert [type(s.message) for s in a.sent_derp] == [CallMeMaybe]
    assert set(a.sent_derp[0].message.endpoints) == {A_PUB, A_LAN}  # type: ignore[union-attr]
    assert a.paths[b.node_key] is None  # still relay until a pong
    net.run(0.1)
    assert a.paths[b.node_key] == B_LAN  # first pong (10 ms there and back): direct, LAN wins the tie
    first_direct = next(t for t, p in a.path_log if p is not None)
    assert first_direct == pytest.approx(0.020)
    # b answered over UDP to the source it saw and learned it; the CallMeMaybe made it ping a's endpoints.
    pongs = [s for s in b.sent_udp if isinstance(s.message, Pong)]
    assert pongs and all(s.endpoint == s.message.src for s in pongs)  # type: ignore[union-attr]
    assert {s.endpoint for s in b.sent_udp if isinstance(s.message, Ping)} == {A_PUB, A_LAN}
    assert b.paths[a.node_key] == A_LAN  # b is direct too, from its own pongs
    assert a.node.counters.dropped() == 0 and b.node.counters.dropped() == 0


def test_prefers_lower_latency() -> None:
    # The LAN path is 40 ms each way, the public one 5 ms: latency beats LAN when it is clearly lower.
    net, a, b = two_hosts(b_delays={B_LAN: 0.040, B_PUB: 0.005}, a_delays={A_LAN: 0.040, A_PUB: 0.005})
    net.traffic = {("a", "b")}
    net.run(2.0)
    assert a.paths[b.node_key] == B_PUB
    peer = a.node.peer_paths(b.node_key)
    assert peer is not None
    assert peer.best_latency == pytest.approx(0.010)
    assert peer.candidates[B_LAN].latency == pytest.approx(0.080)


def test_lan_over_public_at_equal_latency() -> None:
    # Public 10.0 ms, LAN 10.1 ms each way: within LATENCY_TIE, so LAN is chosen though public pongs first.
    net, a, b = two_hosts(b_delays={B_LAN: 0.0101, B_PUB: 0.0100}, a_delays={A_LAN: 0.0101, A_PUB: 0.0100})
    net.traffic = {("a", "b")}
    net.run(0.1)
    assert a.path_log[-1][1] == B_LAN
    assert (0.0200, B_PUB) in [(round(t, 4), p) for t, p in a.path_log]  # public pong came first, then LAN
    net.run(20.0)
    assert a.paths[b.node_key] == B_LAN  # and it stays (no flapping on heartbeats)


def test_better_and_addr_class() -> None:
    pub, lan = ep("192.0.2.9:1"), ep("10.1.2.3:1")
    assert paths.addr_class(lan.ip) is AddrClass.LAN
    assert paths.addr_class(pub.ip) is AddrClass.PUBLIC
    assert paths.addr_class(pub.ip, [ip_network("192.0.2.0/24")]) is AddrClass.LAN  # on one of our subnets
    assert paths.addr_class(ep("[fe80::1]:1").ip) is AddrClass.LINK_LOCAL
    assert paths.addr_class(ep("127.0.0.1:1").ip) is AddrClass.LOOPBACK
    assert paths.better(lan, 0.012, pub, 0.010)  # tie: LAN wins
    assert not paths.better(pub, 0.010, lan, 0.012)
    assert paths.better(pub, 0.005, lan, 0.020)  # clearly faster wins
    assert not paths.better(ep("192.0.2.10:1"), 0.009, pub, 0.010)  # same class, within the tie: stay


def test_back_to_relay_when_pongs_stop_and_direct_again_after() -> None:
    net, a, b = two_hosts()
    net.traffic = {("a", "b")}
    net.run(5.0)
    assert a.paths[b.node_key] == B_LAN
    peer = a.node.peer_paths(b.node_key)
    assert peer is not None
    # The direct paths die (a firewall starts dropping UDP both ways); DERP still works.
    net.dropped = {A_PUB, A_LAN, B_PUB, B_LAN}
    cut = net.now
    last_pong = peer.candidates[B_LAN].last_pong
    assert last_pong is not None and last_pong <= cut
    net.run(cut + TRUST_DURATION + HEARTBEAT_INTERVAL + 0.5)
    assert a.paths[b.node_key] is None
    back = [t for t, p in a.path_log if p is None and t > cut]
    assert back and back[0] == pytest.approx(last_pong + TRUST_DURATION)
    assert back[0] - cut <= TRUST_DURATION + HEARTBEAT_INTERVAL
    # Discovery keeps trying while traffic flows (full rounds, CallMeMaybe via DERP) and finds the path again.
    derp_before = len(a.sent_derp)
    net.run(net.now + 6.0)
    assert len(a.sent_derp) > derp_before
    net.dropped = set()
    healed = net.now
    net.run(healed + 6.0)
    assert a.paths[b.node_key] is not None  # direct again: whichever endpoint answered the next round first
    again = [t for t, p in a.path_log if p is not None and t > healed]
    assert again and again[0] - healed <= HEARTBEAT_INTERVAL + 0.1
    # A direct path slower than GOOD_ENOUGH_LATENCY is re-probed every UPGRADE_INTERVAL: LAN wins in the end.
    net.run(healed + paths.UPGRADE_INTERVAL + HEARTBEAT_INTERVAL + 1.0)
    assert a.paths[b.node_key] == B_LAN


def test_call_me_maybe_triggers_pings_to_all_endpoints_at_once() -> None:
    net, a, b = two_hosts()
    net.traffic = {("a", "b")}
    net.run(0.0)
    (cmm,) = a.sent_derp
    net.run(DERP_DELAY)  # the CallMeMaybe reached b
    pings = [s for s in b.sent_udp if isinstance(s.message, Ping)]
    assert {s.endpoint for s in pings} == {A_PUB, A_LAN}
    assert b.node.counters.call_me_maybes == 1
    # A CallMeMaybe overrides the 5 s re-probe limit: a second one pings again at once.
    before = len(b.sent_udp)
    again = b.node.feed(disco.seal(a.node.private, b.node.public, cmm.message), ViaDERP(1), net.now + 0.5)
    assert {x.endpoint for x in again if isinstance(x, SendUDP) and isinstance(x.message, Ping)} == {
        A_PUB,
        A_LAN,
    }
    assert len(b.sent_udp) == before  # (returned, not yet carried out by the test network)


def test_simultaneous_open_through_port_restricted_nats() -> None:
    """Both hosts behind port-restricted NATs, only public endpoints: a's first Pings die in b's NAT, but
    they open a's; the CallMeMaybe via DERP makes b ping a (opening b's NAT), and both go direct."""
    net = Net()
    a = net.add("a", (A_PUB,), {})
    b = net.add("b", (B_PUB,), {})
    net.natted = {"a", "b"}
    net.netmap()
    net.traffic = {("a", "b")}
    net.run(1.0)
    assert net.nat_drops >= 1  # a's first Ping did not get through
    assert b.paths[a.node_key] == A_PUB  # b pinged after the CallMeMaybe (30 ms) and got a Pong
    assert a.paths[b.node_key] == B_PUB  # a pinged b back when b's Ping arrived
    t_a = next(t for t, p in a.path_log if p is not None)
    assert t_a < 0.1  # DERP one way + a few UDP round trips, not the next 5 s round
    assert b.node.counters.call_me_maybes == 1


def test_call_me_maybe_endpoints_are_learned_and_replaced() -> None:
    local = LocalInfo(NodePrivate.generate().public)
    peer = PeerPaths(NodePrivate.generate().public, local, [B_PUB])
    x, y = ep("198.51.100.7:5"), ep("198.51.100.8:6")
    peer.on_call_me_maybe(CallMeMaybe((x, y, ep("[fe80::1]:1"), ep("0.0.0.0:0"))), 1.0)
    assert set(peer.candidates) == {B_PUB, x, y}  # link-local and unspecified skipped
    sent = [a for a in peer.drain() if isinstance(a, Send)]
    assert {a.to for a in sent} == {B_PUB, x, y}
    peer.on_call_me_maybe(CallMeMaybe((y,)), 2.0)
    assert set(peer.candidates) == {B_PUB, y}  # x came only from the previous CallMeMaybe


def test_idle_peer_stops_heartbeating() -> None:
    net, a, b = two_hosts()
    net.traffic = {("a", "b")}
    net.run(10.0)
    assert a.paths[b.node_key] == B_LAN
    net.traffic = set()
    stopped = net.now
    net.run(stopped + SESSION_ACTIVE_TIMEOUT + 10.0)
    pings_at = [t for t, s in zip(a.sent_udp_at, a.sent_udp, strict=True) if isinstance(s.message, Ping)]
    assert [t for t in pings_at if t > stopped], "heartbeats go on while the session is active"
    assert max(pings_at) <= stopped + SESSION_ACTIVE_TIMEOUT + HEARTBEAT_INTERVAL
    n = len(a.sent_udp)
    net.run(net.now + 60.0)
    assert len(a.sent_udp) == n  # idle: nothing more
    assert a.paths[b.node_key] is None  # the trust ran out: relay until traffic resumes
    assert a.node.next_timer() is None  # no timer at all while idle
    net.traffic = {("a", "b")}
    resumed = net.now
    net.run(resumed + 1.0)
    assert a.paths[b.node_key] == B_LAN  # discovery again on the first packet


def test_heartbeat_timing_with_peer_paths_directly() -> None:
    """The heartbeat schedule, seen on one PeerPaths with hand-fed Pongs (no network)."""
    local = LocalInfo(NodePrivate.generate().public, endpoints=(A_PUB,))
    peer = PeerPaths(NodePrivate.generate().public, local, [B_PUB])
    peer.note_activity(0.0)
    peer.poll(0.0)
    (ping_b,) = [a for a in peer.drain() if isinstance(a, Send) and isinstance(a.message, Ping)]
    assert isinstance(ping_b.message, Ping)
    assert peer.on_pong(Pong(ping_b.message.txid, A_PUB), B_PUB, 0.02)
    assert peer.drain() == [SetPath(peer.node_key, B_PUB)]
    times = []
    t = 0.02
    for _ in range(5):  # keep traffic flowing and answer every heartbeat at once
        nt = peer.next_timer()
        assert nt is not None
        t = nt
        peer.note_activity(t)
        peer.poll(t)
        for a in peer.drain():
            if isinstance(a, Send) and isinstance(a.message, Ping) and a.to == B_PUB:
                times.append(t)
                peer.on_pong(Pong(a.message.txid, A_PUB), B_PUB, t + 0.01)
        peer.drain()
    assert times == pytest.approx([3.0, 6.0, 9.0, 12.0, 15.0])
    assert peer.path == B_PUB
    # An unknown Pong is refused and counted.
    assert not peer.on_pong(Pong(bytes(12), A_PUB), B_PUB, t)
    assert peer.counters.pongs_unknown_txid == 1


def test_ping_received_is_answered_and_learned() -> None:
    local = LocalInfo(NodePrivate.generate().public)
    peer = PeerPaths(NodePrivate.generate().public, local, [])
    src = ep("198.51.100.77:1234")
    peer.on_ping(Ping(b"t" * 12, None), src, 1.0)
    assert peer.drain() == [Send(peer.node_key, src, Pong(b"t" * 12, src))]
    assert src in peer.candidates
    peer.on_ping(Ping(b"t" * 12, None), src, 1.1)  # the same Ping again: one Pong only
    assert peer.drain() == []
    peer.on_ping(Ping(b"u" * 12, None), ViaDERP(7), 1.2)  # via DERP: answered via DERP, nothing learned
    assert peer.drain() == [Send(peer.node_key, None, Pong(b"u" * 12, Endpoint(paths.DERP_MAGIC_IP, 7)))]
    # A learned endpoint is forgotten 45 s after its last Ping (at the next full round).
    peer.note_activity(100.0)
    peer.poll(100.0)
    assert src not in peer.candidates


def test_cli_ping_reports_via_derp_then_direct() -> None:
    net, a, b = two_hosts()
    request, actions = a.node.ping(b.node_key, net.now)
    net.act(a, actions)
    net.run(0.2)
    first = next(r for r in a.results if r.request == request)
    assert isinstance(first, PingResult)
    assert first.rtt == pytest.approx(2 * DERP_DELAY)
    assert str(first.via) == "DERP(1)" and not first.direct
    assert first.describe("b") == "pong from b via DERP(1) in 60ms"
    # The ping counted as traffic: discovery ran, and the next ping goes direct.
    request2, actions = a.node.ping(b.node_key, net.now)
    net.act(a, actions)
    net.run(net.now + 0.2)
    second = next(r for r in a.results if r.request == request2)
    assert isinstance(second, PingResult) and second.direct
    assert second.via == B_LAN and second.describe("b") == "pong from b via 198.18.0.2:41641 in 20ms"
    assert [r.request for r in a.results] == [request, request2]  # one answer per request
    # While the direct path is untrusted a ping goes both ways; the first Pong answers it, the other one
    # still counts for its path (not an unknown txid).
    peer = a.node.peer_paths(b.node_key)
    assert peer is not None
    peer.trust_until = net.now
    request3, actions = a.node.ping(b.node_key, net.now)
    assert {type(x) for x in actions} == {SendUDP, SendDERP}
    net.act(a, actions)
    net.run(net.now + 0.2)
    third = [r for r in a.results if r.request == request3]
    assert len(third) == 1 and isinstance(third[0], PingResult) and third[0].direct
    assert a.node.counters.unknown_txid == 0


def test_cli_ping_times_out() -> None:
    net, a, b = two_hosts()
    net.derp_down = True
    net.dropped = {B_PUB, B_LAN}
    request, actions = a.node.ping(b.node_key, 0.0)
    net.act(a, actions)
    net.run(10.0)
    assert PingTimeout(request, b.node_key) in a.results
    with pytest.raises(KeyError):
        a.node.ping(NodePrivate.generate().public, 0.0)


# --- the node: routing, spoofing, counting ------------------------------------------------------------------


def test_spoofed_and_undecryptable_messages_are_dropped_and_counted() -> None:
    _, a, b = two_hosts()
    mallory = DiscoPrivate.generate()
    ping = Ping(b"m" * 12, b.node_key)
    n = a.node.counters
    # Unknown sender key: dropped before any crypto.
    assert a.node.feed(disco.seal(mallory, a.node.public, ping), B_PUB, 1.0) == []
    assert n.unknown_sender == 1
    # b's disco key in the header, but sealed by mallory: the box does not open.
    forged = disco.seal(mallory, a.node.public, ping)
    forged = forged[:6] + b.node.public.raw + forged[38:]
    assert a.node.feed(forged, B_PUB, 1.0) == []
    assert n.undecryptable == 1
    # A genuine datagram with one byte flipped.
    good = bytearray(disco.seal(b.node.private, a.node.public, ping))
    good[-3] ^= 0x40
    assert a.node.feed(bytes(good), B_PUB, 1.0) == []
    assert n.undecryptable == 2
    # Not disco at all, our own key.
    assert a.node.feed(b"\x01\x00\x00\x00" + bytes(100), B_PUB, 1.0) == []
    assert n.malformed == 1
    assert a.node.feed(disco.seal(a.node.private, a.node.public, ping), B_PUB, 1.0) == []
    assert n.from_self == 1
    # b's key, but a Ping claiming another node key.
    liar = Ping(b"l" * 12, NodePrivate.generate().public)
    assert a.node.feed(disco.seal(b.node.private, a.node.public, liar), B_PUB, 1.0) == []
    assert n.node_key_mismatch == 1
    # Via DERP from a node that does not own the disco key.
    msg = disco.seal(b.node.private, a.node.public, ping)
    assert a.node.feed(msg, ViaDERP(1), 1.0, derp_src=NodePrivate.generate().public) == []
    assert n.derp_source_mismatch == 1
    # CallMeMaybe is only accepted via DERP.
    cmm = disco.seal(b.node.private, a.node.public, CallMeMaybe((B_PUB,)))
    assert a.node.feed(cmm, B_PUB, 1.0) == []
    assert n.call_me_maybe_not_via_derp == 1
    # A Pong for no Ping of ours.
    pong = disco.seal(b.node.private, a.node.public, Pong(b"z" * 12, A_PUB))
    assert a.node.feed(pong, B_PUB, 1.0) == []
    assert n.unknown_txid == 1
    assert n.dropped() == 9
    # None of it touched a's path or learned an endpoint, and a genuine Ping still works.
    peer = a.node.peer_paths(b.node_key)
    assert peer is not None and set(peer.candidates) == {B_PUB, B_LAN} and a.paths[b.node_key] is None
    out = a.node.feed(disco.seal(b.node.private, a.node.public, ping), B_PUB, 1.0)
    assert [type(x) for x in out] == [SendUDP]
    assert disco.open_datagram(b.node.private, out[0].datagram)[1] == Pong(b"m" * 12, B_PUB)  # type: ignore[union-attr]
    assert n.pings == 1


def test_netmap_changes() -> None:
    net, a, b = two_hosts()
    net.traffic = {("a", "b")}
    net.run(1.0)
    assert a.paths[b.node_key] == B_LAN
    # The netmap drops b's LAN endpoint, but b pinged us from there lately: it stays a (learned) candidate.
    peers = [PeerInfo(b.node_key, b.node.public, (B_PUB,))]
    net.act(a, a.node.on_netmap(peers, net.now))
    assert a.paths[b.node_key] == B_LAN
    # An endpoint only the netmap gave, once gone from it, is left at once (relay until the next pong).
    peer = a.node.peer_paths(b.node_key)
    assert peer is not None
    peer.candidates[B_LAN].last_got_ping = None
    net.act(a, a.node.on_netmap(peers, net.now))
    assert a.paths[b.node_key] is None and B_LAN not in peer.candidates
    net.run(net.now + paths.PING_INTERVAL + HEARTBEAT_INTERVAL)  # B_PUB may be pinged again after 5 s
    assert a.paths[b.node_key] == B_PUB
    # b restarts with a new disco key: paths are forgotten, relay again, then rediscovered.
    b.node = DiscoNode(DiscoPrivate.generate(), b.node_key, endpoints=b.endpoints)
    net.netmap()
    assert a.paths[b.node_key] is None
    net.run(net.now + 4.0)
    assert a.paths[b.node_key] == B_LAN
    # b leaves the netmap: forgotten; its datagrams now count as unknown senders.
    net.act(a, a.node.on_netmap([], net.now))
    assert a.node.peer_paths(b.node_key) is None
    a.node.feed(disco.seal(b.node.private, a.node.public, Ping(b"q" * 12)), B_PUB, net.now)
    assert a.node.counters.unknown_sender == 1
    # A peer without a disco key gets no disco.
    net.act(a, a.node.on_netmap([PeerInfo(b.node_key, None, (B_PUB,))], net.now))
    assert a.node.peer_paths(b.node_key) is None


def test_status_view() -> None:
    net, a, b = two_hosts()
    net.traffic = {("a", "b")}
    net.run(1.0)
    (st,) = a.node.status(net.now)
    assert st.node_key == b.node_key and st.path == B_LAN and st.active
    assert st.latency == pytest.approx(0.020)
    assert dict(st.candidates)[B_PUB] == pytest.approx(0.020)


def test_candidates_are_bounded() -> None:
    local = LocalInfo(NodePrivate.generate().public)
    peer = PeerPaths(NodePrivate.generate().public, local, [])
    many = tuple(Endpoint.parse(f"198.51.100.{i}:{1000 + i}") for i in range(1, 200))
    peer.on_call_me_maybe(CallMeMaybe(many), 0.0)
    assert len(peer.candidates) == paths.MAX_CANDIDATES
    assert peer.counters.candidates_refused == 199 - paths.MAX_CANDIDATES


# --- fuzzing the node: any input sequence, no exception, invariants hold ------------------------------------

FUZZ_A = DiscoPrivate.generate()
FUZZ_B = DiscoPrivate.generate()
FUZZ_B_NODE = NodePrivate.generate().public
FUZZ_EPS = (B_PUB, B_LAN, ep("198.51.100.1:9"), ep("[2001:db8::5]:41641"))

fuzz_endpoints = st.sampled_from(FUZZ_EPS)
fuzz_messages = st.one_of(
    st.builds(Ping, st.binary(min_size=12, max_size=12), st.sampled_from([None, FUZZ_B_NODE])),
    st.builds(Pong, st.binary(min_size=12, max_size=12) | st.just((1).to_bytes(12, "big")), fuzz_endpoints),
    st.builds(CallMeMaybe, st.lists(fuzz_endpoints, max_size=5).map(tuple)),
)
fuzz_steps = st.lists(
    st.one_of(
        st.tuples(st.just("msg"), fuzz_messages, st.one_of(fuzz_endpoints, st.just(ViaDERP(1)))),
        st.tuples(st.just("junk"), st.binary(max_size=120), fuzz_endpoints),
        st.tuples(st.just("activity"), st.none(), st.none()),
        st.tuples(st.just("ping"), st.none(), st.none()),
        st.tuples(st.just("netmap"), st.lists(fuzz_endpoints, max_size=3).map(tuple), st.none()),
    ),
    max_size=40,
)


@given(fuzz_steps, st.lists(st.floats(0.0, 8.0), min_size=40, max_size=40))
@settings(max_examples=200, deadline=None)
def test_fuzz_node_inputs(steps: list[tuple[str, Any, Any]], gaps: list[float]) -> None:
    txids = counter_txids()
    node = DiscoNode(FUZZ_A, NodePrivate.generate().public, endpoints=(A_PUB,), txid=lambda: next(txids))
    node.on_netmap([PeerInfo(FUZZ_B_NODE, FUZZ_B.public, (B_PUB,))], 0.0)
    now = 0.0
    for (kind, x, y), gap in zip(steps, gaps, strict=False):
        now += gap
        out: list[Action] = []
        if kind == "msg":
            out = node.feed(disco.seal(FUZZ_B, FUZZ_A.public, x), y, now, derp_src=FUZZ_B_NODE)
        elif kind == "junk":
            out = node.feed(x, y, now)
            out += node.feed(disco.MAGIC + FUZZ_B.public.raw + x, y, now)
        elif kind == "activity":
            node.note_activity(FUZZ_B_NODE, now)
        elif kind == "ping":
            out = node.ping(FUZZ_B_NODE, now)[1]
        else:
            out = node.on_netmap([PeerInfo(FUZZ_B_NODE, FUZZ_B.public, tuple(x))], now)
        out += node.poll(now)
        for a in out:
            if isinstance(a, SendUDP):
                assert disco.open_datagram(FUZZ_B, a.datagram)[1] == a.message
        peer = node.peer_paths(FUZZ_B_NODE)
        assert peer is not None
        assert peer.path is None or (peer.path == peer.best and peer.path in peer.candidates)
        assert len(peer.candidates) <= paths.MAX_CANDIDATES
        nt = node.next_timer()
        assert nt is None or nt > now  # poll(now) left nothing due
