"""Metrics in a lab tailnet: two nodes and control (with its embedded DERP relay) on one LAN. Node a's
per-peer byte counters grow as pings and a TCP transfer cross the tunnel and its path is reported (direct,
then relay once UDP between the nodes is dropped); control's /metrics shows both nodes online and their
map streams, and refuses a scrape from a node (not loopback) with the sentence naming --metrics-listen; the
relay's /metrics counts the packets it relays. Every exposition is parsed with prometheus-client's
parser."""

from __future__ import annotations

import shutil
import sys

import pytest

from _metrics import Samples, samples
from tailpy.control.service import DERP_PORT
from tailpy.lab import Lab, wait_for
from tailpy.lab.netns import Host
from tailpy.lab.tailnet import CONTROL_PORT, LabNode, LabTailnet

pytestmark = [pytest.mark.lab, pytest.mark.xdist_group("metrics")]

NODE_METRICS = "127.0.0.1:9101"

# GET argv[1]; print the status line's code, then the body.
_FETCH = """
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""

# Send argv[3] bytes to argv[1]:argv[2] and wait for the server to close.
_SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(bytes(int(sys.argv[3]))); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""
# Accept one connection on argv[1]:argv[2] and read it to its end.
_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
c, _ = s.accept()
while c.recv(65536):
    pass
c.close()
"""


def fetch(host: Host, url: str) -> tuple[int, str]:
    out = host.run([sys.executable, "-c", _FETCH, url], timeout=30).stdout
    code, _, body = out.partition("\n")
    return int(code), body


def node_metrics(node: LabNode) -> Samples:
    return samples(node.cli("metrics"))


def peer(name: str, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"peer": name, **labels}.items()))


def transfer(src: LabNode, dst: LabNode, nbytes: int, port: int = 5002) -> None:
    sink = dst.host.popen([sys.executable, "-c", _SINK, dst.ip(), str(port)])
    try:
        wait_for(
            lambda: "LISTEN" in dst.host.run(["ss", "-ltn", f"sport = :{port}"], check=False).stdout,
            timeout=20,
            what="the sink to listen",
        )
        src.host.run([sys.executable, "-c", _SEND, dst.ip(), str(port), str(nbytes)], timeout=60)
    finally:
        sink.kill()
        sink.wait()


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) is not installed")
def test_counters_move_as_traffic_flows(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a = net.add_node("a", ("--metrics-listen", NODE_METRICS))
    b = net.add_node("b")
    key = net.authkey(reusable=True)
    for n in (a, b):
        n.up(key)
    for n in (a, b):
        n.wait_peers(1)

    # control: both nodes online, two map streams; served to loopback, refused to a node
    local_control = f"http://127.0.0.1:{CONTROL_PORT}/metrics"
    code, text = fetch(net.control_host, local_control)
    assert code == 200, text
    ctl = samples(text)
    assert ctl[("tailpy_control_nodes", (("state", "online"),))] == 2, text
    assert ctl[("tailpy_control_map_streams", ())] == 2
    assert ctl[("tailpy_control_registrations_total", ())] == 2
    code, text = fetch(a.host, net.control_url + "/metrics")
    assert code == 403 and "--metrics-listen" in text, (code, text)

    # node a: bytes to and from b grow with a ping and a TCP transfer; the path is direct
    before = node_metrics(a)
    a.ping(b.ip(), count=5)
    transfer(a, b, 256 << 10)
    after = node_metrics(a)
    sent = ("tailpy_node_peer_sent_bytes_total", peer("b"))
    received = ("tailpy_node_peer_received_bytes_total", peer("b"))
    assert after[sent] >= before.get(sent, 0) + (256 << 10), (before.get(sent), after[sent])
    assert after[received] > before.get(received, 0)
    assert after[("tailpy_node_peer_path", peer("b", path="direct"))] == 1
    assert after[("tailpy_node_peer_handshake_age_seconds", peer("b"))] >= 0
    assert after[("tailpy_node_derp_connections", ())] >= 1
    # the same exposition on --metrics-listen
    code, text = fetch(a.host, f"http://{NODE_METRICS}/metrics")
    assert code == 200 and ("tailpy_node_peer_path", peer("b", path="direct")) in samples(text)

    # relay: with UDP between the nodes dropped, their packets go through the embedded relay
    relay_url = f"http://127.0.0.1:{DERP_PORT}/metrics"
    relayed_before = samples(fetch(net.control_host, relay_url)[1])[("tailpy_derp_packets_relayed_total", ())]
    with lab.block_udp(a.host, b.host):

        def relayed() -> bool:
            a.pings(b.ip())
            return node_metrics(a).get(("tailpy_node_peer_path", peer("b", path="relay"))) == 1

        wait_for(relayed, timeout=90, what="a's path to b to be the relay", interval=0.5)
        a.ping(b.ip(), count=3)
        code, text = fetch(net.control_host, relay_url)
        assert code == 200
        relay = samples(text)
        assert relay[("tailpy_derp_clients", ())] >= 2
        assert relay[("tailpy_derp_packets_relayed_total", ())] > relayed_before
        assert relay[("tailpy_derp_relayed_bytes_total", ())] > 0
        assert node_metrics(a)[("tailpy_node_derp_sent_packets_total", ())] > 0
        # control's own exposition carries its embedded relay's too
        ctl = samples(fetch(net.control_host, local_control)[1])
        assert (
            ctl[("tailpy_derp_packets_relayed_total", ())] >= relay[("tailpy_derp_packets_relayed_total", ())]
        )
