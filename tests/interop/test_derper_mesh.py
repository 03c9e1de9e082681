"""tailpy's DERP relay and Tailscale's ``derper`` meshed in one region (derper's ``--mesh-with`` and
``--mesh-psk-file``; the same key given to tailpy's relay): a client on each reaches the other, both ways.

derper dials its mesh peers as ``https://HOST/derp``; ``TS_DEBUG_USE_DERP_HTTP=1`` (derphttp's
``debugUseDERPHTTP``) makes it dial plain HTTP, so no certificates are needed on 127.0.0.1. derper is built
as in ``test_derper.py`` (skipped, saying why, without Go) and killed by pid when done, pass or fail.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tailpy.control import ControlConfig, ControlProcess
from tailpy.derp.client import DerpClient
from tailpy.derp.mesh import Mesh, start_mesh
from tailpy.derp.server import DerpServer
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.proto import derp as proto

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tailscale_go import Derper, GoTools, build_tailscale_tools, free_tcp_port

pytestmark = pytest.mark.interop

MESH_KEY = os.urandom(32)


@pytest.fixture(scope="module")
def go_tools() -> GoTools:
    tools = build_tailscale_tools()
    if isinstance(tools, str):
        pytest.skip(tools)
    return tools


@pytest.fixture(scope="module")
def tailpy_port() -> int:
    return free_tcp_port()


@pytest.fixture(scope="module")
def meshed_derper(
    go_tools: GoTools, tmp_path_factory: pytest.TempPathFactory, tailpy_port: int
) -> Iterator[Derper]:
    state = tmp_path_factory.mktemp("derper-mesh")
    key_file = state / "mesh.key"
    key_file.write_text(MESH_KEY.hex() + "\n")
    port = free_tcp_port()
    d = Derper(
        go_tools.derper,
        state,
        # its own address is listed too, as derper's docs allow (it detects the self-connect by key)
        extra_args=[
            "--mesh-psk-file",
            str(key_file),
            "--mesh-with",
            f"127.0.0.1:{tailpy_port},127.0.0.1:{port}",
        ],
        env={"TS_DEBUG_USE_DERP_HTTP": "1"},
        port=port,
    )
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture
async def tailpy_relay(meshed_derper: Derper, tailpy_port: int) -> AsyncIterator[tuple[DerpServer, Mesh]]:
    server = DerpServer(MachinePrivate.generate(), mesh_key=MESH_KEY)
    await server.start("127.0.0.1", tailpy_port)
    mesh = start_mesh(server.relay, [meshed_derper.url, f"http://127.0.0.1:{tailpy_port}/derp"], MESH_KEY)
    try:
        yield server, mesh
    finally:
        await mesh.stop()
        await server.stop()


async def _eventually(cond: object, what: str, timeout: float = 20.0) -> None:
    assert callable(cond)
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} within {timeout:g} s")


async def _recv_packet(c: DerpClient, timeout: float = 5.0) -> proto.RecvPacket:
    async def first() -> proto.RecvPacket:
        while True:
            m = await c.recv()
            if isinstance(m, proto.RecvPacket):
                return m

    return await asyncio.wait_for(first(), timeout)


async def _send_until_received(src: DerpClient, dst: DerpClient, data: bytes, timeout: float = 20.0) -> None:
    """Send ``data`` once a second until ``dst`` gets it (the far server learns of ``dst`` through the mesh
    watch, a moment after ``dst`` logs in)."""
    for _ in range(int(timeout)):
        await src.send(dst.public_key, data)
        try:
            got = await _recv_packet(dst, 1.0)
        except asyncio.TimeoutError:
            continue
        assert got.src == src.public_key and got.data == data
        return
    raise AssertionError(f"{data!r} did not arrive within {timeout:g} s")


async def test_tailpy_and_derper_meshed_carry_packets_both_ways(
    meshed_derper: Derper, tailpy_relay: tuple[DerpServer, Mesh]
) -> None:
    server, mesh = tailpy_relay
    assert await mesh.wait_connected(20), [(p.url, p.last_error) for p in mesh.peers]
    assert [p.is_self for p in mesh.peers] == [False, True]
    # derper dialed tailpy with the mesh key and watches its connections
    await _eventually(
        lambda: server.metrics.mesh_watchers == 1, f"derper watching tailpy ({meshed_derper.log_tail()})"
    )

    on_tailpy = await DerpClient.connect(
        f"http://127.0.0.1:{server.addresses[0][1]}/derp", NodePrivate.generate()
    )
    on_derper = await DerpClient.connect(meshed_derper.url, NodePrivate.generate())
    try:
        await _eventually(
            lambda: server.relay.forwarders(on_derper.public_key), "tailpy learning of derper's client"
        )
        await _send_until_received(on_tailpy, on_derper, b"tailpy -> derper")
        await _send_until_received(on_derper, on_tailpy, b"derper -> tailpy")
        big = os.urandom(proto.MAX_PACKET_SIZE)
        await on_tailpy.send(on_derper.public_key, big)
        assert (await _recv_packet(on_derper)).data == big
        assert server.metrics.packets_forwarded_out >= 2 and server.metrics.packets_forwarded_in >= 1
        # derper's client leaves: derper says PeerGone, tailpy forgets the key
        await on_derper.close()
        await _eventually(
            lambda: not server.relay.forwarders(on_derper.public_key), "tailpy forgetting the key"
        )
    finally:
        await on_tailpy.close()
        await on_derper.close()


async def test_derper_peer_present_fields_as_tailpy_reads_them(meshed_derper: Derper) -> None:
    """A watcher with the mesh key on derper gets PeerPresent with the client's IP:port and flags (itself
    included, flagged a mesh peer)."""
    client = await DerpClient.connect(meshed_derper.url, NodePrivate.generate())
    watcher = await DerpClient.connect(meshed_derper.url, NodePrivate.generate(), mesh_key=MESH_KEY)
    try:
        await watcher.watch_conns()
        seen: dict[NodePublic, proto.PeerPresent] = {}

        async def present() -> proto.PeerPresent:
            while client.public_key not in seen or watcher.public_key not in seen:
                m = await watcher.recv()
                if isinstance(m, proto.PeerPresent):
                    seen[m.key] = m
            return seen[client.public_key]

        p = await asyncio.wait_for(present(), 10)
        assert p.endpoint is not None and str(p.endpoint[0]) == "127.0.0.1" and p.endpoint[1] > 0
        assert p.flags == proto.PeerPresentFlags.REGULAR
        assert seen[watcher.public_key].flags == proto.PeerPresentFlags.MESH_PEER
    finally:
        await client.close()
        await watcher.close()


async def test_control_embedded_relay_meshed_with_derper(
    meshed_derper: Derper, tailpy_port: int, tmp_path: Path
) -> None:
    """`tailpy control serve --mesh-with DERPER --mesh-psk-file FILE`: the relay embedded in control and
    derper carry packets both ways."""
    key_file = tmp_path / "mesh.key"
    key_file.write_text(MESH_KEY.hex() + "\n")
    config = ControlConfig(
        state_dir=tmp_path / "control",
        host="127.0.0.1",
        port=0,
        derp_host="127.0.0.1",
        derp_port=tailpy_port,  # (where derper's --mesh-with dials)
        stun=False,
        derp_verify_clients=False,
        mesh_with=(meshed_derper.url,),
        mesh_psk_file=key_file,
    )
    process = ControlProcess(config)
    await process.start()
    try:
        assert process.relay is not None and process.mesh is not None and process.mesh.mesh is not None
        mesh, metrics = process.mesh.mesh, process.relay.metrics
        assert await mesh.wait_connected(20), [(p.url, p.last_error) for p in mesh.peers]
        await _eventually(
            lambda: metrics.mesh_watchers == 1,
            f"derper watching control's relay ({meshed_derper.log_tail()})",
        )
        on_control = await DerpClient.connect(f"http://127.0.0.1:{tailpy_port}/derp", NodePrivate.generate())
        on_derper = await DerpClient.connect(meshed_derper.url, NodePrivate.generate())
        try:
            await _send_until_received(on_control, on_derper, b"control's relay -> derper")
            await _send_until_received(on_derper, on_control, b"derper -> control's relay")
        finally:
            await on_control.close()
            await on_derper.close()
    finally:
        await process.stop()
