"""`tailpy login`: log this device in again (a new node key), in a browser or with --auth-key; and the wait
for an interactive login (OpenID Connect, :mod:`tailpy.control.oidc`) that `tailpy up` shares."""

from __future__ import annotations

import asyncio
import os

import click
from rich.console import Console

from tailpy.cli.common import FiniteFloatRange, run, socket_option, state_dir_option
from tailpy.cli.safetext import say, visible, visible_lines
from tailpy.daemon.client import LocalClient
from tailpy.errors import TailpyError
from tailpy.ipnstate import Status

POLL = 0.2  # seconds between looks at tailpyd's status while waiting for the sign-in


def show_qr(url: str, console: Console) -> None:
    """``url`` as a QR code drawn with block characters (segno), for a phone's camera."""
    import io

    import segno

    out = io.StringIO()
    segno.make(url, error="l").terminal(out=out, compact=True)
    console.file.write(out.getvalue())
    console.file.flush()


async def wait_login(client: LocalClient, st: Status, console: Console, qr: bool) -> Status:
    """While tailpyd waits for an interactive login: print the login URL (again when it changes; with ``qr``
    also as a QR code) and what control says (a refused account, an approval being awaited); return the
    status once the login is done. Raises TailpyError when tailpyd stops waiting without logging in."""
    shown_url, shown_note = "", ""
    announced = False
    while st.login_pending:  # a connected node stays connected (and Running) while it waits
        url = st.auth_url
        if url and url != shown_url:
            # One plain line per piece: a URL wrapped at the terminal width could not be clicked or copied.
            console.print(
                f"\nTo log in, open this page in a browser:\n\n\t{visible(url)}\n",
                soft_wrap=True,
                highlight=False,
                markup=False,
            )
            if qr:
                show_qr(url, console)
            shown_url = url
            announced = False
        note = st.error
        if note and note != shown_note:
            console.print(visible_lines(note), soft_wrap=True, highlight=False, markup=False)
            shown_note = note
        if not announced:
            console.print("waiting for the sign-in to finish (Ctrl-C stops waiting)", highlight=False)
            announced = True
        await asyncio.sleep(POLL)
        st = await client.status()
    if st.backend_state == "NeedsLogin":
        raise TailpyError(st.error or "the login did not finish; run `tailpy login` again")
    return st


@click.command("login")
@click.option(
    "--login-server",
    default="",
    envvar="TAILPY_LOGIN_SERVER",
    help="URL of the coordination server (default: the one used last).",
)
@click.option(
    "--auth-key", envvar="TAILPY_AUTH_KEY", default=None, help="Log in with a pre-auth key instead."
)
@click.option(
    "--hostname", default=None, help="Name to ask for (default: the one used last, or the host name)."
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=FiniteFloatRange(min=1),
    help="Seconds to wait for the connection once logged in.",
)
@click.option("--qr", is_flag=True, help="Also show the login URL as a QR code.")
@socket_option
@state_dir_option
def command(
    login_server: str,
    auth_key: str | None,
    hostname: str | None,
    timeout: float,
    qr: bool,
    socket_path: str,
    state_dir: str,
) -> None:
    """Log this device in (again) with a new node key: for a node whose key expired or that logged out, or
    to switch accounts. Prints a URL to sign in at (unless --auth-key) and waits until you have. A connected
    node stays connected with its current key until the new login succeeds."""
    from tailpy.cli.up import _up, check_auth_key, connected_line

    check_auth_key(auth_key)
    console = Console(stderr=True)
    st = run(
        _up(
            os.path.abspath(socket_path),
            os.path.abspath(state_dir),
            login_server,
            auth_key,
            hostname,
            timeout,
            True,
            console,
            qr,
        )
    )
    say(connected_line(st))
