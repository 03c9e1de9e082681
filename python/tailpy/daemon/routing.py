"""The node's route preferences applied to a netmap: peers' allowed IPs, the exit node, the OS routes. Pure.

After Tailscale's ``ipn/ipnlocal/local.go`` (``peerRoutes``, ``routerConfig``, ``exitNodeID`` resolution) and
``wgengine/wgcfg/nmcfg`` (``WGCfg``: a peer's AllowedIPs without its subnet routes unless
``RouteAll`` / ``--accept-routes``, without the exit routes unless it is the chosen exit node).

* :func:`peer_allowed_ips`: what the data plane accepts from and sends to one peer (``Device.set_peer``
  ``allowed_ips``): its addresses, its subnet routes when this node accepts routes, the exit routes when it
  is this node's exit node. Every ``set_peer`` of the daemon goes through it.
* :func:`resolve_exit_node`: ``exit_node`` as the user gave it (name, FQDN or tailnet IP) against the netmap,
  with why it cannot carry traffic now (missing, not offering, offline).
* :func:`check_exit_node`: the same for ``tailpy set --exit-node`` / ``up``: ConfigError with one sentence.
* :func:`route_plan`: the OS routing for :class:`tailpy.daemon.router.RouterConfig` (routes into the TUN,
  LAN routes kept out of it, the subnets this node serves).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tailpy import netmap as nm
from tailpy.errors import ConfigError
from tailpy.routes import EXIT_ROUTES, TAILNET_RANGES, is_exit_route


@dataclass(frozen=True)
class RoutePrefs:
    """The route preferences of a node (:class:`tailpy.daemon.state.NodeState` keeps them):
    ``advertise_routes`` (canonical CIDR, exit routes included when it offers to be an exit node),
    ``accept_routes``, ``exit_node`` ("" none), ``exit_node_allow_lan_access``, ``snat_subnet_routes``."""

    advertise_routes: tuple[str, ...] = ()
    accept_routes: bool = False
    exit_node: str = ""
    exit_node_allow_lan_access: bool = False
    snat_subnet_routes: bool = True


def peer_allowed_ips(node: nm.Node, *, accept_routes: bool, exit_node: bool) -> list[str]:
    """The allowed IPs of peer ``node`` in the data plane: its addresses, then the subnet routes of its
    ``allowed_ips`` (control's, already reduced to what this node may use) when ``accept_routes``, then its
    exit routes when ``exit_node`` (it is this node's exit node) and it offers them. No duplicates."""
    out = list(node.addresses)
    for prefix in node.effective_allowed_ips():
        if prefix in out:
            continue
        if is_exit_route(prefix):
            if exit_node:
                out.append(prefix)
        elif accept_routes and prefix not in node.addresses:
            out.append(prefix)
    return out


@dataclass(frozen=True)
class ExitChoice:
    """:func:`resolve_exit_node`'s answer: ``node`` (the peer named, None when there is none) and
    ``problem`` (why it carries no traffic now: one sentence; "" when it does, or none is wanted)."""

    node: nm.Node | None = None
    problem: str = ""

    @property
    def usable(self) -> bool:
        """The exit node is a peer offering exit routes to this node (its allowed IPs carry them)."""
        return self.node is not None and not self.problem


def _find(netmap: nm.NetMap, want: str) -> tuple[nm.Node | None, bool]:
    """The peer ``want`` names (name, FQDN with or without the final dot, or tailnet IP), and whether it
    names this node itself."""
    text = want.strip().rstrip(".").lower()
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None

    def named(node: nm.Node) -> bool:
        if ip is not None:
            return any(ipaddress.ip_interface(a).ip == ip for a in node.addresses)
        return text in (node.name.lower(), node.fqdn(netmap.domain).lower())

    if named(netmap.self_node):
        return None, True
    for node in sorted(netmap.peers.values(), key=lambda n: n.id):
        if named(node):
            return node, False
    return None, False


def resolve_exit_node(netmap: nm.NetMap | None, want: str) -> ExitChoice:
    """``want`` (``exit_node`` preference; "" none) against ``netmap``. Traffic stays routed into the
    tunnel whatever the answer (fail closed, as Tailscale): ``problem`` says why it goes nowhere (one
    sentence without what to do: :data:`tailpy.daemon.health.EXIT_NODE` adds that)."""
    if not want:
        return ExitChoice()
    if netmap is None:
        return ExitChoice(problem=f"exit node {want} is not known yet (no netmap)")
    node, is_self = _find(netmap, want)
    if is_self:
        return ExitChoice(problem=f"exit node {want} is this node itself")
    if node is None:
        return ExitChoice(problem=f"exit node {want} is not in this tailnet's netmap")
    if node.expired:
        return ExitChoice(node, f"exit node {node.name}'s key has expired")
    if not node.exit_node_option():
        return ExitChoice(
            node,
            f"exit node {node.name} does not offer to be an exit node to this node (not advertised, not "
            "approved, or the policy does not grant autogroup:internet)",
        )
    if not node.online:
        return ExitChoice(node, f"exit node {node.name} is offline")
    return ExitChoice(node)


def check_exit_node(netmap: nm.NetMap | None, want: str) -> None:
    """Whether ``want`` may be chosen as exit node now (``tailpy set --exit-node``): raises ConfigError with
    one sentence for an unknown peer, this node itself, or a peer that does not offer to be an exit node.
    An offline exit node may be chosen (traffic waits for it); without a netmap nothing can be checked."""
    if not want or netmap is None:
        return
    node, is_self = _find(netmap, want)
    if is_self:
        raise ConfigError(
            f"{want} is this node itself: a node cannot be its own exit node; choose a peer (see "
            "`tailpy exit-node list`)"
        )
    if node is None:
        raise ConfigError(f"no peer {want!r} in this tailnet: see `tailpy exit-node list` for exit nodes")
    if not node.exit_node_option():
        raise ConfigError(
            f"{node.name} is not an exit node this node may use (it must run `tailpy up "
            "--advertise-exit-node`, be approved, and the policy must grant autogroup:internet); see "
            "`tailpy exit-node list`"
        )


@dataclass(frozen=True)
class RoutePlan:
    """The OS routing of a node, the parts of :class:`tailpy.daemon.router.RouterConfig` beyond its TUN and
    addresses: ``routes`` into the TUN, ``local_routes`` kept out of it, ``subnet_routes`` this node serves,
    ``snat_subnet_routes``."""

    routes: tuple[str, ...]
    local_routes: tuple[str, ...] = ()
    subnet_routes: tuple[str, ...] = ()
    snat_subnet_routes: bool = True


def route_plan(
    prefs: RoutePrefs,
    peers: Iterable[nm.Node],
    lan_prefixes: Sequence[str] = (),
    tailnet: Sequence[str] = TAILNET_RANGES,
) -> RoutePlan:
    """The OS routing for ``prefs`` and the netmap's ``peers``: ``routes`` = the ``tailnet`` ranges (both
    by default; the router's own choice, such as the families the TUN has addresses in), the peers' subnet
    routes when accepting routes (except the ones this node advertises itself: its own LAN is
    reached directly), and both exit routes whenever an exit node is chosen, usable or not (fail closed);
    ``local_routes`` = ``lan_prefixes`` (the host's LANs, canonical CIDR) with an exit node and
    ``exit_node_allow_lan_access``; ``subnet_routes`` = every advertised route, the exit routes included
    (what this node forwards for the tailnet: a LAN behind it, or the internet as an exit node)."""
    own = set(prefs.advertise_routes)
    routes: list[str] = list(tailnet)
    if prefs.accept_routes:
        for node in sorted(peers, key=lambda n: n.id):
            for prefix in node.effective_allowed_ips():
                if is_exit_route(prefix) or prefix in node.addresses or prefix in own:
                    continue
                if prefix not in routes:
                    routes.append(prefix)
    local: tuple[str, ...] = ()
    if prefs.exit_node:
        routes.extend(EXIT_ROUTES)
        if prefs.exit_node_allow_lan_access:
            local = tuple(dict.fromkeys(lan_prefixes))
    return RoutePlan(
        routes=tuple(routes),
        local_routes=local,
        subnet_routes=tuple(prefs.advertise_routes),
        snat_subnet_routes=prefs.snat_subnet_routes,
    )


def lan_prefixes(networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> tuple[str, ...]:
    """The host's LAN prefixes from its interfaces' ``networks``, canonical, without host routes, loopback,
    link-local and the tailnet's own ranges."""
    out: list[str] = []
    tail = [ipaddress.ip_network(r) for r in TAILNET_RANGES]
    for net in networks:
        if net.is_loopback or net.is_link_local or net.prefixlen == net.max_prefixlen:
            continue
        if any(net.version == t.version and net.overlaps(t) for t in tail):
            continue
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


__all__ = [
    "ExitChoice",
    "RoutePlan",
    "RoutePrefs",
    "check_exit_node",
    "lan_prefixes",
    "peer_allowed_ips",
    "resolve_exit_node",
    "route_plan",
]
