"""Control replicas' embedded relays as one DERP region, in the lab: two `tailpy control serve` processes on
two hosts share one PostgreSQL database (started here) and each runs its relay and STUN server; two tailpyd
nodes, one streaming from each replica, with UDP between them dropped, so every packet goes through DERP.
Each node homes on its own replica's relay (first in the DERP map it gets), so their pings cross the mesh of
the two relays; then the first node's replica is killed (SIGKILL): the node moves to the other replica and
its relay, and the pings go on."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _replicas import LabReplica, empty_database
from _replicas import pg_url as pg_url

pytestmark = pytest.mark.lab


def _home(node: LabNode) -> dict[str, Any] | None:
    """The node's connected home DERP connection (status ``derp.connections``), None while it has none."""
    for c in node.status()["derp"]["connections"]:
        if c["home"] and c["connected"]:
            return dict(c)
    return None


def _diagnose(*nodes: LabNode) -> str:
    return "\n".join(
        f"{n.name}: derp={json.dumps(n.status()['derp'])}\n{n.name} log: {n.log_tail(15)}" for n in nodes
    )


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) is not installed")
def test_relayed_nodes_on_two_replicas_ping_through_the_mesh(lab: Lab, pg_url: str) -> None:
    empty_database(pg_url)
    net = LabTailnet(lab)
    other = lab.host("control2")
    net.lan.attach(other)
    r1 = LabReplica(net, net.control_host, "c1", pg_url, relay=True)
    r2 = LabReplica(net, other, "c2", pg_url, relay=True)
    wait_for(
        lambda: (
            "watching its connections" in r1.log.read_text()
            and "watching its connections" in r2.log.read_text()
        ),
        timeout=30,
        what="the replicas' relays to mesh",
    )
    key = r1.control("authkey", "create", "--reusable").strip().splitlines()[-1]
    n1, n2 = net.add_node("n1"), net.add_node("n2")
    with lab.block_udp(n1.host, n2.host):
        n1.cli("up", "--login-server", f"{r1.url},{r2.url}", "--hostname", "n1", "--auth-key", key)
        n2.cli("up", "--login-server", f"{r2.url},{r1.url}", "--hostname", "n2", "--auth-key", key)
        n1.wait_peers(1)
        n2.wait_peers(1)
        for node, relay in ((n1, r1.derp_url), (n2, r2.derp_url)):

            def homed(node: LabNode = node, relay: str = relay) -> bool:
                h = _home(node)
                return h is not None and h["region_id"] == 900 and h["url"] == relay

            wait_for(homed, timeout=60, what=f"{node.name} homed on its replica's relay", interval=0.5)
        try:
            wait_for(lambda: n1.pings(n2.ip()), timeout=90, what="n1 to reach n2 through DERP", interval=0.5)
        except Exception as e:
            raise AssertionError(f"{e}: {_diagnose(n1, n2)}") from None
        n2.ping(n1.ip(), count=3)
        for node in (n1, n2):
            (peer,) = node.status()["peers"]
            assert peer["path"] == "relay" and peer["relay_region"] == 900, peer

        # n1's replica (and its relay) dies: n1 moves to c2 and its relay, and reaches n2 again
        r1.proc.send_signal(signal.SIGKILL)
        r1.proc.wait()
        t0 = time.monotonic()
        try:
            wait_for(lambda: n1.pings(n2.ip()), timeout=60, what="n1 to reach n2 again", interval=0.2)
        except Exception as e:
            raise AssertionError(f"{e}: {_diagnose(n1, n2)}") from None
        again = time.monotonic() - t0
        try:
            wait_for(
                lambda: (h := _home(n1)) is not None and h["url"] == r2.derp_url,
                timeout=30,
                what="n1 homed on the live relay",
            )
        except Exception as e:
            raise AssertionError(f"{e}: {_diagnose(n1, n2)}") from None
        n2.ping(n1.ip(), count=3)
        (peer,) = n1.status()["peers"]
        assert peer["path"] == "relay", peer
        print(f"n1 reached n2 through DERP again {again:.1f} s after its replica was killed")
