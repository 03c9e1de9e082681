"""tailpy's data plane against stock WireGuard: Debian's wireguard-go configured with wg(8).

Host A runs a bare tailpy Device (``python -m tailpy.lab.wgnode``), host B runs ``wireguard-go -f``; they
share a veth link. Each case lets one side initiate the handshake: the responder has no endpoint for the
initiator and learns it from the handshake, so the direction is forced. Each direction runs with tailpy's
offloads on and with each fallback of :mod:`tailpy.lab.offloads` (driven on host A, tailpy's side), and
tailpy must report the mode it ran in.
"""

from __future__ import annotations

import base64
import json

import pytest

from tailpy.lab import Host, Lab, wait_for
from tailpy.lab.offloads import OFFLOAD_MODES, OffloadMode
from tailpy.lab.tunnels import TailpyNode, WireguardGo, missing_tools, native_device_reason, wg_keypair
from tailpy.lab.wgnode import PeerArg

pytestmark = [pytest.mark.lab, pytest.mark.interop]

A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
A_PORT, B_PORT = 41641, 51820


@pytest.fixture(autouse=True)
def _needs_peers() -> None:
    reason = missing_tools("wireguard-go", "wg", "iperf3", "ping") or native_device_reason()
    if reason:
        pytest.skip(reason)


def _ping(host: Host, address: str) -> None:
    # A few tries: the first packet may wait for the handshake.
    host.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", address])


def _pair(lab: Lab, initiator: str, mode: OffloadMode) -> tuple[Host, Host, TailpyNode, WireguardGo]:
    a, b = lab.host("a"), lab.host("b")
    ip_a, ip_b = lab.link(a, b, subnet="198.51.100.0/30")
    mode.prepare(a)
    (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
    a_knows_b = f"{ip_b}:{B_PORT}" if initiator == "tailpy" else None
    b_knows_a = f"{ip_a}:{A_PORT}" if initiator == "wireguard-go" else None
    node = TailpyNode.start(
        a,
        a_priv,
        address=f"{A_TUN}/32",
        listen_port=A_PORT,
        peers=[PeerArg(base64.b64decode(b_pub), a_knows_b, [f"{B_TUN}/32"])],
    )
    assert node.public_key == a_pub
    wg = WireguardGo.start(
        b,
        b_priv,
        address=f"{B_TUN}/32",
        listen_port=B_PORT,
        peers=[PeerArg(base64.b64decode(a_pub), b_knows_a, [f"{A_TUN}/32"])],
    )
    assert wg.public_key == b_pub
    return a, b, node, wg


@pytest.mark.parametrize("mode", OFFLOAD_MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("initiator", ["tailpy", "wireguard-go"])
def test_handshake_ping_and_iperf(
    lab: Lab, initiator: str, mode: OffloadMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = mode.missing_tool()
    if reason:
        pytest.skip(reason)
    for key, value in mode.env.items():
        monkeypatch.setenv(key, value)  # inherited by the wgnode process
    a, b, node, wg = _pair(lab, initiator, mode)
    if initiator == "tailpy":
        _ping(a, B_TUN)
        _ping(b, A_TUN)
    else:
        _ping(b, A_TUN)
        _ping(a, B_TUN)

    assert wg.latest_handshakes()[node.public_key] > 0
    peer = node.stats()["peers"][0]
    assert peer["last_handshake"] is not None and peer["last_handshake"] > 0
    assert peer["rx_packets"] > 0 and peer["tx_packets"] > 0
    if initiator == "wireguard-go":  # tailpy learned the endpoint from the handshake
        assert peer["endpoint"] is not None and peer["endpoint"].endswith(f":{B_PORT}")

    server = b.popen(["iperf3", "-s", "-1", "-B", B_TUN])
    wait_for(
        lambda: "LISTEN" in b.run(["ss", "-Htln", "sport", "= :5201"], check=False).stdout,
        timeout=10,
        what="iperf3 server",
    )
    out = a.run(["iperf3", "-c", B_TUN, "-t", "2", "-J"], timeout=30).stdout
    lab.stop(server)
    bits_per_second = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    assert (
        bits_per_second > 1e6
    )  # non-trivial: more than 1 Mbit/s went through the tunnel (not a timing test)
    device = node.stats()["device"]
    problem = mode.check(device["offload"])
    assert problem is None, problem
    assert device["dropped_decrypt"] == 0
