"""Sockets to the underlay that never go through the tunnel: each carries the bypass fwmark (``SO_MARK``,
socket(7)), which tailpy's policy routing (:mod:`tailpy.daemon.router`) sends to the host's main routing
table even while an exit node's default route is in table 52. As tailscaled's ``net/netns`` (Linux
``control`` func setting ``SO_MARK`` to ``linuxfw.TailscaleBypassMark``).

The mark is process-wide: tailpyd running with a TUN calls :func:`set_mark` once at start, and every
socket it opens to control, DERP or a DNS upstream is made here. Without a mark (the default: tests,
userspace and embedded nodes) everything behaves as plain :mod:`socket` / :mod:`asyncio` and needs no
privilege; with one, setting it needs CAP_NET_ADMIN (a refusal is logged once, and the socket is used
unmarked).
"""

from __future__ import annotations

import asyncio
import logging
import socket as _socket
from typing import Any

import aiohttp

log = logging.getLogger("tailpy.bypass")

SO_MARK = getattr(_socket, "SO_MARK", 36)
"""``SO_MARK`` (Linux ``asm-generic/socket.h``)."""

_mark: int | None = None
_warned = False


def set_mark(mark: int | None) -> None:
    """Mark every socket made here from now on with ``mark`` (0 < mark < 2**32; None: no mark, plain
    sockets). Raises ValueError for a mark out of range."""
    global _mark, _warned
    if mark is not None and not 0 < mark < 2**32:
        raise ValueError(f"fwmark must be between 1 and 0xffffffff, got {mark}")
    _mark, _warned = mark, False


def mark() -> int | None:
    """The mark in force (None: none)."""
    return _mark


def apply(sock: _socket.socket) -> None:
    """Give ``sock`` the mark in force, if any (before it connects or sends)."""
    global _warned
    if _mark is None or sock.family not in (_socket.AF_INET, _socket.AF_INET6):
        return
    try:
        sock.setsockopt(_socket.SOL_SOCKET, SO_MARK, _mark)
    except OSError as e:
        if not _warned:
            _warned = True
            log.warning(
                "cannot mark underlay sockets with fwmark %#x (%s): with an exit node in use they may loop "
                "into the tunnel; tailpyd needs CAP_NET_ADMIN",
                _mark,
                e.strerror or e,
            )


def socket(family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM, proto: int = 0) -> _socket.socket:
    """A new socket (as :class:`socket.socket`) carrying the mark in force."""
    sock = _socket.socket(family, type, proto)
    try:
        apply(sock)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(host: str, port: int, local_addr: tuple[str, int] | None) -> _socket.socket:
    """A connected, nonblocking, marked TCP socket to ``host``:``port``: each address getaddrinfo gives, in
    order, until one answers (the last error raised when none does)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=_socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no addresses")
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise last


async def open_connection(
    host: str, port: int, **kw: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`asyncio.open_connection` over a socket carrying the mark in force (keywords as there:
    ``ssl``, ``server_hostname``, ``limit``, ``local_addr``, ``ssl_handshake_timeout``...). Without a
    mark it is :func:`asyncio.open_connection` itself. Raises OSError as it does."""
    if _mark is None:
        return await asyncio.open_connection(host, port, **kw)
    sock = await _connect(host, port, kw.pop("local_addr", None))
    if kw.get("ssl") is not None and kw.get("server_hostname") is None:
        kw["server_hostname"] = host
    try:
        return await asyncio.open_connection(sock=sock, **kw)
    except BaseException:
        sock.close()
        raise


def tcp_connector(**kw: Any) -> aiohttp.TCPConnector:
    """An :class:`aiohttp.TCPConnector` (keywords as its own) whose sockets carry the mark in force (its
    ``socket_factory``; without a mark, aiohttp's default sockets)."""
    if _mark is None:
        return aiohttp.TCPConnector(**kw)

    def factory(addr_info: Any) -> _socket.socket:
        family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
        return socket(family, kind, proto)

    return aiohttp.TCPConnector(socket_factory=factory, **kw)


IDLE_CONNECTION_S = 5.0
"""Seconds a :func:`client_session` keeps an idle connection for reuse: below the 10 s after which control
closes a connection that sent no request head, so a request is never sent on a connection the server is
closing at that moment."""


def client_session(**kw: Any) -> aiohttp.ClientSession:
    """An :class:`aiohttp.ClientSession` (keywords as its own) over :func:`tcp_connector`, idle connections
    kept :data:`IDLE_CONNECTION_S`."""
    return aiohttp.ClientSession(connector=tcp_connector(keepalive_timeout=IDLE_CONNECTION_S), **kw)


__all__ = [
    "SO_MARK",
    "apply",
    "client_session",
    "mark",
    "open_connection",
    "set_mark",
    "socket",
    "tcp_connector",
]
