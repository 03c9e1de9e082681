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
