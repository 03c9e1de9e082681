"""Status that tells the truth on real processes: a peer whose daemon crashed shows offline at once (not
"active" for the 180 s its last handshake stays fresh), a peer whose host vanished without a FIN (its link
cut) goes offline once control's map stream connection times out, and `tailpy ping` to an offline or expired
peer says so at once."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


@pytest.fixture
def pair(lab: Lab) -> tuple[LabTailnet, LabNode, LabNode]:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    a.ping(b.ip(), count=2)  # traffic: a fresh handshake, so b is "active" on a
    return net, a, b


def _peer(node: LabNode) -> dict[str, Any]:
    (p,) = node.status()["peers"]
    assert isinstance(p, dict)
    return p


def _ping(node: LabNode, target: str) -> tuple[int, str]:
    done = node.host.run(tailpy_argv("ping", target, "--socket", node.socket), check=False, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_crashed_peer_is_offline_at_once(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    _, a, b = pair
    assert _peer(a)["active"]
    b.daemon.send_signal(signal.SIGKILL)  # no goodbye: control sees the stream's connection reset
    b.daemon.wait(timeout=10)
    b.daemon = None
    wait_for(lambda: not _peer(a)["online"], timeout=20, what="control to mark b offline")
    line = next(x for x in a.cli("status").splitlines() if " b " in x)
    assert "offline, last seen" in line and "active" not in line, line
    code, out = _ping(a, "b")
    assert code == 1 and "b: peer is offline" in out and "timeout" not in out, out


def test_vanished_peer_goes_offline_without_a_fin(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    _, a, b = pair
    iface = next(iter(b.host.addresses))
    b.host.run(["ip", "link", "set", "dev", iface, "down"])  # as a power cut: nothing more leaves b
    # control's keepalive lines go unacknowledged; TCP_USER_TIMEOUT ends the stream (TCP alone: ~15 min)
    wait_for(lambda: not _peer(a)["online"], timeout=120, what="control to notice b vanished", interval=1)
    code, out = _ping(a, "b")
    assert code == 1 and "peer is offline" in out, out


def test_ping_to_an_expired_peer_says_so(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    net, a, b = pair
    net.control("nodes", "expire", str(b.status()["self"]["id"]))
    wait_for(lambda: _peer(a)["expired"], timeout=20, what="a to see b expired")
    code, out = _ping(a, "b")
    assert code == 1 and "b: peer's key has expired" in out and "no peer" not in out, out
    code, out = _ping(a, b.ip())
    assert code == 1 and "peer's key has expired" in out, out
