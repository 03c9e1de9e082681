"""Helpers of the control replica and DERP mesh tests: a throwaway PostgreSQL database, replicas in this
process, map stream followers that reconnect as tailpyd's session does, `tailpy control serve` and `tailpy
derp serve` subprocesses on 127.0.0.1 (:class:`ServeProcess`), DERP clients spread over a region's relays
(:class:`Clients`), and replicas on lab hosts (:class:`LabReplica`).

The fixtures :func:`pg_url` and :func:`store` are taken into a test module by ``from _replicas import pg_url
as pg_url`` (the redundant alias tells linters the name is meant to be there, unused)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import psycopg
import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.derp.client import ReconnectingDerpClient
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.lab import wait_for
from tailpy.lab.netns import Host
from tailpy.lab.tailnet import CONTROL_PORT, LabTailnet, tailpy_argv
from tailpy.netmap import NetMap
from tailpy.proto import derp as proto

UNIT = Path(__file__).resolve().parents[1] / "unit"
sys.path.insert(0, str(UNIT))
import _postgres  # noqa: E402

RECONNECT = 0.5  # seconds before a follower reconnects (tailpyd's first backoff step)
TAILPY = [sys.executable, "-m", "tailpy.cli.main"]
STOP_WAIT = 15.0  # seconds a stopped server process has to exit after SIGTERM before it is killed
LAB_DERP_PORT = 3340  # where a lab replica's relay listens (:class:`LabReplica`)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """Fixture: a PostgreSQL server for the module, its ``postgresql://`` URL (skips the tests, with the
    reason, where none can start)."""
    reason = _postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with _postgres.postgres_server() as url:
        yield url


@pytest.fixture
async def store(pg_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    """Fixture: a Store on ``pg_url``'s database as an admin's ``tailpy control`` opens it (a state
    directory of its own), beside the replicas under test."""
    (tmp_path / "admin").mkdir()
    s = Store(tmp_path / "admin", db=pg_url)
    yield s
    s.close()


def empty_database(url: str) -> str:
    """Drop every table of the database at ``url``; returns ``url``."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return url


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


class Replica:
    """One control replica in this process: its own state directory and Store on the shared database."""

    def __init__(self, name: str, state_dir: Path, db: str, *, heartbeat: float = 0.5) -> None:
        state_dir.mkdir(exist_ok=True)
        self.name = name
        self.store = Store(state_dir, db=db)
        self.server = ControlServer(
            self.store, keepalive=0.5, poll_interval=0.5, replica_id=name, heartbeat=heartbeat
        )
        self.url = ""

    async def start(self) -> None:
        host, port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"
        self.server.replicas.url = self.url

    async def stop(self) -> None:
        await self.server.stop()
        self.store.close()


@dataclass
class Follower:
    """A node following its map stream through ``client``, reconnecting after :data:`RECONNECT` seconds when
    the stream ends (to the next of the client's URLs), advertising ``routable_ips``. ``netmap``: the
    latest; ``maps``: how many arrived; ``url``: the replica the current stream is on."""

    client: ControlClient
    node_key: NodePublic
    hostname: str
    netmap: NetMap | None = None
    maps: int = 0
    url: str = ""
    routable_ips: tuple[str, ...] | None = None  # the routes it advertises (a subnet router)
    endpoints: list[Endpoint] = field(default_factory=list)  # sent on every stream it opens, as tailpyd does
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.url = self.client.server_url
                async for nm in self.client.stream_map(
                    self.node_key, self.endpoints, self.hostname, routable_ips=self.routable_ips
                ):
                    self.netmap, self.maps = nm, self.maps + 1
                    self.changed.set()
            except ControlError:
                pass
            await asyncio.sleep(RECONNECT)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.client.close()

    async def until(self, cond: Callable[[NetMap], bool], timeout: float = 15.0) -> float:
        """Wait until the latest netmap satisfies ``cond``; returns the seconds it took (TimeoutError)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while self.netmap is None or not cond(self.netmap):
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.hostname}: condition not met in {timeout} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return time.monotonic() - t0


def peer_named(nm: NetMap, name: str) -> bool:
    return any(p.name == name for p in nm.peers.values())


def peer_online(nm: NetMap, node_id: int, online: bool = True) -> bool:
    p = nm.peers.get(node_id)
    return p is not None and p.online == online


async def join(
    store: Store, hostname: str, urls: str, followers: list[Follower], routes: tuple[str, ...] | None = None
) -> Follower:
    """Register a node with a new auth key of ``store``'s database through ``urls`` (comma-separated, tried in
    order) and follow its map stream there (added to ``followers``), advertising ``routes``; returns once
    its first netmap arrived."""
    key = store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    client = ControlClient(urls, mkey())
    node = await client.register(nkey(), hostname, key)
    f = Follower(client, node.node_key, hostname, routable_ips=routes)
    followers.append(f)
    f.start()
    await f.until(lambda nm: nm.self_node.name == hostname)
    return f


async def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Poll ``cond`` (in a thread) until true; the seconds it took (AssertionError naming ``what``)."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


# --- server subprocesses on 127.0.0.1 -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """A tailpy server subprocess on 127.0.0.1: ``tailpy <args> --state-dir <tmp>/<name> --listen
    127.0.0.1:<port>``, stdout and stderr to ``<tmp>/<name>.log``, stopped or killed by pid. ``url``: what
    ``--listen`` serves; ``derp_url``: its DERP relay (``derp_port``, None without one); ``ready``: the log
    text that says it listens (:meth:`wait_listening`). Made by :meth:`control` or :meth:`derp`."""

    def __init__(
        self, name: str, tmp: Path, args: Sequence[str], *, port: int, derp_port: int | None, ready: str
    ) -> None:
        self.name = name
        self.state = tmp / name
        self.state.mkdir()
        self.port, self.derp_port, self.ready = port, derp_port, ready
        self.url = f"http://127.0.0.1:{port}"
        self.derp_url = f"http://127.0.0.1:{derp_port}/derp"
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*TAILPY, *args, "--state-dir", str(self.state), "--listen", f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @classmethod
    def control(
        cls,
        name: str,
        db: str,
        tmp: Path,
        *,
        relay_region: int | None = None,
        replica_id: str | None = None,
        extra: Sequence[str] = (),
    ) -> ServeProcess:
        """`tailpy control serve --db DB --replica-id ID` (``replica_id``, by default ``name``) without STUN,
        with ``extra`` arguments; with ``relay_region``, its embedded relay (admitting any client) on another
        free port as that region, else ``--no-derp``."""
        if relay_region is None:
            derp_port, relay, ready = None, ["--no-derp"], "listening on http://"
        else:
            derp_port = free_port()
            relay = ["--derp-listen", f"127.0.0.1:{derp_port}", "--derp-region-id", str(relay_region)]
            relay, ready = [*relay, "--no-derp-verify-clients"], "embedded DERP relay listening on"
        args = ["control", "serve", "--db", db, *relay, "--no-stun", "--replica-id", replica_id or name]
        return cls(name, tmp, [*args, *extra], port=free_port(), derp_port=derp_port, ready=ready)

    @classmethod
    def derp(cls, name: str, tmp: Path, port: int, extra: Sequence[str] = ()) -> ServeProcess:
        """`tailpy derp serve` without STUN on ``port``, with ``extra`` arguments (``--mesh-with``...)."""
        args = ["derp", "serve", "--no-stun", *extra]
        return cls(name, tmp, args, port=port, derp_port=port, ready="DERP relay listening on")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_listening(self) -> None:
        """Wait until the log says it listens; else (it exits, or 30 s pass) stop it and fail the test."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ready in self.log_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"{self.name} did not start: {self.log_text()[-2000:]}")

    def metric(self, name: str) -> int | None:
        """Counter or gauge ``name`` of its relay's ``/debug/metrics`` (None: no answer, or no such line)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.derp_port}/debug/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
        return int(m.group(1)) if m else None

    def pause(self) -> None:
        """SIGSTOP: the process hangs (its sockets stay open, nothing is answered)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (no goodbye to its clients or mesh peers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM; SIGKILL after :data:`STOP_WAIT` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def serve_pair(
    db: str, tmp: Path, relay_region: int | None = None
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Replicas ``a`` and ``b`` (:meth:`ServeProcess.control`) on database ``db``, emptied and given the
    schema first (before two processes race to make it), both listening; stopped on exit."""
    empty_database(db)
    Store(tmp, db=db).close()
    a = ServeProcess.control("a", db, tmp, relay_region=relay_region)
    b = ServeProcess.control("b", db, tmp, relay_region=relay_region)
    try:
        a.wait_listening()
        b.wait_listening()
        yield a, b
    finally:
        a.stop()
        b.stop()


class Clients:
    """``per_relay`` DERP clients on each relay of ``urls`` (each with the region's other relays as
    fallbacks, as magicsock dials a region), collecting what they receive. ``home[i]``: the index in
    ``urls`` of ``clients[i]``'s first relay."""

    def __init__(self, urls: list[str], per_relay: int = 2) -> None:
        self.clients: list[ReconnectingDerpClient] = []
        self.home: list[int] = []
        self.got: dict[NodePublic, set[tuple[NodePublic, bytes]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        for i in range(len(urls) * per_relay):
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
        after it logs in, so early packets may be dropped); the seconds it took. AssertionError names the
        missing pairs."""
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


# --- replicas in the lab ------------------------------------------------------------------------------------


class LabReplica:
    """`tailpy control serve --db ... --replica-id NAME` on lab host ``host``; with ``relay``, its relay and
    STUN server on the host's LAN address (relay on :data:`LAB_DERP_PORT`, ``derp_url``), else neither
    (the nodes share a LAN). Returns once it serves."""

    def __init__(self, net: LabTailnet, host: Host, name: str, db: str, *, relay: bool = False) -> None:
        self.host, self.name, self.db = host, name, db
        self.state = net.root / f"control-{name}"
        self.state.mkdir()
        ip = net.lan.ip(host)
        self.url = f"http://{ip}:{CONTROL_PORT}"
        self.derp_url = f"http://{ip}:{LAB_DERP_PORT}/derp"
        self.log = net.root / f"control-{name}.log"
        if relay:
            options, ready = ["--derp-listen", f"{ip}:{LAB_DERP_PORT}"], "DERP map:"
        else:
            options, ready = ["--no-derp", "--no-stun"], "listening on"
        with open(self.log, "a") as logf:
            self.proc = host.python(
                "tailpy.cli.main",
                "control",
                "serve",
                "--db",
                db,
                "--state-dir",
                str(self.state),
                "--listen",
                f"{ip}:{CONTROL_PORT}",
                *options,
                "--replica-id",
                name,
                stdout=logf,
                stderr=logf,
            )
        wait_for(lambda: ready in self.log.read_text(), timeout=30, what=f"replica {name} to start")

    def control(self, *args: str) -> str:
        """``tailpy control <args>`` against this replica (its admin socket)."""
        argv = tailpy_argv("control", *args, "--state-dir", str(self.state), "--db", self.db)
        return self.host.run(argv).stdout

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Name -> node as this replica lists it (``online``: streaming on a live replica)."""
        return {n["name"]: n for n in json.loads(self.control("nodes", "list", "--json"))}
