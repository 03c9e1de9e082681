"""The compact map stream codec: zstd frames sealed per stream, compact records, peer field patches."""

from __future__ import annotations

import json

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.control.client import MapMessage, MapState, apply_message
from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import MapDelta, NetMap, Node, apply_delta
from tailpy.proto import control as proto
from tailpy.proto import mapcodec

needs_zstd = pytest.mark.skipif(not mapcodec.ZSTD, reason="the zstandard package is not installed")


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


prefixes = st.sampled_from(["10.0.0.0/24", "192.168.1.0/24", "0.0.0.0/0", "::/0", "fd00::/64"])
nodes = st.builds(
    Node,
    id=st.integers(1, 10_000),
    name=st.text("abcdef-0123", min_size=1, max_size=12),
    hostname=st.text(max_size=12),
    node_key=st.binary(min_size=32, max_size=32).map(NodePublic),
    machine_key=st.binary(min_size=32, max_size=32).map(MachinePublic),
    addresses=st.just(("100.64.0.1/32", "fd7a:115c:a1e0::1/128")),
    endpoints=st.lists(st.sampled_from(["192.0.2.1:41641", "[2001:db8::1]:1"]), unique=True, max_size=2).map(
        lambda xs: tuple(Endpoint.parse(x) for x in xs)
    ),
    online=st.booleans(),
    last_seen=st.none() | st.floats(0, 2e9),
    user=st.sampled_from(["", "alice", "bob"]),
    tags=st.lists(st.sampled_from(["tag:web", "tag:db"]), unique=True, max_size=2).map(tuple),
    os=st.sampled_from(["", "linux"]),
    key_expiry=st.none() | st.floats(0, 2e9),
    expired=st.booleans(),
    home_derp=st.integers(0, 900),
    disco_key=st.none() | st.binary(min_size=32, max_size=32).map(DiscoPublic),
    name_by_admin=st.booleans(),
    allowed_ips=st.none() | st.lists(prefixes, unique=True, max_size=3).map(tuple),
    primary_routes=st.lists(prefixes, unique=True, max_size=2).map(tuple),
    routable_ips=st.lists(prefixes, unique=True, max_size=2).map(tuple),
    approved_routes=st.lists(prefixes, unique=True, max_size=2).map(tuple),
)


@given(nodes)
def test_compact_record_reads_back_as_the_same_node(n: Node) -> None:
    compact = mapcodec.compact_record(n.to_json())
    assert Node.from_json(json.loads(json.dumps(compact))) == n
    assert len(json.dumps(compact)) <= len(json.dumps(n.to_json()))


@settings(max_examples=200)
@given(nodes, nodes)
def test_a_patch_turns_the_old_record_into_the_new(old: Node, new: Node) -> None:
    new = Node.from_json({**new.to_json(), "id": old.id, "node_key": old.node_key.text()})
    new = Node.from_json({**new.to_json(), "machine_key": old.machine_key.text()})
    p = mapcodec.patch(mapcodec.compact_record(old.to_json()), new.to_json())
    if old == new:
        assert p is None
        return
    assert p is not None and p["id"] == old.id
    assert old.patched(json.loads(json.dumps(p))) == new
    # on the wire: a delta carrying it, applied by a client holding the old record
    me = Node.from_json({**old.to_json(), "id": old.id + 1})
    d = MapDelta.from_json({"type": "delta", "version": 2, "peers_patched": [p]})
    assert apply_delta(NetMap(me, {old.id: old}), d).peers[old.id] == new


def test_a_patch_never_changes_keys_or_ids() -> None:
    a = {"id": 1, "name": "a", "node_key": "nodekey:" + "00" * 32}
    assert mapcodec.patch(a, {**a, "node_key": "nodekey:" + "11" * 32}) is None
    assert mapcodec.patch(a, {**a, "id": 2}) is None
    assert mapcodec.patch(a, dict(a)) is None
    assert mapcodec.patch(a, {**a, "online": False}) is None  # absent is the default
    assert mapcodec.patch({**a, "online": True}, a) == {"id": 1, "online": False}
    with pytest.raises(ParseError):
        mapcodec.apply_patch(a, {"id": 2, "name": "b"})


def test_a_patch_for_an_unknown_peer_is_ignored_and_malformed_ones_refused() -> None:
    me = Node(1, "a", "a", NodePublic(b"\1" * 32), MachinePublic(b"\2" * 32), ("100.64.0.1/32",))
    d = MapDelta.from_json({"type": "delta", "version": 1, "peers_patched": [{"id": 9, "online": True}]})
    assert apply_delta(NetMap(me), d).peers == {}
    for bad in ([{"online": True}], [{"id": "9"}], {"id": 9}, [7]):
        with pytest.raises(ParseError):
            MapDelta.from_json({"type": "delta", "peers_patched": bad})


def test_accept_names_what_both_sides_know() -> None:
    assert mapcodec.accepted(None) == frozenset()
    assert mapcodec.accepted(["patches", "brotli"]) == {"patches"}
    assert ("zstd" in mapcodec.accepted(["zstd"])) == mapcodec.ZSTD
    with pytest.raises(ParseError):
        mapcodec.accepted("zstd")


@needs_zstd
def test_sealed_frames_open_as_one_json_object() -> None:
    server, client = mkey(), mkey()
    sealer = proto.StreamSealer(server, proto.public_of(client), "n" * 32)
    opener = proto.StreamOpener(client, proto.public_of(server), "n" * 32)
    shared = [mapcodec.compress(b'{"type":"netmap","peers":['), mapcodec.compress(b"1,2,3" * 300)]
    line = sealer.seal_frames(shared, b',4],"x":1}')
    assert json.loads(opener.open(line)) == {
        "type": "netmap",
        "peers": json.loads("[" + "1,2,3" * 300 + ",4]"),
        "x": 1,
        "reply_to": "n" * 32,
        "seq": 0,
    }
    # small messages stay plain JSON, large ones are compressed: both open
    small, large = b'{"type":"delta","version":1}', b'{"type":"delta","pad":"%s"}' % (b"x" * 4000)
    for body in (small, large):
        line = sealer.seal(body, zstd=True)
        assert json.loads(opener.open(line))["type"] == "delta"
    assert len(sealer.seal(large, zstd=True)) < len(large) // 4
    # out of order (seq) is refused after inflating, as for plain lines
    sealer.seq += 1
    with pytest.raises(proto.UnauthenticatedError):
        opener.open(sealer.seal(large, zstd=True))


@needs_zstd
@given(st.lists(st.binary(max_size=300_000) | st.binary(max_size=64), max_size=6))
@settings(max_examples=30, deadline=None)
def test_concatenated_frames_inflate_to_the_concatenation(parts: list[bytes]) -> None:
    data = b"".join(mapcodec.compress(p) for p in parts)
    assert mapcodec.decompress(data, 1 << 30) == b"".join(parts)


@needs_zstd
def test_decompress_refuses_bombs_truncation_and_frames_without_sizes() -> None:
    import zstandard

    big = mapcodec.compress(b"\0" * (1 << 20))
    assert mapcodec.decompress(big + big, 2 << 20) == b"\0" * (2 << 20)
    with pytest.raises(ParseError, match="more than"):
        mapcodec.decompress(big + big, (2 << 20) - 1)
    with pytest.raises(ParseError):
        mapcodec.decompress(big[:-3], 4 << 20)
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = sizeless.compress(b"{}") + sizeless.flush()
    with pytest.raises(ParseError, match="content size"):
        mapcodec.decompress(frame, 1 << 20)


def test_a_netmap_message_may_list_the_recipient_among_its_peers() -> None:
    me = Node(1, "a", "a", NodePublic(b"\1" * 32), MachinePublic(b"\2" * 32), ("100.64.0.1/32",))
    peer = Node(2, "b", "b", NodePublic(b"\3" * 32), MachinePublic(b"\4" * 32), ("100.64.0.2/32",))
    nm = NetMap(me, {2: peer}, "ts.net")
    netmap = {**nm.to_json(), "peers": [me.to_json(), peer.to_json(), me.to_json()]}
    body = {"type": "netmap", "generation": "g", "version": 3, "netmap": netmap}
    state = apply_message(None, MapMessage(json.dumps(body).encode()))
    assert state == MapState(nm, "g", 3)
