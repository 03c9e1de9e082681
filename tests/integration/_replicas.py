"""Helpers of the control replica tests: a throwaway PostgreSQL database, replicas in this process, and map
stream followers that reconnect as tailpyd's session does."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import psycopg
import pytest

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.netmap import NetMap

UNIT = Path(__file__).resolve().parents[1] / "unit"
sys.path.insert(0, str(UNIT))
import _postgres  # noqa: E402

RECONNECT = 0.5  # seconds before a follower reconnects (tailpyd's first backoff step)


def pg_server() -> Iterator[str]:
    """A PostgreSQL server for the module (skips the tests, with the reason, where none can start)."""
    reason = _postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with _postgres.postgres_server() as url:
        yield url


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
