"""Sets of IP addresses as merged ranges, rendered the way Tailscale renders a FilterRule's ``SrcIPs``.

An address is ``(family, int)`` (family 4 or 6); a set is a sorted tuple of merged inclusive ranges
``(family, first, last)``. :func:`render` turns a set into strings: a single address bare
(``"100.64.0.1"``), a range that is exactly one prefix in CIDR form (``"10.0.0.0/8"``), any other range
as ``"first-last"``, and the strings sorted (byte order, as Tailscale's control server sorts them).
Source: go4.org/netipx ``IPSet.Ranges`` and ``IPRange.Prefix``; captured Tailscale filters in Headscale's
``hscontrol/policy/v2/testdata``.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

Range = tuple[int, int, int]
T = TypeVar("T")

_BITS = {4: 32, 6: 128}


def addr(text: str) -> tuple[int, int]:
    """``"100.64.0.1"`` or ``"100.64.0.1/32"`` (a host prefix) -> (4, int). Raises ValueError."""
    a = ipaddress.ip_address(text.split("/", 1)[0])
    return a.version, int(a)


def fast_addr(text: str) -> tuple[int, int]:
    """:func:`addr` for a bare address, through the C parsers. Raises ValueError."""
    try:
        if ":" in text:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def net_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Range:
    return net.version, int(net.network_address), int(net.broadcast_address)


def merge(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sort and merge overlapping or adjacent ranges."""
    out: list[list[int]] = []
    for fam, lo, hi in sorted(ranges):
        if out and out[-1][0] == fam and lo <= out[-1][2] + 1:
            if hi > out[-1][2]:
                out[-1][2] = hi
        else:
            out.append([fam, lo, hi])
    return tuple((f, lo, hi) for f, lo, hi in out)


def subtract(ranges: tuple[Range, ...], cut: Range) -> tuple[Range, ...]:
    out: list[Range] = []
    cf, clo, chi = cut
    for f, lo, hi in ranges:
        if f != cf or hi < clo or lo > chi:
            out.append((f, lo, hi))
            continue
        if lo < clo:
            out.append((f, lo, clo - 1))
        if hi > chi:
            out.append((f, chi + 1, hi))
    return tuple(out)


def contains(ranges: tuple[Range, ...], fam: int, value: int) -> bool:
    return any(f == fam and lo <= value <= hi for f, lo, hi in ranges)


def overlaps(a: Range, b: Range) -> bool:
    return a[0] == b[0] and a[1] <= b[2] and b[1] <= a[2]


def _text(fam: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if fam == 4 else ipaddress.IPv6Address(value))


def render_range(r: Range) -> str:
    fam, lo, hi = r
    if lo == hi:
        return _text(fam, lo)
    plen = prefix_len(r)
    if plen is not None:
        return f"{_text(fam, lo)}/{plen}"
    return f"{_text(fam, lo)}-{_text(fam, hi)}"


def render(ranges: Iterable[Range], names: Mapping[tuple[int, int], str] | None = None) -> tuple[str, ...]:
    """Merged, rendered and sorted (see the module docstring). ``names``: the text of single addresses
    already known (the nodes' own), used instead of formatting them again."""
    out = []
    for r in merge(ranges):
        text = names.get((r[0], r[1])) if names is not None and r[1] == r[2] else None
        out.append(text if text is not None else render_range(r))
    out.sort()
    return tuple(out)


def prefix_len(r: Range) -> int | None:
    """The prefix length of a range that is exactly one CIDR prefix (``(4, a, a)``: 32), else None."""
    fam, lo, hi = r
    size = hi - lo + 1
    if size <= 0 or size & (size - 1) or lo % size:
        return None
    return _BITS[fam] - size.bit_length() + 1


class PrefixIndex(Generic[T]):
    """Ranges with a value each, found by address in O(prefix lengths present) instead of a scan of every
    range: a range that is one CIDR prefix (every ``ipaddress`` network is) is kept in a dict per prefix
    length, keyed by its network bits, so a single address is one dict lookup; any other range is checked
    one by one. Built once (:meth:`add`), then only queried. Values come back in no particular order and
    may repeat (one per range holding them)."""

    def __init__(self) -> None:
        self._by_len: dict[tuple[int, int], dict[int, list[T]]] = {}  # (family, shift) -> bits -> values
        self._tables: dict[int, list[tuple[dict[int, list[T]], int]]] = {4: [], 6: []}  # (those, shift)
        self._other: list[tuple[Range, T]] = []
        self._starts: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}  # (first, last, slot), sorted
        self._values: list[T] = []  # slot -> value
        self._sorted = True

    def __bool__(self) -> bool:
        return bool(self._values)

    def add(self, r: Range, value: T) -> None:
        """Index range ``r`` with ``value``."""
        fam, lo, hi = r
        plen = prefix_len(r)
        if plen is None:
            self._other.append((r, value))
        else:
            shift = _BITS[fam] - plen
            table = self._by_len.get((fam, shift))
            if table is None:
                table = self._by_len[(fam, shift)] = {}
                self._tables[fam].append((table, shift))
            table.setdefault(lo >> shift, []).append(value)
        self._starts[fam].append((lo, hi, len(self._values)))
        self._values.append(value)
        self._sorted = False

    def at(self, fam: int, value: int) -> list[T]:
        """The values of the ranges containing address ``(fam, value)``."""
        out: list[T] = []
        for table, shift in self._tables[fam]:
            got = table.get(value >> shift)
            if got is not None:
                out += got
        if self._other:
            out += [v for (f, lo, hi), v in self._other if f == fam and lo <= value <= hi]
        return out

    def overlapping(self, r: Range) -> list[T]:
        """The values of the ranges overlapping range ``r``: those containing its first address and those
        starting inside it (every overlapping range is one or the other)."""
        fam, lo, hi = r
        out = self.at(fam, lo)
        if not self._sorted:
            for starts in self._starts.values():
                starts.sort()
            self._sorted = True
        starts = self._starts[fam]
        k = bisect.bisect_left(starts, (lo + 1, -1, -1))
        while k < len(starts) and starts[k][0] <= hi:
            out.append(self._values[starts[k][2]])
            k += 1
        return out


CGNAT = net_range(ipaddress.ip_network("100.64.0.0/10"))
CHROMEOS = net_range(ipaddress.ip_network("100.115.92.0/23"))
ULA = net_range(ipaddress.ip_network("fd7a:115c:a1e0::/48"))
TAILNET: tuple[Range, ...] = (*subtract((CGNAT,), CHROMEOS), ULA)
"""What a ``*`` source stands for: the tailnet's address ranges, 100.64.0.0/10 without 100.115.92.0/23
(which Tailscale leaves to ChromeOS's VMs) and fd7a:115c:a1e0::/48, as Tailscale's control renders it."""


def in_tailnet(fam: int, value: int) -> bool:
    """Whether address ``(fam, value)`` is in :data:`TAILNET` (``contains(TAILNET, fam, value)``, faster)."""
    if fam == 4:
        return CGNAT[1] <= value <= CGNAT[2] and not CHROMEOS[1] <= value <= CHROMEOS[2]
    return ULA[1] <= value <= ULA[2]


__all__ = [
    "TAILNET",
    "PrefixIndex",
    "Range",
    "addr",
    "contains",
    "in_tailnet",
    "merge",
    "net_range",
    "overlaps",
    "prefix_len",
    "render",
    "render_range",
]
