"""`tailpy exit-node list`: the peers this node may use as its exit node (Tailscale's
``tailscale exit-node list``)."""

from __future__ import annotations

import json
from typing import Any

import click

from tailpy.cli.common import json_option, local, run, socket_option
from tailpy.cli.safetext import visible
from tailpy.ipnstate import Status


def candidates(st: Status) -> list[dict[str, Any]]:
    """The peers offering to be this node's exit node (``exit_node_option``), by name: ``name``, ``fqdn``,
    ``ip`` (first tailnet address), ``online``, ``in_use`` (this node's exit node now)."""
    return [
        {"name": p.name, "fqdn": p.fqdn, "ip": p.first_ip, "online": p.online, "in_use": p.exit_node}
        for p in sorted(st.peers, key=lambda p: p.name)
        if p.exit_node_option
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """``rows`` (:func:`candidates`) as aligned text lines with a header (each cell
    :func:`~tailpy.cli.safetext.visible`)."""
    cells = [("IP", "NAME", "STATUS", "IN USE")]
    for r in rows:
        cells.append(
            (
                visible(r["ip"]),
                visible(r["name"]),
                "online" if r["online"] else "offline",
                "yes" if r["in_use"] else "-",
            )
        )
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in cells]


@click.group("exit-node")
def command() -> None:
    """Exit nodes: peers that carry this node's internet traffic (`tailpy set --exit-node NAME`)."""


@command.command("list")
@json_option
@socket_option
def list_command(as_json: bool, socket_path: str) -> None:
    """List the peers offering to be this node's exit node: address, name, online, in use."""
    rows = candidates(run(local(socket_path).status()))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(
            "no peer offers to be an exit node to this node (a peer runs `tailpy up --advertise-exit-node`, "
            "an admin approves it, and the policy grants autogroup:internet)"
        )
        return
    for line in table(rows):
        click.echo(line)
