"""DERP frame codec (tailpy.proto.derp): hand-built bytes, round trips, login boxes, limits, fuzzing."""

from __future__ import annotations

import contextlib
import json
import struct
from ipaddress import IPv4Address, IPv6Address

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.proto import derp

A = NodePublic(bytes(range(32)))
B = NodePublic(bytes(range(32, 64)))
SERVER = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
CLIENT = NodePrivate(bytes(nacl.public.PrivateKey.generate()))


def hdr(t: int, n: int) -> bytes:
    return bytes([t]) + n.to_bytes(4, "big")


def test_magic_bytes() -> None:
    assert bytes.fromhex("44455250f09f9491") == derp.MAGIC


def test_server_key_bytes() -> None:
    wire = derp.encode(derp.ServerKey(SERVER.public))
    assert wire == hdr(0x01, 40) + b"DERP\xf0\x9f\x94\x91" + SERVER.public.raw
    # Extra bytes "for future use" are ignored, as derp_client.go does.
    (f,) = derp.FrameReader().feed(hdr(0x01, 44) + derp.MAGIC + SERVER.public.raw + b"more")
    assert f == derp.ServerKey(SERVER.public)


def test_server_key_bad_magic() -> None:
    with pytest.raises(ParseError, match="magic"):
        derp.parse_frame(0x01, b"DERP\xf0\x9f\x94\x92" + bytes(32))


def test_send_and_recv_packet_bytes() -> None:
    assert derp.encode(derp.SendPacket(B, b"hi")) == hdr(0x04, 34) + B.raw + b"hi"
    assert derp.encode(derp.RecvPacket(A, b"hi")) == hdr(0x05, 34) + A.raw + b"hi"
    assert derp.encode_send_packet(B, b"x") == derp.encode(derp.SendPacket(B, b"x"))
    assert derp.encode_recv_packet(A, b"x") == derp.encode(derp.RecvPacket(A, b"x"))
    assert derp.parse_frame(0x05, A.raw + b"payload") == derp.RecvPacket(A, b"payload")
    assert derp.parse_frame(0x04, B.raw) == derp.SendPacket(B, b"")


def test_small_frames_bytes() -> None:
    assert derp.encode(derp.KeepAlive()) == hdr(0x06, 0)
    assert derp.encode(derp.NotePreferred(True)) == hdr(0x07, 1) + b"\x01"
    assert derp.encode(derp.NotePreferred(False)) == hdr(0x07, 1) + b"\x00"
    assert derp.encode(derp.PeerGone(A, derp.PeerGoneReason.NOT_HERE)) == hdr(0x08, 33) + A.raw + b"\x01"
    assert derp.encode(derp.Ping(b"12345678")) == hdr(0x12, 8) + b"12345678"
    assert derp.encode(derp.Pong(b"12345678")) == hdr(0x13, 8) + b"12345678"
    assert derp.encode(derp.Health("duplicate")) == hdr(0x14, 9) + b"duplicate"
    assert derp.encode(derp.Restarting(1500, 60000)) == hdr(0x15, 8) + struct.pack(">II", 1500, 60000)
    assert derp.encode(derp.WatchConns()) == hdr(0x10, 0)
    assert derp.encode(derp.ClosePeer(A)) == hdr(0x11, 32) + A.raw
    assert derp.encode(derp.ForwardPacket(A, B, b"z")) == hdr(0x0A, 65) + A.raw + B.raw + b"z"


def test_lenient_like_tailscale() -> None:
    # Old servers send a 32-byte PeerGone: reason "disconnected".
    assert derp.parse_frame(0x08, A.raw) == derp.PeerGone(A, derp.PeerGoneReason.DISCONNECTED)
    assert derp.parse_frame(0x12, b"12345678extra") == derp.Ping(b"12345678")
    assert derp.parse_frame(0x06, b"ignored") == derp.KeepAlive()
    assert derp.parse_frame(0x77, b"future") == derp.Unknown(0x77, b"future")


@pytest.mark.parametrize(
    ("t", "payload"),
    [
        (0x01, derp.MAGIC + bytes(31)),  # short server key
        (0x02, bytes(32 + 24 + 15)),  # client info shorter than key + nonce + tag
        (0x03, bytes(39)),
        (0x04, bytes(31)),
        (0x05, bytes(5)),
        (0x07, b""),
        (0x07, b"\x01\x01"),
        (0x08, bytes(31)),
        (0x09, bytes(31)),
        (0x0A, bytes(63)),
        (0x10, b"x"),
        (0x11, bytes(33)),
        (0x12, bytes(7)),
        (0x13, b""),
        (0x14, b"\xff\xfe"),
        (0x15, bytes(7)),
    ],
)
def test_malformed_payloads(t: int, payload: bytes) -> None:
    with pytest.raises(ParseError):
        derp.parse_frame(t, payload)


def test_peer_present_forms() -> None:
    assert derp.parse_frame(0x09, A.raw) == derp.PeerPresent(A)
    ep = (IPv4Address("192.0.2.7"), 41641)
    full = derp.PeerPresent(A, ep, 0x01)
    wire = derp.encode(full)
    assert wire[5 + 32 : 5 + 48] == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7])
    assert derp.FrameReader().feed(wire) == [full]
    v6 = derp.PeerPresent(B, (IPv6Address("2001:db8::1"), 3478))
    assert derp.FrameReader().feed(derp.encode(v6)) == [v6]


def test_max_packet_size_boundary() -> None:
    ok = derp.encode(derp.SendPacket(B, bytes(derp.MAX_PACKET_SIZE)))
    (f,) = derp.FrameReader().feed(ok)
    assert isinstance(f, derp.SendPacket) and len(f.data) == derp.MAX_PACKET_SIZE
    with pytest.raises(ValueError, match="exceeds"):
        derp.encode(derp.SendPacket(B, bytes(derp.MAX_PACKET_SIZE + 1)))
    with pytest.raises(ParseError, match="exceeds"):
        derp.parse_frame(0x04, B.raw + bytes(derp.MAX_PACKET_SIZE + 1))


def test_oversize_header_rejected_before_body() -> None:
    r = derp.FrameReader()
    assert r.feed(hdr(0x04, 0xFFFF_FFFF)[:4]) == []  # header incomplete: nothing to judge yet
    with pytest.raises(ParseError, match="claims 4294967295 bytes"):
        r.feed(b"\xff")  # the 5th header byte, and no body at all
    assert r.buffered == 0
    with pytest.raises(ParseError):  # the stream stays broken
        r.feed(derp.encode(derp.KeepAlive()))


def test_reader_limit_is_configurable() -> None:
    r = derp.FrameReader(max_frame_len=8)
    assert r.feed(derp.encode(derp.Ping(b"abcdefgh"))) == [derp.Ping(b"abcdefgh")]
    with pytest.raises(ParseError):
        r.feed(hdr(0x14, 9))


def test_reader_byte_at_a_time_and_batched() -> None:
    frames: list[derp.Frame] = [
        derp.ServerKey(SERVER.public),
        derp.RecvPacket(A, b"one"),
        derp.KeepAlive(),
        derp.PeerGone(B, derp.PeerGoneReason.NOT_HERE),
        derp.Health(""),
        derp.Pong(b"\x00" * 8),
    ]
    wire = b"".join(derp.encode(f) for f in frames)
    r = derp.FrameReader()
    got: list[derp.Frame] = []
    for i in range(len(wire)):
        got += r.feed(wire[i : i + 1])
        if i == 2:
            assert r.pending_header() is None
    assert got == frames
    assert r.buffered == 0
    assert derp.FrameReader().feed(wire) == frames
    r2 = derp.FrameReader()
    assert r2.feed(wire[:7]) == []
    assert r2.pending_header() == (0x01, 40)
    assert r2.buffered == 7


def test_parse_header() -> None:
    assert derp.parse_header(hdr(0x04, 300)) == (0x04, 300)
    with pytest.raises(ParseError):
        derp.parse_header(b"\x04\x00")


def test_encode_rejects_invalid() -> None:
    with pytest.raises(ValueError):
        derp.encode(derp.Ping(b"short"))
    with pytest.raises(ValueError):
        derp.encode(derp.PeerGone(A, 256))
    with pytest.raises(ValueError):
        derp.encode(derp.Restarting(-1, 0))
    with pytest.raises(ValueError):
        derp.encode(derp.PeerPresent(A, None, 1))


def test_login_boxes_round_trip() -> None:
    ci = derp.seal_client_info(CLIENT, SERVER.public, {"version": 2, "CanAckPings": True})
    assert ci.key == CLIENT.public
    wire = derp.encode(ci)
    assert wire[:1] == b"\x02" and wire[5:37] == CLIENT.public.raw
    (parsed,) = derp.FrameReader().feed(wire)
    assert isinstance(parsed, derp.ClientInfo)
    assert derp.open_client_info(SERVER, parsed) == {"version": 2, "CanAckPings": True}
    si = derp.seal_server_info(SERVER, CLIENT.public)
    assert derp.open_server_info(CLIENT, SERVER.public, si) == {"version": derp.PROTOCOL_VERSION}


def test_client_info_default_and_go_shape() -> None:
    # What Go's derp.Client seals: json.Marshal(ClientInfo{Version: 2, CanAckPings: false}).
    go_json = b'{"version":2,"CanAckPings":false}'
    box = nacl.public.Box(nacl.public.PrivateKey(CLIENT.raw), nacl.public.PublicKey(SERVER.public.raw))
    frame = derp.ClientInfo(CLIENT.public, bytes(box.encrypt(go_json)))
    assert derp.open_client_info(SERVER, frame) == {"version": 2, "CanAckPings": False}
    default = derp.seal_client_info(CLIENT, SERVER.public)
    assert derp.open_client_info(SERVER, default) == {"version": 2}


def test_bad_boxes_refused() -> None:
    other = MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
    ci = derp.seal_client_info(CLIENT, other.public)  # sealed for another server
    with pytest.raises(ParseError, match="does not open"):
        derp.open_client_info(SERVER, ci)
    good = derp.seal_client_info(CLIENT, SERVER.public)
    tampered = derp.ClientInfo(good.key, good.sealed[:-1] + bytes([good.sealed[-1] ^ 1]))
    with pytest.raises(ParseError):
        derp.open_client_info(SERVER, tampered)
    with pytest.raises(ParseError):
        derp.open_client_info(SERVER, derp.ClientInfo(good.key, b"short"))
    for body in (b"[1]", b"not json", b"[" * 100_000 + b"]" * 100_000):
        box = nacl.public.Box(nacl.public.PrivateKey(CLIENT.raw), nacl.public.PublicKey(SERVER.public.raw))
        with pytest.raises(ParseError):
            derp.open_client_info(SERVER, derp.ClientInfo(CLIENT.public, bytes(box.encrypt(body))))


def test_low_order_client_key_refused() -> None:
    frame = derp.ClientInfo(NodePublic(bytes(32)), bytes(24 + 16 + 10))
    with pytest.raises(ParseError):
        derp.open_client_info(SERVER, frame)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_reader_only_parse_error(chunks: list[bytes]) -> None:
    r = derp.FrameReader(max_frame_len=64)
    try:
        for c in chunks:
            for f in r.feed(c):
                assert derp.FrameReader().feed(derp.encode(f)) == [f]
    except ParseError:
        pass


frame_headers = st.builds(
    lambda t, body: bytes([t]) + len(body).to_bytes(4, "big") + body,
    st.sampled_from([*list(derp.FrameType), 0x00, 0x7F, 0xFF]),
    st.binary(max_size=120),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(frame_headers, max_size=6), st.integers(min_value=1, max_value=17))
def test_fuzz_well_framed_any_payload(frames: list[bytes], step: int) -> None:
    """Well-framed streams with random payloads: each frame parses or the reader raises ParseError; frames
    that parse encode back to a frame that parses to the same value."""
    wire = b"".join(frames)
    r = derp.FrameReader()
    try:
        out: list[derp.Frame] = []
        for i in range(0, len(wire), step):
            out += r.feed(wire[i : i + step])
    except ParseError:
        return
    for f in out:
        try:
            again = derp.encode(f)
        except ValueError:
            continue
        assert derp.FrameReader().feed(again) == [f]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_open_client_info(sealed: bytes) -> None:
    with contextlib.suppress(ParseError):
        json.dumps(derp.open_client_info(SERVER, derp.ClientInfo(A, sealed)))


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_headers, max_size=6), st.integers(min_value=1, max_value=17), st.binary(max_size=12))
def test_fuzz_feed_raw_matches_feed(frames: list[bytes], step: int, junk: bytes) -> None:
    """feed_raw (the server's fast path) splits any stream exactly where feed does and raises only
    ParseError; parsing its (type, payload) pairs gives feed's frames."""
    wire = b"".join(frames) + junk
    raw_reader, reader = derp.FrameReader(max_frame_len=100), derp.FrameReader(max_frame_len=100)
    raw: list[tuple[int, bytes]] = []
    try:
        for i in range(0, len(wire), step):
            raw += raw_reader.feed_raw(wire[i : i + step])
    except ParseError:
        with pytest.raises(ParseError):
            reader.feed(wire)
        return
    assert raw_reader.buffered == len(wire) - sum(5 + len(p) for _, p in raw)
    try:
        want = reader.feed(wire)
    except ParseError:
        with pytest.raises(ParseError):
            for t, p in raw:
                derp.parse_frame(t, p)
        return
    assert [derp.parse_frame(t, p) for t, p in raw] == want
