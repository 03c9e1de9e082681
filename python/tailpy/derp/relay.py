"""The DERP relay core (as Tailscale's ``derp/derpserver/derpserver.go``, apart from its HTTP handler in
``handler.go``): the login of one DERP connection, the client table, forwarding, PeerGone, Health and
keepalives. The HTTP front (:mod:`tailpy.derp.server`) hands each upgraded stream, plain TCP/TLS or
WebSocket, to :meth:`Relay.serve`.

DERP connection
---------------
ServerKey, then the client's ClientInfo must arrive within ``handshake_timeout`` seconds and its box must
open with the server key (else the connection is closed and counted in ``derp_login_failures_total``); the
server answers ServerInfo ``{"version": 2}``. With a ``verify_client`` (:mod:`tailpy.derp.verify`; derper's
``-verify-clients`` / ``-verify-client-url``) the client's node key is checked first: a key the verifier
refuses, or one it cannot answer for within ``verify_timeout`` seconds (fail closed, logged), gets a Health
frame starting :data:`REFUSED_PREFIX` with one sentence, and the connection is closed (counted in
``derp_clients_refused_total{reason="not_admitted"|"verify_failed"}``). Then:

* SendPacket → RecvPacket on the destination's active connection, through that connection's send queue of at
  most ``queue_depth`` packets; when it is full the OLDEST queued packet is dropped (``queue_head``), so a
  slow reader loses its own stale packets and never stalls the sender or anyone else. A write that does not
  drain within ``write_timeout`` seconds closes that connection.
* An unknown destination: the packet is dropped (``unknown_dest``) and the sender gets PeerGone "not here",
  at most 3 at once and 1 per second after that per sending connection (a token bucket, as derpserver's
  ``peerGoneLim``). When a key's last connection closes, connections that received packets from it get
  PeerGone "disconnected".
* KeepAlive every :data:`~tailpy.proto.derp.KEEPALIVE_INTERVAL` seconds plus up to 5 s of jitter; Ping →
  Pong; NotePreferred recorded (``Conn.preferred``, gauge ``derp_home_clients``).
* Idle and half-open: a client silent for ``idle_timeout`` seconds is sent a Ping; silent ``ping_timeout``
  seconds more, it is closed. TCP keepalive is also on.
* A frame header claiming more than :data:`~tailpy.proto.derp.MAX_FRAME_LEN` bytes, or any malformed frame,
  closes that connection alone, before its body is read.
* What derpserver's ``sclient.run`` ignores is ignored, what it refuses closes: frames of any type a client
  does not send to a server (unknown types, and server-to-client ones: ServerKey, ServerInfo, RecvPacket,
  KeepAlive, PeerGone, PeerPresent, Health, Restarting, a second ClientInfo; also Pong) are read and
  dropped unanswered (``derp_ignored_frames_total``), up to :data:`MAX_IGNORED_FRAME_LEN` bytes
  (``maxUnknownFrameLen``; a longer one closes); a Ping shorter than 8 or longer than :data:`MAX_PING_LEN`
  bytes closes; mesh frames (ForwardPacket, WatchConns, ClosePeer) close the connection ("insufficient
  permissions": this server has no mesh key).
* One key on two or more connections (cloned machines, or a reconnect racing the old connection's close):
  every connection is kept; packets go to the one that most recently sent a frame (the newest at first); each
  gets a Health frame saying the key is connected more than once (cleared with an empty Health when one is
  left). Nobody is kicked, so there is no kick loop (derpserver's ``dupClientSet`` with its default
  ``lastWriterIsActive`` policy).

Per-packet path: each read's frames come as (type, payload) (:meth:`~tailpy.proto.derp.FrameReader.feed_raw`);
a SendPacket is looked up by its raw 32-byte key and its RecvPacket gathered per destination, and every
destination gets one write per read (one ``send()`` for many packets). Other frames are parsed into frame
objects. (``benchmarks/derp_relay.py`` measures it against derper.)

Sans-IO parts (framing, boxes) live in :mod:`tailpy.proto.derp`; this module is the client table and the
queues over a stream (:class:`~tailpy.derp.ws.Reader`, :class:`~tailpy.derp.ws.Writer`). The clock is
injectable (``clock``, seconds, monotonic) for the rate limiter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable

from tailpy.derp.metrics import Metrics
from tailpy.derp.verify import AdmissionError, Verifier
from tailpy.derp.ws import Reader, Writer
from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.proto import derp as proto

log = logging.getLogger("tailpy.derp")

DUPLICATE_KEY_PROBLEM = (
    "this node key is connected to this DERP server more than once (another connection uses the same key; "
    "a cloned machine or state file?); packets go to the connection that sent most recently"
)

MAX_IGNORED_FRAME_LEN = proto.MAX_PACKET_SIZE + proto.KEY_LEN
"""Largest frame of a type the server ignores that it reads and drops, bytes (derpserver's
``maxUnknownFrameLen``: the largest frame a client sends, a full SendPacket); a longer one closes."""
MAX_PING_LEN = 1000
"""Largest Ping payload, bytes (derpserver's ``handleFramePing``: 8 bytes and some room for extensions)."""
MESH_FRAMES = frozenset(
    {proto.FrameType.FORWARD_PACKET, proto.FrameType.WATCH_CONNS, proto.FrameType.CLOSE_PEER}
)
HANDLED_FRAMES = frozenset(
    {proto.FrameType.SEND_PACKET, proto.FrameType.NOTE_PREFERRED, proto.FrameType.PING}
)
"""Frame types a client sends that the server acts on; any other type (but the mesh ones) is ignored."""

REFUSED_PREFIX = "refused: "
"""Start of the Health frame a refused client gets before the server closes (the rest is one sentence)."""

READ_CHUNK = 1 << 16
"""Bytes asked of the stream per read."""

_RECV_HEADER = struct.Struct(">BI")
_RECV_PACKET = int(proto.FrameType.RECV_PACKET)
_WRITE_BUFFER = 1 << 17
"""Bytes a connection's transport may hold unsent before packets stay in its send queue."""


class _TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second (clock in seconds)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Conn:
    """One logged-in DERP connection: its key, its send queues and its writer task."""

    def __init__(self, relay: Relay, key: NodePublic, writer: Writer, peer: str) -> None:
        self.relay = relay
        self.key = key
        self.peer = peer
        self.info: dict[str, object] = {}
        self.preferred = False
        self.closed = False
        self._writer = writer
        self._packets: collections.deque[tuple[NodePublic, bytes]] = collections.deque()
        self._control: collections.deque[bytes] = collections.deque(maxlen=64)
        self._wake = asyncio.Event()
        self.senders: set[NodePublic] = set()
        """Keys that sent packets to this connection (told PeerGone when they leave)."""
        self.peer_gone_limit = _TokenBucket(1.0, 3, relay.clock)
        self._out: list[bytes | memoryview] = []
        """RecvPacket frames gathered while one read of senders' data is handled, written in one go by
        :meth:`flush` (one send() for many packets)."""
        self._out_bytes = 0
        self._last_src: Conn | None = None

    def push(self, src: Conn, payload: bytes) -> None:
        """The fast path of :meth:`enqueue_packet`: ``payload`` is a SendPacket frame's payload (32-byte
        destination key + packet) from ``src``. Gathered for :meth:`flush` while the transport buffer plus
        what is gathered stays under 128 KiB, else queued as :meth:`enqueue_packet` does."""
        n = len(payload) - proto.KEY_LEN
        if self.closed or self._writer.transport.is_closing():
            self.relay.metrics.drop("gone_disconnected", n)
            return
        if src is not self._last_src:
            self._last_src = src
            self._note_sender(src.key)
        if (
            not self._packets
            and self._writer.transport.get_write_buffer_size() + self._out_bytes < _WRITE_BUFFER
        ):
            if not self._out:
                self.relay._dirty.append(self)
            self._out.append(_RECV_HEADER.pack(_RECV_PACKET, len(payload)) + src.key.raw)
            self._out.append(memoryview(payload)[proto.KEY_LEN :])
            self._out_bytes += len(payload) + proto.FRAME_HEADER_LEN
            m = self.relay.metrics
            m.packets_relayed += 1
            m.bytes_relayed += n
        else:
            self._queue(src.key, payload[proto.KEY_LEN :])

    def flush(self) -> None:
        """Write what :meth:`push` gathered, as one write."""
        if self._out:
            if not self.closed:
                self._writer.write(b"".join(self._out))
            self._out.clear()
            self._out_bytes = 0

    def _note_sender(self, src: NodePublic) -> None:
        if src not in self.senders and len(self.senders) < 10_000:
            self.senders.add(src)
            self.relay._watchers[src].add(self)

    def _queue(self, src: NodePublic, data: bytes) -> None:
        q = self._packets
        if len(q) >= self.relay.queue_depth:
            _, old = q.popleft()
            self.relay.metrics.drop("queue_head", len(old))
        q.append((src, data))
        self._wake.set()

    def enqueue_packet(self, src: NodePublic, data: bytes) -> None:
        """Send a packet: straight to the transport while its buffer holds under 128 KiB, else into the send
        queue; when the queue is full, its oldest packet is dropped (counted ``queue_head``)."""
        q = self._packets
        if self.closed:
            self.relay.metrics.drop("gone_disconnected", len(data))
            return
        self._note_sender(src)
        self.flush()  # (keeps order with packets gathered by push)
        if not q and self._writer.transport.get_write_buffer_size() < _WRITE_BUFFER:
            self._writer.write(proto.encode_recv_packet(src, data))
            self.relay.metrics.packets_relayed += 1
            self.relay.metrics.bytes_relayed += len(data)
        else:
            self._queue(src, data)

    def enqueue_frame(self, frame: proto.Frame) -> None:
        """Queue a control frame (Pong, PeerGone, Health, ...); at most 64 wait, the oldest dropped first."""
        self._control.append(proto.encode(frame))
        self._wake.set()

    def close(self) -> None:
        """Close at once, discarding anything unsent (a peer that stopped reading cannot hold it open)."""
        self.closed = True
        self._wake.set()
        self._writer.transport.abort()

    async def send_loop(self) -> None:
        """Write queued frames and keepalives until closed; a write that does not drain in time closes."""
        s = self.relay
        w = self._writer
        next_keepalive = time.monotonic() + s.keepalive_interval + random.uniform(0, s.keepalive_jitter)
        while not self.closed:
            timeout = next_keepalive - time.monotonic()
            if not self._wake.is_set() and timeout > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self.closed:
                return
            if time.monotonic() >= next_keepalive:
                w.write(proto.encode(proto.KeepAlive()))
                next_keepalive = (
                    time.monotonic() + s.keepalive_interval + random.uniform(0, s.keepalive_jitter)
                )
            while self._control:
                w.write(self._control.popleft())
            # Hand packets to the transport only while its buffer is small: the rest wait in the bounded
            # queue, where newer packets push out older ones, instead of piling up unbounded in the transport.
            transport = w.transport
            while self._packets and transport.get_write_buffer_size() < _WRITE_BUFFER:
                src, data = self._packets.popleft()
                w.write(proto.encode_recv_packet(src, data))
                s.metrics.packets_relayed += 1
                s.metrics.bytes_relayed += len(data)
            if self._packets:
                self._wake.set()
            try:
                await asyncio.wait_for(w.drain(), s.write_timeout)
            except asyncio.TimeoutError:
                s.metrics.disconnects["write_timeout"] += 1
                self._drop_queue()
                self.close()
                return
            except (ConnectionError, OSError):
                self._drop_queue()
                self.close()
                return

    def _drop_queue(self) -> None:
        while self._packets:
            _, data = self._packets.popleft()
            self.relay.metrics.drop("write_error", len(data))


class _KeySet:
    """All connections of one key (usually one); ``active`` receives the key's packets."""

    __slots__ = ("active", "conns")

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.active: Conn | None = None


class Relay:
    """The relay core: logs DERP connections in (:meth:`serve`) and relays between them. Durations are
    seconds; ``private_key`` is the server's key (ServerKey carries its public half)."""

    def __init__(
        self,
        private_key: MachinePrivate,
        *,
        queue_depth: int = 32,
        keepalive_interval: float = proto.KEEPALIVE_INTERVAL,
        keepalive_jitter: float = 5.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 2.5 * proto.KEEPALIVE_INTERVAL,
        ping_timeout: float = 15.0,
        write_timeout: float = 10.0,
        verify_client: Verifier | None = None,
        verify_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.queue_depth = queue_depth
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ping_timeout = ping_timeout
        self.write_timeout = write_timeout
        self.verify_client = verify_client
        """Admission check run at each login (None: every client that logs in is admitted); see
        :mod:`tailpy.derp.verify`. May be set after construction, before clients connect."""
        self.verify_timeout = verify_timeout
        self.clock = clock
        self.metrics = Metrics()
        self._clients: dict[NodePublic, _KeySet] = {}
        self._active: dict[bytes, Conn] = {}
        """Raw 32-byte key -> the connection that gets its packets (the fast path's lookup)."""
        self._dirty: list[Conn] = []
        """Connections with packets gathered by Conn.push, flushed after each read."""
        self._watchers: collections.defaultdict[NodePublic, set[Conn]] = collections.defaultdict(set)

    def connections(self, key: NodePublic) -> list[Conn]:
        """The live connections of ``key`` (oldest first)."""
        ks = self._clients.get(key)
        return list(ks.conns) if ks else []

    def close_all(self) -> None:
        """Close every logged-in connection (their :meth:`serve` calls return)."""
        for ks in list(self._clients.values()):
            for c in list(ks.conns):
                c.close()

    # --- login and read loop --------------------------------------------------------------------------------

    async def serve(self, reader: Reader, writer: Writer) -> None:
        """Run one DERP connection on an upgraded stream until it ends: ServerKey, the client's ClientInfo,
        admission, then frames. Returns when the client is gone (its resources released); never raises for
        the client's mistakes (logged and counted)."""
        _set_keepalive(writer)
        peer = _peer_text(writer.get_extra_info("peername"))
        frames = proto.FrameReader()
        writer.write(proto.encode(proto.ServerKey(self.public_key)))
        try:
            first, pending = await asyncio.wait_for(self._read_first(reader, frames), self.handshake_timeout)
            if not isinstance(first, proto.ClientInfo):
                raise ParseError(f"expected ClientInfo, got {type(first).__name__}")
            info = proto.open_client_info(self.private_key, first)
        except (ParseError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self.metrics.login_failures += 1
            if isinstance(e, asyncio.IncompleteReadError):
                log.info("DERP login from %s failed: the client closed the connection during login", peer)
            elif isinstance(e, asyncio.TimeoutError):
                log.info("DERP login from %s failed: no ClientInfo within %g s", peer, self.handshake_timeout)
            else:
                log.info("DERP login from %s refused: %s", peer, e)
            return
        if self.verify_client is not None and not await self._admit(first.key, writer, peer):
            return
        conn = Conn(self, first.key, writer, peer)
        conn.info = info
        writer.write(proto.encode(proto.seal_server_info(self.private_key, first.key)))
        self._register(conn)
        sender = asyncio.create_task(conn.send_loop())
        cause = "eof"
        try:
            cause = await self._read_loop(conn, reader, frames, pending)
        finally:
            self.metrics.disconnects[cause] += 1
            self._unregister(conn)
            conn.close()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def _admit(self, key: NodePublic, writer: Writer, peer: str) -> bool:
        """Ask :attr:`verify_client` about ``key``; a refused client (or one the verifier cannot answer
        for: fail closed) is sent a Health frame saying why, then closed."""
        assert self.verify_client is not None
        source = _peer_ip(writer.get_extra_info("peername"))
        try:
            allowed = await asyncio.wait_for(self.verify_client(key, source), self.verify_timeout)
        except (AdmissionError, asyncio.TimeoutError, OSError) as e:
            log.warning(
                "DERP client %s from %s refused: its key could not be verified (%s); clients are refused "
                "until the admission check answers",
                key.short(),
                peer,
                e or f"no answer within {self.verify_timeout:g} s",
            )
            reason = "verify_failed"
            problem = "this DERP server could not verify this node's key right now; try again later"
        else:
            if allowed:
                return True
            log.info("DERP client %s from %s refused: not an admitted node key", key.short(), peer)
            reason = "not_admitted"
            problem = (
                f"this DERP server admits only known nodes and node key {key.short()} is not one "
                "(unknown to its control server, expired or logged out)"
            )
        self.metrics.refused[reason] += 1
        self.metrics.disconnects[reason] += 1
        writer.write(proto.encode(proto.Health(REFUSED_PREFIX + problem)))
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        return False

    async def _read_first(
        self, reader: Reader, frames: proto.FrameReader
    ) -> tuple[proto.Frame, list[tuple[int, bytes]]]:
        """The first frame, parsed, and the frames read with it, raw (handled after the login)."""
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            got = frames.feed_raw(data)
            if got:
                return proto.parse_frame(*got[0]), got[1:]

    async def _read_loop(
        self,
        conn: Conn,
        reader: Reader,
        frames: proto.FrameReader,
        pending: list[tuple[int, bytes]],
    ) -> str:
        """Read and handle frames until the connection ends; returns the cause (a metrics label)."""
        try:
            self._handle_raw(conn, pending)
        except ParseError as e:
            log.info("DERP client %s %s: closing: %s", conn.peer, conn.key.short(), e)
            return "bad_frame"
        finally:
            self._flush_dirty()
        pinged = False
        while not conn.closed:
            try:
                data = await asyncio.wait_for(
                    reader.read(READ_CHUNK), self.ping_timeout if pinged else self.idle_timeout
                )
            except asyncio.TimeoutError:
                if pinged:
                    return "idle_timeout"
                conn.enqueue_frame(proto.Ping(secrets.token_bytes(proto.PING_LEN)))
                pinged = True
                continue
            except (ConnectionError, OSError):
                return "read_error"
            if not data:
                return "eof"
            pinged = False
            try:
                self._handle_raw(conn, frames.feed_raw(data))
            except ParseError as e:
                log.info("DERP client %s %s: closing: %s", conn.peer, conn.key.short(), e)
                return "bad_frame"
            finally:
                self._flush_dirty()
        return "closed"

    def _flush_dirty(self) -> None:
        """Write what this read queued to each destination (one write per destination)."""
        dirty = self._dirty
        for c in dirty:
            c.flush()
        dirty.clear()

    def _handle_raw(self, conn: Conn, raw: list[tuple[int, bytes]]) -> None:
        """Handle one read's frames: SendPacket on the fast path (no frame objects; packets gathered per
        destination and written once per read), the rest through :func:`proto.parse_frame` and
        :meth:`_handle`. Raises ParseError for a malformed frame."""
        self._note_activity(conn)
        m = self.metrics
        active = self._active
        send_packet = int(proto.FrameType.SEND_PACKET)
        for t, payload in raw:
            if t == send_packet:
                n = len(payload) - proto.KEY_LEN
                if n < 0 or n > proto.MAX_PACKET_SIZE:
                    raise ParseError(f"DERP SendPacket frame with a {len(payload)}-byte payload")
                m.packets_received += 1
                m.bytes_received += n
                target = active.get(payload[: proto.KEY_LEN])
                if target is None or target.closed:
                    self._not_here(conn, NodePublic(payload[: proto.KEY_LEN]), n)
                    continue
                target.push(conn, payload)
            elif t in HANDLED_FRAMES:
                if t == proto.FrameType.PING and len(payload) > MAX_PING_LEN:
                    raise ParseError(f"DERP Ping frame of {len(payload)} bytes (at most {MAX_PING_LEN})")
                self._handle(conn, proto.parse_frame(t, payload))
            elif t in MESH_FRAMES:
                name = proto.FrameType(t).name
                raise ParseError(f"DERP {name} frame from a client: insufficient permissions (no mesh key)")
            elif len(payload) > MAX_IGNORED_FRAME_LEN:
                raise ParseError(f"DERP frame of type {t} is too large to ignore: {len(payload)} bytes")
            else:
                m.ignored_frames += 1

    def _handle(self, conn: Conn, f: proto.Frame) -> None:
        self._note_activity(conn)
        match f:
            case proto.SendPacket(dst, data):
                self.metrics.packets_received += 1
                self.metrics.bytes_received += len(data)
                ks = self._clients.get(dst)
                target = ks.active if ks else None
                if target is None or target.closed:
                    self._not_here(conn, dst, len(data))
                    return
                target.enqueue_packet(conn.key, data)
            case proto.Ping(data):
                self.metrics.pings += 1
                conn.enqueue_frame(proto.Pong(data))
            case proto.NotePreferred(preferred):
                if preferred != conn.preferred:
                    conn.preferred = preferred
                    self.metrics.home_clients += 1 if preferred else -1
            case _:
                pass  # only the frame types of HANDLED_FRAMES come here

    def _not_here(self, conn: Conn, dst: NodePublic, nbytes: int) -> None:
        self.metrics.drop("unknown_dest", nbytes)
        if conn.peer_gone_limit.allow():
            self.metrics.peer_gone_frames["not_here"] += 1
            conn.enqueue_frame(proto.PeerGone(dst, proto.PeerGoneReason.NOT_HERE))

    # --- client table ---------------------------------------------------------------------------------------

    def _register(self, conn: Conn) -> None:
        ks = self._clients.setdefault(conn.key, _KeySet())
        ks.conns.append(conn)
        ks.active = conn
        self._active[conn.key.raw] = conn
        self.metrics.clients += 1
        self.metrics.accepts += 1
        if len(ks.conns) == 2:
            self.metrics.duplicate_keys += 1
        if len(ks.conns) > 1:
            log.warning(
                "DERP key %s connected %d times (latest from %s)", conn.key.short(), len(ks.conns), conn.peer
            )
            for c in ks.conns:
                c.enqueue_frame(proto.Health(DUPLICATE_KEY_PROBLEM))

    def _note_activity(self, conn: Conn) -> None:
        ks = self._clients.get(conn.key)
        if ks is not None and ks.active is not conn and len(ks.conns) > 1:
            ks.active = conn  # the most recent sender gets the packets
            self._active[conn.key.raw] = conn

    def _unregister(self, conn: Conn) -> None:
        if conn.preferred:
            self.metrics.home_clients -= 1
            conn.preferred = False
        for src in conn.senders:
            ws = self._watchers.get(src)
            if ws is not None:
                ws.discard(conn)
                if not ws:
                    del self._watchers[src]
        conn.senders.clear()
        ks = self._clients.get(conn.key)
        if ks is None or conn not in ks.conns:
            return
        self.metrics.clients -= 1
        ks.conns.remove(conn)
        if ks.conns:
            if ks.active is conn:
                ks.active = ks.conns[-1]
                self._active[conn.key.raw] = ks.active
            if len(ks.conns) == 1:
                self.metrics.duplicate_keys -= 1
                ks.conns[0].enqueue_frame(proto.Health(""))
            return
        del self._clients[conn.key]
        self._active.pop(conn.key.raw, None)
        for w in self._watchers.pop(conn.key, set()):
            if not w.closed:
                self.metrics.peer_gone_frames["disconnected"] += 1
                w.enqueue_frame(proto.PeerGone(conn.key, proto.PeerGoneReason.DISCONNECTED))
            w.senders.discard(conn.key)


def _peer_ip(peer: object) -> str:
    """The IP address (no port, no zone) of a peername tuple; "" when there is none."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0]).split("%", 1)[0]
    return ""


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _set_keepalive(writer: Writer) -> None:
    """TCP keepalive: a half-open connection dies after about 30 + 3 x 10 s of silence from the peer."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


__all__ = ["DUPLICATE_KEY_PROBLEM", "READ_CHUNK", "REFUSED_PREFIX", "Conn", "Relay"]
