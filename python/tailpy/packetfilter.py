"""Packet filter rules as control sends them to a node: Tailscale's ``tailcfg.FilterRule`` shape.

A node's filter is a list of rules; an inbound packet (decrypted, from a peer) is allowed when some rule
has its source address in ``src_ips``, its destination address and port in one of ``dst_ports``, and its
IP protocol in ``ip_proto``. JSON (as tailcfg writes it, and as ``tailpy control policy filter`` prints it)::

    {"SrcIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
     "DstPorts": [{"IP": "100.64.0.2/32", "Ports": {"First": 22, "Last": 22}}],
     "IPProto": [6]}

``SrcIPs`` entries are ``"*"`` (any source), an IP address, a CIDR prefix or an inclusive range
``"first-last"``; ``DstPorts[].IP`` the same; ``Ports`` an inclusive port range (``0-65535`` for all).
``IPProto`` lists IANA protocol numbers; empty or absent means Tailscale's default set: TCP (6), UDP (17),
ICMPv4 (1) and ICMPv6 (58). The stateful parts (TCP connections, UDP replies, ICMP) are the data plane's,
not the rules': see ``rust/tailpy-core/src/filter.rs``.

Named parts (Tailscale's ``MapResponse.PacketFilters``): control may send a filter as named lists of rules,
``{"name": [FilterRule, ...]}``; a later update names only the parts that changed (``null`` deletes a part,
the key ``"*"`` first clears every part). The filter is the parts' rules concatenated in name order
(:func:`combine_parts`). tailpy's control sends one part per policy rule and :data:`ALLOW_ALL` as the part
:data:`ALLOW_ALL_PART`.

A netmap with no filter (``packet_filter`` None) comes from a control server that sends none: the node
allows everything, as it did before filters existed. Control with no policy set sends :data:`ALLOW_ALL`.
Source: tailscale ``tailcfg/tailcfg.go`` (FilterRule, NetPortRange, PortRange).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tailpy.errors import ParseError

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
DEFAULT_PROTOS = (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6)
"""What an empty ``IPProto`` means (tailcfg.FilterRule)."""


@dataclass(frozen=True)
class PortRange:
    """Inclusive port range, each end 0-65535."""

    first: int = 0
    last: int = 65535

    def to_json(self) -> dict[str, int]:
        return {"First": self.first, "Last": self.last}

    @classmethod
    def from_json(cls, obj: Any) -> PortRange:
        if not isinstance(obj, Mapping):
            raise ParseError("malformed filter rule: 'Ports' must be an object")
        first, last = obj.get("First", 0), obj.get("Last", 0)
        if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in (first, last)):
            raise ParseError("malformed filter rule: ports must be integers 0-65535")
        if first > last:
            raise ParseError(f"malformed filter rule: port range {first}-{last} is empty")
        return cls(first, last)


ALL_PORTS = PortRange(0, 65535)


@dataclass(frozen=True)
class NetPortRange:
    """A destination: ``ip`` is ``"*"``, an address, a CIDR prefix or a ``"first-last"`` range."""

    ip: str
    ports: PortRange = ALL_PORTS

    def to_json(self) -> dict[str, Any]:
        return {"IP": self.ip, "Ports": self.ports.to_json()}

    @classmethod
    def from_json(cls, obj: Any) -> NetPortRange:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("IP"), str):
            raise ParseError("malformed filter rule: a 'DstPorts' entry needs an 'IP' string")
        return cls(obj["IP"], PortRange.from_json(obj.get("Ports", {"First": 0, "Last": 65535})))


@dataclass(frozen=True)
class FilterRule:
    """One rule of a node's packet filter (tailcfg.FilterRule; ``CapGrant`` is not carried)."""

    src_ips: tuple[str, ...]
    dst_ports: tuple[NetPortRange, ...]
    ip_proto: tuple[int, ...] = ()  # empty: DEFAULT_PROTOS

    def protocols(self) -> tuple[int, ...]:
        """The IP protocols this rule admits (``ip_proto``, or the default set when empty)."""
        return self.ip_proto or DEFAULT_PROTOS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"SrcIPs": list(self.src_ips)}
        out["DstPorts"] = [d.to_json() for d in self.dst_ports]
        if self.ip_proto:
            out["IPProto"] = list(self.ip_proto)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> FilterRule:
        """Raises ParseError for a missing or mistyped field."""
        if not isinstance(obj, Mapping):
            raise ParseError("malformed filter rule: not an object")
        src, dst, proto = obj.get("SrcIPs", []), obj.get("DstPorts", []), obj.get("IPProto") or []
        if not isinstance(src, list) or not all(isinstance(s, str) for s in src):
            raise ParseError("malformed filter rule: 'SrcIPs' must be a list of strings")
        if not isinstance(dst, list):
            raise ParseError("malformed filter rule: 'DstPorts' must be a list")
        if not isinstance(proto, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 255 for p in proto
        ):
            raise ParseError("malformed filter rule: 'IPProto' must be a list of protocol numbers 0-255")
        return cls(tuple(src), tuple(NetPortRange.from_json(d) for d in dst), tuple(proto))


ALLOW_ALL: tuple[FilterRule, ...] = (FilterRule(("*",), (NetPortRange("*", ALL_PORTS),)),)
"""The filter of a tailnet without a policy: every source may reach every port (Tailscale's default)."""


ALLOW_ALL_PART = "allow-all"
"""The name under which control sends :data:`ALLOW_ALL` as a named part."""

CLEAR_PARTS = "*"
"""In an update of named parts: clear every part first (its value is ignored)."""

NamedParts = Mapping[str, tuple[FilterRule, ...]]


def combine_parts(parts: NamedParts) -> tuple[FilterRule, ...]:
    """The filter named parts stand for: their rules concatenated in name order (as Tailscale's client
    does; order does not change what a filter allows)."""
    return tuple(r for name in sorted(parts) for r in parts[name])


def update_parts(
    parts: NamedParts | None, update: Mapping[str, tuple[FilterRule, ...] | None]
) -> dict[str, tuple[FilterRule, ...]]:
    """``parts`` (None: none yet) with ``update`` applied: :data:`CLEAR_PARTS` clears them first, a
    ``None`` value deletes a part, a list sets it. Pure."""
    out = {} if parts is None or CLEAR_PARTS in update else dict(parts)
    for name, rules in update.items():
        if name == CLEAR_PARTS:
            continue
        if rules is None:
            out.pop(name, None)
        else:
            out[name] = rules
    return out


def parts_to_json(parts: Mapping[str, tuple[FilterRule, ...] | None]) -> dict[str, Any]:
    return {k: None if v is None else filter_to_json(v) for k, v in parts.items()}


def parts_from_json(obj: Any, *, updates: bool = False) -> dict[str, tuple[FilterRule, ...] | None]:
    """Parse ``{"name": [FilterRule] | null}`` (``null`` and ``"*"`` only when ``updates``). Raises
    ParseError."""
    if not isinstance(obj, Mapping):
        raise ParseError("malformed packet filter: named parts must be an object")
    out: dict[str, tuple[FilterRule, ...] | None] = {}
    for name, rules in obj.items():
        if updates and (rules is None or name == CLEAR_PARTS):
            out[name] = None
        else:
            out[name] = filter_from_json(rules)
    return out


def filter_to_json(rules: tuple[FilterRule, ...]) -> list[dict[str, Any]]:
    return [r.to_json() for r in rules]


def filter_from_json(obj: Any) -> tuple[FilterRule, ...]:
    """Parse a list of FilterRule objects. Raises ParseError."""
    if not isinstance(obj, list):
        raise ParseError("malformed packet filter: not a list of rules")
    return tuple(FilterRule.from_json(r) for r in obj)


__all__ = [
    "ALLOW_ALL",
    "ALLOW_ALL_PART",
    "ALL_PORTS",
    "CLEAR_PARTS",
    "DEFAULT_PROTOS",
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "FilterRule",
    "NamedParts",
    "NetPortRange",
    "PortRange",
    "combine_parts",
    "filter_from_json",
    "filter_to_json",
    "parts_from_json",
    "parts_to_json",
    "update_parts",
]
