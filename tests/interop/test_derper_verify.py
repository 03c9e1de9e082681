"""Tailscale's derper with ``-verify-client-url`` pointed at tailpy's control server (``POST /derp/admit``):
the admission endpoint speaks derper's protocol, so a tailnet node logs in and a stranger is refused; and
tailpy's WebSocket DERP client against derper's WebSocket handler.
derper listens on 127.0.0.1 only and is killed by pid at the end, pass or fail."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nacl.public
import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.derp.client import DerpClient, DerpClientError
from tailpy.derp.verify import control_admission_url
from tailpy.keys import MachinePrivate, NodePrivate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tailscale_go import build_tailscale_tools, free_tcp_port, stop_process, wait_http

pytestmark = pytest.mark.interop


async def test_derper_admits_through_tailpy_control(tmp_path: Path) -> None:
    tools = build_tailscale_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    control = ControlServer(store)
    host, port = await control.start("127.0.0.1", 0)
    derper: subprocess.Popen[bytes] | None = None
    try:
        key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
        member = NodePrivate.generate()
        cc = ControlClient(f"http://{host}:{port}", MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
        await cc.register(member.public, "member", key)
        await cc.close()
        dport = free_tcp_port()
        state = tmp_path / "derper"
        state.mkdir()
        with open(state / "derper.log", "wb") as log:
            derper = subprocess.Popen(
                [
                    str(tools.derper),
                    "-a",
                    f"127.0.0.1:{dport}",
                    "-http-port=-1",
                    "-stun=false",
                    "-home=blank",
                    "-c",
                    str(state / "derper.key"),
                    "-verify-client-url",
                    control_admission_url(f"http://{host}:{port}"),
                    "-verify-client-url-fail-open=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{dport}/generate_204", 20.0, derper)
        url = f"http://127.0.0.1:{dport}/derp"
        c = await DerpClient.connect(url, member)
        await c.close()
        with pytest.raises(DerpClientError):
            await DerpClient.connect(url, NodePrivate.generate())
    finally:
        if derper is not None:
            stop_process(derper)
        await control.stop()
        store.close()
    text = (tmp_path / "derper" / "derper.log").read_text(errors="replace")
    assert "not allowed" in text, text[-2000:]


async def test_websocket_client_against_derper(tmp_path: Path) -> None:
    """tailpy's ws:// DERP client logs in to derper's WebSocket handler and relays to a plain client."""
    tools = build_tailscale_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    from _tailscale_go import Derper

    from tailpy.proto.derp import RecvPacket

    with Derper(tools.derper, tmp_path / "derper") as d:
        a, b = NodePrivate.generate(), NodePrivate.generate()
        ca = await DerpClient.connect(d.url.replace("http://", "ws://"), a)
        cb = await DerpClient.connect(d.url, b)
        try:
            await ca.send(b.public, b"over websocket")
            got = await asyncio.wait_for(cb.recv(), 5)
            assert isinstance(got, RecvPacket) and got.data == b"over websocket" and got.src == a.public
            await cb.send(a.public, b"x" * 60000)
            back = await asyncio.wait_for(ca.recv(), 5)
            assert isinstance(back, RecvPacket) and back.data == b"x" * 60000
        finally:
            await ca.close()
            await cb.close()
