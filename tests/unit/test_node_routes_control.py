"""Two tailpyd (userspace data planes, in-process) and a real control server: a router advertises a subnet and
offers itself as exit node with `tailpy up`; once an admin approves them, a client with --accept-routes gets
the subnet in its data plane's allowed IPs, chooses the router as exit node with `tailpy set`, and status and
`tailpy exit-node list` say so; the router going down leaves it chosen (fail closed) with a health
warning. The host-routing side is the lab's (tests/lab)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _conn_device import FakeDevice
from _userspace_device import FakeNet
from click.testing import CliRunner

import tailpy._native
from tailpy.cli.main import cli
from tailpy.control import ControlServer, Store
from tailpy.daemon import main as daemon_main
from tailpy.daemon.client import LocalClient
from tailpy.ipnstate import Status
from tailpy.routes import EXIT_ROUTES

LAN = "198.51.100.0/24"


async def test_router_and_client_through_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()
    allowed: dict[bytes, dict[bytes, list[str]]] = {}  # device (by node key) -> peer -> allowed IPs
    set_peer = FakeDevice.set_peer

    def recording_set_peer(self: Any, public_key: bytes, *, allowed_ips: list[str], **kw: Any) -> None:
        allowed.setdefault(self.private_key, {})[public_key] = list(allowed_ips)
        set_peer(self, public_key, allowed_ips=allowed_ips, **kw)

    monkeypatch.setattr(FakeDevice, "set_peer", recording_set_peer)

    class Device:
        @staticmethod
        def userspace(private_key: bytes, listen_port: int, addresses: list[str], mtu: int = 1280) -> Any:
            dev = net.factory(private_key, listen_port, addresses, mtu)
            dev.private_key = private_key
            return dev

    monkeypatch.setattr(tailpy._native, "Device", Device)
    socks = {name: str(tmp_path / f"{name}.sock") for name in ("rt", "cl")}
    daemons = [
        asyncio.create_task(
            daemon_main.run(str(tmp_path / name), sock, "userspace-networking", 0, 1280, True, 0.0)
        )
        for name, sock in socks.items()
    ]
    rt, cl = LocalClient(socks["rt"]), LocalClient(socks["cl"])

    def tailpy_cli(*args: str) -> Any:
        return CliRunner().invoke(cli, [*args, "--socket", socks["cl"]])

    async def until(client: LocalClient, check: Callable[[Status], Any]) -> Status:
        for _ in range(300):
            st = await client.status()
            if check(st):
                return st
            await asyncio.sleep(0.05)
        raise AssertionError(f"never: {st.to_json()}")

    try:
        for sock in socks.values():
            for _ in range(100):
                if Path(sock).exists():
                    break
                await asyncio.sleep(0.05)
        await rt.up(url, key, "rt", routes={"advertise_routes": [LAN], "advertise_exit_node": True})
        await cl.up(url, key, "cl", routes={"accept_routes": True})
        st = await until(rt, lambda st: st.backend_state == "Running")
        rt_id = st.self_node.id
        assert rt_id is not None
        # advertised (control has them), not approved: no route for the client yet
        st = await until(cl, lambda st: st.peers and st.peers[0].online)
        assert st.peers[0].primary_routes == () and not st.peers[0].exit_node_option
        got = await asyncio.to_thread(tailpy_cli, "set", "--exit-node", "rt")
        assert got.exit_code == 1 and "rt is not an exit node" in got.output

        store.approve_routes(rt_id, [LAN, *EXIT_ROUTES], time.time())  # `tailpy control routes approve`
        srv.admin_changed(rt_id)
        st = await until(cl, lambda st: st.peers[0].primary_routes and st.peers[0].exit_node_option)
        assert st.peers[0].primary_routes == (LAN,)
        rt_key = st.peers[0].node_key.raw
        cl_dev = next(peers for peers in allowed.values() if rt_key in peers)
        assert cl_dev[rt_key][-1] == LAN and not set(EXIT_ROUTES) & set(cl_dev[rt_key])
        me = (await until(rt, lambda st: st.self_node.primary_routes)).self_node
        assert me.advertised_routes == (LAN, *EXIT_ROUTES) and set(me.approved_routes) == {LAN, *EXIT_ROUTES}

        got = await asyncio.to_thread(tailpy_cli, "set", "--exit-node", "rt")
        assert got.exit_code == 0, got.output
        st = await cl.status()
        assert st.exit_node == "rt" and st.peers[0].exit_node
        assert cl_dev[rt_key][-2:] == list(EXIT_ROUTES)
        assert not any(w.name == "exit-node" for w in st.health)
        got = await asyncio.to_thread(tailpy_cli, "exit-node", "list", "--json")
        assert [(r["name"], r["online"], r["in_use"]) for r in json.loads(got.output)] == [("rt", True, True)]

        # the exit node goes away: it stays chosen (the host's routes keep internet traffic in the tunnel,
        # test_node_routes has the route plan), and a warning says why nothing gets out
        await rt.down()
        await asyncio.wait_for(daemons[0], 20)
        st = await until(cl, lambda st: any(w.name == "exit-node" for w in st.health))
        text = next(w.text for w in st.health if w.name == "exit-node")
        assert "rt is offline" in text or "rt does not offer" in text
        assert st.exit_node == "rt"
        await cl.down()
        await asyncio.wait_for(daemons[1], 20)
    finally:
        for d in daemons:
            d.cancel()
        await asyncio.gather(*daemons, return_exceptions=True)
        await srv.stop()
        store.close()
