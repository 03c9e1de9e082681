"""Tailnet address allocation.

IPv4 from the tailnet's IPv4 prefix (default 100.64.0.0/10) and IPv6 from its IPv6 prefix (default
fd7a:115c:a1e0::/48), each the lowest free one, skipping the network address, 100.100.100.100 and
fd7a:115c:a1e0::53 (MagicDNS). A node keeps its row (and so its addresses) for the life of its machine key;
the unique indexes on ``nodes.ipv4`` and ``nodes.ipv6`` make it impossible for two rows, so two nodes, to
hold one address.

Addresses come back: once a prefix has no never-used address left, the allocator takes the address of a
deleted node (an admin's ``nodes delete``, or an ephemeral node gone offline) whose deletion is at least
``quarantine`` seconds old (default :data:`DEFAULT_QUARANTINE`, 10 minutes, ``control serve
--address-quarantine``), the longest-deleted first: the deleted row gives it up in the same transaction (its
column then holds ``~released-<id>``, not an address), so peers that still had the old node's address in a
netmap or a firewall rule have had time to forget it. A deleted machine that comes back gets its old
address again if it still holds it, else a new one. (Headscale reuses addresses the same way; without it a
/24 tailnet of CI runners that register and go away runs out after about 250 runs.)
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
DEFAULT_QUARANTINE = 600.0
"""Seconds a deleted node's addresses stay unused before they return to the pool."""
RELEASED = "~released-"
"""Prefix of what a deleted row holds instead of an address it gave up (never a valid address)."""
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
    """Finds the lowest never-used address of a prefix in O(log nodes): a row holds its address until it is
    deleted and quarantined and the pool has no never-used one left, so the lowest never-used one only
    grows. The search starts at the last one found (once per prefix and allocator: a scan of every address)
    and checks candidates :data:`BATCH` at a time against the unique index, inside the caller's serialized
    transaction. The hint is the address found, not the next one, so a rolled-back registration leaves no
    gap. When none is left, the address of the longest-deleted node past ``quarantine`` seconds is taken
    back (an index on ``deleted``). One allocator per :class:`Store`."""

    def __init__(self, quarantine: float = DEFAULT_QUARANTINE) -> None:
        if not quarantine >= 0:
            raise ValueError(f"address quarantine must be >= 0 seconds, got {quarantine}")
        self.quarantine = quarantine
        self._hint: dict[Network, int] = {}

    def allocate(self, conn: Connection, net: Network, column: sa.Column[Any], now: float) -> Any:
        """The lowest address of ``net`` that no node ever had in ``column`` (``nodes.c.ipv4`` or ``ipv6``),
        else one a node deleted at least :attr:`quarantine` seconds before ``now`` (unix seconds) gives up; as
        an ``ipaddress`` address. Raises ControlError when the pool is exhausted."""
        start = self._hint.get(net)
        if start is None:
            used = {r[0] for r in conn.execute(sa.select(column))}
            try:
                start = int(first_free(net, used))
            except ControlError:
                start = int(net.broadcast_address)  # nothing never-used: only released addresses
        candidates = hosts(net, start)
        while True:
            batch = [str(h) for h in itertools.islice(candidates, BATCH)]
            if not batch:
                addr = self._take_back(conn, net, column, now)
                if addr is not None:
                    return addr
                live = conn.execute(
                    sa.select(sa.func.count()).select_from(nodes).where(nodes.c.deleted.is_(None))
                ).scalar()
                raise exhausted(net, live or 0)
            taken = {r[0] for r in conn.execute(sa.select(column).where(column.in_(batch)))}
            free = next((a for a in batch if a not in taken), None)
            if free is not None:
                addr = ipaddress.ip_address(free)
                self._hint[net] = int(addr)
                return addr

    def _take_back(self, conn: Connection, net: Network, column: sa.Column[Any], now: float) -> Any:
        """The address in ``net`` of the longest-deleted node whose quarantine has ended, given up by its row
        (now holding ``~released-<id>``); None when there is none."""
        query = (
            sa.select(nodes.c.id, column)
            .where(
                nodes.c.deleted.is_not(None),
                nodes.c.deleted <= now - self.quarantine,
                sa.not_(column.startswith(RELEASED)),
            )
            .order_by(nodes.c.deleted, nodes.c.id)
        )
        offset = 0
        while rows := conn.execute(query.offset(offset).limit(BATCH)).all():
            for row in rows:
                try:
                    addr = ipaddress.ip_address(row[1])
                except ValueError:
                    continue
                if addr in net and addr not in RESERVED:  # not from a prefix the tailnet no longer uses
                    released = {column.name: f"{RELEASED}{row.id}"}
                    conn.execute(nodes.update().where(nodes.c.id == row.id).values(released))
                    return addr
            offset += BATCH
        return None


__all__ = [
    "BATCH",
    "DEFAULT_QUARANTINE",
    "IPV4_RANGE",
    "IPV6_RANGE",
    "RELEASED",
    "RESERVED",
    "AddressAllocator",
    "exhausted",
    "first_free",
    "hosts",
]
