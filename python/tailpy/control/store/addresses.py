"""Tailnet address allocation.

IPv4 from the tailnet's IPv4 prefix (default 100.64.0.0/10) and IPv6 from its IPv6 prefix (default
fd7a:115c:a1e0::/48), each the lowest free one, skipping the network address, 100.100.100.100 and
fd7a:115c:a1e0::53 (MagicDNS). A node keeps its row (and so its addresses) for the life of its machine key,
even when deleted, so an address is never given to two nodes and never given back.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import nodes
from tailpy.errors import ControlError

IPV4_RANGE = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_RANGE = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
RESERVED = frozenset(
    {
        ipaddress.ip_address("100.100.100.100"),  # MagicDNS
        ipaddress.ip_address("fd7a:115c:a1e0::53"),  # MagicDNS
        IPV4_RANGE.broadcast_address,
    }
)
BATCH = 16
"""Candidate addresses (and names, see :mod:`tailpy.control.store.nodes`) looked up per query."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def first_free(net: Network, used: set[str]) -> Any:
    """The lowest host address of ``net`` not in ``used`` (text forms) and not reserved (MagicDNS, the
    network and broadcast addresses). Raises ControlError when none is left."""
    for host in hosts(net):
        if str(host) not in used:
            return host
    raise exhausted(net, len(used))


def exhausted(net: Network, given: int) -> ControlError:
    """The error for a full pool ``net`` of which ``given`` addresses are given out."""
    return ControlError(
        f"address pool {net} is exhausted ({given} addresses given out); serve with a wider "
        f"--prefix-v{net.version} or delete nodes"
    )


def hosts(net: Network, start: int = 0) -> Iterator[Any]:
    """The host addresses of ``net`` from ``start`` (an int; default the first), reserved ones skipped."""
    first = max(int(net.network_address) + 1, start)
    cls: Callable[[int], Any] = type(net.network_address)
    return (a for a in (cls(i) for i in range(first, int(net.broadcast_address))) if a not in RESERVED)


class AddressAllocator:
    """Finds the lowest free address of a prefix in O(log nodes): addresses are never given back (a node's
    row outlives its deletion), so the lowest free one only grows. The search starts at the last one found
    (once per prefix and allocator: a scan of every address) and checks candidates :data:`BATCH` at a time
    against the unique index, inside the caller's serialized transaction. The hint is the address found, not
    the next one, so a rolled-back registration leaves no gap. One allocator per :class:`Store`."""

    def __init__(self) -> None:
        self._hint: dict[Network, int] = {}

    def allocate(self, conn: Connection, net: Network, column: sa.Column[Any]) -> Any:
        """The lowest address of ``net`` that no node has in ``column`` (``nodes.c.ipv4`` or ``ipv6``), as an
        ``ipaddress`` address. Raises ControlError when the pool is exhausted."""
        start = self._hint.get(net)
        if start is None:
            used = {r[0] for r in conn.execute(sa.select(column))}
            start = int(first_free(net, used))
        candidates = hosts(net, start)
        while True:
            batch = [str(h) for h in itertools.islice(candidates, BATCH)]
            if not batch:
                count = conn.execute(sa.select(sa.func.count()).select_from(nodes)).scalar() or 0
                raise exhausted(net, count)
            taken = {r[0] for r in conn.execute(sa.select(column).where(column.in_(batch)))}
            free = next((a for a in batch if a not in taken), None)
            if free is not None:
                addr = ipaddress.ip_address(free)
                self._hint[net] = int(addr)
                return addr


__all__ = [
    "BATCH",
    "IPV4_RANGE",
    "IPV6_RANGE",
    "RESERVED",
    "AddressAllocator",
    "exhausted",
    "first_free",
    "hosts",
]
