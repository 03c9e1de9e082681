"""The node's DERP connections: one to its home region (NotePreferred), others to peers' regions on demand.

Each region has a :class:`tailpy.derp.client.ReconnectingDerpClient` (reconnects with
:func:`tailpy.backoff.reconnect_delays`, jittered, capped at ``cap`` seconds; each attempt dials the region's
first node, then the others in order, which a DERP mesh makes one relay), a bounded send queue drained by
one writer task, and a reader task that hands every RecvPacket to ``on_packet(src_node_key, payload,
region_id)``. A connection other than the home one is closed after ``idle_timeout`` seconds without sending
(:meth:`DerpConnections.sweep`); the home connection stays. Every connection checks its own liveness (a DERP
Ping after 15 s without a frame, dead without a Pong within 5 s; :class:`ReconnectingDerpClient`), and
:meth:`DerpConnections.last_recv` answers None for a connection that is down, so the home chooser drops a
silent home at its next report instead of trusting old traffic. An old home is kept open like any other
connection until it idles out, so packets peers still send there (before their netmap shows the new home)
arrive.

Latency to a region (:func:`measure_latency`): the DERP Ping/Pong round trip over an open connection, else
an HTTP ``GET /derp/latency-check`` on a new TCP (TLS) connection, timed from the request to the status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tailpy import bypass
from tailpy.asyncutil import close_writer
from tailpy.derp.client import IDLE_PING, PING_TIMEOUT, DerpClient, DerpClientError, ReconnectingDerpClient
from tailpy.ipnstate import DerpConnStatus
from tailpy.keys import NodePrivate, NodePublic
from tailpy.netmap import DerpMap, DerpNode, DerpRegion
from tailpy.proto import derp as proto

log = logging.getLogger("tailpy.magicsock")

IDLE_TIMEOUT = 60.0  # seconds a non-home connection may go without sending before it is closed
RECONNECT_CAP = 10.0
"""Seconds, cap of a region connection's reconnect backoff. Tailscale's magicsock DERP reader caps at 5 s;
10 s keeps a node from waiting ~30 s after its relay returns (the old cap) while still spreading a fleet's
returns (jitter; the backoff resets only after a connection stayed up 10 s, so a relay closing at once is
not hammered)."""
SEND_QUEUE = 1024  # datagrams waiting per region; beyond it the newest is dropped and counted
SEND_TIMEOUT = 5.0  # seconds a datagram waits for a connection before it is dropped
PROBE_TIMEOUT = 3.0  # seconds for one latency measurement

PacketHandler = Callable[[NodePublic, bytes, int], None]


@dataclass
class _Region:
    region: DerpRegion
    client: ReconnectingDerpClient
    queue: asyncio.Queue[tuple[NodePublic, bytes]]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    home: bool = False
    last_send: float = 0.0  # monotonic seconds
    last_recv: float | None = None  # monotonic seconds of the last frame received (packet or pong)
    sent: int = 0
    received: int = 0
    dropped: int = 0
    peer_gone: int = 0
    health: str = ""  # the server's last Health problem ("" = none or cleared)


class DerpConnections:
    """DERP connections by region id for one node key. Must be used inside a running event loop."""

    def __init__(
        self,
        private_key: NodePrivate,
        on_packet: PacketHandler,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        cap: float = RECONNECT_CAP,
        base: float = 0.5,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_ping: float = IDLE_PING,
        ping_timeout: float = PING_TIMEOUT,
        connect_timeout: float = 10.0,
    ) -> None:
        self.private_key = private_key
        self.on_packet = on_packet
        self.idle_timeout = idle_timeout
        self.cap = cap
        self.base = base
        self.ssl_context = ssl_context
        self.clock = clock
        self.idle_ping = idle_ping  # seconds without a frame before a liveness Ping
        self.ping_timeout = ping_timeout  # seconds for its Pong before the connection counts as dead
        self.connect_timeout = connect_timeout
        self.derp_map = DerpMap()
        self.home = 0
        self._regions: dict[int, _Region] = {}
        self.peer_gone: dict[bytes, tuple[int, int]] = {}  # node key -> (region id, PeerGone reason)
        self.probe_errors: dict[int, str] = {}
        """Region id -> why its last latency check failed (cleared when one succeeds)."""
        self.on_peer_gone: Callable[[NodePublic, int, int], None] | None = None
        """Called with (peer node key, region id, PeerGone reason) for each PeerGone frame a region sends
        (``derp.go`` ``PeerGoneReasonDisconnected`` 0, ``PeerGoneReasonNotHere`` 1)."""
        self.on_down: Callable[[int], None] | None = None
        """Called with the region id when a logged-in connection ends (closed, broken, or found dead by the
        liveness ping); magicsock.Conn re-measures at once when it is the home region."""
        self.on_up: Callable[[int], None] | None = None
        """Called with the region id each time a connection is made; magicsock.Conn re-sends handshakes
        pending for peers relayed through it."""

    # -- configuration ---------------------------------------------------------------------------------

    async def set_derp_map(self, derp_map: DerpMap) -> None:
        """Adopt a new DERP map: connections to regions no longer in it (or whose nodes changed) close; the
        home region, when still in the map, is connected again at once (to its new first node)."""
        self.derp_map = derp_map
        for rid, r in list(self._regions.items()):
            if derp_map.regions.get(rid) != r.region:
                await self._close_region(rid)
        if self.home not in derp_map.regions:
            self.home = 0
        elif self.home and self.home not in self._regions:
            home = self._ensure(self.home)
            if home is not None:
                home.home = True

    async def set_home(self, region_id: int) -> None:
        """Make ``region_id`` the home (0: none): connect now and tell the server it is preferred; the old
        home becomes an ordinary connection (told it is no longer preferred) that idles out."""
        if region_id == self.home:
            return
        old = self._regions.get(self.home)
        self.home = region_id
        if old is not None:
            old.home = False
            old.last_send = self.clock()
            self._note_preferred(old, False)
        if region_id:
            r = self._ensure(region_id)
            if r is not None:
                r.home = True
                self._note_preferred(r, True)

    async def set_private_key(self, private_key: NodePrivate) -> None:
        """A new node key (rotation): every connection is made again under it."""
        self.private_key = private_key
        for rid in list(self._regions):
            await self._close_region(rid)
        if self.home:
            r = self._ensure(self.home)
            if r is not None:
                r.home = True

    # -- sending ---------------------------------------------------------------------------------------

    def send(self, region_id: int, dst: NodePublic, payload: bytes) -> bool:
        """Queue ``payload`` for ``dst`` through region ``region_id`` (connecting on demand). False when the
        region is unknown or its queue is full (the datagram is dropped and counted)."""
        r = self._ensure(region_id)
        if r is None:
            return False
        r.last_send = self.clock()
        try:
            r.queue.put_nowait((dst, payload))
        except asyncio.QueueFull:
            r.dropped += 1
            return False
        return True

    async def _writer(self, r: _Region) -> None:
        while True:
            dst, payload = await r.queue.get()
            try:
                await r.client.send(dst, payload, timeout=SEND_TIMEOUT)
                r.sent += 1
            except (DerpClientError, ValueError) as e:
                r.dropped += 1
                log.debug("DERP region %d: dropped a datagram for %s: %s", r.region.region_id, dst.short(), e)

    async def _reader(self, r: _Region) -> None:
        rid = r.region.region_id
        while True:
            msg = await r.client.recv()
            r.last_recv = self.clock()
            if isinstance(msg, proto.RecvPacket):
                r.received += 1
                self.peer_gone.pop(msg.src.raw, None)
                try:
                    self.on_packet(msg.src, msg.data, rid)
                except Exception:  # one bad datagram must not stop the connection
                    log.exception("DERP region %d: handling a packet from %s failed", rid, msg.src.short())
            elif isinstance(msg, proto.PeerGone):
                r.peer_gone += 1
                self.peer_gone[msg.key.raw] = (rid, int(msg.reason))
                if self.on_peer_gone is not None:
                    self.on_peer_gone(msg.key, rid, int(msg.reason))
            elif isinstance(msg, proto.Health):
                r.health = msg.problem
                if msg.problem:
                    log.warning("DERP region %d: server health: %s", rid, msg.problem)

    # -- lifecycle -------------------------------------------------------------------------------------

    def _ensure(self, region_id: int) -> _Region | None:
        r = self._regions.get(region_id)
        if r is not None:
            return r
        region = self.derp_map.regions.get(region_id)
        if region is None or not region.nodes:
            return None
        node = region.nodes[0]
        rc = ReconnectingDerpClient(
            node.url(),
            self.private_key,
            cap=self.cap,
            base=self.base,
            connect_timeout=self.connect_timeout,
            ssl_context=self.ssl_context,
            idle_ping=self.idle_ping,
            ping_timeout=self.ping_timeout,
            fallback_urls=[n.url() for n in region.nodes[1:]],  # the region's other (meshed) servers
        )
        r = _Region(region, rc, asyncio.Queue(maxsize=SEND_QUEUE), last_send=self.clock())
        rc.on_connect = lambda client: self._on_connect(r, client)
        rc.on_disconnect = lambda why: self._on_disconnect(r, why)
        rc.start()
        r.tasks = [
            asyncio.get_running_loop().create_task(self._writer(r), name=f"derp-{region_id}-send"),
            asyncio.get_running_loop().create_task(self._reader(r), name=f"derp-{region_id}-recv"),
        ]
        self._regions[region_id] = r
        log.info("DERP region %d (%s): connecting to %s", region_id, region.region_code, node.url())
        return r

    def _on_connect(self, r: _Region, client: DerpClient) -> None:
        r.last_recv = self.clock()
        log.info("DERP region %d (%s): connected%s", r.region.region_id, r.region.region_code,
                 " (home)" if r.home else "")  # fmt: skip
        if r.home:
            self._note_preferred(r, True)
        if self.on_up is not None:
            try:
                self.on_up(r.region.region_id)
            except Exception:
                log.exception("DERP region %d: on_up hook failed", r.region.region_id)

    def _on_disconnect(self, r: _Region, why: str) -> None:
        rid = r.region.region_id
        log.info(
            "DERP region %d (%s): disconnected%s: %s",
            rid,
            r.region.region_code,
            " (home)" if r.home else "",
            why,
        )
        if self.on_down is not None:
            try:
                self.on_down(rid)
            except Exception:
                log.exception("DERP region %d: on_down hook failed", rid)

    def _note_preferred(self, r: _Region, preferred: bool) -> None:
        client = r.client.client
        if client is None:
            return  # told on connect

        async def note() -> None:
            with contextlib.suppress(DerpClientError):
                await client.note_preferred(preferred)

        task = asyncio.get_running_loop().create_task(note())
        r.tasks.append(task)
        task.add_done_callback(lambda t: r.tasks.remove(t) if t in r.tasks else None)

    async def sweep(self) -> list[int]:
        """Close non-home connections idle (nothing sent) for ``idle_timeout`` seconds; their region ids."""
        now = self.clock()
        idle = [
            rid for rid, r in self._regions.items() if not r.home and now - r.last_send > self.idle_timeout
        ]
        for rid in idle:
            log.info("DERP region %d: closing idle connection", rid)
            await self._close_region(rid)
        return idle

    async def _close_region(self, region_id: int) -> None:
        r = self._regions.pop(region_id, None)
        if r is None:
            return
        for t in list(r.tasks):
            t.cancel()
        await asyncio.gather(*r.tasks, return_exceptions=True)
        await r.client.close()

    async def close(self) -> None:
        for rid in list(self._regions):
            await self._close_region(rid)

    # -- measuring and reporting -------------------------------------------------------------------------

    def connected(self, region_id: int) -> bool:
        r = self._regions.get(region_id)
        return r is not None and r.client.client is not None

    def last_recv(self, region_id: int) -> float | None:
        """Monotonic time of the last frame from region ``region_id`` (connect, packet, pong, any bytes), or
        None when there is no live connection to it (never made, reconnecting, or found dead)."""
        r = self._regions.get(region_id)
        if r is None:
            return None
        seen = r.client.last_recv  # time.monotonic, any bytes incl. liveness pongs
        if seen is None:
            return None
        if self.clock is not time.monotonic:
            return r.last_recv
        return seen if r.last_recv is None else max(seen, r.last_recv)

    async def measure(self, region_id: int, timeout: float = PROBE_TIMEOUT) -> float | None:
        """Latency to ``region_id`` in seconds (see :func:`measure_latency`), or None if it did not answer."""
        region = self.derp_map.regions.get(region_id)
        if region is None:
            return None
        r = self._regions.get(region_id)
        client = r.client.client if r is not None else None
        if r is not None and client is not None:
            try:
                rtt = await client.ping(timeout=timeout)
                r.last_recv = self.clock()
                return rtt
            except (asyncio.TimeoutError, DerpClientError):
                return None
        errors: list[str] = []
        measured = await measure_latency(region, timeout=timeout, ssl_context=self.ssl_context, errors=errors)
        if measured is None and errors:
            self.probe_errors[region_id] = errors[-1]
        else:
            self.probe_errors.pop(region_id, None)
        return measured

    def status(self) -> list[DerpConnStatus]:
        """One entry per open region connection, by region id (:class:`tailpy.ipnstate.DerpConnStatus`)."""
        return [
            DerpConnStatus(
                region_id=rid,
                region_code=r.region.region_code,
                home=r.home,
                connected=r.client.client is not None,
                url=r.client.url,
                sent=r.sent,
                received=r.received,
                dropped=r.dropped,
                peer_gone=r.peer_gone,
                last_error=r.client.last_error,
                health=r.health,
            )
            for rid, r in sorted(self._regions.items())
        ]


async def measure_latency(
    region: DerpRegion,
    *,
    timeout: float = PROBE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    errors: list[str] | None = None,
) -> float | None:
    """Seconds from sending ``GET /derp/latency-check`` on a new connection to a region node to reading the
    HTTP status line (one round trip plus the server's time to answer); the first node that answers counts.
    None when no node answers within ``timeout`` seconds; each node's failure, one sentence, is appended to
    ``errors``."""
    for node in region.nodes:
        try:
            return await asyncio.wait_for(_latency_check(node, ssl_context), timeout)
        except ssl.SSLCertVerificationError as e:
            why = f"its TLS certificate is not trusted ({e.verify_message or e.reason or e})"
            log.debug("DERP node %s: latency check failed: %s", node.name, why)
            if errors is not None:
                errors.append(f"DERP node {node.url()}: {why}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError, ValueError) as e:
            log.debug("DERP node %s: latency check failed: %s", node.name, e)
            if errors is not None:
                errors.append(f"DERP node {node.url()}: {e or type(e).__name__}")
    return None


async def _latency_check(node: DerpNode, ssl_context: ssl.SSLContext | None) -> float:
    url = node.url()
    tls = url.startswith("https://")
    host = node.ipv4 or node.ipv6 or node.host_name
    port = node.derp_port or 443
    ctx = (ssl_context or ssl.create_default_context()) if tls else None
    reader, writer = await bypass.open_connection(
        host, port, ssl=ctx, server_hostname=node.host_name if ctx is not None else None
    )
    try:
        host_header = node.host_name or host
        start = time.monotonic()
        writer.write(
            f"GET /derp/latency-check HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
        elapsed = time.monotonic() - start
        if not line.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP answer: {line[:40]!r}")
        return elapsed
    finally:
        await close_writer(writer)  # bounded: a TLS close_notify that never comes cannot hold it


__all__ = ["IDLE_TIMEOUT", "DerpConnections", "measure_latency"]
