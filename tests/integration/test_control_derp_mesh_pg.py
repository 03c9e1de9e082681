"""The embedded DERP relays of two `tailpy control serve` replicas (subprocesses on 127.0.0.1) on one
PostgreSQL database started here, one region: they mesh on their own (the key kept in the database), the
DERP map nodes get lists both relays (the replica's own first), and DERP clients on either relay reach each
other; one replica killed with SIGKILL, its relay's clients move to the other relay and reach the rest, and
the map drops the dead relay. Every process is stopped by pid; the database is removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _replicas import Follower, empty_database, mkey, nkey, pg_server

from tailpy.control import ControlClient, Store
from tailpy.control.store import changes
from tailpy.derp.client import ReconnectingDerpClient
from tailpy.keys import NodePrivate, NodePublic
from tailpy.netmap import NetMap
from tailpy.proto import derp as proto

log = logging.getLogger(__name__)

TAILPY = [sys.executable, "-m", "tailpy.cli.main"]
REGION = 900
CLIENTS_PER_RELAY = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`tailpy control serve --db URL --replica-id NAME` with its embedded relay (no STUN, admitting any
    client) on free ports of 127.0.0.1; stderr to a file."""

    def __init__(self, name: str, db: str, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.state = tmp / name
        self.state.mkdir()
        port, self.derp_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.derp_url = f"http://127.0.0.1:{self.derp_port}/derp"
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *TAILPY,
                "control",
                "serve",
                "--db",
                db,
                "--state-dir",
                str(self.state),
                "--listen",
                f"127.0.0.1:{port}",
                "--derp-listen",
                f"127.0.0.1:{self.derp_port}",
                "--derp-region-id",
                str(REGION),
                "--no-derp-verify-clients",
                "--no-stun",
                "--replica-id",
                name,
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if re.search(r"embedded DERP relay listening on", self.log_text()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"replica {self.name} did not start: {self.log_text()[-2000:]}")

    def metric(self, name: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.derp_port}/debug/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
        return int(m.group(1)) if m else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from pg_server()


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    empty_database(pg_url)
    Store(tmp_path, db=pg_url).close()  # (schema made once, before two processes race to make it)
    a = ServeProcess("a", pg_url, tmp_path)
    b = ServeProcess("b", pg_url, tmp_path)
    try:
        a.wait_listening()
        b.wait_listening()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
async def store(pg_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    (tmp_path / "admin").mkdir()
    s = Store(tmp_path / "admin", db=pg_url)
    yield s
    s.close()


async def _until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Poll ``cond`` (in a thread) until true; the seconds it took (AssertionError naming ``what``)."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def _join(store: Store, hostname: str, urls: str, followers: list[Follower]) -> Follower:
    key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    client = ControlClient(urls, mkey())
    node = await client.register(nkey(), hostname, key)
    f = Follower(client, node.node_key, hostname)
    followers.append(f)
    f.start()
    await f.until(lambda nm: nm.self_node.name == hostname)
    return f


def _relays(nm: NetMap) -> list[str]:
    """The URLs of the nodes of :data:`REGION` in ``nm``'s DERP map, in order."""
    region = nm.derp_map.regions.get(REGION) if nm.derp_map is not None else None
    return [n.url() for n in region.nodes] if region is not None else []


class Clients:
    """DERP clients spread over the relays (each with the region's other relays as fallbacks, as magicsock
    dials a region), collecting what they receive."""

    def __init__(self, urls: list[str]) -> None:
        self.clients: list[ReconnectingDerpClient] = []
        self.home: list[int] = []
        self.got: dict[NodePublic, set[tuple[NodePublic, bytes]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        for i in range(len(urls) * CLIENTS_PER_RELAY):
            home = i % len(urls)
            c = ReconnectingDerpClient(
                urls[home],
                NodePrivate.generate(),
                base=0.1,
                cap=1.0,
                fallback_urls=[u for j, u in enumerate(urls) if j != home],
            )
            self.clients.append(c)
            self.home.append(home)
            self.got[c.private_key.public] = set()

    async def start(self) -> None:
        for c in self.clients:
            c.start()
            self._tasks.append(asyncio.get_running_loop().create_task(self._collect(c)))
        for c in self.clients:
            await c.wait_connected(30)

    async def _collect(self, c: ReconnectingDerpClient) -> None:
        me = c.private_key.public
        while True:
            m = await c.recv()
            if isinstance(m, proto.RecvPacket):
                self.got[me].add((m.src, m.data))

    async def every_pair_reaches(self, tag: bytes, timeout: float = 30.0) -> float:
        """Each client sends ``tag`` to every other until all arrived (the mesh learns of a client a moment
        after it logs in); the seconds it took. AssertionError names the missing pairs."""
        pairs = [(a, b) for a in self.clients for b in self.clients if a is not b]
        t0 = time.monotonic()
        while True:
            missing = [
                (a, b) for a, b in pairs if (a.private_key.public, tag) not in self.got[b.private_key.public]
            ]
            if not missing:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                names = {c.private_key.public: i for i, c in enumerate(self.clients)}
                raise AssertionError(
                    f"{len(missing)} of {len(pairs)} pairs did not reach: "
                    + ", ".join(
                        f"{names[a.private_key.public]}->{names[b.private_key.public]}" for a, b in missing
                    )
                )
            for a, b in missing:
                with contextlib.suppress(Exception):
                    await a.send(b.private_key.public, tag, timeout=1.0)
            await asyncio.sleep(0.3)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()


async def test_replica_relays_mesh_and_survive_a_killed_replica(
    replicas: tuple[ServeProcess, ServeProcess], store: Store
) -> None:
    a, b = replicas
    followers: list[Follower] = []
    clients = Clients([a.derp_url, b.derp_url])
    try:
        # the relays mesh with each other (nothing told them of each other but the database)
        for r in (a, b):
            took = await _until(
                lambda r=r: r.metric("derp_mesh_peers_connected") == 1,  # type: ignore[misc]
                f"replica {r.name}'s relay meshed with the other ({r.log_text()[-1500:]})",
            )
            log.info("replica %s: relay meshed %.2f s after both listened", r.name, took)
        # every node's DERP map lists both relays in the region, its own replica's first
        fa = await _join(store, "on-a", f"{a.url},{b.url}", followers)
        fb = await _join(store, "on-b", f"{b.url},{a.url}", followers)
        await fa.until(lambda nm: _relays(nm) == [a.derp_url, b.derp_url])
        await fb.until(lambda nm: _relays(nm) == [b.derp_url, a.derp_url])
        assert fb.netmap is not None and fb.netmap.derp_map is not None
        assert [n.name for n in fb.netmap.derp_map.regions[REGION].nodes] == [f"{REGION}b", f"{REGION}a"]

        # clients on either relay reach every other (across the relays: through the mesh)
        await clients.start()
        took = await clients.every_pair_reaches(b"both up")
        log.info("%d DERP clients over two meshed relays: every pair reached in %.2f s", 4, took)
        assert (a.metric("derp_packets_forwarded_out_total") or 0) >= CLIENTS_PER_RELAY**2
        assert (b.metric("derp_packets_forwarded_out_total") or 0) >= CLIENTS_PER_RELAY**2

        # replica a dies: its relay's clients move to b's relay and reach the rest
        a.kill()
        t0 = time.monotonic()
        moved = [c for c, h in zip(clients.clients, clients.home, strict=True) if h == 0]
        await _until(
            lambda: all(c.client is not None and c.connected_url == b.derp_url for c in moved),
            "the killed replica's relay clients reconnected to the other relay",
        )
        took = await clients.every_pair_reaches(b"after the kill")
        log.info("SIGKILL: every pair reached again %.2f s after the kill", time.monotonic() - t0)
        # b forgets the dead relay once its replica stops beating: out of the mesh and out of the map
        await fb.until(lambda nm: _relays(nm) == [b.derp_url], timeout=30)
        await fa.until(lambda nm: fa.url == b.url and _relays(nm) == [b.derp_url], timeout=30)
        took = time.monotonic() - t0
        log.info("SIGKILL: the DERP map lists only the live relay %.2f s after the kill", took)
        await _until(lambda: b.metric("derp_mesh_peers") == 0, "b's relay dropping its dead mesh peer")
    finally:
        await clients.close()
        for f in followers:
            await f.stop()


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return dict(json.load(r))
    except urllib.error.HTTPError as e:
        return dict(json.load(e))


async def test_mesh_key_file_other_than_the_databases_is_refused(
    replicas: tuple[ServeProcess, ServeProcess], pg_url: str, tmp_path: Path
) -> None:
    """A replica given a --mesh-psk-file whose key is not the one the database keeps refuses to start with
    one sentence (it would split the region); `tailpy control mesh-key` writes the database's key (mode
    0600), and a replica given that file joins the mesh; control's /health counts mesh peers."""
    a, _b = replicas
    port_a = int(a.url.rsplit(":", 1)[1])
    await _until(
        lambda: _health(port_a)["checks"].get("derp_mesh", {}).get("connected") == 1,
        "a's relay meshed with b's",
    )
    assert _health(port_a)["status"] == "ok"

    wrong = tmp_path / "wrong.key"
    wrong.write_text("ab" * 32 + "\n")
    c = ServeProcess("c", pg_url, tmp_path, extra=("--mesh-psk-file", str(wrong)))
    try:
        rc = await asyncio.to_thread(c.proc.wait, 30)
    finally:
        c.stop()
    out = c.log_text()
    assert rc != 0, out[-2000:]
    assert "holds another DERP mesh key than the one the replicas of this database use" in out
    assert "Traceback" not in out

    key_file = tmp_path / "region.key"
    done = subprocess.run(
        [*TAILPY, "control", "mesh-key", "--db", pg_url, "--state-dir", str(a.state), "--out", str(key_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    store = Store(tmp_path, db=pg_url)
    try:
        with store.engine.begin() as conn:
            assert key_file.read_text().strip() == changes.shared_mesh_key(conn)
    finally:
        store.close()
    d = ServeProcess("d", pg_url, tmp_path, extra=("--mesh-psk-file", str(key_file)))
    try:
        d.wait_listening()
        port_d = int(d.url.rsplit(":", 1)[1])
        await _until(
            lambda: _health(port_d)["checks"].get("derp_mesh", {}).get("connected") == 2,
            "d's relay meshed with a's and b's",
        )
    finally:
        d.stop()
