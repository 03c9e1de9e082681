"""`tailpy down`: disconnect from the tailnet (the node stays registered).

``down`` always ends with the tunnel gone and the host's DNS restored: when tailpyd does not answer on its
socket within :data:`DOWN_TIMEOUT` seconds (wedged, stopped, or its disk full), the daemon holding the
state directory's lock (:mod:`tailpy.daemon.lock`) is sent SIGTERM (and SIGCONT), then SIGKILL after
:data:`KILL_AFTER` seconds, and what it left is undone (:func:`tailpy.daemon.cleanup.cleanup_after`); when
no daemon runs, what a crashed one left is undone, as ``tailpyd --cleanup`` does. The state directory is
``--state-dir``, else the one tailpyd recorded beside its socket (``<socket>.state-dir``), else the default.
"""

from __future__ import annotations

import os
import signal
import time

import click

from tailpy.cli.common import run, socket_option
from tailpy.cli.safetext import say_lines
from tailpy.daemon.cleanup import cleanup_after
from tailpy.daemon.client import DaemonUnresponsiveError, LocalClient, default_state_dir
from tailpy.daemon.lock import RunRecord, holder, leftover, state_dir_of_socket
from tailpy.errors import DaemonNotRunningError, PermissionDeniedError, TailpyError

DOWN_TIMEOUT = 10.0
"""Seconds ``down`` waits for tailpyd's answer before stopping it by signal."""

KILL_AFTER = 10.0
"""Seconds between SIGTERM and SIGKILL."""


def _wait_released(state_dir: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while holder(state_dir) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise PermissionDeniedError(
            f"not allowed to stop tailpyd (pid {pid}): run this as root (sudo)"
        ) from None


def stop_by_signal(record: RunRecord, state_dir: str) -> str:
    """Stop the daemon of ``record`` (holding ``state_dir``'s lock) by signal, then clean up after it;
    returns how it went, one sentence. Raises TailpyError when it cannot be stopped."""
    pid = record.pid
    if pid is None:
        raise TailpyError(f"tailpyd holds {state_dir} but its pid is unknown: stop it by hand")
    _signal(pid, signal.SIGTERM)
    _signal(pid, signal.SIGCONT)  # a stopped (SIGSTOP) daemon handles SIGTERM only once continued
    how = "SIGTERM"
    if not _wait_released(state_dir, KILL_AFTER):
        _signal(pid, signal.SIGKILL)
        how = "SIGKILL"
        if not _wait_released(state_dir, 5.0):
            raise TailpyError(f"tailpyd (pid {pid}) did not exit even after SIGKILL")
    done = cleanup_after(state_dir, record)
    return f"stopped tailpyd (pid {pid}) with {how}" + (f"; {'; '.join(done)}" if done else "")


def _state_dir(ctx: click.Context, socket_path: str, state_dir: str) -> str:
    """``--state-dir`` when given on the command line, else the one the daemon that served on
    ``socket_path`` recorded beside it (:func:`tailpy.daemon.lock.state_dir_of_socket`), else the default."""
    if ctx.get_parameter_source("state_dir") == click.core.ParameterSource.COMMANDLINE:
        return state_dir
    return state_dir_of_socket(socket_path) or state_dir


def clean_up_crashed(state_dir: str, socket_path: str) -> str:
    """No daemon holds ``state_dir``: undo what one that did not exit cleanly left there (what ``tailpyd
    --cleanup`` does); returns one sentence saying what was removed. Raises PermissionDeniedError when
    there is something to undo and this is not root."""
    old = leftover(state_dir)  # a daemon that did not exit cleanly (kill -9, a crash)
    if old is None:
        return (
            f"tailpyd is not running (nothing answers on {socket_path}, and {state_dir} holds no record of "
            "a daemon that crashed): nothing to stop"
        )
    if os.geteuid() != 0:
        raise PermissionDeniedError(
            f"tailpyd (pid {old.pid}) did not exit cleanly: run `tailpy down` as root (sudo) to undo "
            "what it left (DNS, routes, firewall)"
        )
    done = cleanup_after(state_dir, old)
    return "tailpyd is not running: " + (
        "cleaned up after it: " + "; ".join(done) if done else "it left nothing to clean up"
    )


@click.command("down")
@socket_option
@click.option(
    "--state-dir",
    default=default_state_dir,
    show_default="the one tailpyd on --socket recorded, else $TAILPY_STATE_DIR or /var/lib/tailpy",
    help="tailpyd's state directory (its lock names the daemon to stop when it does not answer, or what a "
    "crashed one left).",
)
@click.pass_context
def command(ctx: click.Context, socket_path: str, state_dir: str) -> None:
    """Disconnect this device from the tailnet. A tailpyd that does not answer is stopped by signal, and
    what a stopped or crashed one left (DNS, TUN, routes, firewall table) is undone."""
    state_dir = _state_dir(ctx, socket_path, state_dir)
    try:
        st = run(LocalClient(socket_path, timeout=DOWN_TIMEOUT).down())
    except DaemonNotRunningError:
        record = holder(state_dir)
        if record is None:
            click.echo(clean_up_crashed(state_dir, socket_path))
            return
        why = f"tailpyd (pid {record.pid}) does not answer on {socket_path}"
    except (DaemonUnresponsiveError, TailpyError) as e:
        if isinstance(e, PermissionDeniedError):
            raise
        record = holder(state_dir)
        if record is None:
            raise
        why = str(e)
    else:
        click.echo("stopped")
        if st.error:
            say_lines(f"tailpy: warning: {st.error}", err=True)
        return
    click.echo(f"{why}: {stop_by_signal(record, state_dir)}")
