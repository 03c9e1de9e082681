"""Netmap distribution without sockets: delta computation and application, stream sealing, the mapper's
fan-out, falling behind, resume, expiry and memory held by idle streams."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tracemalloc

import pytest
from _mapclient import Client, mkey, node

from tailpy.backoff import reconnect_delays
from tailpy.control.client import MapMessage, apply_message
from tailpy.control.mapper import Mapper, MapStream
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError, ParseError
from tailpy.keys import MachinePublic
from tailpy.netmap import MapDelta, NetMap, apply_delta, delta
from tailpy.proto import control as proto
from tailpy.proto.mapcodec import compact_record

# --- pure delta functions ---


def test_delta_and_apply_round_trip() -> None:
    old = NetMap(node(1), {2: node(2), 3: node(3), 4: node(4)}, "ts.net")
    new = NetMap(
        node(1, endpoints=("192.0.2.1:1",)),
        {2: node(2), 3: node(3, online=True, name="c"), 5: node(5)},
        "ts.net",
    )
    d = delta(old, new, version=7)
    assert d.version == 7 and d.self_node == new.self_node
    assert [n.id for n in d.changed] == [3, 5] and d.removed == (4,)
    assert apply_delta(old, d) == new
    assert old.peers.keys() == {2, 3, 4}  # pure: old untouched
    assert MapDelta.from_json(json.loads(json.dumps(d.to_json()))) == d
    assert not delta(new, new) and delta(new, new).to_json() == {"type": "delta", "version": 0}


def test_apply_ignores_self_as_peer_and_unknown_removals() -> None:
    nm = NetMap(node(1), {2: node(2)})
    out = apply_delta(nm, MapDelta(1, None, (node(1, name="x"),), (9,)))
    assert out == nm


@pytest.mark.parametrize(
    "obj",
    [{"peers_removed": ["1"]}, {"peers_removed": 1}, {"peers_changed": {}}, {"version": "1"}, {"self": 3}],
)
def test_malformed_delta_is_a_parse_error(obj: dict[str, object]) -> None:
    with pytest.raises(ParseError):
        MapDelta.from_json(obj)


# --- stream sealing ---


def test_stream_sealer_and_opener() -> None:
    server, client = mkey(), mkey()
    sealer = proto.StreamSealer(server, proto.public_of(client), "abc" * 8)
    opener = proto.StreamOpener(client, proto.public_of(server), "abc" * 8)
    lines = [sealer.seal(b'{"type":"delta","version":%d}' % i) for i in range(3)]
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    for i, line in enumerate(lines):
        assert json.loads(opener.open(line)) == {
            "type": "delta",
            "version": i,
            "reply_to": "abc" * 8,
            "seq": i,
        }
    # A line made by seal_response (another field order) opens through the parsing path.
    other = proto.seal_response(server, proto.public_of(client), "abc" * 8, {"type": "keepalive"}, seq=3)
    assert json.loads(opener.open(other.encode()))["type"] == "keepalive"
    with pytest.raises(proto.UnauthenticatedError, match="out of order"):
        opener.open(lines[0])  # a replayed line
    with pytest.raises(proto.UnauthenticatedError, match="does not open"):
        proto.StreamOpener(mkey(), proto.public_of(server), "abc" * 8).open(lines[0])
    with pytest.raises(proto.UnauthenticatedError, match="another request"):
        proto.StreamOpener(client, proto.public_of(server), "xyz" * 8).open(lines[0])
    with pytest.raises(ParseError, match="base64"):
        opener.open(b"not base64!")
    with pytest.raises(ValueError):
        sealer.seal(b"{}")


def test_reconnect_delays_grow_with_jitter_and_cap() -> None:
    it = reconnect_delays(1.0, 8.0, rng=lambda: 0.999)
    hi = [next(it) for _ in range(6)]
    it = reconnect_delays(1.0, 8.0, rng=lambda: 0.0)
    lo = [next(it) for _ in range(6)]
    assert lo == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(a < b <= 2 * a for a, b in zip(lo, hi, strict=True))


# --- the mapper, driven directly ---


def make_mapper(n: int) -> Mapper:
    m = Mapper(mkey(), "ts.net", log_limit=4)
    m.load(node(i) for i in range(1, n + 1))
    return m


def test_mapper_full_map_then_deltas_track_the_server_view() -> None:
    m = make_mapper(5)
    a, b = Client(m, 1), Client(m, 2)
    assert [x.type for x in a.drain()] == ["netmap"]
    b.drain()
    assert a.state is not None and a.state.netmap == m.netmap(1)

    assert m.publish(node(2, endpoints=("192.0.2.2:2",)))  # b's endpoints change
    assert not m.publish(node(2, endpoints=("192.0.2.2:2",)))  # same record: nothing sent
    (ea,) = a.drain()
    m.publish(node(6))  # a node joins
    m.remove(3)  # a node leaves
    assert [x.type for x in a.drain()] == ["delta"]
    assert ea.body == {
        "type": "delta",
        "version": 1,
        # b's stream is open; records leave out the fields at their defaults
        "peers_changed": [compact_record(node(2, endpoints=("192.0.2.2:2",), online=True).to_json())],
        "reply_to": "n" * 32,
        "seq": 1,
    }
    (merged,) = b.drain()  # three changes queued: one merged delta
    assert merged.body["self"]["endpoints"] == ["192.0.2.2:2"] and merged.body["version"] == 3
    assert [n["id"] for n in merged.body["peers_changed"]] == [6] and merged.body["peers_removed"] == [3]
    for c in (a, b):
        assert c.state is not None and c.state.netmap == m.netmap(c.stream.node_id)
        assert c.state.version == m.version == 3


def test_online_is_stream_count_and_removal_ends_own_stream() -> None:
    m = make_mapper(3)
    a, b = Client(m, 1), Client(m, 2)
    m.publish(node(2))  # the server publishes after opening b's stream
    assert m.nodes[2].online and not m.nodes[3].online
    m.close_stream(b.stream)
    m.publish(node(2))
    assert not m.nodes[2].online
    c = Client(m, 3)
    m.remove(3)
    assert c.stream.ended and not a.stream.ended
    a.drain()
    assert a.state is not None and set(a.state.netmap.peers) == {2}


def test_falling_behind_the_log_drops_to_one_full_netmap() -> None:
    m = make_mapper(3)  # log_limit=4
    a = Client(m, 1)
    a.drain()
    for i in range(3):  # within the log: one merged delta with the latest record
        m.publish(node(2, endpoints=(f"192.0.2.2:{i + 1}",)))
    (d,) = a.drain()
    assert d.type == "delta" and [n["endpoints"] for n in d.body["peers_changed"]] == [["192.0.2.2:3"]]
    for i in range(10):  # more than the log holds while the reader is stuck
        m.publish(node(2, endpoints=(f"192.0.2.2:{i + 10}",)))
    assert [x.type for x in a.drain()] == ["netmap"] and a.stream.overflows == 1
    assert a.state is not None and tuple(map(str, a.state.netmap.peers[2].endpoints)) == ("192.0.2.2:19",)
    assert a.state.version == m.version


def test_streams_hold_no_per_change_state() -> None:
    """Thousands of changes to many idle streams: each stream keeps one version number, and a stream that
    wakes up sends one delta of the latest records."""
    m = Mapper(mkey(), "", log_limit=100_000)
    m.load(node(i) for i in range(1, 151))
    clients = [Client(m, i) for i in range(1, 151)]
    for c in clients:
        c.drain()
    for round_ in range(20):
        for i in range(1, 151):
            m.publish(node(i, endpoints=(f"192.0.2.1:{round_ + 1}",)))
    assert all(vars(c.stream).keys() == vars(clients[0].stream).keys() for c in clients)
    (d,) = clients[0].drain()
    assert len(d.body["peers_changed"]) == 149 and d.body["self"]["endpoints"] == ["192.0.2.1:20"]
    assert clients[0].state is not None and clients[0].state.netmap == m.netmap(1)


def test_expired_node_sees_itself_expired_and_no_peers() -> None:
    m = make_mapper(3)
    a, b = Client(m, 1), Client(m, 2)
    a.drain()
    b.drain()
    m.publish(node(1, expired=True))  # a's key expires: a gets a full netmap of itself alone
    (full,) = a.drain()
    assert full.type == "netmap" and full.body["netmap"]["peers"] == []
    assert a.state is not None and a.state.netmap.self_node.expired and not a.state.netmap.peers
    assert m.netmap(1) == a.state.netmap
    (_seen,) = b.drain()  # peers see it expired
    assert b.state is not None and b.state.netmap.peers[1].expired
    m.publish(node(3, endpoints=("192.0.2.3:3",)))  # peer changes do not reach the expired node
    assert a.drain() == []
    m.publish(node(1, expired=True, hostname="renamed"))  # its own record does, as "self" only
    (own,) = a.drain()
    assert (
        own.type == "delta" and "peers_changed" not in own.body and own.body["self"]["hostname"] == "renamed"
    )
    fresh = Client(m, 1, (a.state.generation, a.state.version))  # a resumed stream of an expired node too
    assert fresh.stream.resync and [x.type for x in fresh.drain()] == ["netmap"]
    m.publish(node(1))  # logged in again: a full netmap with the peers
    (back,) = a.drain()
    assert back.type == "netmap" and not a.state.netmap.self_node.expired
    assert a.state.netmap == m.netmap(1) and set(a.state.netmap.peers) == {2, 3}


def test_resume_gets_only_what_changed_since() -> None:
    m = make_mapper(4)
    a = Client(m, 1)
    a.drain()
    assert a.state is not None
    m.close_stream(a.stream)
    m.publish(node(1, last_seen=5.0))  # a went offline: its own record changed
    m.publish(node(2, name="b2"))
    m.remove(3)
    again = Client(m, 1, (a.state.generation, a.state.version))
    again.state = a.state
    (first,) = again.drain()
    assert first.type == "delta" and first.body["generation"] == m.generation
    assert [n["id"] for n in first.body["peers_changed"]] == [2]
    assert first.body["peers_removed"] == [3] and first.body["self"]["last_seen"] == 5.0
    assert again.state is not None and again.state.netmap == m.netmap(1)


@pytest.mark.parametrize("resume", [("0" * 32, 0), (None, 99)])
def test_resume_from_another_generation_or_the_future_gets_a_full_map(
    resume: tuple[str | None, int],
) -> None:
    m = make_mapper(2)
    gen = resume[0] if resume[0] is not None else m.generation
    c = Client(m, 1, (gen, resume[1]))
    assert [x.type for x in c.drain()] == ["netmap"]


def test_resume_beyond_the_log_gets_a_full_map() -> None:
    m = Mapper(mkey(), "", log_limit=2)
    m.load([node(1), node(2)])
    for i in range(3):
        m.publish(node(2, endpoints=(f"192.0.2.2:{i + 1}",)))
    assert Client(m, 1, (m.generation, 0)).stream.resync  # versions 1 and 2 were dropped from the log
    resumed = Client(m, 1, (m.generation, 2))
    assert not resumed.stream.resync and resumed.stream.first
    first = m.delta_body(resumed.stream, resumed=True)
    assert first is not None and json.loads(first)["version"] == 3


def test_resync_publishes_differences_but_not_newer_records() -> None:
    m = make_mapper(3)
    a = Client(m, 1)
    m.publish(node(1))  # online, as the server does after opening a stream
    a.drain()
    since = m.version
    m.publish(node(4))  # published after the store was read
    sent = m.resync([node(1), node(2, name="renamed")], since)  # 3 deleted elsewhere, 4 not yet in the read
    assert sent == 2 and set(m.nodes) == {1, 2, 4}
    a.drain()
    assert a.state is not None and a.state.netmap == m.netmap(1)


def test_delta_without_a_netmap_is_refused() -> None:
    with pytest.raises(ControlError, match="no netmap"):
        apply_message(None, MapMessage(b'{"type":"delta","version":1}'))


def test_ended_stream_drops_its_resume_delta() -> None:
    s = MapStream(1, MachinePublic(b"\1" * 32), proto.StreamSealer(mkey(), MachinePublic(b"\1" * 32), "x"))
    s.first = True
    s.end()
    assert not s.first and s.ended and s.wake.is_set()


def test_idle_streams_hold_no_message_memory() -> None:
    """Streams that got their full netmap and went idle keep no copy of it (the 835 MiB at 1,000 nodes was
    every idle stream's last full netmap, pinned by a local variable of the writer)."""

    async def run() -> tuple[int, int]:
        m = Mapper(mkey(), "ts.net", full_map_concurrency=2)
        m.load(node(i % 150 + 1, id=i, name=f"n{i}") for i in range(1, 3001))  # ~1 MB full netmap
        written = 0

        async def write(data: bytes) -> None:
            nonlocal written
            written += len(data)
            await asyncio.sleep(0)

        streams = [m.open_stream(i, proto.public_of(mkey()), "x" * 32) for i in range(1, 21)]
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.create_task(m.serve(s, write, 60.0)) for s in streams]
        while len(m._idle) < len(streams):
            await asyncio.sleep(0.01)
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        m.end_all()
        await asyncio.gather(*tasks)
        return held, written

    held, written = asyncio.run(run())
    assert written > 20 * 900_000  # 20 full netmaps of about 1 MB went out
    assert held < 4 << 20, f"idle streams hold {held >> 20} MiB"


def test_idle_streams_get_keepalives_and_changes_wake_them() -> None:
    """An idle stream writes a keepalive line after ``keepalive`` seconds of silence (one sweep for all
    streams), a change still wakes it at once, and the stream ends cleanly with the sweep stopped."""

    async def run() -> tuple[list[str], Mapper]:
        m = make_mapper(3)
        key = mkey()
        s = m.open_stream(1, proto.public_of(key), "k" * 32)
        opener = proto.StreamOpener(key, proto.public_of(m.server_key), "k" * 32)
        types: list[str] = []

        async def write(data: bytes) -> None:
            types.append(json.loads(opener.open(data.rstrip(b"\n")))["type"])

        task = asyncio.create_task(m.serve(s, write, 0.2))
        for _ in range(500):  # (a deadline of 5 s, not a timing assertion)
            if types.count("keepalive") >= 2:
                break
            await asyncio.sleep(0.01)
        m.publish(dataclasses.replace(m.nodes[2], endpoints=(Endpoint.parse("192.0.2.9:9"),)))
        for _ in range(500):
            if "delta" in types:
                break
            await asyncio.sleep(0.01)
        s.end()
        await task
        m.close_stream(s)
        return types, m

    types, m = asyncio.run(run())
    assert types[0] == "netmap" and types.count("keepalive") >= 2 and "delta" in types
    assert m._sweeper is None  # the last stream closed: no timer left behind


def test_stream_waiting_for_a_full_netmap_slot_gets_keepalives() -> None:
    """Thousands of streams opening at once wait for one of the few full-netmap slots: meanwhile each gets a
    keepalive per interval (its client counts a silent stream dead and would reconnect, queueing again),
    then its netmap; a stream that ends while it waits gives up its place without taking a slot."""

    async def go() -> None:
        m = Mapper(mkey(), "ts.net", full_map_concurrency=1)
        m.load([node(1), node(2)])
        key = mkey()
        s = m.open_stream(1, proto.public_of(key), "n" * 32)
        opener = proto.StreamOpener(key, proto.public_of(m.server_key), "n" * 32)
        lines: list[bytes] = []

        async def write(b: bytes) -> None:
            lines.append(b)

        await m._full_maps.acquire()  # (another stream's netmap is being written)
        task = asyncio.create_task(m.serve(s, write, keepalive=0.05))
        while len(lines) < 3:
            await asyncio.sleep(0.01)
        assert all(opener.open(line).startswith(b'{"type":"keepalive"') for line in lines)
        m._full_maps.release()
        while not any(b'"type":"netmap"' in opener.open(line) for line in lines[3:]):
            await asyncio.sleep(0.01)
        s.end()
        await task
        # a stream that ends while it waits: the slot stays free for the others
        late = m.open_stream(2, proto.public_of(key), "m" * 32)
        await m._full_maps.acquire()
        waiting = asyncio.create_task(m.serve(late, write, keepalive=0.05))
        await asyncio.sleep(0.12)
        late.end()
        await waiting
        m._full_maps.release()
        assert not m._full_maps.locked()

    asyncio.run(asyncio.wait_for(go(), 30))
