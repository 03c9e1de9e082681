"""The bare data plane with its TUN and UDP offloads, and with each fallback (:mod:`tailpy.lab.offloads`).

Hosts ``a`` and ``b`` share a veth pair and run ``python -m tailpy.lab.wgnode`` each; both run in the mode
under test. Traffic must flow both ways (ping, one iperf3 TCP stream each way, so that the TUN reads
super-packets and writes coalesced ones), and each node must report the mode's offload state and
fallback in ``Device.stats()["offload"]``.
"""

from __future__ import annotations

import json

import pytest

from tailpy.lab import Host, Lab, wait_for
from tailpy.lab.offloads import OFFLOAD_MODES, OffloadMode
from tailpy.lab.tailnet import LabTailnet
from tailpy.lab.tunnels import TUN_A, TUN_B, missing_tools, native_device_reason, start_tailpy_pair

pytestmark = pytest.mark.lab

MTU = 1420


def _iperf(client: Host, server: Host, address: str, lab: Lab) -> float:
    proc = server.popen(["iperf3", "-s", "-1", "-B", address])
    wait_for(
        lambda: "LISTEN" in server.run(["ss", "-Htln", "sport", "= :5201"], check=False).stdout,
        timeout=10,
        what="iperf3 server",
    )
    out = client.run(["iperf3", "-c", address, "-t", "2", "-J"], timeout=30).stdout
    lab.stop(proc)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


@pytest.mark.parametrize("mode", OFFLOAD_MODES, ids=lambda m: m.name)
def test_traffic_flows_and_mode_is_reported(
    lab: Lab, mode: OffloadMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = missing_tools("iperf3", "ping") or native_device_reason() or mode.missing_tool()
    if reason:
        pytest.skip(reason)
    for key, value in mode.env.items():
        monkeypatch.setenv(key, value)  # inherited by the wgnode processes
    a, b = lab.host("a"), lab.host("b")
    ip_a, ip_b = lab.link(a, b, subnet="198.51.100.0/30")
    mode.prepare(a)
    mode.prepare(b)
    pair = start_tailpy_pair(a, b, endpoint_a=ip_a, endpoint_b=ip_b, mtu=MTU)
    a.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", TUN_B])
    b.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", TUN_A])
    # Not a timing test: more than 1 Mbit/s each way means bulk traffic went through.
    assert _iperf(a, b, TUN_B, lab) > 1e6
    assert _iperf(b, a, TUN_A, lab) > 1e6
    for node in (pair.a, pair.b):
        device = node.stats()["device"]
        problem = mode.check(device["offload"])
        assert problem is None, f"{node.host.name}: {problem}"
        assert device["offload"]["tun_split_errors"] == 0
        assert device["dropped_decrypt"] == 0


@pytest.mark.parametrize("tun_offload", ["on", "0"])
def test_status_json_says_which_offloads_run(
    lab: Lab, tun_offload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tailpy status --json`` carries the device's offload state and fallbacks under ``device.offload``."""
    reason = native_device_reason()
    if reason:
        pytest.skip(reason)
    if tun_offload != "on":
        monkeypatch.setenv("TAILPY_TUN_OFFLOAD", tun_offload)  # inherited by tailpyd
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    a.ping(b.ip(), count=1)
    offload = a.status()["device"]["offload"]
    assert offload["udp_gso"] and offload["udp_gro"]
    if tun_offload == "on":
        assert offload["tun_vnet_hdr"] and offload["tun_tso"]
        assert offload["fallbacks"] == []
    else:
        assert not offload["tun_vnet_hdr"]
        assert any("TAILPY_TUN_OFFLOAD" in f for f in offload["fallbacks"])
