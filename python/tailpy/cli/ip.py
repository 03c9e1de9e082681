"""`tailpy ip` (placeholder until its owner lands it)."""

import click


@click.command("ip")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy ip is not built yet")
