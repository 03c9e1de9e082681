"""MagicDNS's asyncio transports: UDP and TCP listeners (port 53 on 100.100.100.100 and fd7a:115c:a1e0::53
in a node) around :class:`tailpy.dns.resolver.Resolver`, and forwarding to upstream resolvers.

Forwarding races the upstreams of the list: the first is asked at once, the next one when the first has
not answered within :data:`STAGGER` seconds or has failed (ICMP unreachable, SERVFAIL, REFUSED, an answer
that is malformed), and so on; the first good answer wins and the other queries are abandoned. Each
upstream gets ``upstream_timeout`` seconds. An upstream that timed out or was unreachable is remembered as
dead for :data:`DEAD_FOR` seconds and asked after the live ones meanwhile (so it is probed again, last).
UDP first (EDNS0, 1232 bytes), TCP when the upstream's answer is truncated; when none answers the client
gets SERVFAIL. An upstream answer is checked before it is relayed (:func:`well_formed` on the fast path,
dnspython's parser on the full one); SERVFAIL when none is well-formed. TCP clients send any number of
length-prefixed queries on one connection (RFC 7766), answered in order; at most :data:`MAX_TCP`
connections at once (more are closed at once and counted in ``dropped``), and an idle connection is
closed after ``tcp_idle`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
import typing
from collections.abc import Awaitable, Callable, Iterable

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode

from tailpy import bypass
from tailpy.asyncutil import CLOSE_TIMEOUT, close_writer
from tailpy.dns.resolver import Forward, Reply, Resolver, Upstream, question_end, well_formed
from tailpy.errors import ParseError

log = logging.getLogger("tailpy.dns")

UPSTREAM_TIMEOUT = 2.0
"""Seconds one upstream gets to answer one query (UDP, then TCP if truncated)."""

TCP_IDLE = 10.0
"""Seconds a TCP client connection may stay silent before it is closed."""

MAX_PENDING = 1024
"""Forwarded UDP queries in flight at most; more are dropped (the client retries)."""

MAX_TCP = 256
"""TCP client connections at once at most (counted apart from :data:`MAX_PENDING`); more are closed."""

STAGGER = 0.25
"""Seconds before the next upstream is asked too while the ones asked have not answered."""

DEAD_FOR = 30.0
"""Seconds an upstream that timed out or was unreachable is asked only after the others."""


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

    def error_received(self, exc: Exception) -> None:
        # An ICMP error (port or host unreachable) for this connected socket: its one upstream is not
        # there; every query waiting on it fails now instead of at its timeout.
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)

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
        self.dead: dict[Upstream, float] = {}  # upstream -> monotonic time until which it counts as dead

    def order(self, upstreams: Iterable[Upstream]) -> list[Upstream]:
        """``upstreams`` with the ones remembered as dead moved last (their order otherwise kept)."""
        now = time.monotonic()
        ups = list(upstreams)
        if not self.dead:
            return ups
        for u, until in list(self.dead.items()):
            if until <= now:
                del self.dead[u]
        return [u for u in ups if u not in self.dead] + [u for u in ups if u in self.dead]

    def mark(self, upstream: Upstream, alive: bool) -> None:
        """Remember ``upstream`` as dead for :data:`DEAD_FOR` seconds, or as alive again."""
        if alive:
            self.dead.pop(upstream, None)
        else:
            self.dead[upstream] = time.monotonic() + DEAD_FOR

    async def _socket(self, upstream: Upstream) -> _UpstreamSocket:
        socks = self._socks.setdefault(upstream, [])
        socks[:] = [s for s in socks if s.transport is not None]
        if len(socks) < SOCKETS_PER_UPSTREAM:
            ip, port = upstream
            # A connected socket of the underlay (tailpyd's bypass mark: never through an exit node).
            sock = bypass.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect((str(ip), port))
            except BaseException:
                sock.close()
                raise
            _, proto = await asyncio.get_running_loop().create_datagram_endpoint(_UpstreamSocket, sock=sock)
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
        answer = dns.message.from_wire(wire)
        answer.id = query.id  # exchange matched it by the random id it sent
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


_T = typing.TypeVar("_T")


async def race(
    upstreams: Iterable[Upstream],
    attempt: Callable[[Upstream], Awaitable[_T | None]],
    stagger: float = STAGGER,
) -> _T | None:
    """Run ``attempt`` for each upstream, staggered: the next starts when those running have not finished
    within ``stagger`` seconds or one has failed (returned None). The first result that is not None, the
    others cancelled; None when all failed. ``attempt`` must not raise."""
    remaining = list(upstreams)
    if len(remaining) == 1:
        return await attempt(remaining[0])  # nothing to race: no task
    running: set[asyncio.Future[_T | None]] = set()
    try:
        while True:
            if remaining:
                running.add(asyncio.ensure_future(attempt(remaining.pop(0))))
            if not running:
                return None
            done, running = await asyncio.wait(
                running, timeout=stagger if remaining else None, return_when=asyncio.FIRST_COMPLETED
            )
            for t in done:
                got = t.result()
                if got is not None:
                    return got
    finally:
        for t in running:
            t.cancel()


_FAILED = (dns.exception.DNSException, OSError, EOFError, ValueError, asyncio.TimeoutError)


async def tcp_query(query: dns.message.Message, ip: str, port: int, timeout: float) -> dns.message.Message:
    """``query``'s answer from ``ip``:``port`` over TCP (RFC 1035 section 4.2.2: each message after its
    two-byte length), on a socket of the underlay (:mod:`tailpy.bypass`), within ``timeout`` seconds.
    Raises asyncio.TimeoutError, OSError, EOFError, dnspython's errors for an answer that does not parse,
    or ParseError for one that does not match."""

    async def exchange() -> dns.message.Message:
        reader, writer = await bypass.open_connection(ip, port)
        try:
            wire = query.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            data = await reader.readexactly(size)
        finally:
            await close_writer(writer)
        answer = dns.message.from_wire(data)
        if not query.is_response(answer):
            raise ParseError("upstream answer does not match the query")
        return answer

    return await asyncio.wait_for(exchange(), timeout)


async def forward(
    query: dns.message.Message,
    upstreams: Iterable[Upstream],
    timeout: float = UPSTREAM_TIMEOUT,
    pool: UpstreamPool | None = None,
    stagger: float = STAGGER,
) -> dns.message.Message | None:
    """Ask ``upstreams`` for ``query``'s question (:meth:`Resolver.upstream_query`), raced (:func:`race`,
    dead ones last when ``pool`` remembers them); the first answer that is not SERVFAIL or REFUSED, else
    None. UDP through ``pool`` (a socket per query without one), TCP when the answer is truncated."""
    up = Resolver.upstream_query(query)

    async def attempt(upstream: Upstream) -> dns.message.Message | None:
        ip, port = upstream
        where = str(ip)
        try:
            if pool is not None:
                answer = await pool.udp(up, upstream, timeout)
            else:
                answer = await dns.asyncquery.udp(
                    up, where, timeout=timeout, port=port, ignore_unexpected=True, ignore_errors=True
                )
            if answer.flags & dns.flags.TC:
                answer = await tcp_query(up, where, port, timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.debug("upstream %s:%d: %s", where, port, type(e).__name__)
            if pool is not None:
                pool.mark(upstream, alive=False)
            return None
        except (*_FAILED, ParseError) as e:
            log.debug("upstream %s:%d: %s", where, port, type(e).__name__)
            return None
        if pool is not None:
            pool.mark(upstream, alive=True)
        if answer.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            return None
        return answer

    return await race(pool.order(upstreams) if pool is not None else upstreams, attempt, stagger)


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
    ``dropped``: forwarded UDP queries dropped because :data:`MAX_PENDING` were in flight, plus TCP
    connections closed because :data:`MAX_TCP` were open; ``bad_upstream``: upstream answers that did not
    parse (never relayed)."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        upstream_timeout: float = UPSTREAM_TIMEOUT,
        tcp_idle: float = TCP_IDLE,
        stagger: float = STAGGER,
        max_tcp: int = MAX_TCP,
    ) -> None:
        self.resolver = resolver
        self.upstream_timeout = upstream_timeout
        self.tcp_idle = tcp_idle
        self.stagger = stagger
        self.max_tcp = max_tcp
        self.addresses: list[tuple[str, int]] = []
        self.dropped = 0
        self.bad_upstream = 0
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncio.Task[None]] = set()
        self.pool = UpstreamPool()

    async def start(
        self, addresses: Iterable[tuple[str, int]], *, device: str | None = None
    ) -> list[tuple[str, int]]:
        """Listen on every (host, port) of ``addresses``, UDP and TCP (port 0: one free port, the same for
        both). ``device``: accept only packets that arrive on that interface (SO_BINDTODEVICE; "lo": only
        this host's own processes; needs CAP_NET_RAW). Returns the bound (host, port) pairs. Raises OSError
        when an address cannot be bound (what was bound stays until :meth:`close`)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    tcp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if device is not None:
                    tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
                tcp_sock.bind((host, port))
                port = tcp_sock.getsockname()[1]
                udp_sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    if family == socket.AF_INET6:
                        udp_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if device is not None:
                        udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
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
        for task in [*self._tasks, *self._conns]:
            task.cancel()
        self.pool.close()
        self._udp, self._tcp, self.addresses = [], [], []

    async def wait_closed(self) -> None:
        for s in self._tcp:  # Python 3.12+ waits here for every connection: bounded
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(s.wait_closed(), CLOSE_TIMEOUT)
        if self._tasks or self._conns:
            await asyncio.gather(*self._tasks, *self._conns, return_exceptions=True)

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

        Fast path: the client's query bytes go upstream as they are (a new id), raced (:func:`race`); an
        answer that is well-formed (:func:`well_formed`), to the same question (byte for byte), not
        truncated, not SERVFAIL/REFUSED and within the client's limit is relayed as it is (its id back); one
        to another question counts as malformed. A well-formed answer that is truncated or too big takes
        the full path
        (:func:`forward`: EDNS0 1232, TCP when truncated, parsed, cut to the client's size). None
        answering, or none well-formed: SERVFAIL."""
        fast = await self._forward_raw(f)
        if isinstance(fast, bytes):
            return fast
        if fast is None:
            return self.resolver.servfail(f.query, f.max_size)
        answer = await forward(f.query, f.upstreams, self.upstream_timeout, self.pool, self.stagger)
        if answer is None:
            return self.resolver.servfail(f.query, f.max_size)
        return self.resolver.relay(f.query, answer, f.max_size)

    async def _forward_raw(self, f: Forward) -> bytes | bool | None:
        """The relayed answer (bytes), True when the full path must be taken, None when no upstream gave
        a usable answer."""
        end = question_end(f.wire)
        if end is None:
            return True
        question = f.wire[12:end]

        async def attempt(upstream: Upstream) -> bytes | bool | None:
            try:
                got = await self.pool.exchange(f.wire, upstream, self.upstream_timeout)
            except (OSError, asyncio.TimeoutError):
                self.pool.mark(upstream, alive=False)
                return None
            self.pool.mark(upstream, alive=True)
            if not well_formed(got):
                self.bad_upstream += 1
                log.debug("upstream %s:%d sent a malformed answer", upstream[0], upstream[1])
                return None
            if not got[2] & 0x80 or got[12:end] != question:
                self.bad_upstream += 1
                return None  # not a response, or to another question
            if got[3] & 0x0F in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                return None
            if got[2] & 0x02 or len(got) > f.max_size:
                return True  # truncated, or too big for the client: the full path
            return f.wire[:2] + got[2:]

        return await race(self.pool.order(f.upstreams), attempt, self.stagger)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= self.max_tcp:
            self.dropped += 1
            writer.close()
            return
        if task is not None:
            self._conns.add(task)
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
                try:  # a client that stops reading holds the connection no longer than the idle timeout
                    await asyncio.wait_for(writer.drain(), self.tcp_idle)
                except asyncio.TimeoutError:
                    return
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            pass  # close(): end quietly (Python 3.11's start_server logs a cancelled handler as an error)
        finally:
            if task is not None:
                self._conns.discard(task)
            with contextlib.suppress(asyncio.CancelledError):
                await close_writer(writer)  # bounded: a peer that stopped reading cannot hold it


__all__ = [
    "DEAD_FOR",
    "MAX_PENDING",
    "MAX_TCP",
    "STAGGER",
    "TCP_IDLE",
    "UPSTREAM_TIMEOUT",
    "DNSServer",
    "UpstreamPool",
    "forward",
    "race",
]
