"""`tailpy install-systemd`: write systemd units for tailpyd, the control server and the DERP relay.

The units (package data in :mod:`tailpy.systemd`) get absolute commands for this installation: the
``tailpyd`` and ``tailpy`` scripts beside this interpreter, else on ``$PATH``, else ``<python> -m ...``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from tailpy import systemd
from tailpy.storage import write_atomic

DEFAULT_DEST = "/etc/systemd/system"


def _command(script: str, module: str) -> str:
    beside = Path(sys.executable).parent / script
    if beside.is_file():
        return str(beside)
    found = shutil.which(script)
    if found:
        return str(Path(found).resolve())
    return f"{sys.executable} -m {module}"


def commands() -> tuple[str, str]:
    """The (tailpyd, tailpy) command lines the units run."""
    return _command("tailpyd", "tailpy.daemon"), _command("tailpy", "tailpy.cli.main")


@click.command("install-systemd")
@click.option(
    "--dest",
    default=DEFAULT_DEST,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the units into.",
)
@click.option("--dry-run", is_flag=True, help="Print the units instead of writing them.")
def command(dest: Path, dry_run: bool) -> None:
    """Write systemd units: tailpyd.service (Type=notify, state in /var/lib/tailpy, restarted on failure,
    DNS restored when it stops), tailpy-control.service and tailpy-derp.service (a dynamic user each, a
    StateDirectory, sandboxed). Settings go in /etc/default/<unit name>; then `systemctl daemon-reload` and
    `systemctl enable --now tailpyd`."""
    tailpyd, tailpy = commands()
    for name in systemd.UNITS:
        text = systemd.render(name, tailpyd, tailpy)
        path = dest / name
        if dry_run:
            click.echo(f"# {path}\n{text}")
            continue
        write_atomic(path, text.encode(), mode=0o644, what="systemd unit")
        click.echo(f"wrote {path}")
    if not dry_run:
        click.echo("next: systemctl daemon-reload && systemctl enable --now tailpyd")
