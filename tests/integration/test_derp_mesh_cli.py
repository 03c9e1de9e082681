"""Three ``tailpy derp serve`` processes on 127.0.0.1 meshed into one region (``--mesh-with`` naming all
three, ``--mesh-psk-file``), clients spread over them: every client reaches every other; then one relay is
killed with SIGKILL, its clients move to another relay of the region and reach the rest again. Every
process is stopped by pid, pass or fail."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _replicas import Clients, ServeProcess, free_port, until

RELAYS = 3
CLIENTS_PER_RELAY = 2


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    key_file = tmp_path / "mesh.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    ports = [free_port() for _ in range(RELAYS)]
    # each lists all three, itself included, as derper's --mesh-with may
    mesh = ("--mesh-with", ",".join(f"127.0.0.1:{p}" for p in ports), "--mesh-psk-file", str(key_file))
    procs: list[ServeProcess] = []
    try:
        for i, port in enumerate(ports):
            procs.append(ServeProcess.derp(f"relay{i}", tmp_path, port, mesh))
        yield procs
    finally:
        for r in procs:
            r.stop()


@pytest.fixture
async def clients(relays: list[ServeProcess]) -> AsyncIterator[Clients]:
    for r in relays:
        what = f"relay on port {r.port} meshed with the other two ({r.log_text()[-1500:]})"
        await until(lambda r=r: r.metric("derp_mesh_peers_connected") == RELAYS - 1, what)  # type: ignore[misc]
    cs = Clients([r.derp_url for r in relays], CLIENTS_PER_RELAY)
    try:
        await cs.start()
        yield cs
    finally:
        await cs.close()


async def test_three_relays_one_region_every_pair_and_a_relay_killed(
    relays: list[ServeProcess], clients: Clients
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
    await until(
        lambda: all(c.client is not None and c.connected_url != dead.derp_url for c in moved),
        "the killed relay's clients reconnected elsewhere",
    )
    for r in relays[:-1]:
        await until(
            lambda r=r: r.metric("derp_mesh_peers_connected") == RELAYS - 2,  # type: ignore[misc]
            f"relay on port {r.port} noticing its dead peer",
        )
    await clients.every_pair_reaches(b"after the kill")
    assert "is this server; not meshing with itself" in relays[0].log_text()
