"""Node keys in a real tailnet: expiry, rotation with proof of the old key, logout and login again (one node
record per machine key), with real nodes, `tailpy control` admin commands and WireGuard between them."""

from __future__ import annotations

import re
import subprocess

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


def _peer(node: LabNode, name: str) -> dict[str, object]:
    return next(p for p in node.status()["peers"] if p["name"] == name)


def _never_expire(net: LabTailnet, node: LabNode) -> None:
    net.control("nodes", "expiry", str(node.status()["self"]["id"]), "--disable")


def test_expired_key_drops_the_node_until_it_logs_in_again(lab: Lab) -> None:
    """N's key expires while P pings it; P marks N expired and drops it from WireGuard; N needs login;
    after re-authentication N has the same address and name."""
    net = LabTailnet(lab)
    net.start_control("--key-expiry", "20s")
    key = net.authkey()
    p = net.add_node("p")
    n = net.add_node("n", ("--rotate-before", "0"))  # N does not rotate: its key must expire
    p.up(key)
    _never_expire(net, p)
    n.up(key)
    p.wait_peers(1)
    before = n.status()["self"]
    p.ping(n.ip(), count=1)

    wait_for(lambda: _peer(p, "n")["expired"], timeout=60, what="p to see n's key expired")
    gone = _peer(p, "n")
    assert gone["endpoint"] is None and gone["last_handshake"] is None  # no longer a WireGuard peer
    assert "expired" in p.cli("status")
    lost = p.host.run(["ping", "-c", "2", "-W", "1", n.ip()], check=False)
    assert lost.returncode != 0
    wait_for(lambda: n.status()["backend_state"] == "NeedsLogin", timeout=30, what="n to need login")
    refused = n.host.run(tailpy_argv("up", "--socket", n.socket), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr

    after = n.up(net.authkey(reusable=False))["self"]
    assert after["node_key"] != before["node_key"]  # the expired key never comes back
    assert (after["id"], after["name"], after["addresses"]) == (
        before["id"],
        before["name"],
        before["addresses"],
    )
    wait_for(lambda: not _peer(p, "n")["expired"], timeout=30, what="p to see n logged in again")
    p.ping(n.ip(), count=2)


def test_rotation_replaces_the_node_key_without_breaking_traffic(lab: Lab) -> None:
    """The daemon rotates its node key before expiry, proving the old one; peers switch to the new key and
    a ping running across the rotation keeps getting answers."""
    net = LabTailnet(lab)
    net.start_control("--key-expiry", "20s")  # a rotates 10 s before expiry (half the lifetime)
    key = net.authkey()
    a, b = net.add_node("a"), net.add_node("b")
    a.up(key)
    b.up(key)
    _never_expire(net, b)
    b.wait_peers(1)
    first = a.status()["self"]
    pinger = b.host.popen(["ping", "-c", "100", "-i", "0.2", "-W", "1", a.ip()], stdout=subprocess.PIPE)
    rotated = wait_for(
        lambda: (k := a.status()["self"]["node_key"]) != first["node_key"] and k,
        timeout=45,
        what="a to rotate its node key",
    )
    wait_for(lambda: _peer(b, "a")["node_key"] == rotated, timeout=20, what="b to learn a's new key")
    out, _ = pinger.communicate(timeout=60)
    received = int(re.search(r"(\d+) received", out).group(1))  # type: ignore[union-attr]
    # A key change costs at most a handshake or two; most of the 100 probes must be answered.
    assert received >= 80, out
    after = a.status()["self"]
    assert (after["id"], after["addresses"]) == (first["id"], first["addresses"])
    assert not after["expired"] and after["key_expiry"] > first["key_expiry"]
    # a -> b too (a's sessions started afresh with its new key; a loaded machine may need a handshake retry)
    wait_for(
        lambda: a.host.run(["ping", "-c", "2", "-W", "2", "-i", "0.2", b.ip()], check=False).returncode == 0,
        timeout=15,
        what="a to reach b after its key rotation",
    )


def test_logout_then_login_keeps_one_record(lab: Lab) -> None:
    """C29c: log out, then `up` with a new single-use key: the same node id, address and name; a refused
    key burns nothing."""
    net = LabTailnet(lab)
    net.start_control()
    a = net.add_node("a")
    b = net.add_node("b")
    b.up(net.authkey())
    first = a.up(net.authkey(reusable=False))["self"]
    a.cli("logout")
    st = a.status()
    assert st["backend_state"] == "NeedsLogin" and st["self"]["addresses"] == []
    wait_for(lambda: _peer(b, "a")["expired"], timeout=20, what="b to see a logged out")
    nodes = net.control("nodes", "list", "--json")
    assert nodes.count('"name": "a"') == 1, nodes

    spent = net.authkey(reusable=False)
    b_args = ("up", "--auth-key", spent, "--socket", b.socket, "--force-reauth")
    b.host.run(tailpy_argv(*b_args))  # the key is used up by b's successful re-login
    refused = a.host.run(tailpy_argv("up", "--auth-key", spent, "--socket", a.socket), check=False)
    assert refused.returncode == 1 and "auth key" in refused.stderr.lower()

    fresh = net.authkey(reusable=False)
    again = a.up(fresh)["self"]
    assert (again["id"], again["name"], again["addresses"]) == (
        first["id"],
        first["name"],
        first["addresses"],
    )
    assert again["node_key"] != first["node_key"]  # a new node key after logout, as Tailscale does
    assert net.control("nodes", "list", "--json").count('"name": "a"') == 1
    b.wait_peers(1)
    wait_for(lambda: not _peer(b, "a")["expired"], timeout=20, what="b to see a back")
    b.ping(a.ip(), count=2)
