"""Options and helpers shared by the `tailpy control` subcommands: ``--state-dir``, ``--db``, ``--json``,
the admin call (through ``<state_dir>/admin.sock`` when the server runs, else straight to the database: see
:mod:`tailpy.control.admin`) and the output (tables, relative times)."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

ENV_STATE_DIR = "TAILPY_CONTROL_STATE_DIR"

state_dir_option = click.option(
    "--state-dir",
    envvar=ENV_STATE_DIR,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory of the server's database and key (default: ${ENV_STATE_DIR}).",
)

db_option = click.option(
    "--db",
    envvar="TAILPY_CONTROL_DB",
    default=None,
    help="Database URL: postgresql://user@host/dbname (default: SQLite control.db in --state-dir).",
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of a table or a sentence."
)

ADMIN_NOTE = (
    "Goes through <state-dir>/admin.sock when `tailpy control serve` runs there (nodes hear of changes at "
    "once), else straight to the database."
)


def with_admin_note(commands: Iterable[click.Command]) -> None:
    """Append :data:`ADMIN_NOTE` to the help of each of ``commands``."""
    for cmd in commands:  # (dedented first: the note's lines would otherwise keep the docstring's indent)
        cmd.help = f"{inspect.cleandoc(cmd.help or '')}\n\n{ADMIN_NOTE}"


def admin(state_dir: Path | None, db: str | None, op: str, args: dict[str, Any]) -> Any:
    """Run admin operation ``op`` with ``args`` (see :func:`tailpy.control.admin.run`)."""
    from tailpy.control import admin as admin_api

    return admin_api.run(state_dir, db, op, args)


def table(headers: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; when stdout is not one (a pipe, a file), tab-separated lines: a header line,
    then one line per row, nothing cut short whatever the width."""
    if not sys.stdout.isatty():
        for r in [headers, *rows]:
            click.echo("\t".join(c.replace("\t", " ").replace("\n", " ") for c in r))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(*headers)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def out(as_json: bool, result: Any, sentence: str) -> None:
    """Print ``result`` as JSON when ``as_json``, else ``sentence``."""
    click.echo(json.dumps(result, indent=2) if as_json else sentence)


def print_json(result: Any) -> None:
    """Print ``result`` as indented JSON."""
    click.echo(json.dumps(result, indent=2))


def span(seconds: float) -> str:
    """A duration for people: "45s", "12m", "3h 5m", "2d 4h", "180d"."""
    s = round(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h and d < 10 else f"{d}d"


def when(t: float, now: float) -> str:
    """Unix time ``t`` relative to ``now`` for people: "in 3h 5m", "12m ago"."""
    d = t - now
    return f"in {span(d)}" if d > 0 else f"{span(d)} ago"


__all__ = [
    "ADMIN_NOTE",
    "ENV_STATE_DIR",
    "admin",
    "db_option",
    "json_option",
    "out",
    "print_json",
    "span",
    "state_dir_option",
    "table",
    "when",
    "with_admin_note",
]
