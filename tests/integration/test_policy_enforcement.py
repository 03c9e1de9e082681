"""A tailnet policy enforced end to end with real traffic: ``tailpy control serve``, tailpyd + ``tailpy up``
on each node, the policy set with ``tailpy control policy set FILE``; control compiles each node's filter,
the node hands it to its data plane, and the data plane drops what the policy does not allow.

* ``group:dev`` may reach ``tag:server:22`` only: a dev's TCP connection to port 22 opens, to port 80 it does
  not, and a node outside the group reaches neither; a dev may ping the server (it may reach one of its
  ports). Allowing port 80 too takes effect on the running nodes (no restart, no new login): the
  connection to port 80 opens after the change, within a generous bound.
* ``autogroup:self``: a user's devices reach each other and not another user's. Then a rule
  ``group:ops -> tag:db:5432`` is added and one of alice's devices is tagged ``tag:db`` with the admin CLI:
  bob (in group:ops) reaches it on 5432, and the device's netmap and compiled filter show the tag.
* One-way reach: alice may reach bob on TCP 22 only, so each has the other in its netmap (control leaves out
  only peers that can reach a node in neither direction) and what bob sends alice is dropped by alice's
  data-plane filter, counted under its reason: TCP, ping, UDP. Allowing bob to reach alice's port 80 then
  takes effect on the running tunnel: same daemons, same direct path, no new handshake.
* UDP by policy: alice may reach bob on UDP 53 only. Her query to 53 is answered, and the answer (bob to
  alice, which no rule allows) passes her filter as the reply to a flow she started; UDP to bob's port 54,
  and UDP bob starts towards alice, are dropped.

Assertions wait for the wanted behaviour to appear (polling up to a generous bound), never for a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _tcp_probe import CONNECT, LISTEN, UDP_ASK, UDP_ECHO

from tailpy.lab import Host, Lab, wait_for
from tailpy.lab.procs import read_line
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = [
    pytest.mark.lab,
]

#: How long a wanted behaviour may take to appear after a change (generous: the target is 2 s).
SETTLE = 30.0

DEV_SSH = """{
  // developers may reach the servers' SSH, nothing else
  "groups": {"group:dev": ["alice@"]},
  "tagOwners": {"tag:server": ["bob@"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]},
  ],
}
"""

DEV_SSH_HTTP = """{
  "groups": {"group:dev": ["alice@"]},
  "tagOwners": {"tag:server": ["bob@"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22"]},
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:server:80"]},
  ],
}
"""

SELF_ONLY = """{
  "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}],
}
"""

SELF_AND_OPS_DB = """{
  "groups": {"group:ops": ["bob@"]},
  "tagOwners": {"tag:db": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"]},
  ],
}
"""


ALICE_TO_BOB_SSH = """{
  // alice may open TCP connections to bob's port 22; nothing else is allowed
  "acls": [{"action": "accept", "src": ["alice@"], "proto": "tcp", "dst": ["bob@:22"]}],
}
"""

ALICE_TO_BOB_SSH_BOB_TO_ALICE_HTTP = """{
  "acls": [
    {"action": "accept", "src": ["alice@"], "proto": "tcp", "dst": ["bob@:22"]},
    {"action": "accept", "src": ["bob@"], "proto": "tcp", "dst": ["alice@:80"]},
  ],
}
"""

ALICE_TO_BOB_DNS = """{
  // alice may query bob's DNS port over UDP; nothing else is allowed
  "acls": [{"action": "accept", "src": ["alice@"], "proto": "udp", "dst": ["bob@:53"]}],
}
"""

#: WireGuard's REKEY_AFTER_TIME (whitepaper section 6.1, seconds): a session this old is renewed by a new
#: handshake on a healthy tunnel.
REKEY_AFTER_TIME = 120.0


def _start(host: Host, script: str, *args: str) -> None:
    proc = host.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert read_line(proc.stdout, 20, f"{host.name}: a helper to listen") == "ready"


def _listen(host: Host, *ports: int) -> None:
    _start(host, LISTEN, *map(str, ports))


def _udp_echo(host: Host, address: str, *ports: int) -> None:
    _start(host, UDP_ECHO, address, *map(str, ports))


def _udp_answered(node: LabNode, address: str, port: int, source_port: int = 0) -> bool:
    """One datagram from ``node`` (from ``source_port``, 0 for any) to ``address:port``: True when the echo
    comes back from that address and port within 3 s."""
    argv = [sys.executable, "-c", UDP_ASK, address, str(port), "3", str(source_port)]
    return node.host.run(argv, check=False).returncode == 0


def _drops(node: LabNode) -> dict[str, Any]:
    """``node``'s data-plane filter counters from ``tailpy status --json``: ``rules`` (None: no filter),
    ``dropped_<reason>``, ``udp_flows``."""
    device = node.status()["device"]
    assert device is not None, f"{node.name} has no data plane"
    counters = device["filter"]
    assert isinstance(counters, dict)
    return counters


def _peer(node: LabNode, address: str) -> dict[str, Any] | None:
    """The peer with tailnet address ``address`` in ``node``'s ``tailpy status --json``, None when its
    netmap leaves it out."""
    found = [p for p in node.status()["peers"] if f"{address}/32" in p["addresses"]]
    return found[0] if found else None


def _connects(node: LabNode, address: str, port: int) -> bool:
    argv = [sys.executable, "-c", CONNECT, address, str(port), "3"]
    return node.host.run(argv, check=False).returncode == 0


def _pings(node: LabNode, address: str) -> bool:
    argv = ["ping", "-c", "2", "-i", "0.3", "-W", "2", address]
    return node.host.run(argv, check=False).returncode == 0


def _set_policy(net: LabTailnet, text: str) -> None:
    path = Path(net.root) / "policy.hujson"
    path.write_text(text)
    net.control("policy", "set", str(path))


def _key(net: LabTailnet, user: str) -> str:
    return net.control("authkey", "create", "--user", user, "--reusable").strip().splitlines()[-1]


def _node(net: LabTailnet, name: str, key: str) -> LabNode:
    node = net.add_node(name)
    node.up(key)
    return node


def _eventually(check: Callable[[], bool], what: str) -> None:
    wait_for(lambda: bool(check()), timeout=SETTLE, what=what, interval=0.3)


def _tailnet(lab: Lab, policy: str, users: tuple[str, ...]) -> LabTailnet:
    net = LabTailnet(lab)
    net.start_control()
    for user in users:
        net.control("users", "create", user)
    _set_policy(net, policy)
    return net


def test_group_dev_reaches_tag_server_22_only_and_a_change_applies_live(lab: Lab) -> None:
    net = _tailnet(lab, DEV_SSH, ("alice", "bob", "carol"))
    dev = _node(net, "dev", _key(net, "alice"))
    srv = _node(net, "srv", _key(net, "bob"))
    other = _node(net, "other", _key(net, "carol"))
    net.control("nodes", "tag", str(srv.status()["self"]["id"]), "tag:server")
    _listen(srv.host, 22, 80)
    srv_ip = srv.ip()

    _eventually(lambda: _connects(dev, srv_ip, 22), "dev to reach srv:22")
    assert not _connects(dev, srv_ip, 80)
    assert not _connects(other, srv_ip, 22)
    # other and srv can reach each other in neither direction: control leaves each out of the other's
    # netmap (the filter's own drops are tested with one-way reach below)
    assert _peer(other, srv_ip) is None
    assert _pings(dev, srv_ip)  # dev may reach a port of srv, so it may ping it
    assert not _pings(other, srv_ip)
    drops = srv.status()["device"]["filter"]
    assert drops["rules"] is not None and drops["dropped_no_rule"] >= 1
    assert "packet filter: dropped" in srv.cli("status")

    # Port 80 too: the running nodes follow, with no restart and no new login.
    daemon = srv.daemon
    assert daemon is not None
    _set_policy(net, DEV_SSH_HTTP)
    _eventually(lambda: _connects(dev, srv_ip, 80), "dev to reach srv:80 after the change")
    assert daemon.poll() is None and srv.daemon is daemon
    assert srv.status()["backend_state"] == "Running"
    assert not _connects(other, srv_ip, 80)


def test_autogroup_self_then_a_rule_and_a_tag_added_live(lab: Lab) -> None:
    net = _tailnet(lab, SELF_ONLY, ("alice", "bob"))
    alice_key = _key(net, "alice")
    a1 = _node(net, "a1", alice_key)
    a2 = _node(net, "a2", alice_key)
    b1 = _node(net, "b1", _key(net, "bob"))
    _listen(a2.host, 5432)
    a2_ip, b1_ip = a2.ip(), b1.ip()

    _eventually(lambda: _pings(a1, a2_ip), "alice's devices to reach each other")
    assert _pings(a2, a1.ip())
    assert not _pings(a1, b1_ip)
    assert not _pings(b1, a2_ip)
    assert _peer(a1, b1_ip) is None  # left out of the netmap: neither may reach the other
    assert not _connects(b1, a2_ip, 5432)

    _set_policy(net, SELF_AND_OPS_DB)
    net.control("nodes", "tag", str(a2.status()["self"]["id"]), "tag:db")
    _eventually(lambda: _connects(b1, a2_ip, 5432), "bob (group:ops) to reach tag:db:5432")
    assert a2.status()["self"]["tags"] == ["tag:db"]
    rules = json.loads(net.control("policy", "filter", "a2", "--json"))
    b1_srcs = {f"{b1_ip}/32", b1_ip}
    assert any(
        b1_srcs & set(r["SrcIPs"]) and any(d["Ports"] == {"First": 5432, "Last": 5432} for d in r["DstPorts"])
        for r in rules
    ), rules


def test_one_way_reach_the_peer_is_in_the_netmap_and_the_filter_drops_the_other_way(lab: Lab) -> None:
    """Traffic bob starts towards alice reaches alice's node (bob has her in his netmap, the tunnel carries
    bob's SYN-ACKs to her) and is dropped there by the filter, each kind under its reason."""
    net = _tailnet(lab, ALICE_TO_BOB_SSH, ("alice", "bob"))
    a = _node(net, "a", _key(net, "alice"))
    b = _node(net, "b", _key(net, "bob"))
    for node in (a, b):
        _listen(node.host, 22, 80)
    _udp_echo(a.host, "0.0.0.0", 5353)
    a_ip, b_ip = a.ip(), b.ip()

    _eventually(lambda: _connects(a, b_ip, 22), "alice to reach bob:22")
    assert not _connects(a, b_ip, 80)
    # Each sees the other: a drop below is the data plane's, not a peer missing from a netmap.
    b_peers = json.loads(b.cli("status", "--json"))["peers"]
    assert any(f"{a_ip}/32" in p["addresses"] for p in b_peers), b_peers
    assert _peer(a, b_ip) is not None, a.status()["peers"]
    # a's filter admits nothing (no rule's destination is alice): an empty filter, not "none, allow all"
    assert _drops(a)["rules"] is not None

    before = _drops(a)["dropped_no_rule"]
    assert not _connects(b, a_ip, 22)
    assert not _connects(b, a_ip, 80)
    assert _drops(a)["dropped_no_rule"] > before
    before = _drops(a)["dropped_no_rule"]
    assert not _pings(b, a_ip)
    assert _drops(a)["dropped_no_rule"] > before
    before = _drops(a)["dropped_not_a_reply"]
    assert not _udp_answered(b, a_ip, 5353)
    assert _drops(a)["dropped_not_a_reply"] > before
    assert _udp_answered(a, "127.0.0.1", 5353)  # the echo does answer whoever reaches it
    assert _connects(a, b_ip, 22)  # the tunnel still carries what the policy allows

    # bob may now reach alice's port 80: the running tunnel follows, with no restart and no new session.
    def path() -> dict[str, Any] | None:
        peer = _peer(b, a_ip)
        return peer if peer is not None and peer["path"] == "direct" and peer["last_handshake"] else None

    before_peer = wait_for(path, timeout=SETTLE, what="b's direct path to a", interval=0.3)
    daemons = (a.daemon, b.daemon)
    _set_policy(net, ALICE_TO_BOB_SSH_BOB_TO_ALICE_HTTP)
    _eventually(lambda: _connects(b, a_ip, 80), "bob to reach alice:80 after the change")
    assert not _connects(b, a_ip, 22)
    assert (a.daemon, b.daemon) == daemons and all(d is not None and d.poll() is None for d in daemons)
    after_peer = _peer(b, a_ip)
    assert after_peer is not None
    for key in ("id", "node_key", "path", "endpoint"):
        assert after_peer[key] == before_peer[key], (key, before_peer, after_peer)
    # The same session: its handshake time is read as "now minus the session's age" (boringtun's
    # time_since_last_handshake), so a re-read differs by clock jitter only; a new handshake is only
    # WireGuard renewing a session that old, never the policy change.
    assert after_peer["last_handshake"] is not None, after_peer
    renewed = after_peer["last_handshake"] - before_peer["last_handshake"]
    assert renewed < 1.0 or renewed >= REKEY_AFTER_TIME, (before_peer, after_peer)


def test_udp_by_policy_and_replies_to_a_flow_alice_started(lab: Lab) -> None:
    """alice -> bob udp:53 only. bob's echo answers from :53, to the port alice sent from: that datagram
    (bob to alice, allowed by no rule) passes alice's filter as the reply to her flow."""
    net = _tailnet(lab, ALICE_TO_BOB_DNS, ("alice", "bob"))
    a = _node(net, "a", _key(net, "alice"))
    b = _node(net, "b", _key(net, "bob"))
    a_ip, b_ip = a.ip(), b.ip()
    _udp_echo(b.host, b_ip, 53, 54)
    _udp_echo(a.host, "0.0.0.0", 5353)

    _eventually(lambda: _udp_answered(a, b_ip, 53, source_port=40053), "alice's UDP 53 query to be answered")
    assert _peer(b, a_ip) is not None and _peer(a, b_ip) is not None
    a_before, b_before = _drops(a), _drops(b)
    assert a_before["rules"] is not None and b_before["rules"] is not None
    assert _udp_answered(a, b_ip, 53, source_port=40053)
    assert _drops(a)["dropped_not_a_reply"] == a_before["dropped_not_a_reply"]  # the answer was a reply
    assert _drops(a)["udp_flows"] >= 1

    assert not _udp_answered(a, b_ip, 54)
    assert _drops(b)["dropped_not_a_reply"] > b_before["dropped_not_a_reply"]
    # bob starting a flow to alice: dropped, to a listening port and to the port alice's queries came
    # from (only bob's port 53 answering that port is her flow)
    for port in (5353, 40053):
        before = _drops(a)["dropped_not_a_reply"]
        assert not _udp_answered(b, a_ip, port)
        assert _drops(a)["dropped_not_a_reply"] > before
