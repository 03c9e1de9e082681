"""STUN Binding server (RFC 8489) for `tailpy derp serve` and the embedded relay of `tailpy control serve`.

:func:`answer` is the sans-IO part: one datagram and its source address in, the reply (or None) and a
disposition out. :class:`StunServer` is the asyncio transport around it: one UDP socket per listen address,
dual-stack ``[::]`` when no host is given (IPv4 clients arrive as ``::ffff:a.b.c.d`` and are answered with
an IPv4 XOR-MAPPED-ADDRESS).

What is answered (RFC 8489 §6.3):

* a Binding request → success with XOR-MAPPED-ADDRESS, SOFTWARE and FINGERPRINT, with or without a
  FINGERPRINT in the request (unlike Tailscale's server, which ignores requests without one:
  tailscale/tailscale#4177);
* a Binding request from a classic RFC 3489 client (no magic cookie) → success with MAPPED-ADDRESS and the
  client's 16-byte transaction id echoed, without SOFTWARE or FINGERPRINT (RFC 8489 §12; Debian's
  stun-client is one such client);
* a request with unknown comprehension-required attributes (0x0000-0x7FFF, RFC 8489 §14), or a
  CHANGE-REQUEST asking for another address or port (which this server does not have, RFC 5780 §6.1) → 420
  with UNKNOWN-ATTRIBUTES;
* a request of another method → 400.

Dropped and counted: anything that does not parse (``not_stun``), a wrong FINGERPRINT (``bad_fingerprint``),
responses and indications (``not_request``). Authentication is not used: MESSAGE-INTEGRITY in a request is
understood but not checked (Binding needs no credentials here), and replies carry none.

Metrics (Prometheus text, :meth:`StunMetrics.prometheus`): ``stun_requests_total{disposition}``,
``stun_requests_by_family_total{family}``, ``stun_write_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, cast

from tailpy.errors import ParseError
from tailpy.proto import stun

log = logging.getLogger("tailpy.stun")

STUN_PORT = 3478
"""The IANA STUN port (RFC 8489 §9), also Tailscale's derper default (``-stun-port``)."""

DEFAULT_SOFTWARE = "tailpy"

DISPOSITIONS = (
    "success",
    "unknown_attribute",
    "bad_method",
    "not_stun",
    "bad_fingerprint",
    "not_request",
)
"""Labels of ``stun_requests_total``."""


def answer(
    data: bytes, source: tuple[str, int], software: str | None = DEFAULT_SOFTWARE
) -> tuple[bytes | None, str]:
    """Answer one datagram ``data`` from ``source`` (ip text, port): (reply bytes or None to drop,
    disposition, one of :data:`DISPOSITIONS`). Never raises for any ``data``."""
    try:
        req = stun.parse(data, allow_rfc3489=True)
    except stun.FingerprintError:
        return None, "bad_fingerprint"
    except ParseError:
        return None, "not_stun"
    if req.cls != stun.MessageClass.REQUEST:
        return None, "not_request"
    # (no SOFTWARE to RFC 3489 clients: theirs parse it as SERVER, which had to be a multiple of 4 bytes)
    extra = [stun.software_attr(software)] if software and not req.is_rfc3489 else []
    fp = not req.is_rfc3489
    txid, cookie = req.txid, req.cookie
    if req.method != stun.BINDING:
        attrs = [stun.error_attr(400, "Bad Request: only Binding is served"), *extra]
        return stun.encode(req.method, stun.MessageClass.ERROR, txid, attrs, fingerprint=fp, cookie=cookie), (
            "bad_method"
        )
    unknown = [t for t in req.unknown_required() if t != stun.CHANGE_REQUEST]
    change = req.get(stun.CHANGE_REQUEST)
    if change is not None and (len(change) != 4 or struct.unpack(">I", change)[0] & 0x6):
        unknown.append(stun.CHANGE_REQUEST)
    if unknown:
        attrs = [stun.error_attr(420), stun.unknown_attributes_attr(unknown), *extra]
        return stun.encode(
            stun.BINDING, stun.MessageClass.ERROR, txid, attrs, fingerprint=fp, cookie=cookie
        ), "unknown_attribute"
    mapped = stun.address_attr(source, txid, xor=not req.is_rfc3489)
    reply = stun.encode(
        stun.BINDING, stun.MessageClass.SUCCESS, txid, [mapped, *extra], fingerprint=fp, cookie=cookie
    )
    return reply, "success"


@dataclass
class StunMetrics:
    """Counters of one :class:`StunServer`."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISPOSITIONS, 0))
    families: dict[str, int] = field(default_factory=lambda: {"ipv4": 0, "ipv6": 0})
    write_errors: int = 0

    def prometheus(self) -> str:
        """Prometheus text format 0.0.4."""
        out = [
            "# HELP stun_requests_total STUN datagrams received, by what was done with them.",
            "# TYPE stun_requests_total counter",
            *(f'stun_requests_total{{disposition="{k}"}} {v}' for k, v in sorted(self.requests.items())),
            "# HELP stun_requests_by_family_total STUN requests answered, by address family.",
            "# TYPE stun_requests_by_family_total counter",
            *(f'stun_requests_by_family_total{{family="{k}"}} {v}' for k, v in sorted(self.families.items())),
            "# HELP stun_write_errors_total STUN replies the socket refused.",
            "# TYPE stun_write_errors_total counter",
            f"stun_write_errors_total {self.write_errors}",
        ]
        return "\n".join(out) + "\n"


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._on_datagram(self, data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors from earlier sends: nothing to do
        log.debug("STUN socket error: %s", exc)


class StunServer:
    """A STUN Binding server: ``await start(host, port)``, then ``await stop()``.

    ``software``: the SOFTWARE attribute of replies (None: none)."""

    def __init__(self, *, software: str | None = DEFAULT_SOFTWARE) -> None:
        self.software = software
        self.metrics = StunMetrics()
        self._transports: list[asyncio.DatagramTransport] = []

    async def start(self, host: str | None, port: int = STUN_PORT) -> None:
        """Listen on UDP ``host:port``; ``host`` None (or "", "::") means every address, IPv4 and IPv6 on one
        dual-stack socket (IPv4 only where the kernel has no IPv6); port 0 picks one.
        Raises OSError (address in use, no such address)."""
        loop = asyncio.get_running_loop()
        sock = _bind(host, port)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transports.append(transport)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        return [t.get_extra_info("sockname")[:2] for t in self._transports]

    async def stop(self) -> None:
        for t in self._transports:
            t.close()
        self._transports.clear()
        await asyncio.sleep(0)

    def _on_datagram(self, proto: _Protocol, data: bytes, addr: Any) -> None:
        host, port = str(addr[0]), int(addr[1])
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            host = str(ip)
        reply, disposition = answer(data, (host, port), self.software)
        self.metrics.requests[disposition] += 1
        if reply is None or proto.transport is None:
            return
        self.metrics.families["ipv6" if ":" in host else "ipv4"] += 1
        try:
            proto.transport.sendto(reply, addr)
        except OSError:
            self.metrics.write_errors += 1


def _bind(host: str | None, port: int) -> socket.socket:
    if host in (None, "", "::"):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            if host == "::":
                raise
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            host = "0.0.0.0"
        else:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            host = "::"
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


__all__ = ["DISPOSITIONS", "STUN_PORT", "StunMetrics", "StunServer", "answer"]
