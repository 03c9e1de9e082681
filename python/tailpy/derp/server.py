"""The DERP server's HTTP front (as Tailscale's ``derp/derpserver/handler.go`` and ``cmd/derper``): it
listens, reads each connection's request head, answers the one-shot paths and hands ``/derp`` upgrades,
plain or WebSocket, to the relay core :class:`tailpy.derp.relay.Relay`.

HTTP front
----------
The server reads each connection's HTTP/1.1 request head itself (``asyncio.start_server``, at most
:data:`MAX_HEADER_BYTES` within ``header_timeout`` seconds) rather than mounting an aiohttp app, because:

* ``GET /derp`` must hand the raw TCP (or TLS) stream to DERP right after the 101 response, and with
  ``Derp-Fast-Start: 1`` the client's first DERP frame may sit in the same read as its request head. aiohttp
  exposes no public way to take over a connection after a 101 (its WebSocket upgrade uses private protocol
  hooks that change between releases).
* The request-head read is bounded in size *and time*; aiohttp bounds size but not the time a client may
  take to send its head (slowloris). Here both are one ``wait_for(readuntil(...))``.
* The other paths are fixed one-shot answers (``/derp/probe``, ``/derp/latency-check``, ``/generate_204``,
  ``/debug/metrics``, ``/metrics``, ``/``), each sent with ``Connection: close``; no request body is ever
  read.

Paths (as Tailscale's ``derpserver/handler.go`` and ``cmd/derper``):

* ``GET /derp`` with ``Upgrade: DERP`` → ``101 Switching Protocols`` (headers ``Derp-Version: 2``,
  ``Derp-Public-Key: <hex>``; none with ``Derp-Fast-Start: 1``), then DERP frames. Without Upgrade: 426.
* ``GET /derp`` with ``Upgrade: websocket`` and subprotocol ``derp`` → a WebSocket (RFC 6455) whose binary
  messages carry the same DERP frame stream (:mod:`tailpy.derp.ws`; derper's ``AddWebSocketSupport``).
* ``GET|HEAD /derp/probe`` and ``/derp/latency-check`` → 200, ``Access-Control-Allow-Origin: *``.
* ``GET /generate_204`` → 204; an ``X-Tailscale-Challenge`` of at most 64 characters from
  ``[A-Za-z0-9._:-]`` is answered with ``X-Tailscale-Response: response <challenge>``.
* ``GET /debug/metrics`` → counters in Prometheus text format under derper's names
  (:mod:`tailpy.derp.metrics`; from loopback only unless ``public_metrics``).
* ``GET /metrics`` → :attr:`DerpServer.registry`'s metrics (``tailpy_derp_*``, ``tailpy_stun_*``) by
  ``prometheus_client``, under the same loopback rule. A request carrying a reverse proxy's header
  (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) came through one, so its peer says nothing about the
  client: refused like a remote one.
* ``GET /health`` → ``{"status": "ok" | "error", "checks": {name: {"status": ..., ...}}}`` with 200, or 503
  when a check failed (:meth:`DerpServer.health`; for load balancers and service managers).

What happens on a DERP connection (login, forwarding, PeerGone, duplicate keys, keepalives) is the relay
core's: see :mod:`tailpy.derp.relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import nacl.public
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from tailpy.asyncutil import LISTEN_BACKLOG
from tailpy.derp import ws
from tailpy.derp.metrics import DROP_REASONS, REFUSAL_REASONS, Metrics, RelayCollector
from tailpy.derp.relay import DUPLICATE_KEY_PROBLEM, READ_CHUNK, REFUSED_PREFIX, Conn, Relay
from tailpy.derp.verify import Verifier
from tailpy.errors import ConfigError, ParseError
from tailpy.httpguard import came_through_proxy
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.metrics import exposition
from tailpy.proto import derp as proto

KEY_NAME = "derp.key"
"""The server key's file name in the state directory."""

MAX_HEADER_BYTES = 8192
"""Largest HTTP request head read, bytes (request line + headers + blank line)."""

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


LOOPBACK_ONLY = (
    "metrics are served on this listener to loopback clients only: start the relay with --metrics-listen "
    "HOST:PORT to serve them to a Prometheus elsewhere\n"
)
"""The 403 body for ``/metrics`` and ``/debug/metrics`` asked by a peer that is not on loopback."""


class DerpServer:
    """A DERP relay behind its HTTP front. ``await start(host, port)``, then ``await stop()``.

    ``private_key``: the server's key (ServerKey carries its public half). Durations are seconds.
    ``header_timeout``, ``max_header_bytes`` and ``public_metrics`` are the front's; the rest configure
    :attr:`relay` (see :class:`~tailpy.derp.relay.Relay`).
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
        mesh_key: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.relay = Relay(
            private_key,
            queue_depth=queue_depth,
            keepalive_interval=keepalive_interval,
            keepalive_jitter=keepalive_jitter,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            ping_timeout=ping_timeout,
            write_timeout=write_timeout,
            verify_client=verify_client,
            verify_timeout=verify_timeout,
            mesh_key=mesh_key,
            clock=clock,
        )
        """The relay core every ``/derp`` upgrade is handed to."""
        self.private_key = private_key
        self.public_key = private_key.public
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.max_header_bytes = max_header_bytes
        self.public_metrics = public_metrics
        self.extra_metrics: list[Callable[[], str]] = []
        """More Prometheus text served at /debug/metrics after the relay's (the STUN server's, say)."""
        self.registry = CollectorRegistry(auto_describe=False)
        """What ``GET /metrics`` serves: the relay's (:class:`~tailpy.derp.metrics.RelayCollector`), and
        collectors registered beside it (the STUN server's, say)."""
        self.registry.register(RelayCollector(self.relay))
        self.extra_health: dict[str, Callable[[], dict[str, Any]]] = {}
        """More checks for /health: name -> a function answering ``{"status": "ok" | "error", ...}``."""
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def metrics(self) -> Metrics:
        """The relay's counters and gauges."""
        return self.relay.metrics

    @property
    def verify_client(self) -> Verifier | None:
        """The relay's admission check (None: every client that logs in is admitted); see
        :mod:`tailpy.derp.verify`. May be set after construction, before clients connect."""
        return self.relay.verify_client

    @verify_client.setter
    def verify_client(self, verifier: Verifier | None) -> None:
        self.relay.verify_client = verifier

    @property
    def verify_timeout(self) -> float:
        """Seconds the relay waits for :attr:`verify_client`'s answer before refusing (fail closed)."""
        return self.relay.verify_timeout

    @verify_timeout.setter
    def verify_timeout(self, seconds: float) -> None:
        self.relay.verify_timeout = seconds

    def connections(self, key: NodePublic) -> list[Conn]:
        """The live connections of ``key`` (oldest first)."""
        return self.relay.connections(key)

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, host: str | None, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port`` (``None``: every address; port 0 picks one). Raises OSError."""
        srv = await asyncio.start_server(
            self._on_connect,
            host,
            port,
            limit=max(self.max_header_bytes, READ_CHUNK),
            ssl=ssl_context,
            ssl_handshake_timeout=self.header_timeout if ssl_context else None,
            backlog=LISTEN_BACKLOG,
        )
        self._servers.append(srv)

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers: ``{"status": "ok" | "degraded" | "error", "checks": {...}}``; a
        check is ``{"status": "ok" | "warning" | "error", ...}``: ``listening`` (the listening addresses),
        ``relay`` (connected clients), and :attr:`extra_health`'s (``mesh``: the mesh peers not watched).
        "degraded" (a check warns) is served with HTTP 200, "error" with 503."""
        m = self.metrics
        listening = [f"{h}:{p}" for h, p in self.addresses]
        checks: dict[str, dict[str, Any]] = {
            "listening": {"status": "ok" if listening else "error", "addresses": listening},
            "relay": {"status": "ok", "clients": m.clients, "home_clients": m.home_clients},
        }
        for name, check in self.extra_health.items():
            try:
                checks[name] = check()
            except Exception as e:  # a broken check is a failed check, not a broken endpoint
                checks[name] = {"status": "error", "error": repr(e)}
        states = {c.get("status") for c in checks.values()}
        status = "error" if "error" in states else "degraded" if "warning" in states else "ok"
        return {"status": status, "checks": checks}

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        for srv in self._servers:
            srv.close()
        self.relay.close_all()
        for w in list(self._writers):
            w.transport.abort()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=5)
            for t in late:
                t.cancel()
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

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
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.write_timeout)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                writer.transport.abort()
            except asyncio.CancelledError:
                # stop() gave up waiting: a transport left closing (its peer not reading) would keep the
                # listener's wait_closed() waiting for it forever.
                writer.transport.abort()
                raise
            finally:
                self._writers.discard(writer)

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
                await self.relay.serve(ws_reader, ws_writer)
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
            await self.relay.serve(reader, writer)
        elif path == "/generate_204":
            extra = {"Cache-Control": "no-cache, no-store, must-revalidate, no-transform, max-age=0"}
            challenge = headers.get("x-tailscale-challenge", "")
            if challenge and len(challenge) <= 64 and set(challenge) <= _CHALLENGE_CHARS:
                extra["X-Tailscale-Response"] = "response " + challenge
            await self._respond(writer, 204, "No Content", extra)
        elif path in ("/debug/metrics", "/metrics"):
            peer = writer.get_extra_info("peername")
            if not self.public_metrics and (not _is_loopback(peer) or came_through_proxy(headers)):
                await self._respond(writer, 403, "Forbidden", body=LOOPBACK_ONLY.encode())
                return
            if path == "/metrics":
                body, kind = exposition(self.registry), CONTENT_TYPE_LATEST
            else:
                body = "".join([self.metrics.prometheus(), *(f() for f in self.extra_metrics)]).encode()
                kind = "text/plain; version=0.0.4"
            await self._respond(writer, 200, "OK", {"Content-Type": kind}, body)
        elif path == "/health":
            doc = self.health()
            code, reason = (503, "Service Unavailable") if doc["status"] == "error" else (200, "OK")
            body = json.dumps(doc).encode() + b"\n"
            await self._respond(writer, code, reason, {"Content-Type": "application/json"}, body)
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


__all__ = [
    "DROP_REASONS",
    "DUPLICATE_KEY_PROBLEM",
    "KEY_NAME",
    "MAX_HEADER_BYTES",
    "REFUSAL_REASONS",
    "REFUSED_PREFIX",
    "Conn",
    "DerpServer",
    "Metrics",
    "Relay",
    "load_or_create_key",
]
