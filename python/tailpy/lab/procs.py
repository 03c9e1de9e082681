"""Process helpers for the lab: polling with a timeout, stopping a process by pid, reading a line in time.

Nothing here sleeps for a fixed time where a condition can be polled instead.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from typing import IO, TypeVar

from tailpy.errors import LabError

T = TypeVar("T")

#: Seconds a process gets between SIGTERM and SIGKILL.
GRACE = 3.0


def wait_for(
    predicate: Callable[[], T | bool | None], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that.

    Raises LabError ("timed out after N s waiting for <what>") when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = GRACE) -> int | None:
    """Stop ``proc`` and its process group (the lab starts each process in its own session): SIGTERM, then
    SIGKILL after ``grace`` seconds. Signals go by pid only. Returns the exit status; idempotent."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    else:
        # The leader is gone; children left in its group (same pgid) still get a SIGKILL.
        _signal_group(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pgid, sig)


def read_line(stream: IO[str], timeout: float, what: str) -> str:
    """Read one line from a pipe within ``timeout`` seconds. Raises LabError on timeout or end of file."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
    finally:
        sel.close()
    line = stream.readline()
    if not line:
        raise LabError(f"{what}: the process closed its output (it probably exited; see its stderr)")
    return line.rstrip("\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/<pid>/stat; 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
