"""`tailpy down` (placeholder until its owner lands it)."""

import click


@click.command("down")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy down is not built yet")
