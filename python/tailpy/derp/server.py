"""asyncio DERP relay server (Tailscale DERP v2 over an HTTP upgrade), framed by :mod:`tailpy.proto.derp`.

HTTP front
----------
The server reads each connection's HTTP/1.1 request head itself (``asyncio.start_server``, at most
:data:`MAX_HEADER_BYTES` within ``header_timeout`` seconds) rather than mounting an aiohttp app, because:

* ``GET /derp`` must hand the raw TCP (or TLS) stream to DERP right after the 101 response, and with
  ``Derp-Fast-Start: 1`` the client's first DERP frame may sit in the same read as its request head. aiohttp
  exposes no public way to take over a connection after a 101 (its WebSocket upgrade uses private protocol
  hooks that change between releases).
* The issue asks for a size *and time* bound on the request-head read; aiohttp bounds size but not the time a
  client may take to send its head (slowloris). Here both are one ``wait_for(readuntil(...))``.
* The other paths are fixed one-shot answers (``/derp/probe``, ``/derp/latency-check``, ``/generate_204``,
  ``/debug/metrics``, ``/``), each sent with ``Connection: close``; no request body is ever read.

Paths (as Tailscale's ``derpserver/handler.go`` and ``cmd/derper``):

* ``GET /derp`` with ``Upgrade: DERP`` → ``101 Switching Protocols`` (headers ``Derp-Version: 2``,
  ``Derp-Public-Key: <hex>``; none with ``Derp-Fast-Start: 1``), then DERP frames. Without Upgrade: 426.
* ``GET /derp`` with ``Upgrade: websocket`` and subprotocol ``derp`` → a WebSocket (RFC 6455) whose binary
  messages carry the same DERP frame stream (:mod:`tailpy.derp.ws`; derper's ``AddWebSocketSupport``).
* ``GET|HEAD /derp/probe`` and ``/derp/latency-check`` → 200, ``Access-Control-Allow-Origin: *``.
* ``GET /generate_204`` → 204; an ``X-Tailscale-Challenge`` of at most 64 characters from
  ``[A-Za-z0-9._:-]`` is answered with ``X-Tailscale-Response: response <challenge>``.
* ``GET /debug/metrics`` → counters in Prometheus text format (from loopback only unless
  ``public_metrics``).

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
* One key on two or more connections (field case C19; cloned machines, or a reconnect racing the old
  connection's close): every connection is kept; packets go to the one that most recently sent a frame (the
  newest at first); each gets a Health frame saying the key is connected more than once (cleared with an empty
  Health when one is left). Nobody is kicked, so there is no kick loop.

Per-packet path: each read's frames come as (type, payload) (:meth:`~tailpy.proto.derp.FrameReader.feed_raw`);
a SendPacket is looked up by its raw 32-byte key and its RecvPacket gathered per destination, and every
destination gets one write per read (one ``send()`` for many packets). Other frames are parsed into frame
objects. (``benchmarks/derp_relay.py`` measures it against derper.)

Sans-IO parts (framing, boxes) live in :mod:`tailpy.proto.derp`; this module is the transport, the client
table and the queues. The clock is injectable (``clock``, seconds, monotonic) for the rate limiter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import nacl.public

from tailpy.derp import ws
from tailpy.derp.verify import AdmissionError, Verifier
from tailpy.derp.ws import Reader, Writer
from tailpy.errors import ConfigError, ParseError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.proto import derp as proto

log = logging.getLogger("tailpy.derp")

KEY_NAME = "derp.key"
"""The server key's file name in the state directory."""

MAX_HEADER_BYTES = 8192
"""Largest HTTP request head read, bytes (request line + headers + blank line)."""

DUPLICATE_KEY_PROBLEM = (
    "this node key is connected to this DERP server more than once (another connection uses the same key; "
    "a cloned machine or state file?); packets go to the connection that sent most recently"
)

DROP_REASONS = ("unknown_dest", "gone_disconnected", "queue_head", "write_error")
"""Labels of ``derp_packets_dropped_total`` (names as derpserver's ``dropReason``)."""

REFUSAL_REASONS = ("not_admitted", "verify_failed")
"""Labels of ``derp_clients_refused_total``: the verifier said no; the verifier could not answer."""

REFUSED_PREFIX = "refused: "
"""Start of the Health frame a refused client gets before the server closes (the rest is one sentence)."""

_RECV_HEADER = struct.Struct(">BI")
_RECV_PACKET = int(proto.FrameType.RECV_PACKET)
_READ_CHUNK = 1 << 16
_WRITE_BUFFER = 1 << 17
"""Bytes a connection's transport may hold unsent before packets stay in its send queue."""
_CHALLENGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:")


def load_or_create_key(state_dir: Path) -> MachinePrivate:
    """The server's private key from ``<state_dir>/derp.key`` (``privkey:<hex>``), created with mode 0600 on
    first use; a readable-by-others file is tightened to 0600. Raises ConfigError (one sentence)."""
    path = state_dir / KEY_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return MachinePrivate.from_text(path.read_text().strip())
        except ValueError as e:
            raise ConfigError(f"DERP key file {path} is damaged ({e}); remove it to make a new key") from None
        except OSError as e:
            raise ConfigError(f"cannot read DERP key file {path}: {e.strerror or e}") from None
    except OSError as e:
        raise ConfigError(
            f"cannot create DERP key file {path}: {e.strerror or e}; pass a --state-dir this user can write"
        ) from None
    key = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
    with os.fdopen(fd, "w") as f:
        f.write(key.text() + "\n")
    return key


@dataclass
class Metrics:
    """Counters and gauges, exported by :meth:`prometheus` (Prometheus text format 0.0.4)."""

    clients: int = 0
    home_clients: int = 0
    duplicate_keys: int = 0
    accepts: int = 0
    websocket_accepts: int = 0
    login_failures: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_relayed: int = 0
    bytes_relayed: int = 0
    packets_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bytes_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    peer_gone_frames: dict[str, int] = field(default_factory=lambda: {"disconnected": 0, "not_here": 0})
    pings: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    disconnects: dict[str, int] = field(default_factory=collections.Counter)

    def drop(self, reason: str, nbytes: int) -> None:
        self.packets_dropped[reason] += 1
        self.bytes_dropped[reason] += nbytes

    def prometheus(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, values: dict[str, int] | int, label: str = "") -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            if isinstance(values, int):
                out.append(f"{name} {values}")
            else:
                for k, v in sorted(values.items()):
                    out.append(f'{name}{{{label}="{k}"}} {v}')

        metric("derp_clients", "gauge", "Connected DERP clients (connections).", self.clients)
        metric(
            "derp_home_clients", "gauge", "Clients that said this server is their home.", self.home_clients
        )
        metric("derp_duplicate_client_keys", "gauge", "Keys connected more than once.", self.duplicate_keys)
        metric("derp_accepts_total", "counter", "Connections that completed the login.", self.accepts)
        metric(
            "derp_websocket_accepts_total",
            "counter",
            "WebSocket upgrades accepted at /derp.",
            self.websocket_accepts,
        )
        metric("derp_login_failures_total", "counter", "Connections refused at login.", self.login_failures)
        metric(
            "derp_clients_refused_total",
            "counter",
            "Logins refused by client verification, by reason.",
            self.refused,
            "reason",
        )
        metric("derp_packets_received_total", "counter", "SendPacket frames received.", self.packets_received)
        metric("derp_bytes_received_total", "counter", "Packet bytes received.", self.bytes_received)
        metric(
            "derp_packets_relayed_total",
            "counter",
            "Packets written to their destination.",
            self.packets_relayed,
        )
        metric(
            "derp_bytes_relayed_total",
            "counter",
            "Packet bytes written to their destination.",
            self.bytes_relayed,
        )
        metric(
            "derp_packets_dropped_total",
            "counter",
            "Packets dropped, by reason.",
            self.packets_dropped,
            "reason",
        )
        metric(
            "derp_bytes_dropped_total",
            "counter",
            "Packet bytes dropped, by reason.",
            self.bytes_dropped,
            "reason",
        )
        metric(
            "derp_peer_gone_frames_total", "counter", "PeerGone frames sent.", self.peer_gone_frames, "reason"
        )
        metric("derp_pings_total", "counter", "Ping frames answered.", self.pings)
        metric(
            "derp_disconnects_total",
            "counter",
            "Closed client connections, by cause.",
            dict(self.disconnects),
            "cause",
        )
        return "\n".join(out) + "\n"


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

    def __init__(self, server: DerpServer, key: NodePublic, writer: Writer, peer: str) -> None:
        self.server = server
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
        self.peer_gone_limit = _TokenBucket(1.0, 3, server.clock)
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
            self.server.metrics.drop("gone_disconnected", n)
            return
        if src is not self._last_src:
            self._last_src = src
            self._note_sender(src.key)
        if (
            not self._packets
            and self._writer.transport.get_write_buffer_size() + self._out_bytes < _WRITE_BUFFER
        ):
            if not self._out:
                self.server._dirty.append(self)
            self._out.append(_RECV_HEADER.pack(_RECV_PACKET, len(payload)) + src.key.raw)
            self._out.append(memoryview(payload)[proto.KEY_LEN :])
            self._out_bytes += len(payload) + proto.FRAME_HEADER_LEN
            m = self.server.metrics
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
            self.server._watchers[src].add(self)

    def _queue(self, src: NodePublic, data: bytes) -> None:
        q = self._packets
        if len(q) >= self.server.queue_depth:
            _, old = q.popleft()
            self.server.metrics.drop("queue_head", len(old))
        q.append((src, data))
        self._wake.set()

    def enqueue_packet(self, src: NodePublic, data: bytes) -> None:
        """Send a packet: straight to the transport while its buffer holds under 128 KiB, else into the send
        queue; when the queue is full, its oldest packet is dropped (counted ``queue_head``)."""
        q = self._packets
        if self.closed:
            self.server.metrics.drop("gone_disconnected", len(data))
            return
        self._note_sender(src)
        self.flush()  # (keeps order with packets gathered by push)
        if not q and self._writer.transport.get_write_buffer_size() < _WRITE_BUFFER:
            self._writer.write(proto.encode_recv_packet(src, data))
            self.server.metrics.packets_relayed += 1
            self.server.metrics.bytes_relayed += len(data)
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
        s = self.server
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
            self.server.metrics.drop("write_error", len(data))


class _KeySet:
    """All connections of one key (usually one); ``active`` receives the key's packets."""

    __slots__ = ("active", "conns")

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.active: Conn | None = None


class DerpServer:
    """A DERP relay. ``await start(host, port)``, then ``await stop()``.

    ``private_key``: the server's key (ServerKey carries its public half). Durations are seconds.
    """

    def __init__(
        self,
        private_key: MachinePrivate,
        *,
        queue_depth: int = 32,
        keepalive_interval: float = proto.KEEPALIVE_INTERVAL,
        keepalive_jitter: float = 5.0,
        header_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 2.5 * proto.KEEPALIVE_INTERVAL,
        ping_timeout: float = 15.0,
        write_timeout: float = 10.0,
        max_header_bytes: int = MAX_HEADER_BYTES,
        public_metrics: bool = False,
        verify_client: Verifier | None = None,
        verify_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.queue_depth = queue_depth
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        self.header_timeout = header_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.ping_timeout = ping_timeout
        self.write_timeout = write_timeout
        self.max_header_bytes = max_header_bytes
        self.public_metrics = public_metrics
        self.verify_client = verify_client
        """Admission check run at each login (None: every client that logs in is admitted); see
        :mod:`tailpy.derp.verify`. May be set after construction, before clients connect."""
        self.verify_timeout = verify_timeout
        self.clock = clock
        self.metrics = Metrics()
        self.extra_metrics: list[Callable[[], str]] = []
        """More Prometheus text served at /debug/metrics after the relay's (the STUN server's, say)."""
        self._clients: dict[NodePublic, _KeySet] = {}
        self._active: dict[bytes, Conn] = {}
        """Raw 32-byte key -> the connection that gets its packets (the fast path's lookup)."""
        self._dirty: list[Conn] = []
        """Connections with packets gathered by Conn.push, flushed after each read."""
        self._watchers: collections.defaultdict[NodePublic, set[Conn]] = collections.defaultdict(set)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, host: str | None, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port`` (``None``: every address; port 0 picks one). Raises OSError."""
        srv = await asyncio.start_server(
            self._on_connect,
            host,
            port,
            limit=max(self.max_header_bytes, _READ_CHUNK),
            ssl=ssl_context,
            ssl_handshake_timeout=self.header_timeout if ssl_context else None,
        )
        self._servers.append(srv)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        for srv in self._servers:
            srv.close()
        for ks in list(self._clients.values()):
            for c in list(ks.conns):
                c.close()
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=5)
            for t in late:
                t.cancel()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    def connections(self, key: NodePublic) -> list[Conn]:
        """The live connections of ``key`` (oldest first)."""
        ks = self._clients.get(key)
        return list(ks.conns) if ks else []

    # --- HTTP -----------------------------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve_http(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.write_timeout)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                writer.transport.abort()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The stream's limit is 64 KiB (DERP frames are read through it later); while reading the request head
        # it is lowered to max_header_bytes so readuntil gives up as soon as that many bytes came without the
        # blank line (CPython's StreamReader keeps it in ``_limit``; without that attribute the length check
        # below still answers 431, only later).
        saved = getattr(reader, "_limit", None)
        if isinstance(saved, int):
            setattr(reader, "_limit", self.max_header_bytes)  # noqa: B010
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
        except asyncio.LimitOverrunError:
            await self._respond(writer, 431, "Request Header Fields Too Large")
            return
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            if isinstance(saved, int):
                setattr(reader, "_limit", saved)  # noqa: B010
        if len(head) > self.max_header_bytes:
            await self._respond(writer, 431, "Request Header Fields Too Large")
            return
        try:
            method, path, headers = _parse_head(head)
        except ValueError:
            await self._respond(writer, 400, "Bad Request")
            return
        path = path.split("?", 1)[0]
        if path in ("/derp/probe", "/derp/latency-check"):
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, "Method Not Allowed", body=b"bogus probe method\n")
                return
            await self._respond(writer, 200, "OK", {"Access-Control-Allow-Origin": "*"})
        elif path == "/derp":
            if ws.wants_websocket(headers):
                try:
                    ws_reader, ws_writer = ws.server_accept(head, reader, writer)
                except ParseError as e:
                    await self._respond(writer, 400, "Bad Request", body=f"{e}\n".encode())
                    return
                self.metrics.websocket_accepts += 1
                await self._serve_derp(ws_reader, ws_writer)
                return
            # ("Upgrade: WebSocket" without the derp subprotocol: early Tailscale clients speaking plain DERP)
            if headers.get("upgrade", "").lower() not in ("derp", "websocket"):
                await self._respond(
                    writer, 426, "Upgrade Required", body=b"DERP requires connection upgrade\n"
                )
                return
            if headers.get("derp-fast-start") != "1":
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                    + f"Derp-Version: {proto.PROTOCOL_VERSION}\r\n".encode()
                    + f"Derp-Public-Key: {self.public_key.raw.hex()}\r\n\r\n".encode()
                )
            await self._serve_derp(reader, writer)
        elif path == "/generate_204":
            extra = {"Cache-Control": "no-cache, no-store, must-revalidate, no-transform, max-age=0"}
            challenge = headers.get("x-tailscale-challenge", "")
            if challenge and len(challenge) <= 64 and set(challenge) <= _CHALLENGE_CHARS:
                extra["X-Tailscale-Response"] = "response " + challenge
            await self._respond(writer, 204, "No Content", extra)
        elif path == "/debug/metrics":
            peer = writer.get_extra_info("peername")
            if not self.public_metrics and not _is_loopback(peer):
                await self._respond(writer, 403, "Forbidden", body=b"metrics are served to loopback only\n")
                return
            body = "".join([self.metrics.prometheus(), *(f() for f in self.extra_metrics)]).encode()
            await self._respond(writer, 200, "OK", {"Content-Type": "text/plain; version=0.0.4"}, body)
        elif path == "/":
            await self._respond(writer, 200, "OK", {"Content-Type": "text/plain"}, b"tailpy DERP server\n")
        else:
            await self._respond(writer, 404, "Not Found", body=b"not found\n")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        reason: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
        if status != 204:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body if status != 204 else b""))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), self.write_timeout)

    # --- DERP -----------------------------------------------------------------------------------------------

    async def _serve_derp(self, reader: Reader, writer: Writer) -> None:
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
    ) -> tuple[proto.Frame, list[proto.Frame]]:
        while True:
            data = await reader.read(_READ_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(b"", None)
            got = frames.feed(data)
            if got:
                return got[0], got[1:]

    async def _read_loop(
        self,
        conn: Conn,
        reader: Reader,
        frames: proto.FrameReader,
        pending: list[proto.Frame],
    ) -> str:
        """Read and handle frames until the connection ends; returns the cause (a metrics label)."""
        for f in pending:
            self._handle(conn, f)
        pinged = False
        while not conn.closed:
            try:
                data = await asyncio.wait_for(
                    reader.read(_READ_CHUNK), self.ping_timeout if pinged else self.idle_timeout
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
                dirty = self._dirty
                for c in dirty:
                    c.flush()
                dirty.clear()
        return "closed"

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
            else:
                self._handle(conn, proto.parse_frame(t, payload))

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
                pass  # Pong, KeepAlive, unknown and mesh frames (no mesh key support yet): ignored

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


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, target, lower-cased headers) of an HTTP/1.x request head. Raises ValueError."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError("bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("bad header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def _is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ip_address(str(peer[0]).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


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


__all__ = [
    "DROP_REASONS",
    "DUPLICATE_KEY_PROBLEM",
    "KEY_NAME",
    "REFUSAL_REASONS",
    "REFUSED_PREFIX",
    "Conn",
    "DerpServer",
    "Metrics",
    "load_or_create_key",
]
