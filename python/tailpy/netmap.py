"""The netmap: what a node knows of its tailnet (itself and its peers), and how two netmaps differ.

The control server sends it (``tailpy.control``); the daemon applies each change to the data plane
(``tailpy.daemon``). Wire form: JSON objects with the field names below; keys in their text forms
(``nodekey:<hex>``, ``mkey:<hex>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.errors import ParseError
from tailpy.keys import MachinePublic, NodePublic


@dataclass(frozen=True)
class Node:
    """One node of the tailnet as the netmap shows it.

    ``addresses`` are the node's tailnet addresses as CIDR host prefixes ("100.64.0.1/32",
    "fd7a:115c:a1e0::1/128"); ``endpoints`` are "ip:port" / "[ipv6]:port" UDP endpoints where its data plane
    may be reached; ``last_seen`` unix seconds or None.
    """

    id: int
    name: str  # DNS label given by control, unique in the tailnet
    hostname: str  # what the node asked for
    node_key: NodePublic
    machine_key: MachinePublic
    addresses: tuple[str, ...]
    endpoints: tuple[str, ...] = ()
    online: bool = False
    last_seen: float | None = None
    user: str = ""  # owner's login name; empty for a tagged node
    tags: tuple[str, ...] = ()  # "tag:server", ...; a tagged node has no user
    os: str = ""  # "linux", as the node reports it
    key_expiry: float | None = None  # unix seconds when the node key expires; None = never
    expired: bool = False  # the node key has expired (peers must not talk to it)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "hostname": self.hostname,
            "node_key": self.node_key.text(),
            "machine_key": self.machine_key.text(),
            "addresses": list(self.addresses),
            "endpoints": list(self.endpoints),
            "online": self.online,
            "last_seen": self.last_seen,
            "user": self.user,
            "tags": list(self.tags),
            "os": self.os,
            "key_expiry": self.key_expiry,
            "expired": self.expired,
        }

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
                endpoints=tuple(str(e) for e in obj.get("endpoints", ())),
                online=bool(obj.get("online", False)),
                last_seen=None if obj.get("last_seen") is None else float(obj["last_seen"]),
                user=str(obj.get("user", "")),
                tags=tuple(str(t) for t in obj.get("tags", ())),
                os=str(obj.get("os", "")),
                key_expiry=None if obj.get("key_expiry") is None else float(obj["key_expiry"]),
                expired=bool(obj.get("expired", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ParseError(f"malformed node in netmap: {e}") from None

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


@dataclass(frozen=True)
class NetMap:
    """A node's view: itself, its peers (by node id), and the tailnet's DNS domain."""

    self_node: Node
    peers: Mapping[int, Node] = field(default_factory=dict)
    domain: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "self": self.self_node.to_json(),
            "peers": [p.to_json() for p in sorted(self.peers.values(), key=lambda n: n.id)],
            "domain": self.domain,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NetMap:
        try:
            peers = [Node.from_json(p) for p in obj["peers"]]
            return cls(Node.from_json(obj["self"]), {p.id: p for p in peers}, str(obj.get("domain", "")))
        except (KeyError, TypeError) as e:
            raise ParseError(f"malformed netmap: {e}") from None

    def with_peers(self, peers: Iterable[Node]) -> NetMap:
        return NetMap(self.self_node, {p.id: p for p in peers}, self.domain)


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


__all__ = ["NetMap", "NetMapDiff", "Node", "diff"]
