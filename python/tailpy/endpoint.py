"""One type for a UDP endpoint, an IP address and a port, as Tailscale carries ``netip.AddrPort``.

:class:`Endpoint` is what the netmap (a peer's endpoints), disco (Pong sources, CallMeMaybe), STUN (mapped
addresses), netcheck, the daemon and the CLI pass around. It is frozen, hashable and ordered, and has one
canonical form:

* an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is stored as the IPv4 address (Go's
  ``netip.Addr.Unmap``), so one host has one endpoint whichever socket family saw it;
* an IPv6 address may carry a zone (scope id, ``fe80::1%eth0``), which is kept, as ``netip.AddrPort`` keeps
  it: two endpoints that differ only in zone are different endpoints. A zone is one or more printable
  characters other than whitespace, ``%``, ``[``, ``]`` and ``/``. An IPv4 address has no zone; unmapping an
  IPv4-mapped address drops its zone;
* the port is 0-65535 (0 is a valid endpoint, as in Go; a caller that needs a real port checks for it).

Text form (``str()``, :meth:`Endpoint.parse`): ``192.0.2.1:41641``, ``[2001:db8::1]:41641``,
``[fe80::1%eth0]:41641``, the form of ``netip.AddrPort.String`` and of the JSON in control messages and in
the local API's status. Order: IPv4 before IPv6, then by address, then zone, then port (as
``netip.AddrPort.Compare``).

Every malformed input raises :class:`EndpointError` (a :class:`tailpy.errors.ParseError`, so a
``ValueError``) with a sentence saying what was expected, and nothing else.

Other forms:

* socket address tuples, ``(host, port)`` or ``(host, port, flowinfo, scope_id)``
  (:meth:`Endpoint.from_sockaddr`, :meth:`Endpoint.sockaddr`); STUN's decoded (XOR-)MAPPED-ADDRESS,
  :data:`tailpy.proto.stun.Address` ``(ip text, port)``, is such a tuple;
* the 18-byte disco wire form, 16-byte IPv6 address (IPv4 as ``::ffff:a.b.c.d``) + big-endian u16 port
  (``disco/disco.go`` ``Pong.Src``, ``CallMeMaybe.MyNumber``): :meth:`Endpoint.from_disco`,
  :meth:`Endpoint.disco_bytes`.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeAlias

from tailpy.errors import EndpointError

IPAddress: TypeAlias = IPv4Address | IPv6Address

DISCO_LEN: Final = 18
"""Bytes of an endpoint in disco messages: 16-byte IP + 2-byte big-endian port."""

EXPECTED: Final = "expected ip:port, [ipv6]:port or [ipv6%zone]:port with a port of 0-65535"

_ZONE_FORBIDDEN: Final = frozenset("%[]/")
_MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"


def _check_zone(zone: str | None, what: object) -> None:
    if zone is not None and (
        not zone or not zone.isprintable() or any(c.isspace() or c in _ZONE_FORBIDDEN for c in zone)
    ):
        raise EndpointError(
            f"endpoint {what!r} has a bad IPv6 zone: expected one or more printable characters, without "
            "whitespace, '%', '[', ']' or '/'"
        )


@functools.total_ordering
@dataclass(frozen=True, slots=True, eq=True, order=False)
class Endpoint:
    """A UDP endpoint: ``ip`` (IPv4, or IPv6 with or without a zone; never IPv4-mapped) and ``port``
    (0-65535). Build one with ``Endpoint(ip, port)`` (an IPv4-mapped ``ip`` is unmapped; a str ``ip`` is
    parsed), :meth:`parse`, :meth:`from_sockaddr` or :meth:`from_disco`. Raises :class:`EndpointError`."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        ip: Any = self.ip
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                raise EndpointError(f"endpoint address {ip[:64]!r} is not an IP address") from None
        if not isinstance(ip, (IPv4Address, IPv6Address)):
            raise EndpointError(f"endpoint address must be an IPv4 or IPv6 address, not {type(ip).__name__}")
        if isinstance(ip, IPv6Address):
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            else:
                _check_zone(ip.scope_id, str(ip))
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise EndpointError(f"endpoint port must be an integer of 0-65535, not {port!r}")
        if ip is not self.ip:
            object.__setattr__(self, "ip", ip)

    # -- text ------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``ip:port``, ``[ipv6]:port`` or ``[ipv6%zone]:port`` (no whitespace; an IPv6 address needs the
        brackets; IPv4-mapped IPv6 becomes IPv4). Raises :class:`EndpointError`."""
        if not isinstance(text, str):
            raise EndpointError(f"endpoint must be text, not {type(text).__name__}: {EXPECTED}")
        host, sep, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) >= 2
        if bracketed:
            host = host[1:-1]
        if (
            not sep
            or not port.isascii()
            or not port.isdigit()
            or len(port) > 5
            or (":" in host) != bracketed
            or not host.isascii()
            or any(c.isspace() for c in host)
        ):
            raise EndpointError(f"malformed endpoint {text[:64]!r}: {EXPECTED}")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise EndpointError(f"malformed endpoint {text[:64]!r}: {EXPECTED}") from None
        if int(port) > 0xFFFF:
            raise EndpointError(f"malformed endpoint {text[:64]!r}: {EXPECTED}")
        return cls(ip, int(port))

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}" if self.ip.version == 4 else f"[{self.ip}]:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({str(self)!r})"

    # -- properties ------------------------------------------------------------------------------------

    @property
    def zone(self) -> str | None:
        """The IPv6 zone (scope id), or None."""
        return self.ip.scope_id if isinstance(self.ip, IPv6Address) else None

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.ip.version

    def _key(self) -> tuple[int, int, str, int]:
        return (self.ip.version, int(self.ip), self.zone or "", self.port)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self._key() < other._key()

    # -- socket addresses and STUN ---------------------------------------------------------------------

    @classmethod
    def from_sockaddr(cls, addr: tuple[Any, ...]) -> Endpoint:
        """From a socket address: ``(host, port)`` (AF_INET, and STUN's decoded mapped address
        :data:`tailpy.proto.stun.Address`) or ``(host, port, flowinfo, scope_id)`` (AF_INET6; the zone is
        the one in ``host``, ``"fe80::1%eth0"``, else the numeric ``scope_id`` when not 0). ``host`` is IP
        text or an address object. Raises :class:`EndpointError`."""
        if not isinstance(addr, tuple) or len(addr) not in (2, 4):
            raise EndpointError(
                f"socket address {addr!r} is not (host, port) or (host, port, flowinfo, scope_id)"
            )
        host, port = addr[0], addr[1]
        if isinstance(host, str) and len(addr) == 4 and addr[3] and "%" not in host:
            host = f"{host}%{int(addr[3])}"
        return cls(host, port)

    def sockaddr(self, *, family: int = 0) -> tuple[str, int]:
        """``(ip text, port)`` for ``socket.sendto``. ``family`` ``socket.AF_INET6``: an IPv4 endpoint
        as IPv4-mapped IPv6 (``::ffff:a.b.c.d``), for a dual-stack IPv6 socket. The zone stays in the text
        (``"fe80::1%eth0"``), which the socket module resolves."""
        if family == socket.AF_INET6 and self.ip.version == 4:
            return f"::ffff:{self.ip}", self.port
        return str(self.ip), self.port

    # -- disco wire form -------------------------------------------------------------------------------

    @classmethod
    def from_disco(cls, b: bytes) -> Endpoint:
        """From the 18-byte disco form (16-byte IPv6, IPv4 as ``::ffff:a.b.c.d``, + big-endian port).
        Raises :class:`EndpointError` unless ``b`` is exactly 18 bytes."""
        if len(b) != DISCO_LEN:
            raise EndpointError(
                f"a disco endpoint is {DISCO_LEN} bytes (16-byte IP + 2-byte port), got {len(b)}"
            )
        raw = bytes(b[:16])
        ip: IPAddress = IPv4Address(raw[12:]) if raw[:12] == _MAPPED_PREFIX else IPv6Address(raw)
        return cls(ip, int.from_bytes(b[16:18], "big"))

    def disco_bytes(self) -> bytes:
        """The 18-byte disco form (the zone is not sent, as ``netip.Addr.As16`` drops it)."""
        ip16 = _MAPPED_PREFIX + self.ip.packed if self.ip.version == 4 else self.ip.packed
        return ip16 + self.port.to_bytes(2, "big")


def parse_valid(items: Iterable[object]) -> tuple[Endpoint, ...]:
    """The items that are or parse as endpoints (text, as in a netmap's JSON), in order; others skipped,
    as a node skips a peer's endpoint it cannot parse rather than the whole peer."""
    out: list[Endpoint] = []
    for item in items:
        if isinstance(item, Endpoint):
            out.append(item)
        elif isinstance(item, str):
            try:
                out.append(Endpoint.parse(item))
            except EndpointError:
                continue
    return tuple(out)


__all__ = ["DISCO_LEN", "Endpoint", "EndpointError", "IPAddress", "parse_valid"]
