"""The tailnet's DNS configuration in the control database, and the admin operations on it.

Stored as one JSON document (:class:`tailpy.dns.config.DNSConfig` wire form) under the name ``dns`` in the
``settings`` table (see :mod:`tailpy.control.store.settings`); the tailnet domain stays the ``domain``
setting. Admin operations
(see :mod:`tailpy.control.admin`): ``dns.show`` {} -> {domain, magic_dns, nameservers, routes,
search_domains, extra_records}; ``dns.set`` {any of those} -> the same, each given field replacing the
stored one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tailpy.control.store import Store
from tailpy.control.store.settings import DNS_SETTING
from tailpy.dns.config import DNSConfig, parse_resolver
from tailpy.dns.resolver import MAGICDNS_V4, MAGICDNS_V6
from tailpy.errors import ConfigError, ParseError

SETTING = DNS_SETTING
FIELDS = ("magic_dns", "nameservers", "routes", "search_domains", "extra_records")


def load(store: Store) -> DNSConfig:
    """The stored DNS configuration (defaults when none is stored or it cannot be read)."""
    return store.dns_config()


def for_netmap(store: Store) -> DNSConfig | None:
    """What netmaps carry: the stored configuration, or None when it is the default (MagicDNS on, nothing
    else), which nodes assume when a netmap has no ``dns``: default netmaps stay as small as before."""
    cfg = load(store)
    return None if cfg == DNSConfig() else cfg


def save(store: Store, cfg: DNSConfig) -> None:
    """Store ``cfg`` as the DNS configuration."""
    store.set_dns_config(cfg)


def show(store: Store) -> dict[str, Any]:
    """``dns.show``: the domain and the DNS configuration as JSON."""
    return {"domain": store.settings().domain, **load(store).to_json()}


def update(store: Store, args: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``dns.set``: replace the fields given in ``args`` (``domain`` and :data:`FIELDS`); returns the new
    :func:`show` and whether the domain changed. Raises ConfigError (one sentence) for a bad value."""
    unknown = sorted(set(args) - {"domain", *FIELDS})
    if unknown:
        raise ConfigError(f"unknown DNS setting {unknown[0]!r}")
    merged = {**load(store).to_json(), **{k: v for k, v in args.items() if k in FIELDS}}
    try:
        cfg = DNSConfig.from_json(merged)
    except ParseError as e:
        raise ConfigError(str(e)) from None
    for resolver in (*cfg.nameservers, *(r for rs in cfg.routes.values() for r in rs)):
        ip, _ = parse_resolver(resolver)
        if ip in (MAGICDNS_V4, MAGICDNS_V6):
            raise ConfigError(
                f"nameserver {resolver} is MagicDNS itself; nodes would forward to themselves in a loop"
            )
    old_domain = store.settings().domain
    domain = args.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ConfigError("domain must be a DNS name like ts.example")
    store.set_dns_config(cfg, domain=domain)
    out = show(store)
    return out, out["domain"] != old_domain


__all__ = ["FIELDS", "SETTING", "for_netmap", "load", "save", "show", "update"]
