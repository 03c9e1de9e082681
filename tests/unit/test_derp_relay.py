"""The DERP relay core (tailpy.derp.relay.Relay) without the HTTP front: each accepted TCP stream goes
straight to Relay.serve, and two clients speaking bare DERP frames log in, relay a packet and hear PeerGone
for an unknown key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tailpy.derp import Relay
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.proto import derp as proto


class BareClient:
    """A DERP client on a plain TCP stream: no HTTP request, the server speaks first (ServerKey)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.key = NodePrivate.generate()
        self.reader, self.writer = reader, writer
        self.frames = proto.FrameReader()
        self.queue: list[proto.Frame] = []

    async def recv(self, *, skip: tuple[type, ...] = (proto.KeepAlive, proto.Health)) -> proto.Frame:
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

        return await asyncio.wait_for(get(), 10)

    async def login(self) -> BareClient:
        sk = await self.recv()
        assert isinstance(sk, proto.ServerKey)
        self.writer.write(proto.encode(proto.seal_client_info(self.key, sk.key)))
        assert isinstance(await self.recv(), proto.ServerInfo)
        return self


@pytest.fixture
async def relay_port() -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(MachinePrivate.generate())
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    try:
        yield relay, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        relay.close_all()
        await server.wait_closed()


async def _client(port: int) -> BareClient:
    return await BareClient(*await asyncio.open_connection("127.0.0.1", port)).login()


async def test_relay_core_serves_a_bare_stream(relay_port: tuple[Relay, int]) -> None:
    relay, port = relay_port
    a, b = await _client(port), await _client(port)
    try:
        a.writer.write(proto.encode(proto.SendPacket(b.key.public, b"hello")))
        got = await b.recv()
        assert got == proto.RecvPacket(a.key.public, b"hello")
        stranger = NodePrivate.generate().public
        a.writer.write(proto.encode(proto.SendPacket(stranger, b"x")))
        assert await a.recv() == proto.PeerGone(stranger, proto.PeerGoneReason.NOT_HERE)
        assert len(relay.connections(a.key.public)) == 1
        assert relay.metrics.packets_relayed == 1 and relay.metrics.packets_dropped["unknown_dest"] == 1
    finally:
        for c in (a, b):
            c.writer.close()


def _raw(frame_type: int, payload: bytes) -> bytes:
    return proto.encode_header(frame_type, len(payload)) + payload


async def _closed(c: BareClient) -> bool:
    """True when the server closed ``c``'s connection (EOF after whatever it had queued)."""
    try:
        while await asyncio.wait_for(c.reader.read(1 << 16), 10):
            pass
    except ConnectionError:
        pass
    return True


async def test_frames_a_client_does_not_send_are_ignored_unanswered(relay_port: tuple[Relay, int]) -> None:
    """As derpserver's sclient.run: server-to-client types, KeepAlive, Pong and unknown types from a client
    are read and dropped, malformed or not, and nothing is sent back; the connection goes on."""
    relay, port = relay_port
    a, b = await _client(port), await _client(port)
    try:
        ignored = [
            _raw(proto.FrameType.SERVER_KEY, b"not the magic" + bytes(40)),
            _raw(proto.FrameType.SERVER_INFO, b"x"),
            _raw(proto.FrameType.RECV_PACKET, b"short"),
            _raw(proto.FrameType.KEEP_ALIVE, b""),
            _raw(proto.FrameType.PEER_GONE, b"?"),
            _raw(proto.FrameType.PEER_PRESENT, bytes(7)),
            _raw(proto.FrameType.HEALTH, b"\xff\xfe not utf-8"),
            _raw(proto.FrameType.RESTARTING, b""),
            _raw(proto.FrameType.PONG, b"1234"),
            _raw(proto.FrameType.CLIENT_INFO, b"again"),
            _raw(0x7F, b"a frame type from the future"),
            _raw(0xEE, bytes(proto.MAX_PACKET_SIZE + proto.KEY_LEN)),  # the largest one ignored
        ]
        a.writer.write(b"".join(ignored) + proto.encode(proto.Ping(b"12345678")))
        assert await a.recv(skip=()) == proto.Pong(b"12345678")  # the first answer is the Ping's
        assert relay.metrics.ignored_frames == len(ignored)
        a.writer.write(proto.encode(proto.SendPacket(b.key.public, b"still here")))
        assert await b.recv() == proto.RecvPacket(a.key.public, b"still here")
    finally:
        for c in (a, b):
            c.writer.close()


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_raw(0x7F, bytes(proto.MAX_PACKET_SIZE + proto.KEY_LEN + 1)), "too large to ignore"),
        (_raw(proto.FrameType.PING, bytes(1001)), "Ping frame of 1001 bytes"),
        (_raw(proto.FrameType.PING, bytes(7)), "Ping"),
        (_raw(proto.FrameType.NOTE_PREFERRED, b"\x01\x01"), "NotePreferred"),
        (_raw(proto.FrameType.WATCH_CONNS, b""), "without mesh rights"),
        (_raw(proto.FrameType.CLOSE_PEER, bytes(32)), "without mesh rights"),
        (_raw(proto.FrameType.FORWARD_PACKET, bytes(64) + b"x"), "without mesh rights"),
    ],
    ids=["unknown-oversize", "ping-oversize", "ping-short", "note-preferred-2", "watch", "close", "forward"],
)
async def test_frames_derpserver_refuses_close_only_that_connection(
    relay_port: tuple[Relay, int], frame: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    relay, port = relay_port
    a, b = await _client(port), await _client(port)
    try:
        with caplog.at_level("INFO", logger="tailpy.derp"):
            a.writer.write(frame)
            assert await _closed(a)
        assert any(why in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        assert relay.metrics.disconnects["bad_frame"] == 1
        b.writer.write(proto.encode(proto.Ping(b"abcdefgh")))
        assert await b.recv(skip=(proto.KeepAlive, proto.Health, proto.PeerGone)) == proto.Pong(b"abcdefgh")
    finally:
        for c in (a, b):
            c.writer.close()
