"""`tailpy whois IP`: which node of the tailnet has this address."""

from __future__ import annotations

import json

import click

from tailpy.cli.common import json_option, local, run, socket_option
from tailpy.cli.safetext import fields


@click.command("whois")
@click.argument("address")
@json_option
@socket_option
def command(address: str, as_json: bool, socket_path: str) -> None:
    """Show the node, its owner and keys, for a tailnet ADDRESS (an IP, or ip:port)."""
    node = run(local(socket_path).whois(address))
    if as_json:
        click.echo(json.dumps(node.to_json(), indent=2))
        return
    owner = node.user or ", ".join(node.tags) or "-"
    fields(
        [
            ("Machine", node.fqdn or node.name),
            ("  Name", node.name),
            ("  ID", node.id),
            ("  Addresses", ", ".join(a.split("/")[0] for a in node.addresses)),
            ("  OS", node.os or "-"),
            ("  Node key", node.node_key.text()),
            ("  Online", "yes" if node.online else "no"),
            ("  Key expired", "yes" if node.expired else "no"),
            ("User", owner),
        ],
        16,
        sep="",
    )
