"""`tailpy control authkey create|list|expire`: pre-auth keys that let machines join."""

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


@click.group("authkey")
def command() -> None:
    """Pre-auth keys that let machines join."""


@command.command("create")
@state_dir_option
@db_option
@json_option
@click.option("--user", default=None, help="Owner of the nodes it registers (default: user 'default').")
@click.option("--tags", default="", help="Comma-separated tags (tag:server,...): tagged nodes, no user.")
@click.option("--reusable", is_flag=True, help="Let the key register any number of machines.")
@click.option("--ephemeral", is_flag=True, help="Its nodes are removed after --ephemeral-timeout offline.")
@click.option("--expiration", default="1h", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d or never.")
def authkey_create(
    state_dir: Path | None,
    db: str | None,
    as_json: bool,
    user: str | None,
    tags: str,
    reusable: bool,
    ephemeral: bool,
    expiration: str,
) -> None:
    """Print a new pre-auth key (tskey-auth-...) for `tailpy up --auth-key`."""
    from tailpy.control.options import parse_duration

    args = {
        "user": user,
        "tags": [t for t in tags.split(",") if t.strip()],
        "reusable": reusable,
        "ephemeral": ephemeral,
        "expiration": parse_duration(expiration),
    }
    result = admin(state_dir, db, "authkey.create", args)
    out(as_json, result, result["key"])


@command.command("list")
@state_dir_option
@db_option
@json_option
def authkey_list(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List pre-auth keys (prefix only): owner or tags, reusable, ephemeral, uses, last use, expiry."""
    result = admin(state_dir, db, "authkey.list", {})
    if as_json:
        print_json(result)
        return
    now = time.time()
    yn = {True: "yes", False: "no"}
    table(
        ["ID", "KEY", "USER/TAGS", "REUSABLE", "EPHEMERAL", "USED", "LAST USED", "EXPIRES"],
        [
            [
                str(k["id"]),
                k["key"],
                k["user"] or ",".join(k["tags"]),
                yn[k["reusable"]],
                yn[k["ephemeral"]],
                _uses(k),
                "-" if k.get("last_used") is None else when(k["last_used"], now),
                "never" if k["expires"] is None else when(k["expires"], now),
            ]
            for k in result
        ],
    )


@command.command("expire")
@state_dir_option
@db_option
@json_option
@click.argument("key")
def authkey_expire(state_dir: Path | None, db: str | None, as_json: bool, key: str) -> None:
    """Make auth key KEY (its ID from `authkey list`, or the full key) expire now."""
    out(as_json, admin(state_dir, db, "authkey.expire", {"key": key}), f"expired auth key {key}")


def _uses(k: dict[str, Any]) -> str:
    """USED of `authkey list`: yes/no for a single-use key; how many registrations for a reusable one."""
    uses = int(k.get("uses") or (1 if k["used"] else 0))
    if not k["reusable"]:
        return "yes" if uses else "no"
    return "no" if not uses else "1 time" if uses == 1 else f"{uses} times"


with_admin_note([authkey_create, authkey_list, authkey_expire])

__all__ = ["command"]
