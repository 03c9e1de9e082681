"""DERP relay server (tailpy.derp.server) on 127.0.0.1, driven by a minimal test client built on the codec."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import nacl.public
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _metrics import samples as samples_of
from tailpy.derp.server import DUPLICATE_KEY_PROBLEM, DerpServer, load_or_create_key
from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.proto import derp as proto

SERVER_KEY = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def node() -> NodePrivate:
    return NodePrivate(bytes(nacl.public.PrivateKey.generate()))


class Client:
    """A bare DERP client: HTTP upgrade, login, then frames in and out (no automatic Pong)."""

    def __init__(self, key: NodePrivate | None = None) -> None:
        self.key = key or node()
        self.frames = proto.FrameReader(max_frame_len=1 << 20)
        self.queue: list[proto.Frame] = []
        self.headers: dict[str, str] = {}
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.server_key: proto.ServerKey

    async def open(self, port: int, *, fast_start: bool = False, rcvbuf: int = 0) -> None:
        if rcvbuf:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        else:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "Derp-Fast-Start: 1\r\n" if fast_start else ""
        self.writer.write(
            b"GET /derp HTTP/1.1\r\nHost: derp.test\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
            + f"{extra}\r\n".encode()
        )
        if not fast_start:
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
            assert head.startswith("HTTP/1.1 101 ")
            for line in head.split("\r\n")[1:]:
                if line:
                    k, _, v = line.partition(":")
                    self.headers[k.lower()] = v.strip()
        sk = await self.recv()
        assert isinstance(sk, proto.ServerKey)
        self.server_key = sk

    async def login(self, port: int, **kw: object) -> Client:
        await self.open(port, **kw)  # type: ignore[arg-type]
        self.send(proto.seal_client_info(self.key, self.server_key.key))
        si = await self.recv()
        assert isinstance(si, proto.ServerInfo)
        assert proto.open_server_info(self.key, self.server_key.key, si) == {"version": 2}
        return self

    @property
    def public(self) -> NodePublic:
        return self.key.public

    def send(self, frame: proto.Frame) -> None:
        self.writer.write(proto.encode(frame))

    async def recv(self, timeout: float = 5.0, *, skip: tuple[type, ...] = ()) -> proto.Frame:
        async def get() -> proto.Frame:
            while True:
                while self.queue:
                    f = self.queue.pop(0)
                    if not isinstance(f, skip):
                        return f
                data = await self.reader.read(1 << 16)
                if not data:
                    raise EOFError
                self.queue += self.frames.feed(data)

        return await asyncio.wait_for(get(), timeout)

    async def expect_eof(self, timeout: float = 5.0) -> None:
        with pytest.raises(EOFError):
            while True:
                await self.recv(timeout)
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[DerpServer]:
    s = DerpServer(SERVER_KEY)
    await s.start("127.0.0.1", 0)
    yield s
    await s.stop()


def port_of(s: DerpServer) -> int:
    return s.addresses[0][1]


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    raw = await asyncio.wait_for(r.read(), 5)
    w.close()
    await w.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def eventually(cond: object, timeout: float = 5.0) -> None:
    assert callable(cond)
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_login_both_ways(server: DerpServer) -> None:
    c = await Client().login(port_of(server))
    assert c.server_key.key == SERVER_KEY.public
    assert c.headers["upgrade"] == "DERP"
    assert c.headers["derp-version"] == "2"
    assert c.headers["derp-public-key"] == SERVER_KEY.public.raw.hex()
    await eventually(lambda: len(server.connections(c.public)) == 1)
    assert server.connections(c.public)[0].info == {"version": 2}
    fast = await Client().login(port_of(server), fast_start=True)  # no 101 with Derp-Fast-Start: 1
    assert fast.headers == {}
    await eventually(lambda: server.metrics.clients == 2)
    await c.close()
    await fast.close()
    await eventually(lambda: server.metrics.clients == 0)


async def test_fast_start_frames_in_the_request_read(server: DerpServer) -> None:
    """Derp-Fast-Start: the client's ClientInfo and first packet may arrive with its request head."""
    a = await Client().login(port_of(server))
    b = Client()
    r, w = await asyncio.open_connection("127.0.0.1", port_of(server))
    b.reader, b.writer = r, w
    sk = proto.ServerKey(SERVER_KEY.public)  # known in advance, as derphttp's ServerPublicKey option
    w.write(
        b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"
        + proto.encode(proto.seal_client_info(b.key, sk.key))
        + proto.encode(proto.SendPacket(a.public, b"early"))
    )
    got = await a.recv(skip=(proto.KeepAlive,))
    assert got == proto.RecvPacket(b.public, b"early")
    await a.close()
    await b.close()


async def test_two_clients_relay_both_ways(server: DerpServer) -> None:
    a = await Client().login(port_of(server))
    b = await Client().login(port_of(server))
    await eventually(lambda: server.metrics.clients == 2)
    a.send(proto.SendPacket(b.public, b"hello b"))
    b.send(proto.SendPacket(a.public, b"hello a"))
    assert await b.recv() == proto.RecvPacket(a.public, b"hello b")
    assert await a.recv() == proto.RecvPacket(b.public, b"hello a")
    big = os.urandom(proto.MAX_PACKET_SIZE)
    a.send(proto.SendPacket(b.public, big))
    assert await b.recv() == proto.RecvPacket(a.public, big)
    m = server.metrics
    assert m.packets_relayed == 3
    assert m.bytes_relayed == 14 + proto.MAX_PACKET_SIZE
    text = m.prometheus()
    assert "derp_packets_relayed_total 3" in text
    assert "derp_clients 2" in text
    await a.close()
    await b.close()


async def test_unknown_destination_peer_gone_not_here_rate_limited(server: DerpServer) -> None:
    a = await Client().login(port_of(server))
    nobody = node().public
    for _ in range(6):
        a.send(proto.SendPacket(nobody, b"x"))
    a.send(proto.Ping(b"barrier!"))
    got: list[proto.Frame] = []
    while (f := await a.recv()) != proto.Pong(b"barrier!"):
        got.append(f)
    assert got == [proto.PeerGone(nobody, proto.PeerGoneReason.NOT_HERE)] * 3  # burst 3, then 1/s
    assert server.metrics.packets_dropped["unknown_dest"] == 6
    assert server.metrics.peer_gone_frames["not_here"] == 3
    await a.close()


async def test_peer_gone_disconnected_to_receivers(server: DerpServer) -> None:
    a = await Client().login(port_of(server))
    b = await Client().login(port_of(server))
    a.send(proto.SendPacket(b.public, b"hi"))
    assert await b.recv() == proto.RecvPacket(a.public, b"hi")
    await a.close()
    assert await b.recv() == proto.PeerGone(a.public, proto.PeerGoneReason.DISCONNECTED)
    await b.close()


async def test_oversize_header_disconnects_only_that_client(server: DerpServer) -> None:
    a = await Client().login(port_of(server))
    b = await Client().login(port_of(server))
    bad = await Client().login(port_of(server))
    bad.writer.write(bytes([proto.FrameType.SEND_PACKET]) + (0xFFFF_FFFF).to_bytes(4, "big"))
    await bad.expect_eof()
    assert server.metrics.disconnects["bad_frame"] == 1
    a.send(proto.SendPacket(b.public, b"still here"))
    assert await b.recv() == proto.RecvPacket(a.public, b"still here")
    assert server.metrics.clients == 2
    await a.close()
    await b.close()


async def test_slow_reader_does_not_stall_others() -> None:
    s = DerpServer(SERVER_KEY, queue_depth=8, write_timeout=60)
    await s.start("127.0.0.1", 0)
    try:
        a = await Client().login(port_of(s))
        b = await Client().login(port_of(s))
        slow = await Client().login(port_of(s), rcvbuf=4096)  # never reads again
        await eventually(lambda: s.metrics.clients == 3)
        chunk = bytes(32 << 10)
        for _ in range(4000):
            a.send(proto.SendPacket(slow.public, chunk))
            await a.writer.drain()
            if s.metrics.packets_dropped["queue_head"] > 0:
                break
        assert s.metrics.packets_dropped["queue_head"] > 0
        (conn,) = s.connections(slow.public)
        assert len(conn._packets) <= 8
        for i in range(20):  # the slow reader's full queue costs a and b nothing
            a.send(proto.SendPacket(b.public, b"p%d" % i))
        for i in range(20):
            assert await b.recv(timeout=2) == proto.RecvPacket(a.public, b"p%d" % i)
        assert 'derp_packets_dropped_total{reason="queue_head"}' in s.metrics.prometheus()
        status, _, body = await http(port_of(s), b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 200
        samples = samples_of(body.decode())
        assert 0 < samples[("tailpy_derp_queue_depth_max_packets", ())] <= 8
        assert (
            samples[("tailpy_derp_queued_packets", ())]
            >= samples[("tailpy_derp_queue_depth_max_packets", ())]
        )
        assert samples[("tailpy_derp_queue_limit_packets", ())] == 8
        assert samples[("tailpy_derp_packets_dropped_total", (("reason", "queue_head"),))] > 0
        for c in (a, b, slow):
            await c.close()
    finally:
        await s.stop()


async def test_duplicate_key(server: DerpServer) -> None:
    """Both same-key connections kept (cloned machines, tailscale/tailscale#2745), packets to the most recent
    sender, Health flags it, no kicks."""
    key = node()
    first = await Client(key).login(port_of(server))
    second = await Client(key).login(port_of(server))
    x = await Client().login(port_of(server))
    assert await first.recv() == proto.Health(DUPLICATE_KEY_PROBLEM)
    assert await second.recv() == proto.Health(DUPLICATE_KEY_PROBLEM)
    assert server.metrics.duplicate_keys == 1
    x.send(proto.SendPacket(key.public, b"to newest"))
    assert await second.recv() == proto.RecvPacket(x.public, b"to newest")
    first.send(proto.Ping(b"i-am-up!"))  # the older connection speaks: it becomes the active one
    assert await first.recv() == proto.Pong(b"i-am-up!")
    x.send(proto.SendPacket(key.public, b"to first"))
    assert await first.recv() == proto.RecvPacket(x.public, b"to first")
    second.send(proto.Ping(b"me too!!"))
    assert await second.recv() == proto.Pong(b"me too!!")
    x.send(proto.SendPacket(key.public, b"to second"))
    assert await second.recv() == proto.RecvPacket(x.public, b"to second")
    await asyncio.sleep(0.3)
    assert len(server.connections(key.public)) == 2  # nobody kicked
    assert server.metrics.accepts == 3
    await second.close()
    assert await first.recv() == proto.Health("")  # one connection left: the flag is cleared
    x.send(proto.SendPacket(key.public, b"back to one"))
    assert await first.recv() == proto.RecvPacket(x.public, b"back to one")
    assert server.metrics.duplicate_keys == 0
    await first.close()
    await x.close()


async def test_ping_pong_and_note_preferred(server: DerpServer) -> None:
    a = await Client().login(port_of(server))
    a.send(proto.NotePreferred(True))
    a.send(proto.Ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    assert await a.recv() == proto.Pong(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert server.metrics.home_clients == 1
    (conn,) = server.connections(a.public)
    assert conn.preferred
    await a.close()
    await eventually(lambda: server.metrics.home_clients == 0)


async def test_bad_client_info_refused(server: DerpServer) -> None:
    c = Client()
    await c.open(port_of(server))
    other = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
    c.send(proto.seal_client_info(c.key, other.public))  # sealed for another server
    await c.expect_eof()
    d = Client()
    await d.open(port_of(server))
    d.send(proto.SendPacket(node().public, b"no login first"))
    await d.expect_eof()
    assert server.metrics.login_failures == 2
    assert server.metrics.clients == 0


async def test_login_timeout() -> None:
    s = DerpServer(SERVER_KEY, handshake_timeout=0.2)
    await s.start("127.0.0.1", 0)
    try:
        c = Client()
        await c.open(port_of(s))
        await c.expect_eof(timeout=3)
        assert s.metrics.login_failures == 1
    finally:
        await s.stop()


async def test_keepalive_idle_and_half_open() -> None:
    s = DerpServer(SERVER_KEY, keepalive_interval=0.1, keepalive_jitter=0, idle_timeout=0.3, ping_timeout=0.3)
    await s.start("127.0.0.1", 0)
    try:
        live = await Client().login(port_of(s))
        dead = await Client().login(port_of(s))
        assert await live.recv() == proto.KeepAlive()
        deadline = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < deadline:  # live answers pings; dead never does
            f = await live.recv()
            if isinstance(f, proto.Ping):
                live.send(proto.Pong(f.data))
        assert len(s.connections(live.public)) == 1
        assert isinstance(await dead.recv(skip=(proto.KeepAlive,)), proto.Ping)
        await dead.expect_eof(timeout=3)
        assert s.metrics.disconnects["idle_timeout"] == 1
        await live.close()
    finally:
        await s.stop()


async def test_http_endpoints(server: DerpServer) -> None:
    p = port_of(server)
    status, headers, _ = await http(p, b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, headers["access-control-allow-origin"]) == (200, "*")
    status, _, _ = await http(p, b"HEAD /derp/latency-check HTTP/1.1\r\n\r\n")
    assert status == 200
    status, _, _ = await http(p, b"POST /derp/probe HTTP/1.1\r\n\r\n")
    assert status == 405
    status, headers, _ = await http(
        p, b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: ab.C-1_:z\r\n\r\n"
    )
    assert (status, headers["x-tailscale-response"]) == (204, "response ab.C-1_:z")
    status, headers, _ = await http(p, b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: a b<\r\n\r\n")
    assert status == 204 and "x-tailscale-response" not in headers
    status, _, body = await http(p, b"GET /derp HTTP/1.1\r\n\r\n")
    assert status == 426 and b"upgrade" in body
    status, headers, body = await http(p, b"GET /debug/metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"# TYPE derp_packets_relayed_total counter" in body
    assert b'derp_packets_dropped_total{reason="queue_head"} 0' in body
    status, _, _ = await http(p, b"GET /nope HTTP/1.1\r\n\r\n")
    assert status == 404
    status, _, _ = await http(p, b"garbage\r\n\r\n")
    assert status == 400


async def test_metrics_through_a_reverse_proxy_refused(server: DerpServer) -> None:
    """A proxy on the same host connects from loopback: its forwarding headers say the client is elsewhere."""
    p = port_of(server)
    status, _, body = await http(p, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 200
    samples = samples_of(body.decode())
    assert ("tailpy_derp_disconnects_total", (("reason", "eof"),)) in samples  # (every reason, at start)
    assert not any(name.endswith("_created") for name, _ in samples)
    for header in (b"X-Forwarded-For: 192.0.2.7", b"Forwarded: for=192.0.2.7", b"X-Real-IP: 192.0.2.7"):
        for path in (b"/metrics", b"/debug/metrics"):
            status, _, body = await http(p, b"GET " + path + b" HTTP/1.1\r\n" + header + b"\r\n\r\n")
            assert status == 403 and b"--metrics-listen" in body


async def test_request_head_bounded_in_size_and_time() -> None:
    s = DerpServer(SERVER_KEY, header_timeout=0.3)
    await s.start("127.0.0.1", 0)
    try:
        p = port_of(s)
        status, _, _ = await http(p, b"GET /derp HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert status == 431
        r, w = await asyncio.open_connection("127.0.0.1", p)
        w.write(b"GET /derp HTTP/1.1\r\nHost: slow")  # never finishes its head
        assert await asyncio.wait_for(r.read(), 3) == b""  # closed after header_timeout
        w.close()
        await w.wait_closed()
    finally:
        await s.stop()


def test_server_key_file(tmp_path: Path) -> None:
    k = load_or_create_key(tmp_path)
    path = tmp_path / "derp.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(tmp_path) == k
    os.chmod(path, 0o644)
    assert load_or_create_key(tmp_path) == k
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("privkey:nothex\n")
    with pytest.raises(ConfigError, match="damaged"):
        load_or_create_key(tmp_path)
    with pytest.raises(ConfigError, match="cannot"):
        load_or_create_key(tmp_path / "missing" / "dir")


def test_cli_errors_are_one_sentence(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tailpy.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["derp", "serve", "--state-dir", str(tmp_path), "--certfile", "/nope"])
    assert r.exit_code == 1 and "--certfile and --keyfile go together" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["derp", "serve", "--state-dir", str(tmp_path), "--listen", "nope"])
    assert r.exit_code == 1 and "is not HOST:PORT" in r.output
    r = runner.invoke(cli, ["derp", "--help"])
    assert r.exit_code == 0 and "serve" in r.output


async def test_fast_path_keeps_order_across_senders_and_bursts(server: DerpServer) -> None:
    """Bursts written in one go (many SendPackets per read, gathered per destination and written once)
    arrive complete and in order from each sender; a frame split across reads still relays."""
    rx = await Client().login(port_of(server))
    tx1, tx2 = await Client().login(port_of(server)), await Client().login(port_of(server))
    n = 300
    burst1 = b"".join(proto.encode_send_packet(rx.public, b"1" + i.to_bytes(4, "big")) for i in range(n))
    burst2 = b"".join(proto.encode_send_packet(rx.public, b"2" + i.to_bytes(4, "big")) for i in range(n))
    tx1.writer.write(burst1[:1001])  # (mid-frame)
    tx2.writer.write(burst2)
    await asyncio.sleep(0.05)
    tx1.writer.write(burst1[1001:])
    got: dict[bytes, list[int]] = {b"1": [], b"2": []}
    srcs = {b"1": tx1.public, b"2": tx2.public}
    while len(got[b"1"]) + len(got[b"2"]) < 2 * n:
        f = await rx.recv(skip=(proto.KeepAlive,))
        assert isinstance(f, proto.RecvPacket)
        tag = f.data[:1]
        assert f.src == srcs[tag]
        got[tag].append(int.from_bytes(f.data[1:], "big"))
    assert got[b"1"] == list(range(n)) and got[b"2"] == list(range(n))
    assert server.metrics.packets_relayed == 2 * n and server.metrics.bytes_relayed == 2 * n * 5
    for c in (rx, tx1, tx2):
        await c.close()


async def test_fast_path_short_send_packet_closes_only_that_client(server: DerpServer) -> None:
    a, b = await Client().login(port_of(server)), await Client().login(port_of(server))
    a.writer.write(proto.encode_header(proto.FrameType.SEND_PACKET, 10) + b"x" * 10)
    await a.expect_eof()
    b.send(proto.Ping(b"12345678"))
    assert await b.recv(skip=(proto.KeepAlive,)) == proto.Pong(b"12345678")
    await eventually(lambda: server.metrics.disconnects["bad_frame"] == 1)
    await b.close()


async def test_metrics_count_relayed_packets_and_clients() -> None:
    s = DerpServer(SERVER_KEY)
    await s.start("127.0.0.1", 0)
    try:
        p = port_of(s)
        _, headers, body = await http(p, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert headers["content-type"].startswith("text/plain")
        types = {fam.name: fam.type for fam in text_string_to_metric_families(body.decode())}
        assert types["tailpy_derp_clients"] == "gauge"
        assert types["tailpy_derp_packets_relayed"] == "counter"  # (the parser drops _total)
        assert types["tailpy_derp_relayed_bytes"] == "counter"
        assert types["tailpy_derp_packets_dropped"] == "counter"
        assert types["tailpy_derp_queued_packets"] == "gauge"
        assert types["tailpy_derp_mesh_peers"] == "gauge"
        before = samples_of(body.decode())
        assert before[("tailpy_derp_clients", ())] == 0
        assert before[("tailpy_derp_packets_dropped_total", (("reason", "unknown_dest"),))] == 0
        a = await Client().login(p)
        b = await Client().login(p)
        await eventually(lambda: s.metrics.clients == 2)
        for _ in range(3):
            a.send(proto.SendPacket(b.public, b"x" * 100))
            assert isinstance(await b.recv(), proto.RecvPacket)
        a.send(proto.SendPacket(node().public, b"nobody"))
        await eventually(lambda: s.metrics.packets_dropped["unknown_dest"] == 1)
        _, _, body = await http(p, b"GET /metrics HTTP/1.1\r\n\r\n")
        after = samples_of(body.decode())
        assert after[("tailpy_derp_clients", ())] == 2
        assert after[("tailpy_derp_accepts_total", ())] == 2
        assert after[("tailpy_derp_packets_relayed_total", ())] == 3
        assert after[("tailpy_derp_relayed_bytes_total", ())] == 300
        assert after[("tailpy_derp_packets_dropped_total", (("reason", "unknown_dest"),))] == 1
        _, _, legacy = await http(p, b"GET /debug/metrics HTTP/1.1\r\n\r\n")
        assert b"derp_packets_relayed_total 3" in legacy  # (derper's names, as before)
        await a.close()
        await b.close()
    finally:
        await s.stop()
