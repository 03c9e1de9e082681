"""The ``tailpy`` command: one module per subcommand, logic in the library."""

from __future__ import annotations

import sys

import click

from tailpy.errors import TailpyError


class _Group(click.Group):
    """Turns tailpy's expected errors into one sentence on stderr (exit 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except TailpyError as e:
            click.echo(f"tailpy: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tailpy: a mesh VPN. Run `tailpy up` on every device to join one private network."""


def _register() -> None:
    from tailpy.cli import (
        control,
        demo,
        derp,
        down,
        exit_node,
        install_systemd,
        ip,
        login,
        logout,
        metrics,
        netcheck,
        ping,
        status,
        up,
        whois,
    )
    from tailpy.cli import set as set_cmd

    for mod in (
        up,
        set_cmd,
        login,
        down,
        logout,
        status,
        ip,
        ping,
        whois,
        exit_node,
        netcheck,
        metrics,
        control,
        derp,
        demo,
        install_systemd,
    ):
        cli.add_command(mod.command)


_register()


def main() -> None:
    cli(prog_name="tailpy")


if __name__ == "__main__":
    main()
