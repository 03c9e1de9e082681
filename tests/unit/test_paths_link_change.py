"""Path selection when a network changes (tailpy.magicsock.paths): our own address went away
(:meth:`PeerPaths.revalidate`), or the peer's CallMeMaybe no longer lists the endpoint in use; and the link
monitor (tailpy.magicsock.linkmon) calling back once per change of its snapshot. Fake clock for the paths."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

from tailpy.keys import NodePrivate
from tailpy.magicsock.linkmon import LinkMonitor
from tailpy.magicsock.paths import LocalInfo, PeerPaths, Send, SetPath
from tailpy.proto.disco import CallMeMaybe, Endpoint, Ping, Pong

OLD, NEW = Endpoint.parse("192.0.2.7:41641"), Endpoint.parse("192.0.2.7:50000")
ME = Endpoint.parse("203.0.113.1:41641")


def _txids() -> Iterator[bytes]:
    for i in itertools.count(1):
        yield i.to_bytes(12, "big")


def _peer() -> PeerPaths:
    it = _txids()
    local = LocalInfo(NodePrivate.generate().public, (ME,))
    return PeerPaths(NodePrivate.generate().public, local, [OLD], txid=lambda: next(it))


def _pings(p: PeerPaths, to: Endpoint) -> list[bytes]:
    return [
        a.message.txid
        for a in p.drain()
        if isinstance(a, Send) and a.to == to and isinstance(a.message, Ping)
    ]


def _direct_on_old(p: PeerPaths, now: float) -> None:
    p.note_activity(now)
    p.poll(now)
    txid = _pings(p, OLD)[0]
    assert p.on_pong(Pong(txid, ME), OLD, now + 0.01)
    assert p.path == OLD and SetPath(p.node_key, OLD) in p.drain()


def test_revalidate_keeps_a_path_that_answers_and_drops_one_that_does_not() -> None:
    p = _peer()
    _direct_on_old(p, 0.0)
    # An address of ours went away: the path is pinged at once and trusted 1.5 s more at most.
    p.revalidate(1.0, 1.5)
    txid = _pings(p, OLD)[0]
    assert p.on_pong(Pong(txid, ME), OLD, 1.02)  # it still answers: trusted for the usual time again
    p.note_activity(3.0)
    p.poll(3.0)
    assert p.path == OLD
    p.drain()
    # Again, and this time nothing answers: relay once the grace runs out, long before 6.5 s.
    p.revalidate(4.0, 1.5)
    assert _pings(p, OLD)
    p.poll(5.6)
    assert p.path is None and SetPath(p.node_key, None) in p.drain()


def test_revalidate_without_a_direct_path_does_nothing() -> None:
    p = _peer()
    p.revalidate(1.0, 1.5)
    assert p.drain() == [] and p.path is None


def test_call_me_maybe_dropping_the_endpoint_in_use_moves_to_the_listed_one() -> None:
    p = _peer()
    p.note_activity(0.0)
    p.on_call_me_maybe(CallMeMaybe((OLD,)), 0.0)  # pings OLD at once
    txid = _pings(p, OLD)[0]
    assert p.on_pong(Pong(txid, ME), OLD, 0.01) and p.path == OLD
    p.drain()
    # The peer roamed: its new CallMeMaybe lists NEW only. Both are pinged at once.
    p.on_call_me_maybe(CallMeMaybe((NEW,)), 1.0)
    sent = p.drain()
    to_new = [
        a.message.txid for a in sent if isinstance(a, Send) and a.to == NEW and isinstance(a.message, Ping)
    ]
    assert to_new
    # NEW answers (no faster than OLD did): it takes over at once, the old path is not kept.
    assert p.on_pong(Pong(to_new[0], ME), NEW, 1.05)
    assert p.path == NEW and SetPath(p.node_key, NEW) in p.drain()


def test_call_me_maybe_still_listing_the_endpoint_keeps_it() -> None:
    p = _peer()
    p.note_activity(0.0)
    p.on_call_me_maybe(CallMeMaybe((OLD,)), 0.0)  # pings OLD at once
    txid = _pings(p, OLD)[0]
    assert p.on_pong(Pong(txid, ME), OLD, 0.01) and p.path == OLD
    p.drain()
    p.on_call_me_maybe(CallMeMaybe((OLD, NEW)), 1.0)
    to_new = _pings(p, NEW)
    assert p.on_pong(Pong(to_new[0], ME), NEW, 1.05)
    assert p.path == OLD  # equally fast: the path in use stays
    p.poll(3.0)
    assert p.path == OLD


async def test_link_monitor_calls_back_once_per_change() -> None:
    state = {"eps": ("192.0.2.1:41641",)}
    seen: list[tuple[object, object]] = []
    mon = LinkMonitor(lambda: state["eps"], lambda old, new: seen.append((old, new)), poll_interval=0.05)
    mon.start()
    try:
        await asyncio.sleep(0.2)
        assert seen == []
        state["eps"] = ("192.0.2.9:41641",)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert seen == [(("192.0.2.1:41641",), ("192.0.2.9:41641",))] and mon.changes == 1
    finally:
        await mon.close()


def _pair_keys() -> tuple[PeerPaths, PeerPaths]:
    """Two path machines for the same pair of nodes seen from each side (low key's view, high key's view)."""
    k1, k2 = NodePrivate.generate().public, NodePrivate.generate().public
    low, high = sorted((k1, k2), key=lambda k: k.raw)
    it = _txids()
    mine = PeerPaths(high, LocalInfo(low, (ME,)), [OLD], txid=lambda: next(it))
    theirs = PeerPaths(low, LocalInfo(high, (ME,)), [OLD], txid=lambda: next(it))
    return mine, theirs


def test_new_endpoints_of_an_active_peer_are_pinged_without_waiting_for_the_heartbeat() -> None:
    low_side, high_side = _pair_keys()
    for p in (low_side, high_side):
        p.note_activity(0.0)
        p.poll(0.0)  # first round: OLD pinged; no answer
        p.drain()
        p.poll(0.1)
        p.drain()
    # Both learn NEW (the other's STUN-mapped endpoint) at the same instant, 1 s in: the next heartbeat is
    # at 3 s, but the low-key side pings NEW at once and the high-key side DISCOVERY_RETRY (0.5 s) later.
    for p in (low_side, high_side):
        p.set_endpoints([OLD, NEW])
        p.poll(1.0)
    assert _pings(low_side, NEW) and not _pings(high_side, NEW)
    nt = high_side.next_timer()
    assert nt is not None and nt <= 1.5
    high_side.poll(1.5)
    assert _pings(high_side, NEW)
    # An unanswered first Ping is retried once, 0.5 s later (the crossing case), then waits for the round.
    low_side.poll(1.5)
    assert _pings(low_side, NEW)
    low_side.poll(2.0)
    assert not _pings(low_side, NEW)
