"""Bad input at a running node's real UDP port: garbage of every length and a handshake from a stranger.
The node counts and drops it, and its tunnel keeps working."""

from __future__ import annotations

import sys

import pytest

from tailpy.keys import NodePrivate, NodePublic
from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import WG_PORT, LabTailnet
from tailpy.lab.tunnels import TailpyNode
from tailpy.lab.wgnode import PeerArg

pytestmark = pytest.mark.lab

# Sends, from one UDP socket, a datagram of every length 0..1500: random bytes, then the same lengths behind
# each WireGuard message header (types 1-4 with the three zero bytes), which must not crash the parser.
# Paced (a pause every 50 datagrams) so the kernel's socket buffer never overflows: every datagram must
# reach the device to be counted.
_GARBAGE = """
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2]))
n = 0
def send(d):
    global n
    s.sendto(d, dst); n += 1
    if n % 50 == 0:
        time.sleep(0.005)
for length in range(0, 1501):
    send(os.urandom(length))
for t in (1, 2, 3, 4):
    for length in range(4, 1501, 7):
        send(bytes([t, 0, 0, 0]) + os.urandom(length - 4))
print(n)
"""


def _device(node_status: dict[str, object]) -> dict[str, int]:
    dev = node_status["device"]
    assert isinstance(dev, dict)
    return dev


def test_garbage_and_unknown_handshake_are_counted_and_dropped(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    b.ping(a.ip(), count=1)
    before = _device(a.status())

    attacker = lab.host("attacker")
    net.lan.attach(attacker)
    target = net.lan.ip(a.host)
    sent = int(attacker.run([sys.executable, "-c", _GARBAGE, target, str(WG_PORT)]).stdout)

    # A stranger with a real WireGuard key who knows a's node key starts a handshake: a has no such peer.
    a_key = NodePublic.from_text(a.status()["self"]["node_key"])
    stranger = NodePrivate.generate()
    TailpyNode.start(
        attacker,
        stranger.base64(),
        address="100.127.0.9/32",
        peers=[PeerArg(a_key.raw, f"{target}:{WG_PORT}", [a.ip() + "/32"])],
    )
    attacker.run(["ping", "-c", "1", "-W", "1", a.ip()], check=False)

    def dropped() -> dict[str, int] | None:
        d = _device(a.status())
        seen = sum(d[k] - before[k] for k in ("dropped_malformed", "dropped_unknown_peer", "dropped_decrypt"))
        return d if seen >= sent and d["dropped_unknown_peer"] > before["dropped_unknown_peer"] else None

    after = wait_for(dropped, timeout=20, what="a to count every bad datagram")
    assert after["rx_datagrams"] - before["rx_datagrams"] >= sent
    # The tunnel still works both ways, and the stranger never became a peer.
    b.ping(a.ip(), count=2)
    a.ping(b.ip(), count=2)
    assert [p["name"] for p in a.status()["peers"]] == ["b"]
    assert stranger.public.text() not in str(a.status())
