"""Binary framing of map streams (``accept: ["frames"]``, ``application/x-tailpy-frames``): the frame codec
(sealer, :class:`~tailpy.proto.control.FrameReader`, opener) whatever the chunk boundaries, its limits, and
negotiation end to end: a new client on a new server reads frames, an old client (no ``"frames"`` in
``accept``) still gets base64 lines, a new client on a server that does not grant frames reads lines, and
a server that sends an oversized or truncated frame ends the stream with a ControlError."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nacl.public
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.client import MapMessage
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError, ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.proto import control as proto
from tailpy.proto import mapcodec

STEP = 10.0  # seconds to wait for one expected stream message
BOX_OVERHEAD = nacl.public.Box.NONCE_SIZE + 16  # nonce + Poly1305 tag


def mkey() -> MachinePrivate:
    return MachinePrivate.generate()


def pair(reply_to: str = "n" * 32) -> tuple[proto.StreamSealer, proto.StreamOpener]:
    server, client = mkey(), mkey()
    sealer = proto.StreamSealer(server, proto.public_of(client), reply_to, framed=True)
    return sealer, proto.StreamOpener(client, proto.public_of(server), reply_to)


def body(i: int, size: int) -> bytes:
    return b'{"type":"delta","version":%d,"pad":"%s"}' % (i, b"x" * size)


# --- the codec ---


def test_a_frame_is_a_length_and_the_raw_box() -> None:
    sealer, opener = pair()
    frame = sealer.seal(body(0, 10))
    size = int.from_bytes(frame[: proto.FRAME_HEADER], "big")
    plaintext = opener.open_frame(frame[proto.FRAME_HEADER :])
    assert size == len(frame) - proto.FRAME_HEADER == BOX_OVERHEAD + len(plaintext)
    assert json.loads(plaintext)["seq"] == 0
    keepalive = sealer.seal(b'{"type":"keepalive"}')
    assert json.loads(opener.open_frame(keepalive[proto.FRAME_HEADER :]))["type"] == "keepalive"


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 20000), max_size=12),
    zstd=st.booleans(),
)
def test_frames_round_trip_across_any_chunk_boundaries(sizes: list[int], cuts: list[int], zstd: bool) -> None:
    sealer, opener = pair()
    wire = b"".join(sealer.seal(body(i, n), zstd=zstd and mapcodec.ZSTD) for i, n in enumerate(sizes))
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    reader = proto.FrameReader()
    got = []
    for a, b in itertools.pairwise(points):  # (cuts inside length prefixes included)
        got += [json.loads(opener.open_frame(f)) for f in reader.feed(wire[a:b])]
    assert reader.pending == 0
    assert [(m["version"], len(m["pad"]), m["seq"]) for m in got] == [(i, n, i) for i, n in enumerate(sizes)]


def test_frames_split_byte_by_byte_and_inside_the_length_prefix() -> None:
    sealer, opener = pair()
    first = sealer.seal(body(0, 300))
    wire = first + sealer.seal(body(1, 0))
    reader = proto.FrameReader()
    assert reader.feed(wire[:2]) == [] and reader.expected() is None
    out = reader.feed(wire[2:3]) + reader.feed(wire[3:4])
    assert out == [] and reader.expected() == len(first)
    for i in range(4, len(wire)):
        out += reader.feed(wire[i : i + 1])
    assert [json.loads(opener.open_frame(f))["version"] for f in out] == [0, 1]
    assert reader.pending == 0


def test_an_oversized_frame_is_refused_from_its_length_alone() -> None:
    reader = proto.FrameReader(limit=1000)
    with pytest.raises(ParseError, match="larger than 1000 bytes"):
        reader.feed((1001).to_bytes(4, "big") + b"\0" * 10)
    with pytest.raises(ParseError, match="larger than"):
        proto.FrameReader().feed((proto.MAX_STREAM_FRAME + 1).to_bytes(4, "big"))
    assert proto.MAX_STREAM_FRAME == proto.MAX_STREAM_LINE // 4 * 3


def test_a_truncated_frame_stays_pending() -> None:
    sealer, opener = pair()
    wire = sealer.seal(body(0, 50)) + sealer.seal(body(1, 50))
    reader = proto.FrameReader()
    done = reader.feed(wire[:-7])
    assert len(done) == 1 and json.loads(opener.open_frame(done[0]))["version"] == 0
    assert reader.pending == len(wire) // 2 - 7 and reader.expected() == len(wire) // 2


def test_a_frame_that_does_not_open_is_refused() -> None:
    sealer, opener = pair()
    frame = bytearray(sealer.seal(body(0, 20)))
    frame[-1] ^= 1
    with pytest.raises(proto.UnauthenticatedError, match="does not open"):
        opener.open_frame(bytes(frame[proto.FRAME_HEADER :]))
    with pytest.raises(proto.UnauthenticatedError, match="too short"):
        opener.open_frame(b"\0" * 10)
    other = proto.StreamOpener(mkey(), proto.public_of(mkey()), "n" * 32)
    with pytest.raises(proto.UnauthenticatedError):
        other.open_frame(sealer.seal(body(1, 0))[proto.FRAME_HEADER :])


def test_accept_knows_frames() -> None:
    assert "frames" in mapcodec.offered()
    assert mapcodec.accepted(["frames", "other"]) == {"frames"}


# --- negotiation, end to end ---


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str, str, list[ControlClient]]]:
    store = Store(tmp_path)
    server = ControlServer(store, keepalive=0.3, poll_interval=0.2)
    host, port = await server.start("127.0.0.1", 0)
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    clients: list[ControlClient] = []
    yield server, f"http://{host}:{port}", key, clients
    for c in clients:
        await c.close()
    await server.stop()
    store.close()


def line_size(sealed: int) -> int:
    """Bytes of the base64 line of a box of ``sealed`` bytes, newline included."""
    return 4 * ((sealed + 2) // 3) + 1


async def first_messages(
    ctl: tuple[ControlServer, str, str, list[ControlClient]], name: str, accept: list[str] | None, n: int
) -> list[MapMessage]:
    """The first ``n`` messages (keepalives are consumed by the client) of a new node's stream; the node
    changes its endpoints after the netmap so a delta follows."""
    _, url, key, clients = ctl
    c = ControlClient(url, mkey())
    clients.append(c)
    nk = NodePrivate.generate().public
    await c.register(nk, name, key)
    it = c.stream_messages(nk, [Endpoint.parse("192.0.2.1:41641")], name, accept=accept)
    got = [await asyncio.wait_for(it.__anext__(), STEP)]
    await asyncio.sleep(1.0)  # (a few keepalives pass)
    await c.update(endpoints=[Endpoint.parse("192.0.2.2:41641")])
    while len(got) < n:
        got.append(await asyncio.wait_for(it.__anext__(), STEP))
    await it.aclose()
    return got


async def test_a_new_client_reads_frames(
    control: tuple[ControlServer, str, str, list[ControlClient]],
) -> None:
    msgs = await first_messages(control, "framed", ["frames"], 2)
    assert [m.type for m in msgs] == ["netmap", "delta"]
    # A frame is its 4-byte length and the box of the plain JSON: no base64.
    assert all(m.wire_bytes == proto.FRAME_HEADER + BOX_OVERHEAD + len(m.raw) for m in msgs)
    assert msgs[1].body["self"]["endpoints"] == ["192.0.2.2:41641"]


async def test_a_client_offering_everything_gets_frames_and_zstd(
    control: tuple[ControlServer, str, str, list[ControlClient]],
) -> None:
    msgs = await first_messages(control, "all", None, 2)
    assert [m.type for m in msgs] == ["netmap", "delta"]
    assert all(m.wire_bytes < line_size(BOX_OVERHEAD + len(m.raw)) for m in msgs)


async def test_an_old_client_gets_lines(control: tuple[ControlServer, str, str, list[ControlClient]]) -> None:
    msgs = await first_messages(control, "old", ["patches"], 2)
    assert [m.type for m in msgs] == ["netmap", "delta"]
    assert all(m.wire_bytes == line_size(BOX_OVERHEAD + len(m.raw)) for m in msgs)


async def test_a_new_client_reads_lines_from_a_server_that_does_not_grant_frames(
    control: tuple[ControlServer, str, str, list[ControlClient]], monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted: Callable[[object], frozenset[str]] = mapcodec.accepted
    monkeypatch.setattr(mapcodec, "accepted", lambda value: accepted(value) - {"frames"})
    msgs = await first_messages(control, "new", ["frames", "patches"], 2)
    assert [m.type for m in msgs] == ["netmap", "delta"]
    assert all(m.wire_bytes == line_size(BOX_OVERHEAD + len(m.raw)) for m in msgs)


# --- a server that breaks the framing ---


async def broken_server(
    tail: Callable[[proto.StreamSealer], bytes],
) -> tuple[web.AppRunner, str, MachinePrivate]:
    """A fake control server whose map stream is one good netmap frame, then ``tail(sealer)``, then the
    end of the response."""
    key = mkey()

    async def get_key(_: web.Request) -> web.Response:
        return web.Response(text=proto.public_of(key).text())

    async def map_stream(request: web.Request) -> web.StreamResponse:
        req = proto.open_request(key, await request.read(), path="/machine/map")
        sealer = proto.StreamSealer(key, req.machine_key, req.nonce_id, framed=True)
        resp = web.StreamResponse(headers={"Content-Type": proto.FRAMES_CONTENT_TYPE})
        await resp.prepare(request)
        await resp.write(sealer.seal(b'{"type":"netmap","generation":"g","version":0,"netmap":{}}'))
        await resp.write(tail(sealer))
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/key", get_key)
    app.router.add_post("/machine/map", map_stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", key


async def stream_until_error(tail: Callable[[proto.StreamSealer], bytes]) -> str:
    """The ControlError that ends the client's stream (after the good netmap, unless the broken tail came
    in the same chunk)."""
    runner, url, _ = await broken_server(tail)
    c = ControlClient(url, mkey())
    try:
        it = c.stream_messages(NodePrivate.generate().public, [], "n", accept=["frames"])
        with pytest.raises(ControlError) as e:
            for _ in range(2):
                assert (await asyncio.wait_for(it.__anext__(), STEP)).type == "netmap"
        return str(e.value)
    finally:
        await c.close()
        await runner.cleanup()


async def test_a_truncated_frame_at_the_end_of_the_stream_is_an_error() -> None:
    message = await stream_until_error(lambda s: s.seal(b'{"type":"delta","version":1}')[:-5])
    assert "closed the map stream in the middle of a message" in message
    assert message.count(". ") == 0  # one sentence


async def test_an_oversized_frame_is_an_error() -> None:
    message = await stream_until_error(lambda _: (proto.MAX_STREAM_FRAME + 1).to_bytes(4, "big"))
    assert f"larger than {proto.MAX_STREAM_FRAME} bytes" in message


async def test_a_clean_end_between_frames_is_a_closed_stream() -> None:
    message = await stream_until_error(lambda s: s.seal(b'{"type":"keepalive"}'))
    assert message.endswith("closed the map stream")
