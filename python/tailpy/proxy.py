"""Proxies into the tailnet for unmodified programs: SOCKS5 and HTTP (``tailpyd --tun userspace-networking``
with ``--socks5-server`` and ``--outbound-http-proxy-listen``, as tailscaled's).

* **SOCKS5** (RFC 1928): no authentication (method 0x00, section 3), CONNECT only (section 4); the
  destination may be an IPv4 or IPv6 address or a domain name, resolved by the node (MagicDNS names from the
  netmap), so ``curl --socks5-hostname`` works with tailnet names. Replies (section 6): 0x00 success, 0x04
  host unreachable (unknown name, timeout), 0x05 connection refused, 0x07 command not supported, 0x08
  address type not supported. The codec (:func:`greeting_size`, :func:`parse_greeting`,
  :func:`request_size`, :func:`parse_request`, :func:`encode_reply`) is sans-IO and raises only ParseError.
* **HTTP** (RFC 9110 section 9.3.6 CONNECT; RFC 9112 section 3.2.2 absolute-form): ``CONNECT host:port``
  answers 200 and then relays bytes both ways; a plain request with an absolute URI (``GET http://beta/``) is
  sent to the origin in origin-form with ``Connection: close`` and its response relayed back. Parsing and
  framing both ways are h11's. Failures are answered 400 (malformed), 502 (cannot connect) or 501 (a scheme
  other than http without CONNECT).

Each accepted connection is handled in its own task; ``dial(host, port)`` (the node's
:meth:`tailpy.netstack.Netstack.open_connection`) makes the connection into the tailnet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import h11

from tailpy.asyncutil import close_writer
from tailpy.errors import DialError, ParseError, TailpyError

log = logging.getLogger("tailpy.proxy")

Dial = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

SOCKS_VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
REP_SUCCEEDED = 0x00
REP_FAILURE = 0x01
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_NOT_SUPPORTED = 0x08
HEAD_LIMIT = 64 * 1024
"""Bytes an HTTP proxy request head may take."""
HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client has to send its SOCKS5 request or HTTP request head."""
CHUNK = 65536

# -- SOCKS5 codec (RFC 1928) ---------------------------------------------------------------------------------


def greeting_size(buf: bytes) -> int:
    """Bytes the method-selection message starting ``buf`` takes (VER, NMETHODS, METHODS; section 3);
    more than ``len(buf)`` means read more. Raises ParseError for a version other than 5."""
    if buf and buf[0] != SOCKS_VERSION:
        raise ParseError(f"not a SOCKS5 greeting (version {buf[0]})")
    return 2 if len(buf) < 2 else 2 + buf[1]


def parse_greeting(buf: bytes) -> set[int]:
    """The methods a complete greeting offers. Raises ParseError."""
    if len(buf) < 2 or greeting_size(buf) != len(buf):
        raise ParseError("a SOCKS5 greeting of the wrong length")
    return set(buf[2:])


@dataclass(frozen=True)
class SocksRequest:
    """A SOCKS5 request (section 4): ``command`` (1 CONNECT, 2 BIND, 3 UDP ASSOCIATE), ``host`` (an address
    or a domain name), ``port``, ``atyp`` (1 IPv4, 3 domain, 4 IPv6)."""

    command: int
    host: str
    port: int
    atyp: int


def request_size(buf: bytes) -> int:
    """Bytes the request starting ``buf`` takes (VER CMD RSV ATYP DST.ADDR DST.PORT); more than
    ``len(buf)`` means read more. Raises ParseError for a bad version or address type."""
    if buf and buf[0] != SOCKS_VERSION:
        raise ParseError(f"not a SOCKS5 request (version {buf[0]})")
    if len(buf) < 4:
        return 4
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        return 4 + 4 + 2
    if atyp == ATYP_IPV6:
        return 4 + 16 + 2
    if atyp == ATYP_DOMAIN:
        return 5 if len(buf) < 5 else 5 + buf[4] + 2
    raise ParseError(f"SOCKS5 address type {atyp} is not 1, 3 or 4")


def parse_request(buf: bytes) -> SocksRequest:
    """A complete request (:func:`request_size` bytes). Raises ParseError."""
    if len(buf) < 4 or request_size(buf) != len(buf):
        raise ParseError("a SOCKS5 request of the wrong length")
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(buf[4:8]))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(buf[4:20]))
    else:
        try:
            host = buf[5 : 5 + buf[4]].decode("ascii")
        except UnicodeDecodeError:
            raise ParseError("a SOCKS5 domain name that is not ASCII") from None
        if not host:
            raise ParseError("an empty SOCKS5 domain name")
    (port,) = struct.unpack("!H", buf[-2:])
    return SocksRequest(buf[1], host, port, atyp)


def encode_request(command: int, host: str, port: int) -> bytes:
    """A request for ``host`` (an IP address, else a domain name) and ``port`` (the client's side; for
    tests). Raises ParseError for a name over 255 bytes."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        if not 0 < len(name) < 256:
            raise ParseError("a SOCKS5 domain name must be 1-255 bytes") from None
        addr = bytes([ATYP_DOMAIN, len(name)]) + name
    else:
        addr = bytes([ATYP_IPV4 if ip.version == 4 else ATYP_IPV6]) + ip.packed
    return bytes([SOCKS_VERSION, command, 0]) + addr + struct.pack("!H", port)


def encode_reply(rep: int, bound: tuple[str, int] | None = None) -> bytes:
    """A reply (section 6) with code ``rep`` and the bound address (0.0.0.0:0 when None)."""
    ip = ipaddress.ip_address(bound[0]) if bound else ipaddress.IPv4Address(0)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([SOCKS_VERSION, rep, 0, atyp]) + ip.packed + struct.pack("!H", bound[1] if bound else 0)


def reply_code(e: DialError) -> int:
    """The SOCKS5 reply code for a failed dial."""
    return REP_REFUSED if e.reason == "refused" else REP_HOST_UNREACHABLE


# -- relaying ------------------------------------------------------------------------------------------------


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from ``reader`` to ``writer`` until EOF, then half-close ``writer`` (FIN) where it can."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Relay both ways between two connections until both directions ended; then close both."""
    try:
        await asyncio.gather(_copy(a[0], b[1]), _copy(b[0], a[1]))
    finally:
        await asyncio.gather(close_writer(a[1]), close_writer(b[1]), return_exceptions=True)


# -- servers -------------------------------------------------------------------------------------------------


class ProxyServer:
    """A listening proxy on this host (SOCKS5 or HTTP), made by :func:`start_socks5` /
    :func:`start_http_proxy`: ``address`` is (host, port) it listens on; :meth:`close` stops it and its
    connections."""

    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task[None]]) -> None:
        self.server = server
        self._tasks = tasks

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


def parse_listen(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:1080"``, ``"[::1]:1080"``, ``"localhost:1080"`` or ``":1080"`` (all addresses) ->
    (host, port). Raises ParseError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ParseError(f"listen address {addr!r} is not host:port")
    return host.strip("[]") or "", int(port)


async def _serve(
    addr: str, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], what: str
) -> ProxyServer:
    host, port = parse_listen(addr)
    tasks: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except (ParseError, h11.ProtocolError, asyncio.IncompleteReadError, TimeoutError) as e:
            log.debug("%s client: %s", what, e)
        except (ConnectionError, OSError) as e:
            log.debug("%s client: %s", what, e)
        finally:
            tasks.discard(task)
            await close_writer(writer)

    server = await asyncio.start_server(on_client, host or None, port)
    log.info("%s proxy listening on %s", what, addr)
    return ProxyServer(server, tasks)


async def start_socks5(addr: str, dial: Dial) -> ProxyServer:
    """A SOCKS5 server (RFC 1928, no auth, CONNECT) on ``addr`` ("host:port") dialling with ``dial``.
    Raises ParseError for a malformed address, OSError when it cannot listen."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read(size: Callable[[bytes], int]) -> bytes:
            buf = b""
            while (n := size(buf)) > len(buf):
                buf += await reader.readexactly(n - len(buf))
            return buf

        methods = parse_greeting(await asyncio.wait_for(read(greeting_size), HANDSHAKE_TIMEOUT))
        if NO_AUTH not in methods:
            writer.write(bytes([SOCKS_VERSION, NO_ACCEPTABLE]))
            return
        writer.write(bytes([SOCKS_VERSION, NO_AUTH]))
        try:
            req = parse_request(await asyncio.wait_for(read(request_size), HANDSHAKE_TIMEOUT))
        except ParseError:
            writer.write(encode_reply(REP_ADDRESS_NOT_SUPPORTED))
            raise
        if req.command != CMD_CONNECT:
            writer.write(encode_reply(REP_COMMAND_NOT_SUPPORTED))
            return
        try:
            upstream = await dial(req.host, req.port)
        except DialError as e:
            log.info("socks5: %s", e)
            writer.write(encode_reply(reply_code(e)))
            return
        except TailpyError as e:
            log.info("socks5: %s", e)
            writer.write(encode_reply(REP_FAILURE))
            return
        bound = upstream[1].get_extra_info("sockname")
        ok = isinstance(bound, tuple) and len(bound) >= 2 and _is_ip(str(bound[0]))
        writer.write(encode_reply(REP_SUCCEEDED, (str(bound[0]), int(bound[1])) if ok else None))
        await relay((reader, writer), upstream)

    return await _serve(addr, handle, "socks5")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"te",
    b"trailer",
    b"upgrade",
}


def split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``"beta:80"``, ``"[fd7a::2]:80"`` or ``"beta"`` (with ``default_port``) -> (host, port). Raises
    ParseError."""
    parts = urllib.parse.urlsplit("//" + authority)
    try:
        port = parts.port
    except ValueError:
        raise ParseError(f"bad port in {authority!r}") from None
    if not parts.hostname or (port is None and default_port is None):
        raise ParseError(f"{authority!r} is not host:port")
    return parts.hostname, port if port is not None else int(default_port or 0)


async def start_http_proxy(addr: str, dial: Dial) -> ProxyServer:
    """An HTTP proxy on ``addr`` ("host:port"): CONNECT tunnels and absolute-URI requests (http only),
    dialling with ``dial``. Raises ParseError for a malformed address, OSError when it cannot listen."""

    async def send(writer: asyncio.StreamWriter, conn: h11.Connection, *events: h11.Event) -> None:
        for ev in events:
            data = conn.send(ev)
            if data:
                writer.write(data)
        await writer.drain()

    async def error(writer: asyncio.StreamWriter, conn: h11.Connection, status: int, text: str) -> None:
        body = (text + "\n").encode()
        headers = [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError):
            await send(writer, conn, h11.Response(status_code=status, headers=headers), h11.Data(body))
            await send(writer, conn, h11.EndOfMessage())

    async def next_event(reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Event | type[h11.PAUSED]:
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", ev)
            conn.receive_data(await reader.read(CHUNK))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        try:
            req = await asyncio.wait_for(next_event(reader, conn), HANDSHAKE_TIMEOUT)
        except h11.RemoteProtocolError as e:
            await error(writer, conn, e.error_status_hint, f"malformed request: {e}")
            return
        if not isinstance(req, h11.Request):
            return
        target = req.target.decode("ascii", "replace")
        if req.method == b"CONNECT":
            try:
                host, port = split_authority(target, None)
            except ParseError as e:
                await error(writer, conn, 400, str(e))
                return
            try:
                upstream = await dial(host, port)
            except TailpyError as e:
                await error(writer, conn, 502, str(e))
                return
            await send(
                writer, conn, h11.Response(status_code=200, reason=b"Connection established", headers=[])
            )
            leftover, _ = conn.trailing_data
            if leftover:
                upstream[1].write(leftover)
            await relay((reader, writer), upstream)
            return
        url = urllib.parse.urlsplit(target)
        if url.scheme != "http" or not url.netloc:
            status = 501 if url.scheme else 400
            await error(
                writer, conn, status, f"this proxy takes CONNECT or an absolute http:// URI, not {target!r}"
            )
            return
        try:
            host, port = split_authority(url.netloc, 80)
        except ParseError as e:
            await error(writer, conn, 400, str(e))
            return
        try:
            up_reader, up_writer = await dial(host, port)
        except TailpyError as e:
            await error(writer, conn, 502, str(e))
            return
        try:
            await _forward(req, url, reader, writer, conn, up_reader, up_writer, send, next_event)
        finally:
            await close_writer(up_writer)

    return await _serve(addr, handle, "http")


async def _forward(
    req: h11.Request,
    url: urllib.parse.SplitResult,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    send: Callable[..., Awaitable[None]],
    next_event: Callable[..., Awaitable[object]],
) -> None:
    """One absolute-URI request to the origin in origin-form, and its response back (h11 frames both)."""
    origin = h11.Connection(h11.CLIENT)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = [(k, v) for k, v in req.headers if k.lower() not in _HOP_BY_HOP]
    if not any(k.lower() == b"host" for k, _ in headers):
        headers.insert(0, (b"Host", url.netloc.encode()))
    headers.append((b"Connection", b"close"))
    await send(up_writer, origin, h11.Request(method=req.method, target=path.encode(), headers=headers))

    async def body() -> None:
        while True:
            ev = await next_event(reader, conn)
            if isinstance(ev, h11.Data):
                await send(up_writer, origin, h11.Data(data=ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                await send(up_writer, origin, h11.EndOfMessage())
                return
            else:
                return

    sending = asyncio.create_task(body())
    try:
        while True:
            ev = await next_event(up_reader, origin)
            if isinstance(ev, h11.Response):
                hs = [(k, v) for k, v in ev.headers if k.lower() not in _HOP_BY_HOP]
                hs.append((b"Connection", b"close"))
                await send(
                    writer, conn, h11.Response(status_code=ev.status_code, reason=ev.reason, headers=hs)
                )
            elif isinstance(ev, h11.InformationalResponse):
                continue
            elif isinstance(ev, h11.Data):
                await send(writer, conn, h11.Data(data=ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                await send(writer, conn, h11.EndOfMessage())
                return
            else:
                return
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sending


__all__ = [
    "ProxyServer",
    "SocksRequest",
    "encode_reply",
    "encode_request",
    "greeting_size",
    "parse_greeting",
    "parse_listen",
    "parse_request",
    "relay",
    "request_size",
    "start_http_proxy",
    "start_socks5",
]
