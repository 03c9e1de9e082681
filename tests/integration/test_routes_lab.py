"""Subnet routers end to end with real traffic: ``tailpy up --advertise-routes`` on a router with a second
interface into a LAN (198.51.100.0/24 and 2001:db8:5::/64), ``tailpy control routes approve``, clients with
``--accept-routes``, and a plain LAN host (no tailpyd) that answers ping and reports, over TCP, the source
address it sees.

* With SNAT (the default) the LAN host sees the router's LAN address and needs no route to the tailnet; with
  ``--snat-subnet-routes=false`` it sees the client's tailnet address and answers only with a route back.
* An advertised route is served only once approved: before, it is in no peer's allowed IPs and unreachable;
  approval takes effect on the running nodes. A peer without ``--accept-routes`` installs nothing.
  ``autoApprovers`` approve a route a node advertises with ``tailpy set``.
* A policy that grants the client only the tailnet's nodes keeps the LAN out of its reach (and out of the
  router's allowed IPs in its netmap); a rule naming the CIDR lets it in.
* Failover between two routers of one LAN under a running ping (kill -9 of the primary's tailpyd; a policy
  in force, so the standby's filter must already accept the LAN's prefix), no
  flapping when it returns, nobody serving with both down, the second serving again alone.
* ``tailpy status`` (table and ``--json``) shows a peer's routes and which router is primary.

Assertions wait for the wanted state (polling up to a generous bound), never for a time. Tests of one
module share a tailnet (module fixture, one xdist group); each sets the approvals, flags and policy it needs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _routes_lab import (
    ALLOW_ALL,
    SETTLE,
    allowed_ips,
    eventually,
    key,
    peer,
    primary_routes,
    reachable,
    route_row,
    route_state,
    row_primary,
    set_policy,
)

from tailpy.lab import Host, Lab, wait_for
from tailpy.lab.subnets import (
    SUBNET,
    SUBNET6,
    LabSubnet,
    PingLoop,
    route_dev,
    serve_whoami,
    subnet_behind,
    whoami,
)
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        shutil.which("nft") is None, reason="`nft` not found: install the Debian package nftables"
    ),
]

TUN = "tailpy0"
#: A second prefix, approved by the policy's autoApprovers (nothing sits behind it).
AUTO_PREFIX = "203.0.113.0/24"

OPS_TO_EVERYTHING_ALICE_TO_NODES = """{
  // alice may reach the tailnet's nodes, not the LAN behind the router
  "acls": [
    {"action": "accept", "src": ["ops@"], "dst": ["*:*"]},
    {"action": "accept", "src": ["alice@"], "dst": ["ops@:*", "alice@:*"]},
  ],
}
"""

ALICE_TO_NODES_AND_CORP = """{
  "acls": [
    {"action": "accept", "src": ["ops@"], "dst": ["*:*"]},
    {"action": "accept", "src": ["alice@"], "dst": ["ops@:*", "alice@:*"]},
    {"action": "accept", "src": ["alice@"], "dst": ["198.51.100.0/24:*", "2001:db8:5::/64:*"]},
  ],
}
"""

AUTO_APPROVE = """{
  "autoApprovers": {"routes": {"203.0.113.0/24": ["ops@"]}},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


@dataclass
class Corp:
    """The shared tailnet: router ``r`` (user ops) advertising the corp LAN, client ``c`` (user alice) with
    --accept-routes, client ``d`` (alice) without, and host ``h`` on the LAN running a whoami server."""

    net: LabTailnet
    corp: LabSubnet
    r: LabNode
    c: LabNode
    d: LabNode
    h: Host


@pytest.fixture(scope="module")
def corp() -> Iterator[Corp]:
    with Lab() as lab:
        net = LabTailnet(lab)
        net.start_control()
        for user in ("ops", "alice"):
            net.control("users", "create", user)
        r = net.add_node("r")
        sub = subnet_behind(net, [r])
        r.up(key(net, "ops"), flags=("--advertise-routes", f"{SUBNET},{SUBNET6}"))
        alice = key(net, "alice")
        c = net.add_node("c")
        c.up(alice, flags=("--accept-routes",))
        d = net.add_node("d")
        d.up(alice)
        for n in (r, c, d):
            n.wait_peers(2)
        h = sub.add_host("h")
        serve_whoami(h)
        yield Corp(net, sub, r, c, d, h)


def _approve(net: LabTailnet, node: str, *prefixes: str) -> None:
    net.control("routes", "approve", node, ",".join(prefixes))


def _unapprove(net: LabTailnet, node: str, *prefixes: str) -> None:
    net.control("routes", "unapprove", node, ",".join(prefixes))


def _baseline(w: Corp) -> None:
    """Allow-all policy, both routes approved, SNAT on, no route back on the LAN host."""
    set_policy(w.net, ALLOW_ALL)
    _approve(w.net, "r", SUBNET, SUBNET6)
    w.r.cli("set", "--snat-subnet-routes=true")
    w.corp.route_tailnet_via(w.h, None)


def _lan_host_through_r(w: Corp, *, v6: bool = False) -> str:
    """Back to :func:`_baseline`, then wait until c pings the LAN host through r; returns the host's address
    (its IPv6 one with ``v6``)."""
    _baseline(w)
    address = w.corp.ip6(w.h) if v6 else w.corp.ip(w.h)
    what = "the LAN host's IPv6 address" if v6 else "the LAN host"
    eventually(lambda: reachable(w.c, address), f"c to ping {what} through r")
    return address


def _reaches(client: LabNode, address: str, seen_as: str, what: str) -> None:
    """Wait until ``client`` pings ``address`` (LabError naming ``what``); the host there sees ``seen_as`` as
    the source of a TCP connection from ``client`` (a router's LAN address: SNAT)."""
    eventually(lambda: reachable(client, address), what)
    assert whoami(client.host, address) == seen_as


def _unreachable(client: LabNode, address: str) -> None:
    """``client`` gets no answer from ``address``: not to a ping, not over TCP."""
    assert not reachable(client, address)
    assert whoami(client.host, address) is None


group = pytest.mark.xdist_group("routes_corp")


@group
def test_lan_host_reachable_through_the_router_with_snat(corp: Corp) -> None:
    w = corp
    h_ip = _lan_host_through_r(w)
    assert whoami(w.c.host, h_ip) == w.corp.ip(w.r)  # masqueraded onto the LAN
    assert route_dev(w.c.host, h_ip) == TUN
    assert w.h.default_route() is None  # the LAN host has no way to the tailnet but the router's SNAT

    # d has the route in its netmap (r's primary route) but did not ask for routes: nothing installed.
    eventually(lambda: SUBNET in primary_routes(w.d, "r"), "d's netmap to show r's route")
    assert route_dev(w.d.host, h_ip) != TUN
    _unreachable(w.d, h_ip)


@group
def test_lan_host_over_ipv6_through_the_router(corp: Corp) -> None:
    w = corp
    h6 = _lan_host_through_r(w, v6=True)
    assert whoami(w.c.host, h6) == w.corp.ip6(w.r)


@group
def test_without_snat_the_lan_host_sees_the_client_and_needs_a_route_back(corp: Corp) -> None:
    w = corp
    h_ip = _lan_host_through_r(w)
    daemon = w.r.daemon
    try:
        w.r.cli("set", "--snat-subnet-routes=false")
        # No masquerade and no route back: the LAN host's answers have nowhere to go.
        eventually(lambda: whoami(w.c.host, h_ip) is None, "r to stop masquerading")
        assert not reachable(w.c, h_ip)
        w.corp.route_tailnet_via(w.h, w.r)
        seen = eventually(lambda: whoami(w.c.host, h_ip), "the LAN host to answer c through its route back")
        assert seen == w.c.ip()
        assert reachable(w.c, h_ip)
        assert w.r.daemon is daemon and daemon.poll() is None  # `tailpy set` restarted nothing
    finally:
        _baseline(w)
    eventually(lambda: whoami(w.c.host, h_ip) == w.corp.ip(w.r), "r to masquerade again")


@group
def test_an_unapproved_route_is_not_served_until_approved(corp: Corp) -> None:
    w = corp
    h_ip = _lan_host_through_r(w)
    daemons = (w.r.daemon, w.c.daemon)
    _unapprove(w.net, "r", SUBNET)
    eventually(lambda: SUBNET not in allowed_ips(w.c, "r"), "r's route to leave c's netmap")
    assert SUBNET not in primary_routes(w.c, "r")
    eventually(lambda: route_dev(w.c.host, h_ip) != TUN, "c to remove the route")
    _unreachable(w.c, h_ip)
    row = route_row(w.net, "r")
    assert SUBNET in row["advertised"] and SUBNET not in row["approved"], row
    assert route_state(w.net, "r", SUBNET) == "awaiting approval"
    own = w.r.status()["self"]
    assert SUBNET in own["advertised_routes"] and SUBNET not in own["approved_routes"], own
    assert SUBNET not in own["primary_routes"], own
    assert "awaiting" in w.r.cli("status")

    _approve(w.net, "r", SUBNET)
    _reaches(w.c, h_ip, w.corp.ip(w.r), "c to reach the LAN host once the route is approved")
    assert (w.r.daemon, w.c.daemon) == daemons and all(d is not None and d.poll() is None for d in daemons)
    assert SUBNET in route_row(w.net, "r")["approved"]


@group
def test_autoapprovers_approve_a_route_advertised_with_set(corp: Corp) -> None:
    w = corp
    _baseline(w)
    try:
        set_policy(w.net, AUTO_APPROVE)
        w.r.cli("set", f"--advertise-routes={SUBNET},{SUBNET6},{AUTO_PREFIX}")
        eventually(
            lambda: AUTO_PREFIX in route_row(w.net, "r")["approved"], "autoApprovers to approve the route"
        )
        eventually(lambda: AUTO_PREFIX in primary_routes(w.c, "r"), "c's netmap to show the new route")
        assert route_dev(w.c.host, "203.0.113.9") == TUN
        assert SUBNET in primary_routes(w.c, "r")  # the other routes stay served
    finally:
        w.r.cli("set", f"--advertise-routes={SUBNET},{SUBNET6}")
        _baseline(w)
    eventually(
        lambda: AUTO_PREFIX not in primary_routes(w.c, "r"), "the route to go when r stops advertising it"
    )


@group
def test_a_policy_without_the_cidr_blocks_it_and_one_naming_it_allows_it(corp: Corp) -> None:
    w = corp
    h_ip = _lan_host_through_r(w)
    try:
        set_policy(w.net, OPS_TO_EVERYTHING_ALICE_TO_NODES)
        eventually(lambda: SUBNET not in allowed_ips(w.c, "r"), "the route to leave c's view of r")
        eventually(lambda: not reachable(w.c, h_ip), "c to lose the LAN")
        assert whoami(w.c.host, h_ip) is None
        assert reachable(w.c, w.r.ip())  # the router itself stays reachable
        set_policy(w.net, ALICE_TO_NODES_AND_CORP)
        _reaches(w.c, h_ip, w.corp.ip(w.r), "c to reach the LAN once a rule names its CIDR")
    finally:
        _baseline(w)


@group
def test_status_shows_routes_and_the_primary_router(corp: Corp) -> None:
    w = corp
    _baseline(w)
    eventually(lambda: set(primary_routes(w.c, "r")) == {SUBNET, SUBNET6}, "r's routes in c's view")
    st = json.loads(w.c.cli("status", "--json"))
    pr = next(p for p in st["peers"] if p["name"] == "r")
    assert set(pr["primary_routes"]) == {SUBNET, SUBNET6}
    assert {SUBNET, SUBNET6} <= set(pr["allowed_ips"])
    assert pr["exit_node_option"] is False and pr["exit_node"] is False
    assert st["exit_node"] is None
    own = json.loads(w.r.cli("status", "--json"))["self"]
    for k in ("advertised_routes", "approved_routes", "primary_routes"):
        assert {SUBNET, SUBNET6} <= set(own[k]), (k, own)
    table = w.c.cli("status")
    assert SUBNET in table and SUBNET6 in table, table
    own_table = w.r.cli("status")
    assert SUBNET in own_table and "primary" in own_table, own_table


# -- failover between two routers ------------------------------------------------------------------------


def _primary_of(client: LabNode, routers: list[LabNode]) -> list[str]:
    """Names of the routers serving SUBNET in ``client``'s netmap (peers missing from it count as not)."""
    out = []
    for r in routers:
        p = peer(client, r.name)
        if p is not None and SUBNET in (p.get("primary_routes") or []):
            out.append(r.name)
    return out


def _back(node: LabNode) -> None:
    """Start ``node``'s tailpyd again (its state file brings it up); wait until it runs, connected."""
    node.start_daemon()
    wait_for(
        lambda: (s := node.status())["backend_state"] == "Running" and s["control_connected"],
        timeout=SETTLE,
        what=f"{node.name} to come back",
    )


@pytest.mark.xdist_group("routes_failover")
def test_failover_between_two_routers_under_a_running_ping(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    for user in ("ops", "alice"):
        net.control("users", "create", user)
    # A policy (not allow-all): the standby's packet filter must already accept the LAN's prefix from c,
    # so that failover needs no filter change.
    set_policy(net, ALICE_TO_NODES_AND_CORP)
    r1, r2 = net.add_node("r1"), net.add_node("r2")
    sub = subnet_behind(net, [r1, r2])
    ops = key(net, "ops")
    for r in (r1, r2):
        r.up(ops, flags=("--advertise-routes", SUBNET))
        _approve(net, r.name, SUBNET)
    c = net.add_node("c")
    c.up(key(net, "alice"), flags=("--accept-routes",))
    h = sub.add_host("h")
    serve_whoami(h)
    h_ip = sub.ip(h)
    routers = [r1, r2]

    # r1 registered first (lowest id): it is the primary, r2 the standby.
    eventually(lambda: _primary_of(c, routers) == ["r1"], "r1 to be primary in c's netmap")
    assert (route_state(net, "r1", SUBNET), route_state(net, "r2", SUBNET)) == ("primary", "standby")
    _reaches(c, h_ip, sub.ip(r1), "c to reach the LAN host")
    assert route_row(net, "r2")["approved"] == [SUBNET]

    # 20 probes a second: a loss-count fine enough to see a failover shorter than a second.
    loop = PingLoop(c.host, h_ip, net.root, interval=0.05)
    eventually(lambda: loop.received() >= 20, "the ping loop to get answers")
    at_kill = loop.last_seq()
    r1.kill_daemon()
    eventually(lambda: loop.answered_since(at_kill) >= 20, "pings to resume through r2", timeout=60)
    eventually(lambda: _primary_of(c, routers) == ["r2"], "r2 to be primary in c's netmap")
    assert whoami(c.host, h_ip) == sub.ip(r2)

    # r1 comes back: r2 stays primary (no flapping), r1 is the standby again.
    _back(r1)
    eventually(lambda: (p := peer(c, "r1")) is not None and p["online"], "c to see r1 online again")
    since = loop.last_seq()
    eventually(lambda: loop.answered_since(since) >= 40, "pings to keep flowing after r1 returned")
    assert _primary_of(c, routers) == ["r2"]
    assert whoami(c.host, h_ip) == sub.ip(r2)
    assert (route_state(net, "r1", SUBNET), route_state(net, "r2", SUBNET)) == ("standby", "primary")
    stats = loop.stop()
    print(f"failover ping loss: {stats}")
    # The outage is r1's death until c moved to r2: a few seconds, never the whole run.
    assert stats.received > 0 and stats.lost < stats.sent / 2, stats

    # Both down: nobody serves the route, the LAN is unreachable.
    r1.kill_daemon()
    r2.kill_daemon()
    eventually(lambda: _primary_of(c, routers) == [], "the route to be served by nobody")
    assert not reachable(c, h_ip)
    for name in ("r1", "r2"):
        assert SUBNET not in row_primary(route_row(net, name)), route_row(net, name)
        assert route_state(net, name, SUBNET) == "offline"

    # Only r2 returns: it serves again.
    _back(r2)
    eventually(lambda: _primary_of(c, routers) == ["r2"], "r2 to serve again")
    _reaches(c, h_ip, sub.ip(r2), "c to reach the LAN host through r2")

    # r1 back as the standby; then r2's host vanishes without a word (every packet in and out of its
    # namespace dropped: no FIN, no RST, tailpyd still running). Control notices by the short keepalive and
    # TCP user timeout of a router's map stream, and c's pings move to r1.
    _back(r1)
    eventually(lambda: route_state(net, "r1", SUBNET) == "standby", "r1 to be the standby again")
    loop = PingLoop(c.host, h_ip, net.root, interval=0.05)
    eventually(lambda: loop.received() >= 20, "the ping loop to get answers through r2")
    at_vanish = loop.last_seq()
    r2.host.run(
        ["nft", "-f", "-"],
        input="""table inet vanish {
  chain input_all {
    type filter hook input priority -300; policy drop;
    iifname "lo" accept
  }
  chain output_all {
    type filter hook output priority -300; policy drop;
    oifname "lo" accept
  }
  chain forward_all {
    type filter hook forward priority -300; policy drop;
  }
}
""",
    )
    eventually(lambda: loop.answered_since(at_vanish) >= 20, "pings to resume through r1", timeout=60)
    assert _primary_of(c, routers) == ["r1"]
    stats = loop.stop()
    print(f"vanished primary router, ping loss: {stats}")
    r2.host.run(["nft", "delete", "table", "inet", "vanish"])
