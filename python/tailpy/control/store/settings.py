"""Tailnet-wide settings in the ``settings`` table (name -> text value): the DNS ``domain``, the address
prefixes ``prefix_v4`` / ``prefix_v6``, and the DNS configuration ``dns`` (one JSON document, the
:class:`tailpy.dns.config.DNSConfig` wire form)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control import names
from tailpy.control.store.addresses import IPV4_RANGE, IPV6_RANGE
from tailpy.control.store.schema import settings
from tailpy.dns.config import DNSConfig
from tailpy.errors import ConfigError, ParseError

DNS_SETTING = "dns"


@dataclass(frozen=True)
class Settings:
    """Tailnet-wide settings stored in the database: DNS ``domain`` and the address prefixes."""

    domain: str = names.DEFAULT_DOMAIN
    prefix_v4: ipaddress.IPv4Network = IPV4_RANGE
    prefix_v6: ipaddress.IPv6Network = IPV6_RANGE


def read(conn: Connection) -> Settings:
    """The stored settings (defaults where none is stored)."""
    kv = {r.name: r.value for r in conn.execute(sa.select(settings))}
    d = Settings()
    return Settings(
        kv.get("domain", d.domain),
        ipaddress.IPv4Network(kv.get("prefix_v4", str(d.prefix_v4))),
        ipaddress.IPv6Network(kv.get("prefix_v6", str(d.prefix_v6))),
    )


def _put(conn: Connection, name: str, value: str) -> None:
    conn.execute(settings.delete().where(settings.c.name == name))
    conn.execute(settings.insert().values(name=name, value=value))


def configure(
    conn: Connection, *, domain: str | None = None, prefix_v4: str | None = None, prefix_v6: str | None = None
) -> Settings:
    """Store the settings given (see :meth:`Store.configure`); returns all. Raises ConfigError."""
    values: dict[str, str] = {}
    if domain is not None:
        values["domain"] = names.check_domain(domain)
    for opt, text, full in (("prefix_v4", prefix_v4, IPV4_RANGE), ("prefix_v6", prefix_v6, IPV6_RANGE)):
        if text is None:
            continue
        flag = opt.replace("_", "-")
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ConfigError(f"--{flag} {text!r} is not a network prefix: {e}") from None
        if net.version != full.version or not net.subnet_of(full):  # type: ignore[arg-type]
            raise ConfigError(f"--{flag} {text} must lie within {full}")
        values[opt] = str(net)
    for k, v in values.items():
        _put(conn, k, v)
    return read(conn)


def read_dns(conn: Connection) -> DNSConfig:
    """The stored DNS configuration (defaults when none is stored or it cannot be read)."""
    row = conn.execute(sa.select(settings.c.value).where(settings.c.name == DNS_SETTING)).first()
    if row is None:
        return DNSConfig()
    try:
        return DNSConfig.from_json(json.loads(row[0]))
    except (ValueError, ParseError):
        return DNSConfig()


def write_dns(conn: Connection, cfg: DNSConfig) -> None:
    """Store ``cfg`` as the DNS configuration."""
    _put(conn, DNS_SETTING, json.dumps(cfg.to_json()))


__all__ = ["DNS_SETTING", "Settings", "configure", "read", "read_dns", "write_dns"]
