"""`tailpy up` (placeholder until its owner lands it)."""

import click


@click.command("up")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy up is not built yet")
