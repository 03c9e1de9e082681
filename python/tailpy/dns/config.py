"""The tailnet's DNS configuration as control stores it and sends it in every full netmap.

Wire form (the netmap's ``"dns"`` object; every field optional, absent = the default)::

    {"magic_dns": true,                                  # answer <name>.<tailnet domain> on 100.100.100.100
     "nameservers": ["192.0.2.53", "[2001:db8::53]:5353"],   # upstreams for every other name
     "routes": {"corp.example": ["198.51.100.53"]},       # split DNS: names under a domain -> its resolvers
     "search_domains": ["corp.example"],                  # the host's search list, after the tailnet domain
     "extra_records": [{"name": "www.ts.test", "type": "A", "value": "100.64.0.9"}]}

The tailnet domain itself is the netmap's ``domain``. A resolver is "ip" (port 53) or "ip:port" /
"[ipv6]:port". With no ``nameservers`` a node forwards to the resolvers its host used before tailpy.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.errors import ParseError

RECORD_TYPES = ("A", "AAAA")
"""Types an extra record may have."""

MAX_ITEMS = 256
"""Most nameservers, routes, search domains or extra records a configuration may hold."""

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_resolver(text: str) -> tuple[IPAddress, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::53"`` or ``"[2001:db8::53]:5353"`` -> (address,
    UDP/TCP port; 53 when none is given). Raises ParseError (one sentence)."""
    t = text.strip()
    host, port = t, "53"
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
        if not sep:
            host, port = t[1:].rstrip("]"), "53"
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ParseError(f"resolver {text!r} is not an IP address (optionally with :port)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ParseError(f"resolver {text!r} has no valid port")
    return ip, int(port)


def format_resolver(ip: IPAddress, port: int) -> str:
    """The canonical text of a resolver: "ip" for port 53, else "ip:port" / "[ipv6]:port"."""
    if port == 53:
        return str(ip)
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def check_domain(text: str, what: str = "domain") -> str:
    """``text`` lowercased without a trailing dot if it is a DNS name of 1-63 character labels (letters,
    digits, ``-``, ``_``), at most 253 characters. Raises ParseError."""
    d = text.strip().lower().rstrip(".")
    if not d or len(d) > 253 or not all(_LABEL.fullmatch(p) for p in d.split(".")):
        raise ParseError(f"{what} {text!r} is not a DNS name like corp.example")
    return d


@dataclass(frozen=True)
class ExtraRecord:
    """A record control adds to MagicDNS: ``name`` (a DNS name, lowercase, no trailing dot), ``type`` "A" or
    "AAAA", ``value`` an address of that family."""

    name: str
    type: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "value": self.value}

    @classmethod
    def from_json(cls, obj: Any) -> ExtraRecord:
        """Raises ParseError for a malformed record."""
        if not isinstance(obj, Mapping):
            raise ParseError("an extra record must be an object with name, type and value")
        name, rtype, value = obj.get("name"), obj.get("type"), obj.get("value")
        if not isinstance(name, str) or not isinstance(rtype, str) or not isinstance(value, str):
            raise ParseError("an extra record needs string fields name, type and value")
        return cls.make(name, rtype, value)

    @classmethod
    def make(cls, name: str, rtype: str, value: str) -> ExtraRecord:
        """A checked record (name lowercased, type uppercased). Raises ParseError."""
        t = rtype.strip().upper()
        if t not in RECORD_TYPES:
            raise ParseError(f"extra record type {rtype!r} is not one of {', '.join(RECORD_TYPES)}")
        try:
            ip = ipaddress.ip_address(value.strip())
        except ValueError:
            raise ParseError(f"extra record value {value!r} is not an IP address") from None
        if (ip.version == 4) != (t == "A"):
            raise ParseError(
                f"extra record {name} {t} needs an IPv{4 if t == 'A' else 6} address, not {value}"
            )
        return cls(check_domain(name, "extra record name"), t, str(ip))


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    v = obj.get(key, [])
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > MAX_ITEMS:
        raise ParseError(f"DNS config field {key!r} must be a list of at most {MAX_ITEMS} items")
    return v


def _strings(obj: Mapping[str, Any], key: str) -> list[str]:
    items = _list(obj, key)
    if not all(isinstance(i, str) for i in items):
        raise ParseError(f"DNS config field {key!r} must be a list of strings")
    return items


@dataclass(frozen=True)
class DNSConfig:
    """What control says about DNS (see the module docstring for the wire form). Resolvers are kept in
    their canonical text form (:func:`format_resolver`); domains lowercase without a trailing dot."""

    magic_dns: bool = True
    nameservers: tuple[str, ...] = ()
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    search_domains: tuple[str, ...] = ()
    extra_records: tuple[ExtraRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "magic_dns": self.magic_dns,
            "nameservers": list(self.nameservers),
            "routes": {d: list(r) for d, r in sorted(self.routes.items())},
            "search_domains": list(self.search_domains),
            "extra_records": [r.to_json() for r in self.extra_records],
        }

    @classmethod
    def from_json(cls, obj: Any) -> DNSConfig:
        """Parse and check the wire form. Raises ParseError (one sentence) for anything malformed."""
        if not isinstance(obj, Mapping):
            raise ParseError("a DNS config must be a JSON object")
        magic = obj.get("magic_dns", True)
        if not isinstance(magic, bool):
            raise ParseError("DNS config field 'magic_dns' must be true or false")
        routes_obj = obj.get("routes") or {}
        if not isinstance(routes_obj, Mapping) or len(routes_obj) > MAX_ITEMS:
            raise ParseError(f"DNS config field 'routes' must be an object of at most {MAX_ITEMS} domains")
        routes: dict[str, tuple[str, ...]] = {}
        for domain, resolvers in routes_obj.items():
            if not isinstance(domain, str) or not isinstance(resolvers, list) or not resolvers:
                raise ParseError("each DNS route must map a domain to a non-empty list of resolvers")
            if len(resolvers) > MAX_ITEMS or not all(isinstance(r, str) for r in resolvers):
                raise ParseError(f"DNS route {domain!r} must list resolvers as strings")
            routes[check_domain(domain, "split DNS domain")] = tuple(
                format_resolver(*parse_resolver(r)) for r in resolvers
            )
        return cls(
            magic_dns=magic,
            nameservers=tuple(format_resolver(*parse_resolver(r)) for r in _strings(obj, "nameservers")),
            routes=routes,
            search_domains=tuple(check_domain(d, "search domain") for d in _strings(obj, "search_domains")),
            extra_records=tuple(ExtraRecord.from_json(r) for r in _list(obj, "extra_records")),
        )

    @property
    def configures_os(self) -> bool:
        """Whether a node should point its host's resolver at MagicDNS: MagicDNS is on, or control gave
        nameservers or split DNS routes."""
        return self.magic_dns or bool(self.nameservers) or bool(self.routes)


__all__ = [
    "MAX_ITEMS",
    "RECORD_TYPES",
    "DNSConfig",
    "ExtraRecord",
    "check_domain",
    "format_resolver",
    "parse_resolver",
]
