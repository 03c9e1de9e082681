"""`tailpy control` (placeholder until its owner lands it)."""

import click


@click.command("control")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy control is not built yet")
