"""Three ``tailpy derp serve`` processes on 127.0.0.1 meshed into one region (``--mesh-with`` naming all
three, ``--mesh-psk-file``), clients spread over them: every client reaches every other; then one relay is
killed with SIGKILL, its clients move to another relay of the region and reach the rest again. Every
process is stopped by pid, pass or fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tailpy.derp.client import ReconnectingDerpClient
from tailpy.keys import NodePrivate, NodePublic
from tailpy.proto import derp as proto

SERVE = [sys.executable, "-m", "tailpy.cli.main", "derp", "serve"]
RELAYS = 3
CLIENTS_PER_RELAY = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProc:
    def __init__(self, tmp: Path, index: int, port: int) -> None:
        self.dir = tmp / f"relay{index}"
        self.port = port
        self.log = self.dir / "derp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    def start(self, peers: list[int], key_file: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *SERVE,
                    "--state-dir",
                    str(self.dir / "state"),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--no-stun",
                    "--mesh-with",
                    ",".join(f"127.0.0.1:{p}" for p in peers),
                    "--mesh-psk-file",
                    str(key_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def metric(self, name: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/debug/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
        return int(m.group(1)) if m else None

    def kill(self) -> None:
        """SIGKILL this pid (no goodbye to its clients or mesh peers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[RelayProc]]:
    key_file = tmp_path / "mesh.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    ports = [_free_port() for _ in range(RELAYS)]
    procs = [RelayProc(tmp_path, i, p) for i, p in enumerate(ports)]
    try:
        for r in procs:
            r.start(ports, key_file)  # each lists all three, itself included, as derper's --mesh-with may
        yield procs
    finally:
        for r in procs:
            r.stop()


async def _until(cond: object, what: str, timeout: float = 30.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.2)


class Clients:
    """Clients spread over the relays (each knows the region's other relays as fallbacks), collecting what
    they receive."""

    def __init__(self, relays: list[RelayProc]) -> None:
        self.clients: list[ReconnectingDerpClient] = []
        self.home: list[int] = []
        self.got: dict[NodePublic, set[tuple[NodePublic, bytes]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        urls = [r.url for r in relays]
        for i in range(len(relays) * CLIENTS_PER_RELAY):
            home = i % len(relays)
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

    async def every_pair_reaches(self, tag: bytes, timeout: float = 30.0) -> None:
        """Each client sends ``tag`` to every other until all have arrived (the mesh learns of a client a
        moment after it logs in, so early packets may be dropped); AssertionError names the missing pairs."""
        pairs = [(a, b) for a in self.clients for b in self.clients if a is not b]
        deadline = time.monotonic() + timeout
        while True:
            missing = [
                (a, b) for a, b in pairs if (a.private_key.public, tag) not in self.got[b.private_key.public]
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
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


@pytest.fixture
async def clients(relays: list[RelayProc]) -> AsyncIterator[Clients]:
    for r in relays:
        what = f"relay on port {r.port} meshed with the other two ({r.log_text()[-1500:]})"
        await _until(lambda r=r: r.metric("derp_mesh_peers_connected") == RELAYS - 1, what)
    cs = Clients(relays)
    try:
        await cs.start()
        yield cs
    finally:
        await cs.close()


async def test_three_relays_one_region_every_pair_and_a_relay_killed(
    relays: list[RelayProc], clients: Clients
) -> None:
    for r in relays:
        assert r.metric("derp_mesh_peers") == RELAYS - 1  # itself left out
        assert r.metric("derp_mesh_watchers") == RELAYS - 1
    await clients.every_pair_reaches(b"all up")
    forwarded = sum(r.metric("derp_packets_forwarded_out_total") or 0 for r in relays)
    n = len(clients.clients)
    # a pair on different relays goes through the mesh: at least those packets were forwarded
    assert forwarded >= n * (n - 1) - len(relays) * CLIENTS_PER_RELAY * (CLIENTS_PER_RELAY - 1)

    dead = relays[-1]
    dead.kill()
    moved = [c for c, h in zip(clients.clients, clients.home, strict=True) if h == RELAYS - 1]
    await _until(
        lambda: all(c.client is not None and c.connected_url != dead.url for c in moved),
        "the killed relay's clients reconnected elsewhere",
    )
    for r in relays[:-1]:
        await _until(lambda r=r: r.metric("derp_mesh_peers_connected") == RELAYS - 2,
                     f"relay on port {r.port} noticing its dead peer")  # fmt: skip
    await clients.every_pair_reaches(b"after the kill")
    assert "is this server; not meshing with itself" in relays[0].log_text()
