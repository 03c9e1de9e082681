"""Exit nodes end to end with real traffic. Node ``c`` sits behind an endpoint-independent NAT on a LAN of its
own (with a plain ``printer`` host beside it); exit node ``e`` (``tailpy up --advertise-exit-node``, approved
with ``tailpy control routes approve e --exit-node``) and a ``web`` host outside the tailnet sit on the lab's
internet, beside control (and its DERP and STUN) and a DNS resolver.

* ``tailpy set --exit-node=e``: the web host sees ``e``'s address instead of ``c``'s NAT; ``c``'s own underlay
  traffic (control, DERP and STUN on the control host, WireGuard datagrams to ``e``'s endpoint) still leaves
  through ``c``'s LAN interface, never into the TUN: nftables counters in ``c``'s namespace, the route the
  kernel picks for a packet with the bypass mark, and ``c`` reconnecting to a restarted control server while
  the exit node is in use. IPv6 goes through e too (c's site has none). MagicDNS names and forwarded names
  keep resolving.
* ``tailpy set --exit-node=`` puts ``ip rule`` and every routing table back exactly as they were.
* ``--exit-node-allow-lan-access`` lets ``c`` reach its own LAN directly; without it the LAN goes into the
  tunnel too (and ``e`` has no way there).
* ``tailpy exit-node list`` shows ``e`` (and which one is in use); choosing a node that is not an exit node,
  or an unknown one, is one sentence of error.
* The policy decides who may use an exit node (``autogroup:internet``); an exit node in use that stops being
  allowed keeps ``c``'s traffic in the tunnel (fails closed) with a health warning. ``autoApprovers``
  ``exitNode`` approves a second exit node as it advertises.
* kill -9 of ``c``'s tailpyd while it uses the exit node: ``c`` reaches the web host directly at once (the
  routes into the TUN went with it), and after ``tailpy down`` (which cleans up after a dead daemon) no
  policy-routing rule of tailpyd is left.

Assertions wait for the wanted state (polling up to a generous bound), never for a time. The tests share one
tailnet (module fixture, one xdist group); each puts ``c``'s exit-node preferences back when it ends.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _routes_lab import ALLOW_ALL, allowed_ips, eventually, peer, route_row, set_policy, tun_routes

from tailpy.lab import Host, Lab
from tailpy.lab.dns import Dnsmasq, dnsmasq_reason
from tailpy.lab.subnets import Counters, policy_routing, route_dev, serve_whoami, whoami
from tailpy.lab.tailnet import CONTROL_PORT, WG_PORT, LabNode, LabTailnet, tailpy_argv

pytestmark = [
    pytest.mark.lab,
    pytest.mark.xdist_group("exit_node"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="`nft` not found: install Debian's nftables"),
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig not found: install Debian's bind9-dnsutils"),
    pytest.mark.skipif(dnsmasq_reason() is not None, reason=str(dnsmasq_reason())),
]

TUN = "tailpy0"
BYPASS_MARK = 0x80000
UPSTREAM = "192.0.2.53"
STUN_PORT = 3478
EXIT_ROUTES = {"0.0.0.0/0", "::/0"}


@dataclass
class World:
    net: LabTailnet
    c: LabNode
    e: LabNode
    web: Host
    printer: Host

    @property
    def c_public(self) -> str:
        """What hosts on the internet see ``c`` as when it goes out directly: its NAT's public address."""
        assert self.c.site is not None
        return self.c.site.router.public_ip

    @property
    def c_lan_if(self) -> str:
        return self.c.lan.name


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        net = LabTailnet(lab)
        net.resolv_conf = f"# lab host resolver\nnameserver {UPSTREAM}\noptions timeout:2\n"
        net.start_control()
        web = net.public_host("web")
        serve_whoami(web)
        dns = net.public_host("dns")
        dns.add_address("lan0", f"{UPSTREAM}/24")
        Dnsmasq(dns, UPSTREAM, {"www.example": [net.lan.ip(web)]}, net.root / "dns")
        key = net.authkey(reusable=True)
        e = net.add_node("e")
        e.up(key, flags=("--advertise-exit-node",))
        net.control("routes", "approve", "e", "--exit-node")
        c = net.add_node("c", behind="eim")
        c.up(key)
        for n in (c, e):
            n.wait_peers(1)
        printer = lab.host("printer")
        c.lan.attach(printer)
        serve_whoami(printer)
        yield World(net, c, e, web, printer)


def _off(w: World) -> None:
    w.c.cli("set", "--exit-node=", "--exit-node-allow-lan-access=false")


def _offers_exit(w: World) -> bool:
    return set(allowed_ips(w.c, "e")) >= EXIT_ROUTES


def _v6(host: Host) -> str:
    """``host``'s IPv6 address on the internet LAN."""
    return next(c.split("/")[0] for c in host.addresses["lan0"] if ":" in c)


def _home_derp_connected(node: LabNode) -> bool:
    derp = node.status()["derp"]
    return derp is not None and any(c["home"] and c["connected"] for c in derp["connections"])


def _on(w: World, *, with_up: bool = False) -> None:
    """Use ``e`` as ``c``'s exit node (``tailpy set``, or ``tailpy up`` again) and wait until it carries."""
    eventually(lambda: _offers_exit(w), "c's netmap to offer e as exit node")
    if with_up:
        w.c.up(flags=("--exit-node", "e"))
    else:
        w.c.cli("set", "--exit-node=e")
    web_ip = w.net.lan.ip(w.web)
    eventually(lambda: whoami(w.c.host, web_ip) == w.e.lan_ip(), "the web host to see e's address")


def test_exit_node_carries_traffic_and_the_underlay_stays_outside(world: World) -> None:
    w = world
    _off(w)
    web_ip, control_ip, e_ip = w.net.lan.ip(w.web), w.net.lan.ip(w.net.control_host), w.e.lan_ip()
    assert whoami(w.c.host, web_ip) == w.c_public
    before = policy_routing(w.c.host)
    lan = w.c_lan_if
    counters = Counters(
        w.c.host,
        {
            "control_direct": f'oifname "{lan}" ip daddr {control_ip} tcp dport {CONTROL_PORT}',
            "control_tunnel": f'oifname "{TUN}" ip daddr {control_ip}',
            "wireguard_direct": f'oifname "{lan}" ip daddr {e_ip} udp dport {WG_PORT}',
            "wireguard_tunnel": f'oifname "{TUN}" ip daddr {e_ip} udp dport {WG_PORT}',
            "dns_tunnel": f'oifname "{TUN}" ip daddr {UPSTREAM} udp dport 53',
        },
    )
    try:
        _on(w)
        st = w.c.status()
        assert st["exit_node"] in ("e", w.e.ip(), f"e.{st['domain']}"), st["exit_node"]
        pe = peer(w.c, "e")
        assert pe is not None and pe["exit_node"] is True and pe["exit_node_option"] is True, pe
        assert "exit node" in w.c.cli("status")

        # IPv6 too: c's site has none at all, yet it reaches the web host's IPv6 address through e.
        seen6 = eventually(
            lambda: whoami(w.c.host, _v6(w.web)), "c to reach the web host over IPv6 through e"
        )
        assert seen6 == _v6(w.e.host)

        # Everything else goes into the tunnel; packets with the bypass mark keep the main table's route.
        assert route_dev(w.c.host, web_ip) == TUN
        assert route_dev(w.c.host, "203.0.113.77") == TUN
        for address in (control_ip, e_ip, web_ip):
            assert route_dev(w.c.host, address, mark=BYPASS_MARK) == lan, address

        # Control restarts: c reconnects (control and DERP over TCP, STUN over UDP, all to the control
        # host) through its own default route, while the exit node stays in use.
        direct = counters.read()["control_direct"]
        w.net.stop_control()
        eventually(lambda: not w.c.status()["control_connected"], "c to notice control is gone")
        w.net.start_control()
        eventually(
            lambda: w.c.status()["control_connected"], "c to reconnect to control through the exit node"
        )
        eventually(lambda: _home_derp_connected(w.c), "c to reconnect to its home DERP")
        assert whoami(w.c.host, web_ip) == w.e.lan_ip()
        got = counters.read()
        assert got["control_direct"] > direct, got
        assert got["wireguard_direct"] > 0, got
        assert got["control_tunnel"] == 0 and got["wireguard_tunnel"] == 0, got

        # DNS: MagicDNS names from tailpyd, outside names forwarded to the upstream, both answered.
        domain = st["domain"]
        got_e = w.c.host.run(["dig", "+short", "+time=2", "+tries=2", "@100.100.100.100", f"e.{domain}"])
        assert got_e.stdout.split() == [w.e.ip()]
        fwd = w.c.host.run(["dig", "+short", "+time=2", "+tries=2", "@100.100.100.100", "www.example"])
        assert fwd.stdout.split() == [web_ip]
        assert w.c.host.run(["getent", "ahostsv4", "e"]).stdout.split()[0] == w.e.ip()
        assert counters.read()["dns_tunnel"] == 0
    finally:
        counters.remove()
        _off(w)

    # Off again: the routing is exactly what it was, and c goes out directly.
    eventually(lambda: whoami(w.c.host, web_ip) == w.c_public, "c to go out directly again")
    assert policy_routing(w.c.host) == before
    assert w.c.status()["exit_node"] is None


def test_allow_lan_access_keeps_the_lan_direct(world: World) -> None:
    w = world
    _off(w)
    printer_ip = w.c.lan.ip(w.printer)
    assert whoami(w.c.host, printer_ip) == w.c.lan_ip()
    try:
        _on(w)
        # Without the flag the LAN goes into the tunnel too, and e has no way to c's LAN.
        assert route_dev(w.c.host, printer_ip) == TUN
        assert whoami(w.c.host, printer_ip) is None
        w.c.cli("set", "--exit-node-allow-lan-access")
        eventually(lambda: whoami(w.c.host, printer_ip) == w.c.lan_ip(), "c to reach its LAN directly")
        assert route_dev(w.c.host, printer_ip) == w.c_lan_if
        assert whoami(w.c.host, w.net.lan.ip(w.web)) == w.e.lan_ip()  # the rest still goes through e
    finally:
        _off(w)
    eventually(lambda: whoami(w.c.host, printer_ip) == w.c.lan_ip(), "c to reach its LAN with no exit node")


def _exit_rows(node: LabNode) -> list[dict[str, Any]]:
    """``tailpy exit-node list --json`` rows (a list, or under ``exit_nodes``/``peers``)."""
    listed = json.loads(node.cli("exit-node", "list", "--json"))
    rows = listed if isinstance(listed, list) else listed.get("exit_nodes", listed.get("peers", []))
    assert isinstance(rows, list), listed
    return rows


def _exit_rows_names(node: LabNode) -> list[str]:
    return [str(r.get("name", "")).split(".")[0] for r in _exit_rows(node)]


def test_exit_node_list_and_bad_choices(world: World) -> None:
    w = world
    _off(w)
    eventually(lambda: _offers_exit(w), "c's netmap to offer e as exit node")
    assert _exit_rows_names(w.c) == ["e"]
    assert "e" in w.c.cli("exit-node", "list")
    # e's own view: it offers, it is not a candidate for itself.
    own = w.e.status()["self"]
    assert set(own["approved_routes"]) >= EXIT_ROUTES, own
    for bad, word in (("nosuch", "nosuch"), ("c", "own"), (w.e.lan_ip(), "")):
        done = w.c.host.run(tailpy_argv("set", f"--exit-node={bad}", "--socket", w.c.socket), check=False)
        if bad == w.e.lan_ip():
            # an underlay address is no tailnet node: refused like an unknown name
            assert done.returncode != 0, done
        else:
            assert done.returncode != 0 and word in done.stderr.lower(), done
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert w.c.status()["exit_node"] is None
    try:
        _on(w)
        rows = _exit_rows(w.c)
        assert [r.get("in_use", r.get("selected")) for r in rows] == [True], rows
    finally:
        _off(w)


def test_kill_9_while_using_the_exit_node_leaves_no_blackhole(world: World) -> None:
    w = world
    _off(w)
    web_ip = w.net.lan.ip(w.web)
    try:
        _on(w, with_up=True)
        assert "52" in w.c.host.run(["ip", "rule"]).stdout
        w.c.kill_daemon()
        # The TUN went with the process, and with it the routes into it.
        assert TUN not in w.c.host.run(["ip", "link"]).stdout
        direct_at_once = whoami(w.c.host, web_ip)
        # Nothing left routes into a TUN that is gone: c goes out directly even before any cleanup.
        assert direct_at_once == w.c_public, direct_at_once
        argv = tailpy_argv("down", "--socket", w.c.socket, "--state-dir", str(w.c.state_dir))
        done = w.c.host.run(argv, check=False, timeout=120)
        assert done.returncode == 0, done.stderr
        assert whoami(w.c.host, web_ip) == w.c_public
        assert tun_routes(w.c) == ""
        rules, routes = policy_routing(w.c.host)
        assert "lookup 52" not in rules and "0x80000" not in rules, rules
        assert TUN not in routes, routes
    finally:
        if w.c.daemon is None:
            w.c.start_daemon()
            eventually(lambda: w.c.status()["backend_state"] == "Running", "c to come back")
        _off(w)
    eventually(lambda: whoami(w.c.host, web_ip) == w.c_public, "c to go out directly")


def test_strict_rp_filter_with_an_exit_node_is_a_health_warning_saying_what_to_do(world: World) -> None:
    """With net.ipv4.conf.all.rp_filter=1 the replies to c's underlay traffic are dropped while e carries
    its internet traffic: `tailpy set --exit-node` prints the warning, `tailpy status` shows it with the
    command that fixes it, and it clears once rp_filter is loose (tailpyd does not change it itself)."""
    w = world
    _off(w)
    before = w.c.host.run(["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).stdout.strip()
    fix = "sysctl -w net.ipv4.conf.all.rp_filter=2"

    def router_warning() -> str:
        return next((h["text"] for h in w.c.status()["health"] if h["name"] == "router"), "")

    try:
        w.c.host.sysctl(net__ipv4__conf__all__rp_filter=1)
        assert router_warning() == ""  # no exit node in use: strict filtering harms nothing
        eventually(lambda: _offers_exit(w), "c's netmap to offer e as exit node")
        done = w.c.host.run(tailpy_argv("set", "--exit-node=e", "--socket", w.c.socket), check=False)
        assert done.returncode == 0, done.stderr
        assert "warning: strict reverse-path filtering (rp_filter=1)" in done.stderr and fix in done.stderr
        text = router_warning()
        assert "rp_filter=1" in text and fix in text, text
        assert "rp_filter=1" in w.c.cli("status")
        assert w.c.host.run(["sysctl", "-n", "net.ipv4.conf.all.rp_filter"]).stdout.strip() == "1"
        w.c.host.sysctl(net__ipv4__conf__all__rp_filter=2)
        eventually(lambda: router_warning() == "", "the router warning to clear")
        web_ip = w.net.lan.ip(w.web)
        eventually(lambda: whoami(w.c.host, web_ip) == w.e.lan_ip(), "the web host to see e's address")
    finally:
        w.c.host.sysctl(net__ipv4__conf__all__rp_filter=before or 0)
        _off(w)


NO_INTERNET = """{
  // every node reaches every node; nobody may use an exit node
  "acls": [{"action": "accept", "src": ["*"], "dst": ["autogroup:member:*"]}],
}
"""

WITH_INTERNET = """{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["autogroup:member:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:internet:*"]},
  ],
}
"""


def test_the_policy_decides_who_may_use_the_exit_node_and_a_lost_exit_node_fails_closed(world: World) -> None:
    w = world
    _off(w)
    web_ip = w.net.lan.ip(w.web)
    try:
        _on(w)
        set_policy(w.net, NO_INTERNET)
        eventually(lambda: not _offers_exit(w), "the exit routes to leave c's view of e")
        # The chosen exit node no longer carries c's traffic: it stays in the tunnel (fail closed, no
        # silent fallback to c's own address) and a health warning says why.
        eventually(lambda: whoami(w.c.host, web_ip) is None, "c's traffic to stop going out through e")
        assert route_dev(w.c.host, web_ip) == TUN
        health = w.c.status()["health"]
        assert any("exit" in (h["name"] + " " + h["text"]).lower() for h in health), health
        assert w.c.pings(w.e.ip())  # e itself is still a peer c reaches

        set_policy(w.net, WITH_INTERNET)
        eventually(lambda: _offers_exit(w), "e to be offered again")
        eventually(lambda: whoami(w.c.host, web_ip) == w.e.lan_ip(), "c to go out through e again")
    finally:
        set_policy(w.net, ALLOW_ALL)
        _off(w)
    eventually(lambda: whoami(w.c.host, web_ip) == w.c_public, "c to go out directly")


AUTO_EXIT = """{
  "autoApprovers": {"exitNode": ["default@"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


def test_autoapprovers_approve_an_exit_node(world: World) -> None:
    """Runs last: it leaves a second exit node (offline) in the tailnet."""
    w = world
    _off(w)
    try:
        set_policy(w.net, AUTO_EXIT)
        e2 = w.net.add_node("e2")
        e2.up(w.net.authkey(reusable=False), flags=("--advertise-exit-node",))
        eventually(
            lambda: set(route_row(w.net, "e2")["approved"]) >= EXIT_ROUTES,
            "autoApprovers to approve e2's exit routes",
        )
        eventually(lambda: set(allowed_ips(w.c, "e2")) >= EXIT_ROUTES, "c's netmap to offer e2 as exit node")
        assert sorted(_exit_rows_names(w.c)) == ["e", "e2"]
        w.c.cli("set", "--exit-node=e2")
        web_ip = w.net.lan.ip(w.web)
        eventually(lambda: whoami(w.c.host, web_ip) == e2.lan_ip(), "the web host to see e2's address")
    finally:
        _off(w)
        set_policy(w.net, ALLOW_ALL)
        if "e2" in w.net.nodes:
            w.net.nodes["e2"].stop_daemon()
