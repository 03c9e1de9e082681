"""`tailpy control`: run the coordination server and administer it.

Admin commands (authkey, nodes) work on the server's SQLite database directly (``<state_dir>/control.db``;
SQLite serializes writers), so they are never reachable by nodes over HTTP; a running server picks up
their changes within a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

import click

from tailpy.errors import ConfigError

ENV_STATE_DIR = "TAILPY_CONTROL_STATE_DIR"

_state_dir = click.option(
    "--state-dir",
    envvar=ENV_STATE_DIR,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory of the server's database and key (default: ${ENV_STATE_DIR}).",
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """ "90s", "30m", "1h", "7d" (or combinations like "1h30m") -> seconds; "never" -> None.

    Raises ConfigError.
    """
    t = text.strip().lower()
    if t in ("never", "none", "0"):
        return None
    parts = re.findall(r"(\d+)([smhd])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ConfigError(f"--expiration {text!r} is not a duration like 90s, 30m, 1h, 7d or 'never'")
    return float(sum(int(n) * _UNITS[u] for n, u in parts))


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {text!r} is not HOST:PORT (for example 0.0.0.0:8080 or [::]:8080)")
    return host, int(port)


@click.group("control")
def command() -> None:
    """Run and administer the coordination server."""


@command.command("serve")
@_state_dir
@click.option("--listen", default="0.0.0.0:8080", show_default=True, help="HOST:PORT to serve HTTP on.")
def serve(state_dir: Path, listen: str) -> None:
    """Run the coordination server until SIGTERM or SIGINT (logs go to stderr)."""
    from tailpy.control import ControlServer, Store

    host, port = _parse_listen(listen)
    if not state_dir.exists():
        if not state_dir.parent.is_dir():
            raise ConfigError(f"cannot create state directory {state_dir}: {state_dir.parent} does not exist")
        state_dir.mkdir(mode=0o700)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = Store(state_dir)

    async def run() -> None:
        server = ControlServer(store)
        try:
            bound = await server.start(host, port)
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        logging.getLogger("tailpy.control").info(
            "control server listening on http://%s:%d (key %s, state %s)",
            *bound,
            server.public_key.text(),
            state_dir,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.getLogger("tailpy.control").info("shutting down")
        await server.stop()

    try:
        asyncio.run(run())
    finally:
        store.close()


@command.group("authkey")
def authkey() -> None:
    """Pre-auth keys that let machines join."""


@authkey.command("create")
@_state_dir
@click.option("--reusable", is_flag=True, help="Let the key register any number of machines.")
@click.option("--expiration", default="24h", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d or never.")
def authkey_create(state_dir: Path, reusable: bool, expiration: str) -> None:
    """Print a new pre-auth key (tskey-auth-...) for `tailpy up --auth-key`."""
    from tailpy.control import Store

    lifetime = parse_duration(expiration)
    now = time.time()
    store = Store(state_dir, create=False)
    try:
        key = store.create_auth_key(
            reusable=reusable, expires=None if lifetime is None else now + lifetime, now=now
        )
    finally:
        store.close()
    click.echo(key.key)


@authkey.command("list")
@_state_dir
def authkey_list(state_dir: Path) -> None:
    """List pre-auth keys (prefix only), whether reusable, used, and when they expire."""
    from rich.console import Console
    from rich.table import Table

    from tailpy.control import Store

    store = Store(state_dir, create=False)
    try:
        keys = store.list_auth_keys()
    finally:
        store.close()
    table = Table("KEY", "REUSABLE", "USED", "EXPIRES")
    now = time.time()
    for k in keys:
        exp = "never" if k.expires is None else _when(k.expires, now)
        table.add_row(k.key[:15] + "…", "yes" if k.reusable else "no", "yes" if k.used else "no", exp)
    Console().print(table)


@command.group("nodes")
def nodes() -> None:
    """Machines registered with this server."""


@nodes.command("list")
@_state_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of nodes) instead of a table.")
def nodes_list(state_dir: Path, as_json: bool) -> None:
    """List registered nodes: id, name, addresses, endpoints, last seen."""
    from tailpy.control import Store

    store = Store(state_dir, create=False)
    try:
        all_nodes = store.list_nodes()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([n.to_json() for n in all_nodes], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("ID", "NAME", "HOSTNAME", "IPV4", "IPV6", "ENDPOINTS", "LAST SEEN", "NODE KEY")
    now = time.time()
    for n in all_nodes:
        seen = "-" if n.last_seen is None else _when(n.last_seen, now)
        table.add_row(
            str(n.id),
            n.name,
            n.hostname,
            n.ipv4 or "",
            n.ipv6 or "",
            " ".join(n.endpoints),
            seen,
            n.node_key.short(),
        )
    Console().print(table)


@nodes.command("delete")
@_state_dir
@click.argument("node_id", type=int)
def nodes_delete(state_dir: Path, node_id: int) -> None:
    """Remove node NODE_ID from the tailnet (its machine may rejoin with an auth key, same address)."""
    from tailpy.control import Store

    store = Store(state_dir, create=False)
    try:
        if not store.delete_node(node_id, time.time()):
            raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
    finally:
        store.close()
    click.echo(f"deleted node {node_id}")


def _when(t: float, now: float) -> str:
    d = t - now
    span = abs(d)
    text = f"{span:.0f}s" if span < 120 else f"{span / 60:.0f}m" if span < 7200 else f"{span / 3600:.1f}h"
    return f"in {text}" if d > 0 else f"{text} ago"


__all__ = ["command", "parse_duration"]
