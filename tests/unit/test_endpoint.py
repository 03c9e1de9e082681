"""tailpy.endpoint.Endpoint: parse/format, IPv4-mapped addresses, zones, socket and disco forms, errors."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.endpoint import DISCO_LEN, Endpoint, parse_valid
from tailpy.errors import EndpointError, ParseError, TailpyError


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("192.0.2.1:41641", IPv4Address("192.0.2.1"), 41641),
        ("[2001:db8::1]:3478", IPv6Address("2001:db8::1"), 3478),
        ("[2001:DB8:0::1]:3478", IPv6Address("2001:db8::1"), 3478),
        ("0.0.0.0:0", IPv4Address("0.0.0.0"), 0),
        ("[::]:65535", IPv6Address("::"), 65535),
        ("[fe80::1%eth0]:41641", IPv6Address("fe80::1%eth0"), 41641),
    ],
)
def test_parse(text: str, ip: IPv4Address | IPv6Address, port: int) -> None:
    e = Endpoint.parse(text)
    assert (e.ip, e.port) == (ip, port)
    assert Endpoint.parse(str(e)) == e


def test_canonical_text() -> None:
    assert str(Endpoint.parse("[2001:DB8:0:0::1]:7")) == "[2001:db8::1]:7"
    assert str(Endpoint.parse("192.0.2.1:007")) == "192.0.2.1:7"
    assert str(Endpoint(IPv4Address("198.51.100.4"), 41641)) == "198.51.100.4:41641"
    assert str(Endpoint(IPv6Address("fe80::1%wg0"), 1)) == "[fe80::1%wg0]:1"
    assert repr(Endpoint.parse("192.0.2.1:5")) == "Endpoint('192.0.2.1:5')"


def test_ipv4_mapped_is_unmapped() -> None:
    v4 = Endpoint(IPv4Address("192.0.2.1"), 7)
    assert Endpoint.parse("[::ffff:192.0.2.1]:7") == v4
    assert Endpoint(IPv6Address("::ffff:192.0.2.1"), 7) == v4
    assert Endpoint.parse("[::ffff:192.0.2.1]:7").ip.version == 4
    assert str(Endpoint.parse("[::ffff:c000:201]:7")) == "192.0.2.1:7"
    # a mapped address has no zone once unmapped, as netip.Addr.Unmap
    assert Endpoint.parse("[::ffff:192.0.2.1%eth0]:7") == v4
    assert len({v4, Endpoint.parse("[::ffff:192.0.2.1]:7")}) == 1


def test_zones_kept_and_distinct() -> None:
    a, b, plain = (Endpoint.parse(t) for t in ("[fe80::1%eth0]:1", "[fe80::1%eth1]:1", "[fe80::1]:1"))
    assert a.zone == "eth0" and plain.zone is None
    assert len({a, b, plain}) == 3
    assert sorted([b, a, plain]) == [plain, a, b]
    assert Endpoint.parse("192.0.2.1:1").zone is None
    # the disco form carries no zone
    assert Endpoint.from_disco(a.disco_bytes()) == plain


def test_order_v4_before_v6_then_address_then_port() -> None:
    eps = [Endpoint.parse(t) for t in ("[::1]:1", "192.0.2.2:1", "192.0.2.1:9", "192.0.2.1:2", "[::]:5")]
    assert [str(e) for e in sorted(eps)] == ["192.0.2.1:2", "192.0.2.1:9", "192.0.2.2:1", "[::]:5", "[::1]:1"]
    assert Endpoint.parse("192.0.2.1:1") < Endpoint.parse("[::]:0")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "192.0.2.1",
        "192.0.2.1:",
        ":41641",
        "192.0.2.1:65536",
        "192.0.2.1:-1",
        "192.0.2.1:+1",
        "192.0.2.1: 1",
        " 192.0.2.1:1",
        "192.0.2.1:1 ",
        "192.0.2.1:１",  # a non-ASCII digit
        "192.0.2.256:1",
        "2001:db8::1:53",  # IPv6 without brackets
        "[192.0.2.1]:1",  # IPv4 in brackets
        "[2001:db8::1]",
        "[2001:db8::1:53",
        "[fe80::1%]:1",
        "[fe80::1%a b]:1",
        "[fe80::1%a]b]:1",
        "192.0.2.1%eth0:1",
        "example.com:80",
        "192.0.2.1:123456789012345678901234567890",
    ],
)
def test_bad_text(text: str) -> None:
    with pytest.raises(EndpointError, match=r"expected|zone") as info:
        Endpoint.parse(text)
    assert str(info.value).endswith(("0-65535", "'/'"))
    assert isinstance(info.value, ParseError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, TailpyError)


def test_bad_construction() -> None:
    with pytest.raises(EndpointError, match="0-65535"):
        Endpoint(IPv4Address("192.0.2.1"), 65536)
    with pytest.raises(EndpointError, match="0-65535"):
        Endpoint(IPv4Address("192.0.2.1"), True)
    with pytest.raises(EndpointError, match="not an IP address"):
        Endpoint("nope", 1)  # type: ignore[arg-type]
    with pytest.raises(EndpointError, match="IPv4 or IPv6"):
        Endpoint(3, 1)  # type: ignore[arg-type]
    with pytest.raises(EndpointError, match="must be text"):
        Endpoint.parse(b"192.0.2.1:1")  # type: ignore[arg-type]


def test_frozen() -> None:
    e = Endpoint.parse("192.0.2.1:1")
    with pytest.raises(AttributeError):
        e.port = 2  # type: ignore[misc]


def test_sockaddr_forms() -> None:
    assert Endpoint.from_sockaddr(("192.0.2.1", 3478)) == Endpoint.parse("192.0.2.1:3478")
    assert Endpoint.from_sockaddr(("::ffff:192.0.2.1", 3478, 0, 0)) == Endpoint.parse("192.0.2.1:3478")
    assert Endpoint.from_sockaddr(("2001:db8::1", 5, 0, 0)) == Endpoint.parse("[2001:db8::1]:5")
    assert Endpoint.from_sockaddr(("fe80::1%eth0", 5, 0, 2)).zone == "eth0"
    assert Endpoint.from_sockaddr(("fe80::1", 5, 0, 2)).zone == "2"
    assert Endpoint.parse("192.0.2.1:9").sockaddr() == ("192.0.2.1", 9)
    assert Endpoint.parse("192.0.2.1:9").sockaddr(family=socket.AF_INET6) == ("::ffff:192.0.2.1", 9)
    assert Endpoint.parse("[fe80::1%eth0]:9").sockaddr() == ("fe80::1%eth0", 9)
    with pytest.raises(EndpointError, match="socket address"):
        Endpoint.from_sockaddr(("192.0.2.1",))
    with pytest.raises(EndpointError):
        Endpoint.from_sockaddr(("192.0.2.1", 70000))


def test_stun_mapped_address() -> None:
    """STUN's decoded (XOR-)MAPPED-ADDRESS is (ip text, port)."""
    from tailpy.proto import stun

    txid = b"t" * 12
    for addr in (("198.51.100.4", 41641), ("2001:db8::9", 5)):
        attr = stun.address_attr(addr, txid)
        msg = stun.parse(stun.encode(stun.BINDING, stun.MessageClass.SUCCESS, txid, [attr]))
        mapped = msg.mapped_address
        assert mapped is not None
        assert Endpoint.from_sockaddr(mapped) == Endpoint(addr[0], addr[1])  # type: ignore[arg-type]


def test_disco_form() -> None:
    e = Endpoint.parse("192.0.2.1:41641")
    wire = e.disco_bytes()
    assert wire == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]) + (41641).to_bytes(2, "big")
    assert len(wire) == DISCO_LEN
    assert Endpoint.from_disco(wire) == e
    v6 = Endpoint.parse("[2001:db8::7]:1")
    assert Endpoint.from_disco(v6.disco_bytes()) == v6
    for bad in (wire[:17], wire + b"\x00", b""):
        with pytest.raises(EndpointError, match="18 bytes"):
            Endpoint.from_disco(bad)


def test_parse_valid_skips_malformed() -> None:
    e = Endpoint.parse("192.0.2.1:1")
    assert parse_valid(["192.0.2.1:1", "junk", 7, e, "[2001:db8::1]:2"]) == (
        e,
        e,
        Endpoint.parse("[2001:db8::1]:2"),
    )


# --- properties ---------------------------------------------------------------------------------------------

zones = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="%[]/"), min_size=1, max_size=8
)
addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(0, 2**128 - 1).map(IPv6Address),
    st.tuples(st.integers(0, 2**128 - 1), zones).map(lambda t: IPv6Address(f"{IPv6Address(t[0])}%{t[1]}")),
)
endpoints = st.builds(Endpoint, addresses, st.integers(0, 65535))


@given(endpoints)
@settings(max_examples=500, deadline=None)
def test_text_round_trip(e: Endpoint) -> None:
    assert Endpoint.parse(str(e)) == e
    assert hash(Endpoint.parse(str(e))) == hash(e)
    assert Endpoint.from_sockaddr(e.sockaddr()) == e


@given(endpoints, endpoints)
@settings(max_examples=300, deadline=None)
def test_order_is_total(a: Endpoint, b: Endpoint) -> None:
    assert (a < b) + (b < a) + (a == b) == 1


@given(st.text(max_size=60))
@settings(max_examples=2000, deadline=None)
def test_fuzz_parse_text(text: str) -> None:
    try:
        e = Endpoint.parse(text)
    except EndpointError as err:
        assert str(err)
    else:
        assert isinstance(e, Endpoint) and Endpoint.parse(str(e)) == e


@given(st.from_regex(r"\A\[?[0-9a-fA-F:.%\[\]a-z]{0,40}\]?:[0-9]{0,6}\Z"))
@settings(max_examples=2000, deadline=None)
def test_fuzz_parse_near_misses(text: str) -> None:
    try:
        e = Endpoint.parse(text)
    except EndpointError:
        return
    assert Endpoint.parse(str(e)) == e


@given(st.binary(max_size=20))
@settings(max_examples=500, deadline=None)
def test_fuzz_disco_form(data: bytes) -> None:
    try:
        e = Endpoint.from_disco(data)
    except EndpointError:
        assert len(data) != DISCO_LEN
    else:
        assert e.disco_bytes() == data or data[:12] == bytes(10) + b"\xff\xff"
