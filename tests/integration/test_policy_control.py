"""The policy's control surfaces with real processes: `tailpy control serve --policy FILE` follows edits of
the file (seen in `tailpy control policy filter NODE --json` within seconds), `tailpy up --advertise-tags`
is granted or refused by the policy's tagOwners with one sentence, an admin's `nodes tag` reaches the
node's netmap and `tailpy status`, and a policy change leaves granted tags in place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab

OPEN = """{
  // alice (group:ops) may tag her nodes tag:web; everyone reaches everything
  "groups": {"group:ops": ["alice@"]},
  "tagOwners": {"tag:web": ["group:ops"], "tag:db": ["bob@"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""

CLOSED = """{
  "groups": {"group:ops": ["alice@"]},
  "tagOwners": {"tag:db": ["bob@"]},
  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"]}],
}
"""


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as editors save: a new file in place of the old


def _filter(net: LabTailnet, node: str) -> list[dict[str, Any]]:
    rules = json.loads(net.control("policy", "filter", node, "--json"))
    assert isinstance(rules, list)
    return rules


def test_policy_file_tags_and_filter(lab: Lab) -> None:
    net = LabTailnet(lab)
    policy = net.root / "policy.hujson"
    net.root.mkdir(parents=True, exist_ok=True)
    policy.write_text(OPEN)
    net.start_control("--policy", str(policy))
    net.control("users", "create", "alice")
    key = net.control("authkey", "create", "--user", "alice", "--reusable").strip().splitlines()[-1]
    a = net.add_node("a")
    b = net.add_node("b")
    up = ["up", "--login-server", net.control_url, "--hostname", "a", "--auth-key", key]
    refused = a.host.run(tailpy_argv(*up, "--advertise-tags", "tag:db", "--socket", a.socket), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "tag:db is not permitted" in refused.stderr, refused.stderr
    a.cli(*up, "--advertise-tags", "tag:web")
    assert a.status()["self"]["tags"] == ["tag:web"]
    assert "tag:web" in a.cli("status")
    b.up(key)
    peer = b.wait_peers(1)["peers"][0]
    assert peer["tags"] == ["tag:web"]

    assert _filter(net, "a")  # everyone may reach a
    got = json.loads(net.control("policy", "get", "--json"))
    assert got["source"] == "file" and got["policy"] == OPEN
    _write(policy, CLOSED)
    wait_for(lambda: _filter(net, "a") == [], timeout=10, what="the file's edit to reach a's filter")
    assert a.status()["self"]["tags"] == ["tag:web"]  # the policy no longer grants it: kept anyway
    refused = net.control_host.run(
        tailpy_argv("control", "policy", "set", str(policy), "--state-dir", str(net.control_state)),
        check=False,
    )
    assert refused.returncode == 1 and "edit that file" in refused.stderr

    _write(policy, '{"acls": [}')  # broken: logged, the running policy stays
    wait_for(
        lambda: "keeping the running policy" in (net.root / "control.log").read_text(),
        timeout=10,
        what="the bad edit to be refused",
    )
    assert json.loads(net.control("policy", "get", "--json"))["policy"] == CLOSED

    a_id = a.status()["self"]["id"]
    net.control("nodes", "tag", str(a_id), "tag:db,tag:web")
    wait_for(
        lambda: b.status()["peers"][0]["tags"] == ["tag:db", "tag:web"],
        timeout=10,
        what="the admin's tags to reach b's netmap",
    )
    assert a.status()["self"]["tags"] == ["tag:db", "tag:web"]
    # group:ops (alice, who owns b) may now reach a on tag:db's port
    (rule,) = _filter(net, "a")
    assert {(d["Ports"]["First"], d["Ports"]["Last"]) for d in rule["DstPorts"]} == {(5432, 5432)}
    assert b.ip() in rule["SrcIPs"] or f"{b.ip()}/32" in rule["SrcIPs"]

    # a refused edit shows in `policy get`
    _write(policy, '{"acls": [}')
    wait_for(
        lambda: "refused" in json.loads(net.control("policy", "get", "--json")),
        timeout=10,
        what="the refused edit to show in policy get",
    )
    assert "the file's current content was refused at" in net.control("policy", "get")
    # tags owned by tags: a (tag:db, tag:web) may ask for tag:api, which tag:db owns
    _write(policy, CLOSED.replace('"tag:db": ["bob@"]', '"tag:db": ["bob@"], "tag:api": ["tag:db"]'))
    wait_for(
        lambda: "refused" not in json.loads(net.control("policy", "get", "--json")),
        timeout=10,
        what="the fixed file to load",
    )
    a.cli(*up, "--advertise-tags", "tag:db,tag:web,tag:api")
    assert a.status()["self"]["tags"] == ["tag:api", "tag:db", "tag:web"]
    # asking for no tags on a tagged node: refused with why, the tags stay
    kept = a.host.run(tailpy_argv(*up, "--advertise-tags=", "--socket", a.socket), check=False)
    assert kept.returncode == 1 and "this node keeps its tags (tag:api, tag:db, tag:web)" in kept.stderr, kept
    assert a.status()["self"]["tags"] == ["tag:api", "tag:db", "tag:web"]
