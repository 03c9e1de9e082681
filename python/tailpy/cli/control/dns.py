"""`tailpy control dns show|set`: the tailnet's DNS settings (MagicDNS, domain, nameservers, split DNS,
search domains, extra records). Nodes get a new full netmap at once when the server runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tailpy.cli.control.common import admin, db_option, json_option, print_json, state_dir_option
from tailpy.dns.config import MAX_ITEMS
from tailpy.errors import ConfigError


def _print(cfg: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(cfg)
        return
    routes = cfg["routes"]
    for k, v in [
        ("MagicDNS", "on" if cfg["magic_dns"] else "off"),
        ("domain", cfg["domain"]),
        ("nameservers", " ".join(cfg["nameservers"]) or "- (each node's own resolvers)"),
        ("split DNS", "; ".join(f"{d} -> {' '.join(r)}" for d, r in routes.items()) or "-"),
        ("search", " ".join(cfg["search_domains"]) or "-"),
        ("records", "; ".join(f"{r['name']} {r['type']} {r['value']}" for r in cfg["extra_records"]) or "-"),
    ]:
        click.echo(f"{k + ':':13} {v}")


def parse_route(text: str) -> tuple[str, list[str]]:
    """``DOMAIN=RESOLVER[,RESOLVER...]`` -> (domain, resolvers). Raises ConfigError."""
    domain, sep, rest = text.partition("=")
    resolvers = [r.strip() for r in rest.split(",") if r.strip()]
    if not sep or not domain.strip() or not resolvers:
        raise ConfigError(f"--route {text!r} is not DOMAIN=RESOLVER[,RESOLVER...] (corp.example=192.0.2.53)")
    return domain.strip(), resolvers


def parse_record(text: str) -> dict[str, str]:
    """``"NAME TYPE VALUE"`` (spaces or commas) -> an extra record object. Raises ConfigError."""
    parts = text.replace(",", " ").split()
    if len(parts) != 3:
        raise ConfigError(f"--record {text!r} is not 'NAME TYPE VALUE' (www.ts.example A 100.64.0.9)")
    return {"name": parts[0], "type": parts[1], "value": parts[2]}


@click.group("dns")
def command() -> None:
    """The tailnet's DNS settings, sent to every node in its netmap."""


@command.command("show")
@state_dir_option
@db_option
@json_option
def show(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """Show the DNS settings."""
    _print(admin(state_dir, db, "dns.show", {}), as_json)


@command.command("set")
@state_dir_option
@db_option
@json_option
@click.option("--magic-dns/--no-magic-dns", default=None, help="Answer <node>.<domain> on 100.100.100.100.")
@click.option("--domain", default=None, help="Tailnet DNS domain (node names are <name>.<domain>).")
@click.option("--nameserver", "nameservers", multiple=True, help="Upstream resolver IP[:PORT] (repeat).")
@click.option("--no-nameservers", is_flag=True, help="Forget the nameservers (nodes use their own).")
@click.option("--search-domain", "search", multiple=True, help="Search domain (repeat).")
@click.option("--no-search-domains", is_flag=True, help="Forget the search domains.")
@click.option("--route", "routes", multiple=True, help="Split DNS: DOMAIN=IP[:PORT][,IP...] (repeat).")
@click.option("--no-routes", is_flag=True, help="Forget the split DNS routes.")
@click.option(
    "--record", "records", multiple=True, help="Extra record 'NAME TYPE VALUE', A or AAAA (repeat)."
)
@click.option("--no-records", is_flag=True, help="Forget the extra records.")
def set_(
    state_dir: Path | None,
    db: str | None,
    as_json: bool,
    magic_dns: bool | None,
    domain: str | None,
    nameservers: tuple[str, ...],
    no_nameservers: bool,
    search: tuple[str, ...],
    no_search_domains: bool,
    routes: tuple[str, ...],
    no_routes: bool,
    records: tuple[str, ...],
    no_records: bool,
) -> None:
    """Change DNS settings: each option given replaces that setting (a repeated option gives a list);
    the others stay."""
    for given, forget, what in (
        (nameservers, no_nameservers, "nameserver"),
        (search, no_search_domains, "search-domain"),
        (routes, no_routes, "route"),
        (records, no_records, "record"),
    ):
        if given and forget:
            plural = "search-domains" if what == "search-domain" else what + "s"
            raise ConfigError(f"--no-{plural} and --{what} contradict each other: give one of them")
        if len(given) > MAX_ITEMS:
            raise ConfigError(f"at most {MAX_ITEMS} --{what} options may be given, not {len(given)}")
    args: dict[str, Any] = {}
    if magic_dns is not None:
        args["magic_dns"] = magic_dns
    if domain is not None:
        args["domain"] = domain
    if nameservers or no_nameservers:
        args["nameservers"] = list(nameservers)
    if search or no_search_domains:
        args["search_domains"] = list(search)
    if routes or no_routes:
        parsed: dict[str, list[str]] = {}
        for r in routes:
            d, rs = parse_route(r)
            parsed.setdefault(d, []).extend(rs)
        args["routes"] = parsed
    if records or no_records:
        args["extra_records"] = [parse_record(r) for r in records]
    if not args:
        raise ConfigError("nothing to set: give at least one option (see `tailpy control dns set --help`)")
    _print(admin(state_dir, db, "dns.set", args), as_json)


__all__ = ["command", "parse_record", "parse_route"]
