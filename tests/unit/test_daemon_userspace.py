"""``tailpyd --tun userspace-networking`` (tailpy.daemon.main.run) in-process on the stand-in userspace data
plane (tests/unit/_userspace_device.py): the local API brings it up as usual, its status says
"userspace-networking", and curl reaches a peer (a tailpy.Node) by name through its SOCKS5 and HTTP proxies;
the proxy flags without userspace networking are refused. The lab test (test_embedded_node.py) runs the
real thing as user nobody."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _userspace_device import FakeNet
from click.testing import CliRunner

import tailpy
import tailpy._native
from tailpy.control import ControlServer, Store
from tailpy.daemon import main as daemon_main
from tailpy.daemon.client import LocalClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_proxy_flags_need_userspace() -> None:
    got = CliRunner().invoke(daemon_main.main, ["--socks5-server", "127.0.0.1:1080", "--tun", "tailpy9"])
    assert got.exit_code == 2 and "need --tun userspace-networking" in got.output
    got = CliRunner().invoke(daemon_main.main, ["--tun", "userspace-networking", "--socks5-server", "1080"])
    assert got.exit_code == 2 and "not host:port" in got.output


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_userspace_daemon_with_proxies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()

    class Device:
        @staticmethod
        def userspace(private_key: bytes, listen_port: int, addresses: list[str], mtu: int = 1280) -> Any:
            return net.factory(private_key, listen_port, addresses, mtu)

    monkeypatch.setattr(tailpy._native, "Device", Device)
    sock = str(tmp_path / "tailpyd.sock")
    socks, http = free_port(), free_port()
    daemon = asyncio.create_task(
        daemon_main.run(
            str(tmp_path / "px"), sock, "userspace-networking", 0, 1280, True, 0.0,
            socks5_server=f"127.0.0.1:{socks}", http_proxy=f"127.0.0.1:{http}",
        )
    )  # fmt: skip
    beta = tailpy.Node(
        control_url=url, auth_key=key, state_dir=tmp_path / "b", hostname="beta", device_factory=net.factory
    )
    try:
        async with beta:

            async def web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nbeta!\n")
                writer.close()

            await beta.start_server(web, port=80)
            client = LocalClient(sock)
            for _ in range(100):
                if Path(sock).exists():
                    break
                await asyncio.sleep(0.05)
            status = await client.up(url, key, "px")
            for _ in range(100):
                status = await client.status()
                if status.backend_state == "Running" and status.peers:
                    break
                await asyncio.sleep(0.05)
            assert status.self_node.tun == "userspace-networking"
            assert [p.name for p in status.peers] == ["beta"]
            for args in (
                ["--socks5-hostname", f"127.0.0.1:{socks}"],
                ["--proxy", f"http://127.0.0.1:{http}"],
                ["--proxy", f"http://127.0.0.1:{http}", "--proxytunnel"],
            ):
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-sS", "--max-time", "10", *args, "http://beta/",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await proc.communicate()
                assert out == b"beta!\n", (args, err)
            await client.down()  # exit_on_down: the daemon ends
            await asyncio.wait_for(daemon, 20)
    finally:
        daemon.cancel()
        await asyncio.gather(daemon, return_exceptions=True)
        await srv.stop()
        store.close()
