"""`tailpy control`: run the coordination server and administer it, one module per subcommand group:
:mod:`~tailpy.cli.control.serve` (the server: :func:`tailpy.control.service.run_control`),
:mod:`~tailpy.cli.control.users`, :mod:`~tailpy.cli.control.authkey`, :mod:`~tailpy.cli.control.apikey`
(keys of the HTTP admin API), :mod:`~tailpy.cli.control.nodes`,
:mod:`~tailpy.cli.control.dns`, :mod:`~tailpy.cli.control.policy`, :mod:`~tailpy.cli.control.routes` and
:mod:`~tailpy.cli.control.meshkey` (the region's DERP mesh key, for standalone relays).

Admin commands (users, nodes, authkey, apikey, dns, policy, routes) go through ``<state_dir>/admin.sock``
when `tailpy control serve` runs on that state dir (the server applies them and tells the nodes at once),
and straight to the database otherwise (see :mod:`tailpy.control.admin`). Nodes can never reach them.
"""

from __future__ import annotations

import click

from tailpy.cli.control import apikey, authkey, dns, meshkey, nodes, policy, routes, serve, users


@click.group("control")
def command() -> None:
    """Run and administer the coordination server."""


for _group in (serve, users, authkey, apikey, nodes, dns, policy, routes, meshkey):
    command.add_command(_group.command)

__all__ = ["command"]
