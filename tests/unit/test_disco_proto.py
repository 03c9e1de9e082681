"""Disco codec (tailpy.proto.disco): hand-built bytes, round trips, NaCl boxes with real keys, fuzzing."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.errors import EndpointError, ParseError
from tailpy.keys import DiscoPrivate, DiscoPublic, NodePublic
from tailpy.proto import disco

TXID = bytes(range(1, 13))
NODE = NodePublic(bytes([0, 1, 2] + [0] * 27 + [30, 31]))
A = DiscoPrivate.generate()
B = DiscoPrivate.generate()


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def ep(text: str) -> disco.Endpoint:
    return disco.Endpoint.parse(text)


# --- plaintext shapes (as disco.go lays them out) -----------------------------------------------------------


def test_magic() -> None:
    assert h("54 53 f0 9f 92 ac") == disco.MAGIC
    assert disco.HEADER_LEN == 62
    assert disco.PING_DATAGRAM_LEN == 124


def test_ping_bytes() -> None:
    assert disco.encode(disco.Ping(TXID)) == h("01 00") + TXID
    with_key = disco.encode(disco.Ping(TXID, NODE))
    assert with_key == h("01 00") + TXID + h("00 01 02") + bytes(27) + h("1e 1f")
    padded = disco.encode(disco.Ping(TXID, NODE, padding=3))
    assert padded == with_key + bytes(3)
    assert disco.encode(disco.Ping(TXID, padding=3)) == h("01 00") + TXID + bytes(3)


def test_ping_parse() -> None:
    assert disco.parse(h("01 00") + TXID) == disco.Ping(TXID, None, 0)
    assert disco.parse(h("01 00") + TXID + NODE.raw) == disco.Ping(TXID, NODE, 0)
    assert disco.parse(h("01 00") + TXID + NODE.raw + bytes(100)) == disco.Ping(TXID, NODE, 100)
    # Fewer than 32 bytes after the txid: an old sender's padding, no node key (as disco.go reads it).
    assert disco.parse(h("01 00") + TXID + bytes(5)) == disco.Ping(TXID, None, 5)
    # 32 zero bytes are "no key" (Go's IsZero), and a version byte other than 0 is ignored.
    assert disco.parse(h("01 07") + TXID + bytes(32)) == disco.Ping(TXID, None, 0)


def test_pong_bytes() -> None:
    v4 = disco.encode(disco.Pong(TXID, ep("2.3.4.5:1234")))
    assert v4 == h("02 00") + TXID + bytes(10) + h("ff ff 02 03 04 05 04 d2")
    v6 = disco.encode(disco.Pong(TXID, ep("[fed0::12]:6666")))
    assert v6 == h("02 00") + TXID + h("fe d0") + bytes(13) + h("12 1a 0a")
    assert disco.parse(v4) == disco.Pong(TXID, disco.Endpoint(IPv4Address("2.3.4.5"), 1234))
    assert disco.parse(v6) == disco.Pong(TXID, disco.Endpoint(IPv6Address("fed0::12"), 6666))
    assert disco.parse(v4 + b"future") == disco.parse(v4)


def test_call_me_maybe_bytes() -> None:
    assert disco.encode(disco.CallMeMaybe()) == h("03 00")
    two = disco.CallMeMaybe((ep("1.2.3.4:567"), ep("[2001::3456]:789")))
    wire = disco.encode(two)
    assert wire == h("03 00") + bytes(10) + h("ff ff 01 02 03 04 02 37 20 01") + bytes(12) + h("34 56 03 15")
    assert disco.parse(wire) == two
    assert disco.parse(h("03 00")) == disco.CallMeMaybe(())
    # Lax as disco.go: a ragged length or another version reads as no endpoints.
    assert disco.parse(wire + b"\x00") == disco.CallMeMaybe(())
    assert disco.parse(h("03 01") + wire[2:]) == disco.CallMeMaybe(())


def test_parse_errors() -> None:
    for bad in (b"", b"\x01", h("01 00") + TXID[:11], h("02 00") + TXID + bytes(17)):
        with pytest.raises(disco.DiscoParseError):
            disco.parse(bad)
    for t in (0x00, 0x04, 0x07, 0x09, 0xFF):
        with pytest.raises(disco.UnknownMessageError) as e:
            disco.parse(bytes([t, 0]) + bytes(80))
        assert e.value.type == t
        assert isinstance(e.value, ParseError)


def test_encode_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="txid"):
        disco.encode(disco.Ping(b"short"))
    with pytest.raises(ValueError, match="padding"):
        disco.encode(disco.Ping(TXID, padding=-1))
    with pytest.raises(ValueError, match="port"):
        disco.encode(disco.Pong(TXID, disco.Endpoint(IPv4Address("192.0.2.1"), 70000)))


def test_endpoint_text() -> None:
    assert str(ep("192.0.2.1:41641")) == "192.0.2.1:41641"
    assert str(ep("[2001:db8::1]:41641")) == "[2001:db8::1]:41641"
    assert ep("[::ffff:192.0.2.1]:7") == disco.Endpoint(IPv4Address("192.0.2.1"), 7)
    for bad in ("192.0.2.1", "192.0.2.1:", "192.0.2.1:65536", "2001:db8::1:80", "[x]:1", "1.2.3.4:+5", ":1"):
        with pytest.raises(EndpointError):
            ep(bad)


# --- datagrams: NaCl box with real keys ---------------------------------------------------------------------


def test_seal_layout_and_open() -> None:
    nonce = bytes(range(24))
    msg = disco.Ping(TXID, NODE)
    wire = disco.seal(A, B.public, msg, nonce)
    assert wire[:6] == disco.MAGIC
    assert wire[6:38] == A.public.raw
    assert wire[38:62] == nonce
    assert len(wire) == disco.PING_DATAGRAM_LEN
    # The box is a plain NaCl crypto_box of the plaintext: PyNaCl opens it from the raw keys alone.
    raw_box = nacl.public.Box(nacl.public.PrivateKey(B.raw), nacl.public.PublicKey(A.public.raw))
    assert raw_box.decrypt(wire[62:], nonce) == disco.encode(msg)
    assert disco.looks_like_disco(wire)
    assert disco.sender(wire) == A.public
    assert disco.open_datagram(B, wire) == (A.public, msg)
    # Random nonces differ from one datagram to the next.
    assert disco.seal(A, B.public, msg)[38:62] != disco.seal(A, B.public, msg)[38:62]


@pytest.mark.parametrize(
    "msg",
    [
        disco.Ping(TXID, NODE, 0),
        disco.Ping(TXID, NODE, 1200),
        disco.Ping(TXID, None, 31),
        disco.Pong(TXID, disco.Endpoint(IPv6Address("2001:db8::7"), 41641)),
        disco.CallMeMaybe(
            (disco.Endpoint(IPv4Address("198.51.100.9"), 1), disco.Endpoint(IPv4Address("0.0.0.0"), 0))
        ),
    ],
)
def test_round_trip_sealed(msg: disco.Message) -> None:
    box_ab = disco.box_for(A, B.public)
    box_ba = disco.box_for(B, A.public)
    wire = disco.seal_with(box_ab, A.public, msg)
    assert disco.open_with(box_ba, wire) == msg


def test_wrong_key_or_altered_bytes_do_not_open() -> None:
    wire = disco.seal(A, B.public, disco.Ping(TXID, NODE))
    c = DiscoPrivate.generate()
    with pytest.raises(disco.DecryptError):
        disco.open_datagram(c, wire)  # sealed to B, not C
    spoofed = wire[:6] + c.public.raw + wire[38:]  # claims another sender
    with pytest.raises(disco.DecryptError):
        disco.open_datagram(B, spoofed)
    flipped = bytearray(wire)
    flipped[-1] ^= 1
    with pytest.raises(disco.DecryptError):
        disco.open_datagram(B, bytes(flipped))
    # A low-order sender key cannot make a box: still a ParseError, not a crash.
    zero = wire[:6] + bytes(32) + wire[38:]
    with pytest.raises(disco.DecryptError):
        disco.open_datagram(B, zero)
    with pytest.raises(disco.DecryptError):
        disco.box_for(A, DiscoPublic(bytes(32)))


def test_header_errors() -> None:
    wire = disco.seal(A, B.public, disco.Ping(TXID))
    assert not disco.looks_like_disco(wire[:61])
    assert not disco.looks_like_disco(b"DERP" + wire[4:])
    with pytest.raises(disco.DiscoParseError, match="not a disco"):
        disco.sender(b"\x01\x00\x00\x00" + wire[4:])
    with pytest.raises(disco.DiscoParseError, match="too short"):
        disco.sender(wire[: disco.MIN_DATAGRAM_LEN - 1])


# --- fuzzing ------------------------------------------------------------------------------------------------

endpoints = st.builds(
    disco.Endpoint,
    st.one_of(
        st.integers(0, 2**32 - 1).map(IPv4Address),
        st.integers(0, 2**128 - 1).map(IPv6Address),
    ),
    st.integers(0, 65535),
)
messages = st.one_of(
    st.builds(
        disco.Ping,
        st.binary(min_size=12, max_size=12),
        st.binary(min_size=32, max_size=32).filter(any).map(NodePublic),
        st.integers(0, 300),
    ),
    # Without a node key, 32 or more padding bytes would read as a (zero) key: as in disco.go.
    st.builds(disco.Ping, st.binary(min_size=12, max_size=12), st.none(), st.integers(0, 31)),
    st.builds(disco.Pong, st.binary(min_size=12, max_size=12), endpoints),
    st.builds(disco.CallMeMaybe, st.lists(endpoints, max_size=8).map(tuple)),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_fuzz_round_trip(msg: disco.Message) -> None:
    assert disco.parse(disco.encode(msg)) == msg


@given(st.binary(max_size=200))
@settings(max_examples=1000, deadline=None)
def test_fuzz_parse_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        disco.parse(data)


@given(st.integers(0, 0x0F), st.integers(0, 3), st.binary(max_size=120))
@settings(max_examples=500, deadline=None)
def test_fuzz_parse_typed_bodies(t: int, ver: int, body: bytes) -> None:
    with contextlib.suppress(ParseError):
        disco.parse(bytes([t, ver]) + body)


@given(st.binary(max_size=160), st.booleans())
@settings(max_examples=500, deadline=None)
def test_fuzz_datagrams_only_parse_errors(data: bytes, with_magic: bool) -> None:
    if with_magic:
        data = disco.MAGIC + data
    with contextlib.suppress(ParseError):
        disco.open_datagram(B, data)
    with contextlib.suppress(ParseError):
        disco.Endpoint.parse(data.decode("utf-8", "replace"))


@given(messages, st.integers(0, 200), st.integers(0, 255))
@settings(max_examples=300, deadline=None)
def test_fuzz_tampered_datagram_never_opens(msg: disco.Message, pos: int, flip: int) -> None:
    wire = bytearray(disco.seal(A, B.public, msg))
    pos %= len(wire)
    wire[pos] ^= flip or 1
    try:
        src, got = disco.open_datagram(B, bytes(wire))
    except ParseError:
        return
    raise AssertionError(f"tampered byte {pos} still opened: {src} {got}")
