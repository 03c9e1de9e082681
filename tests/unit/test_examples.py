"""examples/web_app.py and examples/fetch.py run as written against a control server on 127.0.0.1, on the
stand-in userspace data plane (tests/unit/_userspace_device.py): fetch.py gets the web app's page by its
MagicDNS name, and the app names the caller from its tailnet address. tests/integration/test_embedded_node.py
runs both on the real data plane in the lab."""

from __future__ import annotations

import asyncio
import runpy
import threading
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


def readme_first_python() -> str:
    text = (EXAMPLES.parent / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start : text.index("```", start)]


def test_readme_first_python_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's first Python example, as written (it calls asyncio.run itself), with control in a thread
    of its own and a peer already up."""
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    loop = asyncio.new_event_loop()
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = loop.run_until_complete(srv.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    net = FakeNet()
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    monkeypatch.setattr(tailpy.node, "_userspace_device", net.factory)
    monkeypatch.setenv("TAILPY_CONTROL_URL", f"http://{host}:{port}")
    monkeypatch.setenv("TAILPY_AUTH_KEY", key)
    monkeypatch.chdir(tmp_path)
    peer = tailpy.node.Node(
        control_url=f"http://{host}:{port}", auth_key=key, state_dir=tmp_path / "beta", hostname="beta"
    )
    try:
        # the peer stays registered (its state on disk) though its own loop is gone: the example sees it
        async def register_peer() -> None:
            async with peer:
                pass

        asyncio.run(register_peer())
        exec(compile(readme_first_python(), "README.md", "exec"), {"__name__": "__main__"})
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        store.close()
    out = capsys.readouterr().out
    assert out.startswith("tailnet addresses: 100.64.") and "peer: beta 100.64." in out
    assert (tmp_path / "hello-state").is_dir()
