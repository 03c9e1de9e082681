"""Admin changes reach real nodes: a rename shows on peers, a tagged key makes a tagged node, an ephemeral
node is removed once it has been offline past the timeout, and hostnames become unique DNS labels."""

from __future__ import annotations

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


def _peer_names(node: LabNode) -> list[str]:
    return sorted(p["name"] for p in node.status()["peers"])


def test_rename_tags_and_names_reach_peers(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control("--domain", "corp.internal")
    net.control("users", "create", "alice")
    alice_key = net.control("authkey", "create", "--user", "alice", "--reusable").strip().splitlines()[-1]
    tag_key = net.control("authkey", "create", "--tags", "tag:server").strip().splitlines()[-1]
    a = net.add_node("a")
    b = net.add_node("b")
    a.up(alice_key)
    b.up(tag_key)
    b_id = b.status()["self"]["id"]
    peer = a.wait_peers(1)["peers"][0]
    assert peer["tags"] == ["tag:server"] and peer["user"] == ""
    assert a.status()["self"]["user"] == "alice" and a.status()["self"]["fqdn"] == "a.corp.internal"
    assert "tag:server" in a.cli("status")

    net.control("nodes", "rename", str(b_id), "db-1")
    wait_for(lambda: _peer_names(a) == ["db-1"], timeout=10, what="a to see b renamed")
    assert b.status()["self"]["fqdn"] == "db-1.corp.internal"
    argv = tailpy_argv("control", "nodes", "rename", str(b_id), "a", "--state-dir", str(net.control_state))
    refused = net.control_host.run(argv, check=False)
    assert refused.returncode == 1 and "taken" in refused.stderr and "Traceback" not in refused.stderr
    a.ping(b.ip(), count=1)


def test_ephemeral_node_is_removed_after_it_goes_offline(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control("--ephemeral-timeout", "3s")
    a = net.add_node("a")
    e = net.add_node("e")
    a.up(net.authkey())
    e.up(net.control("authkey", "create", "--ephemeral").strip().splitlines()[-1])
    a.wait_peers(1)
    e.stop_daemon()  # offline: removed after the timeout, and a is told
    wait_for(lambda: _peer_names(a) == [], timeout=30, what="the ephemeral node to be removed")


def test_hostnames_become_unique_dns_labels(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    key = net.authkey()
    nodes = [net.add_node(f"n{i}") for i in range(3)]
    for n in nodes:
        n.cli("up", "--login-server", net.control_url, "--auth-key", key, "--hostname", "My Pi.local")
    names = sorted(n.status()["self"]["name"] for n in nodes)
    assert names == ["my-pi", "my-pi-1", "my-pi-2"]
