"""`tailpy demo` (placeholder until its owner lands it)."""

import click


@click.command("demo")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("tailpy demo is not built yet")
