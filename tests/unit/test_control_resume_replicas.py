"""Map streams resuming on another control replica of the same database, without sockets or a database:
two mappers read one simulated change feed (each marks what it applied, as
:class:`tailpy.control.replicas.Replicas` does), a client of one moves to the other with the resume point of
its last message; and DERP map changes sent as deltas."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from _mapclient import Client, mkey
from _mapclient import node as mapnode

from tailpy.control.client import MapMessage, MapState, apply_message
from tailpy.control.mapper import Mapper, parse_feed_point
from tailpy.control.policy import Policy
from tailpy.dns.config import DNSConfig
from tailpy.errors import ControlError
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, NetMap, Node

FEED = "0123456789abcdef"
READS_DERP = ("derp_map",)


def node(i: int, **kw: Any) -> Node:
    """:func:`_mapclient.node` whose key expires at unix time 10,000 + ``i``."""
    kw.setdefault("key_expiry", 10_000.0 + i)
    return mapnode(i, **kw)


def derp_map(first: int) -> DerpMap:
    """Region 900 of the replicas' relays 901 and 902, relay ``first`` first (each replica lists its own
    relay first)."""
    relays = [
        DerpNode(f"900-{r}", 900, f"relay{r}.example") for r in sorted((901, 902), key=lambda r: r != first)
    ]
    return DerpMap({900: DerpRegion(900, "r900", "region 900", tuple(relays))})


class Replica:
    """One replica: a mapper that applies the shared feed (rows: a node's new record, or a node id removed)
    and marks each read, on a clock the test sets."""

    def __init__(self, nodes: list[Node], relay: int, key: object) -> None:
        self.now = 1_000.0
        self.m = Mapper(key, "ts.net", derp_map=derp_map(relay))  # type: ignore[arg-type]
        self.m.clock = lambda: self.now
        self.m.feed_id = FEED
        self.m.load(nodes)
        self.seq = 0

    def read(self, feed: list[Node | int]) -> None:
        for row in feed[self.seq :]:
            if isinstance(row, Node):
                self.m.publish(row)
            else:
                self.m.remove(row)
        self.seq = len(feed)
        self.m.feed_applied(self.seq)


@pytest.fixture
def pair() -> tuple[Replica, Replica, list[Node | int]]:
    key = mkey()  # (replicas of one database share the server key)
    nodes = [node(i) for i in range(1, 6)]
    return Replica(nodes, 901, key), Replica(nodes, 902, key), []


def moved(c: Client, to: Replica, accept: tuple[str, ...] = READS_DERP) -> Client:
    """``c``'s node opening its stream on ``to`` with the resume point of the last message it applied."""
    assert c.state is not None
    c.mapper.close_stream(c.stream)
    again = Client(to.m, c.stream.node_id, c.state.resume, accept)
    again.state = c.state
    return again


def test_moved_stream_resumes_with_one_delta(pair: tuple[Replica, Replica, list[Node | int]]) -> None:
    a, b, feed = pair
    c = Client(a.m, 1, accept=READS_DERP)
    c.drain()
    feed += [node(2, endpoints=()), 3, node(6)]  # (a node changed, one removed, one joined)
    a.read(feed)
    b.read(feed)
    c.drain()
    assert c.state is not None and c.state.feed is not None and c.state.feed.startswith(FEED + ".3.")
    feed += [node(4, name="renamed"), 5]  # written after a died: only b reads it
    b.read(feed)
    b.m.publish(node(1, last_seen=5.0))  # (b's own write, before the feed echoes it)
    c = moved(c, b)
    (first,) = c.drain()
    assert first.type == "delta" and first.body["generation"] == b.m.generation
    assert {p["id"] for p in first.body.get("peers_changed", [])} == {4}
    assert first.body["peers_removed"] == [5] and first.body["self"]["last_seen"] == 5.0
    assert "*" in first.body["packet_filters"]  # (the filter is sent whole: b knows not what a sent)
    assert c.state is not None and c.state.netmap == b.m.netmap(1)
    assert c.state.netmap.derp_map == derp_map(902) and c.state.generation == b.m.generation
    b.m.publish(node(2, name="later"))  # the stream goes on from there
    c.drain()
    assert c.in_sync()


def test_client_ahead_of_the_replica_gets_a_full_netmap(
    pair: tuple[Replica, Replica, list[Node | int]],
) -> None:
    a, b, feed = pair
    c = Client(a.m, 1, accept=READS_DERP)
    feed.append(node(2, name="x"))
    b.read(feed)
    feed.append(node(3, name="y"))
    a.read(feed)  # a read one row more than b has
    c.drain()
    c = moved(c, b)
    assert [m.type for m in c.drain()] == ["netmap"]
    assert c.in_sync()


@pytest.mark.parametrize(
    "why", ["old client", "another feed", "no resume point", "policy change", "dns change"]
)
def test_what_cannot_resume_elsewhere_gets_a_full_netmap(
    pair: tuple[Replica, Replica, list[Node | int]], why: str
) -> None:
    a, b, feed = pair
    c = Client(a.m, 1, accept=READS_DERP)
    feed.append(node(2, name="x"))
    a.read(feed)
    b.read(feed)
    c.drain()
    assert c.state is not None
    accept: tuple[str, ...] = READS_DERP
    if why == "old client":  # (reads no DERP map in a delta: b's could not reach it)
        accept = ()
    elif why == "another feed":
        c.state = dataclasses.replace(c.state, feed="fedcba9876543210" + c.state.feed[len(FEED) :])  # type: ignore[index]
    elif why == "no resume point":
        c.state = dataclasses.replace(c.state, feed=None)
    elif why == "policy change":
        b.m.set_policy(Policy.parse('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'))
    elif why == "dns change":
        b.m.set_dns(DNSConfig(nameservers=("192.0.2.53",)), "ts.net")
    c = moved(c, b, accept)
    assert [m.type for m in c.drain()] == ["netmap"]
    assert c.in_sync()


def test_keys_expired_on_the_other_replicas_clock_are_sent_again(
    pair: tuple[Replica, Replica, list[Node | int]],
) -> None:
    a, b, feed = pair
    c = Client(a.m, 1, accept=READS_DERP)
    feed.append(node(5, name="x"))
    a.read(feed)
    c.drain()  # resume point: seq 1, read at a's time 1000
    b.now = 10_002.5
    b.m.publish(node(2, expired=True))  # b's clock passed node 2's expiry (10002) before it read the feed
    b.read(feed)  # (so the expiry is logged before the version b resumes from)
    c = moved(c, b)
    (first,) = c.drain()
    assert first.type == "delta" and 2 in {p["id"] for p in first.body["peers_changed"]}
    assert c.state is not None and c.state.netmap.peers[2].expired and c.in_sync()


def test_derp_map_change_is_a_delta_for_clients_that_read_it() -> None:
    m = Mapper(mkey(), "ts.net", derp_map=derp_map(901))
    m.load(node(i) for i in range(1, 4))
    new, old = Client(m, 1, accept=READS_DERP), Client(m, 2)
    new.drain()
    old.drain()
    assert m.set_derp_map(derp_map(902))
    (d,) = new.drain()
    assert d.type == "delta" and d.body["derp_map"]["Regions"]["900"]["Nodes"][0]["Name"] == "900-902"
    assert [x.type for x in old.drain()] == ["netmap"]
    assert new.in_sync() and old.in_sync()
    assert new.state is not None and new.state.netmap.derp_map == derp_map(902)


def test_resume_on_the_same_server_across_a_dns_change_gets_a_full_netmap() -> None:
    m = Mapper(mkey(), "ts.net")
    m.load(node(i) for i in range(1, 3))
    c = Client(m, 1)
    c.drain()
    assert c.state is not None
    m.close_stream(c.stream)
    m.set_dns(DNSConfig(nameservers=("192.0.2.53",)), "ts.net")
    again = Client(m, 1, c.state.resume)
    again.state = c.state
    assert [x.type for x in again.drain()] == ["netmap"]
    assert again.state is not None and again.state.netmap.dns == m.dns


def test_client_takes_a_resumed_delta_of_another_generation_only_with_a_resume_point() -> None:
    state = MapState(NetMap(node(1), {2: node(2)}, "ts.net"), "a" * 32, 7, FEED + ".3.1000")
    msg = MapMessage(
        b'{"type":"delta","generation":"%s","version":2,"feed":"%s.4.1001"}' % (b"b" * 32, FEED.encode())
    )
    out = apply_message(state, msg)
    assert (out.generation, out.version, out.feed) == ("b" * 32, 2, FEED + ".4.1001")
    assert out.netmap == state.netmap
    with pytest.raises(ControlError, match="no netmap"):
        apply_message(dataclasses.replace(state, feed=None), msg)


def test_reconnecting_is_no_change_for_peers() -> None:
    """A node that opens a stream records its last seen; while it is online peers are not sent that (a
    replica's nodes moving to another would otherwise be a change every peer gets, for each of them)."""
    m = Mapper(mkey(), "ts.net")
    m.load(node(i) for i in range(1, 3))
    c = Client(m, 2)
    assert m.publish(node(2, last_seen=100.0))  # online now: a change, without the last seen
    assert m.nodes[2].online and m.nodes[2].last_seen is None
    assert not m.publish(node(2, last_seen=200.0))  # a second stream opening (a move): nothing to send
    m.close_stream(c.stream)
    assert m.publish(node(2, last_seen=300.0))  # offline: peers see when it was last seen
    assert not m.nodes[2].online and m.nodes[2].last_seen == 300.0


@pytest.mark.parametrize(
    "point",
    [
        FEED + ".\u00b2.1000",  # (str.isdigit() says yes, int() says no)
        FEED + ".1.\u00b2",
        FEED + ".\u0661.1000",  # (an Arabic-Indic digit: not ASCII)
        FEED + ".-1.1000",
        FEED + ".1",
        FEED + ".1.1000.7",
        FEED.upper() + ".1.1000",
        FEED + "." + "9" * 40 + ".1000",
        FEED + ".1.1000\n",
        "",
        "...",
    ],
)
def test_garbage_resume_point_is_no_resume_point(
    pair: tuple[Replica, Replica, list[Node | int]], point: str
) -> None:
    _, b, feed = pair
    feed.append(node(2, name="x"))
    b.read(feed)
    assert parse_feed_point(point) is None
    assert b.m.resume_point(("0" * 32, 1, point), derp=True) is None
    assert b.m.resume_point(("0" * 32, 1, FEED + ".1.1000"), derp=True) is not None  # (the real form)
