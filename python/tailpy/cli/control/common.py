"""Options and helpers shared by the `tailpy control` subcommands: ``--state-dir``, ``--db``, ``--json``,
``--control-url`` and ``--api-key-file``, the admin call (over control's HTTP admin API with
``--control-url``: :mod:`tailpy.control.apiclient`; else through ``<state_dir>/admin.sock`` when the server
runs, else straight to the database: see :mod:`tailpy.control.admin`) and the output (tables, relative
times)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tailpy.cli.safetext import cell, on_terminal, say, visible
from tailpy.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

ENV_STATE_DIR = "TAILPY_CONTROL_STATE_DIR"

server_state_dir_option = click.option(
    "--state-dir",
    envvar=ENV_STATE_DIR,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory of the server's database and key (default: ${ENV_STATE_DIR}).",
)
"""``--state-dir`` of the commands that need the state directory itself (``serve``, ``mesh-key``)."""

ENV_CONTROL_URL = "TAILPY_CONTROL_URL"
_META_URL = "tailpy.control_url"
_META_KEY_FILE = "tailpy.api_key_file"


def _remember(meta_name: str) -> Any:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta[meta_name] = value
        return value

    return callback


def remote_options(f: Any) -> Any:
    """``--control-url`` and ``--api-key-file``: run the admin command over control's HTTP admin API
    (:mod:`tailpy.control.apiclient`); :func:`admin` reads them from the click context."""
    f = click.option(
        "--api-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        callback=_remember(_META_KEY_FILE),
        help="File holding the admin API key for --control-url (default: $TAILPY_API_KEY).",
    )(f)
    return click.option(
        "--control-url",
        envvar=ENV_CONTROL_URL,
        default=None,
        expose_value=False,
        callback=_remember(_META_URL),
        help=f"Administer the control server at this URL over its HTTP admin API, with an admin API key "
        f"(default: ${ENV_CONTROL_URL} when no --state-dir is given).",
    )(f)


def state_dir_option(f: Any) -> Any:
    """``--state-dir`` (optional with ``--control-url``) and :func:`remote_options`, for admin commands."""
    f = click.option(
        "--state-dir",
        envvar=ENV_STATE_DIR,
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help=f"Directory of the server's database and key (default: ${ENV_STATE_DIR}); not needed with "
        "--control-url.",
    )(f)
    return remote_options(f)


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
    "once), else straight to the database; with --control-url, over that server's HTTP admin API."
)


def with_admin_note(commands: Iterable[click.Command]) -> None:
    """Append :data:`ADMIN_NOTE` to the help of each of ``commands``."""
    for cmd in commands:  # (dedented first: the note's lines would otherwise keep the docstring's indent)
        cmd.help = f"{inspect.cleandoc(cmd.help or '')}\n\n{ADMIN_NOTE}"


def control_url(state_dir: Path | None = None) -> str | None:
    """The ``--control-url`` of the running command, or None. ``$TAILPY_CONTROL_URL`` counts only when no
    ``state_dir`` is given (a flag or ``$TAILPY_CONTROL_STATE_DIR``): the variable also tells embedded
    nodes where control is, and a local admin command keeps going to the local server."""
    ctx = click.get_current_context(silent=True)
    url = ctx.meta.get(_META_URL) if ctx is not None else None
    if not isinstance(url, str) or not url.strip():
        return None
    assert ctx is not None
    from_env = ctx.get_parameter_source("control_url") == click.core.ParameterSource.ENVIRONMENT
    return None if from_env and state_dir is not None else url


def admin(state_dir: Path | None, db: str | None, op: str, args: dict[str, Any]) -> Any:
    """Run admin operation ``op`` with ``args``: over the HTTP admin API with ``--control-url`` (see
    :func:`control_url`; the key from ``--api-key-file`` or ``$TAILPY_API_KEY``:
    :func:`tailpy.control.apiclient.call`), else through the
    admin socket or the database (:func:`tailpy.control.admin.run`). Raises ConfigError; click's usage error
    when neither ``--state-dir`` nor ``--control-url`` is given."""
    url = control_url(state_dir)
    if url is not None:
        from tailpy.control import apiclient

        ctx = click.get_current_context()
        apiclient.base_url(url)  # (a malformed URL is said before a missing key)
        key_file = ctx.meta.get(_META_KEY_FILE)
        key = apiclient.read_key(key_file if isinstance(key_file, Path) else None)
        return apiclient.call(url, key, op, args)
    if state_dir is None:
        raise click.UsageError(f"Missing option '--state-dir' (or --control-url, ${ENV_CONTROL_URL}).")
    from tailpy.control import admin as admin_api

    try:
        return admin_api.run(state_dir, db, op, args)
    except ConfigError as e:
        if not _url_set_aside():
            raise
        raise ConfigError(
            f"{e} (${ENV_CONTROL_URL} is set but not used while a state directory is given: unset "
            "$TAILPY_CONTROL_STATE_DIR, or pass --control-url, to use the API)"
        ) from None


def _url_set_aside() -> bool:
    """True when ``$TAILPY_CONTROL_URL`` is set and :func:`control_url` set it aside for a state directory."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    url = ctx.meta.get(_META_URL)
    from_env = ctx.get_parameter_source("control_url") == click.core.ParameterSource.ENVIRONMENT
    return isinstance(url, str) and bool(url.strip()) and from_env


def table(headers: list[str], rows: list[list[str]], console: Console | None = None) -> None:
    """A table on a terminal; when stdout is not one (a pipe, a file), tab-separated lines: a header line,
    then one line per row, nothing cut short whatever the width. Each cell is shown
    :func:`~tailpy.cli.safetext.visible` (a control character as its escape, ``\\t`` and ``\\n`` too: one
    line per row, one tab between cells) and reaches rich as text, not markup: cells hold what nodes and
    API clients chose (hostnames, OS, descriptions). ``console``: print the table there (a terminal or
    not; default: a new :class:`rich.console.Console` on stdout)."""
    if console is None and not on_terminal():
        for r in [headers, *rows]:
            click.echo("\t".join(visible(c) for c in r))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(*headers)
    for r in rows:
        t.add_row(*(cell(c) for c in r))
    (console or Console()).print(t)


def out(as_json: bool, result: Any, sentence: str) -> None:
    """Print ``result`` as JSON when ``as_json``, else ``sentence`` (one line, made
    :func:`~tailpy.cli.safetext.visible`: it may quote names from outside)."""
    if as_json:
        print_json(result)
    else:
        say(sentence)


def print_json(result: Any) -> None:
    """Print ``result`` as indented JSON."""
    click.echo(json.dumps(result, indent=2))


def span(seconds: float) -> str:
    """A duration for people, rounded to its last unit shown (30 days less a few seconds is "30d", not
    "29d"): "45s", "12m", "3h 5m", "2d 4h", "180d"."""
    s = round(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600 - 30:
        return f"{round(s / 60)}m"
    if s < 2 * 86400 - 30:
        h, m = divmod(round(s / 60), 60)
        return f"{h}h {m}m" if m else f"{h}h"
    if s < 10 * 86400 - 1800:
        d, h = divmod(round(s / 3600), 24)
        return f"{d}d {h}h" if h else f"{d}d"
    return f"{round(s / 86400)}d"


def when(t: float, now: float) -> str:
    """Unix time ``t`` relative to ``now`` for people: "in 3h 5m", "12m ago"."""
    d = t - now
    return f"in {span(d)}" if d > 0 else f"{span(d)} ago"


__all__ = [
    "ADMIN_NOTE",
    "ENV_CONTROL_URL",
    "ENV_STATE_DIR",
    "admin",
    "control_url",
    "db_option",
    "json_option",
    "out",
    "print_json",
    "remote_options",
    "server_state_dir_option",
    "span",
    "state_dir_option",
    "table",
    "when",
    "with_admin_note",
]
