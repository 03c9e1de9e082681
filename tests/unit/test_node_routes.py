"""A node's route preferences: the state file keeps them, `tailpy up` / `tailpy set` parse them, the data
plane's allowed IPs and the host's routing follow them (tailpy.daemon.routing), the exit node is resolved
against the netmap with a health warning when it cannot carry traffic, and status shows routes and exit
nodes (text and JSON)."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from tailpy import netmap as nm
from tailpy.cli import exit_node as exit_node_cli
from tailpy.cli import set as set_cli
from tailpy.cli import status as status_cli
from tailpy.cli import up as up_cli
from tailpy.cli.main import cli
from tailpy.cli.set import router_note
from tailpy.daemon import health as hl
from tailpy.daemon.backend import Backend
from tailpy.daemon.router import RP_FILTER_FIX, rp_filter_warning, strict_rp_filter
from tailpy.daemon.routing import (
    RoutePlan,
    RoutePrefs,
    check_exit_node,
    lan_prefixes,
    peer_allowed_ips,
    resolve_exit_node,
    route_plan,
)
from tailpy.daemon.state import NodeState, StateStore
from tailpy.errors import ConfigError
from tailpy.ipnstate import PeerStatus, SelfStatus, Status
from tailpy.keys import DiscoPrivate, MachinePrivate, MachinePublic, NodePrivate, NodePublic
from tailpy.routes import EXIT_ROUTES

LAN = "198.51.100.0/24"
LAN6 = "2001:db8:1::/64"


def node(i: int, **kw: Any) -> nm.Node:
    base = nm.Node(
        id=i,
        name=f"n{i}",
        hostname=f"host{i}",
        node_key=NodePublic(bytes([i]) * 32),
        machine_key=MachinePublic(bytes([i + 100]) * 32),
        addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
        online=True,
    )
    return dataclasses.replace(base, **kw)


def router(i: int, *routes: str, **kw: Any) -> nm.Node:
    """Peer ``i`` whose allowed IPs (as control sends them) carry ``routes``."""
    n = node(i, **kw)
    return dataclasses.replace(n, allowed_ips=(*n.addresses, *routes))


def netmap(*peers: nm.Node) -> nm.NetMap:
    return nm.NetMap(node(1), {p.id: p for p in peers}, "tail.example")


# -- the state file ------------------------------------------------------------------------------------------


def test_route_prefs_persist_and_old_state_files_load_with_defaults(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    s = store.load_or_create()
    assert (s.advertise_routes, s.accept_routes, s.exit_node) == ((), False, "")
    assert (s.exit_node_allow_lan_access, s.snat_subnet_routes) == (False, True)
    s.advertise_routes = (LAN, *EXIT_ROUTES)
    s.accept_routes, s.exit_node, s.exit_node_allow_lan_access, s.snat_subnet_routes = True, "n2", True, False
    store.save(s)
    got = StateStore(tmp_path).load_or_create()
    assert got.advertise_routes == (LAN, *EXIT_ROUTES)
    assert (got.accept_routes, got.exit_node, got.exit_node_allow_lan_access) == (True, "n2", True)
    assert got.snat_subnet_routes is False

    old = NodeState(MachinePrivate.generate(), NodePrivate.generate()).to_json()
    for k in (
        "advertise_routes",
        "accept_routes",
        "exit_node",
        "exit_node_allow_lan_access",
        "snat_subnet_routes",
    ):
        del old[k]
    back = NodeState.from_json(json.loads(json.dumps(old)))
    assert (back.advertise_routes, back.accept_routes, back.exit_node) == ((), False, "")
    assert (back.exit_node_allow_lan_access, back.snat_subnet_routes) == (False, True)


# -- flags ---------------------------------------------------------------------------------------------------


def test_up_and_set_route_flags() -> None:
    def params(cmd: Any, *args: str) -> dict[str, Any]:
        return dict(cmd.make_context(cmd.name, list(args)).params)

    for cmd in (up_cli.command, set_cli.command):
        p = params(cmd)
        assert p["advertise_routes"] is None and p["accept_routes"] is None and p["exit_node"] is None
        p = params(cmd, "--accept-routes", "--exit-node", "n2", "--advertise-exit-node")
        assert (p["accept_routes"], p["exit_node"], p["advertise_exit_node"]) == (True, "n2", True)
        p = params(cmd, "--accept-routes=false", "--snat-subnet-routes=false", "--exit-node-allow-lan-access")
        assert (p["accept_routes"], p["snat_subnet_routes"], p["exit_node_allow_lan_access"]) == (
            False,
            False,
            True,
        )
    for cmd in (up_cli.command, set_cli.command):  # the error names the values people type, not ""
        with pytest.raises(click.BadParameter) as bad:
            params(cmd, "--accept-routes=maybe")
        assert "'maybe' is not a boolean: use true or false (or 1/0, yes/no, on/off)" in str(bad.value)
        assert params(cmd, "--accept-routes=No")["accept_routes"] is False
    prefs = set_cli.route_prefs(f"{LAN}, 2001:DB8:1::/64", None, True, "", None, None)
    assert prefs == {"advertise_routes": [LAN, LAN6], "accept_routes": True, "exit_node": ""}
    assert set_cli.route_prefs(None, None, None, None, None, None) == {}
    assert set_cli.route_prefs("", False, None, None, None, None) == {
        "advertise_routes": [],
        "advertise_exit_node": False,
    }


@pytest.mark.parametrize(
    ("routes", "says"),
    [
        ("198.51.100.1/24", "has host bits set: did you mean 198.51.100.0/24?"),
        ("not-a-prefix", "is not an IP prefix"),
        ("0.0.0.0/0", "use --advertise-exit-node"),
        ("100.64.1.0/24", "overlaps the tailnet's own range"),
    ],
)
def test_bad_advertise_routes_are_one_sentence_before_any_daemon(
    tmp_path: Path, routes: str, says: str
) -> None:
    sock = str(tmp_path / "none.sock")
    for args in (["up", "--advertise-routes", routes], ["set", "--advertise-routes", routes]):
        got = CliRunner().invoke(cli, [*args, "--socket", sock])
        assert got.exit_code == 1, got.output
        assert says in got.output and got.output.startswith("tailpy: ") and got.output.count("\n") == 1


def test_set_without_flags_is_a_usage_error(tmp_path: Path) -> None:
    got = CliRunner().invoke(cli, ["set", "--socket", str(tmp_path / "none.sock")])
    assert got.exit_code == 2 and "at least one preference" in got.output


# -- allowed IPs, exit node, routing -------------------------------------------------------------------------


def test_peer_allowed_ips_follow_accept_routes_and_the_exit_node() -> None:
    r = router(2, LAN, LAN6, *EXIT_ROUTES)
    addrs = list(r.addresses)
    assert peer_allowed_ips(r, accept_routes=False, exit_node=False) == addrs
    assert peer_allowed_ips(r, accept_routes=True, exit_node=False) == [*addrs, LAN, LAN6]
    assert peer_allowed_ips(r, accept_routes=False, exit_node=True) == [*addrs, *EXIT_ROUTES]
    assert peer_allowed_ips(r, accept_routes=True, exit_node=True) == [*addrs, LAN, LAN6, *EXIT_ROUTES]
    plain = node(3)  # an old control server: no allowed_ips, the addresses
    assert peer_allowed_ips(plain, accept_routes=True, exit_node=True) == list(plain.addresses)


def test_exit_node_resolution_by_name_fqdn_and_ip() -> None:
    exit2 = router(2, *EXIT_ROUTES)
    nmap = netmap(exit2, router(3, LAN), node(4, online=False), router(5, *EXIT_ROUTES, online=False))
    for want in ("n2", "N2", "n2.tail.example", "n2.tail.example.", "100.64.0.2", "fd7a:115c:a1e0::2"):
        got = resolve_exit_node(nmap, want)
        assert got.node == exit2 and got.usable, want
        check_exit_node(nmap, want)
    assert resolve_exit_node(nmap, "") == resolve_exit_node(None, "")
    assert not resolve_exit_node(nmap, "").usable
    assert "not in this tailnet" in resolve_exit_node(nmap, "nope").problem
    assert "this node itself" in resolve_exit_node(nmap, "100.64.0.1").problem
    assert "does not offer" in resolve_exit_node(nmap, "n3").problem
    off = resolve_exit_node(nmap, "n5")
    assert off.node is not None and off.node.id == 5 and "offline" in off.problem
    assert "no netmap" in resolve_exit_node(None, "n2").problem
    with pytest.raises(ConfigError, match="no peer 'nope'"):
        check_exit_node(nmap, "nope")
    with pytest.raises(ConfigError, match="its own exit node"):
        check_exit_node(nmap, "n1.tail.example")
    with pytest.raises(ConfigError, match="n3 is not an exit node"):
        check_exit_node(nmap, "n3")
    check_exit_node(nmap, "n5")  # offline: may be chosen (traffic waits for it)
    check_exit_node(None, "anything")  # nothing to check against yet


def test_route_plan() -> None:
    peers = [router(2, LAN, *EXIT_ROUTES), router(3, "203.0.113.0/24"), node(4)]
    base = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
    assert route_plan(RoutePrefs(), peers) == RoutePlan(routes=base)
    assert route_plan(RoutePrefs(accept_routes=True), peers).routes == (*base, LAN, "203.0.113.0/24")
    # its own advertised subnet is reached on its LAN, never through another router
    own = RoutePrefs(advertise_routes=(LAN, *EXIT_ROUTES), accept_routes=True, snat_subnet_routes=False)
    plan = route_plan(own, peers)
    assert plan.routes == (*base, "203.0.113.0/24")
    assert plan.subnet_routes == (LAN, *EXIT_ROUTES) and plan.snat_subnet_routes is False  # it forwards both
    lan = ("192.0.2.0/24",)
    plan = route_plan(RoutePrefs(exit_node="n2"), peers, lan)
    assert plan.routes == (*base, *EXIT_ROUTES) and plan.local_routes == ()
    plan = route_plan(RoutePrefs(exit_node="gone", exit_node_allow_lan_access=True), [], lan)
    assert plan.routes == (*base, *EXIT_ROUTES) and plan.local_routes == lan  # fail closed: still routed
    nets = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "127.0.0.0/8", "fe80::/64", "100.64.0.0/10")]
    assert lan_prefixes(
        [*nets, ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("10.1.1.1/32")]
    ) == ("192.0.2.0/24",)


# -- the backend ---------------------------------------------------------------------------------------------


class RecordingDevice:
    """The data plane as the backend drives it: each peer's allowed IPs as last set."""

    listen_port = 41641
    tun_name = "tailpy0"

    def __init__(self, key: bytes) -> None:
        self.allowed: dict[bytes, list[str]] = {}
        self.set_calls = 0
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
        return [], []

    def set_path(self, public_key: bytes, path: str, *, confirmed: bool = True) -> None:
        pass

    def retry_handshake(self, public_key: bytes) -> bool:
        return False

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        pass

    def send_datagram(self, data: bytes, endpoint: str) -> None:
        pass

    def set_peer(
        self, public_key: bytes, *, allowed_ips: list[str], endpoint: str | None = None, **_: Any
    ) -> None:
        self.allowed[public_key] = list(allowed_ips)
        self.set_calls += 1

    def set_filter(self, rules: Any) -> None:
        pass

    def remove_peer(self, public_key: bytes) -> bool:
        return self.allowed.pop(public_key, None) is not None

    def set_private_key(self, private_key: bytes) -> None:
        pass

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)

    def peers(self) -> list[dict[str, Any]]:
        return []

    def stats(self) -> dict[str, Any]:
        return {}


class FakeRouter:
    def __init__(self, tun: str) -> None:
        self.tun = tun
        self.applied: list[tuple[tuple[str, ...], RoutePlan]] = []
        self.closed = False
        self.warned: list[str] = []  # what warnings() says (a test sets it)

    def apply(self, addresses: tuple[str, ...], plan: RoutePlan) -> None:
        self.applied.append((addresses, plan))

    def warnings(self) -> list[str]:
        return list(self.warned)

    def close(self) -> None:
        self.closed = True


async def routed_backend(tmp_path: Path) -> tuple[Backend, RecordingDevice, list[FakeRouter]]:
    routers: list[FakeRouter] = []

    def make_router(tun: str) -> FakeRouter:
        routers.append(FakeRouter(tun))
        return routers[-1]

    b = Backend(StateStore(tmp_path), RecordingDevice, configure_os=False, router_factory=make_router)
    await b.start()
    s = b.state_data
    s.node_id, s.hostname, s.login_server, s.want_running = 1, "host1", "http://192.0.2.1:8080", True
    dev = b._ensure_device()
    assert isinstance(dev, RecordingDevice) and b.conn is not None
    b.conn.stop()  # no ticks, DERP or STUN from this host
    return b, dev, routers


async def test_backend_allowed_ips_router_and_exit_node_health(tmp_path: Path) -> None:
    b, dev, routers = await routed_backend(tmp_path)
    k2, k3 = bytes([2]) * 32, bytes([3]) * 32
    exit2 = router(2, LAN, *EXIT_ROUTES)
    b.apply_netmap(netmap(exit2, router(3, "203.0.113.0/24")))
    assert dev.allowed[k2] == list(exit2.addresses)  # defaults: no routes accepted, no exit node
    assert routers[0].tun == "tailpy0"
    assert routers[0].applied[-1][1].routes == ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
    calls = dev.set_calls
    b.apply_netmap(netmap(exit2, router(3, "203.0.113.0/24")))  # the same netmap: nothing re-set
    assert dev.set_calls == calls and len(routers[0].applied) == 1

    await b.set_prefs(routes={"accept_routes": True, "exit_node": "n2.tail.example"})
    assert dev.allowed[k2] == [*exit2.addresses, LAN, *EXIT_ROUTES]
    assert dev.allowed[k3][-1] == "203.0.113.0/24"
    plan = routers[0].applied[-1][1]
    assert plan.routes[-2:] == EXIT_ROUTES and LAN in plan.routes
    assert StateStore(tmp_path).load_or_create().exit_node == "n2.tail.example"
    # the Conn's set_peer (a new direct endpoint) keeps them: the same function
    assert b.conn is not None and b.conn.options.allowed_ips(exit2) == dev.allowed[k2]
    st = b.status()
    assert st.exit_node == "n2"
    peer = next(p for p in st.peers if p.name == "n2")
    assert peer.exit_node and peer.exit_node_option and peer.allowed_ips[-2:] == EXIT_ROUTES
    assert not next(p for p in st.peers if p.name == "n3").exit_node_option
    assert not any(w.name == "exit-node" for w in st.health)

    assert not any(w.name == "router" for w in st.health)
    # the host's routing warns (strict rp_filter with an exit node): a health warning at once, and the
    # line `tailpy set --exit-node` prints
    routers[0].warned = [rp_filter_warning(["eth0"])]
    await b.set_prefs(routes={"exit_node": "n2"})
    [rp] = [w for w in b.status().health if w.name == "router"]
    assert rp.severity == "high" and "rp_filter=1) on eth0" in rp.text and RP_FILTER_FIX in rp.text
    assert router_note(b.status()) == f"warning: {rp.text}"
    routers[0].warned = []
    b.check_health()
    assert not any(w.name == "router" for w in b.status().health) and router_note(b.status()) == ""
    await b.set_prefs(routes={"exit_node": "n2.tail.example"})

    # the exit node goes offline: still routed into the tunnel (fail closed), and a health warning
    b.apply_netmap(netmap(dataclasses.replace(exit2, online=False), router(3, "203.0.113.0/24")))
    assert routers[0].applied[-1][1].routes[-2:] == EXIT_ROUTES
    assert dev.allowed[k2][-2:] == list(EXIT_ROUTES)
    warn = [w for w in b.status().health if w.name == "exit-node"]
    assert len(warn) == 1 and "n2 is offline" in warn[0].text and "dropped" in warn[0].text
    # it stops offering: no exit routes to it, still routed to the tunnel, warned
    b.apply_netmap(netmap(router(2, LAN), router(3, "203.0.113.0/24")))
    assert EXIT_ROUTES[0] not in dev.allowed[k2] and routers[0].applied[-1][1].routes[-2:] == EXIT_ROUTES
    assert "does not offer" in next(w.text for w in b.status().health if w.name == "exit-node")

    # refused choices change nothing
    for bad, says in (("nope", "no peer"), ("n1", "is this node"), ("n3", "not an exit node")):
        with pytest.raises(ConfigError, match=says):
            await b.set_prefs(routes={"exit_node": bad, "accept_routes": False})
        assert b.state_data.exit_node == "n2.tail.example" and b.state_data.accept_routes
    await b.set_prefs(routes={"exit_node": "", "accept_routes": False})
    assert dev.allowed[k2] == list(exit2.addresses)
    assert not any(w.name == "exit-node" for w in b.status().health)
    assert b.status().exit_node is None
    await b.close()
    assert routers[0].closed


async def test_userspace_node_has_no_router(tmp_path: Path) -> None:
    made: list[str] = []

    def make_router(tun: str) -> FakeRouter:
        made.append(tun)
        return FakeRouter(tun)

    class Userspace(RecordingDevice):
        def set_addresses(self, addresses: list[str]) -> None:
            pass

    b = Backend(
        StateStore(tmp_path), Userspace, configure_os=False, userspace=True, router_factory=make_router
    )
    await b.start()
    b.state_data.accept_routes = True
    b.apply_netmap(netmap(router(2, LAN)))
    assert b.conn is not None
    b.conn.stop()
    dev = b.device
    assert isinstance(dev, Userspace) and dev.allowed[bytes([2]) * 32][-1] == LAN
    assert made == []
    await b.close()


def advertised(b: Backend) -> tuple[str, ...]:
    return b.state_data.advertise_routes


async def test_set_advertise_routes_keeps_the_other_half(tmp_path: Path) -> None:
    b, _, routers = await routed_backend(tmp_path)
    b.apply_netmap(netmap(router(2, *EXIT_ROUTES)))
    await b.set_prefs(routes={"advertise_routes": [LAN]})
    assert advertised(b) == (LAN,)
    await b.set_prefs(routes={"advertise_exit_node": True})
    assert advertised(b) == (LAN, *EXIT_ROUTES)
    await b.set_prefs(routes={"advertise_routes": f"{LAN6},{LAN}"})  # the exit routes stay
    assert advertised(b) == (LAN6, LAN, *EXIT_ROUTES)
    assert routers[0].applied[-1][1].subnet_routes == (LAN6, LAN, *EXIT_ROUTES)
    await b.set_prefs(routes={"advertise_exit_node": False, "snat_subnet_routes": False})
    assert advertised(b) == (LAN6, LAN)
    assert routers[0].applied[-1][1].snat_subnet_routes is False
    assert b.status().self_node.advertised_routes == (LAN6, LAN)
    with pytest.raises(ConfigError, match="host bits"):
        await b.set_prefs(routes={"advertise_routes": ["198.51.100.1/24"]})
    with pytest.raises(ConfigError, match="true or false"):
        await b.set_prefs(routes={"accept_routes": "yes"})
    await b.set_prefs(routes={"advertise_exit_node": True})
    with pytest.raises(ConfigError, match="cannot offer itself as an exit node and use one"):
        await b.set_prefs(routes={"exit_node": "n2"})
    await b.set_prefs(routes={"advertise_exit_node": False})
    assert advertised(b) == (LAN6, LAN)
    await b.close()


# -- status --------------------------------------------------------------------------------------------------


def _status(**kw: Any) -> Status:
    me = SelfStatus(
        id=1, name="n1", fqdn="n1.tail.example", hostname="host1", user="alice@example.com", tags=(),
        os="linux", key_expiry=None, expired=False, node_key=NodePrivate.generate().public,
        machine_key=MachinePrivate.generate().public, disco_key=DiscoPrivate.generate().public,
        addresses=("100.64.0.1/32",), listen_port=41641, endpoints=(), tun="tailpy0", home_derp=0,
        home_derp_code="", advertised_routes=(LAN, "203.0.113.0/24", LAN6, *EXIT_ROUTES),
        approved_routes=(LAN, LAN6), primary_routes=(LAN,),
    )  # fmt: skip

    def peer(i: int, online: bool = True, **pkw: Any) -> PeerStatus:
        return PeerStatus(
            id=i, name=f"n{i}", fqdn=f"n{i}.tail.example", hostname=f"h{i}", user="bob@example.com", tags=(),
            os="linux", node_key=NodePublic(bytes([i]) * 32), addresses=(f"100.64.0.{i}/32",), online=online,
            last_seen=None, key_expiry=None, expired=False, home_derp=0, disco_key=None, endpoints=(),
            endpoint=None, path=None, relay_region=0, relay_region_code="", last_handshake=None, active=False,
            tx_bytes=0, rx_bytes=0, **pkw,
        )  # fmt: skip

    peers = (
        peer(2, primary_routes=("192.0.2.0/24",), allowed_ips=("100.64.0.2/32", "192.0.2.0/24", *EXIT_ROUTES),
             exit_node_option=True, exit_node=True),
        peer(3, allowed_ips=("100.64.0.3/32", *EXIT_ROUTES), exit_node_option=True, online=False),
        peer(4),
    )  # fmt: skip
    return Status(
        backend_state="Running", login_server="http://192.0.2.1:8080", control_connected=True, error="",
        auth_url="", login_pending=False, health=(), now=1000.0, self_node=me, domain="tail.example",
        peers=peers, device=None, derp=None, derp_map=None, traversal=None, ignored_datagrams=0, dns=None,
        **kw,
    )  # fmt: skip


def test_status_json_round_trips_routes_and_reads_old_answers() -> None:
    st = _status(exit_node="n2")
    doc = json.loads(json.dumps(st.to_json()))
    assert Status.from_json(doc) == st and Status.from_json(doc).to_json() == doc
    assert doc["exit_node"] == "n2"
    assert doc["self"]["primary_routes"] == [LAN] and doc["peers"][0]["exit_node"] is True
    for k in ("exit_node",):
        del doc[k]
    for k in ("advertised_routes", "approved_routes", "primary_routes"):
        del doc["self"][k]
    for p in doc["peers"]:
        for k in ("primary_routes", "allowed_ips", "exit_node_option", "exit_node"):
            del p[k]
    old = Status.from_json(doc)  # a tailpyd from before routes
    assert old.exit_node is None and old.self_node.advertised_routes == () and not old.peers[0].exit_node


def test_status_text_shows_routes_and_exit_nodes() -> None:
    console = Console(width=200, record=True)
    status_cli.render(_status(exit_node="n2"), console)
    text = console.export_text()
    assert "exit node: n2" in text
    me = next(ln for ln in text.splitlines() if ln.startswith("100.64.0.1 "))
    assert (
        f"advertises {LAN} (primary), 203.0.113.0/24 (awaiting approval), {LAN6} (approved, standby), "
        "exit node (awaiting approval)"
    ) in me
    n2 = next(ln for ln in text.splitlines() if ln.startswith("100.64.0.2 "))
    assert n2.endswith("; routes 192.0.2.0/24; exit node (in use)")
    n3 = next(ln for ln in text.splitlines() if ln.startswith("100.64.0.3 "))
    assert n3.endswith("; exit node") and "offline" in n3
    n4 = next(ln for ln in text.splitlines() if ln.startswith("100.64.0.4 "))
    assert "exit node" not in n4 and "routes" not in n4


def test_exit_node_list() -> None:
    rows = exit_node_cli.candidates(_status())
    assert rows == [
        {"name": "n2", "fqdn": "n2.tail.example", "ip": "100.64.0.2", "online": True, "in_use": True},
        {"name": "n3", "fqdn": "n3.tail.example", "ip": "100.64.0.3", "online": False, "in_use": False},
    ]
    lines = exit_node_cli.table(rows)
    assert lines[0].split() == ["IP", "NAME", "STATUS", "IN", "USE"]
    assert lines[1].split() == ["100.64.0.2", "n2", "online", "yes"]
    assert lines[2].split() == ["100.64.0.3", "n3", "offline", "-"]


def test_exit_node_warning_text() -> None:
    t = hl.Tracker(clock=lambda: 5.0)
    w = hl.HandshakeWatch()
    hl.evaluate(t, w, hl.Inputs(now=5.0, following=True, exit_node_error="exit node n2 is offline"))
    (got,) = t.warnings()
    assert got.name == "exit-node" and got.severity == "high"
    assert got.text.startswith("exit node n2 is offline: internet traffic is dropped")
    hl.evaluate(t, w, hl.Inputs(now=6.0, following=True))
    assert t.warnings() == ()


# -- `tailpy set` through tailpyd's local API ----------------------------------------------------------------


async def test_set_through_the_local_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tailpyd (userspace data plane, in-process) with a real control server and a peer: `up` with route
    flags, then `tailpy set` changes preferences with no new login, and refuses bad exit nodes."""
    import asyncio
    import time

    from _userspace_device import FakeNet

    import tailpy
    import tailpy._native
    from tailpy.control import ControlServer, Store
    from tailpy.daemon import main as daemon_main
    from tailpy.daemon.client import LocalClient

    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    net = FakeNet()

    class Device:
        @staticmethod
        def userspace(private_key: bytes, listen_port: int, addresses: list[str], mtu: int = 1280) -> Any:
            return net.factory(private_key, listen_port, addresses, mtu)

    monkeypatch.setattr(tailpy._native, "Device", Device)
    sock = str(tmp_path / "tailpyd.sock")
    state_dir = tmp_path / "px"
    daemon = asyncio.create_task(
        daemon_main.run(str(state_dir), sock, "userspace-networking", 0, 1280, True, 0.0)
    )
    beta = tailpy.Node(
        control_url=url, auth_key=key, state_dir=tmp_path / "b", hostname="beta", device_factory=net.factory
    )

    def tailpy_cli(*args: str) -> Any:
        return CliRunner().invoke(cli, [*args, "--socket", sock])

    async def until(check: Any) -> Status:
        for _ in range(200):
            st = await client.status()
            if check(st):
                return st
            await asyncio.sleep(0.05)
        raise AssertionError(f"never: {st.to_json()}")

    try:
        async with beta:
            client = LocalClient(sock)
            for _ in range(100):
                if Path(sock).exists():
                    break
                await asyncio.sleep(0.05)
            await client.up(url, key, "px", routes={"advertise_routes": [LAN], "accept_routes": True})
            st = await until(lambda st: st.backend_state == "Running" and st.peers)
            node_key = st.self_node.node_key
            assert st.self_node.advertised_routes == (LAN,) and st.exit_node is None
            saved = StateStore(state_dir).load_or_create()
            assert saved.advertise_routes == (LAN,) and saved.accept_routes and saved.snat_subnet_routes

            # refused exit nodes: one sentence each (CLI exit code 1), nothing changed
            for bad, says in (
                ("nope", "no peer 'nope'"),
                ("px", "is this node"),
                ("beta", "not an exit node"),
            ):
                with pytest.raises(ConfigError, match=says):
                    await client.set({"exit_node": bad, "accept_routes": False})
                got = await asyncio.to_thread(tailpy_cli, "set", "--exit-node", bad)
                assert got.exit_code == 1 and says in got.output and got.output.count("\n") == 1
            saved = StateStore(state_dir).load_or_create()
            assert saved.exit_node == "" and saved.accept_routes

            # only what is given changes; the node key and session stay (no new login)
            got = await asyncio.to_thread(
                tailpy_cli, "set", "--advertise-exit-node", "--accept-routes=false", "--accept-dns=false"
            )
            assert got.exit_code == 0, got.output
            saved = StateStore(state_dir).load_or_create()
            assert saved.advertise_routes == (LAN, *EXIT_ROUTES)
            assert (saved.accept_routes, saved.accept_dns, saved.snat_subnet_routes) == (False, False, True)
            assert "await approval" in got.output  # nothing approved them (yet)
            assert "not confirmed" not in got.output  # control's answer: it has them, none approved
            # approved on control, then withdrawn and offered again: the approval is kept, and the CLI
            # goes by control's answer (no note)
            assert st.self_node.id is not None
            store.approve_routes(st.self_node.id, [LAN, *EXIT_ROUTES])
            await until(lambda st: set(st.self_node.approved_routes) == {LAN, *EXIT_ROUTES})
            got = await asyncio.to_thread(tailpy_cli, "set", "--advertise-exit-node=false")
            assert got.exit_code == 0 and got.output == "", got.output
            got = await asyncio.to_thread(tailpy_cli, "set", "--advertise-exit-node")
            assert got.exit_code == 0 and got.output == "", got.output
            st = await client.set({"hostname": "renamed"})
            st = await until(lambda st: st.self_node.name == "renamed")
            assert st.self_node.node_key == node_key and st.backend_state == "Running" and st.peers
            assert StateStore(state_dir).load_or_create().hostname == "renamed"
            with pytest.raises(ConfigError, match="unknown preference 'bogus'"):
                await client.set({"bogus": 1})
            # a later `up` changes only the route flags it gives
            await client.up(url, None, None, routes={"accept_routes": True, "advertise_exit_node": False})
            saved = StateStore(state_dir).load_or_create()
            assert saved.accept_routes and saved.advertise_routes == (LAN,) and saved.hostname == "renamed"
            st = await until(lambda st: st.backend_state == "Running" and st.peers)
            assert st.self_node.node_key == node_key

            got = await asyncio.to_thread(tailpy_cli, "exit-node", "list", "--json")
            assert got.exit_code == 0 and json.loads(got.output) == []
            got = await asyncio.to_thread(tailpy_cli, "exit-node", "list")
            assert got.exit_code == 0 and "no peer offers" in got.output
            got = await asyncio.to_thread(tailpy_cli, "status", "--json")
            doc = json.loads(got.output)
            assert doc["exit_node"] is None and doc["self"]["advertised_routes"] == [LAN]
            assert doc["peers"][0]["exit_node_option"] is False
            await client.down()
            await asyncio.wait_for(daemon, 20)
    finally:
        daemon.cancel()
        await asyncio.gather(daemon, return_exceptions=True)
        await srv.stop()
        store.close()


def test_strict_rp_filter_from_the_sysctls(tmp_path: Path) -> None:
    """The effective rp_filter of an interface is the larger of conf.all's and its own (ip-sysctl.rst):
    strict only when that is 1; lo and the TUN are never named; 2 on conf.all fixes every interface."""

    def sysctls(**values: int) -> Path:
        root = tmp_path / "-".join(f"{k}{v}" for k, v in values.items())
        for name, value in values.items():
            (root / name).mkdir(parents=True)
            (root / name / "rp_filter").write_text(f"{value}\n")
        return root

    assert strict_rp_filter(root=sysctls(all=0, default=1, lo=1, eth0=0, eth1=1)) == ["eth1"]
    assert strict_rp_filter(root=sysctls(all=1, lo=0, eth0=0, eth1=2, tailpy0=0), exclude=("tailpy0",)) == [
        "eth0"
    ]
    assert strict_rp_filter(root=sysctls(all=2, eth0=1, eth1=0)) == []  # the fix the warning gives
    assert strict_rp_filter(root=tmp_path / "absent") == []
    text = rp_filter_warning(["eth0"])
    assert "sysctl -w net.ipv4.conf.all.rp_filter=2" in text and "tailpy set --exit-node=" in text
