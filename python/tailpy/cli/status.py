"""`tailpy status` (placeholder until its owner lands it)."""

import click


@click.command("status")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy status is not built yet")
