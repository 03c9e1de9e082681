"""The compiler on a tailnet of realistic shape: 2,000 nodes, 20 groups, 10 tags, 100 rules, one of them to
10.0.0.0/8:* and one from * to tag:web:443. Each node's filter holds only the rules whose destination is
that node, and all of them; incremental updates agree with a fresh compile."""

from __future__ import annotations

import json
import random
from typing import Any

from tailpy.control.policy import Compiled, Policy, PolicyNode
from tailpy.control.policy.compiler import part_json, part_names

USERS = 500
GROUPS = 20
TAGS = ["tag:web"] + [f"tag:t{i}" for i in range(1, 10)]
PORTS = ["22", "80,443", "5432", "8000-8999", "*", "53"]


def shaped_policy() -> str:
    rnd = random.Random(7)
    groups: dict[str, list[str]] = {f"group:g{g}": [] for g in range(GROUPS)}
    for u in range(USERS):
        groups[f"group:g{u % GROUPS}"].append(f"user{u}@")
        if u % 5 == 0:
            groups[f"group:g{(u * 7 + 3) % GROUPS}"].append(f"user{u}@example.com")
    acls: list[dict[str, Any]] = [
        {"action": "accept", "src": ["group:g1"], "dst": ["10.0.0.0/8:*"]},
        {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
    ]
    while len(acls) < 100:
        src = rnd.choice(list(groups)) if rnd.random() < 0.7 else rnd.choice(TAGS)
        dst = rnd.choice(TAGS) if rnd.random() < 0.7 else rnd.choice(list(groups))
        rule: dict[str, Any] = {"action": "accept", "src": [src], "dst": [f"{dst}:{rnd.choice(PORTS)}"]}
        if rnd.random() < 0.2:
            rule["proto"] = rnd.choice(["tcp", "udp"])
        acls.append(rule)
    return json.dumps({"groups": groups, "tagOwners": {t: ["group:g0"] for t in TAGS}, "acls": acls})


def shaped_nodes(n: int) -> list[PolicyNode]:
    rnd = random.Random(3)
    out = []
    for i in range(1, n + 1):
        addrs = (f"100.64.{i >> 8}.{i & 255}/32", f"fd7a:115c:a1e0::{i:x}/128")
        if rnd.random() < 0.3:
            out.append(PolicyNode(i, addrs, "", "", (rnd.choice(TAGS),)))
        else:
            u = rnd.randrange(USERS)
            out.append(PolicyNode(i, addrs, f"user{u}", f"user{u}@example.com"))
    return out


def reaches(policy: Policy, node: PolicyNode) -> list[tuple[int, str]]:
    """(rule index, ports) of every rule destination naming ``node``, worked out without the compiler."""
    out = []
    for i, rule in enumerate(policy.rules):
        for d in rule.dsts:
            a = d.alias
            if a.kind == "tag":
                hit = a.name in node.tags
            elif a.kind == "group":
                hit = not node.tags and any(m in (node.user + "@", node.email) for m in policy.groups[a.name])
            else:
                hit = False  # 10.0.0.0/8 holds no node
            if hit:
                out.append((i, ",".join(f"{p.first}-{p.last}" for p in d.ports)))
    return out


def test_each_filter_holds_exactly_the_rules_reaching_its_node() -> None:
    policy = Policy.parse(shaped_policy())
    nodes = shaped_nodes(2000)
    c = Compiled(policy, nodes)
    web = 0
    for node in nodes:
        mine = {a.split("/")[0] for a in node.addresses}
        rules = c.filter(node.id)
        for r in rules:
            assert {d.ip for d in r.dst_ports} <= mine, (node, r)  # only this node's destinations
        got = {(d.ip, d.ports.first, d.ports.last) for r in rules for d in r.dst_ports}
        for i, ports in reaches(policy, node):
            for spec in ports.split(","):
                first, last = map(int, spec.split("-"))
                for a in mine:
                    assert (a, first, last) in got, (node, policy.rules[i])
        if "tag:web" in node.tags:
            web += 1
            assert any(r.src_ips[-1] == "fd7a:115c:a1e0::/48" for r in rules)  # * -> tag:web:443
        assert json.loads(c.filter_json(node.id)) == [r.to_json() for r in rules]
        parts = [json.loads(part_json(spec)) for spec in c.filter_parts(node.id).values()]
        wire = {
            (tuple(r["SrcIPs"]), tuple(r.get("IPProto", ())), json.dumps(d, sort_keys=True))
            for p in parts
            for r in p
            for d in r["DstPorts"]
        }
        merged = {
            (r.src_ips, r.ip_proto, json.dumps(d.to_json(), sort_keys=True))
            for r in rules
            for d in r.dst_ports
        }
        assert wire == merged  # the named parts allow what the merged filter allows
    assert web > 0


def test_incremental_updates_agree_with_a_fresh_compile() -> None:
    policy = Policy.parse(shaped_policy())
    nodes = shaped_nodes(2000)
    c = Compiled(policy, nodes[:1500])
    for n in nodes[1500:]:
        c.update(n)
    moved = [PolicyNode(n.id, n.addresses, "", "", ("tag:t3",)) for n in nodes[:50]]  # retagged
    for n in moved:
        c.update(n)
    for n in nodes[50:100]:
        c.remove(n.id)
    final = moved + nodes[100:]
    fresh = Compiled(policy, final)
    rnd = random.Random(1)
    for n in rnd.sample(final, 200):
        assert c.filter(n.id) == fresh.filter(n.id)
        assert c.visible_set(n.id) == fresh.visible_set(n.id)


def test_part_names_follow_rule_content_not_position() -> None:
    """A rule keeps its part's name when rules are added before it; copies of one rule get distinct names."""
    rule = '{"action": "accept", "src": ["group:g1"], "dst": ["tag:web:443"]}'
    other = '{"action": "accept", "src": ["*"], "dst": ["tag:web:80"]}'
    head = '{"groups": {"group:g1": ["a@"]}, "tagOwners": {"tag:web": []}, "acls": ['
    one = part_names(Policy.parse(head + rule + "]}").rules)
    two = part_names(Policy.parse(head + other + "," + rule + "," + rule + "]}").rules)
    assert two[1] == one[0] and two[2] == one[0] + "~2" and two[0] != one[0]
    assert all(n.startswith("r") and len(n.split("~")[0]) == 13 for n in two)
