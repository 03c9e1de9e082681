"""The policy compiler against hand-written expectations: each construct, rendered as Tailscale renders it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tailpy.control.policy import Compiled, Policy, PolicyError, PolicyNode, check_tests, compile_filter
from tailpy.packetfilter import ALLOW_ALL, filter_to_json

ALICE1 = PolicyNode(1, ("100.64.0.1/32", "fd7a:115c:a1e0::1/128"), "alice", "alice@example.com")
ALICE2 = PolicyNode(2, ("100.64.0.2/32", "fd7a:115c:a1e0::2/128"), "alice", "alice@example.com")
BOB = PolicyNode(3, ("100.64.0.10/32", "fd7a:115c:a1e0::a/128"), "bob", "bob@example.org")
CAROL = PolicyNode(4, ("100.64.0.20/32", "fd7a:115c:a1e0::14/128"), "carol@example.com", "carol@example.com")
SERVER = PolicyNode(5, ("100.64.0.30/32", "fd7a:115c:a1e0::1e/128"), "", "", ("tag:server",))
DB = PolicyNode(6, ("100.64.0.40/32", "fd7a:115c:a1e0::28/128"), "", "", ("tag:db", "tag:server"))
NODES = [ALICE1, ALICE2, BOB, CAROL, SERVER, DB]

HEAD = """{
  "groups": {"group:dev": ["alice@example.com", "bob@"], "group:empty": []},
  "hosts": {"office": "192.0.2.0/24", "printer": "100.64.0.20", "lan": "10.0.0.0/8"},
  "tagOwners": {"tag:server": ["group:dev"], "tag:db": ["tag:server"], "tag:web": []},
"""

ALL = {"First": 0, "Last": 65535}


def p22(first: int, last: int | None = None) -> dict[str, int]:
    return {"First": first, "Last": first if last is None else last}


def policy(rules: str, tail: str = "") -> Policy:
    return Policy.parse(HEAD + rules + tail + "}")


def acl(src: list[str], dst: list[str], proto: str = "") -> str:
    rule: dict[str, Any] = {"action": "accept", "src": src, "dst": dst}
    if proto:
        rule["proto"] = proto
    return '"acls": [' + json.dumps(rule) + "],"


def filt(pol: Policy, node: PolicyNode, nodes: list[PolicyNode] = NODES) -> list[dict[str, Any]]:
    out = filter_to_json(compile_filter(pol, node.id, nodes))
    # the netmap's encoding, built from encoded pieces, is the same JSON byte for byte
    assert Compiled(pol, nodes).filter_json(node.id) == json.dumps(out, separators=(",", ":")).encode()
    return out


def own(node: PolicyNode, *ports: dict[str, int]) -> list[dict[str, Any]]:
    return [{"IP": a.split("/")[0], "Ports": p} for a in node.addresses for p in (ports or (ALL,))]


TAILNET = ["100.115.94.0-100.127.255.255", "100.64.0.0-100.115.91.255", "fd7a:115c:a1e0::/48"]


def test_no_policy_allows_all() -> None:
    assert compile_filter(None, 1, NODES) == ALLOW_ALL


def test_group_to_tag_port() -> None:
    pol = policy(acl(["group:dev"], ["tag:server:22"]))
    src = ["100.64.0.1-100.64.0.2", "100.64.0.10", "fd7a:115c:a1e0::1-fd7a:115c:a1e0::2", "fd7a:115c:a1e0::a"]
    assert filt(pol, SERVER) == [{"SrcIPs": src, "DstPorts": own(SERVER, p22(22))}]
    assert filt(pol, DB) == [{"SrcIPs": src, "DstPorts": own(DB, p22(22))}]
    for n in (ALICE1, ALICE2, BOB, CAROL):
        assert filt(pol, n) == []  # no rule reaches it: nothing inbound


def test_star_source_is_the_tailnet_ranges_and_star_destination_stays() -> None:
    pol = policy(acl(["*"], ["*:*"]))
    assert filt(pol, BOB) == [{"SrcIPs": TAILNET, "DstPorts": [{"IP": "*", "Ports": ALL}]}]


def test_star_source_keeps_explicit_sources_beside_it() -> None:
    pol = policy(acl(["*", "office"], ["tag:db:5432"]))
    assert filt(pol, DB)[0]["SrcIPs"] == [
        "100.115.94.0-100.127.255.255",
        "100.64.0.0-100.115.91.255",
        "192.0.2.0/24",
        "fd7a:115c:a1e0::/48",
    ]


def test_users_by_email_and_by_name_at() -> None:
    by_email = policy(acl(["carol@example.com"], ["alice@example.com:80"]))
    assert filt(by_email, ALICE1) == [
        {"SrcIPs": ["100.64.0.20", "fd7a:115c:a1e0::14"], "DstPorts": own(ALICE1, p22(80))}
    ]
    by_name = policy(acl(["bob@"], ["bob@example.org:*"]))  # bob's email also names him
    assert filt(by_name, BOB) == [{"SrcIPs": ["100.64.0.10", "fd7a:115c:a1e0::a"], "DstPorts": own(BOB)}]
    assert filt(by_name, ALICE1) == []


def test_ports_lists_and_ranges() -> None:
    pol = policy(acl(["tag:server"], ["tag:db:22,80-90,443"]))
    rule = filt(pol, DB)[0]
    assert rule["DstPorts"] == own(DB, p22(22), p22(80, 90), p22(443))
    # a node that is both source and destination is its own source too
    assert rule["SrcIPs"] == ["100.64.0.30", "100.64.0.40", "fd7a:115c:a1e0::1e", "fd7a:115c:a1e0::28"]


@pytest.mark.parametrize(
    ("proto", "numbers"),
    [("tcp", [6]), ("udp", [17]), ("icmp", [1]), ("ipv6-icmp", [58]), ("17", [17]), ("GRE", [47])],
)
def test_proto_names_and_numbers(proto: str, numbers: list[int]) -> None:
    port = "53" if numbers[0] in (6, 17) else "*"
    pol = policy(acl(["group:dev"], [f"tag:db:{port}"], proto))
    assert filt(pol, DB)[0]["IPProto"] == numbers


def test_hosts_ips_and_cidrs_as_sources_and_destinations() -> None:
    pol = policy(acl(["office", "100.64.0.1", "lan"], ["printer:631", "10.0.0.0/8:22", "100.64.0.0/10:9"]))
    assert filt(pol, CAROL) == [
        {
            "SrcIPs": ["10.0.0.0/8", "100.64.0.1", "192.0.2.0/24"],
            "DstPorts": [{"IP": "100.64.0.20", "Ports": p22(631)}, {"IP": "100.64.0.0/10", "Ports": p22(9)}],
        }
    ]
    # 10.0.0.0/8 is no node's: only a subnet router serving part of it gets that destination
    router = PolicyNode(7, ("100.64.0.50/32",), "", "", ("tag:server",), routes=("10.33.0.0/16",))
    assert filt(pol, router, [*NODES, router])[0]["DstPorts"] == [
        {"IP": "10.0.0.0/8", "Ports": p22(22)},
        {"IP": "100.64.0.0/10", "Ports": p22(9)},
    ]


def test_star_source_includes_subnet_routes() -> None:
    router = PolicyNode(7, ("100.64.0.50/32",), "", "", ("tag:server",), routes=("10.33.0.0/16",))
    pol = policy(acl(["*"], ["tag:db:22"]))
    assert filt(pol, DB, [*NODES, router])[0]["SrcIPs"] == ["10.33.0.0/16", *TAILNET]


def test_autogroups_member_and_tagged() -> None:
    pol = policy(acl(["autogroup:tagged"], ["autogroup:member:443"]))
    assert filt(pol, BOB) == [
        {
            "SrcIPs": ["100.64.0.30", "100.64.0.40", "fd7a:115c:a1e0::1e", "fd7a:115c:a1e0::28"],
            "DstPorts": own(BOB, p22(443)),
        }
    ]
    assert filt(pol, SERVER) == []


def test_autogroup_self_each_user_reaches_only_their_own_devices() -> None:
    pol = policy(acl(["autogroup:member"], ["autogroup:self:*"]))
    mine = ["100.64.0.1-100.64.0.2", "fd7a:115c:a1e0::1-fd7a:115c:a1e0::2"]
    assert filt(pol, ALICE1) == [{"SrcIPs": mine, "DstPorts": own(ALICE1)}]
    assert filt(pol, ALICE2) == [{"SrcIPs": mine, "DstPorts": own(ALICE2)}]
    assert filt(pol, BOB) == [{"SrcIPs": ["100.64.0.10", "fd7a:115c:a1e0::a"], "DstPorts": own(BOB)}]
    assert filt(pol, SERVER) == []
    c = Compiled(pol, NODES)
    assert sorted(c.peers(ALICE1.id)) == [ALICE2.id]
    assert c.peers(BOB.id) == []
    assert not c.visible(ALICE1.id, BOB.id)


def test_autogroup_self_follows_the_other_destinations_of_its_rule() -> None:
    pol = policy(acl(["*"], ["autogroup:self:*", "tag:server:22", "autogroup:member:80"]))
    assert filt(pol, BOB) == [
        {"SrcIPs": TAILNET, "DstPorts": own(BOB, p22(80))},
        {"SrcIPs": ["100.64.0.10", "fd7a:115c:a1e0::a"], "DstPorts": own(BOB)},
    ]


def test_autogroup_self_comes_first_when_its_rule_lists_it_first() -> None:
    """Tailscale orders a rule's two FilterRules by which destination comes first, by kind then as written:
    ``autogroup:self`` before ``autogroup:member`` (written after it), after any user, group or tag."""
    pol = policy(acl(["*"], ["autogroup:self:*", "autogroup:member:22"]))
    assert filt(pol, BOB) == [
        {"SrcIPs": ["100.64.0.10", "fd7a:115c:a1e0::a"], "DstPorts": own(BOB)},
        {"SrcIPs": TAILNET, "DstPorts": own(BOB, p22(22))},
    ]
    pol = policy(acl(["*"], ["autogroup:self:*", "bob@:22"]))
    assert filt(pol, BOB) == [
        {"SrcIPs": TAILNET, "DstPorts": own(BOB, p22(22))},
        {"SrcIPs": ["100.64.0.10", "fd7a:115c:a1e0::a"], "DstPorts": own(BOB)},
    ]


def test_merged_rules_stand_where_the_first_rule_with_their_sources_stands() -> None:
    """Rules with equal sources merge across the whole policy, then each node keeps its destinations: a
    later rule joins an earlier one with its sources even where that earlier one does not reach the node
    (as Tailscale orders them); an earlier rule that reaches no node at all does not count."""
    rules = (
        '"acls": [{"action": "accept", "src": ["bob@"], "dst": ["tag:db:22"]},'
        ' {"action": "accept", "src": ["carol@example.com"], "dst": ["alice@example.com:80"]},'
        ' {"action": "accept", "src": ["bob@"], "dst": ["alice@example.com:443"]}],'
    )
    pol = policy(rules)
    bob = ["100.64.0.10", "fd7a:115c:a1e0::a"]
    carol = ["100.64.0.20", "fd7a:115c:a1e0::14"]
    flipped = [
        {"SrcIPs": bob, "DstPorts": own(ALICE1, p22(443))},
        {"SrcIPs": carol, "DstPorts": own(ALICE1, p22(80))},
    ]
    assert filt(pol, ALICE1) == flipped
    without_db = [n for n in NODES if n is not DB]
    assert filt(pol, ALICE1, without_db) == flipped[::-1]
    c = Compiled(pol, without_db)
    sig = c.filter_signature(ALICE1.id)
    parts = c.filter_parts(ALICE1.id)
    c.update(DB)  # the first rule reaches a node now: alice's filter lists its rules the other way round
    assert c.filter_signature(ALICE1.id) != sig
    assert c.filter(ALICE1.id) == Compiled(pol, NODES).filter(ALICE1.id)
    assert c.filter_parts(ALICE1.id) == parts  # the parts (one per policy rule) do not change


def test_rules_with_equal_sources_merge() -> None:
    pol = policy(
        '"acls": [{"action": "accept", "src": ["tag:server"], "dst": ["tag:db:22"]},'
        ' {"action": "accept", "src": ["tag:server"], "dst": ["tag:db:80"]},'
        ' {"action": "accept", "src": ["tag:server"], "proto": "udp", "dst": ["tag:db:53"]}],'
    )
    out = filt(pol, DB)
    assert [r["DstPorts"] for r in out] == [own(DB, p22(22)) + own(DB, p22(80)), own(DB, p22(53))]
    assert out[1]["IPProto"] == [17]


def test_grants_ip_one_rule_per_entry_and_app_ignored_with_a_warning() -> None:
    pol = policy(
        '"grants": [{"src": ["group:dev"], "dst": ["tag:db"], "ip": ["tcp:5432", "icmp:*", "8080-8081"]},'
        ' {"src": ["*"], "dst": ["tag:db"], "app": {"example.com/cap/x": [{}]}}],'
    )
    out = filt(pol, DB)
    assert [(r["DstPorts"], r.get("IPProto")) for r in out] == [
        (own(DB, p22(5432)), [6]),
        (own(DB, ALL), [1]),
        (own(DB, p22(8080, 8081)), None),
    ]
    assert pol.warnings == ("grants[1]: capability grant ignored (app)",)


def test_empty_group_gives_no_rule() -> None:
    assert filt(policy(acl(["group:empty"], ["*:*"])), BOB) == []


def test_autogroup_danger_all_is_star() -> None:
    assert filt(policy(acl(["autogroup:danger-all"], ["tag:db:22"])), DB)[0]["SrcIPs"] == ["*"]


def test_autogroup_internet_reaches_exit_nodes_only() -> None:
    pol = policy(acl(["group:dev"], ["autogroup:internet:*"]))
    assert all(filt(pol, n) == [] for n in NODES)  # no exit node: nobody gets the rule
    assert not any("autogroup:internet" in w for w in pol.warnings)
    exit_node = PolicyNode(7, ("100.64.0.50/32",), "", "", ("tag:server",), routes=("0.0.0.0/0", "::/0"))
    nodes = [*NODES, exit_node]
    rules = filt(pol, exit_node, nodes)
    # the exit node accepts the sources' packets to the internet: every address but the private, tailnet
    # and link-local ranges, rendered as Tailscale's control renders it (Headscale's capture
    # routes_results/ROUTES-b11_autogroup_internet_only)
    assert rules == [
        {
            "SrcIPs": ["100.64.0.1-100.64.0.2", "100.64.0.10", *ALICE_BOB_V6],
            "DstPorts": [
                {"IP": ip, "Ports": ALL}
                for ip in [
                    "0.0.0.0-9.255.255.255",
                    "11.0.0.0-100.63.255.255",
                    "100.128.0.0-169.253.255.255",
                    "169.255.0.0-172.15.255.255",
                    "172.32.0.0-192.167.255.255",
                    "192.169.0.0-255.255.255.255",
                    "2000::-3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                ]
            ],
        }
    ]
    c = Compiled(pol, nodes)
    assert c.visible(ALICE1.id, exit_node.id) and not c.visible(CAROL.id, exit_node.id)
    assert c.may_use_route(ALICE1.id, "0.0.0.0/0") and not c.may_use_route(CAROL.id, "::/0")
    # only one exit route approved: not an exit node
    half = PolicyNode(7, ("100.64.0.50/32",), "", "", ("tag:server",), routes=("0.0.0.0/0",))
    assert filt(pol, half, [*NODES, half]) == []


ALICE_BOB_V6 = ["fd7a:115c:a1e0::1-fd7a:115c:a1e0::2", "fd7a:115c:a1e0::a"]


def test_route_reduction_follows_rules_naming_the_cidr() -> None:
    router = PolicyNode(7, ("100.64.0.50/32",), "", "", ("tag:server",), routes=("10.33.0.0/16",))
    nodes = [*NODES, router]
    pol = policy(acl(["group:dev"], ["10.33.1.0/24:22"]) + '"tests": [],')
    c = Compiled(pol, nodes)
    assert c.may_use_route(ALICE1.id, "10.33.0.0/16")  # a rule overlapping the route
    assert not c.may_use_route(CAROL.id, "10.33.0.0/16")  # no rule for carol
    assert not c.may_use_route(ALICE1.id, "192.0.2.0/24")
    assert not c.may_use_route(ALICE1.id, "0.0.0.0/0")  # not an exit-node user
    assert c.visible(ALICE1.id, router.id) and not c.visible(CAROL.id, router.id)
    # naming the router's tag does not grant its routes
    c2 = Compiled(policy(acl(["group:dev"], ["tag:server:*"])), nodes)
    assert not c2.may_use_route(ALICE1.id, "10.33.0.0/16")
    # "*" as a destination grants every route and exit nodes
    c3 = Compiled(policy(acl(["group:dev"], ["*:*"])), nodes)
    assert c3.may_use_route(BOB.id, "10.33.0.0/16") and c3.may_use_route(BOB.id, "::/0")


def test_visibility_both_directions_and_neither() -> None:
    pol = policy(acl(["group:dev"], ["tag:server:22"]))
    c = Compiled(pol, NODES)
    assert c.visible(ALICE1.id, SERVER.id) and c.visible(SERVER.id, ALICE1.id)
    assert not c.visible(ALICE1.id, ALICE2.id)  # neither reaches the other
    assert sorted(c.peers(SERVER.id)) == [ALICE1.id, ALICE2.id, BOB.id]
    assert sorted(c.peers(CAROL.id)) == []


def test_incremental_update_matches_a_fresh_compile() -> None:
    pol = policy(acl(["group:dev"], ["tag:server:22"]))
    c = Compiled(pol, NODES[:-1])
    ch = c.update(PolicyNode(8, ("100.64.0.60/32",), "bob", "bob@example.org"))  # a new dev device
    assert SERVER.id in ch.filters
    ch = c.update(DB)
    assert c.filter(SERVER.id) == compile_filter(
        pol, SERVER.id, [*NODES, PolicyNode(8, ("100.64.0.60/32",), "bob", "bob@example.org")]
    )
    ch = c.update(PolicyNode(SERVER.id, SERVER.addresses, "", "", ("tag:db",)))  # no longer tag:server
    assert ch.view_changed and ALICE1.id in ch.lost
    assert c.filter(SERVER.id) == ()
    c.remove(3)
    assert "100.64.0.10" not in c.filter(DB.id)[0].src_ips


# --- checks ---


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            '{"acls": [{"action": "accept", "src": ["group:nope"], "dst": ["*:*"]}]}',
            1,
            40,
            "group:nope is not defined",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"],\n "dst": ["tag:x:22"]}]}',
            2,
            10,
            "tag:x is not defined in tagOwners",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["nohost"], "dst": ["*:*"]}]}',
            1,
            40,
            "'nohost' is not defined",
        ),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:ssh"]}]}', 1, 54, "bad port 'ssh'"),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:90-80"]}]}', 1, 54, "is empty"),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:70000"]}]}', 1, 54, "out of range"),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*"]}]}', 1, 54, "needs ports"),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "proto": "foo", "dst": ["*:*"]}]}',
            1,
            55,
            "unknown protocol 'foo'",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "proto": "gre", "dst": ["*:22"]}]}',
            1,
            55,
            "has no ports",
        ),
        ('{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}', 1, 22, "is not supported"),
        (
            '{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}',
            1,
            40,
            "not valid on the src side",
        ),
        (
            '{"tagOwners": {"tag:a": []}, "acls": [{"action": "accept", "src": ["tag:a"], '
            '"dst": ["autogroup:self:*"]}]}',
            1,
            68,
            "autogroup:self can only be used",
        ),
        ('{"groups": {"group:a": ["group:b"]}}', 1, 25, "cannot contain other groups"),
        ('{"tagOwners": {"tag:a": ["group:b"]}}', 1, 26, "group:b is not defined"),
        ('{"hosts": {"h": "not-an-ip"}}', 1, 17, "is not an IP address"),
        ('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:x"]}]}', 1, 49, "bad port 'x'"),
        ('{"acls": {}}', 1, 10, "must be a list"),
        ("[]", 1, 1, "must be a JSON object"),
    ],
)
def test_refused_with_line_and_column(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        Policy.parse(text)
    assert message in e.value.message
    assert (e.value.line, e.value.column) == (line, column)
    assert str(e.value) == f"line {line}, column {column}: {e.value.message}"


def test_every_section_accepted_and_unenforced_ones_reported() -> None:
    pol = Policy.parse(
        """{
          "ACLs": [{"Action": "accept", "Users": ["*"], "Ports": ["*:*"]}],  // legacy names, any case
          "tagOwners": {"tag:r": []},
          "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:r"]}},
          "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"],
                   "users": ["root"]}],
          "nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}],
          "postures": {"posture:x": ["node:os == 'linux'"]},
          "derpMap": {"Regions": {}},
          "randomizeClientPort": true,
          "disableIPv4": false,
          "sshTests": [],
          "ipsets": {},
        }"""
    )
    assert set(pol.not_enforced) == {
        "ssh",
        "nodeAttrs",
        "postures",
        "derpMap",
        "randomizeClientPort",
        "disableIPv4",
        "sshTests",
        "ipsets",
    }
    assert filt(pol, BOB) == [{"SrcIPs": TAILNET, "DstPorts": [{"IP": "*", "Ports": ALL}]}]


def test_tests_accept_and_deny() -> None:
    good = policy(
        acl(["group:dev"], ["tag:server:22"]),
        '"tests": [{"src": "alice@example.com", "accept": ["tag:server:22"], "deny": ["tag:server:80"]},'
        ' {"src": "group:dev", "proto": "tcp", "accept": ["tag:db:22"]},'
        ' {"src": "carol@example.com", "deny": ["tag:server:22", "100.64.0.30:22"]}],',
    )
    assert check_tests(good, NODES) == []
    bad = policy(
        acl(["group:dev"], ["tag:server:22"]),
        '"tests": [\n  {"src": "bob@", "accept": ["tag:server:80"], "deny": ["tag:server:22"]}],',
    )
    errors = check_tests(bad, NODES)
    assert [e.message for e in errors] == [
        "tests[0]: bob@ may not reach tag:server:80",
        "tests[0]: bob@ may reach tag:server:22",
    ]
    assert errors[0].line == 6


def test_tests_with_autogroup_self_and_no_nodes() -> None:
    pol = policy(
        acl(["autogroup:member"], ["autogroup:self:22"]),
        '"tests": [{"src": "alice@example.com", "accept": ["alice@example.com:22"], "deny": ["bob@:22"]}],',
    )
    assert check_tests(pol, []) == []


def test_may_own() -> None:
    pol = policy(acl(["*"], ["*:*"]))
    assert pol.may_own("tag:server", "alice", "alice@example.com")
    assert pol.may_own("tag:server", "bob", "")
    assert not pol.may_own("tag:server", "carol", "carol@example.com")
    assert not pol.may_own("tag:db", "alice", "alice@example.com")  # owned by a tag only
    assert not pol.may_own("tag:web", "alice", "alice@example.com")  # no owner: admins only
    assert not pol.may_own("tag:nope", "alice", "alice@example.com")
    member = Policy.parse('{"tagOwners": {"tag:x": ["autogroup:member"]}}')
    assert member.may_own("tag:x", "anyone", "")


def test_grant_ip_entries_of_one_protocol_form_one_rule() -> None:
    pol = policy('"grants": [{"src": ["*"], "dst": ["tag:db"], "ip": ["tcp:80", "udp:53", "tcp:443"]}],')
    out = filt(pol, DB)
    assert [(r["DstPorts"], r["IPProto"]) for r in out] == [
        (own(DB, p22(80), p22(443)), [6]),
        (own(DB, p22(53)), [17]),
    ]


def test_one_targets_ports_are_joined_per_address_and_targets_ordered_by_kind() -> None:
    pol = policy(acl(["tag:server"], ["tag:db:22", "group:dev:8080", "tag:db:80", "alice@example.com:3000"]))
    assert filt(pol, DB)[0]["DstPorts"] == own(DB, p22(22), p22(80))
    # a user's entries come before a group's, as Tailscale lists them
    assert filt(pol, ALICE1)[0]["DstPorts"] == own(ALICE1, p22(3000)) + own(ALICE1, p22(8080))


def test_grants_come_before_acls() -> None:
    pol = policy(
        acl(["tag:server"], ["tag:db:22"]) + '"grants": [{"src": ["*"], "dst": ["tag:db"], "ip": ["443"]}],'
    )
    assert [r["DstPorts"][0]["Ports"] for r in filt(pol, DB)] == [p22(443), p22(22)]


def test_no_acls_and_no_grants_is_tailscales_default_allow() -> None:
    assert filt(Policy.parse('{"ssh": []}'), BOB) == [
        {"SrcIPs": TAILNET, "DstPorts": [{"IP": "*", "Ports": ALL}]}
    ]
    assert filt(Policy.parse('{"acls": []}'), BOB) == []


def test_user_prefix_and_domain_wildcard() -> None:
    pol = policy(acl(["user:*@example.com"], ["user:bob@example.org:22"]))
    assert filt(pol, BOB) == [
        {
            "SrcIPs": [
                "100.64.0.1-100.64.0.2",
                "100.64.0.20",
                "fd7a:115c:a1e0::1-fd7a:115c:a1e0::2",
                "fd7a:115c:a1e0::14",
            ],
            "DstPorts": own(BOB, p22(22)),
        }
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["0.0.0.0/0:*"]}]}',
            "to allow all IP addresses",
        ),
        ('{"grants": [{"src": ["*"], "dst": ["*"], "ip": []}]}', "ip and app cannot both be empty"),
        (
            '{"grants": [{"src": ["*"], "dst": ["autogroup:self"], "ip": ["*"]}]}',
            "autogroup:self can only be used",
        ),
        ('{"tests": [{"src": "a@b.c", "accept": ["10.0.0.0/8:22"]}]}', "single host, not a prefix"),
        ('{"tests": [{"src": "a@b.c"}]}', "a test needs 'accept' or 'deny'"),
        ('{"tests": [{"src": "a@b.c", "accept": ["a@b.c:1-2"]}]}', "must name one port"),
    ],
)
def test_more_refusals(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.parse(text)


# --- incremental compilation against a fresh one ---

MIXED = policy(
    '"acls": ['
    '{"action": "accept", "src": ["group:dev"], "dst": ["tag:server:22", "autogroup:self:*"]},'
    '{"action": "accept", "src": ["*"], "dst": ["tag:db:5432"]},'
    '{"action": "accept", "src": ["autogroup:tagged", "100.64.0.3"], "dst": ["alice@example.com:80"]},'
    '{"action": "accept", "src": ["tag:db"], "dst": ["100.64.0.0/29:9", "group:dev:53"], "proto": "udp"}],'
)
_owners = st.sampled_from(
    [
        ("alice", "alice@example.com", ()),
        ("bob", "", ()),
        ("carol", "", ()),
        ("", "", ("tag:server",)),
        ("", "", ("tag:db",)),
        ("", "", ("tag:db", "tag:server")),
    ]
)
_ops = st.lists(st.tuples(st.integers(1, 8), _owners, st.integers(1, 9), st.booleans()), max_size=25)


@given(_ops)
@settings(max_examples=150, deadline=None)
@example(
    [
        (2, ("", "", ("tag:server",)), 3, False),
        (3, ("alice", "alice@example.com", ()), 3, False),
        (4, ("", "", ("tag:server",)), 1, False),
        (1, ("bob", "", ()), 1, False),
    ]
)  # a rule's sources become equal to another's: the merged filter of the other's destinations changes
def test_incremental_updates_equal_a_fresh_compile(ops: list[tuple[int, Any, int, bool]]) -> None:
    c = Compiled(MIXED)
    live: dict[int, PolicyNode] = {}
    for node_id, (user, email, tags), host, delete in ops:
        filters = {i: c.filter_parts(i) for i in live}  # the form nodes get (merged form: see Changes)
        seen_by = {i for i in live if node_id in c.peers(i)}
        own_peers = set(c.peers(node_id))
        if delete:
            ch = c.remove(node_id)
            live.pop(node_id, None)
        else:
            n = PolicyNode(node_id, (f"100.64.0.{host}/32", f"fd7a:115c:a1e0::{host}/128"), user, email, tags)
            known = node_id in live
            ch = c.update(n)
            live[node_id] = n
            # what changed is reported: filters that differ, peers that lost sight of the node, its own view
            assert {i for i in filters if i != node_id and c.filter_parts(i) != filters[i]} <= ch.filters
            if known:
                assert {i for i in seen_by if node_id not in c.peers(i)} <= ch.lost
                assert set(c.peers(node_id)) == own_peers or ch.view_changed
        if delete:
            assert {i for i in filters if i in live and c.filter_parts(i) != filters[i]} <= ch.filters
    fresh = Compiled(MIXED, live.values())
    for i in live:
        assert c.filter(i) == fresh.filter(i)
        assert c.filter_json(i) == fresh.filter_json(i)
        assert set(c.peers(i)) == set(fresh.peers(i))


def test_tests_with_a_big_group() -> None:
    """A 2,000-member group as a test's source: every member is judged (members matched by the same names
    share one answer), and a failing member is named."""
    members = [f"user{i}@" for i in range(2000)]
    body: dict[str, Any] = {
        "groups": {"group:all": members, "group:eng": members[:500], "group:ops": ["user1999@"]},
        "tagOwners": {"tag:x": ["group:eng"], "tag:y": ["group:eng"]},
        "acls": [{"action": "accept", "src": ["group:eng"], "dst": [f"tag:y:{1000 + i}"]} for i in range(50)]
        + [{"action": "accept", "src": ["group:ops"], "dst": ["tag:x:1"]}],
    }
    nodes = [PolicyNode(i + 1, (f"100.64.{i // 256}.{i % 256}/32",), f"user{i}", "") for i in range(2000)]
    nodes += [
        PolicyNode(3001, ("100.65.0.1/32",), "", "", ("tag:x",)),
        PolicyNode(3002, ("100.65.0.2/32",), "", "", ("tag:y",)),
    ]
    body["tests"] = [
        {"src": "group:all", "deny": ["tag:y:1000", "tag:x:2"]},
        {"src": "group:eng", "accept": ["tag:y:1049"], "deny": ["tag:x:1"]},
        {"src": "user1999@", "accept": ["tag:x:1"]},
    ]
    pol = Policy.parse(json.dumps(body))
    assert [e.message for e in check_tests(pol, nodes)] == [
        "tests[0]: group:all member user0 may reach tag:y:1000"
    ]
    assert [e.message for e in check_tests(pol, [])] == [
        "tests[0]: group:all member user0 may reach tag:y:1000"
    ]
    body["tests"] = [
        {"src": "group:all", "deny": ["tag:x:1"]},  # only the last member may
        {"src": "group:all", "accept": ["tag:y:1000"]},  # only the first 500 may
        {"src": "group:all", "deny": ["tag:y:999"], "accept": ["tag:x:2"]},
    ]
    pol = Policy.parse(json.dumps(body))
    assert [e.message for e in check_tests(pol, nodes)] == [
        "tests[0]: group:all member user1999 may reach tag:x:1",
        "tests[1]: group:all member user500 may not reach tag:y:1000",
        "tests[2]: group:all member user0 may not reach tag:x:2",
    ]
    body["tests"] = [{"src": "group:eng", "deny": ["tag:x:1", "tag:y:999"], "accept": ["tag:y:1000"]}]
    assert check_tests(Policy.parse(json.dumps(body)), nodes) == []
