"""Policy -> per-node packet filters and visibility, compiled once per policy and node set, kept up to date
node by node.

A node's filter holds the rules whose destination is that node, in ``tailcfg.FilterRule``'s shape and
rendered as Tailscale's control server renders them (checked against filters captured from Tailscale, as
published in Headscale's ``hscontrol/policy/v2/testdata``):

* ``SrcIPs``: the source addresses as merged ranges (:func:`tailpy.control.policy.ipset.render`): single
  addresses bare, exact prefixes as CIDR, other ranges ``first-last``, sorted as strings. ``*`` becomes the
  tailnet's ranges (:data:`~tailpy.control.policy.ipset.TAILNET`) plus the subnet routes nodes serve, and
  explicit sources beside a ``*`` are listed as well; ``autogroup:danger-all`` becomes ``"*"``.
* ``DstPorts``: for a destination that names nodes (user, group, tag, autogroup) the node's own addresses,
  each with each port range (address outer, ports inner); ``*`` stays ``"*"``; an IP or prefix as written
  (a host name resolved), kept only on nodes it contains or whose routes it overlaps.
* ``IPProto`` only when the rule names protocols. One FilterRule per ``acls`` entry and per ``ip`` entry
  of a grant; the ``autogroup:self`` part of a rule follows its other destinations as a rule of its own,
  with the sources narrowed to the node owner's own untagged nodes; rules with equal ``SrcIPs`` and
  ``IPProto`` are merged (``DstPorts`` appended, not deduplicated). A node no rule reaches gets an empty
  filter (nothing inbound is allowed).

Where Headscale differs, this follows Tailscale: Headscale writes a tag's or user's destinations as the
prefixes of all their nodes (merging neighbours into ``/31`` and wider) and keeps the ones containing the
node; Tailscale lists the node's own addresses, and so does this compiler. Headscale's
``autogroup:self`` rule lists every device of the user as a destination; the node's own addresses are
enough (and Tailscale's captures, one device per user, cannot tell the two apart).

Visibility: node A sees node B when some rule lets A reach B or B reach A (``autogroup:self`` only between
the untagged nodes of one user). Peers seen in neither direction are left out of A's netmap.

Scale: nodes are grouped by *class* (owner, email, tags): which non-literal targets contain a node depends
on its class alone, so target matching is memoized per class; only literal IPs and prefixes are checked
against each node's own addresses. Each rule's ``SrcIPs`` is rendered once (lazily, after changes) and
shared by every node's filter. A node's filter is built from its class's template by putting in its own
addresses. Visibility is decided between *views* (the sets of rules a node is a source and a destination
of): A and B see each other iff ``src(A) & dst(B)`` or ``src(B) & dst(A)``, memoized per pair of views.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.control.policy import ipset
from tailpy.control.policy.model import Alias, Policy, PolicyError, PolicyNode, user_matches
from tailpy.packetfilter import ALLOW_ALL, FilterRule, NetPortRange

ClassKey = tuple[str, str, tuple[str, ...]]
ViewKey = tuple[frozenset[int], frozenset[int]]
_NODE = ""  # in a template: "the node's own addresses"


def class_key(node: PolicyNode) -> ClassKey:
    """(owner login, owner email, tags), lower case; a tagged node has no owner."""
    if node.tags:
        return ("", "", tuple(sorted(t.lower() for t in node.tags)))
    return (node.user.lower(), node.email.lower(), ())


@dataclass
class _Class:
    src: frozenset[int]  # rules a non-wildcard, non-literal source of which contains the class
    dst: dict[int, tuple[int, ...]]  # rule -> indexes of its dsts that contain the class (incl. "*")
    self_rules: tuple[int, ...]  # rules with an autogroup:self destination, for an untagged owned class


@dataclass
class _Node:
    node: PolicyNode
    key: ClassKey
    addrs: tuple[str, ...]  # bare addresses, as given
    points: tuple[tuple[int, int], ...]  # (family, int) of each address
    lit_src: frozenset[int]
    lit_dst: tuple[tuple[int, int], ...]  # (rule, dst index) of literal destinations containing the node
    src: frozenset[int]  # every rule the node is a source of (for visibility)
    dst: frozenset[int]  # every rule the node is a non-self destination of
    self_src: frozenset[int]  # self rules it is a source of (an untagged owned node)
    view: ViewKey = field(default=(frozenset(), frozenset()))


@dataclass
class Changes:
    """What one node update changed: ``filters`` node ids whose filter may differ now; ``lost``: node ids
    that saw the updated node before and do not now; ``view_changed``: the updated node's own peer set may
    differ (its streams need a full netmap)."""

    filters: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    view_changed: bool = False


class Compiled:
    """A policy compiled against a node set. :meth:`update` / :meth:`remove` keep it current node by node;
    :meth:`filter` gives a node's rules, :meth:`visible` whether two nodes see each other, :meth:`peers`
    every node a node sees."""

    def __init__(self, policy: Policy, nodes: Iterable[PolicyNode] = ()) -> None:
        self.policy = policy
        rules = policy.rules
        self._n = len(rules)
        self._wild = [any(a.kind == "*" for a in r.srcs) for r in rules]
        self._danger = [any(a.name == "autogroup:danger-all" for a in r.srcs) for r in rules]
        self._lit_src = [tuple(ipset.net_range(a.net) for a in r.srcs if a.net is not None) for r in rules]
        self._lit_dst = [
            (i, j, ipset.net_range(d.alias.net), d.alias.rendered())
            for i, r in enumerate(rules)
            for j, d in enumerate(r.dsts)
            if d.alias.net is not None
        ]
        self._lit_src_rules = [i for i in range(self._n) if self._lit_src[i]]
        self._self_ports = [
            tuple(p for d in r.dsts if d.alias.name == "autogroup:self" for p in d.ports) for r in rules
        ]
        self._classes: dict[ClassKey, _Class] = {}
        self._templates: dict[tuple[ClassKey, tuple[tuple[int, int], ...]], tuple[Any, ...]] = {}
        self.nodes: dict[int, _Node] = {}
        self._src_members: list[set[int]] = [set() for _ in rules]
        self._src_ips: list[tuple[str, ...] | None] = [None] * self._n
        self._self_src: dict[tuple[int, str], tuple[str, ...]] = {}
        self._by_user: dict[str, set[int]] = {}
        self._views: dict[ViewKey, set[int]] = {}
        self._vis: dict[tuple[ViewKey, ViewKey], bool] = {}
        self._extra_wild: dict[int, tuple[ipset.Range, ...]] = {}  # node -> routes, addresses outside TAILNET
        for n in nodes:
            self.update(n)

    # --- classes and nodes ---

    def _class(self, key: ClassKey) -> _Class:
        c = self._classes.get(key)
        if c is None:
            c = self._classes[key] = self._make_class(key)
        return c

    def _make_class(self, key: ClassKey) -> _Class:
        src: set[int] = set()
        dst: dict[int, tuple[int, ...]] = {}
        self_rules: list[int] = []
        owned = bool(key[0]) and not key[2]
        for i, r in enumerate(self.policy.rules):
            if any(a.kind != "*" and self._matches(a, key) for a in r.srcs):
                src.add(i)
            js = tuple(j for j, d in enumerate(r.dsts) if self._matches(d.alias, key))
            if js:
                dst[i] = js
            if owned and self._self_ports[i]:
                self_rules.append(i)
        return _Class(frozenset(src), dst, tuple(self_rules))

    def _matches(self, a: Alias, key: ClassKey) -> bool:
        user, email, tags = key
        kind = a.kind
        if kind == "*":
            return True
        if kind == "tag":
            return a.name in tags
        if tags:
            return a.name == "autogroup:tagged" or a.name == "autogroup:danger-all"
        if kind == "user":
            return bool(user) and user_matches(a.name, user, email)
        if kind == "group":
            return bool(user) and any(
                user_matches(m, user, email) for m in self.policy.groups.get(a.name, ())
            )
        if kind == "autogroup":
            return (a.name == "autogroup:member" and bool(user)) or a.name == "autogroup:danger-all"
        return False

    def _make_node(self, node: PolicyNode) -> _Node:
        key = class_key(node)
        c = self._class(key)
        addrs = tuple(a.split("/", 1)[0] for a in node.addresses)
        points = tuple(ipset.addr(a) for a in addrs)
        routes = tuple(r for r in map(_route_range, node.routes) if r is not None)
        lit_src = frozenset(
            i
            for i in self._lit_src_rules
            if any(ipset.contains(self._lit_src[i], f, v) for f, v in points)
            or any(ipset.overlaps(lr, rr) for lr in self._lit_src[i] for rr in routes)
        )
        lit_dst = tuple(
            (i, j)
            for i, j, rng, _ in self._lit_dst
            if any(rng[0] == f and rng[1] <= v <= rng[2] for f, v in points)
            or any(ipset.overlaps(rng, rr) for rr in routes)
        )
        wild = frozenset(i for i in range(self._n) if self._wild[i] or self._danger[i])
        src = c.src | lit_src | wild
        dst = frozenset(c.dst) | frozenset(i for i, _ in lit_dst)
        self_src = frozenset(i for i in c.self_rules if i in src)
        return _Node(node, key, addrs, points, lit_src, lit_dst, src, dst, self_src, (src, dst))

    def update(self, node: PolicyNode) -> Changes:
        """Add ``node`` or replace its record. Returns what changed (:class:`Changes`)."""
        old = self.nodes.get(node.id)
        if old is not None and old.node == node:
            return Changes()
        new = self._make_node(node)
        ch = Changes()
        old_visible = self._visible_ids_of(old) if old is not None else None
        if old is not None:
            self._unlink(old)
        self._link(new)
        ch.filters.add(node.id)
        dirty = set()
        old_src = self._class(old.key).src if old is not None else frozenset()
        new_src = self._class(new.key).src
        addrs_changed = old is None or old.points != new.points
        for i in old_src ^ new_src if not addrs_changed else old_src | new_src:
            dirty.add(i)
        wild_extra = self._wild_extra(new)
        if self._extra_wild.get(node.id, ()) != wild_extra:
            if wild_extra:
                self._extra_wild[node.id] = wild_extra
            else:
                self._extra_wild.pop(node.id, None)
            dirty.update(i for i in range(self._n) if self._wild[i])
        self._mark_dirty(dirty, ch)
        for u in {
            old.key[0] if old is not None and not old.key[2] else "",
            new.key[0] if not new.key[2] else "",
        }:
            if u:
                self._user_changed(u, ch)
        if old is None:
            ch.view_changed = True
        else:
            ch.view_changed = old.view != new.view or old.key != new.key or old.self_src != new.self_src
            if ch.view_changed and old_visible is not None:
                ch.lost = {i for i in old_visible if i != node.id and not self.visible(node.id, i)}
        return ch

    def remove(self, node_id: int) -> Changes:
        """Forget node ``node_id``. Returns what changed."""
        old = self.nodes.get(node_id)
        ch = Changes()
        if old is None:
            return ch
        self._unlink(old)
        dirty = set(self._class(old.key).src)
        if self._extra_wild.pop(node_id, None) is not None:
            dirty.update(i for i in range(self._n) if self._wild[i])
        self._mark_dirty(dirty, ch)
        if old.key[0] and not old.key[2]:
            self._user_changed(old.key[0], ch)
        ch.filters.discard(node_id)
        return ch

    def _wild_extra(self, n: _Node) -> tuple[ipset.Range, ...]:
        out = [(f, v, v) for f, v in n.points if not ipset.contains(ipset.TAILNET, f, v)]
        out += [r for r in (_route_range(x) for x in n.node.routes) if r is not None]
        return tuple(out)

    def _link(self, n: _Node) -> None:
        self.nodes[n.node.id] = n
        for i in self._class(n.key).src:
            self._src_members[i].add(n.node.id)
        self._views.setdefault(n.view, set()).add(n.node.id)
        if n.key[0] and not n.key[2]:
            self._by_user.setdefault(n.key[0], set()).add(n.node.id)

    def _unlink(self, n: _Node) -> None:
        del self.nodes[n.node.id]
        for i in self._class(n.key).src:
            self._src_members[i].discard(n.node.id)
        members = self._views.get(n.view)
        if members is not None:
            members.discard(n.node.id)
            if not members:
                del self._views[n.view]
        if n.key[0] and not n.key[2]:
            users = self._by_user.get(n.key[0])
            if users is not None:
                users.discard(n.node.id)
                if not users:
                    del self._by_user[n.key[0]]

    def _mark_dirty(self, dirty: set[int], ch: Changes) -> None:
        """Rules whose sources changed: re-render lazily; every node they reach gets a new filter."""
        if not dirty:
            return
        for i in dirty:
            self._src_ips[i] = None
        for view, members in self._views.items():
            if view[1] & dirty:
                ch.filters.update(members)

    def _user_changed(self, user: str, ch: Changes) -> None:
        for k in [k for k in self._self_src if k[1] == user]:
            del self._self_src[k]
        ch.filters.update(self._by_user.get(user, ()))

    # --- filters ---

    def src_ips(self, rule: int) -> tuple[str, ...]:
        """Rule ``rule``'s rendered SrcIPs (shared by every node's filter)."""
        s = self._src_ips[rule]
        if s is None:
            s = self._src_ips[rule] = self._render_src(rule)
        return s

    def _render_src(self, i: int) -> tuple[str, ...]:
        if self._danger[i]:
            return ("*",)
        ranges: list[ipset.Range] = list(self._lit_src[i])
        for nid in self._src_members[i]:
            ranges.extend((f, v, v) for f, v in self.nodes[nid].points)
        if not self._wild[i]:
            return ipset.render(ranges)
        wild = list(ipset.TAILNET)
        for extra in self._extra_wild.values():
            wild.extend(extra)
        out = set(ipset.render(wild))
        out.update(ipset.render(ranges))
        return tuple(sorted(out))

    def _self_src_ips(self, rule: int, user: str) -> tuple[str, ...]:
        k = (rule, user)
        s = self._self_src.get(k)
        if s is None:
            pts = [
                (f, v, v)
                for nid in self._by_user.get(user, ())
                if rule in self.nodes[nid].src
                for f, v in self.nodes[nid].points
            ]
            s = self._self_src[k] = ipset.render(pts)
        return s

    def _template(self, n: _Node) -> tuple[Any, ...]:
        tk = (n.key, n.lit_dst)
        t = self._templates.get(tk)
        if t is None:
            c = self._class(n.key)
            lit = {(i, j): text for i, j, _, text in self._lit_dst}
            out = []
            for i, r in enumerate(self.policy.rules):
                js = c.dst.get(i, ())
                items = []
                for j, d in enumerate(r.dsts):
                    if j in js:
                        items.append(("*" if d.alias.kind == "*" else _NODE, d.ports))
                    elif (i, j) in n.lit_dst:
                        items.append((lit[(i, j)], d.ports))
                has_self = i in c.self_rules
                if items or has_self:
                    out.append((i, tuple(items), has_self))
            t = self._templates[tk] = tuple(out)
        return t

    def filter(self, node_id: int) -> tuple[FilterRule, ...]:
        """Node ``node_id``'s filter (empty when no rule reaches it or the node is unknown)."""
        n = self.nodes.get(node_id)
        if n is None:
            return ()
        rules = self.policy.rules
        out: list[FilterRule] = []
        for i, items, has_self in self._template(n):
            protos = rules[i].protos
            if items:
                src = self.src_ips(i)
                if src:
                    dsts: list[NetPortRange] = []
                    for ip, ports in items:
                        if ip == _NODE:
                            dsts.extend(NetPortRange(a, p) for a in n.addrs for p in ports)
                        else:
                            dsts.extend(NetPortRange(ip, p) for p in ports)
                    out.append(FilterRule(src, tuple(dsts), protos))
            if has_self:
                src = self._self_src_ips(i, n.key[0])
                if src:
                    ports = self._self_ports[i]
                    out.append(
                        FilterRule(src, tuple(NetPortRange(a, p) for a in n.addrs for p in ports), protos)
                    )
        return _merge(out)

    # --- visibility ---

    def visible(self, a: int, b: int) -> bool:
        """Whether nodes ``a`` and ``b`` see each other (False when either is unknown)."""
        na, nb = self.nodes.get(a), self.nodes.get(b)
        if na is None or nb is None:
            return False
        if self._view_vis(na.view, nb.view):
            return True
        return bool(na.key[0]) and na.key == nb.key and bool(na.self_src or nb.self_src)

    def _view_vis(self, va: ViewKey, vb: ViewKey) -> bool:
        k = (va, vb)
        v = self._vis.get(k)
        if v is None:
            v = self._vis[k] = self._vis[(vb, va)] = bool(va[0] & vb[1] or vb[0] & va[1])
        return v

    def peers(self, node_id: int) -> list[int]:
        """Ids of the nodes ``node_id`` sees (itself excluded), in no particular order."""
        n = self.nodes.get(node_id)
        if n is None:
            return []
        return [i for i in self._visible_ids_of(n) if i != node_id]

    def _visible_ids_of(self, n: _Node) -> set[int]:
        out: set[int] = set()
        for view, members in self._views.items():
            if self._view_vis(n.view, view):
                out.update(members)
        if n.key[0] and not n.key[2]:
            mine = self._by_user.get(n.key[0], ())
            if n.self_src or any(self.nodes[i].self_src for i in mine):
                out.update(mine)
        out.discard(n.node.id)
        return out

    def views(self) -> Mapping[ViewKey, set[int]]:
        return self._views

    def view_of(self, node_id: int) -> ViewKey | None:
        n = self.nodes.get(node_id)
        return None if n is None else n.view


def _route_range(text: str) -> ipset.Range | None:
    try:
        return ipset.net_range(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


def _merge(rules: list[FilterRule]) -> tuple[FilterRule, ...]:
    """Merge rules with equal SrcIPs and IPProto (DstPorts appended in order), as Tailscale does."""
    if len(rules) <= 1:
        return tuple(rules)
    out: list[FilterRule] = []
    at: dict[tuple[tuple[str, ...], tuple[int, ...]], int] = {}
    for r in rules:
        k = (r.src_ips, r.ip_proto)
        i = at.get(k)
        if i is None:
            at[k] = len(out)
            out.append(r)
        else:
            out[i] = FilterRule(r.src_ips, out[i].dst_ports + r.dst_ports, r.ip_proto)
    return tuple(out)


def compile_filter(
    policy: Policy | None, node_id: int, nodes: Iterable[PolicyNode]
) -> tuple[FilterRule, ...]:
    """Node ``node_id``'s packet filter under ``policy`` among ``nodes`` (which include it), rendered as
    Tailscale renders it (see the module docstring). No policy: :data:`tailpy.packetfilter.ALLOW_ALL`,
    Tailscale's default. An unknown ``node_id``: an empty filter."""
    if policy is None:
        return ALLOW_ALL
    return Compiled(policy, nodes).filter(node_id)


# --- tests ---


@dataclass(frozen=True)
class _Who:
    user: str = ""
    email: str = ""
    tags: tuple[str, ...] = ()
    points: tuple[tuple[int, int], ...] = ()


def _identities(policy: Policy, a: Alias, nodes: list[PolicyNode]) -> list[_Who]:
    """Who a test's ``src`` or destination stands for: each member of a group, a user, a tag, an address."""

    def pts(ns: Iterable[PolicyNode]) -> tuple[tuple[int, int], ...]:
        return tuple(ipset.addr(x) for n in ns for x in n.addresses)

    if a.kind == "group":
        return [_identities(policy, Alias("user", m), nodes)[0] for m in policy.groups.get(a.name, ())]
    if a.kind == "user":
        mine = [n for n in nodes if not n.tags and user_matches(a.name, n.user, n.email)]
        user = mine[0].user if mine else a.name.rstrip("@")
        email = mine[0].email if mine else (a.name if not a.name.endswith("@") else "")
        return [_Who(user.lower(), email.lower(), (), pts(mine))]
    if a.kind == "tag":  # each node with the tag, with all its tags; the bare tag when none has it
        tagged = [n for n in nodes if a.name in (t.lower() for t in n.tags)]
        return [_Who("", "", class_key(n)[2], pts([n])) for n in tagged] or [_Who("", "", (a.name,))]
    assert a.net is not None
    if a.net.num_addresses == 1:
        ip = ipset.addr(str(a.net.network_address))
        owner = next((n for n in nodes if ip in pts([n])), None)
        if owner is not None:
            k = class_key(owner)
            return [_Who(k[0], k[1], k[2], (ip,))]
        return [_Who(points=(ip,))]
    return [_Who(points=(ipset.addr(str(a.net.network_address)),))]


def _who_matches(policy: Policy, a: Alias, w: _Who, *, src: _Who | None = None) -> bool:
    if a.kind == "*" or a.name == "autogroup:danger-all":
        return True
    if a.net is not None:
        rng = ipset.net_range(a.net)
        return any(rng[0] == f and rng[1] <= v <= rng[2] for f, v in w.points)
    if a.name == "autogroup:self":
        return src is not None and bool(w.user) and not w.tags and not src.tags and src.user == w.user
    if a.kind == "tag":
        return a.name in w.tags
    if w.tags:
        return a.name == "autogroup:tagged"
    if a.kind == "user":
        return bool(w.user or w.email) and user_matches(a.name, w.user, w.email)
    if a.kind == "group":
        return any(user_matches(m, w.user, w.email) for m in policy.groups.get(a.name, ()))
    return a.name == "autogroup:member" and bool(w.user or w.email)


def _allowed(policy: Policy, src: _Who, dst: _Who, port: int, proto: int) -> bool:
    for r in policy.rules:
        if r.protos and proto not in r.protos:
            continue
        if not any(_who_matches(policy, a, src) for a in r.srcs):
            continue
        for d in r.dsts:
            if any(p.first <= port <= p.last for p in d.ports) and _who_matches(
                policy, d.alias, dst, src=src
            ):
                return True
    return False


def check_tests(policy: Policy, nodes: Iterable[PolicyNode] = ()) -> list[PolicyError]:
    """Evaluate the policy's ``tests``: each ``accept`` destination must be reachable from ``src`` and each
    ``deny`` one must not (over ``proto``, TCP when not given). Users, groups and tags are judged by who
    they are (a group: every member); ``nodes`` supply the addresses that IP and prefix rules need. Returns
    one PolicyError per failing entry, pointing at the test (empty when all pass)."""
    ns = list(nodes)
    errors: list[PolicyError] = []
    for t in policy.tests:
        line, col = t.position
        reader_alias = _alias_of(policy, t.src)
        srcs = _identities(policy, reader_alias, ns)
        for want, items in ((True, t.accept), (False, t.deny)):
            for item in items:
                host, _, port = item.rpartition(":")
                if item.startswith("["):
                    host, _, port = item[1:].partition("]:")
                dsts = _identities(policy, _alias_of(policy, host), ns)
                proto = t.proto if t.proto is not None else 6
                for s in srcs:
                    got = any(_allowed(policy, s, d, int(port), proto) for d in dsts)
                    if got != want:
                        who = t.src if len(srcs) == 1 else f"{t.src} member {s.user or s.email}"
                        verb = "may not reach" if want else "may reach"
                        errors.append(PolicyError(f"{t.where}: {who} {verb} {item}", line, col))
                        break
    return errors


def _alias_of(policy: Policy, s: str) -> Alias:
    lo = s.lower()
    if lo.startswith("group:"):
        return Alias("group", lo)
    if lo.startswith("tag:"):
        return Alias("tag", lo)
    if "@" in s:
        return Alias("user", lo)
    if lo in policy.hosts:
        return Alias("ip", lo, policy.hosts[lo])
    return Alias("ip", s, ipaddress.ip_network(s, strict=False))


__all__ = ["Changes", "Compiled", "check_tests", "class_key", "compile_filter"]
