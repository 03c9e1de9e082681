"""`tailpy down`: disconnect from the tailnet (the node stays registered)."""

from __future__ import annotations

import click

from tailpy.cli.common import local, run, socket_option
from tailpy.errors import DaemonNotRunningError


@click.command("down")
@socket_option
def command(socket_path: str) -> None:
    """Disconnect this device from the tailnet."""
    try:
        run(local(socket_path).down())
    except DaemonNotRunningError:
        click.echo("tailpyd is not running: nothing to stop")
        return
    click.echo("stopped")
