"""Status that tells the truth: a peer control says is offline shows offline at once (whatever its last
handshake), "direct" only for an endpoint that answered, `tailpy ping` to an offline or expired peer says so
at once, and control's map stream connections notice a vanished node (TCP keepalive, user timeout)."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from test_ipnstate import FakeDevice, backend, node

from tailpy import netmap as nm
from tailpy.cli.status import peer_state
from tailpy.control.server import STREAM_USER_TIMEOUT, set_stream_keepalive
from tailpy.daemon.backend import Backend
from tailpy.daemon.state import StateStore
from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError
from tailpy.ipnstate import PeerStatus


def _peer(b: Backend, name: str) -> PeerStatus:
    return next(p for p in b.status().peers if p.name == name)


async def test_offline_peer_shows_offline_despite_a_recent_handshake(tmp_path: Path) -> None:
    b = await backend(tmp_path)
    try:
        p = dataclasses.replace(_peer(b, "n2"), online=False, last_seen=time.time() - 5, active=True)
        assert peer_state(p, time.time()).startswith("offline, last seen")
        # and through the backend: control's delta marks n2 offline; its handshake is 'recent'
        assert b.netmap is not None
        n2 = dataclasses.replace(b.netmap.peers[2], online=False, last_seen=time.time())
        b.apply_netmap(b.netmap.with_peers([n2, *(p for i, p in b.netmap.peers.items() if i != 2)]))
        assert peer_state(_peer(b, "n2"), time.time()).startswith("offline")
    finally:
        await b.close()


class HandshakenDevice(FakeDevice):
    """Peer 3 (no disco) sent to directly and answered: a handshake a few seconds ago."""

    def peers(self) -> list[dict[str, Any]]:
        out = super().peers()
        out[1] = {**out[1], "last_handshake": time.time() - 3}
        return out


async def test_direct_only_for_an_endpoint_that_answered(tmp_path: Path) -> None:
    b = await backend(tmp_path)  # peer n3: sent to directly at its netmap endpoint, never answered
    try:
        p = _peer(b, "n3")
        assert p.path is None and p.endpoint is None
        assert "no path yet" in peer_state(dataclasses.replace(p, online=True), time.time())
    finally:
        await b.close()
    b = Backend(b.store, HandshakenDevice, configure_os=False)
    await b.start()
    try:
        b.state_data.node_id = 1
        peer3 = node(3, online=True, endpoints=(Endpoint.parse("[2001:db8::3]:41641"),))
        b.apply_netmap(nm.NetMap(node(1), {3: peer3}, "tail.example"))
        p = _peer(b, "n3")
        assert p.path == "direct" and str(p.endpoint) == "[2001:db8::3]:41641"
        assert "direct [2001:db8::3]:41641" in peer_state(p, time.time())
    finally:
        await b.close()


async def test_disco_peer_is_direct_only_after_a_pong(tmp_path: Path) -> None:
    b = await backend(tmp_path)
    try:
        assert b.conn is not None
        key = b.netmap.peers[2].node_key if b.netmap else None
        assert key is not None
        assert not b.conn.direct_confirmed(key, {"path": "direct", "last_handshake": time.time()})
    finally:
        await b.close()


@pytest.mark.parametrize(
    ("peer", "sentence"),
    [
        (node(5, online=False, last_seen=1_700_000_000.0), "n5: peer is offline"),
        (node(6, online=True, expired=True), "n6: peer's key has expired"),
    ],
)
async def test_ping_says_offline_or_expired_at_once(tmp_path: Path, peer: nm.Node, sentence: str) -> None:
    b = await backend(tmp_path)
    try:
        assert b.netmap is not None
        b.apply_netmap(b.netmap.with_peers([*b.netmap.peers.values(), peer]))
        with pytest.raises(ConfigError, match=sentence):
            await b.ping(peer.name, timeout=5.0)
        with pytest.raises(ConfigError, match=sentence):
            await b.ping(peer.ipv4 or "", timeout=5.0)
    finally:
        await b.close()


def test_map_stream_socket_notices_a_vanished_peer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        set_stream_keepalive(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            got = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert got == int(STREAM_USER_TIMEOUT * 1000)
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) <= 15


class UnansweredDevice(FakeDevice):
    """Peer 3: initiations keep going out (three more at each look), no handshake ever completes."""

    sent = 0

    def peers(self) -> list[dict[str, Any]]:
        out = super().peers()
        UnansweredDevice.sent += 3
        out[1] = {**out[1], "handshakes_sent": UnansweredDevice.sent, "last_handshake": None}
        return out


async def test_backend_warns_of_failing_handshakes_from_the_data_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tailpy.daemon import health

    monkeypatch.setattr(health, "HANDSHAKE_FAIL_AFTER", 0.0)
    b = Backend(StateStore(tmp_path), UnansweredDevice, configure_os=False)
    await b.start()
    try:
        b.state_data.node_id = 1
        b.apply_netmap(nm.NetMap(node(1), {3: node(3, online=True)}, "tail.example"))
        b.check_health()
        b.check_health()
        (w,) = [w for w in b.status().health if w.name == "handshake-failing"]
        assert "peer n3" in w.text and w.severity == "medium"
        # the same peer offline (as control says): no handshake warning, its row says offline
        b.apply_netmap(nm.NetMap(node(1), {3: node(3, online=False)}, "tail.example"))
        assert not [w for w in b.status().health if w.name == "handshake-failing"]
    finally:
        await b.close()
