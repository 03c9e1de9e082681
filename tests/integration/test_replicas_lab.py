"""Control replicas in the lab: two `tailpy control serve` processes on two hosts share one PostgreSQL
database (started here, on a unix socket the namespaces share); tailpyd nodes are given both URLs. A change on
one replica reaches a node streaming from the other; the replica of one node is killed (SIGKILL) while the
two nodes ping each other: the ping never stops and the node moves to the other replica."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _replicas import LabReplica, empty_database
from _replicas import pg_url as pg_url

pytestmark = pytest.mark.lab


def peer_names(node: LabNode) -> set[str]:
    return {p["name"] for p in node.status()["peers"]}


def streams_of(db: str, node_id: int) -> set[str]:
    """The replicas holding a map stream of ``node_id``, as the database records them."""
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("SELECT replica_id FROM node_streams WHERE node_id = %s", (node_id,)).fetchall()
    return {str(r[0]) for r in rows}


def test_nodes_keep_pinging_while_their_replica_is_killed(lab: Lab, pg_url: str) -> None:
    empty_database(pg_url)
    net = LabTailnet(lab)
    other = lab.host("control2")
    net.lan.attach(other)
    r1 = LabReplica(net, net.control_host, "c1", pg_url)
    r2 = LabReplica(net, other, "c2", pg_url)
    key = r1.control("authkey", "create", "--reusable").strip().splitlines()[-1]
    n1, n2 = net.add_node("n1"), net.add_node("n2")
    n1.cli("up", "--login-server", f"{r1.url},{r2.url}", "--hostname", "n1", "--auth-key", key)
    n2.cli("up", "--login-server", f"{r2.url},{r1.url}", "--hostname", "n2", "--auth-key", key)
    n1.wait_peers(1)
    n2.wait_peers(1)
    wait_for(lambda: n1.pings(n2.ip()), timeout=30, what="n1 to reach n2", interval=0.2)

    # a change on c1 (rename n1) reaches n2, which streams from c2
    r1.control("nodes", "rename", "n1", "first")
    wait_for(
        lambda: any(p["name"] == "first" for p in n2.status()["peers"]),
        timeout=15,
        what="n2 to see the rename",
    )
    addresses = n1.status()["self"]["addresses"]

    # ping n1 -> n2 throughout; kill c1, n1's replica
    ping = n1.host.popen(
        ["ping", "-i", "0.2", "-c", "75", "-W", "1", n2.ip()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(2)
    r1.proc.send_signal(signal.SIGKILL)
    r1.proc.wait()
    t0 = time.monotonic()
    n1_id = r2.nodes()["first"]["id"]
    wait_for(lambda: "c2" in streams_of(pg_url, n1_id), timeout=10, what="n1 to stream from c2", interval=0.2)
    moved = time.monotonic() - t0
    out, _ = ping.communicate(timeout=60)
    print(f"n1 streams from c2 {moved:.1f} s after c1 was killed")
    assert " 0% packet loss" in out, out
    assert r2.nodes()["first"]["online"]
    assert n1.status()["self"]["addresses"] == addresses
    # a change made on c2 after the kill reaches n1 too
    r2.control("nodes", "rename", "n2", "second")
    wait_for(
        lambda: any(p["name"] == "second" for p in n1.status()["peers"]),
        timeout=15,
        what="n1 to see the rename",
    )
