"""STUN codec (tailpy.proto.stun), server logic (tailpy.derp.stun_server.answer) and client transactions
(tailpy.magicsock.stun): RFC 5769 vectors, comprehension-required attributes (RFC 8489 §14), RFC 8489
retransmission, fuzzing."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.derp.stun_server import StunServer, answer
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.magicsock import stun as client
from tailpy.proto import stun

DEST = Endpoint.parse("192.0.2.9:3478")  # a STUN server the client transactions talk to

TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 §2.1
REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff"
    "80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249"
    "c1b571a280280004e57a3bcf"
)
# RFC 5769 §2.2 and §2.3
RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96"
)
RESPONSE_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000140002a1470113a9fa"
    "a5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c"
)
# RFC 5769 §2.4: long-term credentials, username "マトリックス", password "The<U+00AD>M<U+00AA>tr<U+2168>"
REQUEST_LONG_TERM = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c39465354767936347341"
    "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)

CLIENT_ADDR = ("192.0.2.1", 32853)


# --- RFC 5769 §2.1: the request vector -------------------------------------------------------------------


def test_rfc5769_request_vector() -> None:
    m = stun.parse(REQUEST)
    assert (m.method, m.cls, m.txid) == (stun.BINDING, stun.MessageClass.REQUEST, TXID)
    assert len(REQUEST) == 108 and len(REQUEST) - stun.HEADER_LEN == 88
    assert m.software == "STUN test client"
    assert m.get(stun.PRIORITY) == bytes.fromhex("6e0001ff")
    assert m.get(stun.ICE_CONTROLLED) == bytes.fromhex("932ff9b151263b36")
    assert m.username == "evtj:h6vY"
    assert m.has_fingerprint and m.get(stun.FINGERPRINT) == bytes.fromhex("e57a3bcf")
    assert m.verify_integrity(stun.short_term_key(PASSWORD))
    assert not m.verify_integrity(stun.short_term_key(PASSWORD + "x"))
    assert m.unknown_required() == []
    # Re-encoding gives the same bytes: verbatim, and rebuilt with a fresh MESSAGE-INTEGRITY + FINGERPRINT
    # (the 0x20 padding of USERNAME is kept).
    assert m.encode() == REQUEST
    body = [a for a in m.attributes if a.type not in (stun.MESSAGE_INTEGRITY, stun.FINGERPRINT)]
    rebuilt = stun.encode(
        m.method, m.cls, m.txid, body, integrity_key=stun.short_term_key(PASSWORD), fingerprint=True
    )
    assert rebuilt == REQUEST


def test_one_changed_byte_fails_both_checks_and_is_dropped() -> None:
    bad = bytearray(REQUEST)
    assert bad[34] == 0x63
    bad[34] = 0x43  # "client" -> "Client"
    with pytest.raises(stun.FingerprintError):
        stun.parse(bytes(bad))
    m = stun.parse(bytes(bad), verify_fingerprint=False)
    assert m.software == "STUN test Client"
    assert not m.verify_integrity(stun.short_term_key(PASSWORD))
    reply, disposition = answer(bytes(bad), CLIENT_ADDR)
    assert reply is None and disposition == "bad_fingerprint"


@pytest.mark.parametrize(
    "request_hex",
    [
        "000100002112a442b7e7a701bc34d686fa87dfae",
        "000100082112a442b7e7a701bc34d686fa87dfae80280004fdf6ae02",
        REQUEST.hex(),
    ],
    ids=["minimal", "minimal+fingerprint", "rfc5769"],
)
def test_requests_with_or_without_fingerprint_are_answered(request_hex: str) -> None:
    reply, disposition = answer(bytes.fromhex(request_hex), CLIENT_ADDR)
    assert disposition == "success" and reply is not None
    r = stun.parse(reply)
    assert (r.method, r.cls, r.txid) == (stun.BINDING, stun.MessageClass.SUCCESS, TXID)
    assert r.mapped_address == CLIENT_ADDR
    assert r.get(stun.XOR_MAPPED_ADDRESS) is not None and r.has_fingerprint and r.software


def test_wrong_fingerprint_is_dropped() -> None:
    req = bytes.fromhex("000100082112a442b7e7a701bc34d686fa87dfae80280004fdf6ae03")
    assert answer(req, CLIENT_ADDR) == (None, "bad_fingerprint")


def test_rfc5769_long_term_vector() -> None:
    m = stun.parse(REQUEST_LONG_TERM)
    assert m.username == "マトリックス"
    assert m.get(stun.REALM) == b"example.org"
    assert m.get(stun.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    key = stun.long_term_key("マトリックス", "example.org", "The\u00adM\u00aatr\u2168")
    assert key == stun.long_term_key("マトリックス", "example.org", "TheMatrIX")
    assert m.verify_integrity(key)
    assert m.encode() == REQUEST_LONG_TERM


# --- RFC 5769 §2.2, §2.3: the response vectors -----------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "mapped", "crc"),
    [
        (RESPONSE_V4, ("192.0.2.1", 32853), "c07d4c96"),
        (RESPONSE_V6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853), "c8fb0b4c"),
    ],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_response_vectors(vector: bytes, mapped: tuple[str, int], crc: str) -> None:
    m = stun.parse(vector)
    assert (m.cls, m.txid) == (stun.MessageClass.SUCCESS, TXID)
    assert m.software == "test vector"
    assert m.mapped_address == mapped
    assert m.get(stun.FINGERPRINT) == bytes.fromhex(crc)
    assert m.verify_integrity(stun.short_term_key(PASSWORD))
    assert m.encode() == vector
    # the server side writes the same XOR-MAPPED-ADDRESS bytes for that address
    assert stun.address_attr(mapped, TXID).value == m.get(stun.XOR_MAPPED_ADDRESS)


def test_reply_with_another_txid_is_not_matched() -> None:
    tx = client.Transactions()
    other = bytes(12)
    start = tx.start(DEST, now=0.0, txid=other)
    assert start.txid == other
    assert tx.receive(RESPONSE_V4, DEST, now=0.1) is None  # its txid is TXID, not ours
    assert tx.pending() == 1


def test_mapped_address_fallback() -> None:
    # Only MAPPED-ADDRESS (RFC 3489 servers): used.
    plain = stun.encode(
        stun.BINDING, stun.MessageClass.SUCCESS, TXID, [stun.address_attr(CLIENT_ADDR, TXID, xor=False)]
    )
    assert stun.parse(plain).mapped_address == CLIENT_ADDR
    # Both: XOR-MAPPED-ADDRESS wins (a NAT rewriting MAPPED-ADDRESS in flight is why it exists).
    both = stun.encode(
        stun.BINDING,
        stun.MessageClass.SUCCESS,
        TXID,
        [stun.address_attr(("198.51.100.7", 1), TXID, xor=False), stun.address_attr(CLIENT_ADDR, TXID)],
    )
    assert stun.parse(both).mapped_address == CLIENT_ADDR


# --- RFC 8489 §14: comprehension-required vs optional ----------------------------------------------------


def test_unknown_required_attribute_gets_420() -> None:
    req = bytes.fromhex("000100082112a442b7e7a701bc34d686fa87dfae7ffe000400000000")
    reply, disposition = answer(req, CLIENT_ADDR)
    assert disposition == "unknown_attribute" and reply is not None
    assert reply[:2] == b"\x01\x11"
    r = stun.parse(reply)
    assert (r.cls, r.txid) == (stun.MessageClass.ERROR, TXID)
    assert r.error == (420, "Unknown Attribute")
    assert r.unknown_attributes == [0x7FFE]
    assert r.mapped_address is None


def test_optional_attribute_before_xor_mapped_address_is_ignored() -> None:
    resp = bytes.fromhex("010100142112a442b7e7a701bc34d686fa87dfaec057000400010000002000080001a147e112a643")
    m = stun.parse(resp)
    assert m.unknown_required() == []
    assert m.mapped_address == ("192.0.2.1", 32853)
    tx = client.Transactions()
    tx.start(DEST, now=0.0, txid=TXID)
    request = stun.binding_request(TXID, software=client.CLIENT_SOFTWARE)[1]
    assert tx.due(0.0) == [(request, DEST)]
    assert stun.parse(request).software == "tailnode" and stun.parse(request).has_fingerprint
    result = tx.receive(resp, DEST, now=0.25)
    assert result is not None and result.ok and result.mapped == Endpoint.parse("192.0.2.1:32853")
    assert result.rtt == pytest.approx(0.25)


def test_optional_attribute_in_request_is_answered() -> None:
    req = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, TXID, [stun.Attribute(0xC057, b"\0\1\0\0")])
    reply, disposition = answer(req, CLIENT_ADDR)
    assert disposition == "success" and reply is not None


def test_success_with_unknown_required_attribute_fails_the_transaction() -> None:
    resp = stun.encode(
        stun.BINDING,
        stun.MessageClass.SUCCESS,
        TXID,
        [stun.address_attr(CLIENT_ADDR, TXID), stun.Attribute(0x0005, b"\0\0\0\0")],
    )
    assert stun.parse(resp).unknown_required() == [0x0005]
    tx = client.Transactions()
    tx.start(DEST, now=0.0, txid=TXID)
    result = tx.receive(resp, DEST, now=0.1)
    assert result is not None and not result.ok and result.mapped is None
    assert "0x0005" in (result.error or "")
    assert tx.pending() == 0


def test_error_response_fails_the_transaction() -> None:
    resp = stun.encode(
        stun.BINDING, stun.MessageClass.ERROR, TXID, [stun.error_attr(420), stun.unknown_attributes_attr([3])]
    )
    tx = client.Transactions()
    tx.start(DEST, now=0.0, txid=TXID)
    result = tx.receive(resp, DEST, now=0.1)
    assert result is not None and not result.ok and "420" in (result.error or "")


def test_attributes_after_message_integrity_are_ignored() -> None:
    key = stun.short_term_key(PASSWORD)
    signed = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, TXID, [], integrity_key=key)
    # append an unknown comprehension-required attribute after MESSAGE-INTEGRITY (fixing the length)
    extra = b"\x7f\xfe\x00\x04\0\0\0\0"
    body = signed[20:] + extra
    msg = signed[:2] + len(body).to_bytes(2, "big") + signed[4:20] + body
    m = stun.parse(msg)
    assert m.unknown_required() == []
    assert m.verify_integrity(key)


def test_change_request_with_flags_gets_420_and_without_is_answered() -> None:
    def req(flags: int) -> bytes:
        return stun.encode(
            stun.BINDING,
            stun.MessageClass.REQUEST,
            TXID,
            [stun.Attribute(stun.CHANGE_REQUEST, flags.to_bytes(4, "big"))],
        )

    assert answer(req(0), CLIENT_ADDR)[1] == "success"
    reply, disposition = answer(req(0x06), CLIENT_ADDR)
    assert disposition == "unknown_attribute" and reply is not None
    assert stun.parse(reply).unknown_attributes == [stun.CHANGE_REQUEST]


def test_rfc3489_request_gets_mapped_address_and_its_cookie_back() -> None:
    txid16 = bytes(range(1, 17))
    req = b"\x00\x01\x00\x00" + txid16
    with pytest.raises(stun.StunParseError):
        stun.parse(req)
    reply, disposition = answer(req, CLIENT_ADDR)
    assert disposition == "success" and reply is not None
    assert reply[4:20] == txid16
    r = stun.parse(reply, allow_rfc3489=True)
    assert r.is_rfc3489 and r.get(stun.MAPPED_ADDRESS) is not None
    assert r.get(stun.XOR_MAPPED_ADDRESS) is None
    assert r.mapped_address == CLIENT_ADDR


def test_server_drops_what_is_not_a_request() -> None:
    assert answer(b"\x01\x02garbage" * 3, CLIENT_ADDR) == (None, "not_stun")
    assert answer(RESPONSE_V4, CLIENT_ADDR) == (None, "not_request")
    ind = stun.encode(stun.BINDING, stun.MessageClass.INDICATION, TXID, [])
    assert answer(ind, CLIENT_ADDR) == (None, "not_request")
    other_method = stun.encode(0x003, stun.MessageClass.REQUEST, TXID, [])  # TURN Allocate
    reply, disposition = answer(other_method, CLIENT_ADDR)
    assert disposition == "bad_method" and reply is not None
    assert stun.parse(reply).error is not None and stun.parse(reply).error[0] == 400  # type: ignore[index]


def test_server_ignores_what_rfc_8489_says_to_ignore() -> None:
    """RFC 8489 §6.3: responses and indications to a server get no answer (§6.3.2, §6.3.3), not even an
    indication with an unknown comprehension-required attribute; attributes after MESSAGE-INTEGRITY (but
    FINGERPRINT) are ignored (§14.5), so an unknown one there is no reason for a 420; anything after a
    FINGERPRINT makes the message malformed (§14.7)."""
    unknown = stun.Attribute(0x7FFE, bytes(4))
    error = stun.encode(stun.BINDING, stun.MessageClass.ERROR, TXID, [stun.error_attr(420)], fingerprint=True)
    assert answer(error, CLIENT_ADDR) == (None, "not_request")
    ind = stun.encode(stun.BINDING, stun.MessageClass.INDICATION, TXID, [unknown], fingerprint=True)
    assert answer(ind, CLIENT_ADDR) == (None, "not_request")
    mi = stun.Attribute(stun.MESSAGE_INTEGRITY, bytes(20))
    after_mi = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, TXID, [mi, unknown], fingerprint=True)
    reply, disposition = answer(after_mi, CLIENT_ADDR)
    assert disposition == "success" and reply is not None
    before_mi = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, TXID, [unknown, mi], fingerprint=True)
    assert answer(before_mi, CLIENT_ADDR)[1] == "unknown_attribute"
    req = stun.encode(stun.BINDING, stun.MessageClass.REQUEST, TXID, [], fingerprint=True)
    trailing = req[:2] + (len(req) - 20 + 8).to_bytes(2, "big") + req[4:] + bytes.fromhex("8022000474657374")
    assert answer(trailing, CLIENT_ADDR) == (None, "not_stun")


def test_ipv4_mapped_ipv6_source_is_answered_as_ipv4() -> None:
    reply, _ = answer(stun.binding_request(TXID)[1], ("::ffff:192.0.2.1", 32853))
    assert reply is not None and stun.parse(reply).mapped_address == CLIENT_ADDR


def test_method_and_class_bits_round_trip() -> None:
    for method in (0x001, 0x003, 0x0FFF, 0x0AB5):
        for cls in stun.MessageClass:
            m = stun.parse(stun.encode(method, cls, TXID))
            assert (m.method, m.cls) == (method, cls)


# --- fuzzing ------------------------------------------------------------------------------------------


def _safe_parse(data: bytes) -> None:
    for allow in (False, True):
        try:
            m = stun.parse(data, allow_rfc3489=allow)
        except ParseError:
            continue
        # a message that parses has accessors that never raise
        _ = (m.mapped_address, m.software, m.error, m.unknown_attributes, m.unknown_required(), m.username)
        m.verify_integrity(b"key")
        assert m.encode() == data
        answer(data, CLIENT_ADDR)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    _safe_parse(data)
    answer(data, CLIENT_ADDR)


_attr = st.tuples(
    st.sampled_from(
        [0x0001, 0x0003, 0x0006, 0x0008, 0x0009, 0x000A, 0x0020, 0x8020, 0x8022, 0x8028, 0x7FFE, 0xC057]
    ),
    st.binary(max_size=24),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.integers(0, 0x3FFF),
    st.sampled_from([stun.COOKIE_BYTES, b"\0\0\0\0"]),
    st.lists(_attr, max_size=6),
    st.integers(-8, 8),
)
def test_fuzz_structured(mtype: int, cookie: bytes, attrs: list[tuple[int, bytes]], skew: int) -> None:
    """Well-framed messages with arbitrary attribute contents, and length fields off by a little."""
    body = b"".join(
        t.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v + bytes(-len(v) % 4) for t, v in attrs
    )
    length = max(0, len(body) + skew) & 0xFFFF
    data = mtype.to_bytes(2, "big") + length.to_bytes(2, "big") + cookie + TXID + body
    _safe_parse(data)
    tx = client.Transactions()
    tx.start(DEST, now=0.0, txid=TXID)
    tx.receive(data, DEST, now=0.1)  # never raises either


# --- client transactions: RFC 8489 §6.2.1 retransmission --------------------------------------------------


def test_retransmission_schedule_rfc8489() -> None:
    """RTO 500 ms doubling, Rc = 7 sends, then Rm * RTO = 8 s: sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s
    and failure at 39.5 s."""
    tx = client.Transactions()
    tx.start(DEST, now=0.0)
    sends: list[float] = []
    failed: list[client.BindingResult] = []
    t = 0.0
    while t < 60 and not failed:
        sends += [t for _ in tx.due(t)]
        failed += tx.expire(t)
        wake = tx.next_wakeup()
        assert wake is not None or failed
        t = wake if wake is not None else t
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert len(failed) == 1 and failed[0].error == "timeout" and failed[0].attempts == 7
    assert t == pytest.approx(39.5)


def test_retransmission_with_a_shorter_total() -> None:
    tx = client.Transactions()
    tx.start(DEST, now=10.0, total=3.0)
    sends: list[float] = []
    failed: list[client.BindingResult] = []
    t = 10.0
    while not failed:
        sends += [t for _ in tx.due(t)]
        failed += tx.expire(t)
        wake = tx.next_wakeup()
        t = wake if wake is not None else t
    assert sends == [10.0, 10.5, 11.5]
    assert t == pytest.approx(13.0)


def test_late_answer_after_a_retransmission_still_matches() -> None:
    tx = client.Transactions()
    start = tx.start(DEST, now=0.0)
    assert len(tx.due(0.0)) == 1 and len(tx.due(0.5)) == 1
    resp = stun.encode(
        stun.BINDING, stun.MessageClass.SUCCESS, start.txid, [stun.address_attr(CLIENT_ADDR, start.txid)]
    )
    result = tx.receive(resp, DEST, now=0.7)
    assert result is not None and result.ok and result.attempts == 2
    assert result.rtt == pytest.approx(0.2)  # from the latest send
    assert tx.receive(resp, DEST, now=0.8) is None  # a duplicate answer matches nothing


# --- the asyncio server and runner on loopback --------------------------------------------------------


async def test_server_and_runner_on_loopback() -> None:
    server = StunServer(software="tailpy test")
    await server.start("127.0.0.1", 0)
    try:
        port = server.addresses[0][1]
        async with client.StandaloneStun(bind="127.0.0.1") as standalone:
            result = await standalone.runner.binding(Endpoint.parse(f"127.0.0.1:{port}"), total=5.0)
            assert result.ok and result.mapped == Endpoint.parse(f"127.0.0.1:{standalone.port}")
            assert result.rtt is not None and result.rtt >= 0
        # garbage is counted and dropped; the server keeps serving
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.settimeout(5)
            s.sendto(b"\xff" * 30, ("127.0.0.1", port))
            s.sendto(stun.binding_request(TXID)[1], ("127.0.0.1", port))
            reply, _ = await asyncio.to_thread(s.recvfrom, 2048)
        finally:
            s.close()
        assert stun.parse(reply).txid == TXID
        assert server.metrics.requests["not_stun"] == 1
        assert server.metrics.requests["success"] == 2
        assert "stun_requests_total" in server.metrics.prometheus()
    finally:
        await server.stop()


async def test_runner_times_out_without_a_server() -> None:
    async with client.StandaloneStun(bind="127.0.0.1") as standalone:
        # a port nobody listens on (bound then closed): every attempt is lost
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        result = await standalone.runner.binding(Endpoint.parse(f"127.0.0.1:{port}"), total=0.6, rto=0.1)
        assert not result.ok and result.error == "timeout" and result.attempts >= 2
