"""tailpyd's NAT traversal shell (tailpy.magicsock.traversal.Traversal) over real UDP sockets on loopback:
a stand-in data plane (the Rust device's Python-facing calls over an asyncio UDP socket), a real MagicSock,
a real STUN server. `tailpy ping` goes direct after discovery, netcheck over the node's own socket finds the
mapped endpoint and reports it, relayed handshakes are copied to the best-guess endpoint; netcheck reports
parse back from JSON (fuzzed: only ParseError)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tailpy.derp.stun_server import StunServer
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.ipnstate import PingReply
from tailpy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tailpy.magicsock import MagicSock
from tailpy.magicsock.netcheck import Report
from tailpy.magicsock.traversal import Traversal, ping_reply
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, NetMap, Node


class UdpDevice(asyncio.DatagramProtocol):
    """The calls Traversal and MagicSock make on ``tailpy._native.Device``, over a UDP socket on 127.0.0.1;
    every datagram received goes to the traversal (as the device queues STUN and disco for Python)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.traversal: Traversal | None = None
        self.paths: dict[bytes, str] = {}
        self.endpoints: dict[bytes, str] = {}
        self.received: list[bytes] = []
        self.got = asyncio.Event()

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.got.set()
        if self.traversal is not None:
            self.traversal.on_datagrams([(data, f"{addr[0]}:{addr[1]}")])

    def send_datagram(self, data: bytes, endpoint: str) -> None:
        host, _, port = endpoint.rpartition(":")
        assert self.transport is not None
        self.transport.sendto(data, (host.strip("[]"), int(port)))

    def set_path(self, public_key: bytes, path: str) -> None:
        self.paths[public_key] = path

    def set_peer(
        self, public_key: bytes, *, allowed_ips: list[str], endpoint: str | None = None, **_: Any
    ) -> None:
        if endpoint is not None:
            self.endpoints[public_key] = endpoint

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        pass

    def peers(self) -> list[dict[str, Any]]:
        return [
            {"public_key": k, "endpoint": e, "path": self.paths.get(k, "direct"), "tx_packets": 0}
            for k, e in self.endpoints.items()
        ]

    def stats(self) -> dict[str, int]:
        return {"dropped_send_error": 0}


class Side:
    def __init__(self, name: str) -> None:
        self.name = name
        self.key = NodePrivate.generate()
        self.disco = DiscoPrivate.generate()
        self.device = UdpDevice()
        self.endpoint = Endpoint.parse("0.0.0.0:0")
        self.reported: list[list[Endpoint]] = []
        self.ms: MagicSock | None = None
        self.tr: Traversal | None = None

    async def start(self) -> None:
        self.endpoint = Endpoint.parse(await self.device.start())
        self.ms = MagicSock(self.device, self.key)
        self.tr = Traversal(
            self.device,
            self.ms,
            self.disco,
            self.key.public,
            local_endpoints=lambda: [self.endpoint],
            on_endpoints=self.reported.append,
        )
        self.device.traversal = self.tr
        self.tr.start()

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
        if self.tr is not None:
            await self.tr.close()
        if self.ms is not None:
            await self.ms.close()
        if self.device.transport is not None:
            self.device.transport.close()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Side, Side]]:
    a, b = Side("a"), Side("b")
    await a.start()
    await b.start()
    na, nb = a.node(1), b.node(2)
    for me, peer, ms, tr in ((na, nb, a.ms, a.tr), (nb, na, b.ms, b.tr)):
        assert ms is not None and tr is not None
        nm = NetMap(me, {peer.id: peer})
        ms.set_netmap(nm)
        tr.set_netmap(nm)
    yield a, b
    await a.close()
    await b.close()


async def test_ping_goes_direct_after_discovery(pair: tuple[Side, Side]) -> None:
    a, b = pair
    assert a.tr is not None and a.ms is not None
    assert a.ms.disco_peers == {b.key.public.raw}  # the fallback policy leaves b to disco
    replies = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = await a.tr.ping(b.key.public, timeout=2.0)
        replies.append(r)
        if r.direct:
            break
    assert replies[-1].direct, replies
    assert replies[-1].via == str(b.endpoint) and replies[-1].rtt is not None
    assert replies[-1].peer_saw == a.endpoint
    # The path machine put b on the direct path to the endpoint that answered.
    assert a.device.paths[b.key.public.raw] == "direct" and a.device.endpoints[b.key.public.raw] == str(
        b.endpoint
    )
    st = a.tr.status()
    assert st.peers[b.key.public].path == b.endpoint and st.disco["pongs"] >= 1
    with pytest.raises(KeyError):
        await a.tr.ping(NodePrivate.generate().public)


async def test_relayed_handshake_is_copied_to_the_best_guess_endpoint(pair: tuple[Side, Side]) -> None:
    a, b = pair
    assert a.tr is not None
    b.device.received.clear()
    b.device.got.clear()
    handshake = b"\x01\x00\x00\x00" + bytes(144)  # a WireGuard handshake initiation's size and type
    a.tr.on_relay([(b.key.public.raw, handshake), (NodePrivate.generate().public.raw, handshake)])
    await asyncio.wait_for(b.device.got.wait(), 5)
    assert b.device.received == [handshake] and a.tr.copied == 1


async def test_netcheck_over_the_nodes_socket_reports_its_endpoint() -> None:
    stun = StunServer()
    await stun.start("127.0.0.1", 0)
    side = Side("a")
    try:
        await side.start()
        assert side.ms is not None and side.tr is not None
        port = stun.addresses[0][1]
        node = DerpNode(
            "900a", 900, "127.0.0.1", ipv4="127.0.0.1", stun_port=port, derp_port=1, insecure_for_tests=True
        )
        dm = DerpMap({900: DerpRegion(900, "lab", "Lab", (node,))})
        nm = NetMap(side.node(1), {}, derp_map=dm)
        side.ms.set_netmap(nm)
        side.tr.set_netmap(nm)
        report = await side.tr.netcheck(timeout=2.0)
        assert report is not None and report.udp
        assert report.global_v4 == side.endpoint  # the node's own socket, as the STUN server saw it
        assert 900 in report.region_latency
        assert side.tr.endpoints == [side.endpoint]
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
    unreachable LAN address); status shows it only with "path": "direct", as the text does."""
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
    direct = backend._peer_status(node, {**stats, "path": "direct"}, time.time())
    assert direct.to_json()["path"] == "direct" and direct.to_json()["endpoint"] == "192.168.1.20:41641"
    assert (
        peer_state(dataclasses.replace(direct, online=True), time.time()) == "idle; direct 192.168.1.20:41641"
    )
