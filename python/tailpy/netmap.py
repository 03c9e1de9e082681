"""The netmap: what a node knows of its tailnet (itself and its peers), and how two netmaps differ.

The control server sends it (``tailpy.control``); the daemon applies each change to the data plane
(``tailpy.daemon``). Wire form: JSON objects with the field names below; keys in their text forms
(``nodekey:<hex>``, ``mkey:<hex>``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.dns.config import DNSConfig
from tailpy.endpoint import Endpoint, parse_valid
from tailpy.errors import InvalidKeyError, ParseError
from tailpy.keys import DiscoPublic, MachinePublic, NodePublic
from tailpy.packetfilter import (
    CLEAR_PARTS,
    FilterRule,
    NamedParts,
    combine_parts,
    filter_from_json,
    filter_to_json,
    parts_from_json,
    parts_to_json,
    update_parts,
)
from tailpy.routes import has_exit_routes


@dataclass(frozen=True)
class Node:
    """One node of the tailnet as the netmap shows it.

    ``addresses`` are the node's tailnet addresses as CIDR host prefixes ("100.64.0.1/32",
    "fd7a:115c:a1e0::1/128"); ``endpoints`` the UDP endpoints where its data plane may be reached (JSON:
    "ip:port" / "[ipv6]:port" strings; one that does not parse is skipped, not the node); ``last_seen`` unix
    seconds or None; ``disco_key`` the node's current disco public key (a new one each time its daemon
    starts; JSON ``"discokey:<hex>"``), None when the node sent none (an old node: peers fall back to a
    path policy without disco).

    Routes (:mod:`tailpy.routes`; CIDR prefixes in canonical text): ``routable_ips`` the routes the node
    advertises (Tailscale's ``Hostinfo.RoutableIPs``, exit routes included); ``approved_routes`` those of
    them control approved; ``primary_routes`` the subnet routes this node is the primary router for
    (``tailcfg.Node.PrimaryRoutes``); ``allowed_ips`` what the recipient may send to this node
    (``tailcfg.Node.AllowedIPs``: its addresses, its primary routes the recipient may use, and the exit
    routes when it is an approved exit node the recipient may use); None (absent on the wire) means the
    addresses alone: read it through :meth:`effective_allowed_ips`.
    """

    id: int
    name: str  # DNS label given by control, unique in the tailnet
    hostname: str  # what the node asked for
    node_key: NodePublic
    machine_key: MachinePublic
    addresses: tuple[str, ...]
    endpoints: tuple[Endpoint, ...] = ()
    online: bool = False
    last_seen: float | None = None
    user: str = ""  # owner's login name; empty for a tagged node
    tags: tuple[str, ...] = ()  # "tag:server", ...; a tagged node has no user
    os: str = ""  # "linux", as the node reports it
    key_expiry: float | None = None  # unix seconds when the node key expires; None = never
    expired: bool = False  # the node key has expired (peers must not talk to it)
    home_derp: int = 0  # DERP region id of the node's home relay; 0 = none
    disco_key: DiscoPublic | None = None
    name_by_admin: bool = False  # an admin gave the name (`nodes rename`): a new hostname does not change it
    allowed_ips: tuple[str, ...] | None = None  # None: the addresses (see effective_allowed_ips)
    primary_routes: tuple[str, ...] = ()
    routable_ips: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "hostname": self.hostname,
            "node_key": self.node_key.text(),
            "machine_key": self.machine_key.text(),
            "addresses": list(self.addresses),
            "endpoints": [str(e) for e in self.endpoints],
            "online": self.online,
            "last_seen": self.last_seen,
            "user": self.user,
            "tags": list(self.tags),
            "os": self.os,
            "key_expiry": self.key_expiry,
            "expired": self.expired,
            "home_derp": self.home_derp,
        }
        if self.disco_key is not None:
            out["disco_key"] = self.disco_key.text()
        if self.name_by_admin:
            out["name_by_admin"] = True
        if self.allowed_ips is not None:
            out["allowed_ips"] = list(self.allowed_ips)
        if self.primary_routes:
            out["primary_routes"] = list(self.primary_routes)
        if self.routable_ips:
            out["routable_ips"] = list(self.routable_ips)
        if self.approved_routes:
            out["approved_routes"] = list(self.approved_routes)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Node:
        """Raises ParseError for a missing or mistyped field."""
        try:
            return cls(
                id=int(obj["id"]),
                name=str(obj["name"]),
                hostname=str(obj["hostname"]),
                node_key=NodePublic.from_text(str(obj["node_key"])),
                machine_key=MachinePublic.from_text(str(obj["machine_key"])),
                addresses=tuple(str(a) for a in obj["addresses"]),
                endpoints=parse_valid(obj.get("endpoints", ())),
                online=bool(obj.get("online", False)),
                last_seen=None if obj.get("last_seen") is None else float(obj["last_seen"]),
                user=str(obj.get("user", "")),
                tags=tuple(str(t) for t in obj.get("tags", ())),
                os=str(obj.get("os", "")),
                key_expiry=None if obj.get("key_expiry") is None else float(obj["key_expiry"]),
                expired=bool(obj.get("expired", False)),
                home_derp=parse_home_derp(obj.get("home_derp", 0)),
                disco_key=parse_disco_key(obj.get("disco_key")),
                name_by_admin=bool(obj.get("name_by_admin", False)),
                allowed_ips=None if obj.get("allowed_ips") is None else _prefixes(obj, "allowed_ips"),
                primary_routes=_prefixes(obj, "primary_routes"),
                routable_ips=_prefixes(obj, "routable_ips"),
                approved_routes=_prefixes(obj, "approved_routes"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ParseError(f"malformed node in netmap: {e}") from None

    def patched(self, patch: Mapping[str, Any]) -> Node:
        """This record with ``patch`` applied: ``{"id": id, field: value, ...}``, fields in :meth:`to_json`'s
        names and forms (a map stream's ``peers_patched``, see :mod:`tailpy.proto.mapcodec`). Raises
        ParseError for another node's patch or a malformed field."""
        if patch.get("id") != self.id:
            raise ParseError(f"a peer patch for node {patch.get('id')!r} applied to node {self.id}")
        return Node.from_json({**self.to_json(), **patch})

    def effective_allowed_ips(self) -> tuple[str, ...]:
        """:attr:`allowed_ips`, or the addresses when control sent none."""
        return self.addresses if self.allowed_ips is None else self.allowed_ips

    def exit_node_option(self) -> bool:
        """Whether the recipient may use this node as its exit node: both exit routes are in its allowed IPs
        (Tailscale's ``tsaddr.ContainsExitRoutes(peer.AllowedIPs)``)."""
        return has_exit_routes(self.effective_allowed_ips())

    def fqdn(self, domain: str) -> str:
        """``<name>.<domain>`` (just the name when the domain is empty)."""
        return f"{self.name}.{domain}" if domain else self.name

    @property
    def ipv4(self) -> str | None:
        for a in self.addresses:
            if ":" not in a:
                return a.split("/")[0]
        return None

    @property
    def ipv6(self) -> str | None:
        for a in self.addresses:
            if ":" in a:
                return a.split("/")[0]
        return None


def _prefixes(obj: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A list of CIDR prefixes from the wire, canonicalised. Raises ParseError."""
    v = obj.get(name) or ()
    if not isinstance(v, list | tuple):
        raise ParseError(f"field {name!r} must be a list of CIDR prefixes, not {v!r}")
    out = []
    for p in v:
        if not isinstance(p, str):
            raise ParseError(f"field {name!r} must hold CIDR prefix strings, not {p!r}")
        try:
            out.append(str(ipaddress.ip_network(p, strict=False)))
        except ValueError:
            raise ParseError(f"field {name!r}: {p!r} is not a CIDR prefix") from None
    return tuple(out)


def parse_disco_key(v: object) -> DiscoPublic | None:
    """A disco public key from the wire: ``"discokey:<64 hex>"``, or None for null / absent.
    Raises ParseError."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ParseError(f'disco_key must be a "discokey:<hex>" string, not {v!r}')
    try:
        return DiscoPublic.from_text(v)
    except InvalidKeyError as e:
        raise ParseError(f"disco_key: {e}") from None


MAX_REGION_ID = (1 << 31) - 1
"""Largest DERP region id (tailcfg's RegionID is a Go int; JSON peers keep to int32)."""


def parse_home_derp(v: object) -> int:
    """Validate a home DERP region id from the wire: an integer 0 (none) .. :data:`MAX_REGION_ID`.
    Raises ParseError."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_REGION_ID:
        raise ParseError(f"home_derp must be a DERP region id (0 .. {MAX_REGION_ID}), not {v!r}")
    return v


def _int_field(obj: Mapping[str, Any], name: str, default: int | None = None) -> int:
    v = obj.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ParseError(f"field {name!r} must be an integer, not {v!r}")
    return v


def _str_field(obj: Mapping[str, Any], name: str, default: str | None = None) -> str:
    v = obj.get(name, default)
    if not isinstance(v, str):
        raise ParseError(f"field {name!r} must be a string, not {v!r}")
    return v


@dataclass(frozen=True)
class DerpNode:
    """One DERP relay server of a region (Tailscale's ``tailcfg.DERPNode``).

    ``derp_port`` 0 means 443; ``stun_port`` 0 means 3478 and -1 no STUN; ``ipv4`` / ``ipv6`` empty: resolve
    ``host_name``. ``insecure_for_tests``: a lab or test relay; tailpy reaches such a node over plain HTTP
    (the embedded relay of ``tailpy control serve`` has no certificate), any other over HTTPS.
    """

    name: str
    region_id: int
    host_name: str
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    derp_port: int = 0
    insecure_for_tests: bool = False

    def url(self) -> str:
        """``http(s)://host:port/derp`` for :meth:`tailpy.derp.client.DerpClient.connect`: the IPv4 address
        when given, else the IPv6 one, else the host name."""
        host = self.ipv4 or (f"[{self.ipv6}]" if self.ipv6 else self.host_name)
        scheme = "http" if self.insecure_for_tests else "https"
        return f"{scheme}://{host}:{self.derp_port or 443}/derp"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        if self.ipv4:
            out["IPv4"] = self.ipv4
        if self.ipv6:
            out["IPv6"] = self.ipv6
        if self.stun_port:
            out["STUNPort"] = self.stun_port
        if self.derp_port:
            out["DERPPort"] = self.derp_port
        if self.insecure_for_tests:
            out["InsecureForTests"] = True
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DerpNode:
        """Raises ParseError for a missing or mistyped field (absent optional fields are Go's zero values)."""
        if not isinstance(obj, Mapping):
            raise ParseError(f"a DERP node must be an object, not {obj!r}")
        insecure = obj.get("InsecureForTests", False)
        if not isinstance(insecure, bool):
            raise ParseError(f"field 'InsecureForTests' must be true or false, not {insecure!r}")
        node = cls(
            name=_str_field(obj, "Name"),
            region_id=_int_field(obj, "RegionID"),
            host_name=_str_field(obj, "HostName"),
            ipv4=_str_field(obj, "IPv4", ""),
            ipv6=_str_field(obj, "IPv6", ""),
            stun_port=_int_field(obj, "STUNPort", 0),
            derp_port=_int_field(obj, "DERPPort", 0),
            insecure_for_tests=insecure,
        )
        if not 0 <= node.derp_port < 65536 or not -1 <= node.stun_port < 65536:
            raise ParseError(f"DERP node {node.name!r} has a port out of range")
        return node


@dataclass(frozen=True)
class DerpRegion:
    """A DERP region (Tailscale's ``tailcfg.DERPRegion``): id, short code, display name, its nodes."""

    region_id: int
    region_code: str
    region_name: str = ""
    nodes: tuple[DerpNode, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
            "Nodes": [n.to_json() for n in self.nodes],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DerpRegion:
        if not isinstance(obj, Mapping):
            raise ParseError(f"a DERP region must be an object, not {obj!r}")
        nodes = obj.get("Nodes") or []
        if not isinstance(nodes, list):
            raise ParseError("field 'Nodes' must be a list of DERP nodes")
        return cls(
            region_id=_int_field(obj, "RegionID"),
            region_code=_str_field(obj, "RegionCode"),
            region_name=_str_field(obj, "RegionName", ""),
            nodes=tuple(DerpNode.from_json(n) for n in nodes),
        )


@dataclass(frozen=True)
class DerpMap:
    """The DERP relays a node may use (Tailscale's ``tailcfg.DERPMap``), regions by region id.

    JSON as Tailscale writes it: ``{"Regions": {"900": {"RegionID": 900, "RegionCode": ..., "RegionName":
    ..., "Nodes": [{"Name", "RegionID", "HostName", "IPv4"?, "IPv6"?, "STUNPort"?, "DERPPort"?,
    "InsecureForTests"?}]}}}``; other keys (``OmitDefaultRegions``, a region's ``Avoid``) are ignored.
    """

    regions: Mapping[int, DerpRegion] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"Regions": {str(i): r.to_json() for i, r in sorted(self.regions.items())}}

    @classmethod
    def from_json(cls, obj: Any) -> DerpMap:
        """Raises ParseError (one sentence) for anything that is not a DERP map."""
        if not isinstance(obj, Mapping):
            raise ParseError("a DERP map must be a JSON object with 'Regions'")
        regions = obj.get("Regions")
        if not isinstance(regions, Mapping):
            raise ParseError("a DERP map needs 'Regions': an object of regions keyed by region id")
        out: dict[int, DerpRegion] = {}
        for key, r in regions.items():
            region = DerpRegion.from_json(r)
            if str(region.region_id) != str(key):
                raise ParseError(f"DERP region {key!r} has RegionID {region.region_id}")
            if any(n.region_id != region.region_id for n in region.nodes):
                raise ParseError(f"DERP region {key} has a node of another region")
            out[region.region_id] = region
        return cls(out)

    def merged(self, other: DerpMap) -> DerpMap:
        """Both maps' regions. Raises ParseError when a region id is in both."""
        both = sorted(set(self.regions) & set(other.regions))
        if both:
            raise ParseError(f"DERP region {both[0]} is defined twice")
        return DerpMap({**self.regions, **other.regions})


@dataclass(frozen=True)
class NetMap:
    """A node's view: itself, its peers (by node id), the tailnet's DNS domain, the DERP relays (None:
    control sent no DERP map), the DNS configuration (None: control sent none; MagicDNS defaults) and the
    packet filter for traffic to this node (None: control sent none, everything is allowed; see
    :mod:`tailpy.packetfilter`). ``packet_filters``: the filter's named parts when control sent it that way
    (then ``packet_filter`` is their combination, filled in when not given), else None."""

    self_node: Node
    peers: Mapping[int, Node] = field(default_factory=dict)
    domain: str = ""
    derp_map: DerpMap | None = None
    dns: DNSConfig | None = None
    packet_filter: tuple[FilterRule, ...] | None = None
    packet_filters: NamedParts | None = None

    def __post_init__(self) -> None:
        if self.packet_filters is not None and self.packet_filter is None:
            object.__setattr__(self, "packet_filter", combine_parts(self.packet_filters))

    def to_json(self) -> dict[str, Any]:
        """``{"self", "peers", "domain", "derp_map"?, "dns"?, "packet_filter"? | "packet_filters"?}`` (the
        optional parts only when there is one; ``dns``: :class:`tailpy.dns.config.DNSConfig`;
        ``packet_filter``: a list of tailcfg.FilterRule objects; ``packet_filters``: name -> such a list)."""
        out = {
            "self": self.self_node.to_json(),
            "peers": [p.to_json() for p in sorted(self.peers.values(), key=lambda n: n.id)],
            "domain": self.domain,
        }
        if self.derp_map is not None:
            out["derp_map"] = self.derp_map.to_json()
        if self.dns is not None:
            out["dns"] = self.dns.to_json()
        if self.packet_filters is not None:
            out["packet_filters"] = parts_to_json(self.packet_filters)
        elif self.packet_filter is not None:
            out["packet_filter"] = filter_to_json(self.packet_filter)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NetMap:
        try:
            peers = [Node.from_json(p) for p in obj["peers"]]
            dm = obj.get("derp_map")
            dns = obj.get("dns")
            pf = obj.get("packet_filter")
            named = obj.get("packet_filters")
            parts = None if named is None else update_parts(None, parts_from_json(named))
            me = Node.from_json(obj["self"])
            return cls(
                me,
                {p.id: p for p in peers if p.id != me.id},  # (a shared peer list may hold the recipient)
                str(obj.get("domain", "")),
                None if dm is None else DerpMap.from_json(dm),
                None if dns is None else DNSConfig.from_json(dns),
                None if pf is None or parts is not None else filter_from_json(pf),
                parts,
            )
        except (KeyError, TypeError) as e:
            raise ParseError(f"malformed netmap: {e}") from None

    def with_peers(self, peers: Iterable[Node]) -> NetMap:
        return dataclasses.replace(self, peers={p.id: p for p in peers})


@dataclass(frozen=True)
class NetMapDiff:
    """What changed between two netmaps, as the data plane needs it: peers added, removed (by node id), and
    changed (same id, new key, addresses or endpoints)."""

    added: tuple[Node, ...] = ()
    removed: tuple[Node, ...] = ()
    changed: tuple[tuple[Node, Node], ...] = ()  # (old, new)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff(old: NetMap | None, new: NetMap) -> NetMapDiff:
    """Peers added, removed and changed from ``old`` to ``new`` (``old`` None: all are added)."""
    before: Mapping[int, Node] = old.peers if old is not None else {}
    added = tuple(n for i, n in sorted(new.peers.items()) if i not in before)
    removed = tuple(n for i, n in sorted(before.items()) if i not in new.peers)
    changed = tuple((before[i], n) for i, n in sorted(new.peers.items()) if i in before and before[i] != n)
    return NetMapDiff(added, removed, changed)


@dataclass(frozen=True)
class MapDelta:
    """An incremental netmap change as the map stream carries it (``{"type": "delta", ...}``).

    ``self_node``: the recipient's own new record, or None if unchanged; ``changed``: peers added or changed
    (full new records; a peer id the recipient does not know is an addition); ``removed``: ids of peers that
    left the tailnet or are no longer visible to the recipient (unknown ids are ignored); ``packet_filter``:
    the recipient's whole new packet filter, or None if unchanged; ``packet_filters``: the named parts of
    its filter that changed (name -> rules, None to delete, ``"*"`` first clears them all; see
    :func:`tailpy.packetfilter.update_parts`), or None. ``version``: the server's change counter
    after this delta (what a client sends back to resume), 0 when unknown. ``patched``: field patches of
    peers the recipient holds (``{"id": id, field: value, ...}``, applied after ``changed``; see
    :mod:`tailpy.proto.mapcodec`). ``derp_map``: the server's new DERP map (Tailscale's
    ``MapResponse.DERPMap`` in a delta), or None if unchanged; sent only to clients that name
    ``"derp_map"`` in their map request's ``accept``.
    """

    version: int = 0
    self_node: Node | None = None
    changed: tuple[Node, ...] = ()
    removed: tuple[int, ...] = ()
    packet_filter: tuple[FilterRule, ...] | None = None
    packet_filters: Mapping[str, tuple[FilterRule, ...] | None] | None = None
    patched: tuple[Mapping[str, Any], ...] = ()
    derp_map: DerpMap | None = None

    def __bool__(self) -> bool:
        return bool(
            self.self_node is not None
            or self.derp_map is not None
            or self.changed
            or self.patched
            or self.removed
            or self.packet_filter is not None
            or self.packet_filters
        )

    def to_json(self) -> dict[str, Any]:
        """``{"type": "delta", "version": int, "self"?: Node, "peers_changed"?: [Node], "peers_removed"?:
        [int], "packet_filter"?: [FilterRule], "packet_filters"?: {name: [FilterRule] | null}, "derp_map"?:
        DERPMap}`` (empty parts omitted)."""
        out: dict[str, Any] = {"type": "delta", "version": self.version}
        if self.self_node is not None:
            out["self"] = self.self_node.to_json()
        if self.changed:
            out["peers_changed"] = [n.to_json() for n in self.changed]
        if self.patched:
            out["peers_patched"] = [dict(p) for p in self.patched]
        if self.removed:
            out["peers_removed"] = list(self.removed)
        if self.packet_filter is not None:
            out["packet_filter"] = filter_to_json(self.packet_filter)
        if self.packet_filters:
            out["packet_filters"] = parts_to_json(self.packet_filters)
        if self.derp_map is not None:
            out["derp_map"] = self.derp_map.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> MapDelta:
        """Parse :meth:`to_json`'s form. Raises ParseError for a missing or mistyped field."""
        try:
            me = obj.get("self")
            removed = obj.get("peers_removed", [])
            if not isinstance(removed, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in removed
            ):
                raise ParseError("malformed delta: 'peers_removed' must be a list of node ids")
            changed = obj.get("peers_changed", [])
            if not isinstance(changed, list):
                raise ParseError("malformed delta: 'peers_changed' must be a list of nodes")
            version = obj.get("version", 0)
            if not isinstance(version, int) or isinstance(version, bool):
                raise ParseError("malformed delta: 'version' must be an integer")
            patched = obj.get("peers_patched", [])
            if not isinstance(patched, list) or not all(
                isinstance(p, dict) and isinstance(p.get("id"), int) and not isinstance(p["id"], bool)
                for p in patched
            ):
                raise ParseError("malformed delta: 'peers_patched' must be a list of objects with an 'id'")
            pf = obj.get("packet_filter")
            named = obj.get("packet_filters")
            derp = obj.get("derp_map")
            return cls(
                version,
                None if me is None else Node.from_json(me),
                tuple(Node.from_json(n) for n in changed),
                tuple(removed),
                None if pf is None else filter_from_json(pf),
                None if named is None else parts_from_json(named, updates=True),
                tuple(patched),
                None if derp is None else DerpMap.from_json(derp),
            )
        except (AttributeError, TypeError) as e:
            raise ParseError(f"malformed delta: {e}") from None


def delta(old: NetMap, new: NetMap, version: int = 0) -> MapDelta:
    """The delta that turns ``old`` into ``new`` (pure; O(peers)): ``apply_delta(old, delta(old, new)) ==
    new`` for netmaps of the same domain and DNS config (a DERP map is replaced, never taken away)."""
    changed = tuple(n for i, n in sorted(new.peers.items()) if old.peers.get(i) != n)
    removed = tuple(i for i in sorted(old.peers) if i not in new.peers)
    me = None if old.self_node == new.self_node else new.self_node
    derp = None if old.derp_map == new.derp_map else new.derp_map  # (a DERP map cannot be taken away)
    if new.packet_filters is not None:
        if old.packet_filters is None:
            parts: dict[str, tuple[FilterRule, ...] | None] = {CLEAR_PARTS: None, **new.packet_filters}
        else:
            parts = {k: v for k, v in new.packet_filters.items() if old.packet_filters.get(k) != v}
            parts.update((k, None) for k in old.packet_filters if k not in new.packet_filters)
        return MapDelta(version, me, changed, removed, None, parts or None, derp_map=derp)
    pf = None if old.packet_filter == new.packet_filter else new.packet_filter
    return MapDelta(version, me, changed, removed, pf, derp_map=derp)


def apply_delta(old: NetMap, d: MapDelta) -> NetMap:
    """``old`` with ``d`` applied (pure: ``old`` is not modified; O(peers) for the copy). A changed peer that
    is the recipient itself (same id as ``old.self_node``) is ignored, as is the removal of an unknown id.
    The DNS config is kept (deltas never carry it), the DERP map unless the delta carries a new one; a
    delta's packet filter replaces the old one, its named parts update the old ones."""
    peers = dict(old.peers)
    for i in d.removed:
        peers.pop(i, None)
    for n in d.changed:
        if n.id != old.self_node.id:
            peers[n.id] = n
    for p in d.patched:  # (a patch for a peer not held is ignored, as the removal of an unknown id)
        peer = peers.get(p["id"])
        if peer is not None:
            peers[peer.id] = peer.patched(p)
    me = d.self_node if d.self_node is not None else old.self_node
    derp = d.derp_map if d.derp_map is not None else old.derp_map
    if d.packet_filters:
        parts = update_parts(old.packet_filters, d.packet_filters)
        return NetMap(me, peers, old.domain, derp, old.dns, None, parts)
    if d.packet_filter is not None:
        return NetMap(me, peers, old.domain, derp, old.dns, d.packet_filter)
    return NetMap(me, peers, old.domain, derp, old.dns, old.packet_filter, old.packet_filters)


__all__ = [
    "MAX_REGION_ID",
    "DerpMap",
    "DerpNode",
    "DerpRegion",
    "MapDelta",
    "NetMap",
    "NetMapDiff",
    "Node",
    "apply_delta",
    "delta",
    "diff",
    "parse_home_derp",
]
