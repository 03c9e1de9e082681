"""examples/web_app.py and examples/fetch.py run as written against a control server on 127.0.0.1, on the
stand-in userspace data plane (tests/unit/_userspace_device.py): fetch.py gets the web app's page by its
MagicDNS name, and the app names the caller from its tailnet address. tests/integration/test_embedded_node.py
runs both on the real data plane in the lab."""

from __future__ import annotations

import asyncio
import runpy
import time
from pathlib import Path

import pytest
from _userspace_device import FakeNet

import tailpy.node
from tailpy.control import ControlServer, Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_web_app_and_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    net = FakeNet()
    monkeypatch.setattr(tailpy.node, "_userspace_device", net.factory)
    monkeypatch.setenv("TAILPY_CONTROL_URL", f"http://{host}:{port}")
    monkeypatch.setenv(
        "TAILPY_AUTH_KEY", store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    )
    monkeypatch.chdir(tmp_path)
    web_app = runpy.run_path(str(EXAMPLES / "web_app.py"), run_name="example")
    fetch = runpy.run_path(str(EXAMPLES / "fetch.py"), run_name="example")
    app = asyncio.create_task(web_app["main"]("web"))
    try:
        for _ in range(200):
            if (tmp_path / "web-state").exists() and net.devices and net.devices[0].by_port:
                break
            await asyncio.sleep(0.05)
        body = await asyncio.wait_for(fetch["fetch"]("http://web/"), 30)
        assert body == b"hello fetch, this is web\n"
    finally:
        app.cancel()
        await asyncio.gather(app, return_exceptions=True)
        await srv.stop()
        store.close()
