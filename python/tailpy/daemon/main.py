"""``tailpyd``: the node daemon (also ``python -m tailpy.daemon``)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys

import click

from tailpy.daemon.api import make_app, serve
from tailpy.daemon.backend import Backend
from tailpy.daemon.client import default_socket, default_state_dir
from tailpy.daemon.session import ROTATE_BEFORE
from tailpy.daemon.state import StateStore
from tailpy.errors import TailpyError

log = logging.getLogger("tailpy.daemon")


def _log_tasks() -> None:
    """SIGUSR1: log the stack of every asyncio task (what the daemon is waiting on)."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


async def run(
    state_dir: str,
    socket_path: str,
    tun: str,
    port: int,
    mtu: int,
    exit_on_down: bool,
    rotate_before: float,
    magicdns: bool = True,
) -> None:
    from tailpy._native import Device

    def factory(private_key: bytes) -> Device:
        return Device(private_key, tun_name=tun, listen_port=port, mtu=mtu)

    from tailpy.dns.manager import DNSManager

    dns = DNSManager(state_dir) if magicdns else None
    backend = Backend(StateStore(state_dir), factory, tun_mtu=mtu, rotate_before=rotate_before, dns=dns)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    runner = await serve(make_app(backend, on_down=stop.set if exit_on_down else None), socket_path)
    log.info("tailpyd listening on %s (state %s)", socket_path, state_dir)
    try:
        await backend.start()
        await stop.wait()
    finally:
        await runner.cleanup()
        await backend.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        log.info("tailpyd stopped")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    default=default_state_dir,
    show_default="$TAILPY_STATE_DIR or /var/lib/tailpy",
    help="Directory for the state file (keys).",
)
@click.option(
    "--socket",
    "socket_path",
    default=default_socket,
    show_default="$TAILPY_SOCKET or /run/tailpy/tailpyd.sock",
    help="Local API unix socket.",
)
@click.option("--tun", default="tailpy0", show_default=True, help="TUN interface name.")
@click.option(
    "--port", default=41641, show_default=True, help="UDP port for WireGuard, STUN and disco (0 = any)."
)
@click.option("--mtu", default=1280, show_default=True, help="TUN MTU in bytes.")
@click.option(
    "--exit-on-down", is_flag=True, help="Exit after `tailpy down` (used when `tailpy up` starts it)."
)
@click.option(
    "--rotate-before",
    default=ROTATE_BEFORE,
    show_default=True,
    type=float,
    help="Seconds before the node key expires to rotate it (at most half its lifetime; 0 = never rotate).",
)
@click.option(
    "--magicdns/--no-magicdns",
    default=True,
    show_default=True,
    help="Run the MagicDNS resolver on 100.100.100.100 (port 53).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(
    state_dir: str,
    socket_path: str,
    tun: str,
    port: int,
    mtu: int,
    exit_on_down: bool,
    rotate_before: float,
    magicdns: bool,
    verbose: bool,
) -> None:
    """tailpyd: the tailpy node daemon."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run(state_dir, socket_path, tun, port, mtu, exit_on_down, rotate_before, magicdns))
    except TailpyError as e:
        click.echo(f"tailpyd: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
