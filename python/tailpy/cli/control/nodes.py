"""`tailpy control nodes list|show|rename|tag|expire|expiry|delete|pending|approve|reject`: machines
registered with this server, and those waiting for approval."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from tailpy.cli.control.common import (
    admin,
    db_option,
    json_option,
    out,
    print_json,
    state_dir_option,
    table,
    when,
    with_admin_note,
)


@click.group("nodes")
def command() -> None:
    """Machines registered with this server."""


def last_seen(n: dict[str, Any], now: float) -> str:
    """The LAST SEEN cell of node JSON ``n``: "now" while it streams (online: it is being seen), else when
    its last stream ended ("-": never)."""
    if n.get("online"):
        return "now"
    return "-" if n.get("last_seen") is None else when(n["last_seen"], now)


@command.command("list")
@state_dir_option
@db_option
@json_option
def nodes_list(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List nodes: id, name, owner, addresses, online, key expiry, last seen."""
    result = admin(state_dir, db, "nodes.list", {})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(
        ["ID", "NAME", "USER/TAGS", "IPV4", "IPV6", "OS", "ONLINE", "KEY EXPIRES", "LAST SEEN", "NODE KEY"],
        [
            [
                str(n["id"]),
                n["name"],
                n["user"] or ",".join(n["tags"]),
                _addr(n, 4),
                _addr(n, 6),
                n["os"],
                "yes" if n["online"] else "no",
                _expiry(n, now),
                last_seen(n, now),
                n["node_key"][:16] + "…",
            ]
            for n in result
        ],
    )


@command.command("pending")
@state_dir_option
@db_option
@json_option
def nodes_pending(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List machines that signed in and wait for approval (serve --approve-nodes)."""
    result = admin(state_dir, db, "nodes.pending", {})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(
        ["ID", "HOSTNAME", "USER", "EMAIL", "OS", "SIGNED IN", "MACHINE KEY"],
        [
            [
                str(p["id"]),
                p["hostname"],
                p["user"],
                p["email"],
                p["os"],
                when(p["created"], now),
                p["machine_key"][:16] + "…",
            ]
            for p in result
        ],
    )


@command.command("approve")
@state_dir_option
@db_option
@json_option
@click.argument("pending")
def nodes_approve(state_dir: Path | None, db: str | None, as_json: bool, pending: str) -> None:
    """Let pending machine PENDING (its id in `nodes pending`, or its hostname) join the tailnet."""
    n = admin(state_dir, db, "nodes.approve", {"id": pending})
    out(as_json, n, f"approved: node {n['id']} {n['name']} {_addr(n, 4)} ({n['user']})")


@command.command("reject")
@state_dir_option
@db_option
@json_option
@click.argument("pending")
def nodes_reject(state_dir: Path | None, db: str | None, as_json: bool, pending: str) -> None:
    """Refuse pending machine PENDING (id or hostname); it may sign in again."""
    p = admin(state_dir, db, "nodes.reject", {"id": pending})
    out(as_json, p, f"rejected: {p['hostname']} ({p['user']})")


def _addr(n: dict[str, Any], version: int) -> str:
    for a in n["addresses"]:
        if (":" in a) == (version == 6):
            return str(a).split("/")[0]
    return ""


def _expiry(n: dict[str, Any], now: float) -> str:
    if n["expired"]:
        return "expired"
    return "never" if n["key_expiry"] is None else when(n["key_expiry"], now)


@command.command("show")
@state_dir_option
@db_option
@json_option
@click.argument("node")
def nodes_show(state_dir: Path | None, db: str | None, as_json: bool, node: str) -> None:
    """Show node NODE (its id, name or FQDN) in full."""
    n = admin(state_dir, db, "nodes.show", {"id": node})
    if as_json:
        print_json(n)
        return
    now = time.time()
    for k, v in [
        ("id", n["id"]),
        ("name", n["fqdn"]),
        ("hostname", n["hostname"]),
        ("user", n["user"] or "-"),
        ("tags", ",".join(n["tags"]) or "-"),
        ("os", n["os"] or "-"),
        ("addresses", " ".join(n["addresses"])),
        ("endpoints", " ".join(n["endpoints"]) or "-"),
        ("online", "yes" if n["online"] else "no"),
        ("key expiry", _expiry(n, now)),
        ("node key", n["node_key"]),
        ("machine key", n["machine_key"]),
    ]:
        click.echo(f"{k + ':':13} {v}")


@command.command("rename")
@state_dir_option
@db_option
@json_option
@click.argument("node")
@click.argument("name")
def nodes_rename(state_dir: Path | None, db: str | None, as_json: bool, node: str, name: str) -> None:
    """Rename node NODE (id, name or FQDN) to NAME (a DNS label; refused when another node has it or
    it is reserved, e.g. localhost). The node keeps it when it later asks for another hostname."""
    n = admin(state_dir, db, "nodes.rename", {"id": node, "name": name})
    out(as_json, n, f"node {n['id']} is now {n['fqdn']}")


@command.command("tag")
@state_dir_option
@db_option
@json_option
@click.argument("node")
@click.argument("tags")
def nodes_tag(state_dir: Path | None, db: str | None, as_json: bool, node: str, tags: str) -> None:
    """Give node NODE (id, name or FQDN) exactly the tags TAGS (comma-separated: tag:web,tag:db): an
    admin's override: the admin may apply any tag the policy defines (in its tagOwners, whoever owns it;
    refused for a tag it does not define, as `authkey create --tags` is; any tag when no policy is set). A
    tagged node shows no user and its key does not expire; the policy's rules for those tags apply to it at
    once."""
    wanted = [t.strip() for t in tags.split(",") if t.strip()]
    n = admin(state_dir, db, "nodes.tag", {"id": node, "tags": wanted})
    out(as_json, n, f"node {n['id']} ({n['name']}) has tags {','.join(n['tags'])}")


@command.command("expire")
@state_dir_option
@db_option
@json_option
@click.argument("node")
def nodes_expire(state_dir: Path | None, db: str | None, as_json: bool, node: str) -> None:
    """Expire node NODE's key (id, name or FQDN) now: peers stop talking to it until it logs in again with
    an auth key."""
    n = admin(state_dir, db, "nodes.expire", {"id": node})
    out(as_json, n, f"expired the key of node {n['id']} ({n['name']})")


@command.command("expiry")
@state_dir_option
@db_option
@json_option
@click.argument("node")
@click.option("--disable/--enable", "disable", required=True, help="Turn key expiry off or back on.")
def nodes_expiry(state_dir: Path | None, db: str | None, as_json: bool, node: str, disable: bool) -> None:
    """Disable key expiry for node NODE (id, name or FQDN): its key never expires; or enable it again
    (from now)."""
    n = admin(state_dir, db, "nodes.expiry", {"id": node, "disabled": disable})
    out(as_json, n, f"key expiry of node {n['id']} ({n['name']}): {_expiry(n, time.time())}")


@command.command("delete")
@state_dir_option
@db_option
@json_option
@click.argument("node")
def nodes_delete(state_dir: Path | None, db: str | None, as_json: bool, node: str) -> None:
    """Remove node NODE (id, name or FQDN) from the tailnet (its machine may rejoin, with `tailpy login`
    where control has a login provider, or with an auth key; its addresses return to the pool after
    `serve --address-quarantine`)."""
    out(as_json, admin(state_dir, db, "nodes.delete", {"id": node}), f"deleted node {node}")


with_admin_note([nodes_list, nodes_show, nodes_rename, nodes_tag, nodes_expire, nodes_expiry, nodes_delete])

__all__ = ["command", "last_seen"]
