"""The data plane's relay hooks: WireGuard between two Devices carried entirely by Python.

Two hosts on a LAN each run a tailpy Device (``python -m tailpy.lab.wgnode``) whose only peer has path
"relay". Their relay queues are bridged by one plain TCP connection (:mod:`tailpy.lab.relay`, standing in
for DERP): each side drains its queue when the device's eventfd is readable and sends length-prefixed
frames; the other side calls ``device.inject``. Ping must work through the tunnel while the UDP sockets
carry nothing.
"""

from __future__ import annotations

import base64

import pytest

from tailpy.lab import Host, Lab
from tailpy.lab.tunnels import TailpyNode, native_device_reason, wg_keypair
from tailpy.lab.wgnode import PeerArg

pytestmark = pytest.mark.lab

A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
WG_PORT, RELAY_PORT = 41641, 7000


@pytest.fixture(autouse=True)
def _needs_device() -> None:
    reason = native_device_reason()
    if reason:
        pytest.skip(reason)


def _ping(host: Host, address: str) -> None:
    host.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", address])


@pytest.mark.parametrize("endpoints", [False, True], ids=["no-endpoint", "endpoint-known-but-relay"])
def test_ping_over_relay_only(lab: Lab, endpoints: bool) -> None:
    a, b = lab.host("a"), lab.host("b")
    lan = lab.lan("lan", [a, b], subnet="192.0.2.0/24")
    (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
    a_ep = f"{lan.ip(a)}:{WG_PORT}" if endpoints else None
    b_ep = f"{lan.ip(b)}:{WG_PORT}" if endpoints else None
    node_a = TailpyNode.start(
        a,
        a_priv,
        address=f"{A_TUN}/32",
        listen_port=WG_PORT,
        peers=[PeerArg(base64.b64decode(b_pub), b_ep, [f"{B_TUN}/32"])],
        relay_listen=f"{lan.ip(a)}:{RELAY_PORT}",
    )
    node_b = TailpyNode.start(
        b,
        b_priv,
        address=f"{B_TUN}/32",
        listen_port=WG_PORT,
        peers=[PeerArg(base64.b64decode(a_pub), a_ep, [f"{A_TUN}/32"])],
        relay_connect=f"{lan.ip(a)}:{RELAY_PORT}",
    )

    _ping(a, B_TUN)
    _ping(b, A_TUN)

    for node in (node_a, node_b):
        stats = node.stats()
        (peer,) = stats["peers"]
        assert peer["path"] == "relay"
        assert peer["last_handshake"] is not None
        assert peer["tx_packets"] > 0 and peer["rx_packets"] > 0
        if not endpoints:
            assert peer["endpoint"] is None
        # Nothing went over the UDP socket: every WireGuard datagram took the relay.
        assert stats["device"]["tx_datagrams"] == 0
        assert stats["device"]["rx_datagrams"] == 0
        assert stats["relay"]["sent"] > 0 and stats["relay"]["received"] > 0
