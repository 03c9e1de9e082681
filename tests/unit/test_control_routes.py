"""Control's side of subnet routers and exit nodes without sockets: served routes, the primary election
(sticky, failover, nobody when all are offline), ``autoApprovers``, and the mapper's records: primary
routes and allowed IPs, reduced per recipient by the policy, published as deltas when a router's stream
opens or closes."""

from __future__ import annotations

import dataclasses
from typing import Any

import _mapclient
import pytest
from _mapclient import mkey, node

from tailpy.control.mapper import Mapper
from tailpy.control.policy import Compiled, Policy, PolicyError, PolicyNode
from tailpy.control.routes import PrimaryRoutes, auto_approved, served_routes
from tailpy.netmap import Node
from tailpy.packetfilter import filter_to_json

LAN = "198.51.100.0/24"
LAN6 = "2001:db8:1::/64"
EXIT = ("0.0.0.0/0", "::/0")


# --- served routes ---


def test_served_routes_are_approved_and_advertised_exit_routes_as_a_pair() -> None:
    assert served_routes([LAN, LAN6], [LAN]) == (LAN,)
    assert served_routes([LAN], [LAN, "192.0.2.0/24"]) == (LAN,)  # approved ahead: not served
    assert served_routes([LAN, *EXIT], [*EXIT]) == EXIT
    assert served_routes([LAN, *EXIT], ["0.0.0.0/0", LAN]) == (LAN,)  # half an exit node: none
    assert served_routes(["0.0.0.0/0"], [*EXIT]) == ()


# --- the election ---


def test_lowest_id_becomes_primary_and_stays_while_eligible() -> None:
    p = PrimaryRoutes()
    assert p.update(7, [LAN]) == {7}
    assert p.primary_of(LAN) == 7
    assert p.update(3, [LAN]) == set()  # sticky: a lower id coming online does not take over
    assert p.primary_of(LAN) == 7 and p.routers(LAN) == {3, 7}
    assert p.primary_routes(7) == (LAN,) and p.primary_routes(3) == ()


def test_primary_offline_moves_to_standby_and_does_not_come_back() -> None:
    p = PrimaryRoutes()
    p.update(1, [LAN])
    p.update(2, [LAN])
    assert p.update(1, []) == {1, 2}  # R1 offline: R2 takes over
    assert p.primary_of(LAN) == 2
    assert p.update(1, [LAN]) == set()  # R1 returns: no flapping
    assert p.primary_of(LAN) == 2


def test_both_offline_nobody_then_the_first_back_serves() -> None:
    p = PrimaryRoutes()
    p.update(1, [LAN])
    p.update(2, [LAN])
    p.update(1, [])
    assert p.update(2, []) == {2}
    assert p.primary_of(LAN) is None and p.primaries() == {}
    assert p.update(2, [LAN]) == {2}  # only R2 returns: it serves
    assert p.primary_of(LAN) == 2
    assert p.update(1, [LAN]) == set()


def test_election_is_per_prefix_and_ignores_exit_routes() -> None:
    p = PrimaryRoutes()
    p.update(1, [LAN, *EXIT])
    p.update(2, [LAN, LAN6])
    assert p.primary_of(LAN) == 1 and p.primary_of(LAN6) == 2 and p.primary_of("0.0.0.0/0") is None
    assert p.primary_routes(2, [LAN6, LAN]) == (LAN6,)
    assert p.remove(1) == {1, 2}
    assert p.primary_routes(2, [LAN, LAN6]) == (LAN, LAN6)


# --- autoApprovers ---

APPROVERS = Policy.parse(
    """{
      "groups": {"group:net": ["alice@"]},
      "tagOwners": {"tag:router": ["group:net"], "tag:exit": ["group:net"]},
      "autoApprovers": {
        "routes": {"198.51.100.0/22": ["group:net", "tag:router"], "2001:db8::/32": ["bob@example.com"]},
        "exitNode": ["tag:exit"],
      },
    }"""
)


def pnode(user: str = "", tags: tuple[str, ...] = (), email: str = "") -> PolicyNode:
    return PolicyNode(1, ("100.64.0.1/32",), user, email, tags)


def test_auto_approvers_by_group_tag_and_user_inside_the_listed_prefix() -> None:
    adv = [LAN, "198.51.104.0/24", LAN6, *EXIT]
    assert auto_approved(APPROVERS, pnode("alice"), adv) == (LAN,)  # inside /22; not 198.51.104/24
    assert auto_approved(APPROVERS, pnode(tags=("tag:router",)), adv) == (LAN,)
    assert auto_approved(APPROVERS, pnode("bob", email="bob@example.com"), adv) == (LAN6,)
    assert auto_approved(APPROVERS, pnode(tags=("tag:exit",)), adv) == EXIT
    assert auto_approved(APPROVERS, pnode(tags=("tag:exit",)), ["0.0.0.0/0"]) == ()  # half an exit node
    assert auto_approved(APPROVERS, pnode("carol"), adv) == ()
    assert auto_approved(None, pnode("alice"), adv) == ()


def test_a_tagged_node_is_not_approved_through_its_owner() -> None:
    tagged = PolicyNode(1, ("100.64.0.1/32",), "", "", ("tag:exit",))  # alice's, tagged: the tag counts
    assert auto_approved(APPROVERS, tagged, [LAN]) == ()


def test_auto_approvers_must_name_defined_groups_and_tags() -> None:
    with pytest.raises(PolicyError, match="group:nope is not defined"):
        Policy.parse('{"autoApprovers": {"routes": {"10.0.0.0/8": ["group:nope"]}}}')


# --- the mapper's records ---


class Client(_mapclient.Client):
    """One node's stream, published online when it opens and offline when it closes (as the server does)."""

    def __init__(self, mapper: Mapper, node_id: int) -> None:
        super().__init__(mapper, node_id)
        self.mapper.publish(self.mapper.nodes[node_id])  # online now, as the server publishes it

    def close(self) -> None:
        self.mapper.close_stream(self.stream)
        self.mapper.publish(self.mapper.nodes[self.stream.node_id])  # offline, as the server publishes it

    def peer(self, i: int) -> Node:
        assert self.state is not None
        return self.state.netmap.peers[i]


ROUTER: dict[str, Any] = {"routable_ips": (LAN,), "approved_routes": (LAN,)}


def routed_tailnet() -> Mapper:
    m = Mapper(mkey(), "ts.net", batch_delay=0)
    m.load(
        [
            node(1, "alice"),
            node(2, tags=("tag:router",), **ROUTER),
            node(3, tags=("tag:router",), **ROUTER),
            node(4, "bob", routable_ips=(LAN6,)),  # not approved
            node(5, tags=("tag:exit",), routable_ips=EXIT, approved_routes=EXIT),
            node(6, "carol"),
        ]
    )
    return m


def test_offline_routers_serve_nothing_and_the_first_online_is_primary() -> None:
    m = routed_tailnet()
    alice = Client(m, 1)
    alice.drain()
    r2 = alice.peer(2)
    assert r2.approved_routes == (LAN,) and r2.primary_routes == () and r2.allowed_ips is None
    assert alice.peer(4).routable_ips == (LAN6,) and alice.peer(4).approved_routes == ()
    exit_node = alice.peer(5)  # an exit node offers its exit routes online or not
    assert exit_node.allowed_ips == ("100.64.0.5/32", *EXIT) and exit_node.exit_node_option()
    Client(m, 3).drain()
    assert [x.type for x in alice.drain()] == ["delta"]
    r3 = alice.peer(3)
    assert r3.primary_routes == (LAN,) and r3.effective_allowed_ips() == ("100.64.0.3/32", LAN)
    assert m.netmap(3) is not None and m.netmap(3).self_node.primary_routes == (LAN,)  # type: ignore[union-attr]


def test_closing_the_primary_stream_moves_its_routes_in_one_delta() -> None:
    m = routed_tailnet()
    alice = Client(m, 1)
    r2, r3 = Client(m, 2), Client(m, 3)
    for c in (alice, r2, r3):
        c.drain()
    assert alice.peer(2).primary_routes == (LAN,) and alice.peer(3).primary_routes == ()
    r2.close()
    (msg,) = alice.drain()
    assert msg.type == "delta"
    assert {n["id"] for n in msg.body["peers_changed"]} == {2, 3}  # both routers' records in one delta
    assert alice.peer(2).primary_routes == () and not alice.peer(2).online
    assert alice.peer(3).primary_routes == (LAN,) and alice.peer(3).allowed_ips == ("100.64.0.3/32", LAN)
    assert r3.drain()[0].body["self"]["primary_routes"] == [LAN]  # the standby hears it is primary now
    r2 = Client(m, 2)  # R2 returns: R3 stays primary
    alice.drain()
    assert alice.peer(3).primary_routes == (LAN,) and alice.peer(2).primary_routes == ()
    r2.close()
    r3.close()  # both gone: nobody serves the route
    alice.drain()
    assert alice.peer(2).allowed_ips is None and alice.peer(3).allowed_ips is None
    assert m.primary.primary_of(LAN) is None


def test_expiry_and_unapproval_end_a_primary() -> None:
    m = routed_tailnet()
    alice, r2 = Client(m, 1), Client(m, 2)
    alice.drain()
    assert alice.peer(2).primary_routes == (LAN,)
    m.publish(dataclasses.replace(m.nodes[2], expired=True))
    alice.drain()
    assert alice.peer(2).primary_routes == ()
    m.publish(dataclasses.replace(m.nodes[2], expired=False))
    alice.drain()
    assert alice.peer(2).primary_routes == (LAN,)
    m.publish(dataclasses.replace(m.nodes[2], approved_routes=()))  # an admin took the approval back
    alice.drain()
    assert alice.peer(2).primary_routes == () and alice.peer(2).allowed_ips is None
    r2.drain()
    assert r2.state is not None and r2.state.netmap.self_node.primary_routes == ()


LAN_POLICY = Policy.parse(
    """{
      "groups": {"group:lan": ["alice@"]},
      "tagOwners": {"tag:router": [], "tag:exit": []},
      "acls": [
        {"action": "accept", "src": ["group:lan"], "dst": ["198.51.100.0/24:*", "autogroup:internet:*"]},
        {"action": "accept", "src": ["carol@"], "dst": ["tag:router:22"]},
      ],
    }"""
)


def test_route_reduction_per_recipient() -> None:
    m = routed_tailnet()
    m.set_policy(LAN_POLICY)
    alice, carol = Client(m, 1), Client(m, 6)
    Client(m, 2)
    alice.drain()
    carol.drain()
    assert alice.peer(2).allowed_ips == ("100.64.0.2/32", LAN) and alice.peer(2).primary_routes == (LAN,)
    assert alice.peer(5).exit_node_option()
    # carol sees router 2 (she may reach its port 22), but not its route: the policy grants her no CIDR
    assert carol.peer(2).allowed_ips is None and carol.peer(2).primary_routes == ()
    assert 5 not in carol.state.netmap.peers  # type: ignore[union-attr]  # nor the exit node
    # one shared encoding for those who may use every route; one more for the reduced view
    assert m._peer_json(1, 2) is m._json[2]
    assert m._peer_json(6, 2) is not m._json[2] and m._peer_json(6, 2) is m._peer_json(6, 2)
    assert m.netmap(6).peers[2].allowed_ips is None  # type: ignore[union-attr]
    # the router's own filter accepts alice's packets to the LAN (on the standby as well)
    rules = m.filter_for(3)
    assert rules is not None and any(d.ip == LAN for r in rules for d in r.dst_ports)
    # the exit node's filter lets alice reach the internet ranges, not the private ones
    exit_rules = m.filter_for(5)
    assert exit_rules is not None
    dsts = {d.ip for r in exit_rules for d in r.dst_ports}
    assert "0.0.0.0-9.255.255.255" in dsts and "11.0.0.0-100.63.255.255" in dsts  # not 10.0.0.0/8


def test_a_policy_change_resends_reduced_router_records() -> None:
    m = routed_tailnet()
    alice = Client(m, 1)
    Client(m, 2)
    alice.drain()
    assert alice.peer(2).allowed_ips == ("100.64.0.2/32", LAN)  # no policy: everyone may use it
    m.set_policy(
        Policy.parse(
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:router:22"]}],'
            ' "tagOwners": {"tag:router": [], "tag:exit": []}}'
        )
    )
    alice.drain()
    assert alice.peer(2).allowed_ips is None  # still visible, its route no longer granted
    m.set_policy(LAN_POLICY)
    alice.drain()
    assert alice.peer(2).allowed_ips == ("100.64.0.2/32", LAN)


# --- against Tailscale's control, as captured in Headscale's testdata/routes_results ---

CAPTURE_ROUTERS = [  # (name, tags, address, served routes) of the captures' routers
    ("big-router", ("tag:router",), "100.97.174.21", ("10.0.0.0/8",)),
    ("exit-node", ("tag:exit",), "100.85.66.106", EXIT),
    ("ha-router1", ("tag:ha",), "100.121.186.70", ("192.168.1.0/24",)),
    ("ha-router2", ("tag:ha",), "100.117.104.82", ("192.168.1.0/24",)),
    ("multi-router", ("tag:exit", "tag:router"), "100.119.241.111", ("172.16.0.0/24",)),
    ("subnet-router", ("tag:router",), "100.92.142.61", ("10.33.0.0/16",)),
    ("user1", (), "100.90.199.68", ()),
]
CAPTURE_TAGS = '"tagOwners": {"tag:router": [], "tag:exit": [], "tag:ha": []}'
ALL_PORTS = {"First": 0, "Last": 65535}


def capture_nodes() -> list[PolicyNode]:
    return [
        PolicyNode(i, (f"{a}/32",), "user1@" if not tags else "", "", tags, routes)
        for i, (_, tags, a, routes) in enumerate(CAPTURE_ROUTERS, 1)
    ]


def test_explicit_subnet_destination_lands_on_the_routers_serving_it() -> None:
    """ROUTES-a3_explicit_subnet_filter_to_router: ``* -> 10.33.0.0/16:*`` reaches the routers whose routes
    overlap the prefix (10.0.0.0/8 and 10.33.0.0/16), with every served subnet route among the ``*``
    sources and no exit route."""
    pol = Policy.parse(
        "{" + CAPTURE_TAGS + ', "acls": [{"action": "accept", "src": ["*"], "dst": ["10.33.0.0/16:*"]}]}'
    )
    c = Compiled(pol, capture_nodes())
    want = [
        {
            "SrcIPs": [
                "10.0.0.0/8",
                "10.33.0.0/16",
                "100.115.94.0-100.127.255.255",
                "100.64.0.0-100.115.91.255",
                "172.16.0.0/24",
                "192.168.1.0/24",
                "fd7a:115c:a1e0::/48",
            ],
            "DstPorts": [{"IP": "10.33.0.0/16", "Ports": ALL_PORTS}],
        }
    ]
    got = {name: filter_to_json(c.filter(i)) for i, (name, *_) in enumerate(CAPTURE_ROUTERS, 1)}
    assert got == {name: want if name in ("big-router", "subnet-router") else [] for name in got}
    user1 = len(CAPTURE_ROUTERS)
    assert c.may_use_route(user1, "10.33.0.0/16") and c.may_use_route(user1, "10.0.0.0/8")
    assert not c.may_use_route(user1, "192.168.1.0/24") and not c.may_use_route(user1, "0.0.0.0/0")


def test_internet_only_policy_views_as_captured() -> None:
    """ROUTES-b11_autogroup_internet_only (``* -> autogroup:internet:*``), on the captures' routers: a
    router sees the exit nodes only, with their exit routes and none of their subnet routes; an exit node
    sees everyone (everyone may reach it), with every primary subnet route, since ``*`` as a source stands
    for the hosts behind those routers too; the exit node's filter holds the internet rule."""
    m = Mapper(mkey(), "ts.net", batch_delay=0)
    m.load(
        [
            node(
                i,
                "user1@" if not tags else "",
                tags,
                addresses=(f"{a}/32",),
                routable_ips=r,
                approved_routes=r,
            )
            for i, (name, tags, a, routes) in enumerate(CAPTURE_ROUTERS, 1)
            # (in this capture multi-router is an exit node as well)
            for r in [(*EXIT, *routes) if name == "multi-router" else routes]
        ]
    )
    m.set_policy(
        Policy.parse(
            "{"
            + CAPTURE_TAGS
            + ', "acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:internet:*"]}]}'
        )
    )
    big, exit_node, ha1, ha2, multi, subnet, user1 = (Client(m, i) for i in range(1, 8))
    for c in (big, exit_node, ha1, ha2, multi, subnet, user1):
        c.drain()

    def view(c: Client) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        assert c.state is not None
        return {
            n.name: (n.effective_allowed_ips()[1:], n.primary_routes) for n in c.state.netmap.peers.values()
        }

    exit_only = {"n2": (EXIT, ()), "n5": (EXIT, ())}  # multi-router's 172.16.0.0/24 is left out
    assert view(big) == view(ha1) == view(user1) == exit_only
    assert view(exit_node) == {
        "n1": (("10.0.0.0/8",), ("10.0.0.0/8",)),
        "n3": (("192.168.1.0/24",), ("192.168.1.0/24",)),
        "n4": ((), ()),  # the standby
        "n5": (("172.16.0.0/24", *EXIT), ("172.16.0.0/24",)),
        "n6": (("10.33.0.0/16",), ("10.33.0.0/16",)),
        "n7": ((), ()),
    }
    rules = filter_to_json(m.filter_for(5) or ())
    assert rules[0]["SrcIPs"] == [
        "10.0.0.0/8",
        "10.33.0.0/16",
        "100.115.94.0-100.127.255.255",
        "100.64.0.0-100.115.91.255",
        "172.16.0.0/24",
        "192.168.1.0/24",
        "fd7a:115c:a1e0::/48",
    ]
    assert [d["IP"] for d in rules[0]["DstPorts"]][:2] == ["0.0.0.0-9.255.255.255", "11.0.0.0-100.63.255.255"]
    assert m.filter_for(1) == () and m.filter_for(7) == ()  # nothing lands on routers or clients
