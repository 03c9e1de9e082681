"""The embedded relays of control replicas as one DERP region (tailpy.control.derpmesh): the DERP map of the
live replicas' relays, meshing with them as they come and go, and `--mesh-with` standalone relays."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tailpy.control import ControlConfig, ControlProcess
from tailpy.control.derpmesh import relay_record, replicas_derp_map
from tailpy.derp.server import DerpServer
from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate
from tailpy.netmap import DerpMap, DerpNode, DerpRegion


def _region(region_id: int, port: int, code: str = "tailpy") -> DerpRegion:
    node = DerpNode(f"{region_id}a", region_id, "127.0.0.1", ipv4="127.0.0.1", derp_port=port,
                    stun_port=-1, insecure_for_tests=True)  # fmt: skip
    return DerpRegion(region_id, code, f"tailpy embedded DERP ({code})", (node,))


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/derp"


def test_map_lists_each_region_s_relays_own_first_named_by_replica_order() -> None:
    relays = {
        "b": relay_record(_region(900, 2)),
        "a": relay_record(_region(900, 1)),
        "c": relay_record(_region(900, 3)),
        "d": relay_record(_region(901, 4, "other")),
        "bad": "{not json",
    }
    derp_map, peers = replicas_derp_map("b", relays)
    assert sorted(derp_map.regions) == [900, 901]
    nodes = derp_map.regions[900].nodes
    assert [n.url() for n in nodes] == [_url(2), _url(1), _url(3)]
    assert [n.name for n in nodes] == ["900b", "900a", "900c"]  # (the same names on every replica)
    assert [n.name for n in derp_map.regions[901].nodes] == ["901a"]
    assert derp_map.regions[901].region_code == "other"
    assert peers == [_url(1), _url(3)]  # (only this region's relays are meshed with)
    # another replica's map: its relay first, the same names
    other, peers_d = replicas_derp_map("d", relays)
    assert [n.name for n in other.regions[900].nodes] == ["900a", "900b", "900c"] and peers_d == []


def test_a_region_of_the_static_map_wins() -> None:
    static = DerpMap({901: _region(901, 9, "ext")})
    relays = {"a": relay_record(_region(900, 1)), "d": relay_record(_region(901, 4))}
    derp_map, _ = replicas_derp_map("a", relays, static)
    assert derp_map.regions[901] == static.regions[901]
    alone, peers = replicas_derp_map("a", {"a": relays["a"]})
    assert [n.name for n in alone.regions[900].nodes] == ["900a"] and peers == []


def _config(state_dir: Path, **kw: object) -> ControlConfig:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "derp_host": "127.0.0.1",
        "derp_port": 0,
        "stun": False,
        "derp_verify_clients": False,
    }
    return ControlConfig(state_dir=state_dir, **{**base, **kw})  # type: ignore[arg-type]


def test_mesh_with_needs_a_key_and_a_relay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--mesh-with needs --mesh-psk-file"):
        _config(tmp_path, mesh_with=("http://127.0.0.1:1/derp",)).check()
    with pytest.raises(ConfigError, match="cannot go with --no-derp"):
        _config(tmp_path, derp=False, mesh_with=("x",), mesh_psk_file=tmp_path / "k").check()


async def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.05)


async def test_mesh_with_a_standalone_relay(tmp_path: Path) -> None:
    """SQLite, one process: --mesh-with and --mesh-psk-file mesh the embedded relay with a standalone one
    both ways; the DERP map stays the embedded relay's alone."""
    key = os.urandom(32)
    (tmp_path / "mesh.key").write_text(key.hex() + "\n")
    standalone = DerpServer(MachinePrivate(os.urandom(32)), mesh_key=key)
    await standalone.start("127.0.0.1", 0)
    port = standalone.addresses[0][1]
    process = ControlProcess(
        _config(tmp_path / "state", mesh_with=(_url(port),), mesh_psk_file=tmp_path / "mesh.key")
    )
    await process.start()
    try:
        assert process.relay is not None and process.mesh is not None
        await _until(lambda: process.relay is not None and process.relay.metrics.mesh_peers_connected == 1,
                     "the embedded relay watching the standalone one")  # fmt: skip
        await _until(lambda: standalone.metrics.mesh_watchers == 1, "the embedded relay a mesh watcher")
        assert process.derp_map is not None and len(process.derp_map.regions[900].nodes) == 1
    finally:
        await process.stop()
        await standalone.stop()


async def test_replicas_on_one_database_mesh_and_follow_each_other(tmp_path: Path) -> None:
    """Two replicas (ids given: liveness on) on one SQLite file: each relay meshes with the other, the DERP
    map lists both, and when one stops the other drops it from the mesh and the map."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = ControlProcess(_config(tmp_path / "a", db=db, replica_id="a", heartbeat=0.2))
    b = ControlProcess(_config(tmp_path / "b", db=db, replica_id="b", heartbeat=0.2))
    await a.start()
    await b.start()
    try:
        assert a.relay is not None and b.relay is not None and a.mesh is not None and b.mesh is not None
        for p in (a, b):
            await _until(lambda p=p: p.relay is not None and p.relay.metrics.mesh_peers_connected == 1,  # type: ignore[misc]
                         "each relay watching the other")  # fmt: skip
        for p in (a, b):
            await _until(lambda p=p: p.derp_map is not None and len(p.derp_map.regions[900].nodes) == 2,  # type: ignore[misc]
                         "both relays in each map")  # fmt: skip
        assert a.derp_map is not None and b.derp_map is not None
        a_url = f"http://127.0.0.1:{a.relay.addresses[0][1]}/derp"
        assert a.derp_map.regions[900].nodes[0].url() == a_url != b.derp_map.regions[900].nodes[0].url()
        assert a.server is not None and a.server.mapper.derp_map == a.derp_map
        await a.stop()
        await _until(lambda: b.derp_map is not None and len(b.derp_map.regions[900].nodes) == 1,
                     "the stopped replica's relay out of the map")  # fmt: skip
        await _until(
            lambda: b.mesh is not None and b.mesh.mesh is not None and not b.mesh.mesh.peers, "unmeshed"
        )
    finally:
        await a.stop()
        await b.stop()
