"""Subnet routes and exit routes: the prefixes a node advertises, how they are written and checked.

A node *advertises* routes (Tailscale's ``Hostinfo.RoutableIPs``): subnet routes such as ``198.51.100.0/24``
for a LAN behind it, and the two *exit routes* ``0.0.0.0/0`` and ``::/0`` when it offers itself as an exit
node (``tailpy up --advertise-exit-node``). Control approves them (an admin, or the policy's
``autoApprovers``); an approved subnet route is served by one *primary* router at a time; peers send to a
router the prefixes in its ``allowed_ips`` (``tailcfg.Node.AllowedIPs``: its own addresses, the subnet
routes it is primary for, and the exit routes when it is an approved exit node).

Prefixes are written in their canonical CIDR form (``ipaddress`` network text: host bits must be zero).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tailpy.errors import ConfigError

EXIT_ROUTES: tuple[str, str] = ("0.0.0.0/0", "::/0")
"""The routes an exit node advertises (Tailscale's ``tsaddr.AllIPv4()`` and ``AllIPv6()``)."""

TAILNET_RANGES: tuple[str, str] = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
"""The tailnet's own address ranges: a subnet route may not overlap them."""

MAX_ROUTES = 10_000
"""Most routes one node may advertise (a bound on what control stores and sends)."""


def is_exit_route(prefix: str) -> bool:
    """Whether ``prefix`` (canonical CIDR text) is one of :data:`EXIT_ROUTES`."""
    return prefix in EXIT_ROUTES


def subnet_routes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The prefixes that are not exit routes, in order."""
    return tuple(p for p in prefixes if p not in EXIT_ROUTES)


def has_exit_routes(prefixes: Iterable[str]) -> bool:
    """Whether ``prefixes`` hold both exit routes (an exit node; ``tsaddr.ContainsExitRoutes``)."""
    s = set(prefixes)
    return all(r in s for r in EXIT_ROUTES)


def canonical(prefix: str) -> str:
    """``prefix`` in canonical CIDR text ("198.51.100.0/24", "2001:db8:1::/64"); a bare address becomes a host
    prefix. Raises ConfigError naming the text when it is not a prefix or has host bits set."""
    text = prefix.strip()
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            fixed = ipaddress.ip_network(text, strict=False)
            raise ConfigError(f"route {text!r} has host bits set: did you mean {fixed}?") from None
        raise ConfigError(f"route {text!r} is not an IP prefix such as 198.51.100.0/24") from None
    return str(net)


def parse_routes(text: str | Iterable[str], *, allow_exit: bool = True) -> tuple[str, ...]:
    """Advertised routes from a comma-separated string or a list (``--advertise-routes``): canonical,
    without duplicates, in the order given. An empty string is no routes. Raises ConfigError for a prefix
    that does not parse, has host bits set, overlaps the tailnet's own ranges (100.64.0.0/10,
    fd7a:115c:a1e0::/48), is a default route when ``allow_exit`` is false (use ``--advertise-exit-node``), or
    for more than :data:`MAX_ROUTES`."""
    items = [t for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out: list[str] = []
    for item in items:
        p = canonical(item)
        if p in EXIT_ROUTES:
            if not allow_exit:
                raise ConfigError(
                    f"route {p} is a default route: use --advertise-exit-node to offer an exit node"
                )
        else:
            net = ipaddress.ip_network(p)
            for r in TAILNET_RANGES:
                tail = ipaddress.ip_network(r)
                if net.version == tail.version and net.overlaps(tail):
                    raise ConfigError(f"route {p} overlaps the tailnet's own range {r}")
        if p not in out:
            out.append(p)
    if len(out) > MAX_ROUTES:
        raise ConfigError(f"a node may advertise at most {MAX_ROUTES} routes, not {len(out)}")
    return tuple(out)
