"""An asyncio DERP client (Tailscale's DERP protocol version 2, ``derp/derp_client.go`` and
``derp/derphttp/derphttp_client.go`` in tailscale/tailscale).

Connection: ``GET /derp`` over HTTP/1.1 (or HTTPS) with ``Upgrade: DERP`` and ``Connection: Upgrade``; the
server answers ``101 Switching Protocols`` and the same TCP stream then carries DERP frames (1-byte type +
big-endian u32 length + payload). A ``ws://`` or ``wss://`` URL uses the WebSocket variant instead
(subprotocol ``derp``, the same frame stream in binary messages; :mod:`tailpy.derp.ws`). Login: the server
sends ServerKey (magic ``DERP🔑`` + its 32-byte key), the client sends ClientInfo (its 32-byte node public
key + a NaCl box of JSON ``{"version": 2, ...}``), the server answers ServerInfo (NaCl box of JSON); a server
that refuses the node's key sends a Health frame instead and closes (DerpClientError says why).

:class:`DerpClient` is one connection: :meth:`DerpClient.connect`, then :meth:`~DerpClient.send`,
:meth:`~DerpClient.recv` (or ``async for``), :meth:`~DerpClient.ping`, :meth:`~DerpClient.note_preferred`,
:meth:`~DerpClient.close`. Server pings are answered and keep-alives consumed inside the client. Frames
are encoded and parsed by :mod:`tailpy.proto.derp`; messages are its frame dataclasses.
:class:`ReconnectingDerpClient` wraps it with exponential backoff and jitter, so clients do not all return
in step after a relay restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from tailpy import bypass
from tailpy.asyncutil import wait_event
from tailpy.backoff import reconnect_delays
from tailpy.derp import ws
from tailpy.derp.ws import Reader, Writer
from tailpy.errors import ParseError, TailpyError
from tailpy.keys import MachinePublic, NodePrivate, NodePublic
from tailpy.proto import derp as proto

log = logging.getLogger(__name__)

MAX_RECV_FRAME_LEN = 1 << 20
"""Largest frame the client reads, bytes: derp_client.go refuses frames above 1 MiB."""
MAX_HTTP_HEADER = 16 << 10
READ_CHUNK = 64 << 10
CLOSE_TIMEOUT = 2.0
"""Seconds :meth:`DerpClient.close` lets unsent frames drain before it aborts the connection."""


class DerpClientError(TailpyError, ConnectionError):
    """The DERP server could not be reached, refused the upgrade or login, or the connection broke."""


class DerpClosedError(DerpClientError):
    """The DERP connection is closed (by :meth:`DerpClient.close`, by the server, or after an error)."""


@dataclass(frozen=True, slots=True)
class ServerInfoMessage:
    """The ServerInfo JSON (derp.go ``ServerInfo``): protocol version and the server's advisory rate limit
    (bytes per second and burst bytes; 0 = unspecified)."""

    version: int
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0


Message: TypeAlias = (
    proto.RecvPacket | proto.PeerGone | proto.PeerPresent | proto.Pong | proto.Health | proto.Restarting
)
"""What :meth:`DerpClient.recv` returns (frames of :mod:`tailpy.proto.derp`). Pong only when no
:meth:`DerpClient.ping` was waiting for it; KeepAlive, Ping (answered), repeated ServerInfo and unknown
frame types are consumed inside the client."""

_SURFACED = (proto.RecvPacket, proto.PeerGone, proto.PeerPresent, proto.Pong, proto.Health, proto.Restarting)


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    path: str
    tls: bool
    websocket: bool = False

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise DerpClientError(f"DERP URL {url!r} must look like http(s)://host[:port]/derp (or ws(s)://)")
        tls = parts.scheme in ("https", "wss")
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise DerpClientError(f"DERP URL {url!r} has an invalid port") from None
        return cls(parts.hostname, port, parts.path or "/derp", tls, parts.scheme in ("ws", "wss"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


class DerpClient:
    """One DERP connection, logged in. Make it with :meth:`connect`; use it from one event loop."""

    def __init__(
        self,
        reader: Reader,
        writer: Writer,
        frames: proto.FrameReader,
        pending: list[proto.Frame],
        private_key: NodePrivate,
        server_key: MachinePublic,
        server_info: ServerInfoMessage,
        *,
        queue_size: int = 1024,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = frames
        self.private_key = private_key
        self.public_key: NodePublic = private_key.public
        self.server_key = server_key
        """The server's 32-byte Curve25519 key from its ServerKey frame."""
        self.server_info = server_info
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=queue_size)
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._drain_lock = asyncio.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self.last_recv = time.monotonic()
        """Monotonic seconds when bytes last arrived from the server (login counts)."""
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(pending))

    # ---- connecting ----

    @classmethod
    async def connect(
        cls,
        url: str,
        private_key: NodePrivate,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        queue_size: int = 1024,
        mesh_key: bytes | None = None,
    ) -> DerpClient:
        """Connect to ``url`` (``http(s)://host[:port]/derp``), upgrade to DERP and log in as ``private_key``.

        ``timeout`` (seconds) bounds TCP, TLS, HTTP upgrade and login together. ``ssl_context`` is used for
        https (default: the system's verified context). ``mesh_key`` (32 bytes) goes in ClientInfo as
        ``meshKey`` (64 hex digits): a server with the same key lets this client watch its connections and
        forward packets (:mod:`tailpy.derp.mesh`). Raises DerpClientError with one sentence on refusal,
        timeout or a malformed greeting."""
        target = _Target.parse(url)
        try:
            return await asyncio.wait_for(
                cls._connect(target, private_key, ssl_context, queue_size, mesh_key), timeout
            )
        except asyncio.TimeoutError:
            raise DerpClientError(f"DERP server {url} did not complete login within {timeout:g} s") from None
        except DerpClientError:
            raise
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or exc.reason or str(exc)
            raise DerpClientError(
                f"could not connect to DERP server {url}: its TLS certificate is not trusted ({why})"
            ) from None
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            raise DerpClientError(f"could not connect to DERP server {url}: {exc}") from None
        except ParseError as exc:
            raise DerpClientError(f"DERP server {url} sent a malformed greeting: {exc}") from None

    @classmethod
    async def _connect(
        cls,
        target: _Target,
        private_key: NodePrivate,
        ssl_context: ssl.SSLContext | None,
        queue_size: int,
        mesh_key: bytes | None = None,
    ) -> DerpClient:
        ctx: ssl.SSLContext | None = None
        if target.tls:
            ctx = ssl_context or ssl.create_default_context()
        raw_reader, raw_writer = await bypass.open_connection(
            target.host,
            target.port,
            ssl=ctx,
            server_hostname=target.host if ctx is not None else None,
            limit=MAX_HTTP_HEADER,
        )
        reader: Reader = raw_reader
        writer: Writer = raw_writer
        try:
            if target.websocket:
                reader, writer = await ws.client_handshake(
                    raw_reader, raw_writer, target.host_header, target.path
                )
        except BaseException:
            raw_writer.close()
            raise
        try:
            request = (
                f"GET {target.path} HTTP/1.1\r\n"
                f"Host: {target.host_header}\r\n"
                "User-Agent: tailpy-derp\r\n"
                "Upgrade: DERP\r\n"
                "Connection: Upgrade\r\n"
                "\r\n"
            )
            if not target.websocket:
                writer.write(request.encode("ascii"))
                await writer.drain()
                await _read_upgrade_response(raw_reader)

            frames = proto.FrameReader(max_frame_len=MAX_RECV_FRAME_LEN)
            pending: list[proto.Frame] = []
            first = await _next_frame(reader, frames, pending)
            if not isinstance(first, proto.ServerKey):
                raise ParseError(f"expected a ServerKey frame first, got {type(first).__name__}")
            server_key = first.key

            info: dict[str, object] = {"version": proto.PROTOCOL_VERSION, "CanAckPings": True}
            if mesh_key is not None:
                info["meshKey"] = mesh_key.hex()
            writer.write(proto.encode(proto.seal_client_info(private_key, server_key, info)))
            await writer.drain()

            second = await _next_frame(reader, frames, pending)
            if isinstance(second, proto.Health) and second.problem:
                raise DerpClientError(f"DERP server {target.host_header} {second.problem}")
            if not isinstance(second, proto.ServerInfo):
                raise ParseError(f"expected a ServerInfo frame, got {type(second).__name__}")
            server_info = _server_info(proto.open_server_info(private_key, server_key, second))
        except BaseException:
            writer.close()
            raise
        return cls(
            reader, writer, frames, pending, private_key, server_key, server_info, queue_size=queue_size
        )

    # ---- sending ----

    async def _write(self, frame: bytes) -> None:
        if self._closed:
            raise DerpClosedError(f"DERP connection is closed{self._reason()}")
        self._writer.write(frame)
        async with self._drain_lock:
            try:
                await self._writer.drain()
            except OSError as exc:
                self._fail(exc)
                raise DerpClosedError(f"DERP connection broke while sending: {exc}") from None

    async def send(self, dst: NodePublic, payload: bytes) -> None:
        """Relay ``payload`` (at most 64 KiB) to the node whose key is ``dst`` (frameSendPacket).

        Raises ValueError for an oversized payload, DerpClosedError when the connection is gone."""
        await self._write(proto.encode_send_packet(dst, payload))

    def write_nowait(self, frame: bytes, limit: int = 1 << 20) -> bool:
        """Write encoded frame bytes without waiting (a relay's forwarding path): False, writing nothing,
        when the connection is closed or more than ``limit`` bytes already wait unsent."""
        if self._closed or self._writer.transport.is_closing():
            return False
        if self._writer.transport.get_write_buffer_size() > limit:
            return False
        self._writer.write(frame)
        return True

    async def watch_conns(self) -> None:
        """Ask for PeerPresent/PeerGone about every client of the server (frameWatchConns; the server closes
        the connection unless this client logged in with its mesh key)."""
        await self._write(proto.encode(proto.WatchConns()))

    async def close_peer(self, key: NodePublic) -> None:
        """Ask the server to close ``key``'s connections (frameClosePeer; mesh key needed, as for
        :meth:`watch_conns`)."""
        await self._write(proto.encode(proto.ClosePeer(key)))

    async def note_preferred(self, preferred: bool = True) -> None:
        """Tell the server whether it is this node's home DERP (frameNotePreferred; stats only)."""
        await self._write(proto.encode(proto.NotePreferred(preferred)))

    async def ping(self, timeout: float = 5.0) -> float:
        """Send framePing with 8 random bytes and wait for the matching framePong; the round trip in seconds.

        Raises asyncio.TimeoutError after ``timeout`` seconds, DerpClosedError if the connection goes."""
        data = os.urandom(proto.PING_LEN)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        start = time.monotonic()
        try:
            await self._write(proto.encode(proto.Ping(data)))
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return time.monotonic() - start

    # ---- receiving ----

    async def recv(self) -> Message:
        """The next message: RecvPacket, PeerGone, PeerPresent, Pong (unmatched), Health or Restarting.

        Raises DerpClosedError once the connection is closed and every queued message was read."""
        if self._closed and self._queue.empty():
            raise DerpClosedError(f"DERP connection is closed{self._reason()}")
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # keep the end marker for any other reader
            raise DerpClosedError(f"DERP connection is closed{self._reason()}")
        return item

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except DerpClosedError:
                return

    async def _handle(self, frame: proto.Frame) -> None:
        if isinstance(frame, proto.Ping):
            self._writer.write(proto.encode(proto.Pong(frame.data)))
            return
        if isinstance(frame, proto.Pong):
            fut = self._pings.pop(frame.data, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(None)
                return
        if isinstance(frame, _SURFACED):
            await self._queue.put(frame)
        # KeepAlive, repeated ServerInfo, Unknown and frames meant for servers: ignored (derp_client.go Recv)

    async def _read_loop(self, pending: list[proto.Frame]) -> None:
        try:
            for frame in pending:
                await self._handle(frame)
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    self._fail(None if self._closed else DerpClosedError("the server closed the connection"))
                    return
                self.last_recv = time.monotonic()
                for frame in self._frames.feed(data):
                    await self._handle(frame)
        except (OSError, ParseError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        if self._error is None and exc is not None:
            self._error = exc
        self._shutdown()

    def _reason(self) -> str:
        return f": {self._error}" if self._error is not None else ""

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(DerpClosedError(f"DERP connection is closed{self._reason()}"))
        self._pings.clear()
        if self._queue.full():  # make room for the end marker: a reader must learn of the close
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait(None)
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the connection and stop the reader; queued messages stay readable. Idempotent."""
        self._shutdown()
        self._read_task.cancel()
        # asyncio.wait, not `await task` under suppress(CancelledError): that would also swallow a
        # cancellation of the task calling close(), which then never ends.
        await asyncio.wait({self._read_task})
        if not self._read_task.cancelled():
            self._read_task.exception()  # retrieved: an OSError of a dead connection is not news here
        # A peer that stopped reading (a dead path, a stalled proxy) would keep unsent frames in the
        # transport's buffer and wait_closed() waiting forever: give the close a moment, then abort.
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, ssl.SSLError):
            pass
        except asyncio.TimeoutError:
            self._writer.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection ends (server close, error or :meth:`close`)."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._read_task)

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _read_upgrade_response(reader: asyncio.StreamReader) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise DerpClientError("DERP server sent an oversized HTTP response header") from None
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise DerpClientError(f"DERP server answered with a non-HTTP response: {status_line[:80]!r}")
    if parts[1] != "101":
        raise DerpClientError(f"DERP server refused the upgrade: {status_line[:120]}")


async def _next_frame(reader: Reader, frames: proto.FrameReader, pending: list[proto.Frame]) -> proto.Frame:
    """The next login frame; frames that came in the same read wait in ``pending``."""
    while not pending:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise DerpClientError("the DERP server closed the connection during login")
        pending.extend(frames.feed(data))
    return pending.pop(0)


def _server_info(raw: dict[str, Any]) -> ServerInfoMessage:
    def num(name: str) -> int:
        value = raw.get(name, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return ServerInfoMessage(num("version"), num("TokenBucketBytesPerSecond"), num("TokenBucketBytesBurst"))


# ---- reconnecting wrapper ----


STABLE_AFTER = 10.0
"""Seconds a connection must stay up before the reconnect backoff starts again from ``base``: a server that
closes right after login is retried with growing delays (up to the cap), not every half second."""
IDLE_PING = 15.0
"""Seconds without any bytes from the server after which the client sends a DERP Ping (liveness check)."""
PING_TIMEOUT = 5.0
"""Seconds to wait for the Pong of a liveness ping before the connection is taken as dead and replaced."""


class ReconnectingDerpClient:
    """Keeps one DERP connection up: reconnects after failures with :func:`tailpy.backoff.reconnect_delays`.

    ``fallback_urls`` are other nodes of the same region: each attempt dials ``url`` first and, when that
    fails, each fallback in turn (as derphttp's ``dialRegion`` walks a region's nodes), so a client whose
    relay died lands on another server of the region's mesh.

    Messages from every connection come out of :meth:`recv`; :meth:`send` waits (up to ``timeout``) for a
    connection. ``on_connect`` is called with each new :class:`DerpClient` (to send NotePreferred, say),
    ``on_disconnect`` with the reason (``last_error``) when a logged-in connection ends.

    Backoff: the delays grow (``base`` doubling to ``cap``, jittered) across failed attempts *and* across
    connections that end within ``stable_after`` seconds; only a connection that stayed up that long resets
    them. Liveness: when nothing arrived for ``idle_ping`` seconds the client sends a Ping; no Pong within
    ``ping_timeout`` seconds closes the connection (``last_error`` says so) and the usual reconnect follows,
    so a relay that went silent is noticed within about ``idle_ping + ping_timeout`` seconds."""

    def __init__(
        self,
        url: str,
        private_key: NodePrivate,
        *,
        cap: float = 30.0,
        base: float = 0.5,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        on_connect: Callable[[DerpClient], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        stable_after: float = STABLE_AFTER,
        idle_ping: float = IDLE_PING,
        ping_timeout: float = PING_TIMEOUT,
        fallback_urls: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.fallback_urls = list(fallback_urls)
        self.connected_url: str | None = None
        """The URL of the current (or last) connection."""
        self.private_key = private_key
        self.cap = cap
        self.base = base
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.stable_after = stable_after
        self.idle_ping = idle_ping
        self.ping_timeout = ping_timeout
        self.delays: list[float] = []
        """The reconnect delays slept so far (seconds), newest last; at most the last 64."""
        self._rng = rng or random.Random()
        self._client: DerpClient | None = None
        self._connected = asyncio.Event()
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=1024)
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def client(self) -> DerpClient | None:
        return self._client if self._connected.is_set() else None

    async def wait_connected(self, timeout: float) -> DerpClient:
        """The current connection, waiting up to ``timeout`` seconds for one; DerpClientError if none."""
        if not await wait_event(self._connected, timeout) or self._client is None:
            why = f" ({self.last_error})" if self.last_error else ""
            raise DerpClientError(f"no connection to DERP server {self.url} within {timeout:g} s{why}")
        return self._client

    async def _run(self) -> None:
        delays = reconnect_delays(self.base, self.cap, self._rng.random)
        while True:
            delay: float | None = None
            client: DerpClient | None = None
            for url in [self.url, *self.fallback_urls]:
                try:
                    client = await DerpClient.connect(
                        url, self.private_key, timeout=self.connect_timeout, ssl_context=self.ssl_context
                    )
                except DerpClientError as exc:
                    self.last_error = str(exc)
                    log.info("DERP %s: %s", url, exc)
                else:
                    self.connected_url = url
                    break
            if client is not None:
                up_at = time.monotonic()
                self.connects += 1
                self.last_error = None
                self._client = client
                self._connected.set()
                if self.on_connect is not None:
                    self.on_connect(client)
                watch = asyncio.get_running_loop().create_task(self._watch(client))
                try:
                    async for msg in client:
                        if isinstance(msg, proto.Restarting):
                            delay = msg.reconnect_in_ms / 1000.0
                        await self._queue.put(msg)
                finally:
                    self._connected.clear()
                    watch.cancel()
                    await asyncio.wait({watch})  # a cancellation of this task itself still propagates
                    await client.close()
                if self.last_error is None:
                    self.last_error = f"connection to {url} ended{client._reason()}"
                if self.on_disconnect is not None:
                    self.on_disconnect(self.last_error)
                if time.monotonic() - up_at >= self.stable_after:
                    delays = reconnect_delays(self.base, self.cap, self._rng.random)
            wait = next(delays) if delay is None else delay
            self.delays = [*self.delays[-63:], wait]
            await asyncio.sleep(wait)

    async def _watch(self, client: DerpClient) -> None:
        """Liveness: Ping after ``idle_ping`` quiet seconds; no Pong within ``ping_timeout`` -> close."""
        while not client.closed:
            idle = time.monotonic() - client.last_recv
            if idle < self.idle_ping:
                await asyncio.sleep(self.idle_ping - idle)
                continue
            try:
                await asyncio.wait_for(client.ping(timeout=self.ping_timeout), self.ping_timeout)
            except asyncio.TimeoutError:
                self.last_error = (
                    f"DERP server {self.url} sent nothing for {self.idle_ping:g} s and did not answer "
                    f"a ping within {self.ping_timeout:g} s; reconnecting"
                )
                log.warning("%s", self.last_error)
                await client.close()
                return
            except DerpClientError:
                return

    @property
    def last_recv(self) -> float | None:
        """Monotonic seconds of the last bytes from the server on the current connection; None when down."""
        client = self.client
        return None if client is None else client.last_recv

    async def send(self, dst: NodePublic, payload: bytes, *, timeout: float = 5.0) -> None:
        """Send through the current connection, waiting up to ``timeout`` seconds for one."""
        client = await self.wait_connected(timeout)
        await client.send(dst, payload)

    async def recv(self) -> Message:
        return await self._queue.get()

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            # Cancelled until it ends: code below it that swallowed one cancellation (Python 3.11's
            # wait_for can, when its inner future finishes at the same moment) must not keep it alive.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        if self._client is not None:
            await self._client.close()
        self._connected.clear()


__all__ = [
    "DerpClient",
    "DerpClientError",
    "DerpClosedError",
    "Message",
    "ReconnectingDerpClient",
    "ServerInfoMessage",
]
