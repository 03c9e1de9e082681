"""A real ControlServer on 127.0.0.1 in a thread of its own (its own event loop), for tests that talk to its
HTTP admin API from synchronous code (urllib, schemathesis, a `tailpy control` subprocess)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nacl.public

from tailpy.control import Store
from tailpy.control.apikeys import create_api_key
from tailpy.control.server import ControlServer
from tailpy.keys import MachinePublic, NodePublic
from tailpy.netmap import Node

T = TypeVar("T")


class ThreadedControl:
    """``url`` of the server; ``key`` a valid admin API key, ``expired_key`` one that expired;
    :meth:`on_loop` runs a function on the server's loop (where its store and mapper live)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="control", daemon=True)
        self.store: Store | None = None
        self.server: ControlServer | None = None
        self.url = ""
        self.key = ""
        self.expired_key = ""

    def start(self) -> None:
        self._thread.start()

        self.state_dir.mkdir(parents=True, exist_ok=True)

        async def start() -> str:
            self.store = Store(self.state_dir)
            self.server = ControlServer(self.store, keepalive=0.5, poll_interval=0.2)
            host, port = await self.server.start("127.0.0.1", 0)
            return f"http://{host}:{port}"

        self.url = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        now = time.time()
        self.key = self.on_loop(lambda: create_api_key(self.db, expiration_seconds=3600, description="t"))[1]
        self.expired_key = self.on_loop(
            lambda: create_api_key(self.db, expiration_seconds=1, description="old", now=now - 10)
        )[1]

    @property
    def db(self) -> Store:
        assert self.store is not None
        return self.store

    @property
    def control(self) -> ControlServer:
        assert self.server is not None
        return self.server

    def on_loop(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the server's event loop; its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def add_node(self, hostname: str, *, routes: tuple[str, ...] = ()) -> Node:
        """Register a node (with a fresh auth key) and publish it, as a registration would."""

        def register() -> Node:
            key = self.db.create_auth_key(reusable=False, expires=None, now=time.time()).key
            mk = MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))
            nk = NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))
            node = self.db.register(mk, nk, hostname, key, time.time())
            if routes:
                updated = self.db.update_node(mk, now=time.time(), routable_ips=routes)
                assert updated is not None
                node = updated
            self.control.publish_node(node.id)
            return node

        return self.on_loop(register)

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                self.store.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@contextmanager
def threaded_control(state_dir: Path) -> Iterator[ThreadedControl]:
    c = ThreadedControl(state_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def call(
    url: str,
    method: str,
    path: str,
    *,
    key: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """``(status, headers, JSON answer)`` of one request (``body`` sent as JSON, or ``raw`` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), json.loads(e.read() or b"null")
