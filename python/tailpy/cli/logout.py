"""`tailpy logout`: disconnect and expire this node's key; the next `tailpy up` needs an auth key."""

from __future__ import annotations

import click

from tailpy.cli.common import local, run, socket_option


@click.command("logout")
@socket_option
def command(socket_path: str) -> None:
    """Log this device out of the tailnet. Its address and name are kept for the next login."""
    run(local(socket_path).logout())
    click.echo("logged out; log in again with `tailpy login` (or `tailpy up --auth-key KEY`)")
