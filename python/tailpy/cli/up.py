"""`tailpy up`: connect this device to a tailnet, starting tailpyd if it is not running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from tailpy.cli.common import FiniteFloatRange, local, run, socket_option, state_dir_option
from tailpy.cli.login import wait_login
from tailpy.cli.set import (
    Boolean,
    awaiting_note,
    route_options,
    route_prefs,
    router_note,
    routes_answered,
)
from tailpy.daemon.client import LocalClient
from tailpy.daemon.lock import EXIT_ALREADY_RUNNING, holder
from tailpy.daemon.netfilter import MODES
from tailpy.errors import (
    ConfigError,
    DaemonNotRunningError,
    DaemonRunningError,
    PermissionDeniedError,
    TailpyError,
)
from tailpy.ipnstate import Status
from tailpy.storage import directory_problem, storage_error


def _start_daemon(
    socket_path: str, state_dir: str, netfilter_mode: str | None = None, metrics_listen: str | None = None
) -> subprocess.Popen[bytes]:
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            "tailpy up needs root to start tailpyd (it creates a TUN device, which needs CAP_NET_ADMIN): "
            "run it with sudo"
        )
    try:
        Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(Path(state_dir) / "tailpyd.log", "ab")  # noqa: SIM115 - handed to the child
    except OSError as e:
        raise storage_error(e, Path(state_dir) / "tailpyd.log", "tailpyd's log") from None
    extra = ["--netfilter-mode", netfilter_mode] if netfilter_mode else []
    if metrics_listen:
        extra += ["--metrics-listen", metrics_listen]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tailpy.daemon",
            "--state-dir",
            state_dir,
            "--socket",
            socket_path,
            "--exit-on-down",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


async def _wait_daemon(client: LocalClient, proc: subprocess.Popen[bytes], state_dir: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            await client.status()
            return
        except DaemonNotRunningError:
            if proc.poll() is not None:
                if proc.returncode == EXIT_ALREADY_RUNNING:  # a racing `tailpy up` started one first
                    running = holder(state_dir)
                    raise DaemonRunningError(running.pid if running else None) from None
                raise TailpyError("tailpyd exited at start: " + _start_failure(proc, state_dir)) from None
            await asyncio.sleep(0.1)
    raise TailpyError(f"tailpyd did not answer on {client.socket_path} within 15 s")


def _start_failure(proc: subprocess.Popen[bytes], state_dir: str) -> str:
    """Why tailpyd exited at start: its one-sentence error from the log, else why the state directory
    cannot be written (a full disk leaves the log empty too), else the last log lines or the exit code."""
    try:
        lines = (Path(state_dir) / "tailpyd.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    fatal = [ln for ln in lines[-5:] if ln.startswith("tailpyd: ")]
    if fatal:
        return fatal[-1].removeprefix("tailpyd: ")
    problem = directory_problem(state_dir)
    if problem:
        return problem
    return " | ".join(lines[-3:]) or f"exit code {proc.returncode}"


async def _up(
    socket_path: str,
    state_dir: str,
    login_server: str,
    auth_key: str | None,
    hostname: str | None,
    timeout: float,
    force_reauth: bool,
    console: Console,
    qr: bool = False,
    accept_dns: bool | None = None,
    netfilter_mode: str | None = None,
    advertise_tags: list[str] | None = None,
    routes: dict[str, Any] | None = None,
    metrics_listen: str | None = None,
) -> Status:
    client = local(socket_path)
    started = False
    try:
        await client.status()
        if metrics_listen:
            console.print("tailpyd is already running: --metrics-listen applies when `tailpy up` starts it")
    except DaemonNotRunningError:
        running = holder(state_dir)
        if running is not None:  # a daemon holds the state directory but does not answer on this socket
            raise DaemonRunningError(running.pid) from None
        console.print(f"starting tailpyd (state {state_dir}, socket {socket_path}, log tailpyd.log there)")
        proc = _start_daemon(socket_path, state_dir, netfilter_mode, metrics_listen)
        await _wait_daemon(client, proc, state_dir)
        started = True
    try:
        with console.status(f"registering with {login_server or 'the login server'}"):
            st = await client.up(
                login_server,
                auth_key,
                hostname,
                force_reauth,
                accept_dns,
                netfilter_mode,
                advertise_tags,
                routes,
            )
    except TailpyError:
        if started:  # leave nothing running behind a failed first `up`
            with contextlib.suppress(TailpyError):
                await client.down()
        raise
    if st.login_pending:
        st = await wait_login(client, st, console, qr)
    deadline = time.monotonic() + timeout
    with console.status("waiting for the netmap") as spinner:
        while st.backend_state != "Running":
            if not st.control_connected and st.error:
                spinner.update(f"waiting for control ({st.error})")
            if st.backend_state == "NeedsLogin":
                raise TailpyError(
                    st.error or "this node needs login: run `tailpy login` (or `tailpy up --auth-key KEY`)"
                )
            if time.monotonic() > deadline:
                raise TailpyError(
                    f"not connected after {timeout:.0f} s (state {st.backend_state}"
                    + (f": {st.error}" if st.error else "")
                    + ")"
                )
            spinner.update(f"waiting for the netmap ({st.backend_state})")
            await asyncio.sleep(0.1)
            st = await client.status()
    return st


@click.command("up")
@click.option(
    "--login-server",
    default="",
    envvar="TAILPY_LOGIN_SERVER",
    help="URL of the coordination server, e.g. http://192.0.2.1:8080, or the URLs of its replicas "
    "separated by commas (the node moves to the next when its replica goes away); default: the last used.",
)
@click.option(
    "--auth-key",
    envvar="TAILPY_AUTH_KEY",
    default=None,
    help="Pre-auth key from `tailpy control authkey create` (not needed to reconnect; without one, a control "
    "server with a login provider prints a link to sign in at).",
)
@click.option("--hostname", default=None, help="Name to ask for (default: the host name).")
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=FiniteFloatRange(min=1),
    help="Seconds to wait for the connection.",
)
@click.option(
    "--force-reauth",
    is_flag=True,
    help="Log in again with a new node key (and --auth-key, or in a browser), even if logged in.",
)
@click.option("--qr", is_flag=True, help="Also show the login URL as a QR code.")
@click.option(
    "--accept-dns",
    type=Boolean(),
    default=None,
    is_flag=False,
    flag_value=True,  # a bare --accept-dns means true; it never takes the next argument as its value
    help="Point this host's resolver at MagicDNS (default true; --accept-dns=false leaves it alone; "
    "not given: as the last `up` said).",
)
@click.option(
    "--netfilter-mode",
    type=click.Choice(MODES),
    default=None,
    help="on: tailpyd's nftables table drops packets with a tailnet source address arriving on any "
    "interface but its TUN (the default); off: leave the host's nftables alone.",
)
@click.option(
    "--advertise-tags",
    default=None,
    metavar="TAGS",
    help="Ask control to tag this node: comma-separated tags (tag:web,tag:db; each starts with tag:). "
    "Granted only when this node's owner (or its auth key's creator) owns them in the policy's tagOwners; "
    "kept for later `up`s (not given: as the last `up` said; empty: ask for none, which a tagged node "
    "gets only by logging in again as a user: --force-reauth with a user's auth key; else an error).",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="When this starts tailpyd: have it serve GET /metrics (Prometheus) over TCP on HOST:PORT too "
    "(`tailpy metrics` reads them from the local socket either way).",
)
@route_options
@socket_option
@state_dir_option
def command(
    login_server: str,
    auth_key: str | None,
    hostname: str | None,
    timeout: float,
    force_reauth: bool,
    qr: bool,
    accept_dns: bool | None,
    netfilter_mode: str | None,
    advertise_tags: str | None,
    advertise_routes: str | None,
    advertise_exit_node: bool | None,
    accept_routes: bool | None,
    exit_node: str | None,
    exit_node_allow_lan_access: bool | None,
    snat_subnet_routes: bool | None,
    metrics_listen: str | None,
    socket_path: str,
    state_dir: str,
) -> None:
    """Connect this device to the tailnet; shows progress until it is connected. Without --auth-key, a
    control server with a login provider prints a URL to sign in at, and this waits until you have.
    Preferences not given (--accept-dns, --advertise-tags, the route flags) stay as the last `up` or
    `set` left them."""
    check_auth_key(auth_key)
    routes = route_prefs(
        advertise_routes,
        advertise_exit_node,
        accept_routes,
        exit_node,
        exit_node_allow_lan_access,
        snat_subnet_routes,
    )
    console = Console(stderr=True)
    st = run(
        _up(
            os.path.abspath(socket_path),
            os.path.abspath(state_dir),
            login_server,
            auth_key,
            hostname,
            timeout,
            force_reauth,
            console,
            qr,
            accept_dns,
            netfilter_mode,
            _tags(advertise_tags),
            routes,
            metrics_listen,
        )
    )
    click.echo(connected_line(st))
    kept = kept_tags(_tags(advertise_tags), st.self_node.tags)
    if kept:
        raise ConfigError(kept)
    advertised = {"advertise_routes", "advertise_exit_node"} & set(routes)
    if advertised:
        st = run(routes_answered(LocalClient(os.path.abspath(socket_path)), st))
    notes = (
        name_note(hostname, st),
        awaiting_note(st) if advertised else "",
        router_note(st) if routes.get("exit_node") else "",
    )
    for note in notes:
        if note:
            console.print(note, highlight=False, markup=False, soft_wrap=True)


def name_note(hostname: str | None, st: Status) -> str:
    """What to tell a user who asked for ``hostname`` (``--hostname``) and got another node name: control
    has not taken the new hostname yet (it was unreachable: tailpyd asks again at its next map request), the
    name is taken or reserved (control added a suffix), or control says an admin set the name, which it
    keeps. "" when the name is the one asked for (or none was)."""
    from tailpy.control.names import RESERVED, sanitize

    if not hostname:
        return ""
    want, got = sanitize(hostname), st.self_node.name.split(".")[0]
    if not got or got == want:
        return ""
    me = st.self_node
    if me.name_pending or not (me.name_by_admin or got.startswith(want[:50])):
        return (
            f"note: the new name {want} is pending: control has not taken it yet, and this node is {got} "
            "until it does (tailpyd asks again when control answers)"
        )
    if not me.name_by_admin:
        why = "is reserved" if want in RESERVED else "is taken by another node"
        return f"note: the name {want} {why}: this node is {got}"
    return (
        f"note: this node keeps its name {got}: an admin named it, and control keeps that name (an admin "
        f"can change it with `tailpy control nodes rename {got} {want}`)"
    )


def kept_tags(asked: list[str] | None, tags: Sequence[str]) -> str:
    """Why a node asked for no tags (``--advertise-tags=``, ``asked`` empty) still has ``tags``: control
    never takes all of a tagged node's tags away on its own request (a tagged node has no owner left to
    fall back to). As in Tailscale, only logging in again as a user (``--force-reauth`` with a user's auth
    key, or in a browser) turns it back into that user's node. "" when there is nothing to say."""
    if asked is None or asked or not tags:
        return ""
    return (
        f"this node keeps its tags ({', '.join(tags)}): a tagged node cannot drop all its tags by asking; "
        "log in again as a user to untag it (`tailpy up --force-reauth --advertise-tags= --auth-key KEY` "
        "with a user's auth key), or ask an admin to retag it (`tailpy control nodes tag`)"
    )


def check_auth_key(auth_key: str | None) -> None:
    """An auth key given but empty (``--auth-key ""``, or TAILPY_AUTH_KEY set to nothing) is a mistake, not
    "no key": raises click.UsageError."""
    if auth_key is not None and not auth_key.strip():
        raise click.UsageError("--auth-key is empty (or TAILPY_AUTH_KEY is set to nothing): give the key")


def _tags(text: str | None) -> list[str] | None:
    """``--advertise-tags`` -> tags, None when not given. Each must start with ``tag:``, as tailscale's
    (``tailcfg.CheckTag``: "tags must start with 'tag:'"); raises ConfigError for one that does not or is
    otherwise malformed."""
    if text is None:
        return None
    from tailpy.control.tags import parse_tags

    given = [t.strip() for t in text.split(",") if t.strip()]
    for t in given:
        if not t.startswith("tag:"):
            raise ConfigError(f'--advertise-tags: {t!r} is not a tag: tags start with "tag:" (tag:{t})')
    return list(parse_tags(given))


def connected_line(st: Status) -> str:
    """``connected: <name> <addresses> (<n> peers)`` from tailpyd's status."""
    me = st.self_node
    return (
        f"connected: {me.name or me.hostname} {' '.join(a.split('/')[0] for a in me.addresses)}"
        f" ({len(st.peers)} peer{'' if len(st.peers) == 1 else 's'})"
    )
