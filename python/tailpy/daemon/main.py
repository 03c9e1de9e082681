"""``tailpyd``: the node daemon (also ``python -m tailpy.daemon``)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys

import click

from tailpy.daemon import netfilter
from tailpy.daemon.api import make_app, serve
from tailpy.daemon.backend import Backend
from tailpy.daemon.cleanup import cleanup
from tailpy.daemon.client import default_socket, default_state_dir
from tailpy.daemon.lock import EXIT_ALREADY_RUNNING, DaemonLock, RunRecord
from tailpy.daemon.sdnotify import notify
from tailpy.daemon.session import ROTATE_BEFORE
from tailpy.daemon.state import StateStore
from tailpy.errors import DaemonRunningError, TailpyError
from tailpy.storage import is_storage_errno, storage_error

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
    netfilter_mode: str = "on",
) -> None:
    """Serve the node until SIGTERM/SIGINT (or ``down`` with ``exit_on_down``). The caller holds the state
    directory's lock (:class:`tailpy.daemon.lock.DaemonLock`). Tells systemd READY=1 once the node is up or
    waiting for login (:func:`tailpy.daemon.sdnotify.notify`)."""
    from tailpy._native import Device

    def factory(private_key: bytes) -> Device:
        return Device(private_key, tun_name=tun, listen_port=port, mtu=mtu)

    from tailpy.dns.manager import DNSManager

    dns = DNSManager(state_dir) if magicdns else None
    backend = Backend(
        StateStore(state_dir),
        factory,
        tun_mtu=mtu,
        rotate_before=rotate_before,
        dns=dns,
        firewall=netfilter.Firewall(netfilter_mode),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    runner = await serve(make_app(backend, on_down=stop.set if exit_on_down else None), socket_path)
    log.info("tailpyd listening on %s (state %s)", socket_path, state_dir)
    try:
        await backend.start()
        notify("READY=1", f"STATUS={backend.backend_state}")
        await stop.wait()
    finally:
        notify("STOPPING=1")
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
@click.option(
    "--netfilter-mode",
    type=click.Choice(netfilter.MODES),
    default="on",
    show_default=True,
    help="on: an nftables table of tailpyd's own drops packets with a tailnet source address arriving on "
    "any interface but the TUN; off: leave the host's nftables alone.",
)
@click.option(
    "--cleanup",
    "cleanup_only",
    is_flag=True,
    help="Do not run: undo what a tailpyd that did not exit cleanly left (the host's resolv.conf, MagicDNS "
    "addresses, its TUN, routes and nftables table), then exit (systemd's ExecStopPost).",
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
    netfilter_mode: str,
    cleanup_only: bool,
    verbose: bool,
) -> None:
    """tailpyd: the tailpy node daemon. One runs per state directory: a second one exits (status 3)
    saying which pid holds it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    lock = DaemonLock(state_dir)
    try:
        lock.acquire()  # before the socket, the TUN, DNS or the state file
    except DaemonRunningError as e:
        click.echo(f"tailpyd: {e}", err=True)
        sys.exit(EXIT_ALREADY_RUNNING)
    except TailpyError as e:
        click.echo(f"tailpyd: {e}", err=True)
        sys.exit(1)
    try:
        prev = lock.previous
        if prev is not None and not cleanup_only:
            log.warning("tailpyd (pid %s) did not exit cleanly: undoing what it left", prev.pid)
        done = cleanup(state_dir, (tun, prev.tun if prev else ""))
        if cleanup_only:
            click.echo("cleaned up: " + "; ".join(done) if done else "nothing to clean up")
            return
        table = netfilter.table_name(tun) if netfilter_mode == "on" else ""
        lock.record(RunRecord(pid=os.getpid(), tun=tun, socket=socket_path, netfilter_table=table))
        asyncio.run(
            run(state_dir, socket_path, tun, port, mtu, exit_on_down, rotate_before, magicdns, netfilter_mode)
        )
    except TailpyError as e:
        click.echo(f"tailpyd: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        log.debug("tailpyd failed", exc_info=True)
        if is_storage_errno(e) and e.filename:
            e = storage_error(e, e.filename, "file")
        click.echo(f"tailpyd: {e}", err=True)
        sys.exit(1)
    finally:
        lock.release()


if __name__ == "__main__":
    main()
