"""Registration lifecycle on a real server (127.0.0.1, SQLite in tmp_path): key rotation with a proof (C29b),
logout and login again (C29c), key expiry and ephemeral removal published by the server's timer, admin
changes through admin.sock reaching nodes at once, and durability of an acknowledged registration across
kill -9 of `tailpy control serve`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.admin import Admin, AdminServer, call_socket
from tailpy.control.admin import run as admin_run
from tailpy.errors import AuthKeyError, ConfigError, ControlError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import NetMap
from tailpy.proto import control as proto

SERVE = [sys.executable, "-m", "tailpy.cli.main", "control", "serve"]
STEP = 10.0  # seconds to wait for an expected netmap (never asserted: a bound against hanging)


class Env:
    def __init__(self, tmp: Path, **server_kw: float | None) -> None:
        self.tmp = tmp
        self.store = Store(tmp)
        self.server = ControlServer(self.store, keepalive=0.5, poll_interval=3600, **server_kw)  # type: ignore[arg-type]
        self.admin = AdminServer(Admin(self.store, server=self.server), tmp / "admin.sock")
        self.url = ""
        self.clients: list[ControlClient] = []

    async def start(self) -> None:
        host, port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"
        await self.admin.start()

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await self.admin.stop()
        await self.server.stop()
        self.store.close()

    def key(self, **kw: object) -> str:
        return self.store.create_auth_key(reusable=False, expires=None, now=time.time(), **kw).key  # type: ignore[arg-type]

    def client(self) -> ControlClient:
        c = ControlClient(self.url, MachinePrivate.generate())
        self.clients.append(c)
        return c


@pytest.fixture
async def env_factory(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[Env] = []

    async def make(**kw: float | None) -> Env:
        e = Env(tmp_path, **kw)
        await e.start()
        made.append(e)
        return e

    yield make
    for e in made:
        await e.close()


async def until(it: AsyncIterator[NetMap], ok: Callable[[NetMap], bool]) -> NetMap:
    async def loop() -> NetMap:
        async for nm in it:
            if ok(nm):
                return nm
        raise AssertionError("stream ended")

    return await asyncio.wait_for(loop(), STEP)


async def test_rotation_with_proof_keeps_identity_and_retires_old_key(
    env_factory: Callable[..., object],
) -> None:
    env: Env = await env_factory()  # type: ignore[misc]
    c = env.client()
    old, new = NodePrivate.generate(), NodePrivate.generate()
    n = await c.register(old.public, "pi", env.key())
    server_pub = await c.server_key()
    bad = proto.seal_rotation_proof(NodePrivate.generate(), server_pub, new.public, time.time())
    body = {"node_key": new.public.text(), "hostname": "pi", "old_node_key": old.public.text()}
    with pytest.raises(ControlError, match="does not open"):
        await c._call("/machine/register", {**body, "old_node_proof": bad})
    stale = proto.seal_rotation_proof(old, server_pub, new.public, time.time() - 3600)
    with pytest.raises(ControlError, match="stale"):
        await c._call("/machine/register", {**body, "old_node_proof": stale})
    proof = proto.seal_rotation_proof(old, server_pub, new.public, time.time())
    got = (await c._call("/machine/register", {**body, "old_node_proof": proof}))["node"]
    assert (got["id"], got["name"], got["addresses"], got["node_key"]) == (
        n.id,
        n.name,
        list(n.addresses),
        new.public.text(),
    )
    assert got["key_expiry"] is not None and not got["expired"]
    with pytest.raises(ControlError, match="not this machine's registered key"):
        await anext(c.stream_map(old.public, [], "pi").__aiter__())


async def test_logout_then_login_keeps_record(env_factory: Callable[..., object]) -> None:  # C29c
    env: Env = await env_factory()  # type: ignore[misc]
    c = env.client()
    nk = NodePrivate.generate().public
    n = await c.register(nk, "pi", env.key())
    out = (await c._call("/machine/logout", {"node_key": nk.text()}))["node"]
    assert out["expired"] and out["id"] == n.id
    with pytest.raises(AuthKeyError, match="logged out"):
        await c.register(nk, "pi", None)
    key = env.key()
    back = await c.register(NodePrivate.generate().public, "pi", key)
    assert (back.id, back.name, back.addresses, back.expired) == (n.id, n.name, n.addresses, False)
    assert next(k for k in env.store.list_auth_keys() if k.shown == key[:15] + "…").used


async def test_ephemeral_node_deleted_at_logout(env_factory: Callable[..., object]) -> None:
    env: Env = await env_factory()  # type: ignore[misc]
    peer, c, asked = env.client(), env.client(), env.client()
    pk = NodePrivate.generate().public
    await peer.register(pk, "peer", env.key())
    eph_key = NodePrivate.generate().public
    e = await c.register(eph_key, "ci", env.key(ephemeral=True))
    reusable = env.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    ask_key = NodePrivate.generate().public
    a = await asked.register(ask_key, "fetch", reusable, ephemeral=True)  # a plain key, asked ephemeral
    maps = peer.stream_map(pk, [], "peer")
    await until(maps, lambda nm: {e.id, a.id} <= set(nm.peers))
    await c._call("/machine/logout", {"node_key": eph_key.text()})
    await asked._call("/machine/logout", {"node_key": ask_key.text()})
    await until(maps, lambda nm: not {e.id, a.id} & set(nm.peers))
    assert [n.name for n in env.store.list_nodes()] == ["peer"]
    again = await env.client().register(NodePrivate.generate().public, "fetch", reusable, ephemeral=True)
    assert again.name == "fetch"  # the name was freed with the node


async def test_key_expiry_is_published_by_the_timer(env_factory: Callable[..., object]) -> None:
    env: Env = await env_factory(key_lifetime=1.0)  # type: ignore[misc]
    peer, short = env.client(), env.client()
    pk = NodePrivate.generate().public
    await peer.register(pk, "peer", env.key(tags=["tag:server"]))  # tagged: never expires
    s = await short.register(NodePrivate.generate().public, "short", env.key())
    assert s.key_expiry is not None
    nm = await until(peer.stream_map(pk, [], "peer"), lambda nm: s.id in nm.peers and nm.peers[s.id].expired)
    assert not nm.self_node.expired


async def test_ephemeral_removed_only_when_offline(env_factory: Callable[..., object]) -> None:
    env: Env = await env_factory(ephemeral_timeout=0.3)  # type: ignore[misc]
    peer, eph = env.client(), env.client()
    pk, ek = NodePrivate.generate().public, NodePrivate.generate().public
    await peer.register(pk, "peer", env.key())
    e = await eph.register(ek, "ci", env.key(ephemeral=True))
    peer_maps = peer.stream_map(pk, [], "peer")
    eph_maps = eph.stream_map(ek, [], "ci")
    await until(eph_maps, lambda nm: True)
    await until(peer_maps, lambda nm: e.id in nm.peers and nm.peers[e.id].online)
    await asyncio.sleep(1.0)  # longer than the timeout while connected: stays
    assert e.id in {n.id for n in env.store.list_nodes()}
    await eph.close()  # goes offline
    await until(peer_maps, lambda nm: e.id not in nm.peers)
    assert e.id not in {n.id for n in env.store.list_nodes()}


async def test_admin_socket_changes_reach_nodes_at_once(
    env_factory: Callable[..., object], tmp_path: Path
) -> None:
    env: Env = await env_factory()  # type: ignore[misc]
    sock = tmp_path / "admin.sock"
    assert os.stat(sock).st_mode & 0o777 == 0o600
    a, b = env.client(), env.client()
    ak, bk = NodePrivate.generate().public, NodePrivate.generate().public
    await a.register(ak, "pi", env.key())
    nb = await b.register(bk, "cam", env.key())
    maps = a.stream_map(ak, [], "pi")
    await until(maps, lambda nm: nb.id in nm.peers)
    with pytest.raises(ConfigError, match=r"name pi is taken by node \d+"):
        await call_socket(sock, "nodes.rename", {"id": nb.id, "name": "pi"})
    await call_socket(sock, "nodes.rename", {"id": nb.id, "name": "garage"})
    await until(maps, lambda nm: nb.id in nm.peers and nm.peers[nb.id].name == "garage")  # poll is 1 h
    await call_socket(sock, "nodes.expire", {"id": nb.id})
    await until(maps, lambda nm: nb.id in nm.peers and nm.peers[nb.id].expired)
    await call_socket(sock, "nodes.delete", {"id": nb.id})
    await until(maps, lambda nm: nb.id not in nm.peers)
    listed = await call_socket(sock, "nodes.list", {})
    assert [(n["name"], n["online"], n["fqdn"]) for n in listed] == [("pi", True, "pi.tailnet.internal")]


def test_admin_without_server_goes_to_the_database(tmp_path: Path) -> None:
    Store(tmp_path).close()
    (tmp_path / "admin.sock").touch()  # a stale socket file from a killed server
    created = admin_run(tmp_path, None, "users.create", {"name": "alice"})
    assert created["name"] == "alice"
    key = admin_run(tmp_path, None, "authkey.create", {"user": "alice", "expiration": 3600})
    assert key["key"].startswith("tskey-auth-") and key["user"] == "alice"


def test_acknowledged_registration_survives_kill_9(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*SERVE, "--state-dir", str(state), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", proc.stderr.readline())
        assert m
        url = m.group(1)
        key = admin_run(state, None, "authkey.create", {"expiration": 3600})["key"]

        async def register() -> int:
            c = ControlClient(url, MachinePrivate.generate())
            try:
                return (await c.register(NodePrivate.generate().public, "durable", key)).id
            finally:
                await c.close()

        node_id = asyncio.run(register())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    s = Store(state)
    try:
        assert [(n.id, n.name) for n in s.list_nodes()] == [(node_id, "durable")]
    finally:
        s.close()
