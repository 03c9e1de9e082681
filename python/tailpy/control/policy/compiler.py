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
  of a grant; the ``autogroup:self`` part of a rule is a rule of its own, with the sources narrowed to the
  node owner's own untagged nodes, after the rule's other destinations unless ``autogroup:self`` comes
  first among them (by kind, then as written). Rules with equal ``SrcIPs`` and ``IPProto`` are merged
  (``DstPorts`` appended, not deduplicated) across the whole policy before a node keeps its destinations:
  a merged rule stands where the first of its rules stands, even when that one does not reach the node.
  A node no rule reaches gets an empty filter (nothing inbound is allowed).

Where Headscale differs, this follows Tailscale: Headscale writes a tag's or user's destinations as the
prefixes of all their nodes (merging neighbours into ``/31`` and wider) and keeps the ones containing the
node; Tailscale lists the node's own addresses, and so does this compiler. Headscale's
``autogroup:self`` rule lists every device of the user as a destination; the node's own addresses are
enough (and Tailscale's captures, one device per user, cannot tell the two apart).

Named parts: on the wire a node's filter travels as named parts (Tailscale's ``MapResponse.PacketFilters``),
one per policy rule that reaches the node (:meth:`Compiled.filter_parts`), named after the rule's content
(:func:`part_names`), so that a policy edit or a change of a group's members resends only the parts whose
rules changed. The node concatenates the parts (in name order); rules are not merged across parts, which
changes nothing a filter allows.

Visibility: node A sees node B when some rule lets A reach B or B reach A (``autogroup:self`` only between
the untagged nodes of one user). Peers seen in neither direction are left out of A's netmap.

Scale: nodes are grouped by *class* (owner, email, tags): which non-literal targets contain a node depends
on its class alone, so target matching is memoized per class; only literal IPs and prefixes are checked
against each node's own addresses and routes, through an index built once per compile
(:class:`~tailpy.control.policy.ipset.PrefixIndex`: a dict lookup per address and prefix length, not a scan
of every literal). Each rule's ``SrcIPs`` is rendered once (lazily, after changes) and shared by every
node's filter. A node's filter is built from its class's template by putting in its own addresses; nodes
no literal destination holds share their class's template, and a node some do hold gets the class's
template with only those rules' entries redone. Visibility is decided between *views* (the sets of rules
a node is a source and a destination of): A and B see each other iff ``src(A) & dst(B)`` or
``src(B) & dst(A)``, memoized per pair of views.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.control.policy import ipset
from tailpy.control.policy.model import Alias, Policy, PolicyError, PolicyNode, Rule, user_matches
from tailpy.packetfilter import ALLOW_ALL, FilterRule, NetPortRange, PortRange
from tailpy.routes import EXIT_ROUTES, TAILNET_RANGES, has_exit_routes

ClassKey = tuple[str, str, tuple[str, ...]]
PartSpec = tuple[bytes | None, bytes, bytes | None, bytes, bytes]
"""What one named filter part is made of: (SrcIPs JSON or None, DstPorts entries JSON, the
``autogroup:self`` SrcIPs JSON or None, its DstPorts entries JSON, the ``,"IPProto":[..]`` suffix or b"").
Equal specs, equal parts; :func:`part_json` encodes one."""
ViewKey = tuple[frozenset[int], frozenset[int]]
_NODE = ""  # in a template: "the node's own addresses"
_RANK = {"*": 0, "user": 1, "group": 2, "tag": 3, "autogroup": 4, "ip": 5}
"""The order in which Tailscale lists one rule's destinations on a node (observed in captured filters): by
kind of target, then as written; the entries naming one target are joined (the node's addresses, each with
all the target's ports)."""


def class_key(node: PolicyNode) -> ClassKey:
    """(owner login, owner email: lower case; tags: as given, since tags are case-sensitive as in
    Tailscale); a tagged node has no owner."""
    if node.tags:
        return ("", "", tuple(sorted(node.tags)))
    return (node.user.lower(), node.email.lower(), ())


@dataclass
class _Class:
    src: frozenset[int]  # rules a non-wildcard, non-literal source of which contains the class
    dst: dict[int, tuple[int, ...]]  # rule -> indexes of its dsts that contain the class (incl. "*")
    self_rules: tuple[int, ...]  # rules with an autogroup:self destination, for an untagged owned class
    all_src: frozenset[int] = frozenset()  # src with the rules every node is a source of
    dst_rules: frozenset[int] = frozenset()  # the keys of dst


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
    epoch: int = 0  # which record of the node this is (a new one per change)


@dataclass
class Changes:
    """What one node update changed: :attr:`filters` node ids whose filter parts (the form nodes get,
    :meth:`Compiled.filter_parts`) may differ now, worked out when asked (the merged form,
    :meth:`Compiled.filter_json`, built on demand, may also change for the destinations of a rule whose
    sources became equal to, or stopped being equal to, a changed rule's: merging is across the policy);
    ``lost``: node ids that saw the updated node before and do not now; ``view_changed``: the
    updated node's own peer set may differ (its streams need a full netmap)."""

    lost: set[int] = field(default_factory=set)
    view_changed: bool = False
    _compiled: Compiled | None = None
    _nodes: set[int] = field(default_factory=set)  # nodes whose filter changed, named directly
    _rules: set[int] = field(default_factory=set)  # rules whose sources changed
    _users: set[str] = field(default_factory=set)  # owners whose autogroup:self sources changed
    _removed: int = -1  # the node removed (its filter is gone, not changed)
    _filters: set[int] | None = None

    @property
    def filters(self) -> set[int]:
        if self._filters is None:
            out = set(self._nodes)
            c = self._compiled
            if c is not None:
                if self._rules:
                    for view, members in c.views().items():
                        if view[1] & self._rules:
                            out.update(members)
                for u in self._users:
                    out.update(c.owned_by(u))
            out.discard(self._removed)
            self._filters = out
        return self._filters


class Compiled:
    """A policy compiled against a node set. :meth:`update` / :meth:`remove` keep it current node by node;
    :meth:`filter` gives a node's rules, :meth:`visible` whether two nodes see each other, :meth:`peers`
    every node a node sees."""

    _serials = itertools.count(1)

    def __init__(
        self, policy: Policy, nodes: Iterable[PolicyNode] = (), *, previous: Compiled | None = None
    ) -> None:
        """Compile ``policy`` against ``nodes``. ``previous``: the policy compiled before against the same
        nodes (its current state); the rendered sources of rules both have, with the same source nodes,
        are taken from it instead of rendered again (a policy edit re-renders only the rules it touched)."""
        self.policy = policy
        self.serial = next(Compiled._serials)  # unique per compile in this process
        self.changes = 0  # node updates and removals that changed something (a filter may differ after)
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
        self._lit_text = {(i, j): text for i, j, _, text in self._lit_dst}
        self._lit_dst_index: ipset.PrefixIndex[tuple[int, int]] = ipset.PrefixIndex()
        for i, j, rng, _ in self._lit_dst:
            self._lit_dst_index.add(rng, (i, j))
        self._lit_src_index: ipset.PrefixIndex[int] = ipset.PrefixIndex()
        for i, ranges in enumerate(self._lit_src):
            for rng in ranges:
                self._lit_src_index.add(rng, i)
        self._self_ports = [
            tuple(p for d in r.dsts if d.alias.name == "autogroup:self" for p in d.ports) for r in rules
        ]
        self._self_first = [int(_self_first(r)) for r in rules]
        self._internet_dst = tuple(  # autogroup:internet destinations: on exit nodes only
            (i, j) for i, r in enumerate(rules) for j, d in enumerate(r.dsts) if d.alias.name == INTERNET
        )
        self._dst_star = [any(d.alias.kind == "*" for d in r.dsts) for r in rules]
        self._dst_internet = [any(d.alias.name == INTERNET for d in r.dsts) for r in rules]
        self._may_use: dict[tuple[ViewKey, str], bool] = {}  # (a node's view, route) -> may use
        self._always_there = [  # rules whose other destinations never resolve to nothing
            any(d.alias.kind in ("*", "ip") or d.alias.name == "autogroup:internet" for d in r.dsts)
            for r in rules
        ]
        self._first_at: dict[tuple[bytes, bytes], int] | None = None  # see _first_at_map
        self._orders: dict[tuple[int, str], tuple[tuple[int, bool], ...]] = {}  # see _order
        self._template_self: dict[int, bool] = {}  # id(template) -> whether it has autogroup:self parts
        self._classes: dict[ClassKey, _Class] = {}
        self._class_bodies: dict[tuple[bool, frozenset[str], tuple[str, ...]], _Class] = {}
        self._rule_names = frozenset(
            a.name
            for r in rules
            for a in (*r.srcs, *(d.alias for d in r.dsts))
            if a.kind in ("user", "group")
        )
        self._templates: dict[tuple[int, tuple[tuple[int, int], ...]], tuple[Any, ...]] = {}
        self.nodes: dict[int, _Node] = {}
        self._src_members: list[set[int]] = [set() for _ in rules]
        self._src_ips: list[tuple[str, ...] | None] = [None] * self._n
        self._self_src: dict[str, dict[int, tuple[str, ...]]] = {}  # owner -> rule -> SrcIPs
        self._self_src_json: dict[str, dict[int, bytes]] = {}  # owner -> rule -> SrcIPs JSON
        self.part_names = part_names(rules)
        self._by_user: dict[str, set[int]] = {}
        self._views: dict[ViewKey, set[int]] = {}
        self._vis: dict[tuple[ViewKey, ViewKey], bool] = {}
        self._extra_wild: dict[int, tuple[ipset.Range, ...]] = {}  # node -> routes, addresses outside TAILNET
        self._vis_sets: dict[tuple[ViewKey, str], frozenset[int]] = {}
        self._has_self = any(self._self_ports)
        self._always_src = frozenset(i for i in range(self._n) if self._wild[i] or self._danger[i])
        self._src_json: list[bytes | None] = [None] * self._n
        self._rule_gen = [0] * self._n  # bumped when a rule's sources change
        self._user_gen: dict[str, int] = {}  # bumped when an owner's nodes change (autogroup:self)
        self._epoch = 0
        self._proto_json = [b"" if not r.protos else b',"IPProto":' + _dumps(list(r.protos)) for r in rules]
        self._user_index = _UserIndex(policy)
        self._bulk = True  # building: no change tracking
        for n in nodes:
            self.update(n)
        self._bulk = False
        if previous is not None:
            self._reuse_sources(previous)

    # --- classes and nodes ---

    def _class(self, key: ClassKey) -> _Class:
        c = self._classes.get(key)
        if c is None:
            owned = bool(key[0]) and not key[2]
            names = self._user_index.names(key[0], key[1]) & self._rule_names if owned else frozenset()
            sig = (owned, names, key[2])  # owners in the same groups share one class body
            c = self._class_bodies.get(sig)
            if c is None:
                c = self._class_bodies[sig] = self._make_class(key, names)
            self._classes[key] = c
        return c

    def _make_class(self, key: ClassKey, names: frozenset[str]) -> _Class:
        src: set[int] = set()
        dst: dict[int, tuple[int, ...]] = {}
        self_rules: list[int] = []
        owned = bool(key[0]) and not key[2]
        for i, r in enumerate(self.policy.rules):
            if any(a.kind != "*" and self._matches(a, key, names) for a in r.srcs):
                src.add(i)
            js = tuple(j for j, d in enumerate(r.dsts) if self._matches(d.alias, key, names))
            if js:
                dst[i] = js
            if owned and self._self_ports[i]:
                self_rules.append(i)
        return _Class(
            frozenset(src), dst, tuple(self_rules), frozenset(src) | self._always_src, frozenset(dst)
        )

    def _matches(self, a: Alias, key: ClassKey, names: frozenset[str]) -> bool:
        """Whether target ``a`` contains nodes of class ``key``; ``names``: the user targets and groups
        that name the class's owner."""
        user, _email, tags = key
        kind = a.kind
        if kind == "*":
            return True
        if kind == "tag":
            return a.name in tags
        if tags:
            return a.name == "autogroup:tagged" or a.name == "autogroup:danger-all"
        if kind == "user" or kind == "group":
            return a.name in names
        if kind == "autogroup":
            return (a.name == "autogroup:member" and bool(user)) or a.name == "autogroup:danger-all"
        return False

    def _make_node(self, node: PolicyNode) -> _Node:
        key = class_key(node)
        c = self._class(key)
        addrs = tuple(a.split("/", 1)[0] for a in node.addresses)
        points = tuple(map(ipset.fast_addr, addrs))
        routes = tuple(r for r in map(_route_range, node.routes) if r is not None)
        lit_src: frozenset[int] = frozenset()
        lit_dst: tuple[tuple[int, int], ...] = ()
        if self._lit_src_index:  # literal IPs and prefixes: an index lookup per address, not a scan
            srcs = [i for f, v in points for i in self._lit_src_index.at(f, v)]
            srcs += [i for rr in routes for i in self._lit_src_index.overlapping(rr)]
            lit_src = frozenset(srcs)
        if self._lit_dst_index:
            dsts = [ij for f, v in points for ij in self._lit_dst_index.at(f, v)]
            dsts += [ij for rr in routes for ij in self._lit_dst_index.overlapping(rr)]
            if dsts:
                lit_dst = tuple(sorted(set(dsts)))  # in rule order, then destination order
        if self._internet_dst and has_exit_routes(node.routes):  # an exit node: the internet is behind it
            lit_dst = tuple(sorted({*lit_dst, *self._internet_dst}))
        if lit_src or lit_dst:
            src = c.src | lit_src | self._always_src
            dst = c.dst_rules | frozenset(i for i, _ in lit_dst)
        else:  # shared by the class: views compare and hash them once
            src, dst = c.all_src, c.dst_rules
        self_src = frozenset(i for i in c.self_rules if i in src)
        self._epoch += 1
        return _Node(node, key, addrs, points, lit_src, lit_dst, src, dst, self_src, (src, dst), self._epoch)

    def update(self, node: PolicyNode) -> Changes:
        """Add ``node`` or replace its record. Returns what changed (:class:`Changes`)."""
        old = self.nodes.get(node.id)
        if old is not None and old.node == node:
            return Changes()
        self.changes += 1
        new = self._make_node(node)
        if self._bulk and old is None:
            self._link(new)
            extra = self._wild_extra(new)
            if extra:
                self._extra_wild[node.id] = extra
            return Changes()
        ch = Changes(_compiled=self)
        old_visible = self._visible_ids_of(old) if old is not None else None
        if old is not None:
            self._unlink(old)
        self._link(new)
        ch._nodes.add(node.id)
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
        ch = Changes(_compiled=self, _removed=node_id)
        if old is None:
            return ch
        self.changes += 1
        self._unlink(old)
        dirty = set(self._class(old.key).src)
        if self._extra_wild.pop(node_id, None) is not None:
            dirty.update(i for i in range(self._n) if self._wild[i])
        self._mark_dirty(dirty, ch)
        if old.key[0] and not old.key[2]:
            self._user_changed(old.key[0], ch)
        return ch

    def _reuse_sources(self, prev: Compiled) -> None:
        """Take the rendered SrcIPs of each rule ``prev`` has too (same part name: same content) when its
        source nodes are the same ones (and, for a ``*`` source, the same addresses outside the tailnet
        ranges). Both were compiled over the same node records, so equal members render equally."""
        at = {name: j for j, name in enumerate(prev.part_names)}
        same_extra = prev._extra_wild == self._extra_wild
        for i, name in enumerate(self.part_names):
            j = at.get(name)
            if j is None or prev._src_ips[j] is None or (self._wild[i] and not same_extra):
                continue
            if prev._src_members[j] == self._src_members[i]:
                self._src_ips[i] = prev._src_ips[j]
                self._src_json[i] = prev._src_json[j]

    def _wild_extra(self, n: _Node) -> tuple[ipset.Range, ...]:
        out = [(f, v, v) for f, v in n.points if not ipset.in_tailnet(f, v)]
        if n.node.routes:
            out += [r for r in (_route_range(x) for x in n.node.routes) if r is not None]
        return tuple(out)

    def _link(self, n: _Node) -> None:
        self._vis_sets.clear()
        self.nodes[n.node.id] = n
        for i in self._class(n.key).src:
            self._src_members[i].add(n.node.id)
        members = self._views.get(n.view)
        if members is None:
            members = self._views[n.view] = set()
            self._plans_changed()  # a rule may reach a node now
        members.add(n.node.id)
        if n.key[0] and not n.key[2]:
            self._by_user.setdefault(n.key[0], set()).add(n.node.id)

    def _unlink(self, n: _Node) -> None:
        self._vis_sets.clear()
        del self.nodes[n.node.id]
        for i in self._class(n.key).src:
            self._src_members[i].discard(n.node.id)
        members = self._views.get(n.view)
        if members is not None:
            members.discard(n.node.id)
            if not members:
                del self._views[n.view]
                self._plans_changed()
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
            self._src_json[i] = None
            self._rule_gen[i] += 1
        self._plans_changed()
        ch._rules |= dirty

    def _user_changed(self, user: str, ch: Changes) -> None:
        self._self_src.pop(user, None)
        self._self_src_json.pop(user, None)
        self._user_gen[user] = self._user_gen.get(user, 0) + 1
        self._orders.clear()
        ch._users.add(user)

    def _plans_changed(self) -> None:
        self._first_at = None
        self._orders.clear()

    def owned_by(self, user: str) -> set[int]:
        """Ids of the untagged nodes of owner ``user`` (login name, lower case)."""
        return self._by_user.get(user, set())

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
        names: dict[tuple[int, int], str] = {}
        for nid in self._src_members[i]:
            n = self.nodes[nid]
            ranges += [(f, v, v) for f, v in n.points]
            names.update(zip(n.points, n.addrs, strict=True))
        if not self._wild[i]:
            return ipset.render(ranges, names)
        out = set(_TAILNET_TEXT)  # each route as its own entry, even inside another (as Tailscale lists them)
        for extra in self._extra_wild.values():
            out.update(ipset.render_range(r) for r in extra)
        out.update(ipset.render(ranges, names))
        return tuple(sorted(out))

    def _self_src_ips(self, rule: int, user: str) -> tuple[str, ...]:
        mine = self._self_src.setdefault(user, {})
        s = mine.get(rule)
        if s is None:
            ranges: list[ipset.Range] = []
            names: dict[tuple[int, int], str] = {}
            for nid in self._by_user.get(user, ()):
                n = self.nodes[nid]
                if rule in n.src:
                    ranges += [(f, v, v) for f, v in n.points]
                    names.update(zip(n.points, n.addrs, strict=True))
            s = mine[rule] = ipset.render(ranges, names)
        return s

    def _template(self, n: _Node) -> tuple[Any, ...]:
        """Node ``n``'s filter with its own addresses left out: ``(rule, ((ip, ports), ...), has_self)`` per
        rule reaching it, ``ip`` ``"*"``, a literal as rendered or :data:`_NODE`. Shared by the nodes of a
        class body hit by the same literal destinations (by all of them when none is); a node's template is
        its class's with the entries of the rules it is a literal destination of redone, O(rules reaching
        it), never a scan of every literal."""
        c = self._class(n.key)
        tk = (id(c), n.lit_dst)  # class bodies live as long as this object
        t = self._templates.get(tk)
        if t is None:
            if n.lit_dst:
                base = self._templates.get((id(c), ()))
                if base is None:
                    base = self._templates[(id(c), ())] = self._build_template(c)
                lits: dict[int, list[int]] = {}
                for i, j in n.lit_dst:
                    lits.setdefault(i, []).append(j)
                entries = {e[0]: e for e in base}
                for i, js in lits.items():
                    e = self._entry(c, i, js)
                    if e is not None:
                        entries[i] = e
                t = tuple(entries[i] for i in sorted(entries))
            else:
                t = self._build_template(c)
            self._templates[tk] = t
        return t

    def _build_template(self, c: _Class) -> tuple[Any, ...]:
        """The template of the nodes of class body ``c`` that no literal destination holds."""
        out = []
        for i in sorted({*c.dst, *c.self_rules}):
            e = self._entry(c, i, ())
            if e is not None:
                out.append(e)
        return tuple(out)

    def _entry(self, c: _Class, i: int, lits: Iterable[int]) -> tuple[Any, ...] | None:
        """Rule ``i``'s template entry for class body ``c`` and the literal destinations ``lits`` (indexes
        into the rule's ``dsts``) holding the node; None when the rule does not reach it."""
        dsts = self.policy.rules[i].dsts
        js = c.dst.get(i, ())
        grouped: dict[str, tuple[str, list[PortRange]]] = {}  # alias -> (ip, ports)
        for j in sorted({*js, *lits}, key=lambda j: (_RANK.get(dsts[j].alias.kind, 9), j)):
            d = dsts[j]
            if j not in js and d.alias.name == INTERNET:  # on an exit node: every internet prefix
                for text in INTERNET_DSTS:
                    grouped.setdefault(f"{INTERNET} {text}", (text, []))[1].extend(d.ports)
                continue
            ip = ("*" if d.alias.kind == "*" else _NODE) if j in js else self._lit_text[i, j]
            grouped.setdefault(d.alias.name, (ip, []))[1].extend(d.ports)
        items = tuple((ip, tuple(ports)) for ip, ports in grouped.values())
        has_self = i in c.self_rules
        return (i, items, has_self) if items or has_self else None

    def filter(self, node_id: int) -> tuple[FilterRule, ...]:
        """Node ``node_id``'s filter (empty when no rule reaches it or the node is unknown)."""
        n = self.nodes.get(node_id)
        if n is None:
            return ()
        rules = self.policy.rules
        out: list[FilterRule] = []
        for _, i, is_self, _, items in self._plan(n):
            protos = rules[i].protos
            if not is_self:
                dsts: list[NetPortRange] = []
                for ip, ports in items:
                    if ip == _NODE:
                        dsts.extend(NetPortRange(a, p) for a in n.addrs for p in ports)
                    else:
                        dsts.extend(NetPortRange(ip, p) for p in ports)
                out.append(FilterRule(self.src_ips(i), tuple(dsts), protos))
            else:
                ports = self._self_ports[i]
                src = self._self_src_ips(i, n.key[0])
                out.append(FilterRule(src, tuple(NetPortRange(a, p) for a in n.addrs for p in ports), protos))
        return _merge(out)

    def _plan(self, n: _Node) -> list[tuple[int, int, bool, tuple[bytes, bytes], tuple[Any, ...]]]:
        """The FilterRules node ``n``'s filter is merged from, in the order Tailscale lists them: ``(position,
        rule, whether it is the rule's autogroup:self part, (SrcIPs JSON, IPProto JSON), the rule's
        template items)``; rules with empty sources left out.

        Tailscale merges the rules of the whole policy that have equal ``SrcIPs`` and ``IPProto`` before
        keeping the destinations on a node (Headscale's ``filterRulesForNode``: ``mergeFilterRules`` over
        the unreduced list, then ``ReduceFilterRules``), so a merged rule stands where the first of its
        rules stands, even when that first rule does not reach the node; each policy rule holds positions
        ``2i`` and ``2i + 1``, its ``autogroup:self`` part in the first when ``autogroup:self`` comes first
        among its destinations in the order they are listed (:func:`_self_first`). Checked against the
        filters Tailscale's control server sends (Headscale's ``testdata/acl_results``)."""
        entries = []
        for i, items, has_self in self._template(n):
            proto = self._proto_json[i]
            first = self._self_first[i]
            if items:
                src = self._src_json_of(i)
                if src != b"[]":
                    entries.append((2 * i + first, i, False, (src, proto), items))
            if has_self:
                ssrc = self._self_src_json_of(i, n.key[0])
                if ssrc is not None:
                    entries.append((2 * i + 1 - first, i, True, (ssrc, proto), ()))
        if len(entries) > 1:
            first_at = self._first_at_map()
            lead: dict[tuple[bytes, bytes], int] = {}
            for pos, _, _, key, _ in entries:
                lead[key] = min(lead.get(key, first_at.get(key, pos)), pos)
            entries.sort(key=lambda e: (lead[e[3]], e[0]))
        return entries

    def _first_at_map(self) -> dict[tuple[bytes, bytes], int]:
        """(SrcIPs JSON, IPProto JSON) -> the first position (see :meth:`_plan`) of a policy rule with those
        sources and protocols whose destinations other than ``autogroup:self`` hold something (``*``, an
        address, a prefix, or a node some rule target names). Worked out again after sources change or a
        rule comes to reach a node or stops reaching any."""
        m = self._first_at
        if m is None:
            reached: set[int] = set()
            for view in self._views:
                reached |= view[1]
            m = {}
            for i in range(self._n):
                if not (self._always_there[i] or i in reached):
                    continue
                src = self._src_json_of(i)
                if src != b"[]":
                    m.setdefault((src, self._proto_json[i]), 2 * i + self._self_first[i])
            self._first_at = m
        return m

    def filter_signature(self, node_id: int) -> tuple[Any, ...]:
        """What node ``node_id``'s filter is made of (its record, its class's template, the versions of
        those rules' sources): equal signatures, equal filters. O(rules reaching the node); lets a
        stream tell whether its filter may have changed without building it."""
        n = self.nodes.get(node_id)
        if n is None:
            return ()
        t = self._template(n)
        gen = self._rule_gen
        return (n.epoch, id(t), [gen[i] for i, _, _ in t], self._user_gen.get(n.key[0], 0), self._order(n, t))

    def _order(self, n: _Node, t: tuple[Any, ...]) -> tuple[tuple[int, bool], ...]:
        """(rule, autogroup:self part) of each entry of :meth:`_plan`, in order: the same for every node
        with template ``t`` (and, when it has autogroup:self parts, the same owner) until sources change,
        so memoized per (template, owner) until then."""
        has_self = self._template_self.get(id(t))
        if has_self is None:
            has_self = self._template_self[id(t)] = any(e[2] for e in t)
        key = (id(t), n.key[0] if has_self else "")
        got = self._orders.get(key)
        if got is None:
            got = self._orders[key] = tuple((i, is_self) for _, i, is_self, _, _ in self._plan(n))
        return got

    def filter_json(self, node_id: int) -> bytes:
        """:meth:`filter` as compact JSON (``json.dumps(filter_to_json(...), separators=(",", ":"))``, byte
        for byte), built from each rule's encoded SrcIPs without making rule objects: what a netmap
        carries. ``b"[]"`` for an unknown node."""
        n = self.nodes.get(node_id)
        if n is None:
            return b"[]"
        out: dict[tuple[bytes, bytes], list[bytes]] = {}  # merged by (SrcIPs, IPProto), in plan order
        for _, i, is_self, key, items in self._plan(n):
            dsts = out.setdefault(key, [])
            if not is_self:
                for ip, ports in items:
                    suffixes = [_port_json(p) for p in ports]
                    if ip == _NODE:
                        for a in n.addrs:
                            head = b'{"IP":"' + a.encode() + b'"'
                            dsts += [head + sfx for sfx in suffixes]
                    else:
                        head = b'{"IP":' + _dumps(ip)
                        dsts += [head + sfx for sfx in suffixes]
            else:
                suffixes = [_port_json(p) for p in self._self_ports[i]]
                for a in n.addrs:
                    head = b'{"IP":"' + a.encode() + b'"'
                    dsts += [head + sfx for sfx in suffixes]
        pieces = [b"["]  # one join: the SrcIPs (often tens of kB) are copied once
        for (src, proto), dsts in out.items():
            pieces += (b'{"SrcIPs":', src, b',"DstPorts":[', b",".join(dsts), b"]", proto, b"},")
        if len(pieces) > 1:
            pieces[-1] = pieces[-1][:-1]
        pieces.append(b"]")
        return b"".join(pieces)

    def filter_parts(self, node_id: int) -> dict[str, PartSpec]:
        """Node ``node_id``'s filter as named parts: part name (:attr:`part_names`) -> what the part is made
        of (:data:`PartSpec`; encode with :func:`part_json`). One part per rule reaching the node, with the
        rule's FilterRule and its ``autogroup:self`` FilterRule; rules whose sources are empty are left out.
        Equal specs mean equal parts, and ``hash(spec)`` is cheap (the large SrcIPs are shared bytes
        objects, hashed once). Empty for an unknown node."""
        n = self.nodes.get(node_id)
        if n is None:
            return {}
        out: dict[str, PartSpec] = {}
        names = self.part_names
        for i, items, has_self in self._template(n):
            src: bytes | None = None
            dsts = b""
            if items:
                src = self._src_json_of(i)
                if src == b"[]":
                    src = None
                else:
                    entries: list[bytes] = []
                    for ip, ports in items:
                        suffixes = [_port_json(p) for p in ports]
                        if ip == _NODE:
                            for a in n.addrs:
                                head = b'{"IP":"' + a.encode() + b'"'
                                entries += [head + sfx for sfx in suffixes]
                        else:
                            head = b'{"IP":' + _dumps(ip)
                            entries += [head + sfx for sfx in suffixes]
                    dsts = b",".join(entries)
            ssrc: bytes | None = None
            sdsts = b""
            if has_self:
                ssrc = self._self_src_json_of(i, n.key[0])
                if ssrc is not None:
                    suffixes = [_port_json(p) for p in self._self_ports[i]]
                    sdsts = b",".join(
                        b'{"IP":"' + a.encode() + b'"' + sfx for a in n.addrs for sfx in suffixes
                    )
            if src is not None or ssrc is not None:
                out[names[i]] = (src, dsts, ssrc, sdsts, self._proto_json[i])
        return out

    def _self_src_json_of(self, rule: int, user: str) -> bytes | None:
        mine = self._self_src_json.setdefault(user, {})
        b = mine.get(rule)
        if b is None:
            ips = self._self_src_ips(rule, user)
            b = mine[rule] = _dumps(list(ips)) if ips else b""
        return b or None

    def _src_json_of(self, rule: int) -> bytes:
        b = self._src_json[rule]
        if b is None:
            b = self._src_json[rule] = _dumps(list(self.src_ips(rule)))
        return b

    # --- routes ---

    def may_use_route(self, node_id: int, route: str) -> bool:
        """Whether a router's ``route`` (canonical CIDR text, a route some node serves) belongs in node
        ``node_id``'s allowed IPs for that router (Tailscale's route reduction of a peer's AllowedIPs;
        Headscale's ``ReduceRoutes`` / ``CanAccessRoute``, checked against the captures in its
        ``testdata/routes_results``). A subnet route: some rule with the node among its sources has a
        destination ``*`` or a prefix or address overlapping the route (the node may send there), or some
        rule whose filter the node holds has sources overlapping the route (``*``, which stands for every
        served route too, or a prefix: hosts behind the router may reach the node, whose WireGuard must
        accept their packets from the router). An exit route: a rule with the node among its sources has a
        destination ``*`` or ``autogroup:internet``. False for an unknown node. Memoized per (the node's
        view, route)."""
        n = self.nodes.get(node_id)
        if n is None:
            return False
        key = (n.view, route)
        got = self._may_use.get(key)
        if got is None:
            srcs = n.src
            if any(self._dst_star[i] for i in srcs):
                got = True
            elif route in EXIT_ROUTES:
                got = any(self._dst_internet[i] for i in srcs)
            else:
                rr = _route_range(route)
                got = rr is not None and (
                    any(i in srcs for i, _ in self._lit_dst_index.overlapping(rr))
                    or any(
                        self._wild[i]
                        or self._danger[i]
                        or any(ipset.overlaps(x, rr) for x in self._lit_src[i])
                        for i in n.dst
                    )
                )
            self._may_use[key] = got
        return got

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
        return [i for i in self.visible_set(node_id) if i != node_id]

    def visible_set(self, node_id: int) -> frozenset[int]:
        """The nodes ``node_id`` sees, possibly with itself: one set shared by every node of the same view
        (and, where ``autogroup:self`` applies, the same owner); O(views + result) when not cached."""
        n = self.nodes.get(node_id)
        if n is None:
            return frozenset()
        key = (n.view, self.self_key(node_id))
        got = self._vis_sets.get(key)
        if got is None:
            out: set[int] = set()
            for view, members in self._views.items():
                if self._view_vis(n.view, view):
                    out.update(members)
            if key[1]:
                out.update(self._by_user.get(key[1], ()))
            got = self._vis_sets[key] = frozenset(out)
        return got

    def self_key(self, node_id: int) -> str:
        """The owner whose untagged nodes ``node_id`` sees through ``autogroup:self`` ("" when none)."""
        n = self.nodes.get(node_id)
        if n is None or not n.key[0] or n.key[2] or not self._has_self:
            return ""
        mine = self._by_user.get(n.key[0], ())
        return n.key[0] if n.self_src or any(self.nodes[i].self_src for i in mine) else ""

    def _visible_ids_of(self, n: _Node) -> set[int]:
        return set(self.visible_set(n.node.id)) - {n.node.id}

    def views(self) -> Mapping[ViewKey, set[int]]:
        return self._views

    def view_of(self, node_id: int) -> ViewKey | None:
        n = self.nodes.get(node_id)
        return None if n is None else n.view


class _UserIndex:
    """Which user targets and groups of a policy name an owner: a lookup per owner instead of comparing
    every group member (see :func:`tailpy.control.policy.model.user_matches`)."""

    def __init__(self, policy: Policy) -> None:
        aliases = {a.name for r in policy.rules for a in r.srcs if a.kind == "user"}
        aliases |= {d.alias.name for r in policy.rules for d in r.dsts if d.alias.kind == "user"}
        for members in policy.groups.values():
            aliases.update(members)
        self._exact: dict[str, set[str]] = {}  # login name or email -> aliases naming it
        self._domains: list[str] = []  # "*@example.com" aliases
        for a in aliases:
            if a.startswith("*@"):
                self._domains.append(a)
            elif a.endswith("@"):
                self._exact.setdefault(a[:-1], set()).add(a)
                self._exact.setdefault(a, set()).add(a)
            else:
                self._exact.setdefault(a, set()).add(a)
        self._groups: dict[str, set[str]] = {}  # alias -> groups listing it
        for g, members in policy.groups.items():
            for m in members:
                self._groups.setdefault(m, set()).add(g)

    def names(self, user: str, email: str) -> frozenset[str]:
        """The user aliases naming the owner (login ``user``, ``email``; lower case) and their groups."""
        found = set(self._exact.get(user, ()))
        if email:
            found |= {a for a in self._exact.get(email, ()) if not a.endswith("@")}
        found |= {a for a in self._domains if user_matches(a, user, email)}
        groups = [self._groups.get(a, ()) for a in found]
        return frozenset(found.union(*groups))


def _self_first(rule: Rule) -> bool:
    """Whether Tailscale lists ``rule``'s ``autogroup:self`` FilterRule before its other one: when
    ``autogroup:self`` comes first among its destinations ordered by kind of target, then as written
    (:data:`_RANK`; ``["autogroup:self:*", "autogroup:member:22"]``: first, ``["autogroup:self:*",
    "tag:server:22"]``: after the tag's rule, even on a node with no tag)."""
    ranked = sorted(range(len(rule.dsts)), key=lambda j: (_RANK.get(rule.dsts[j].alias.kind, 9), j))
    return bool(ranked) and rule.dsts[ranked[0]].alias.name == "autogroup:self"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def part_names(rules: Iterable[Rule]) -> tuple[str, ...]:
    """A name for each rule's filter part, from the rule's content (sources, destinations with ports,
    protocols; not its position): ``"r"`` and 12 hex digits of its BLAKE2b digest, ``"~2"``, ``"~3"``, ...
    appended for the second, third, ... copy of one rule. A rule kept across policy edits keeps its name,
    so only the parts of rules that changed travel again."""
    seen: dict[str, int] = {}
    out = []
    for r in rules:
        canon = repr(
            (
                [(a.kind, a.name) for a in r.srcs],
                [(d.alias.kind, d.alias.name, [(p.first, p.last) for p in d.ports]) for d in r.dsts],
                list(r.protos),
            )
        )
        name = "r" + hashlib.blake2b(canon.encode(), digest_size=6).hexdigest()
        k = seen[name] = seen.get(name, 0) + 1
        out.append(name if k == 1 else f"{name}~{k}")
    return tuple(out)


def part_json(spec: PartSpec) -> bytes:
    """The JSON list of FilterRules (tailcfg shape, compact) a :data:`PartSpec` stands for."""
    src, dsts, ssrc, sdsts, proto = spec
    rules = []
    if src is not None:
        rules.append(b'{"SrcIPs":' + src + b',"DstPorts":[' + dsts + b"]" + proto + b"}")
    if ssrc is not None:
        rules.append(b'{"SrcIPs":' + ssrc + b',"DstPorts":[' + sdsts + b"]" + proto + b"}")
    return b"[" + b",".join(rules) + b"]"


_PORTS_JSON: dict[PortRange, bytes] = {}


def _port_json(p: PortRange) -> bytes:
    """``,"Ports":{"First":f,"Last":l}}``: the tail of a DstPorts entry."""
    b = _PORTS_JSON.get(p)
    if b is None:
        b = _PORTS_JSON[p] = b',"Ports":{"First":%d,"Last":%d}}' % (p.first, p.last)
    return b


def _route_range(text: str) -> ipset.Range | None:
    """A subnet route as a range; None for an exit route (0.0.0.0/0, ::/0: not a subnet) or garbage."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return None if net.prefixlen == 0 else ipset.net_range(net)


_TAILNET_TEXT = ipset.render(ipset.TAILNET)

INTERNET = "autogroup:internet"


def _internet_ranges() -> tuple[ipset.Range, ...]:
    """What ``autogroup:internet`` stands for on an exit node: every IPv4 address and 2000::/3 (global
    unicast) less the private ranges (RFC 1918, fc00::/7), the tailnet's ranges and link-local ones
    (Headscale's ``util.TheInternet``), merged, IPv4 first, in address order."""
    drop = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        *TAILNET_RANGES,
    ]
    ranges = ipset.merge(ipset.net_range(ipaddress.ip_network(n)) for n in ("0.0.0.0/0", "2000::/3"))
    for d in drop:
        ranges = ipset.subtract(ranges, ipset.net_range(ipaddress.ip_network(d)))
    return ipset.merge(ranges)


INTERNET_RANGES = _internet_ranges()
INTERNET_DSTS = tuple(
    f"{ipaddress.ip_address(lo)}-{ipaddress.ip_address(hi)}"
    if fam == 4
    else f"{ipaddress.IPv6Address(lo)}-{ipaddress.IPv6Address(hi)}"
    for fam, lo, hi in INTERNET_RANGES
)
"""An ``autogroup:internet`` destination on an exit node's filter, as Tailscale's control renders it
(captured in Headscale's ``testdata/routes_results/ROUTES-b11_autogroup_internet_only``): each range
``first-last``, in address order: ``0.0.0.0-9.255.255.255``, ..., ``2000::-3fff:ffff:...:ffff``."""


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


_Entry = tuple[int, int]  # (rule index, destination index)


class _NodeIndex:
    """The nodes and rules a policy's tests are judged against, indexed once per check.

    Nodes: addresses parsed once; untagged nodes by owner login name and email, nodes by tag (each in the
    order given). Rules: by the names their sources and destinations can match (user targets, groups, tags,
    autogroups; see :class:`_UserIndex`), with the wildcard, literal and ``autogroup:self`` targets apart, so
    judging an identity costs a few dictionary looks instead of a scan of every rule. Identities matched by
    the same names (and the same literal sources) get the same answer (:meth:`src_rules` is their class)."""

    def __init__(self, policy: Policy, nodes: Iterable[PolicyNode]) -> None:
        self.policy = policy
        self.nodes = list(nodes)
        self.points = {
            n.id: tuple(ipset.fast_addr(x.split("/", 1)[0]) for x in n.addresses) for n in self.nodes
        }
        self.owner = {p: n for n in self.nodes for p in self.points[n.id]}
        self.order = {n.id: i for i, n in enumerate(self.nodes)}
        self.by_login: dict[str, list[PolicyNode]] = {}
        self.by_email: dict[str, list[PolicyNode]] = {}
        self.by_tag: dict[str, list[PolicyNode]] = {}
        for n in self.nodes:
            if n.tags:
                for t in set(n.tags):
                    self.by_tag.setdefault(t, []).append(n)
                continue
            self.by_login.setdefault(n.user.lower(), []).append(n)
            if n.email:
                self.by_email.setdefault(n.email.lower(), []).append(n)
        self.users = _UserIndex(policy)
        rules = policy.rules
        self.src_any: set[int] = set()  # rules every identity is a source of
        self.src_named: dict[str, set[int]] = {}  # name -> rules whose sources name it
        self.src_lit: list[tuple[int, ipset.Range]] = []
        self.dst_any: set[_Entry] = set()
        self.dst_named: dict[str, set[_Entry]] = {}
        self.dst_lit: list[tuple[_Entry, ipset.Range]] = []
        self.dst_self: list[_Entry] = []
        for i, r in enumerate(rules):
            for a in r.srcs:
                if a.kind == "*" or a.name == "autogroup:danger-all":
                    self.src_any.add(i)
                elif a.net is not None:
                    self.src_lit.append((i, ipset.net_range(a.net)))
                else:
                    self.src_named.setdefault(a.name, set()).add(i)
            for j, d in enumerate(r.dsts):
                a = d.alias
                if a.kind == "*" or a.name == "autogroup:danger-all":
                    self.dst_any.add((i, j))
                elif a.net is not None:
                    self.dst_lit.append(((i, j), ipset.net_range(a.net)))
                elif a.name == "autogroup:self":
                    self.dst_self.append((i, j))
                else:
                    self.dst_named.setdefault(a.name, set()).add((i, j))
        self._names: dict[tuple[str, str, tuple[str, ...]], frozenset[str]] = {}
        self._idents: dict[tuple[str, str], list[_Who]] = {}
        self._src: dict[tuple[frozenset[str], tuple[tuple[int, int], ...]], frozenset[int]] = {}
        self._dst: dict[tuple[frozenset[str], tuple[tuple[int, int], ...]], frozenset[_Entry]] = {}
        self._eligible: dict[tuple[int, int], frozenset[_Entry]] = {}

    def names(self, w: _Who) -> frozenset[str]:
        """The names a rule target can use for ``w``: its tags and ``autogroup:tagged``; an owner's user
        targets, groups and ``autogroup:member``; nothing for a bare address."""
        key = (w.user, w.email, w.tags)
        found = self._names.get(key)
        if found is None:
            if w.tags:
                found = frozenset((*w.tags, "autogroup:tagged"))
            elif w.user or w.email:
                found = self.users.names(w.user, w.email) | {"autogroup:member"}
            else:
                found = frozenset()
            self._names[key] = found
        return found

    def src_rules(self, w: _Who) -> frozenset[int]:
        """The rules ``w`` is a source of."""
        names = self.names(w)
        pts = w.points if self.src_lit else ()
        got = self._src.get((names, pts))
        if got is None:
            out = set(self.src_any)
            for n in names:
                out.update(self.src_named.get(n, ()))
            for i, (fam, lo, hi) in self.src_lit:
                if any(fam == f and lo <= v <= hi for f, v in pts):
                    out.add(i)
            got = self._src[(names, pts)] = frozenset(out)
        return got

    def dst_entries(self, w: _Who) -> frozenset[_Entry]:
        """The (rule, destination) pairs whose target contains ``w`` (``autogroup:self`` apart)."""
        names = self.names(w)
        pts = w.points if self.dst_lit else ()
        got = self._dst.get((names, pts))
        if got is None:
            out = set(self.dst_any)
            for n in names:
                out.update(self.dst_named.get(n, ()))
            for e, (fam, lo, hi) in self.dst_lit:
                if any(fam == f and lo <= v <= hi for f, v in pts):
                    out.add(e)
            got = self._dst[(names, pts)] = frozenset(out)
        return got

    def eligible(self, port: int, proto: int) -> frozenset[_Entry]:
        """The (rule, destination) pairs that let ``proto`` traffic to ``port`` through."""
        got = self._eligible.get((port, proto))
        if got is None:
            got = frozenset(
                (i, j)
                for i, r in enumerate(self.policy.rules)
                if not r.protos or proto in r.protos
                for j, d in enumerate(r.dsts)
                if any(p.first <= port <= p.last for p in d.ports)
            )
            self._eligible[(port, proto)] = got
        return got

    def pts(self, ns: Iterable[PolicyNode]) -> tuple[tuple[int, int], ...]:
        return tuple(p for n in ns for p in self.points[n.id])

    def identities(self, a: Alias) -> list[_Who]:
        """Who a test's ``src`` or destination stands for: each member of a group, a user, each node with a
        tag (with all its tags; the bare tag when no node has it), an address (its node's owner or tags)."""
        key = (a.kind, a.name)
        got = self._idents.get(key)
        if got is None:
            got = self._idents[key] = self._identities(a)
        return got

    def _identities(self, a: Alias) -> list[_Who]:
        if a.kind == "group":
            return [self.identities(Alias("user", m))[0] for m in self.policy.groups.get(a.name, ())]
        if a.kind == "user":
            mine = self._owned_by(a.name)
            user = mine[0].user if mine else a.name.rstrip("@")
            email = mine[0].email if mine else (a.name if not a.name.endswith("@") else "")
            return [_Who(user.lower(), email.lower(), (), self.pts(mine))]
        if a.kind == "tag":
            tagged = self.by_tag.get(a.name, [])
            return [_Who("", "", class_key(n)[2], self.pts([n])) for n in tagged] or [_Who("", "", (a.name,))]
        assert a.net is not None
        if a.net.num_addresses == 1:
            ip = ipset.addr(str(a.net.network_address))
            owner = self.owner.get(ip)
            if owner is not None:
                k = class_key(owner)
                return [_Who(k[0], k[1], k[2], (ip,))]
            return [_Who(points=(ip,))]
        return [_Who(points=(ipset.addr(str(a.net.network_address)),))]

    def _owned_by(self, alias: str) -> list[PolicyNode]:
        """The untagged nodes whose owner ``alias`` names (:func:`user_matches`), in the order given."""
        if alias.startswith("*@"):
            found = [n for ns in self.by_login.values() for n in ns if user_matches(alias, n.user, n.email)]
        elif alias.endswith("@"):
            found = [*self.by_login.get(alias[:-1], ()), *self.by_login.get(alias, ())]
        else:
            found = [*self.by_login.get(alias, ()), *self.by_email.get(alias, ())]
        unique = {n.id: n for n in found}
        return sorted(unique.values(), key=lambda n: self.order[n.id])


def check_tests(policy: Policy, nodes: Iterable[PolicyNode] = ()) -> list[PolicyError]:
    """Evaluate the policy's ``tests``: each ``accept`` destination must be reachable from ``src`` and each
    ``deny`` one must not (over ``proto``, TCP when not given). Users, groups and tags are judged by who
    they are (a group: every member); ``nodes`` supply the addresses that IP and prefix rules need. Returns
    one PolicyError per failing entry, pointing at the test (empty when all pass).

    Cost: the rules are indexed once by what they can match (:class:`_NodeIndex`); a group's members that
    are sources of the same rules are judged once together, against the distinct destination classes, so a
    test naming a 10,000-member group costs about one look per member plus one per class."""
    if not policy.tests:
        return []
    ix = _NodeIndex(policy, nodes)
    errors: list[PolicyError] = []
    for t in policy.tests:
        line, col = t.position
        srcs = ix.identities(_alias_of(policy, t.src))
        proto = t.proto if t.proto is not None else 6
        for want, items in ((True, t.accept), (False, t.deny)):
            for item in items:
                host, _, port = item.rpartition(":")
                if item.startswith("["):
                    host, _, port = item[1:].partition("]:")
                bad = _first_wrong(ix, srcs, ix.identities(_alias_of(policy, host)), int(port), proto, want)
                if bad is not None:
                    who = t.src if len(srcs) == 1 else f"{t.src} member {bad.user or bad.email}"
                    verb = "may not reach" if want else "may reach"
                    errors.append(PolicyError(f"{t.where}: {who} {verb} {item}", line, col))
    return errors


def _first_wrong(
    ix: _NodeIndex, srcs: list[_Who], dsts: list[_Who], port: int, proto: int, want: bool
) -> _Who | None:
    """The first of ``srcs`` whose reach of some of ``dsts`` on ``port``/``proto`` is not ``want``."""
    ok = ix.eligible(port, proto)
    reach = {ix.dst_entries(d) & ok for d in dsts}  # each destination class, as the pairs that reach it
    reach_rules = [frozenset(i for i, _ in es) for es in reach if es]
    self_rules = frozenset(i for i, j in ix.dst_self if (i, j) in ok)
    self_users = {d.user for d in dsts if d.user and not d.tags} if self_rules else set()
    by_class: dict[frozenset[int], bool] = {}
    for s in srcs:
        rules = ix.src_rules(s)
        got = by_class.get(rules)
        if got is None:
            got = by_class[rules] = any(rules & rs for rs in reach_rules)
        if not got and s.user and not s.tags and s.user in self_users:
            got = bool(rules & self_rules)
        if got != want:
            return s
    return None


def _alias_of(policy: Policy, s: str) -> Alias:
    lo = s.lower()
    if s.startswith("group:"):
        return Alias("group", s)
    if s.startswith("tag:"):
        return Alias("tag", s)
    if "@" in s:
        return Alias("user", lo.removeprefix("user:"))
    if lo in policy.hosts:
        return Alias("ip", lo, policy.hosts[lo])
    return Alias("ip", s, ipaddress.ip_network(s, strict=False))


__all__ = [
    "INTERNET",
    "INTERNET_DSTS",
    "INTERNET_RANGES",
    "Changes",
    "Compiled",
    "check_tests",
    "class_key",
    "compile_filter",
]
