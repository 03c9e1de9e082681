"""Disco over real UDP sockets on loopback, in real time: two DiscoNodes, each driven the way the design note
of tailpy.magicsock.disco says (feed received datagrams, poll at next_timer, note activity while traffic
flows), with a DERP stand-in that hands datagrams across in-process. Paths go direct, back to relay when the
UDP path is cut (datagrams dropped by the driver), and direct again when it heals. Timing is printed, never
asserted; waits are generous and poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tailpy.asyncutil import wait_event
from tailpy.endpoint import Endpoint
from tailpy.keys import DiscoPrivate, NodePrivate, NodePublic
from tailpy.magicsock.disco import Action, DiscoNode, PeerInfo, SendDERP, SendUDP
from tailpy.magicsock.paths import PingResult, PingTimeout, SetPath, ViaDERP

DERP_DELAY = 0.02  # seconds, the stand-in relay's one-way delay
WAIT = 30.0  # seconds: generous bound for any state to be reached


class Driver(asyncio.DatagramProtocol):
    """One node: a UDP socket on 127.0.0.1 and the DiscoNode, driven by asyncio."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.node_key = NodePrivate.generate().public
        self.node = DiscoNode(DiscoPrivate.generate(), self.node_key)
        self.transport: asyncio.DatagramTransport | None = None
        self.endpoint: Endpoint | None = None
        self.paths: dict[NodePublic, Endpoint | None] = {}
        self.results: list[PingResult | PingTimeout] = []
        self.peers: dict[NodePublic, Driver] = {}
        self.traffic_to: set[NodePublic] = set()
        self.cut = False  # drop every UDP datagram in and out (a firewall)
        self.wake = asyncio.Event()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        self.endpoint = Endpoint.parse(f"{host}:{port}")
        self.node.set_endpoints([self.endpoint])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.cut:
            self.act(self.node.feed(data, Endpoint.from_sockaddr(addr), time.monotonic()))

    def from_derp(self, data: bytes, src: NodePublic) -> None:
        self.act(self.node.feed(data, ViaDERP(1), time.monotonic(), derp_src=src))

    def act(self, actions: list[Action]) -> None:
        loop = asyncio.get_running_loop()
        for a in actions:
            if isinstance(a, SendUDP):
                if not self.cut and self.transport is not None:
                    self.transport.sendto(a.datagram, (str(a.endpoint.ip), a.endpoint.port))
            elif isinstance(a, SendDERP):
                peer = self.peers[a.node_key]
                loop.call_later(DERP_DELAY, peer.from_derp, a.datagram, self.node_key)
            elif isinstance(a, SetPath):
                self.paths[a.node_key] = a.endpoint
                self.changed.set()
            else:
                self.results.append(a)
                self.changed.set()
        self.wake.set()

    async def run(self) -> None:
        """Poll at the node's next timer; note activity every 0.2 s for peers we send traffic to."""
        next_traffic = 0.0
        while True:
            now = time.monotonic()
            if now >= next_traffic:
                for k in self.traffic_to:
                    self.node.note_activity(k, now)
                next_traffic = now + 0.2
            self.act(self.node.poll(now))
            self.wake.clear()
            nt = self.node.next_timer()
            until = min(nt if nt is not None else now + 1.0, next_traffic)
            await wait_event(self.wake, max(0.0, until - time.monotonic()))


async def until(cond: Callable[[], bool], timeout: float = WAIT) -> float:
    """Seconds until ``cond()`` holds (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_direct_relay_direct_over_loopback() -> None:
    a, b = Driver("a"), Driver("b")
    await a.start()
    await b.start()
    a.peers, b.peers = {b.node_key: b}, {a.node_key: a}
    for me, other in ((a, b), (b, a)):
        assert other.endpoint is not None
        me.act(me.node.on_netmap([PeerInfo(other.node_key, other.node.public, (other.endpoint,))], 0.0))
    assert a.paths == {b.node_key: None} and b.paths == {a.node_key: None}
    tasks = [asyncio.create_task(d.run()) for d in (a, b)]
    try:
        a.traffic_to = {b.node_key}
        b.traffic_to = {a.node_key}  # replies flow back: both sides active
        t_direct = await until(
            lambda: a.paths[b.node_key] == b.endpoint and b.paths[a.node_key] == a.endpoint
        )

        request, actions = a.node.ping(b.node_key, time.monotonic())
        a.act(actions)
        await until(lambda: any(r.request == request for r in a.results))
        (res,) = [r for r in a.results if r.request == request]
        assert isinstance(res, PingResult) and res.via == b.endpoint
        assert res.peer_saw == a.endpoint

        a.cut = b.cut = True  # the direct path dies; DERP still works
        t_relay = await until(lambda: a.paths[b.node_key] is None and b.paths[a.node_key] is None)
        request, actions = a.node.ping(b.node_key, time.monotonic())
        a.act(actions)
        await until(lambda: any(r.request == request for r in a.results))
        (res,) = [r for r in a.results if r.request == request]
        assert isinstance(res, PingResult) and str(res.via) == "DERP(1)"

        a.cut = b.cut = False
        t_healed = await until(
            lambda: a.paths[b.node_key] == b.endpoint and b.paths[a.node_key] == a.endpoint
        )
        first = a.results[0]
        assert isinstance(first, PingResult)
        print(
            f"\ndisco over loopback: direct after {t_direct * 1000:.0f} ms, relay {t_relay:.2f} s after the "
            f"cut, direct {t_healed:.2f} s after healing; ping direct rtt {first.rtt * 1e6:.0f} us"
        )
        assert a.node.counters.dropped() == 0 and b.node.counters.dropped() == 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in (a, b):
            if d.transport is not None:
                d.transport.close()
