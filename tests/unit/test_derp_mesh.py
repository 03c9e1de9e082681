"""DERP mesh (derper's ``--mesh-with``): the mesh frame codecs and key, and tailpy relays meshed on
127.0.0.1 (:mod:`tailpy.derp.mesh` dialing, :mod:`tailpy.derp.relay` serving)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.derp.client import DerpClient, DerpClientError, ReconnectingDerpClient
from tailpy.derp.mesh import Mesh, mesh_urls, read_mesh_key, start_mesh
from tailpy.derp.server import DerpServer
from tailpy.errors import ConfigError, ParseError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.proto import derp as proto

MESH_KEY = bytes(range(32))
OTHER_KEY = bytes(32 - i for i in range(32))

keys = st.binary(min_size=32, max_size=32).map(NodePublic)
endpoints = st.one_of(
    st.none(),
    st.tuples(
        st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(0, 2**128 - 1).map(IPv6Address)),
        st.integers(0, 65535),
    ),
)
mesh_frames = st.one_of(
    st.builds(proto.WatchConns),
    st.builds(proto.ClosePeer, keys),
    st.builds(proto.ForwardPacket, keys, keys, st.binary(max_size=300)),
    st.builds(proto.PeerGone, keys, st.integers(0, 255)),
    endpoints.flatmap(
        lambda ep: st.builds(
            proto.PeerPresent,
            keys,
            st.just(ep),
            st.none() if ep is None else st.one_of(st.none(), st.integers(0, 255)),
        )
    ),
)


# --- codec ------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(mesh_frames, max_size=6), st.integers(min_value=1, max_value=40))
def test_fuzz_mesh_frames_round_trip(frames: list[proto.Frame], step: int) -> None:
    """Every mesh frame encodes to bytes that parse back to it, however the stream is cut."""
    wire = b"".join(proto.encode(f) for f in frames)
    r = proto.FrameReader()
    out: list[proto.Frame] = []
    for i in range(0, len(wire), step):
        out += r.feed(wire[i : i + step])
    want = [
        # an IPv4-mapped IPv6 endpoint reads back as IPv4 (Go's netip.AddrPort.Addr().Unmap())
        proto.PeerPresent(f.key, (f.endpoint[0].ipv4_mapped or f.endpoint[0], f.endpoint[1]), f.flags)
        if isinstance(f, proto.PeerPresent) and f.endpoint and isinstance(f.endpoint[0], IPv6Address)
        and f.endpoint[0].ipv4_mapped
        else f
        for f in frames
    ]  # fmt: skip
    assert out == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([0x08, 0x09, 0x0A, 0x10, 0x11]))
def test_fuzz_mesh_payloads_only_parse_error(payload: bytes, t: int) -> None:
    with contextlib.suppress(ParseError):
        f = proto.parse_frame(t, payload)
        assert proto.FrameReader().feed(proto.encode(f)) == [f]


def test_forward_packet_bytes() -> None:
    a, b = NodePrivate.generate().public, NodePrivate.generate().public
    wire = proto.encode_forward_packet(a, b, b"hi")
    assert wire == bytes([0x0A]) + (66).to_bytes(4, "big") + a.raw + b.raw + b"hi"
    assert wire == proto.encode(proto.ForwardPacket(a, b, b"hi"))
    with pytest.raises(ValueError):
        proto.encode_forward_packet(a, b, bytes(proto.MAX_PACKET_SIZE + 1))


def test_peer_present_as_derper_sends_it() -> None:
    """derpserver's sendPeerPresent: key, 16-byte IP, big-endian port, flags byte (REGULAR = 1)."""
    a = NodePrivate.generate().public
    f = proto.PeerPresent(a, (IPv4Address("127.0.0.1"), 4242), int(proto.PeerPresentFlags.REGULAR))
    wire = proto.encode(f)
    assert len(wire) == 5 + 32 + 16 + 2 + 1
    assert wire[-3:] == b"\x10\x92\x01"
    assert int(proto.PeerPresentFlags.MESH_PEER) == 2 and int(proto.PeerPresentFlags.NOT_IDEAL) == 8


def test_mesh_key_text(tmp_path: Path) -> None:
    assert proto.parse_mesh_key(" " + MESH_KEY.hex() + "\n") == MESH_KEY
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ParseError):
            proto.parse_mesh_key(bad)
    path = os.path.join(tmp_path, "mesh.key")
    with open(path, "w") as f:
        f.write(MESH_KEY.hex() + "\n")
    assert read_mesh_key(Path(path)) == MESH_KEY
    with open(path, "w") as f:
        f.write("not a key")
    with pytest.raises(ConfigError, match="mesh key file"):
        read_mesh_key(Path(path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_mesh_key(Path(path + ".missing"))


def test_mesh_urls() -> None:
    assert mesh_urls("a.example:8443, ,http://b.example:80/derp,https://c.example", tls=False) == [
        "http://a.example:8443/derp",
        "http://b.example:80/derp",
        "https://c.example/derp",
    ]
    assert mesh_urls(["d.example"], tls=True) == ["https://d.example/derp"]
    with pytest.raises(ConfigError, match="DIAL-HOST"):
        mesh_urls("derp1.example/10.0.0.1", tls=True)
    with pytest.raises(ConfigError):
        mesh_urls("ftp://x.example", tls=False)


# --- relays meshed on loopback ----------------------------------------------------------------------------


class Region:
    """``n`` tailpy relays on 127.0.0.1, each meshed with every other (each one's list names all, itself
    included, as derper's --mesh-with may)."""

    def __init__(self) -> None:
        self.servers: list[DerpServer] = []
        self.meshes: list[Mesh] = []
        self.clients: list[DerpClient | ReconnectingDerpClient] = []

    async def start(self, n: int, mesh_key: bytes = MESH_KEY, keys: list[bytes] | None = None) -> Region:
        for _ in range(n):
            s = DerpServer(MachinePrivate.generate(), mesh_key=mesh_key)
            await s.start("127.0.0.1", 0)
            self.servers.append(s)
        for i, s in enumerate(self.servers):
            k = keys[i] if keys else mesh_key
            self.meshes.append(start_mesh(s.relay, self.urls, k, base=0.05, cap=0.2))
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url(s) for s in self.servers]

    @staticmethod
    def url(s: DerpServer) -> str:
        return f"http://127.0.0.1:{s.addresses[0][1]}/derp"

    async def connected(self) -> None:
        for m in self.meshes:
            assert await m.wait_connected(10), [(p.url, p.last_error) for p in m.peers]

    async def client(self, i: int) -> DerpClient:
        c = await DerpClient.connect(self.url(self.servers[i]), NodePrivate.generate())
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for m in self.meshes:
            await m.stop()
        for s in self.servers:
            await s.stop()


@pytest.fixture
async def region() -> AsyncIterator[Region]:
    r = Region()
    try:
        yield r
    finally:
        await r.close()


async def recv_packet(c: DerpClient | ReconnectingDerpClient, timeout: float = 5.0) -> proto.RecvPacket:
    async def first() -> proto.RecvPacket:
        while True:
            m = await c.recv()
            if isinstance(m, proto.RecvPacket):
                return m

    return await asyncio.wait_for(first(), timeout)


async def eventually(cond: object, timeout: float = 10.0) -> None:
    assert callable(cond)
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_two_relays_carry_packets_both_ways(region: Region) -> None:
    await region.start(2)
    await region.connected()
    a, b = region.servers
    assert not region.meshes[0].peers[1].is_self and region.meshes[0].peers[0].is_self  # itself left out
    ca, cb = await region.client(0), await region.client(1)
    await eventually(lambda: a.relay.forwarders(cb.public_key) and b.relay.forwarders(ca.public_key))
    await ca.send(cb.public_key, b"a to b")
    got = await recv_packet(cb)
    assert got.src == ca.public_key and got.data == b"a to b"
    await cb.send(ca.public_key, b"b to a")
    got = await recv_packet(ca)
    assert got.src == cb.public_key and got.data == b"b to a"
    assert a.metrics.packets_forwarded_out == 1 and a.metrics.packets_forwarded_in == 1
    assert b.metrics.packets_forwarded_out == 1 and b.metrics.packets_forwarded_in == 1
    assert a.metrics.mesh_peers == 1 and a.metrics.mesh_peers_connected == 1 and a.metrics.mesh_watchers == 1
    text = a.metrics.prometheus()
    assert "derp_packets_forwarded_out_total 1" in text and "derp_mesh_peers_connected 1" in text
    assert 'derp_packets_dropped_total{reason="unknown_dest_on_fwd"} 0' in text


async def test_peer_gone_when_a_client_leaves(region: Region) -> None:
    await region.start(2)
    await region.connected()
    a = region.servers[0]
    ca, cb = await region.client(0), await region.client(1)
    await eventually(lambda: a.relay.forwarders(cb.public_key))
    await cb.send(ca.public_key, b"hello")
    await recv_packet(ca)
    await cb.close()
    # a learns from b's PeerGone that cb left the region, and tells ca, which received from it
    await eventually(lambda: not a.relay.forwarders(cb.public_key))

    async def gone() -> proto.PeerGone:
        while True:
            m = await ca.recv()
            if isinstance(m, proto.PeerGone):
                return m

    assert await asyncio.wait_for(gone(), 5) == proto.PeerGone(
        cb.public_key, proto.PeerGoneReason.DISCONNECTED
    )
    await ca.send(cb.public_key, b"nobody")
    await eventually(lambda: a.metrics.packets_dropped["unknown_dest"] == 1)


async def test_watcher_sees_present_and_gone_with_derper_fields(region: Region) -> None:
    await region.start(1)
    s = region.servers[0]
    c = await region.client(0)
    watcher = await DerpClient.connect(region.urls[0], NodePrivate.generate(), mesh_key=MESH_KEY)
    region.clients.append(watcher)
    await watcher.watch_conns()
    seen: dict[NodePublic, proto.PeerPresent] = {}

    async def present(key: NodePublic) -> proto.PeerPresent:
        while key not in seen:
            m = await watcher.recv()
            if isinstance(m, proto.PeerPresent):
                seen[m.key] = m
        return seen[key]

    p = await asyncio.wait_for(present(c.public_key), 5)
    assert p.endpoint is not None and p.endpoint[0] == IPv4Address("127.0.0.1") and p.endpoint[1] > 0
    assert p.flags == proto.PeerPresentFlags.REGULAR
    c2 = await region.client(0)
    assert (await asyncio.wait_for(present(c2.public_key), 5)).flags == proto.PeerPresentFlags.REGULAR
    await c2.close()

    async def gone() -> proto.PeerGone:
        while True:
            m = await watcher.recv()
            if isinstance(m, proto.PeerGone):
                return m

    assert await asyncio.wait_for(gone(), 5) == proto.PeerGone(
        c2.public_key, proto.PeerGoneReason.DISCONNECTED
    )
    assert s.metrics.mesh_watchers == 1


async def test_wrong_mesh_key_refused(region: Region, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tailpy.derp")
    await region.start(2, keys=[MESH_KEY, OTHER_KEY])  # the second dials with a key the first does not have
    a, b = region.servers
    b.relay.mesh_key = MESH_KEY  # b accepts a's key, and dials a with another one
    # a's watcher on b is accepted; b's watcher on a is refused at WatchConns
    assert await region.meshes[0].wait_connected(10)
    assert not await region.meshes[1].peers[0].wait_connected(1.0)
    assert a.metrics.mesh_watchers == 0 and a.metrics.disconnects["bad_frame"] >= 1
    # said as it is: a mesh key that is not a's, not "no mesh key"; b's health counts the peer not watched
    assert "presented a mesh key that is not this server's (another key)" in caplog.text
    assert "without mesh rights (its mesh key is not this server's)" in caplog.text
    health = region.meshes[1].health()
    assert health["status"] == "warning" and health["connected"] == 0
    assert [p["url"] for p in health["not_connected"]] == [region.urls[0]]
    assert region.meshes[0].health() == {"status": "ok", "peers": 1, "connected": 1, "not_connected": []}
    b.extra_health["mesh"] = region.meshes[1].health
    assert b.health()["status"] == "degraded"
    watcher = await DerpClient.connect(region.urls[0], NodePrivate.generate(), mesh_key=OTHER_KEY)
    region.clients.append(watcher)
    await watcher.watch_conns()
    await asyncio.wait_for(watcher.wait_closed(), 5)
    # a plain client cannot forward either
    plain = await region.client(0)
    with contextlib.suppress(DerpClientError):
        plain.write_nowait(proto.encode_forward_packet(plain.public_key, plain.public_key, b"x"))
    await asyncio.wait_for(plain.wait_closed(), 5)
    assert a.metrics.packets_forwarded_in == 0


async def test_forwarded_packet_is_never_forwarded_again(region: Region) -> None:
    await region.start(2)
    await region.connected()
    a, b = region.servers
    cb = await region.client(1)
    await eventually(lambda: a.relay.forwarders(cb.public_key))
    # a mesh peer hands a a packet for cb, who is on b: a delivers only to its own clients
    peer = await DerpClient.connect(region.urls[0], NodePrivate.generate(), mesh_key=MESH_KEY)
    region.clients.append(peer)
    src = NodePrivate.generate().public
    assert peer.write_nowait(proto.encode_forward_packet(src, cb.public_key, b"loop?"))
    await eventually(lambda: a.metrics.packets_dropped["unknown_dest_on_fwd"] == 1)
    assert a.metrics.packets_forwarded_out == 0 and b.metrics.packets_forwarded_in == 0


async def test_mesh_peer_skips_client_verification(region: Region) -> None:
    async def refuse(key: NodePublic, source: str) -> bool:
        return False

    await region.start(2)
    for s in region.servers:
        s.verify_client = refuse
    for m in region.meshes:  # the watch connections log in again, now past a refusing verifier
        for p in m.peers:
            if p._client is not None:
                await p._client.close()
    await region.connected()
    with pytest.raises(DerpClientError, match="admits only known nodes"):
        await DerpClient.connect(region.urls[0], NodePrivate.generate())


async def test_relay_stopped_clients_move_and_reach_the_rest(region: Region) -> None:
    """Three relays; the one a client is on stops; it reconnects to another relay of the region (its next
    URL) and the clients on the others reach it again, and it them."""
    await region.start(3)
    await region.connected()
    a, b, c = region.servers
    urls = region.urls
    x = ReconnectingDerpClient(urls[2], NodePrivate.generate(), base=0.05, cap=0.2, fallback_urls=urls[:2])
    region.clients.append(x)
    x.start()
    await x.wait_connected(5)
    ya, yb = await region.client(0), await region.client(1)
    xk = x.private_key.public
    await eventually(lambda: a.relay.forwarders(xk) and b.relay.forwarders(xk))
    await ya.send(xk, b"before")
    assert (await recv_packet(x)).data == b"before"

    await region.meshes[2].stop()
    await c.stop()
    await eventually(lambda: x.connected_url == urls[0] and x.client is not None)
    await eventually(lambda: b.relay.forwarders(xk) == [region.meshes[1].peers[0]])
    for sender, name in ((ya, b"from a"), (yb, b"from b")):
        await sender.send(xk, name)
        assert (await recv_packet(x)).data == name
    await x.send(yb.public_key, b"x to b")
    assert (await recv_packet(yb)).data == b"x to b"
    await x.send(ya.public_key, b"x to a")
    assert (await recv_packet(ya)).data == b"x to a"
    assert b.metrics.mesh_peers_connected == 1  # c is gone


async def test_local_client_wins_over_the_mesh(region: Region) -> None:
    """The same key on two relays (a client moving, or a cloned key): a relay delivers to its own
    connection of that key, not through the mesh (derpserver ``lookupDest``)."""
    await region.start(2)
    await region.connected()
    a = region.servers[0]
    key = NodePrivate.generate()
    on_b = await DerpClient.connect(region.urls[1], key)
    region.clients.append(on_b)
    await eventually(lambda: a.relay.forwarders(key.public))
    on_a = await DerpClient.connect(region.urls[0], key)
    region.clients.append(on_a)
    sender = await region.client(0)
    await sender.send(key.public, b"local")
    assert (await recv_packet(on_a)).data == b"local"
    assert a.metrics.packets_forwarded_out == 0
    await on_a.close()  # the key is still in the region (on b): no PeerGone, packets go through the mesh
    await eventually(lambda: not a.relay.connections(key.public))
    await sender.send(key.public, b"remote")
    assert (await recv_packet(on_b)).data == b"remote"
    assert a.metrics.packets_forwarded_out == 1


def test_cli_mesh_flags_errors_are_one_sentence(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tailpy.cli.main import cli

    runner = CliRunner()
    base = ["derp", "serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0", "--no-stun"]
    r = runner.invoke(cli, [*base, "--mesh-with", "127.0.0.1:1"])
    assert r.exit_code == 1 and "--mesh-with needs --mesh-psk-file" in r.output
    bad = tmp_path / "bad.key"
    bad.write_text("secret\n")
    r = runner.invoke(cli, [*base, "--mesh-with", "127.0.0.1:1", "--mesh-psk-file", str(bad)])
    assert r.exit_code == 1 and "must be 64 hexadecimal digits" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["derp", "serve", "--help"])
    assert "--mesh-with" in r.output and "--mesh-psk-file" in r.output


async def test_watcher_gets_every_client_connected_before_it(region: Region) -> None:
    """The first PeerPresent burst lists every client (more than the 64 control frames a plain client may
    have waiting): none is dropped."""
    await region.start(1)
    clients = [await region.client(0) for _ in range(150)]
    watcher = await DerpClient.connect(region.urls[0], NodePrivate.generate(), mesh_key=MESH_KEY)
    region.clients.append(watcher)
    await watcher.watch_conns()
    want = {c.public_key for c in clients} | {watcher.public_key}
    seen: set[NodePublic] = set()

    async def read() -> None:
        while not want <= seen:
            m = await watcher.recv()
            if isinstance(m, proto.PeerPresent):
                seen.add(m.key)

    await asyncio.wait_for(read(), 10)
    assert seen == want
