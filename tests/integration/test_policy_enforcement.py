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

Assertions wait for the wanted behaviour to appear (polling up to a generous bound), never for a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _tcp_probe import CONNECT, LISTEN

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


def _listen(host: Host, *ports: int) -> None:
    proc = host.popen([sys.executable, "-c", LISTEN, *map(str, ports)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert read_line(proc.stdout, 20, f"{host.name}: listeners") == "ready"


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
