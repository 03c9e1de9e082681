"""DERP client verification with the real CLIs on 127.0.0.1: `tailpy control serve`'s embedded relay admits
only its tailnet's node keys (by default), and `tailpy derp serve --verify-clients --control-url` asks a
control server over HTTP, refusing everyone while that server is down. Every process is stopped by pid."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nacl.public
import pytest

from tailpy.control import ControlClient, Store
from tailpy.derp.client import DerpClient, DerpClientError
from tailpy.keys import MachinePrivate, NodePrivate

SERVE = [sys.executable, "-m", "tailpy.cli.main"]
STEP = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], until: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``tailpy <args>``, read its stderr to a line containing ``until``; (process, log so far)."""
    proc = subprocess.Popen([*SERVE, *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if until in line:
            return proc, "".join(lines)
    _stop(proc)
    pytest.fail(f"tailpy {' '.join(args)} did not log {until!r}: {''.join(lines)[-2000:]}")


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM (then SIGKILL) this pid; the rest of its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rest = proc.stderr.read() if proc.stderr is not None else ""
    if proc.stderr is not None:
        proc.stderr.close()
    return rest


async def _register(state: Path, url: str) -> NodePrivate:
    """A node registered with the control server at ``url`` (an auth key made in ``state``)."""
    store = Store(state)
    try:
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    finally:
        store.close()
    priv = NodePrivate.generate()
    c = ControlClient(url, MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    try:
        await c.register(priv.public, "member", key)
    finally:
        await c.close()
    return priv


async def _connect_eventually(url: str, key: NodePrivate) -> None:
    """Log in (retrying while the relay still refuses), then close; fails after STEP seconds."""
    deadline = time.monotonic() + STEP
    while True:
        try:
            c = await DerpClient.connect(url, key)
        except DerpClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        await c.close()
        return


async def test_embedded_relay_admits_only_tailnet_nodes(tmp_path: Path) -> None:
    derp_port = _free_port()
    ctl, log = _start(
        [
            "control",
            "serve",
            "--state-dir",
            str(tmp_path),
            "--listen",
            "127.0.0.1:0",
            "--derp-listen",
            f"127.0.0.1:{derp_port}",
        ],
        "DERP map:",
    )
    try:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log)
        assert m, log
        member = await _register(tmp_path, m.group(1))
        derp_url = f"http://127.0.0.1:{derp_port}/derp"
        await _connect_eventually(derp_url, member)
        with pytest.raises(DerpClientError, match="admits only known nodes"):
            await DerpClient.connect(derp_url, NodePrivate.generate())
    finally:
        rest = _stop(ctl)
    assert "refused: not an admitted node key" in rest


async def test_embedded_relay_verification_can_be_turned_off(tmp_path: Path) -> None:
    derp_port = _free_port()
    ctl, _ = _start(
        [
            "control",
            "serve",
            "--state-dir",
            str(tmp_path),
            "--listen",
            "127.0.0.1:0",
            "--derp-listen",
            f"127.0.0.1:{derp_port}",
            "--no-derp-verify-clients",
        ],
        "DERP map:",
    )
    try:
        c = await DerpClient.connect(f"http://127.0.0.1:{derp_port}/derp", NodePrivate.generate())
        await c.close()
    finally:
        _stop(ctl)


async def test_derp_serve_verify_clients_asks_control_and_fails_closed(tmp_path: Path) -> None:
    control_state, derp_state = tmp_path / "control", tmp_path / "derp"
    ctl, log = _start(
        ["control", "serve", "--state-dir", str(control_state), "--listen", "127.0.0.1:0", "--no-derp"],
        "listening on",
    )
    derp: subprocess.Popen[str] | None = None
    try:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log)
        assert m, log
        control_url = m.group(1)
        member = await _register(control_state, control_url)
        port = _free_port()
        derp, _ = _start(
            [
                "derp",
                "serve",
                "--state-dir",
                str(derp_state),
                "--listen",
                f"127.0.0.1:{port}",
                "--verify-clients",
                "--control-url",
                control_url,
            ],
            "DERP relay listening",
        )
        url = f"http://127.0.0.1:{port}/derp"
        await _connect_eventually(url, member)
        with pytest.raises(DerpClientError, match="admits only known nodes"):
            await DerpClient.connect(url, NodePrivate.generate())
        _stop(ctl)
        stranger_while_down = NodePrivate.generate()  # (not cached: never asked before)
        with pytest.raises(DerpClientError, match="could not verify"):
            await DerpClient.connect(url, stranger_while_down)
    finally:
        if ctl.poll() is None:
            _stop(ctl)
        rest = _stop(derp) if derp is not None else ""
    assert "could not be verified" in rest and "unreachable" in rest


def test_derp_serve_verify_options_are_checked(tmp_path: Path) -> None:
    for args, sentence in (
        (["--verify-clients"], "pass --control-url"),
        (["--control-url", "http://127.0.0.1:1"], "only with --verify-clients"),
        (["--verify-client-url", "ftp://x/"], "must start with http:// or https://"),
    ):
        r = subprocess.run(
            [*SERVE, "derp", "serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode != 0 and sentence in r.stderr and "Traceback" not in r.stderr, r.stderr
