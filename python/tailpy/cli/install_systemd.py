"""`tailpy install-systemd`: write systemd units for tailpyd, the control server and the DERP relay.

The units (package data in :mod:`tailpy.systemd`) get absolute commands for this installation: the
``tailpyd`` and ``tailpy`` scripts beside this interpreter, else on ``$PATH``, else ``<python> -m ...``.
Their sandbox (``PrivateTmp=yes``, ``ProtectHome=yes``, a ``DynamicUser``) hides /tmp, /var/tmp, /home
and /root from the service, so an installation there fails to start (status 203/EXEC): the command warns.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import click

import tailpy
from tailpy import systemd
from tailpy.storage import write_atomic

DEFAULT_DEST = "/etc/systemd/system"
HIDDEN = (Path("/tmp"), Path("/var/tmp"), Path("/home"), Path("/root"))
"""Directories the units' sandbox hides from the service (systemd.exec(5): PrivateTmp=, ProtectHome=)."""


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


def hidden_path(paths: Iterable[str | Path]) -> Path | None:
    """The first of ``paths`` (as given, or with symlinks resolved) under a directory in :data:`HIDDEN`,
    or None."""
    for p in paths:
        for candidate in (Path(p), Path(p).resolve()):
            if any(candidate.is_relative_to(d) for d in HIDDEN):
                return candidate
    return None


def _programs(command_lines: Iterable[str]) -> list[str]:
    """The executable of each command line, and this tailpy package's directory (which ``-m`` imports)."""
    return [shlex.split(c)[0] for c in command_lines] + [str(Path(tailpy.__file__).parent)]


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
    tailpyd, tailpy_cmd = commands()
    hidden = hidden_path(_programs((tailpyd, tailpy_cmd)))
    if hidden is not None:
        click.echo(
            f"warning: {hidden} is under {', '.join(map(str, HIDDEN))}, which the units' sandbox hides "
            "(they would fail with status 203/EXEC): install tailpy system-wide first, e.g. "
            "`python3 -m venv /opt/tailpy && /opt/tailpy/bin/pip install tailpy`, and run "
            "/opt/tailpy/bin/tailpy install-systemd",
            err=True,
        )
    for name in systemd.UNITS:
        text = systemd.render(name, tailpyd, tailpy_cmd)
        path = dest / name
        if dry_run:
            click.echo(f"# {path}\n{text}")
            continue
        write_atomic(path, text.encode(), mode=0o644, what="systemd unit")
        click.echo(f"wrote {path}")
    if not dry_run and dest == Path(DEFAULT_DEST):
        click.echo("next: systemctl daemon-reload && systemctl enable --now tailpyd")
