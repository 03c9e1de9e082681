"""tailpy's STUN against Tailscale's: ``stunc`` (Tailscale's STUN client) against tailpy's STUN server, and
tailpy's client (and netcheck) against ``stund`` (Tailscale's STUN server), both built with ``go install``
at the pinned version of :mod:`tests.interop._tailscale_go` and cached beside derper. On 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _tailscale_go import (
    BUILD_TIMEOUT,
    TAILSCALE_VERSION,
    _last_error_line,
    build_lock,
    cache_dir,
    stop_process,
)

from tailpy.derp.stun_server import StunServer
from tailpy.endpoint import Endpoint
from tailpy.magicsock import netcheck
from tailpy.magicsock.stun import StandaloneStun
from tailpy.proto import stun

pytestmark = pytest.mark.interop


def _tools() -> tuple[Path, Path]:
    """stunc and stund at the pinned version (built once per machine), or skip saying why."""
    out = cache_dir(TAILSCALE_VERSION)
    stunc, stund = out / "stunc", out / "stund"
    with build_lock(out):  # parallel test workers build them once
        if all(b.is_file() and os.access(b, os.X_OK) for b in (stunc, stund)):
            return stunc, stund
        go = shutil.which("go") or (
            "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
        )
        if go is None:
            pytest.skip("no Go toolchain ('go' is not on PATH) to build Tailscale's stunc and stund")
        env = dict(os.environ, GOBIN=str(out), GOFLAGS="-mod=mod", GOTOOLCHAIN="local", CGO_ENABLED="0")
        try:
            proc = subprocess.run(
                [
                    go,
                    "install",
                    f"tailscale.com/cmd/stunc@{TAILSCALE_VERSION}",
                    f"tailscale.com/cmd/stund@{TAILSCALE_VERSION}",
                ],
                env=env,
                cwd=out,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"building Tailscale's stunc/stund {TAILSCALE_VERSION} took over {BUILD_TIMEOUT:g} s")
        if proc.returncode != 0 or not stunc.is_file() or not stund.is_file():
            pytest.skip(f"go install of Tailscale's stunc/stund failed: {_last_error_line(proc.stderr)}")
    return stunc, stund


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_tailscale_stunc_against_tailpy_server() -> None:
    stunc, _ = _tools()
    server = StunServer()
    await server.start("127.0.0.1", 0)
    try:
        port = server.addresses[0][1]
        proc = await asyncio.create_subprocess_exec(
            str(stunc), "-timeout", "10s", "127.0.0.1", str(port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode()
        assert proc.returncode == 0, text
        assert re.search(r"stun addr: 127\.0\.0\.1:\d+", text), text
        assert server.metrics.requests["success"] == 1
    finally:
        await server.stop()


async def test_tailpy_client_and_netcheck_against_tailscale_stund() -> None:
    _, stund = _tools()
    stun_port, http_port = _free_udp_port(), _free_tcp_port()
    proc = subprocess.Popen(
        [str(stund), "-stun", f"127.0.0.1:{stun_port}", "-http", f"127.0.0.1:{http_port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with StandaloneStun(bind="127.0.0.1") as sock:
            # stund may take a moment to bind: RFC 8489 retransmission covers that
            result = await sock.runner.binding(Endpoint.parse(f"127.0.0.1:{stun_port}"), total=20.0)
            assert result.ok, result
            assert result.mapped == Endpoint.parse(f"127.0.0.1:{sock.port}")
            target = netcheck.StunTarget(1, "1a", "127.0.0.1", stun_port, 4)
            report = await netcheck.run(
                sock.runner, [target], netcheck.Netcheck(), timeout=5.0, hairpin=False
            )
            assert report.udp and report.global_v4 == Endpoint.parse(f"127.0.0.1:{sock.port}")
            assert 1 in report.region_latency

        # Tailscale's server ignores a request without FINGERPRINT (tailscale/tailscale#4177); tailpy's
        # answers it.
        minimal = bytes.fromhex("000100002112a442b7e7a701bc34d686fa87dfae")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            deadline = time.monotonic() + 2
            answered = False
            while time.monotonic() < deadline and not answered:
                s.sendto(minimal, ("127.0.0.1", stun_port))
                try:
                    s.recvfrom(2048)
                    answered = True
                except TimeoutError:
                    pass
        assert not answered
        from tailpy.derp.stun_server import answer

        reply, _ = answer(minimal, ("127.0.0.1", 1))
        assert reply is not None and stun.parse(reply).mapped_address == ("127.0.0.1", 1)
    finally:
        stop_process(proc)
