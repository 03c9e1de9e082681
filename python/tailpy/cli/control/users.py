"""`tailpy control users create|list|delete`: users own nodes (through the auth keys they register with, or
their login)."""

from __future__ import annotations

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


@click.group("users")
def command() -> None:
    """Users own nodes (through the auth keys they register with)."""


@command.command("create")
@state_dir_option
@db_option
@json_option
@click.argument("name")
def users_create(state_dir: Path | None, db: str | None, as_json: bool, name: str) -> None:
    """Create user NAME (alice, alice@example.com)."""
    out(as_json, admin(state_dir, db, "users.create", {"name": name}), f"created user {name}")


@command.command("list")
@state_dir_option
@db_option
@json_option
def users_list(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List users."""
    result = admin(state_dir, db, "users.list", {})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(["ID", "NAME", "CREATED"], [[str(u["id"]), u["name"], when(u["created"], now)] for u in result])


@command.command("delete")
@state_dir_option
@db_option
@json_option
@click.argument("name")
def users_delete(state_dir: Path | None, db: str | None, as_json: bool, name: str) -> None:
    """Delete user NAME and its auth keys (refused while it owns nodes)."""
    out(as_json, admin(state_dir, db, "users.delete", {"name": name}), f"deleted user {name}")


with_admin_note([users_create, users_list, users_delete])

__all__ = ["command"]
