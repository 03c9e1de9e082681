"""`tailpy control policy get|set|history|check|test|filter`: the tailnet policy (Tailscale's policy file
format, HuJSON), its checks, and the packet filter it compiles to for a node (:mod:`tailpy.control.acl`)."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any

import click

from tailpy.cli.control.common import (
    admin,
    db_option,
    json_option,
    print_json,
    state_dir_option,
    table,
    when,
    with_admin_note,
)
from tailpy.control.policy import hujson
from tailpy.errors import ConfigError

policy_file_argument = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))


@click.group("policy")
def command() -> None:
    """The tailnet policy: who may reach what (Tailscale's policy file format, HuJSON).

    With no policy set every node may reach every other (Tailscale's default). A policy lives in control's
    database with its history (`policy set`), or in a file given to `tailpy control serve --policy FILE`."""


def _read(file: Path) -> str:
    try:
        return hujson.decode(file.read_bytes())
    except hujson.HuJSONError as e:
        raise ConfigError(f"{file}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {file}: {e.strerror or e}") from None


def _notes(result: dict[str, Any]) -> None:
    for section in result.get("not_enforced") or []:
        click.echo(f"not enforced yet: {section} (accepted, has no effect)")
    for w in result.get("warnings") or []:
        click.echo(f"warning: {w}")


def _who(result: dict[str, Any]) -> str:
    at = result.get("set_at")
    since = f", {when(at, time.time())}" if isinstance(at, (int, float)) else ""
    if result.get("source") == "file":
        return f"from file {result.get('path')} (loaded{since})"
    return f"policy {result.get('id')}, set by {result.get('set_by') or '?'}{since}"


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


@command.command("get")
@state_dir_option
@db_option
@json_option
def policy_get(state_dir: Path, db: str | None, as_json: bool) -> None:
    """Print the running policy (its text as it was given) and who set it when."""
    result = admin(state_dir, db, "policy.get", {})
    if as_json:
        print_json(result)
        return
    if result.get("policy") is None:
        click.echo(result.get("message") or "no policy set")
        return
    click.echo(f"# {_who(result)}")
    click.echo(str(result["policy"]).rstrip("\n"))


@command.command("set")
@state_dir_option
@db_option
@json_option
@policy_file_argument
def policy_set(state_dir: Path, db: str | None, as_json: bool, file: Path) -> None:
    """Make FILE the tailnet policy, after checking it: it must parse, define every group, tag and host
    it uses, and pass its `tests` against the current nodes. A refused policy is reported as
    FILE:LINE:COLUMN: what is wrong, and the running policy stays. Refused when control runs with
    `serve --policy FILE` (edit that file instead)."""
    result = admin(state_dir, db, "policy.set", {"text": _read(file), "file": str(file), "by": _login_name()})
    if as_json:
        print_json(result)
        return
    click.echo(f"policy set: {_who(result)}")
    _notes(result)


@command.command("history")
@state_dir_option
@db_option
@json_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="How many.")
def policy_history(state_dir: Path, db: str | None, as_json: bool, limit: int) -> None:
    """List the policies stored with `policy set`, newest (the running one) first: id, who set it, when,
    and size. (A `serve --policy FILE` policy is the file's and is not stored.)"""
    result = admin(state_dir, db, "policy.history", {"limit": limit})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(
        ["ID", "SET BY", "SET", "LINES"],
        [
            [str(r["id"]), r["set_by"] or "-", when(r["set_at"], now), str(r["text"].count("\n") + 1)]
            for r in result
        ],
    )


@command.command("check")
@state_dir_option
@db_option
@json_option
@policy_file_argument
def policy_check(state_dir: Path, db: str | None, as_json: bool, file: Path) -> None:
    """Check FILE as `policy set` would (syntax, definitions, `tests` against the current nodes) and store
    nothing; print the sections accepted but not enforced yet, and warnings."""
    result = admin(state_dir, db, "policy.check", {"text": _read(file), "file": str(file)})
    if as_json:
        print_json(result)
        return
    click.echo(f"{file}: ok")
    _notes(result)


@command.command("test")
@state_dir_option
@db_option
@json_option
@policy_file_argument
def policy_test(state_dir: Path, db: str | None, as_json: bool, file: Path) -> None:
    """Run the `tests` section of FILE against the current nodes and print each test's result, PASS or
    FAIL with FILE:LINE:COLUMN (exit status 1 when one fails); stores nothing."""
    result = admin(state_dir, db, "policy.test", {"text": _read(file), "file": str(file)})
    failures = list(result.get("failures") or [])
    if as_json:
        print_json(result)
    else:
        for r in result.get("results") or []:
            if r.get("ok"):
                click.echo(f"PASS {r.get('at')}: {r.get('test')} (src {r.get('src')})")
            for f in r.get("failures") or []:
                click.echo(f"FAIL {r.get('at')}: {f}")
        total = int(result.get("tests") or 0)
        if total == 0:
            click.echo(f"{file}: has no tests")
        else:
            click.echo(f"{file}: {total - len(failures)} of {total} tests pass")
    if failures:
        raise SystemExit(1)


def _describe(rule: dict[str, Any]) -> str:
    protos = rule.get("IPProto") or []
    names = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
    proto = ",".join(names.get(p, str(p)) for p in protos) or "tcp,udp,icmp"
    dsts = []
    for d in rule.get("DstPorts", []):
        p = d.get("Ports", {})
        first, last = p.get("First", 0), p.get("Last", 65535)
        ports = "*" if (first, last) == (0, 65535) else str(first) if first == last else f"{first}-{last}"
        ip = str(d.get("IP"))
        dsts.append(f"[{ip}]:{ports}" if ":" in ip else f"{ip}:{ports}")
    return f"from {', '.join(rule.get('SrcIPs', []))}\n    to {', '.join(dsts)} ({proto})"


@command.command("filter")
@state_dir_option
@db_option
@json_option
@click.argument("node")
def policy_filter(state_dir: Path, db: str | None, as_json: bool, node: str) -> None:
    """Print the packet filter NODE (id, name or FQDN) receives: the rules whose destination is that node.
    --json prints exactly Tailscale's tailcfg.FilterRule list ({"SrcIPs", "DstPorts": [{"IP", "Ports":
    {"First", "Last"}}], "IPProto"?}), as Tailscale renders it (a `*` source becomes the tailnet's ranges)."""
    result = admin(state_dir, db, "policy.filter", {"node": node})
    rules = result.get("rules") or []
    if as_json:
        click.echo(json.dumps(rules, indent=2))
        return
    n = result.get("node") or {}
    if not rules:
        click.echo(f"node {n.get('id')} {n.get('name')}: no rule lets anything in (inbound dropped)")
        return
    click.echo(f"node {n.get('id')} {n.get('name')}: {len(rules)} rule{'' if len(rules) == 1 else 's'}")
    for r in rules:
        click.echo("  " + _describe(r))


with_admin_note([policy_get, policy_set, policy_history, policy_check, policy_test, policy_filter])

__all__ = ["command"]
