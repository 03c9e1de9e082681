"""Control's side of subnet routers and exit nodes: which routes a node serves, which router is primary for
each subnet route, and which advertised routes the policy's ``autoApprovers`` approve. Sans-IO: no database,
no streams; :mod:`tailpy.control.mapper` and :mod:`tailpy.control.server` feed it records and publish what it
says changed.

* *Served* routes (:func:`served_routes`): the advertised routes an admin or the policy approved (approved ∩
  advertised, as Tailscale and Headscale serve them); the exit routes only as a pair (an exit node:
  ``tsaddr.ContainsExitRoutes``). An approval outlives the advertisement: when the node advertises the route
  again it is served again.
* *Primary* routers (:class:`PrimaryRoutes`, after Headscale's ``hscontrol/routes/primary.go``): per subnet
  prefix, among the nodes that serve it and are *eligible* (online: a map stream open; key not expired),
  the current primary stays while it is eligible (no flapping when another router comes back); otherwise
  the eligible node with the lowest id becomes primary; with none eligible nobody serves the prefix
  (:func:`choose_primary`). Exit routes have no primary: every approved exit node offers them. A control
  server with a store keeps the primaries in its database, one truth for all its replicas
  (:class:`tailpy.control.primaries.StoredPrimaries`, the same decision run as a compare-and-set).
* ``autoApprovers`` (:func:`auto_approved`): ``{"routes": {"198.51.100.0/24": ["group:x", "tag:r",
  "alice@"]}, "exitNode": [...]}``: an advertised route equal to or inside a listed prefix is approved when
  the node matches one of the prefix's approvers (a tagged node by its tags, an untagged node by its owner:
  user, group, ``autogroup:member``); the exit routes when it matches one of ``exitNode``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from tailpy.control.policy import Policy, PolicyNode
from tailpy.control.policy.model import user_matches
from tailpy.netmap import Node
from tailpy.routes import EXIT_ROUTES, has_exit_routes, is_exit_route


def served_routes(advertised: Iterable[str], approved: Iterable[str]) -> tuple[str, ...]:
    """The routes a node serves: those of ``advertised`` (in its order) that are in ``approved``, subnet
    routes one by one, the exit routes only when both are advertised and both approved."""
    adv = tuple(advertised)
    ok = set(approved)
    exit_node = has_exit_routes(adv) and has_exit_routes(ok)
    return tuple(r for r in adv if (exit_node if is_exit_route(r) else r in ok))


def node_served(node: Node) -> tuple[str, ...]:
    """:func:`served_routes` of ``node``'s ``routable_ips`` and ``approved_routes``."""
    return served_routes(node.routable_ips, node.approved_routes)


def allowed_ips(addresses: Iterable[str], primary: Iterable[str], exit_node: bool) -> tuple[str, ...]:
    """A router's allowed IPs as every peer allowed to use all its routes sees them (``tailcfg.Node
    .AllowedIPs``): its addresses, the subnet routes it is primary for, and both exit routes when it is an
    approved exit node."""
    return (*addresses, *primary, *(EXIT_ROUTES if exit_node else ()))


def choose_primary(current: int | None, eligible: Iterable[int]) -> int | None:
    """The election of one subnet prefix (Headscale's ``hscontrol/routes/primary.go``): ``current`` (the
    primary so far, None: none) stays while it is in ``eligible`` (the ids of the nodes that serve the prefix,
    are online and whose key is valid), so a router that comes back takes nothing back; otherwise the lowest
    eligible id; None when nobody is eligible."""
    routers = set(eligible)
    if current is not None and current in routers:
        return current
    return min(routers) if routers else None


class PrimaryRoutes:
    """The primary router of each subnet prefix. Feed it each node's *eligible* routes with :meth:`update`
    (the subnet routes it serves when it is online and its key valid, else none) and :meth:`remove`
    departed nodes; both return the ids of the nodes whose primary routes changed (publish their records).
    O(changed prefixes x routers of a prefix) per call. Decides on its own view of the routers
    (:meth:`_elect`); a subclass may decide on a shared one."""

    def __init__(self) -> None:
        self._eligible: dict[int, frozenset[str]] = {}
        self._routers: dict[str, set[int]] = {}  # prefix -> eligible nodes
        self._primary: dict[str, int] = {}  # prefix -> primary node
        self._of: dict[int, set[str]] = {}  # node -> prefixes it is primary for

    def update(self, node_id: int, eligible: Iterable[str]) -> set[int]:
        """Node ``node_id`` may now serve exactly the subnet routes ``eligible`` (exit routes are ignored).
        Returns the ids of the nodes whose primary routes changed."""
        new = frozenset(r for r in eligible if not is_exit_route(r))
        old = self._eligible.get(node_id, frozenset())
        if new == old:
            return set()
        if new:
            self._eligible[node_id] = new
        else:
            self._eligible.pop(node_id, None)
        for p in old - new:
            routers = self._routers.get(p)
            if routers is not None:
                routers.discard(node_id)
                if not routers:
                    del self._routers[p]
        for p in new - old:
            self._routers.setdefault(p, set()).add(node_id)
        return self._elect(old ^ new)

    def remove(self, node_id: int) -> set[int]:
        """Node ``node_id`` left: it serves nothing. Returns the ids whose primary routes changed."""
        return self.update(node_id, ())

    def _elect(self, prefixes: Iterable[str]) -> set[int]:
        """Run the election of each of ``prefixes`` (whose routers changed) on this object's view of the
        routers; returns the ids of the nodes whose primary routes changed. A subclass may decide elsewhere
        (on a shared view) and record the outcome with :meth:`_set`."""
        changed: set[int] = set()
        for p in prefixes:
            changed |= self._set(p, choose_primary(self._primary.get(p), self._routers.get(p, ())))
        return changed

    def _set(self, prefix: str, new: int | None) -> set[int]:
        """Make ``new`` the primary of ``prefix`` (None: nobody); returns the ids whose primary routes
        changed (the old and the new primary; empty when it stays)."""
        cur = self._primary.get(prefix)
        if cur == new:
            return set()
        changed = set()
        if cur is not None:
            del self._primary[prefix]
            self._of[cur].discard(prefix)
            if not self._of[cur]:
                del self._of[cur]
            changed.add(cur)
        if new is not None:
            self._primary[prefix] = new
            self._of.setdefault(new, set()).add(prefix)
            changed.add(new)
        return changed

    def primary_routes(self, node_id: int, order: Iterable[str] = ()) -> tuple[str, ...]:
        """The subnet routes node ``node_id`` is primary for: in the order of ``order`` (its advertised
        routes), the rest after it sorted."""
        mine = self._of.get(node_id)
        if not mine:
            return ()
        first = [r for r in order if r in mine]
        return (*first, *sorted(mine - set(first)))

    def primary_of(self, prefix: str) -> int | None:
        """The node that is primary for ``prefix`` (None: nobody serves it)."""
        return self._primary.get(prefix)

    def routers(self, prefix: str) -> frozenset[int]:
        """The eligible nodes serving ``prefix`` (primary and standbys)."""
        return frozenset(self._routers.get(prefix, ()))

    def primaries(self) -> Mapping[str, int]:
        """prefix -> primary node, for every prefix someone serves."""
        return dict(self._primary)


def approver_matches(policy: Policy, approver: str, node: PolicyNode) -> bool:
    """Whether ``approver`` (an ``autoApprovers`` entry: ``tag:x``, ``group:x``, a user as
    ``alice@example.com`` / ``alice@`` / ``user:…``, ``autogroup:member``, ``autogroup:tagged``, ``*``)
    names ``node``: a tagged node by its tags only (its owner no longer counts, as in Tailscale), an
    untagged one by its owner."""
    a = approver.strip()
    lo = a.lower()
    if a == "*":
        return True
    if a.startswith("tag:"):
        return a in node.tags
    if node.tags:
        return lo == "autogroup:tagged"
    if lo == "autogroup:member":
        return bool(node.user)
    if a.startswith("group:"):
        return any(user_matches(m, node.user, node.email) for m in policy.groups.get(a, ()))
    lo = lo.removeprefix("user:")
    return "@" in lo and user_matches(lo, node.user, node.email)


def auto_approved(policy: Policy | None, node: PolicyNode, advertised: Iterable[str]) -> tuple[str, ...]:
    """The routes of ``advertised`` (canonical CIDR text) that ``policy``'s ``autoApprovers`` approve for
    ``node`` (empty without a policy): a subnet route equal to or inside a listed prefix whose approvers
    name the node; both exit routes when ``exitNode`` names it and it advertises both."""
    if policy is None:
        return ()
    aa = policy.auto_approvers
    out: list[str] = []
    adv = tuple(advertised)
    exit_ok = has_exit_routes(adv) and any(approver_matches(policy, a, node) for a in aa.exit_node)
    for r in adv:
        if is_exit_route(r):
            if exit_ok:
                out.append(r)
            continue
        net = ipaddress.ip_network(r)
        for prefix, approvers in aa.routes:
            if (
                net.version == prefix.version
                and net.subnet_of(prefix)  # type: ignore[arg-type]
                and any(approver_matches(policy, a, node) for a in approvers)
            ):
                out.append(r)
                break
    return tuple(out)


__all__ = [
    "PrimaryRoutes",
    "allowed_ips",
    "approver_matches",
    "auto_approved",
    "choose_primary",
    "node_served",
    "served_routes",
]
