"""The embedded DERP relays of two `tailpy control serve` replicas (subprocesses on 127.0.0.1) on one
PostgreSQL database started here, one region: they mesh on their own (the key kept in the database), the
DERP map nodes get lists both relays (the replica's own first), and DERP clients on either relay reach each
other; one replica killed with SIGKILL, its relay's clients move to the other relay and reach the rest, and
the map drops the dead relay. Every process is stopped by pid; the database is removed afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _replicas import TAILPY, Clients, Follower, ServeProcess, join, serve_pair, until
from _replicas import pg_url as pg_url
from _replicas import store as store

from tailpy.control import Store
from tailpy.control.store import changes
from tailpy.netmap import NetMap

log = logging.getLogger(__name__)

REGION = 900
CLIENTS_PER_RELAY = 2


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    """Replicas ``a`` and ``b``, each with its embedded relay (no STUN, admitting any client) in
    :data:`REGION`."""
    with serve_pair(pg_url, tmp_path, relay_region=REGION) as pair:
        yield pair


def _relays(nm: NetMap) -> list[str]:
    """The URLs of the nodes of :data:`REGION` in ``nm``'s DERP map, in order."""
    region = nm.derp_map.regions.get(REGION) if nm.derp_map is not None else None
    return [n.url() for n in region.nodes] if region is not None else []


async def test_replica_relays_mesh_and_survive_a_killed_replica(
    replicas: tuple[ServeProcess, ServeProcess], store: Store
) -> None:
    a, b = replicas
    followers: list[Follower] = []
    clients = Clients([a.derp_url, b.derp_url], CLIENTS_PER_RELAY)
    try:
        # the relays mesh with each other (nothing told them of each other but the database)
        for r in (a, b):
            took = await until(
                lambda r=r: r.metric("derp_mesh_peers_connected") == 1,  # type: ignore[misc]
                f"replica {r.name}'s relay meshed with the other ({r.log_text()[-1500:]})",
            )
            log.info("replica %s: relay meshed %.2f s after both listened", r.name, took)
        # every node's DERP map lists both relays in the region, its own replica's first
        fa = await join(store, "on-a", f"{a.url},{b.url}", followers)
        fb = await join(store, "on-b", f"{b.url},{a.url}", followers)
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
        await until(
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
        await until(lambda: b.metric("derp_mesh_peers") == 0, "b's relay dropping its dead mesh peer")
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
    await until(
        lambda: _health(a.port)["checks"].get("derp_mesh", {}).get("connected") == 1,
        "a's relay meshed with b's",
    )
    assert _health(a.port)["status"] == "ok"

    wrong = tmp_path / "wrong.key"
    wrong.write_text("ab" * 32 + "\n")
    c = ServeProcess.control(
        "c", pg_url, tmp_path, relay_region=REGION, extra=("--mesh-psk-file", str(wrong))
    )
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
    d = ServeProcess.control(
        "d", pg_url, tmp_path, relay_region=REGION, extra=("--mesh-psk-file", str(key_file))
    )
    try:
        d.wait_listening()
        await until(
            lambda: _health(d.port)["checks"].get("derp_mesh", {}).get("connected") == 2,
            "d's relay meshed with a's and b's",
        )
    finally:
        d.stop()
