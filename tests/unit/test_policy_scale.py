"""The compiler on a tailnet of realistic shape: 2,000 nodes, 20 groups, 10 tags, 100 rules, one of them to
10.0.0.0/8:* and one from * to tag:web:443. Each node's filter holds only the rules whose destination is
that node, and all of them; incremental updates agree with a fresh compile."""

from __future__ import annotations

import ipaddress
import json
import random
from typing import Any

from tailpy.control.policy import Compiled, Policy, PolicyNode, ipset
from tailpy.control.policy.compiler import part_json, part_names
from tailpy.packetfilter import FilterRule, NetPortRange, PortRange

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


def literal_nodes(n: int) -> list[PolicyNode]:
    """Nodes for the literal-address test: every tenth ``tag:web``, every seventh (from 1) alice's (the only
    member of ``group:a``), the rest spread over 30 users; every 25th (from 3) serves a subnet route."""
    out = []
    for i in range(1, n + 1):
        addrs = (f"100.64.{i >> 8}.{i & 255}/32", f"fd7a:115c:a1e0::{i:x}/128")
        routes = (f"10.{i % 50}.0.0/16",) if i % 25 == 3 else ()
        if i % 10 == 0:
            out.append(PolicyNode(i, addrs, "", "", ("tag:web",), routes))
        elif i % 7 == 1:
            out.append(PolicyNode(i, addrs, "alice", "alice@example.com", (), routes))
        else:
            out.append(PolicyNode(i, addrs, f"u{i % 30}", f"u{i % 30}@example.com", (), routes))
    return out


LIT_DSTS = (
    [f"100.64.{i >> 8}.{i & 255}" for i in range(2, 401, 3)]
    + [f"fd7a:115c:a1e0::{i:x}" for i in range(5, 401, 11)]
    + ["100.64.1.0/28", "100.64.0.128/25", "100.64.0.192/26", "10.3.0.0/24", "10.28.5.0/24", "10.0.0.0/12"]
    + ["192.0.2.7"]
)
LIT_SRCS = (
    [f"100.64.{i >> 8}.{i & 255}" for i in range(4, 401, 5)]
    + [f"fd7a:115c:a1e0::{i:x}" for i in range(6, 401, 13)]
    + ["100.64.0.64/27", "10.3.9.0/24", "fd7a:115c:a1e0::100/120"]
)


def literal_policy() -> Policy:
    return Policy.parse(
        json.dumps(
            {
                "groups": {"group:a": ["alice@"]},
                "tagOwners": {"tag:web": []},
                "acls": [
                    {"action": "accept", "src": ["group:a"], "dst": [f"{d}:22" for d in LIT_DSTS]},
                    {"action": "accept", "src": LIT_SRCS, "dst": ["tag:web:443"]},
                ],
            }
        )
    )


def held_by(texts: list[str], node: PolicyNode) -> list[str]:
    """The literal addresses and prefixes of ``texts`` that hold one of ``node``'s addresses or overlap one
    of its routes, in the order given."""
    ips = [ipaddress.ip_interface(a).ip for a in node.addresses]
    routes = [ipaddress.ip_network(r) for r in node.routes]
    out = []
    for text in texts:
        net = ipaddress.ip_network(text)
        if any(ip in net for ip in ips) or any(net.version == r.version and net.overlaps(r) for r in routes):
            out.append(text)
    return out


def brute_force_check(c: Compiled, nodes: list[PolicyNode]) -> None:
    """Each node's filter and visibility worked out literal by literal, without the compiler."""
    alice = [ipset.addr(a) for n in nodes if n.user == "alice" for a in n.addresses]
    alice_src = ipset.render((f, v, v) for f, v in alice)
    src0 = {n.id for n in nodes if n.user == "alice"}
    dst0 = set()
    src1 = {n.id for n in nodes if held_by(LIT_SRCS, n)}
    web = {n.id for n in nodes if n.tags}
    for n in nodes:
        want = []
        hits = held_by(LIT_DSTS, n)
        if hits:
            dst0.add(n.id)
            dsts = tuple(NetPortRange(h, PortRange(22, 22)) for h in hits)  # as written: hosts bare
            want.append(FilterRule(alice_src, dsts))
        got = c.filter(n.id)
        if n.id in web:
            mine = tuple(NetPortRange(a.split("/")[0], PortRange(443, 443)) for a in n.addresses)
            assert got[-1].dst_ports == mine
            got = got[:-1]
        assert list(got) == want, n
    ids = sorted(n.id for n in nodes)
    for a in ids:
        for b in ids:
            if a < b:
                want_vis = (
                    (a in src0 and b in dst0)
                    or (b in src0 and a in dst0)
                    or (a in src1 and b in web)
                    or (b in src1 and a in web)
                )
                assert c.visible(a, b) == want_vis, (a, b)


def test_many_literal_addresses_and_prefixes_match_a_brute_force_check() -> None:
    """Rules naming hundreds of addresses and prefixes (v4, v6, nested, overlapping subnet routes, outside
    the tailnet) as destinations and as sources: each node's filter holds exactly the literals holding it,
    in the order written, and sees exactly the peers the literals give it; the same after incremental
    updates (nodes added, moved to other addresses, removed) as after a fresh compile."""
    policy = literal_policy()
    nodes = literal_nodes(400)
    c = Compiled(policy, nodes)
    brute_force_check(c, nodes)
    inc = Compiled(policy, nodes[:250])
    for n in nodes[250:]:
        inc.update(n)
    moved = [
        PolicyNode(
            n.id,
            (f"100.64.{n.id % 3}.{(n.id * 7) % 256}/32", f"fd7a:115c:a1e0::{n.id + 1000:x}/128"),
            n.user,
            n.email,
            n.tags,
            n.routes,
        )
        for n in nodes[:40]
    ]
    moved = list({n.addresses[0]: n for n in moved}.values())  # no two nodes on one address
    taken = {n.addresses[0] for n in moved}
    final = moved + [n for n in nodes[40:] if n.addresses[0] not in taken]
    keep = {n.id for n in final}
    for n in moved:
        inc.update(n)
    for n in nodes:
        if n.id not in keep:
            inc.remove(n.id)
    final = final[:-20]
    for n in nodes[-20:]:
        inc.remove(n.id)
    brute_force_check(inc, final)
    fresh = Compiled(policy, final)
    for n in final:
        assert inc.filter_json(n.id) == fresh.filter_json(n.id)
        assert inc.filter_parts(n.id) == fresh.filter_parts(n.id)
