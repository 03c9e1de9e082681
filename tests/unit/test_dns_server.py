"""The MagicDNS listener on loopback with real sockets: local answers over UDP and TCP, forwarding to a real
upstream (a dnspython-driven UDP/TCP server in the test), TCP fallback for truncated upstream answers,
SERVFAIL when the upstream is dead, and serving on after garbage."""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
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
        rr = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.A)
        count = 200 if name == dns.name.from_text("big.example.") else 1
        for i in range(count):
            rr.add(
                dns.rdata.from_text(
                    dns.rdataclass.IN,
                    dns.rdatatype.A,
                    f"198.18.{i // 250}.{i % 250 + 1}" if count > 1 else "192.0.2.1",
                ),
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
        self._udp = t

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
        s.sendto(b"\x00\x01\x01\x00garbage-that-is-not-dns", ("127.0.0.1", port))  # opcode QUERY
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


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port  # nothing listens there now: queries to it get ICMP port unreachable


def forwarding_resolver(*ports: int) -> Resolver:
    r = Resolver()
    cfg = DNSConfig(nameservers=tuple(f"127.0.0.1:{p}" for p in ports))
    r.update(NetMap(node(1, "me"), {}, "ts.test"), cfg)
    return r


async def test_refusing_first_upstream_fails_over_at_once_on_icmp(upstream: Upstream) -> None:
    # The upstream timeout and the stagger are far longer than the client waits: only reacting to the
    # ICMP port unreachable of the first upstream lets the second one answer in time.
    refusing = free_udp_port()
    r = forwarding_resolver(refusing, upstream.port)
    server = DNSServer(r, upstream_timeout=60, stagger=60)
    [(_, port)] = await server.start([("127.0.0.1", 0)])
    try:
        for name in ("www.example.org", "www.Example.net", "mail.example.org"):
            resp = await dns.asyncquery.udp(
                dns.message.make_query(name, "A"), "127.0.0.1", timeout=5, port=port
            )
            assert resp.answer[0][0].to_text() == "192.0.2.1"
        assert (ipaddress.ip_address("127.0.0.1"), refusing) in server.pool.dead  # remembered
        assert server.pool.order(r.upstreams_for(dns.name.from_text("x.example.")))[0][1] == upstream.port
    finally:
        server.close()
        await server.wait_closed()


async def test_silent_first_upstream_is_raced_and_then_asked_last(upstream: Upstream) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers, no ICMP either
    r = forwarding_resolver(silent.getsockname()[1], upstream.port)
    server = DNSServer(r, upstream_timeout=60, stagger=0.2)  # the client gives up long before 60 s
    [(_, port)] = await server.start([("127.0.0.1", 0)])
    try:
        q = dns.message.make_query("www.example.org", "A")
        for resp in (
            await dns.asyncquery.udp(q, "127.0.0.1", timeout=5, port=port),
            await dns.asyncquery.tcp(q, "127.0.0.1", timeout=5, port=port),
        ):
            assert resp.answer[0][0].to_text() == "192.0.2.1"
    finally:
        silent.close()
        server.close()
        await server.wait_closed()


class Malformed(asyncio.DatagramProtocol):
    """An upstream whose answers carry a record cut short (the reviewer's badup.py)."""

    def connection_made(self, t: asyncio.BaseTransport) -> None:
        self.t = t

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        i = 12
        while data[i]:
            i += data[i] + 1
        head = data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
        cut = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01"
        self.t.sendto(head + data[12 : i + 5] + cut, addr)  # type: ignore[attr-defined]


def ask_raw(q: dns.message.Message, port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(q.to_wire(), ("127.0.0.1", port))
        return s.recv(65535)


async def test_malformed_upstream_answer_is_never_relayed(upstream: Upstream) -> None:
    t, _ = await asyncio.get_running_loop().create_datagram_endpoint(Malformed, local_addr=("127.0.0.1", 0))
    bad_port = t.get_extra_info("sockname")[1]
    try:
        for ports, want in (
            ((bad_port,), dns.rcode.SERVFAIL),
            ((bad_port, upstream.port), dns.rcode.NOERROR),
        ):
            server = DNSServer(forwarding_resolver(*ports), upstream_timeout=2)
            [(_, port)] = await server.start([("127.0.0.1", 0)])
            try:
                wire = await asyncio.to_thread(ask_raw, dns.message.make_query("www.example.org", "A"), port)
                resp = dns.message.from_wire(wire)  # raises if the malformed answer was relayed
                assert resp.rcode() == want
                assert server.bad_upstream >= 1
            finally:
                server.close()
                await server.wait_closed()
    finally:
        t.close()


async def test_many_idle_tcp_connections_do_not_stop_udp_forwarding(upstream: Upstream) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 3000:
        pytest.skip(f"1,100 connections need 3000 file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 3000), hard))
    server = DNSServer(forwarding_resolver(upstream.port), tcp_idle=60)
    [(_, port)] = await server.start([("127.0.0.1", 0)])
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(1100):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        for _ in range(100):
            if server.dropped >= 1100 - server.max_tcp:
                break
            await asyncio.sleep(0.05)
        assert server.dropped >= 1100 - server.max_tcp  # the connections beyond the bound were closed
        resp = await dns.asyncquery.udp(
            dns.message.make_query("www.example.org", "A"), "127.0.0.1", timeout=5, port=port
        )
        assert resp.answer[0][0].to_text() == "192.0.2.1"
    finally:
        for _, w in conns:
            w.close()
        server.close()
        await server.wait_closed()
