"""`tailpy control apikey create|list|expire`: keys of the HTTP admin API (:mod:`tailpy.control.apikeys`)."""

from __future__ import annotations

import getpass
import time
from pathlib import Path

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


@click.group("apikey")
def command() -> None:
    """Keys of the HTTP admin API (Authorization: Bearer KEY)."""


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


@command.command("create")
@state_dir_option
@db_option
@json_option
@click.option(
    "--expiration", default="90d", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d, 52w or never."
)
@click.option("--description", default="", help="What the key is for (shown in `apikey list`).")
def apikey_create(
    state_dir: Path | None, db: str | None, as_json: bool, expiration: str, description: str
) -> None:
    """Print a new admin API key (tpyapi-...): shown this once, only a hash of it is stored."""
    from tailpy.control.options import parse_duration

    args = {
        "expiration": parse_duration(expiration),
        "description": description,
        "by": _login_name(),
    }
    result = admin(state_dir, db, "apikey.create", args)
    out(as_json, result, result["key"])


@command.command("list")
@state_dir_option
@db_option
@json_option
def apikey_list(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List admin API keys (prefix only): description, creator, creation, expiry, last use."""
    from tailpy.control.apikeys import shown

    result = admin(state_dir, db, "apikey.list", {})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(
        ["ID", "KEY", "DESCRIPTION", "CREATED BY", "CREATED", "EXPIRES", "LAST USED"],
        [
            [
                str(k["id"]),
                shown(k["prefix"]),
                k["description"] or "-",
                k["created_by"] or "-",
                when(k["created_at"], now),
                "never"
                if k["expires_at"] is None
                else ("expired " if k["expired"] else "") + when(k["expires_at"], now),
                "-" if k["last_used"] is None else when(k["last_used"], now),
            ]
            for k in result
        ],
    )


@command.command("expire")
@state_dir_option
@db_option
@json_option
@click.argument("key")
def apikey_expire(state_dir: Path | None, db: str | None, as_json: bool, key: str) -> None:
    """Make admin API key KEY (its ID or prefix from `apikey list`) expire now."""
    result = admin(state_dir, db, "apikey.expire", {"key": key})
    out(as_json, result, f"expired API key {result['prefix']}")


with_admin_note([apikey_create, apikey_list, apikey_expire])

__all__ = ["command"]
