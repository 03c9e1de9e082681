"""STUN client: Binding transactions with RFC 8489 retransmission, matched by transaction id.

Three layers:

* :class:`Transaction` / :class:`Transactions` (sans-IO, ``now`` in seconds passed in): when to (re)send,
  when a transaction has failed, and which received datagram answers which request. RFC 8489 §6.2.1: the
  first retransmission after RTO (500 ms), each next one after twice the previous interval, Rc = 7 sends in
  all, then Rm × RTO = 8 s more for an answer, so a lost server is given up after 39.5 s. ``total`` (seconds)
  caps that for callers in a hurry, netcheck among them (sends stop at the cap, and the transaction fails
  there). A response is matched by its 12-byte txid alone (RFC 8489 §6.3.3), whatever its source address.
* :class:`StunRunner` (asyncio): runs transactions over a ``send(datagram, endpoint)`` callable and is fed
  every received STUN datagram through :meth:`StunRunner.feed`. In tailpyd, ``send`` is
  ``Device.send_datagram`` and ``feed`` gets the STUN datagrams of ``Device.drain()``, so requests leave from
  the data plane's own UDP socket and the mapped address found is the one WireGuard and disco use.
* :class:`StandaloneStun`: its own UDP socket (dual-stack) feeding a runner, for `tailpy netcheck` when no
  daemon runs, and for tests.

Endpoints are :class:`tailpy.endpoint.Endpoint`; the data plane takes their text form.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError, EndpointError, ParseError, TailpyError
from tailpy.proto import stun

log = logging.getLogger("tailpy.stun")

RTO = 0.5
"""Initial retransmission timeout, seconds (RFC 8489 §6.2.1)."""
RC = 7
"""Requests sent in all (the first and 6 retransmissions)."""
RM = 16
"""After the last request, wait Rm × RTO for an answer."""
CLIENT_SOFTWARE = "tailnode"
"""SOFTWARE of requests. Tailscale's STUN servers (derper, stund: ``net/stun`` ``ParseBindingRequest``) answer
only Binding requests whose SOFTWARE is exactly "tailnode" and that end with FINGERPRINT, so tailpy sends
both: nodes can then use Tailscale's relays' STUN as well as tailpy's (which answers anyone)."""


@dataclass(frozen=True)
class BindingResult:
    """How one Binding transaction ended.

    ``ok``: a success response came; ``mapped``: its reflexive endpoint (XOR-MAPPED-ADDRESS, else
    MAPPED-ADDRESS); ``rtt``: seconds from the latest send to the answer (an answer to an earlier send of a
    retransmitted request makes it an underestimate: Karn's ambiguity); ``error``: why it failed ("timeout",
    "STUN error 420 Unknown Attribute", "unknown comprehension-required attribute 0x0005", a send error);
    ``attempts``: requests sent."""

    txid: bytes
    dest: Endpoint
    ok: bool
    mapped: Endpoint | None = None
    rtt: float | None = None
    error: str | None = None
    attempts: int = 0
    software: str | None = None


@dataclass
class Transaction:
    """One Binding request in flight (sans-IO). Times are seconds on the caller's clock."""

    txid: bytes
    dest: Endpoint
    request: bytes
    started: float
    rto: float = RTO
    rc: int = RC
    rm: int = RM
    total: float | None = None
    attempts: int = 0
    last_sent: float | None = None
    _deadline: float = field(init=False)

    def __post_init__(self) -> None:
        natural = self.started + self.rto * ((1 << (self.rc - 1)) - 1) + self.rm * self.rto
        self._deadline = natural if self.total is None else min(natural, self.started + self.total)

    def next_send(self) -> float | None:
        """When the next request is due, or None when no more will be sent."""
        if self.attempts >= self.rc:
            return None
        at = self.started + self.rto * ((1 << self.attempts) - 1)
        return at if at < self._deadline else None

    @property
    def deadline(self) -> float:
        """When it fails if nothing answers."""
        return self._deadline

    def next_wakeup(self) -> float:
        nxt = self.next_send()
        return self._deadline if nxt is None else min(nxt, self._deadline)

    def due(self, now: float) -> bytes | None:
        """The request to send now, if one is due (at most one per call; counts it as sent)."""
        nxt = self.next_send()
        if nxt is None or now < nxt:
            return None
        self.attempts += 1
        self.last_sent = now
        return self.request

    def expired(self, now: float) -> bool:
        return now >= self._deadline


class Transactions:
    """The Binding transactions in flight, by txid (sans-IO).

    ``rto``, ``rc``, ``rm``: RFC 8489 §6.2.1 defaults; ``software``: SOFTWARE in requests (default
    :data:`CLIENT_SOFTWARE`; None: none)."""

    def __init__(
        self, *, rto: float = RTO, rc: int = RC, rm: int = RM, software: str | None = CLIENT_SOFTWARE
    ) -> None:
        self.rto, self.rc, self.rm, self.software = rto, rc, rm, software
        self._txs: dict[bytes, Transaction] = {}

    def start(
        self,
        dest: Endpoint,
        now: float,
        *,
        txid: bytes | None = None,
        total: float | None = None,
        rto: float | None = None,
    ) -> Transaction:
        """A new Binding request to ``dest``, with FINGERPRINT; sent by :meth:`due`.
        ``total``: give up after that many seconds instead of RFC 8489's 39.5 s."""
        txid, request = stun.binding_request(txid, software=self.software)
        tx = Transaction(
            txid,
            dest,
            request,
            now,
            rto=self.rto if rto is None else rto,
            rc=self.rc,
            rm=self.rm,
            total=total,
        )
        self._txs[txid] = tx
        return tx

    def get(self, txid: bytes) -> Transaction | None:
        return self._txs.get(txid)

    def cancel(self, txid: bytes) -> None:
        self._txs.pop(txid, None)

    def pending(self) -> int:
        return len(self._txs)

    def due(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """Requests to send now: (datagram, destination)."""
        out = []
        for tx in self._txs.values():
            d = tx.due(now)
            if d is not None:
                out.append((d, tx.dest))
        return out

    def expire(self, now: float) -> list[BindingResult]:
        """Transactions that ran out of time (removed), as failed results with error "timeout"."""
        gone = [tx for tx in self._txs.values() if tx.expired(now)]
        for tx in gone:
            del self._txs[tx.txid]
        return [BindingResult(tx.txid, tx.dest, False, error="timeout", attempts=tx.attempts) for tx in gone]

    def next_wakeup(self) -> float | None:
        """The earliest time :meth:`due` or :meth:`expire` has something to do, or None when idle."""
        return min((tx.next_wakeup() for tx in self._txs.values()), default=None)

    def receive(self, data: bytes, source: Endpoint, now: float) -> BindingResult | None:
        """A datagram from ``source``: the result of the transaction it answers (removed), or None when it
        answers none (not STUN, a request, a txid not in flight, a bad FINGERPRINT). Never raises.

        A success response with an unknown comprehension-required attribute fails the transaction
        (RFC 8489 §6.3.3); so does an error response."""
        try:
            msg = stun.parse(data)
        except ParseError:
            return None
        if msg.cls not in (stun.MessageClass.SUCCESS, stun.MessageClass.ERROR):
            return None
        tx = self._txs.get(msg.txid)
        if tx is None or msg.method != stun.BINDING:
            return None
        del self._txs[msg.txid]
        rtt = None if tx.last_sent is None else max(0.0, now - tx.last_sent)
        base = BindingResult(tx.txid, tx.dest, False, rtt=rtt, attempts=tx.attempts, software=msg.software)
        unknown = msg.unknown_required()
        if unknown:
            names = ", ".join(f"{t:#06x}" for t in unknown)
            return replace(base, error=f"unknown comprehension-required attribute {names}")
        if msg.cls == stun.MessageClass.ERROR:
            code, reason = msg.error or (0, "no ERROR-CODE")
            return replace(base, error=f"STUN error {code} {reason}".strip())
        mapped = msg.mapped_address
        if mapped is None:
            return replace(base, error="success response without a mapped address")
        try:
            endpoint = Endpoint.from_sockaddr(mapped)
        except EndpointError:
            return replace(base, error=f"mapped address {mapped!r} is not an endpoint")
        return replace(base, ok=True, mapped=endpoint)


SendFn = Callable[[bytes, Endpoint], None]
RequestHook = Callable[[stun.Message, Endpoint], None]


class StunRunner:
    """Runs Binding transactions (asyncio) over ``send(datagram, endpoint)``; feed it every STUN datagram
    received on the same socket with :meth:`feed`.

    ``clock``: seconds, monotonic. ``on_request``: called with Binding requests that arrive (a hairpin probe
    coming back to this socket, or another node's STUN); it is given the parsed message and its source."""

    def __init__(
        self,
        send: SendFn,
        *,
        clock: Callable[[], float] = time.monotonic,
        software: str | None = CLIENT_SOFTWARE,
        rto: float = RTO,
        rc: int = RC,
        rm: int = RM,
        on_request: RequestHook | None = None,
    ) -> None:
        self.send = send
        self.clock = clock
        self.on_request = on_request
        self.transactions = Transactions(rto=rto, rc=rc, rm=rm, software=software)
        self._waiters: dict[bytes, asyncio.Future[BindingResult]] = {}
        self.unmatched = 0
        """Datagrams fed that answered no transaction in flight (late duplicates, strays, garbage)."""

    async def binding(
        self,
        dest: Endpoint,
        *,
        total: float | None = None,
        rto: float | None = None,
        txid: bytes | None = None,
    ) -> BindingResult:
        """Send a Binding request to ``dest``, retransmitting per RFC 8489 until it is
        answered or fails (``total`` seconds at most, if given). Never raises for network trouble: a send
        error or timeout is a failed result."""
        loop = asyncio.get_running_loop()
        tx = self.transactions.start(dest, self.clock(), txid=txid, total=total, rto=rto)
        fut: asyncio.Future[BindingResult] = loop.create_future()
        self._waiters[tx.txid] = fut
        try:
            while not fut.done():
                now = self.clock()
                datagram = tx.due(now)
                if datagram is not None:
                    try:
                        self.send(datagram, dest)
                    except (OSError, TailpyError) as e:
                        self.transactions.cancel(tx.txid)
                        return BindingResult(
                            tx.txid, dest, False, error=f"send failed: {e}", attempts=tx.attempts
                        )
                    continue
                if tx.expired(now):
                    self.transactions.cancel(tx.txid)
                    return BindingResult(tx.txid, dest, False, error="timeout", attempts=tx.attempts)
                await asyncio.wait({fut}, timeout=max(0.0, tx.next_wakeup() - now))
            return fut.result()
        finally:
            self._waiters.pop(tx.txid, None)
            self.transactions.cancel(tx.txid)

    def feed(self, data: bytes, source: Endpoint) -> bool:
        """A received datagram (STUN or not) from ``source``. True when it answered a
        transaction in flight or was a Binding request handed to ``on_request``."""
        result = self.transactions.receive(data, source, self.clock())
        if result is not None:
            fut = self._waiters.get(result.txid)
            if fut is not None and not fut.done():
                fut.set_result(result)
            return True
        if self.on_request is not None:
            try:
                msg = stun.parse(data)
            except ParseError:
                msg = None
            if msg is not None and msg.cls == stun.MessageClass.REQUEST and msg.method == stun.BINDING:
                self.on_request(msg, source)
                return True
        self.unmatched += 1
        return False


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, owner: StandaloneStun) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            source = Endpoint.from_sockaddr(addr)
        except EndpointError:
            return
        self.owner.runner.feed(data, source)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable for an earlier send
        log.debug("STUN client socket: %s", exc)


class StandaloneStun:
    """A UDP socket of its own feeding a :class:`StunRunner`; an async context manager.

    ``bind``: local address ("::" = every address, dual-stack, IPv4 only where the kernel has no IPv6);
    ``port``: local port (0 = any). Other keyword arguments go to :class:`StunRunner`."""

    def __init__(self, *, bind: str = "::", port: int = 0, **runner_args: Any) -> None:
        self.bind_address = bind
        self._port = port
        self.runner = StunRunner(self._send, **runner_args)
        self._sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        """The local UDP port."""
        assert self._sock is not None, "not started"
        return int(self._sock.getsockname()[1])

    @property
    def dual_stack(self) -> bool:
        return self._sock is not None and self._sock.family == socket.AF_INET6

    async def start(self) -> None:
        """Bind the socket. Raises ConfigError (one sentence) when it cannot."""
        host = self.bind_address
        try:
            if ":" in host:
                try:
                    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                except OSError:
                    if host != "::":
                        raise
                    sock, host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "0.0.0.0"
                else:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((host, self._port))
            except BaseException:
                sock.close()
                raise
        except OSError as e:
            raise ConfigError(
                f"cannot bind a UDP socket on {host} port {self._port}: {e.strerror or e}"
            ) from None
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Proto(self), sock=sock)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)
        self._sock = None

    async def __aenter__(self) -> StandaloneStun:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _send(self, datagram: bytes, dest: Endpoint) -> None:
        if self._sock is None:
            raise ConfigError("the STUN socket is closed")
        if self._sock.family == socket.AF_INET and dest.version == 6:
            raise OSError(97, "no IPv6 on this socket")
        with contextlib.suppress(
            BlockingIOError
        ):  # a full send buffer loses the datagram, as the network may
            self._sock.sendto(datagram, dest.sockaddr(family=self._sock.family))


__all__ = [
    "CLIENT_SOFTWARE",
    "RC",
    "RM",
    "RTO",
    "BindingResult",
    "StandaloneStun",
    "StunRunner",
    "Transaction",
    "Transactions",
]
