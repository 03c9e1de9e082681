"""DERP over WebSocket (tailpy.derp.ws) on 127.0.0.1: tailpy's client and server, and aiohttp's WebSocket
client (an independent RFC 6455 implementation) speaking DERP frames to tailpy's server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.derp.client import DerpClient, DerpClientError
from tailpy.derp.server import DerpServer
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.proto import derp as proto


@pytest.fixture
async def server() -> AsyncIterator[DerpServer]:
    s = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    await s.start("127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.stop()


def port_of(s: DerpServer) -> int:
    return s.addresses[0][1]


async def test_websocket_client_relays_with_a_plain_client(server: DerpServer) -> None:
    a, b = NodePrivate.generate(), NodePrivate.generate()
    port = port_of(server)
    ca = await DerpClient.connect(f"ws://127.0.0.1:{port}/derp", a)
    cb = await DerpClient.connect(f"http://127.0.0.1:{port}/derp", b)
    try:
        assert ca.server_key == server.public_key
        for size in (1, 1200, proto.MAX_PACKET_SIZE):
            await ca.send(b.public, b"\x01" * size)
            got = await asyncio.wait_for(cb.recv(), 5)
            assert isinstance(got, proto.RecvPacket) and got.src == a.public and len(got.data) == size
            await cb.send(a.public, b"\x02" * size)
            back = await asyncio.wait_for(ca.recv(), 5)
            assert isinstance(back, proto.RecvPacket) and back.src == b.public and len(back.data) == size
        assert await ca.ping() >= 0
        assert server.metrics.websocket_accepts == 1
        assert "derp_websocket_accepts_total 1" in server.metrics.prometheus()
    finally:
        await ca.close()
        await cb.close()


async def test_aiohttp_websocket_client_speaks_derp(server: DerpServer) -> None:
    """An independent WebSocket stack: frames split across messages and several frames in one message."""
    me, peer = NodePrivate.generate(), NodePrivate.generate()
    cpeer = await DerpClient.connect(f"http://127.0.0.1:{port_of(server)}/derp", peer)
    frames = proto.FrameReader()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port_of(server)}/derp", protocols=("derp",)) as ws,
    ):
        assert ws.protocol == "derp"

        async def next_frame() -> proto.Frame:
            pending: list[proto.Frame] = []
            while not pending:
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                pending = frames.feed(msg.data)
            assert len(pending) == 1
            return pending[0]

        sk = await next_frame()
        assert isinstance(sk, proto.ServerKey) and sk.key == server.public_key
        login = proto.encode(proto.seal_client_info(me, sk.key))
        await ws.send_bytes(login[:7])  # the frame split across two messages
        await ws.send_bytes(login[7:])
        si = await next_frame()
        assert isinstance(si, proto.ServerInfo)
        two = proto.encode_send_packet(peer.public, b"one") + proto.encode_send_packet(peer.public, b"two")
        await ws.send_bytes(two)  # two frames in one message
        for want in (b"one", b"two"):
            got = await asyncio.wait_for(cpeer.recv(), 5)
            assert isinstance(got, proto.RecvPacket) and got.data == want and got.src == me.public
        await cpeer.send(me.public, b"back")
        rp = await next_frame()
        assert isinstance(rp, proto.RecvPacket) and rp.data == b"back"
        await ws.send_str("not derp")  # a text message ends the connection
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    await cpeer.close()
    for _ in range(100):
        if server.metrics.clients == 0:
            break
        await asyncio.sleep(0.05)
    assert server.metrics.clients == 0


async def test_bad_websocket_handshake_gets_400_and_old_style_upgrade_is_plain_derp(
    server: DerpServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    writer.write(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n"  # no Sec-WebSocket-Key / Version
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 400 ")
    writer.close()
    # "Upgrade: WebSocket" without the derp subprotocol: early Tailscale clients speaking plain DERP
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: DERP" in head
    writer.close()


async def test_websocket_url_refused_by_a_plain_http_server() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DerpClientError, match="refused the WebSocket upgrade: HTTP 404"):
            await DerpClient.connect(f"ws://127.0.0.1:{port}/derp", NodePrivate.generate(), timeout=5)
    finally:
        srv.close()
        await srv.wait_closed()


ws_items = st.lists(
    st.tuples(st.sampled_from(["raw", "msg"]), st.binary(max_size=64)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(ws_items)
def test_fuzz_websocket_reader_only_data_or_end(items: list[tuple[str, bytes]]) -> None:
    """Whatever bytes follow the handshake (binary messages from a real client side, or junk), WsReader.read
    returns message data or b"" (the end) and never raises (wsproto's protocol errors end the stream); a
    stream of messages alone reads back as their concatenation."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Message, Request

    from tailpy.derp.ws import WsReader, WsWriter

    class _Sink:
        def write(self, data: bytes) -> None:
            pass

    async def run() -> None:
        server = WSConnection(ConnectionType.SERVER)
        client = WSConnection(ConnectionType.CLIENT)
        server.receive_data(client.send(Request(host="x", target="/derp", subprotocols=["derp"])))
        list(server.events())
        client.receive_data(server.send(AcceptConnection(subprotocol="derp")))
        list(client.events())
        raw = asyncio.StreamReader()
        for kind, data in items:
            raw.feed_data(client.send(Message(data=data)) if kind == "msg" else data)
        raw.feed_eof()
        reader = WsReader(raw, server, WsWriter(_Sink(), server))  # type: ignore[arg-type]
        got = b""
        for _ in range(10 * len(items) + 2):
            data = await reader.read(1 << 16)
            assert isinstance(data, bytes)
            if not data:
                break
            got += data
        else:
            pytest.fail("the reader never ended")
        if all(kind == "msg" for kind, _ in items):
            assert got == b"".join(data for _, data in items)

    asyncio.run(run())
