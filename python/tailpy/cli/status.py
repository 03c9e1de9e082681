"""`tailpy status`: this node and its peers (`--json` for scripts)."""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tailpy.cli.common import json_option, local, run, socket_option


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, now - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def render(st: dict[str, Any], console: Console) -> None:
    me = st["self"]
    now = st.get("now") or time.time()
    console.print(
        f"[bold]{me['name'] or me['hostname']}[/] {' '.join(a.split('/')[0] for a in me['addresses'])}  "
        f"state {st['backend_state']}"
        + ("" if st["control_connected"] else "  (control not connected)")
        + (f"  [red]{st['error']}[/]" if st.get("error") else "")
    )
    for warning in st.get("health", []):
        console.print(f"[yellow]health:[/] {warning}")
    table = Table(box=None, pad_edge=False)
    for col in ("name", "address", "path", "handshake", "tx", "rx"):
        table.add_column(col)
    for p in st["peers"]:
        path = (
            "-"
            if not p["endpoint"] and p["path"] != "relay"
            else ("relay" if p["path"] == "relay" else f"direct {p['endpoint']}")
        )
        table.add_row(
            p["name"],
            (p["addresses"] or ["-"])[0].split("/")[0],
            path,
            _ago(p["last_handshake"], now),
            _bytes(p["tx_bytes"]),
            _bytes(p["rx_bytes"]),
        )
    if st["peers"]:
        console.print(table)
    else:
        console.print("no peers")


@click.command("status")
@json_option
@socket_option
def command(as_json: bool, socket_path: str) -> None:
    """Show this node, its peers, their paths, handshake age and traffic."""
    st = run(local(socket_path).status())
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        render(st, Console())
