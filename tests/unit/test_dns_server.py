"""The MagicDNS listener on loopback with real sockets: local answers over UDP and TCP, forwarding to a real
upstream (a dnspython-driven UDP/TCP server in the test), TCP fallback for truncated upstream answers,
SERVFAIL when the upstream is dead, and serving on after garbage."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rrset
import pytest

from tailpy.dns.config import DNSConfig
from tailpy.dns.resolver import Resolver
from tailpy.dns.server import DNSServer
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import NetMap, Node


def node(i: int, name: str) -> Node:
    return Node(
        id=i,
        name=name,
        hostname=name,
        node_key=NodePrivate.generate().public,
        machine_key=MachinePrivate.generate().public,
        addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
    )


class Upstream:
    """A tiny authoritative server on 127.0.0.1 (UDP + TCP): ``big.example`` has 200 A records, every
    other name one A record 192.0.2.1; counts the questions it got."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, wire: bytes, limit: int) -> bytes:
        q = dns.message.from_wire(wire)
        self.asked.append(q.question[0].name.to_text())
        resp = dns.message.make_response(q)
        name = q.question[0].name
        rr = dns.rrset.RRset(name, 1, 1)
        count = 200 if name == dns.name.from_text("big.example.") else 1
        for i in range(count):
            rr.add(
                dns.rdata.from_text(1, 1, f"198.18.{i // 250}.{i % 250 + 1}" if count > 1 else "192.0.2.1"),
                60,
            )
        resp.answer.append(rr)
        return resp.to_wire(max_size=limit, prefer_truncation=True)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tcp_sock = socket.socket()
        tcp_sock.bind(("127.0.0.1", 0))
        self.port = tcp_sock.getsockname()[1]
        outer = self

        class P(asyncio.DatagramProtocol):
            def connection_made(self, t: asyncio.BaseTransport) -> None:
                self.t = t

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.t.sendto(outer.answer(data, 1232), addr)  # type: ignore[attr-defined]

        t, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", self.port))
        self._udp = t  # type: ignore[assignment]

        async def tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            n = int.from_bytes(await r.readexactly(2), "big")
            out = self.answer(await r.readexactly(n), 65535)
            w.write(len(out).to_bytes(2, "big") + out)
            await w.drain()
            w.close()

        self._tcp = await asyncio.start_server(tcp, sock=tcp_sock)

    def close(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    up.close()


async def serve(resolver: Resolver) -> tuple[DNSServer, int]:
    server = DNSServer(resolver, upstream_timeout=0.5)
    [(_, port)] = await server.start([("127.0.0.1", 0)])
    return server, port


async def test_local_names_over_udp_and_tcp(upstream: Upstream) -> None:
    r = Resolver()
    r.update(NetMap(node(1, "me"), {2: node(2, "pi")}, "ts.test"))
    server, port = await serve(r)
    try:
        q = dns.message.make_query("PI.ts.test", "A")
        for resp in (
            await dns.asyncquery.udp(q, "127.0.0.1", timeout=2, port=port),
            await dns.asyncquery.tcp(q, "127.0.0.1", timeout=2, port=port),
        ):
            assert [rd.to_text() for rd in resp.answer[0]] == ["100.64.0.2"]
            assert resp.answer[0].name.to_text() == "PI.ts.test."
    finally:
        server.close()
        await server.wait_closed()
    assert upstream.asked == []


async def test_forwarding_split_dns_and_tcp_fallback(upstream: Upstream) -> None:
    r = Resolver()
    cfg = DNSConfig(nameservers=(f"127.0.0.1:{upstream.port}",))
    r.update(NetMap(node(1, "me"), {}, "ts.test"), cfg)
    server, port = await serve(r)
    try:
        resp = await dns.asyncquery.udp(
            dns.message.make_query("www.Example.org", "A"), "127.0.0.1", timeout=3, port=port
        )
        assert resp.rcode() == dns.rcode.NOERROR and resp.answer[0][0].to_text() == "192.0.2.1"
        assert resp.question[0].name.to_text() == "www.Example.org."
        # 200 records: the upstream truncates over UDP, MagicDNS asks it again over TCP, then cuts the
        # answer to the client's 512 bytes (no EDNS) with TC; the client's TCP query gets all 200.
        q = dns.message.make_query("big.example", "A")
        udp = await dns.asyncquery.udp(q, "127.0.0.1", timeout=3, port=port)
        wire_len = len(udp.to_wire())
        assert udp.flags & dns.flags.TC and wire_len <= 512 and 0 < len(udp.answer[0]) < 200
        tcp = await dns.asyncquery.tcp(q, "127.0.0.1", timeout=3, port=port)
        assert len(tcp.answer[0]) == 200 and not tcp.flags & dns.flags.TC
        assert upstream.asked.count("big.example.") >= 3  # UDP, TCP retry, then the client's TCP query
    finally:
        server.close()
        await server.wait_closed()


async def test_dead_upstream_gives_servfail_and_garbage_is_survived() -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # bound, never answers
    r = Resolver([(ipaddress.ip_address("127.0.0.1"), dead.getsockname()[1])])
    r.update(NetMap(node(1, "me"), {}, "ts.test"))
    server, port = await serve(r)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"\x00\x01garbage-that-is-not-dns", ("127.0.0.1", port))
        s.sendto(b"\x07", ("127.0.0.1", port))
        s.close()
        resp = await dns.asyncquery.udp(
            dns.message.make_query("www.example.org", "A"), "127.0.0.1", timeout=5, port=port
        )
        assert resp.rcode() == dns.rcode.SERVFAIL
        ok = await dns.asyncquery.udp(
            dns.message.make_query("me.ts.test", "A"), "127.0.0.1", timeout=2, port=port
        )
        assert ok.answer
        assert r.bad == 2
    finally:
        dead.close()
        server.close()
        await server.wait_closed()
