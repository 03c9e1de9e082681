"""`tailpy ip`: this node's tailnet addresses."""

from __future__ import annotations

import click

from tailpy.cli.common import local, run, socket_option
from tailpy.errors import TailpyError


@click.command("ip")
@click.option("-4", "only4", is_flag=True, help="Only the IPv4 address.")
@click.option("-6", "only6", is_flag=True, help="Only the IPv6 address.")
@socket_option
def command(only4: bool, only6: bool, socket_path: str) -> None:
    """Print this node's tailnet addresses, one a line."""
    st = run(local(socket_path).status())
    addrs = [a.split("/")[0] for a in st.self_node.addresses]
    if only4 != only6:  # one flag narrows; both or neither print every address
        addrs = [a for a in addrs if (":" in a) == only6]
    if not addrs:
        raise TailpyError("this node has no tailnet address yet: run `tailpy up`")
    for a in addrs:
        click.echo(a)
