"""``tailpyd``: the node daemon (also ``python -m tailpy.daemon``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

import click
from aiohttp import web

from tailpy import bypass
from tailpy.daemon import netfilter
from tailpy.daemon.api import make_app, serve
from tailpy.daemon.backend import Backend
from tailpy.daemon.cleanup import USERSPACE_TUN, cleanup_after
from tailpy.daemon.client import default_socket, default_state_dir
from tailpy.daemon.lock import (
    EXIT_ALREADY_RUNNING,
    STATE_DIR_SUFFIX,
    DaemonLock,
    RunRecord,
    write_state_dir_pointer,
)
from tailpy.daemon.metrics import node_registry
from tailpy.daemon.router import BYPASS_MARK, FORWARDING_RECORD, PlanRouter
from tailpy.daemon.sdnotify import notify
from tailpy.daemon.session import ROTATE_BEFORE
from tailpy.daemon.state import StateStore
from tailpy.errors import ConfigError, DaemonRunningError, ParseError, TailpyError
from tailpy.httpguard import MULTILINE, install_log_guards
from tailpy.metrics import start_metrics_listener
from tailpy.netstack import Netstack, UserspaceDevice, check_peer, lookup
from tailpy.proxy import ProxyServer, parse_listen, start_http_proxy, start_socks5
from tailpy.rlimits import raise_nofile_limit
from tailpy.storage import is_storage_errno, storage_error

log = logging.getLogger("tailpy.daemon")

USERSPACE = USERSPACE_TUN
"""``--tun`` value for a userspace data plane (tailscaled's name for it)."""


def parse_metrics_listen(text: str) -> tuple[str | None, int]:
    """``--metrics-listen``'s HOST:PORT (``[v6]:PORT``, ``:PORT`` for every address). Raises ConfigError."""
    from tailpy.control.options import parse_listen as parse_host_port

    return parse_host_port(text, "--metrics-listen")


def _log_tasks() -> None:
    """SIGUSR1: log the stack of every asyncio task (what the daemon is waiting on)."""
    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue(), extra={MULTILINE: True})


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
    socks5_server: str = "",
    http_proxy: str = "",
    metrics_listen: str = "",
) -> None:
    """Serve the node until SIGTERM/SIGINT (or ``down`` with ``exit_on_down``). The caller holds the state
    directory's lock (:class:`tailpy.daemon.lock.DaemonLock`). Tells systemd READY=1 once the node is up or
    waiting for login (:func:`tailpy.daemon.sdnotify.notify`).

    ``tun`` :data:`USERSPACE` runs the node on a userspace data plane (no TUN, no root; MagicDNS, routes and
    the firewall left alone) with a SOCKS5 proxy on ``socks5_server`` and an HTTP proxy on ``http_proxy``
    ("host:port"; "" none) into the tailnet (:mod:`tailpy.proxy`). ``metrics_listen`` ("host:port"; "" none):
    also serve ``GET /metrics`` there over TCP (:mod:`tailpy.daemon.metrics`)."""
    from tailpy._native import Device

    userspace = tun == USERSPACE
    backend: Backend
    if userspace:
        if not hasattr(Device, "userspace"):
            raise ConfigError(
                "this build of tailpy has no userspace data plane (Device.userspace): rebuild the extension"
            )

        def userspace_factory(private_key: bytes) -> Any:
            return Device.userspace(private_key, port, [], mtu)

        backend = Backend(
            StateStore(state_dir), userspace_factory, tun_mtu=mtu, rotate_before=rotate_before, userspace=True
        )
    else:
        # Every underlay socket carries the bypass mark, so policy routing keeps it out of the tunnel
        # (:mod:`tailpy.daemon.router`): the Python ones (control, DERP, DNS upstreams) from now on...
        bypass.set_mark(BYPASS_MARK)

        def factory(private_key: bytes) -> Device:
            dev = Device(private_key, tun_name=tun, listen_port=port, mtu=mtu)
            try:
                dev.set_fwmark(BYPASS_MARK)  # ...and the data plane's UDP socket (WireGuard, STUN, disco)
            except TailpyError as e:
                log.warning("%s: with an exit node in use, WireGuard may loop into the tunnel", e)
            return dev

        from tailpy.dns.manager import DNSManager

        dns = DNSManager(state_dir) if magicdns else None
        firewall = netfilter.Firewall(netfilter_mode)
        record = Path(state_dir) / FORWARDING_RECORD

        def router_factory(tun_name: str) -> PlanRouter:
            return PlanRouter(tun_name, mtu=mtu, firewall=firewall, record=record)

        backend = Backend(
            StateStore(state_dir),
            factory,
            tun_mtu=mtu,
            rotate_before=rotate_before,
            dns=dns,
            firewall=firewall,
            router_factory=router_factory,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    registry = node_registry(backend.status)
    runner = await serve(
        make_app(backend, on_down=stop.set if exit_on_down else None, registry=registry), socket_path
    )
    log.info("tailpyd listening on %s (state %s)", socket_path, state_dir)
    proxies: list[ProxyServer] = []
    stack: Netstack | None = None
    metrics_runner: web.AppRunner | None = None
    try:
        if metrics_listen:
            host, mport = parse_metrics_listen(metrics_listen)
            try:
                metrics_runner = await start_metrics_listener(registry, host, mport)
            except OSError as e:
                raise ConfigError(
                    f"cannot listen on --metrics-listen {metrics_listen}: {e.strerror or e}"
                ) from None
            log.info("metrics served at http://%s/metrics", metrics_listen)
        if socks5_server or http_proxy:
            stack = Netstack(
                lambda: cast(UserspaceDevice | None, backend.device),
                lambda host: lookup(backend.netmap, host),
                lambda version: next(
                    (a.split("/")[0] for a in backend.state_data.addresses if (":" in a) == (version == 6)),
                    "0.0.0.0" if version == 4 else "::",
                ),
                lambda ip: check_peer(backend.netmap, ip),
                mtu,
            )
            if socks5_server:
                proxies.append(await start_socks5(socks5_server, stack.open_connection))
            if http_proxy:
                proxies.append(await start_http_proxy(http_proxy, stack.open_connection))
        await backend.start()
        notify("READY=1", f"STATUS={backend.backend_state}")
        await stop.wait()
    finally:
        notify("STOPPING=1")
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        for proxy in proxies:
            await proxy.close()
        if stack is not None:
            await stack.close()
        await backend.close()
        bypass.set_mark(None)
        if stack is not None:
            await stack.wait_threads()
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        with contextlib.suppress(OSError):
            os.unlink(socket_path + STATE_DIR_SUFFIX)  # a clean exit leaves nothing to clean up
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
@click.option(
    "--tun",
    default="tailpy0",
    show_default=True,
    help=f"TUN interface name, or {USERSPACE} for a userspace data plane: no TUN and no root; programs reach "
    "the tailnet through --socks5-server / --outbound-http-proxy-listen.",
)
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
@click.option(
    "--socks5-server",
    default="",
    metavar="ADDR",
    help=f"With --tun {USERSPACE}: run a SOCKS5 proxy (RFC 1928, no auth, CONNECT) into the tailnet on ADDR "
    "(host:port, e.g. localhost:1080); tailnet names are resolved by the node.",
)
@click.option(
    "--outbound-http-proxy-listen",
    "http_proxy",
    default="",
    metavar="ADDR",
    help=f"With --tun {USERSPACE}: run an HTTP proxy (CONNECT and absolute http:// URIs) into the tailnet on "
    "ADDR (host:port).",
)
@click.option(
    "--metrics-listen",
    default="",
    metavar="ADDR",
    help="Also serve GET /metrics (Prometheus; `tailpy metrics` reads it from the local API) over TCP on "
    "ADDR (host:port, e.g. 127.0.0.1:9101), to anyone who reaches it.",
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
    socks5_server: str,
    http_proxy: str,
    metrics_listen: str,
    verbose: bool,
) -> None:
    """tailpyd: the tailpy node daemon. One runs per state directory: a second one exits (status 3)
    saying which pid holds it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    install_log_guards()  # one line per record: control characters from requests escaped
    raise_nofile_limit()  # soft open-files limit up to the hard one, as Go programs do
    userspace = tun == USERSPACE
    if (socks5_server or http_proxy) and not userspace:
        click.echo(
            f"tailpyd: --socks5-server and --outbound-http-proxy-listen need --tun {USERSPACE}", err=True
        )
        sys.exit(2)
    for flag, value in (("--socks5-server", socks5_server), ("--outbound-http-proxy-listen", http_proxy)):
        if value:
            try:
                parse_listen(value)
            except ParseError as e:
                click.echo(f"tailpyd: {flag}: {e}", err=True)
                sys.exit(2)
    if metrics_listen:
        try:
            parse_metrics_listen(metrics_listen)
        except ConfigError as e:
            click.echo(f"tailpyd: {e}", err=True)
            sys.exit(2)
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
        done = cleanup_after(state_dir, prev)
        if cleanup_only:
            click.echo("cleaned up: " + "; ".join(done) if done else "nothing to clean up")
            return
        table = netfilter.table_name(tun) if netfilter_mode == "on" and not userspace else ""
        lock.record(
            RunRecord(
                pid=os.getpid(), tun="" if userspace else tun, socket=socket_path, netfilter_table=table
            )
        )
        write_state_dir_pointer(socket_path, state_dir)  # `tailpy down --socket` finds a crashed daemon's
        asyncio.run(
            run(
                state_dir,
                socket_path,
                tun,
                port,
                mtu,
                exit_on_down,
                rotate_before,
                magicdns,
                netfilter_mode,
                socks5_server,
                http_proxy,
                metrics_listen,
            )
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
