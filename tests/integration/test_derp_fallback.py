"""Relay fallback through DERP: two nodes on one LAN with UDP between them dropped by nftables in each
node's namespace still ping both ways and carry TCP, through the control server's embedded DERP relay
(region 900 "tailpy"), and ``tailpy status`` says ``relay "tailpy"``. Also: both nodes report their home DERP
region to control, and peers see it in their netmaps."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import pytest

from tailpy.errors import LabError
from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = pytest.mark.lab

ECHO_PORT = 5001
PAYLOAD = 1 << 20  # bytes carried through the tunnel and back

# A TCP echo server on the node's tailnet address: reads everything, sends it back, once.
_ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
c, _ = s.accept()
data = b""
while len(data) < int(sys.argv[3]):
    chunk = c.recv(65536)
    if not chunk:
        break
    data += chunk
c.sendall(data); c.close()
"""

# Send PAYLOAD random bytes, read them back, print the SHA-256 of what was sent and of what came back.
_ECHO_CLIENT = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(data)
got = b""
while len(got) < len(data):
    chunk = c.recv(65536)
    if not chunk:
        break
    got += chunk
print(hashlib.sha256(data).hexdigest(), hashlib.sha256(got).hexdigest())
"""


def _diagnose(*nodes: LabNode) -> str:
    out = []
    for n in nodes:
        st = n.status()
        out.append(
            f"{n.name}: derp={json.dumps(st['derp'])} peers={json.dumps(st['peers'])} device={st['device']}"
        )
        out.append(f"{n.name} log: {n.log_tail(15)}")
    return "\n".join(out)


def _peer(st: dict[str, Any], name: str) -> dict[str, Any]:
    peers = st["peers"]
    assert isinstance(peers, list)
    return next(p for p in peers if p["name"] == name)


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) is not installed")
def test_udp_blocked_nodes_talk_through_the_relay(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()  # with the embedded relay (default), reachable at the LAN address
    a, b = net.connected("a", "b")
    with lab.block_udp(a.host, b.host):
        # Both nodes found their home region and control passed it on to the other.
        for node, other in ((a, b), (b, a)):

            def homed(node: LabNode = node, other: LabNode = other) -> bool:
                st = node.status()
                return bool(st["self"]["home_derp"] == 900 and _peer(st, other.name)["home_derp"] == 900)

            wait_for(homed, timeout=60, what=f"{node.name} to see both homes in region 900", interval=0.5)

        # The first packets go direct and are dropped; after ~5 s without a handshake the peer is relayed.
        try:
            wait_for(lambda: a.pings(b.ip()), timeout=90, what="a to ping b through the relay", interval=0.5)
        except LabError as e:
            raise AssertionError(f"{e}: {_diagnose(a, b)}") from None
        a.ping(b.ip(), count=3)
        b.ping(a.ip(), count=3)
        b.ping(a.ip6(), count=2)

        server = b.host.popen([sys.executable, "-c", _ECHO_SERVER, b.ip(), str(ECHO_PORT), str(PAYLOAD)])
        try:
            wait_for(
                lambda: b.host.run(["ss", "-ltn", f"sport = :{ECHO_PORT}"], check=False).stdout.count(
                    "LISTEN"
                ),
                timeout=20,
                what="the echo server to listen",
            )
            out = a.host.run(
                [sys.executable, "-c", _ECHO_CLIENT, b.ip(), str(ECHO_PORT), str(PAYLOAD)], timeout=120
            ).stdout.split()
            assert len(out) == 2 and out[0] == out[1], out
        finally:
            server.kill()
            server.wait()

        for node, other in ((a, b), (b, a)):
            st = node.status()
            p = _peer(st, other.name)
            assert p["path"] == "relay" and p["relay_region"] == 900 and p["relay_region_code"] == "tailpy", p
            assert p["last_handshake"] is not None and p["rx_bytes"] > 0, p
            derp = st["derp"]
            assert derp["relay_sent"] > 0 and derp["derp_received"] > 0, derp
            assert any(c["home"] and c["connected"] for c in derp["connections"]), derp
            table = node.cli("status")
            row = next(line for line in table.splitlines() if f" {other.name} " in line)
            assert 'relay "tailpy"' in row, table
            me = next(line for line in table.splitlines() if f" {node.name} " in line)
            assert 'home DERP "tailpy"' in me, table
