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
  drain within ``write_timeout`` seconds (a mesh peer's: :data:`MESH_WRITE_TIMEOUT`) closes that connection.
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
* Mesh (derper's ``--mesh-with``, ``derpserver.go``): with a ``mesh_key``, a client whose ClientInfo carries
  the same ``meshKey`` (compared in constant time) is a mesh peer: it skips ``verify_client``, and may send
  WatchConns (it is then sent PeerPresent, with the client's IP:port and flags, for every key connected here,
  and for every later login, and PeerGone "disconnected" when a key's last connection leaves), ForwardPacket
  (delivered to a client of this server only, never forwarded again: one hop; an unknown destination is
  dropped as ``unknown_dest_on_fwd``) and ClosePeer. :meth:`Relay.add_forwarder` /
  :meth:`Relay.remove_forwarder` (called by :mod:`tailpy.derp.mesh`) keep the table key -> mesh peers that
  have it: a packet to a key with no connection here goes to the peer that has had it longest (derpserver's
  ``multiForwarder``); a local connection always wins. PeerGone "disconnected" reaches a key's senders only
  when the key is gone from the whole region (no connection here, no forwarder).
* What derpserver's ``sclient.run`` ignores is ignored, what it refuses closes: frames of any type a client
  does not send to a server (unknown types, and server-to-client ones: ServerKey, ServerInfo, RecvPacket,
  KeepAlive, PeerGone, PeerPresent, Health, Restarting, a second ClientInfo; also Pong) are read and
  dropped unanswered (``derp_ignored_frames_total``), up to :data:`MAX_IGNORED_FRAME_LEN` bytes
  (``maxUnknownFrameLen``; a longer one closes); a Ping shorter than 8 or longer than :data:`MAX_PING_LEN`
  bytes closes; mesh frames (ForwardPacket, WatchConns, ClosePeer) from a client without mesh rights close
  the connection (derpserver's "insufficient permissions"; the log says whether it presented no mesh key or
  another one). A login presenting a mesh key that is not this server's is logged as a warning (a relay of
  the region given another ``--mesh-psk-file``).
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
import hmac
import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol

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


MESH_QUEUE_FRAMES = 1 << 20
"""Most PeerPresent/PeerGone frames waiting for one mesh peer (derpserver's ``peerStateChange`` has no bound;
one per client key, so this bounds only a runaway)."""


MESH_WRITE_TIMEOUT = 30.0
"""Seconds a write to a mesh peer may take before its connection is closed, at least (derpserver's
``privilegedWriteTimeout``: a peer being sent the PeerPresent of every client gets more time)."""


class Forwarder(Protocol):
    """Where packets for a key connected to another server of the mesh go (derpserver's ``PacketForwarder``):
    :class:`tailpy.derp.mesh.MeshPeer`."""

    def forward_packet(self, src: NodePublic, dst: NodePublic, data: bytes) -> str | None:
        """Send a ForwardPacket; None when written, else the drop reason (a :data:`DROP_REASONS` label)."""
        ...


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
        self.can_mesh = False
        """Logged in with the mesh key: may watch connections and forward packets (derpserver ``canMesh``)."""
        self.endpoint: tuple[IPv4Address | IPv6Address, int] | None = None
        """The client's IP and port as this server sees them (sent in PeerPresent)."""
        self._writer = writer
        self._packets: collections.deque[tuple[NodePublic, bytes]] = collections.deque()
        self._control: collections.deque[bytes] = collections.deque(maxlen=64)
        self._mesh: collections.deque[bytes] = collections.deque(maxlen=MESH_QUEUE_FRAMES)
        """A mesh peer's control frames (PeerPresent, PeerGone, Pong, ...), in order, none dropped."""
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
        """Queue a control frame (Pong, PeerGone, Health, ...); at most 64 wait, the oldest dropped first
        (a mesh peer's are all kept, in order: they are its view of who is connected)."""
        (self._mesh if self.can_mesh else self._control).append(proto.encode(frame))
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
            transport = w.transport
            if time.monotonic() >= next_keepalive:
                w.write(proto.encode(proto.KeepAlive()))
                next_keepalive = (
                    time.monotonic() + s.keepalive_interval + random.uniform(0, s.keepalive_jitter)
                )
            while self._control:
                w.write(self._control.popleft())
            while self._mesh and transport.get_write_buffer_size() < _WRITE_BUFFER:
                w.write(self._mesh.popleft())
            if self._mesh:
                self._wake.set()
            # Hand packets to the transport only while its buffer is small: the rest wait in the bounded
            # queue, where newer packets push out older ones, instead of piling up unbounded in the transport.
            while self._packets and transport.get_write_buffer_size() < _WRITE_BUFFER:
                src, data = self._packets.popleft()
                w.write(proto.encode_recv_packet(src, data))
                s.metrics.packets_relayed += 1
                s.metrics.bytes_relayed += len(data)
            if self._packets:
                self._wake.set()
            try:
                await asyncio.wait_for(
                    w.drain(), max(s.write_timeout, MESH_WRITE_TIMEOUT) if self.can_mesh else s.write_timeout
                )
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
        mesh_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.public_key_node = NodePublic(self.public_key.raw)
        """The server's key as a client key (a mesh peer logs in to the others with it)."""
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
        if mesh_key is not None and len(mesh_key) != proto.MESH_KEY_LEN:
            raise ValueError(f"a DERP mesh key is {proto.MESH_KEY_LEN} bytes, got {len(mesh_key)}")
        self.mesh_key = mesh_key
        """The region's pre-shared mesh key (32 bytes; None: no client may mesh); see
        :func:`tailpy.proto.derp.parse_mesh_key`."""
        self.clock = clock
        self.metrics = Metrics()
        self._clients: dict[NodePublic, _KeySet] = {}
        self._active: dict[bytes, Conn] = {}
        """Raw 32-byte key -> the connection that gets its packets (the fast path's lookup)."""
        self._dirty: list[Conn] = []
        """Connections with packets gathered by Conn.push, flushed after each read."""
        self._watchers: collections.defaultdict[NodePublic, set[Conn]] = collections.defaultdict(set)
        """Key -> connections that received packets from it (told PeerGone when it leaves the region)."""
        self._mesh_watchers: set[Conn] = set()
        """Mesh peers that sent WatchConns (derpserver ``watchers``)."""
        self._forwarders: dict[bytes, list[Forwarder]] = {}
        """Raw key of a client connected to another server of the mesh -> the mesh peers that said so, the
        one that said so first first (derpserver ``clientsMesh`` and ``multiForwarder``)."""

    def queued_packets(self) -> list[int]:
        """Packets waiting in each live connection's send queue (for the queue depth metrics)."""
        return [len(c._packets) for ks in self._clients.values() for c in ks.conns]

    def connections(self, key: NodePublic) -> list[Conn]:
        """The live connections of ``key`` (oldest first)."""
        ks = self._clients.get(key)
        return list(ks.conns) if ks else []

    def forwarders(self, key: NodePublic) -> list[Forwarder]:
        """The mesh peers through which ``key`` is reachable (the first gets its packets)."""
        return list(self._forwarders.get(key.raw, ()))

    def add_forwarder(self, key: NodePublic, fwd: Forwarder) -> None:
        """``key`` is connected to the mesh peer ``fwd`` (a PeerPresent from it; derpserver
        ``AddPacketForwarder``). A second peer for the same key is kept behind the first."""
        if key == self.public_key_node:
            return
        fwds = self._forwarders.setdefault(key.raw, [])
        if fwd not in fwds:
            fwds.append(fwd)
            self.metrics.remote_clients = len(self._forwarders)

    def remove_forwarder(self, key: NodePublic, fwd: Forwarder) -> None:
        """``key`` left the mesh peer ``fwd`` (a PeerGone from it, or the mesh connection broke; derpserver
        ``RemovePacketForwarder``). When no connection or forwarder is left for ``key`` in the region, the
        clients it sent to here are told PeerGone "disconnected"."""
        fwds = self._forwarders.get(key.raw)
        if fwds is None or fwd not in fwds:
            return
        fwds.remove(fwd)
        if fwds:
            return
        del self._forwarders[key.raw]
        self.metrics.remote_clients = len(self._forwarders)
        if key not in self._clients:
            self._peer_gone_from_region(key)

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
        can_mesh = self._is_mesh_peer(info)
        wrong_mesh_key = not can_mesh and isinstance(info.get("meshKey"), str) and bool(info.get("meshKey"))
        if can_mesh:
            log.info("DERP mesh peer %s logged in from %s", first.key.short(), peer)
        elif wrong_mesh_key:
            log.warning(
                "DERP server %s from %s presented a mesh key that is not this server's (%s): no mesh rights "
                "(give every relay of the region the same --mesh-psk-file; `tailpy control mesh-key` writes "
                "a control database's)",
                first.key.short(),
                peer,
                "this server has none" if self.mesh_key is None else "another key",
            )
        admit = not can_mesh and self.verify_client is not None
        if admit and not await self._admit(first.key, writer, peer, wrong_mesh_key=wrong_mesh_key):
            return
        conn = Conn(self, first.key, writer, peer)
        conn.info = info
        conn.can_mesh = can_mesh
        conn.endpoint = _peer_endpoint(writer.get_extra_info("peername"))
        writer.write(proto.encode(proto.seal_server_info(self.private_key, first.key)))
        self._register(conn)
        sender = asyncio.create_task(conn.send_loop())
        reason = "eof"
        try:
            reason = await self._read_loop(conn, reader, frames, pending)
        finally:
            self.metrics.disconnects[reason] += 1
            self._unregister(conn)
            conn.close()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    def _is_mesh_peer(self, info: dict[str, object]) -> bool:
        """Whether ClientInfo's ``meshKey`` is this server's mesh key (derpserver ``isMeshPeer``)."""
        given = info.get("meshKey")
        if self.mesh_key is None or not isinstance(given, str) or not given:
            return False
        try:
            key = proto.parse_mesh_key(given)
        except ParseError:
            return False
        return hmac.compare_digest(key, self.mesh_key)

    async def _admit(
        self, key: NodePublic, writer: Writer, peer: str, *, wrong_mesh_key: bool = False
    ) -> bool:
        """Ask :attr:`verify_client` about ``key``; a refused client (or one the verifier cannot answer
        for: fail closed) is sent a Health frame saying why, then closed. ``wrong_mesh_key``: the client
        presented a mesh key that is not this server's (another relay of a misconfigured region: said so
        when refused)."""
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
            reason = "not_admitted"
            if wrong_mesh_key:
                log.info(
                    "DERP server %s from %s refused: its mesh key is not this server's", key.short(), peer
                )
                problem = (
                    "this DERP server's mesh key differs from the one presented (give every relay of the "
                    "region the same --mesh-psk-file), and it admits only known nodes"
                )
            else:
                log.info(
                    "DERP client %s from %s refused: not an admitted node key (unknown to control, expired "
                    "or logged out)",
                    key.short(),
                    peer,
                )
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
        """Read and handle frames until the connection ends; returns the reason (a metrics label)."""
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
                    self._elsewhere(conn, payload)
                    continue
                target.push(conn, payload)
            elif t in HANDLED_FRAMES:
                if t == proto.FrameType.PING and len(payload) > MAX_PING_LEN:
                    raise ParseError(f"DERP Ping frame of {len(payload)} bytes (at most {MAX_PING_LEN})")
                self._handle(conn, proto.parse_frame(t, payload))
            elif t in MESH_FRAMES:
                if not conn.can_mesh:
                    name = proto.FrameType(t).name
                    why = (
                        "its mesh key is not this server's"
                        if conn.info.get("meshKey")
                        else "it presented no mesh key"
                        if self.mesh_key is not None
                        else "this server has no mesh key"
                    )
                    raise ParseError(f"DERP {name} frame from a client without mesh rights ({why})")
                self._handle_mesh(conn, proto.parse_frame(t, payload))
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
                    self._elsewhere(conn, dst.raw + data)
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

    def _elsewhere(self, conn: Conn, payload: bytes) -> None:
        """A SendPacket (``payload``: destination key + packet) for a key with no connection here: forwarded
        to the mesh peer that has it, else dropped (``unknown_dest``) with a PeerGone "not here"."""
        raw = payload[: proto.KEY_LEN]
        fwds = self._forwarders.get(raw)
        data = payload[proto.KEY_LEN :]
        if fwds:
            dst = NodePublic(raw)
            why = fwds[0].forward_packet(conn.key, dst, data)
            if why is None:
                self.metrics.packets_forwarded_out += 1
                self.metrics.bytes_forwarded_out += len(data)
            else:
                self.metrics.drop(why, len(data))
            return
        self._not_here(conn, NodePublic(raw), len(data))

    def _handle_mesh(self, conn: Conn, f: proto.Frame) -> None:
        """A mesh frame from a mesh peer (derpserver ``handleFrameWatchConns``, ``handleFrameForwardPacket``,
        ``handleFrameClosePeer``)."""
        match f:
            case proto.WatchConns():
                self._add_mesh_watcher(conn)
            case proto.ForwardPacket(src, dst, data):
                m = self.metrics
                m.packets_forwarded_in += 1
                m.bytes_forwarded_in += len(data)
                target = self._active.get(dst.raw)
                if target is None or target.closed:  # never forwarded again: one hop
                    self._not_here(conn, dst, len(data), reason="unknown_dest_on_fwd")
                    return
                target.enqueue_packet(src, data)
            case proto.ClosePeer(key):
                targets = self.connections(key)
                log.info("DERP mesh peer %s asked to close %s (%d connections)", conn.peer, key.short(),
                         len(targets))  # fmt: skip
                for c in targets:
                    c.close()
            case _:
                pass  # only the frame types of MESH_FRAMES come here

    def _add_mesh_watcher(self, conn: Conn) -> None:
        """Send ``conn`` PeerPresent for every key connected here, then every change (derpserver
        ``addWatcher``); a server watching itself is ignored."""
        if conn.key == self.public_key_node or conn in self._mesh_watchers:
            return
        for ks in self._clients.values():
            if ks.active is not None:
                conn.enqueue_frame(self._present_frame(ks.active))
        self._mesh_watchers.add(conn)
        self.metrics.mesh_watchers = len(self._mesh_watchers)

    @staticmethod
    def _present_frame(c: Conn) -> proto.PeerPresent:
        flags = proto.PeerPresentFlags(0)
        if c.info.get("IsProber") is True:
            flags |= proto.PeerPresentFlags.PROBER
        if c.can_mesh:
            flags |= proto.PeerPresentFlags.MESH_PEER
        return proto.PeerPresent(
            c.key, c.endpoint or (IPv6Address(0), 0), int(flags or proto.PeerPresentFlags.REGULAR)
        )

    def _peer_gone_from_region(self, key: NodePublic) -> None:
        """Tell the clients that received packets from ``key`` that it is gone (derpserver
        ``notePeerGoneFromRegionLocked``)."""
        for w in self._watchers.pop(key, set()):
            if not w.closed:
                self.metrics.peer_gone_frames["disconnected"] += 1
                w.enqueue_frame(proto.PeerGone(key, proto.PeerGoneReason.DISCONNECTED))
            w.senders.discard(key)

    def _not_here(self, conn: Conn, dst: NodePublic, nbytes: int, reason: str = "unknown_dest") -> None:
        self.metrics.drop(reason, nbytes)
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
        if self._mesh_watchers:
            present = self._present_frame(conn)
            for w in self._mesh_watchers:
                w.enqueue_frame(present)
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
        if conn in self._mesh_watchers:
            self._mesh_watchers.discard(conn)
            self.metrics.mesh_watchers = len(self._mesh_watchers)
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
        gone = proto.PeerGone(conn.key, proto.PeerGoneReason.DISCONNECTED)
        for w in self._mesh_watchers:
            w.enqueue_frame(gone)
        if conn.key.raw not in self._forwarders:
            self._peer_gone_from_region(conn.key)


def _peer_ip(peer: object) -> str:
    """The IP address (no port, no zone) of a peername tuple; "" when there is none."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0]).split("%", 1)[0]
    return ""


def _peer_endpoint(peer: object) -> tuple[IPv4Address | IPv6Address, int] | None:
    """(IP, port) of a peername tuple; None when it is not one (a Unix socket, a test stream)."""
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[1], int):
        try:
            return ip_address(str(peer[0]).split("%", 1)[0]), peer[1]
        except ValueError:
            return None
    return None


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


__all__ = ["DUPLICATE_KEY_PROBLEM", "READ_CHUNK", "REFUSED_PREFIX", "Conn", "Forwarder", "Relay"]
