"""MagicDNS's asyncio transports: UDP and TCP listeners (port 53 on 100.100.100.100 and fd7a:115c:a1e0::53
in a node) around :class:`tailpy.dns.resolver.Resolver`, and forwarding to upstream resolvers.

Forwarding uses dnspython's asyncio queries: UDP first (EDNS0, 1232 bytes), TCP when the upstream's answer
is truncated; each upstream of the list in turn gets ``upstream_timeout`` seconds; an answer with SERVFAIL
or REFUSED moves on to the next; when none answers the client gets SERVFAIL. TCP clients send any number of
length-prefixed queries on one connection (RFC 7766), answered in order; an idle connection is closed
after ``tcp_idle`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import typing
from collections.abc import Iterable

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode

from tailpy.dns.resolver import Forward, Reply, Resolver, Upstream, question_end
from tailpy.errors import ParseError

log = logging.getLogger("tailpy.dns")

UPSTREAM_TIMEOUT = 2.0
"""Seconds one upstream gets to answer one query (UDP, then TCP if truncated)."""

TCP_IDLE = 10.0
"""Seconds a TCP client connection may stay silent before it is closed."""

MAX_PENDING = 1024
"""Forwarded queries in flight at most; more are dropped (the client retries)."""


SOCKETS_PER_UPSTREAM = 4
"""UDP sockets (source ports) each upstream is asked from, in turn; each query also has a random id."""


class _UpstreamSocket(asyncio.DatagramProtocol):
    """One connected UDP socket to an upstream; answers are matched to pending queries by id."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 12:
            fut = self.pending.pop(int.from_bytes(data[:2], "big"), None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("upstream socket closed"))
        self.pending.clear()
        self.transport = None


class UpstreamPool:
    """Shared UDP sockets to upstream resolvers (:data:`SOCKETS_PER_UPSTREAM` each, opened on first use),
    so forwarding costs no socket per query. :meth:`udp` sends one query and waits for its answer."""

    def __init__(self) -> None:
        self._socks: dict[Upstream, list[_UpstreamSocket]] = {}
        self._next = 0
        self._rng = random.SystemRandom()

    async def _socket(self, upstream: Upstream) -> _UpstreamSocket:
        socks = self._socks.setdefault(upstream, [])
        socks[:] = [s for s in socks if s.transport is not None]
        if len(socks) < SOCKETS_PER_UPSTREAM:
            ip, port = upstream
            _, proto = await asyncio.get_running_loop().create_datagram_endpoint(
                _UpstreamSocket, remote_addr=(str(ip), port)
            )
            socks.append(proto)
            return proto
        self._next += 1
        return socks[self._next % len(socks)]

    async def udp(
        self, query: dns.message.Message, upstream: Upstream, timeout: float
    ) -> dns.message.Message:
        """``query``'s answer from ``upstream`` over UDP (a fresh random id). Raises asyncio.TimeoutError,
        OSError, or dnspython's errors for an answer that does not parse or does not match."""
        wire = await self.exchange(query.to_wire(), upstream, timeout)
        query.id = int.from_bytes(wire[:2], "big")
        answer = dns.message.from_wire(wire)
        if not query.is_response(answer):
            raise ParseError("upstream answer does not match the query")
        return answer

    async def exchange(self, wire: bytes, upstream: Upstream, timeout: float) -> bytes:
        """Send query ``wire`` (its id replaced by a fresh random one) to ``upstream`` over UDP; the answer's
        bytes (with that id). Raises asyncio.TimeoutError or OSError."""
        sock = await self._socket(upstream)
        loop = asyncio.get_running_loop()
        qid = self._rng.randrange(65536)
        while qid in sock.pending:
            qid = self._rng.randrange(65536)
        fut: asyncio.Future[bytes] = loop.create_future()
        sock.pending[qid] = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            assert sock.transport is not None
            sock.transport.sendto(qid.to_bytes(2, "big") + wire[2:])
            return await fut
        finally:
            timer.cancel()
            if sock.pending.get(qid) is fut:
                del sock.pending[qid]

    def close(self) -> None:
        for socks in self._socks.values():
            for s in socks:
                if s.transport is not None:
                    s.transport.close()
        self._socks.clear()


def _expire(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


async def forward(
    query: dns.message.Message,
    upstreams: Iterable[Upstream],
    timeout: float = UPSTREAM_TIMEOUT,
    pool: UpstreamPool | None = None,
) -> dns.message.Message | None:
    """Ask ``upstreams`` in order for ``query``'s question (:meth:`Resolver.upstream_query`); the first
    answer that is not SERVFAIL or REFUSED, else None. UDP through ``pool`` (a socket per query without
    one), TCP when the answer is truncated."""
    up = Resolver.upstream_query(query)
    for ip, port in upstreams:
        where = str(ip)
        try:
            if pool is not None:
                answer = await pool.udp(up, (ip, port), timeout)
            else:
                answer = await dns.asyncquery.udp(
                    up, where, timeout=timeout, port=port, ignore_unexpected=True, ignore_errors=True
                )
            if answer.flags & dns.flags.TC:
                answer = await dns.asyncquery.tcp(up, where, timeout=timeout, port=port)
        except (dns.exception.DNSException, OSError, EOFError, ValueError, asyncio.TimeoutError) as e:
            log.debug("upstream %s:%d: %s", where, port, type(e).__name__)
            continue
        if answer.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            continue
        return answer
    return None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.server.resolver.handle(data, tcp=False)
        if isinstance(out, Reply):
            if self.transport is not None:
                self.transport.sendto(out.wire, addr)
        elif isinstance(out, Forward):
            self.server._spawn(self._forward(out, addr))

    async def _forward(self, f: Forward, addr: tuple[str, int]) -> None:
        wire = await self.server.resolve_forward(f)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("MagicDNS UDP: %s", exc)


class DNSServer:
    """Serves ``resolver`` on UDP and TCP. :meth:`start` binds; :meth:`close` stops (idempotent).
    ``dropped``: forwarded queries dropped because :data:`MAX_PENDING` were in flight."""

    def __init__(
        self, resolver: Resolver, *, upstream_timeout: float = UPSTREAM_TIMEOUT, tcp_idle: float = TCP_IDLE
    ) -> None:
        self.resolver = resolver
        self.upstream_timeout = upstream_timeout
        self.tcp_idle = tcp_idle
        self.addresses: list[tuple[str, int]] = []
        self.dropped = 0
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.pool = UpstreamPool()

    async def start(self, addresses: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Listen on every (host, port) of ``addresses``, UDP and TCP (port 0: one free port, the same for
        both). Returns the bound (host, port) pairs. Raises OSError when an address cannot be bound (what
        was bound stays until :meth:`close`)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    tcp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tcp_sock.bind((host, port))
                port = tcp_sock.getsockname()[1]
                udp_sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    if family == socket.AF_INET6:
                        udp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                    udp_sock.bind((host, port))
                except OSError:
                    udp_sock.close()
                    raise
            except OSError:
                tcp_sock.close()
                raise
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
            self._udp.append(transport)
            server = await asyncio.start_server(self._serve_tcp, sock=tcp_sock, backlog=128)
            self._tcp.append(server)
            bound.append((host, port))
        self.addresses += bound
        return bound

    def close(self) -> None:
        """Stop listening and cancel queries in flight."""
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()
        self._udp, self._tcp, self.addresses = [], [], []

    async def wait_closed(self) -> None:
        for s in self._tcp:
            await s.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: object) -> None:
        if len(self._tasks) >= MAX_PENDING:
            self.dropped += 1
            coro.close()  # type: ignore[attr-defined]
            return
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve_forward(self, f: Forward) -> bytes:
        """The client's answer to a forwarded query: the upstream's, or SERVFAIL.

        Fast path: the client's query bytes go upstream as they are (a new id); an answer to the same
        question (byte for byte), not truncated, not SERVFAIL/REFUSED and within the client's limit is
        relayed as it is (its id back). Anything else takes the full path (:func:`forward`: EDNS0 1232,
        TCP when truncated, cut to the client's size)."""
        fast = await self._forward_raw(f)
        if fast is not None:
            return fast
        answer = await forward(f.query, f.upstreams, self.upstream_timeout, self.pool)
        if answer is None:
            return self.resolver.servfail(f.query, f.max_size)
        return self.resolver.relay(f.query, answer, f.max_size)

    async def _forward_raw(self, f: Forward) -> bytes | None:
        end = question_end(f.wire)
        if end is None:
            return None
        question = f.wire[12:end]
        timed_out = 0
        for upstream in f.upstreams:
            try:
                got = await self.pool.exchange(f.wire, upstream, self.upstream_timeout)
            except (OSError, asyncio.TimeoutError):
                timed_out += 1
                continue
            rcode = got[3] & 0x0F
            if rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                continue
            if not got[2] & 0x80 or got[12:end] != question or got[2] & 0x02 or len(got) > f.max_size:
                return None  # not a response, another question, truncated, or too big for the client
            return f.wire[:2] + got[2:]
        if timed_out == len(f.upstreams):
            return self.resolver.servfail(f.query, f.max_size)  # nobody answers: no second round
        return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), self.tcp_idle)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                out = self.resolver.handle(data, tcp=True)
                if isinstance(out, Forward):
                    wire = await self.resolve_forward(out)
                elif isinstance(out, Reply):
                    wire = out.wire
                else:
                    return  # not even a header: close the connection
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


__all__ = ["MAX_PENDING", "TCP_IDLE", "UPSTREAM_TIMEOUT", "DNSServer", "UpstreamPool", "forward"]
