"""Two `tailpy control serve` replicas (subprocesses on 127.0.0.1) on one PostgreSQL database started here:
one is killed with SIGKILL under running nodes, which move to the other; registrations from threads and
processes on both at once. Every process is stopped by pid; the database is removed afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _replicas import (
    Follower,
    ServeProcess,
    empty_database,
    join,
    mkey,
    nkey,
    peer_online,
    serve_pair,
)
from _replicas import pg_url as pg_url
from _replicas import store as store

from _metrics import samples, value
from tailpy.control import ControlClient, Store
from tailpy.endpoint import Endpoint
from tailpy.netmap import NetMap

log = logging.getLogger(__name__)

FAILOVER_WAIT = 15.0  # seconds the test waits for a move (the figure is logged, not asserted: shared machine)


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Replicas ``a`` and ``b`` without relay or STUN."""
    with serve_pair(pg_url, tmp_path) as pair:
        yield pair


def _moved_to(f: Follower, url: str, maps_before: int) -> Callable[[NetMap], bool]:
    """``f`` has a netmap from a stream on ``url`` newer than its ``maps_before``-th."""
    return lambda _nm: f.url == url and f.maps > maps_before


async def test_sigkill_replica_nodes_move_within_10s(
    replicas: tuple[ServeProcess, ServeProcess], store: Store
) -> None:
    a, b = replicas
    followers: list[Follower] = []
    try:
        movers = [await join(store, f"a{i}", f"{a.url},{b.url}", followers) for i in range(3)]
        stay = await join(store, "a-only", a.url, followers)  # knows no other replica: goes offline
        watchers = [await join(store, f"b{i}", f"{b.url},{a.url}", followers) for i in range(2)]
        before = {f.hostname: f.netmap.self_node for f in followers if f.netmap is not None}
        every = {n.id for n in before.values()}
        for f in followers:
            await f.until(lambda nm: all(peer_online(nm, i) for i in every - {nm.self_node.id}))
        assert all(f.url == a.url for f in [*movers, stay]) and all(f.url == b.url for f in watchers)

        # an acknowledged change made on a, then a dies at once
        moved = movers[0]
        new_endpoint = Endpoint.parse("198.51.100.7:41641")
        await moved.client.update(endpoints=[new_endpoint])
        moved.endpoints = [new_endpoint]  # its next stream (on b) says the same, as tailpyd's would
        maps_before = {f.hostname: f.maps for f in movers}
        resumed_before = {f.hostname: f.client.stream_starts["delta"] for f in movers}
        a.kill()
        t0 = time.monotonic()
        for f in movers:
            await f.until(_moved_to(f, b.url, maps_before[f.hostname]), timeout=FAILOVER_WAIT)
        failover = time.monotonic() - t0
        log.info("SIGKILL: %d nodes of the killed replica stream from the other after %.2f s", 3, failover)
        # each resumed on b where its last message from a left it: one delta, no full netmap
        assert all(f.client.stream_starts["delta"] > resumed_before[f.hostname] for f in movers)
        with urllib.request.urlopen(b.url + "/metrics", timeout=10) as r:
            found = samples(r.read().decode())
        starts = "tailpy_control_map_stream_starts_total"
        assert value(found, starts, start="resumed_elsewhere") >= len(movers)

        # nobody lost an address; the change acknowledged by a is there
        for f in movers:
            assert f.netmap is not None
            assert f.netmap.self_node.addresses == before[f.hostname].addresses
        me = before[moved.hostname]
        for w in watchers:
            await w.until(lambda nm: nm.peers[me.id].endpoints == (new_endpoint,))
        # the node that could not move goes offline on b; the movers are online there
        gone = before[stay.hostname].id
        took = await watchers[0].until(lambda nm: peer_online(nm, gone, False), timeout=FAILOVER_WAIT)
        log.info(
            "node left on the killed replica offline on the other %.2f s after the kill", failover + took
        )
        for w in watchers:
            await w.until(lambda nm: all(peer_online(nm, before[f.hostname].id) for f in movers))
    finally:
        for f in followers:
            await f.stop()


async def test_hung_replica_nodes_move_before_long(
    replicas: tuple[ServeProcess, ServeProcess], store: Store
) -> None:
    """A replica that hangs (SIGSTOP: its connections stay open) is counted dead by the other after the
    stale window; its nodes notice the silence of their streams after a few keepalive intervals (control
    announces one heartbeat) and stream from the other replica, online there."""
    a, b = replicas
    followers: list[Follower] = []
    try:
        movers = [await join(store, f"h{i}", f"{a.url},{b.url}", followers) for i in range(2)]
        watcher = await join(store, "w", f"{b.url},{a.url}", followers)
        ids = {f.netmap.self_node.id for f in movers if f.netmap is not None}
        await watcher.until(lambda nm: all(peer_online(nm, i) for i in ids))
        assert all(f.url == a.url for f in movers)
        maps_before = {f.hostname: f.maps for f in movers}
        a.pause()
        try:
            t0 = time.monotonic()
            for f in movers:
                await f.until(_moved_to(f, b.url, maps_before[f.hostname]), timeout=FAILOVER_WAIT * 2)
            moved = time.monotonic() - t0
            await watcher.until(lambda nm: all(peer_online(nm, i) for i in ids), timeout=FAILOVER_WAIT)
            log.info(
                "SIGSTOP: nodes of the hung replica stream from the other after %.2f s, online there after "
                "%.2f s",
                moved,
                time.monotonic() - t0,
            )
        finally:
            a.resume()
    finally:
        for f in followers:
            await f.stop()


def test_second_process_with_a_live_replica_id_is_refused(
    replicas: tuple[ServeProcess, ServeProcess], pg_url: str, tmp_path: Path
) -> None:
    """`control serve --replica-id a` while a process of replica a runs: refused with one sentence."""
    twin = ServeProcess.control("twin", pg_url, tmp_path, replica_id="a")
    try:
        rc = twin.proc.wait(timeout=FAILOVER_WAIT * 2)
    finally:
        twin.stop()
    out = twin.log_path.read_text()
    assert rc != 0, out[-2000:]
    assert "another control process is running as replica 'a'" in out
    assert "Traceback" not in out


async def test_sigkill_replica_of_the_primary_router_moves_the_route(
    replicas: tuple[ServeProcess, ServeProcess], store: Store
) -> None:
    """Two subnet routers of one prefix, the primary streaming on replica a only: after a SIGKILL of a, the
    streams on b show the standby as primary (default heartbeat); the primary returning through b takes
    nothing back."""
    a, b = replicas
    lan = "198.51.100.0/24"
    followers: list[Follower] = []

    def primary(nm: NetMap) -> int | None:
        owners = [p.id for p in nm.peers.values() if lan in p.primary_routes]
        assert len(owners) <= 1
        return owners[0] if owners else None

    try:
        r1 = await join(store, "r1", a.url, followers, (lan,))
        r2 = await join(store, "r2", b.url, followers, (lan,))
        w = await join(store, "w", b.url, followers)
        assert r1.netmap is not None and r2.netmap is not None
        id1, id2 = r1.netmap.self_node.id, r2.netmap.self_node.id
        for i in (id1, id2):
            store.approve_routes(i, [lan], time.time())
        await w.until(lambda nm: primary(nm) == id1)
        await w.until(lambda nm: peer_online(nm, id2) and primary(nm) == id1)

        a.kill()
        t0 = time.monotonic()
        await w.until(lambda nm: primary(nm) == id2, timeout=FAILOVER_WAIT)
        took = time.monotonic() - t0
        log.info("SIGKILL of the primary router's replica: standby primary on the other after %.2f s", took)

        followers.remove(r1)
        await r1.stop()
        back = Follower(ControlClient(b.url, r1.client.machine_key), r1.node_key, "r1", routable_ips=(lan,))
        followers.append(back)
        back.start()
        await w.until(lambda nm: peer_online(nm, id1))
        assert w.netmap is not None and primary(w.netmap) == id2
    finally:
        for f in followers:
            await f.stop()


_REGISTER = """
import asyncio, json, sys
import nacl.public
from tailpy.control import ControlClient
from tailpy.keys import MachinePrivate, NodePublic

async def main(url, key, count):
    out = []
    for _ in range(count):
        c = ControlClient(url, MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
        try:
            n = await c.register(NodePublic(bytes(nacl.public.PrivateKey.generate().public_key)), "box", key)
            out.append([n.id, n.name, n.ipv4, n.ipv6])
        finally:
            await c.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_concurrent_registrations_on_both_replicas(
    replicas: tuple[ServeProcess, ServeProcess], pg_url: str, tmp_path: Path
) -> None:
    """Threads and processes register at once through both replicas, every node with the hostname "box":
    no two share an address or a name."""
    a, b = replicas
    (tmp_path / "keys").mkdir()
    s = Store(tmp_path / "keys", db=pg_url)
    key = s.create_auth_key(reusable=True, expires=None, now=time.time()).key
    s.close()
    rows: list[list[object]] = []
    errors: list[BaseException] = []

    async def register(url: str, count: int) -> None:
        for _ in range(count):
            c = ControlClient(url, mkey())
            try:
                n = await c.register(nkey(), "box", key)
                rows.append([n.id, n.name, n.ipv4, n.ipv6])
            finally:
                await c.close()

    def thread(url: str) -> None:
        try:
            asyncio.run(register(url, 10))
        except BaseException as e:
            errors.append(e)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER, url, key, "10"], stdout=subprocess.PIPE, text=True, env=env
        )
        for url in (a.url, b.url, a.url, b.url)
    ]
    threads = [threading.Thread(target=thread, args=(url,)) for url in (a.url, b.url, a.url, b.url)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        rows += json.loads(out)
    assert not errors
    assert len(rows) == 80
    for col in range(4):
        assert len({r[col] for r in rows}) == 80, col


_HOLD_THE_LOCK = """
import os, signal, sys
import sqlalchemy as sa
from tailpy.control.store.database import create_engine, database_url
engine = create_engine(database_url(sys.argv[1], None))
with engine.connect() as conn, conn.begin():  # takes the writer lock
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # hangs here, idle inside its transaction
    try:
        conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as e:  # IdleInTransactionSessionTimeout: the server ended the session
        sys.exit(3 if "idle-in-transaction" in str(e) else 4)
sys.exit(0)
"""


def test_process_hung_inside_a_transaction_releases_the_writer_lock(pg_url: str, tmp_path: Path) -> None:
    """A control process that hangs in the middle of a transaction (SIGSTOP while it holds the writer lock)
    does not stall the others' writes for good: PostgreSQL ends its idle session and the lock is free; the
    hung process finds its session gone when it resumes."""
    empty_database(pg_url)
    (tmp_path / "writer").mkdir()
    writer = Store(tmp_path / "writer", db=pg_url)
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_LOCK, pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
            deadline = time.monotonic() + FAILOVER_WAIT * 2
            while holder.poll() is None and not _stopped(holder.pid):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            t0 = time.monotonic()
            key = writer.create_auth_key(reusable=False, expires=None, now=time.time())  # waits for the lock
            log.info("a write waited %.2f s for the lock of a hung process", time.monotonic() - t0)
            assert key.id in {k.id for k in writer.list_auth_keys()}
            holder.send_signal(signal.SIGCONT)
            rc = holder.wait(timeout=FAILOVER_WAIT)
            assert rc == 3, holder.stderr.read().decode() if holder.stderr else rc
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            writer.close()


def _stopped(pid: int) -> bool:
    """True while process ``pid`` is stopped by a signal (state T in /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False
