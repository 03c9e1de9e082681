"""`tailpy control mesh-key --out FILE`: write the DERP mesh key of the control database's region (the key
the embedded relays of its replicas mesh with) to a file, for the standalone relays of the region
(`tailpy derp serve --mesh-psk-file FILE`, Tailscale's derper ``--mesh-psk-file``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from tailpy.cli.control.common import db_option, server_state_dir_option
from tailpy.errors import ConfigError


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (created so, or narrowed first when it exists). Raises
    ConfigError (one sentence)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


@click.command("mesh-key")
@server_state_dir_option
@db_option
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write the key to (mode 0600; 64 hex digits, derper's --mesh-psk-file form).",
)
def command(state_dir: Path, db: str | None, out_path: Path) -> None:
    """Write the DERP mesh key of this control database's region to a file (made now when the database has
    none yet). Give the file to the region's standalone relays (`tailpy derp serve --mesh-psk-file FILE`,
    derper --mesh-psk-file) and to replicas started with --mesh-psk-file."""
    from tailpy.control.store import Store, changes

    store = Store(state_dir, create=False, db=db)
    try:
        with store.engine.begin() as conn:
            key = changes.shared_mesh_key(conn)
    finally:
        store.close()
    write_secret(out_path, key + "\n")
    click.echo(f"wrote the region's DERP mesh key to {out_path} (mode 0600)")


__all__ = ["command", "write_secret"]
