"""The node's routing (:mod:`tailpy.daemon.router`) and its underlay sockets (:mod:`tailpy.bypass`,
``Device.set_fwmark``): tailscaled's policy routing rules and table 52, exit-node and subnet-router
configurations, forwarding and masquerade only while routes are served, everything undone by ``close`` and
by the cleanup after a crash, and marked sockets that take the host's routes while an exit node's default
route is in table 52.

The router runs on a thread that joined a lab namespace (``setns(2)``), so the commands it runs (``ip``,
``nft``, its sysctls) act there and never on this machine's own namespace."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from tailpy import bypass
from tailpy.daemon import netfilter
from tailpy.daemon.router import (
    BYPASS_MARK,
    FORWARDING_RECORD,
    PlanRouter,
    Router,
    RouterConfig,
    cleanup_leftovers,
    tailnet_routes,
)
from tailpy.errors import ConfigError, DeviceError
from tailpy.lab import Host, Lab

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
TUN = "tpy0"  # a veth end standing in for the TUN (packets routed to it go nowhere)
ADDRS = ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
EXIT = RouterConfig(TUN, ADDRS, (*tailnet_routes(ADDRS), "0.0.0.0/0", "::/0"))


class InNetns:
    """Runs callables on one thread that has joined ``host``'s network namespace (and checked that it
    did: nothing runs otherwise)."""

    def __init__(self, host: Host) -> None:
        self.path = f"/run/netns/{host.netns}"
        self._pool = ThreadPoolExecutor(1, initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        self._check()

    def _check(self) -> None:
        if os.stat("/proc/thread-self/ns/net").st_ino != os.stat(self.path).st_ino:
            raise RuntimeError("the worker thread is not in the lab namespace")

    def __call__(self, fn: Callable[..., T], *args: object) -> T:
        def checked() -> T:
            self._check()
            return fn(*args)

        return self._pool.submit(checked).result(timeout=120)

    def close(self) -> None:
        self._pool.shutdown()


@pytest.fixture
def node(lab: Lab) -> Iterator[tuple[Host, Host, InNetns]]:
    """Host ``a`` (203.0.113.1, default route via 203.0.113.2) and ``b`` (203.0.113.2) on a LAN, ``a``
    with a stand-in TUN; and a thread in ``a``'s namespace."""
    a, b = lab.host("a"), lab.host("b")
    lab.lan("inet", [a, b], subnet="203.0.113.0/24", subnet6="2001:db8:5::/64")
    a.run(["ip", "link", "add", TUN, "type", "veth", "peer", "name", "tpy0p"])
    a.run(["ip", "link", "set", TUN, "up"])
    a.run(["ip", "link", "set", "tpy0p", "up"])
    a.run(["ip", "route", "add", "default", "via", "203.0.113.2"])
    a.run(["ip", "-6", "route", "add", "default", "via", "2001:db8:5::2"])
    ns = InNetns(a)
    try:
        yield a, b, ns
    finally:
        ns.close()


def _snapshot(host: Host) -> dict[str, str]:
    """Everything of the host's routing the router may touch."""
    return {
        "rules4": host.run(["ip", "-4", "rule"]).stdout,
        "rules6": host.run(["ip", "-6", "rule"]).stdout,
        "routes4": host.run(["ip", "-4", "route", "show", "table", "all"]).stdout,
        "routes6": host.run(["ip", "-6", "route", "show", "table", "all"]).stdout,
        "forward": host.run(["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]).stdout,
    }


def _route_get(host: Host, *args: str) -> str:
    return host.run(["ip", "route", "get", *args]).stdout


def _nft(host: Host) -> str:
    return host.run(["nft", "list", "table", "inet", netfilter.table_name(TUN)], check=False).stdout


# -- without a lab ---------------------------------------------------------------------------------------


def test_router_refuses_a_malformed_prefix_and_another_tuns_config() -> None:
    r = Router(TUN)
    with pytest.raises(ConfigError, match="is not an IP prefix"):
        r.set(RouterConfig(TUN, ADDRS, ("100.64.0.0/10", "nonsense")))
    with pytest.raises(ConfigError, match="given the configuration of"):
        r.set(RouterConfig("other0", ADDRS, ()))
    assert tailnet_routes(["100.64.0.1/32"]) == ("100.64.0.0/10",)
    assert tailnet_routes(ADDRS) == ("100.64.0.0/10", "fd7a:115c:a1e0::/48")


def test_firewall_ruleset_forwards_and_masquerades_as_ts_forward_and_ts_postrouting() -> None:
    plain = netfilter.ruleset("tailpy", "tailpy0", 41641)
    assert "masquerade" not in plain and "0x40000" not in plain
    script = netfilter.ruleset("tailpy", "tailpy0", 41641, forward=True, masquerade=True)
    rules = [line.strip() for line in script.splitlines()]
    start = rules.index("type filter hook forward priority filter - 1; policy accept;") + 1
    assert rules[start : rules.index("}", start)] == [
        'iifname != "tailpy0" ip saddr 100.64.0.0/10 counter drop',
        'iifname != "tailpy0" ip6 saddr fd7a:115c:a1e0::/48 counter drop',
        'iifname "tailpy0" meta mark set meta mark & 0xff00ffff | 0x40000',
        "meta mark & 0xff0000 == 0x40000 accept",
        'oifname "tailpy0" ip saddr 100.64.0.0/10 drop',
        'oifname "tailpy0" accept',
    ]
    start = rules.index("type nat hook postrouting priority srcnat; policy accept;") + 1
    assert rules[start : rules.index("}", start)] == [
        'oifname != "tailpy0" meta mark & 0xff0000 == 0x40000 masquerade'
    ]
    no_snat = netfilter.ruleset("tailpy", "tailpy0", 41641, forward=True, masquerade=False)
    assert "0x40000 accept" in no_snat and "masquerade" not in no_snat


def test_bypass_without_a_mark_makes_plain_sockets() -> None:
    assert bypass.mark() is None
    with bypass.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert s.getsockopt(socket.SOL_SOCKET, bypass.SO_MARK) == 0
    with pytest.raises(ValueError, match="fwmark"):
        bypass.set_mark(0)
    assert bypass.mark() is None


async def test_bypass_without_a_mark_connects_as_asyncio() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await bypass.open_connection("127.0.0.1", port)
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        connector = bypass.tcp_connector()
        assert connector._socket_factory is None  # aiohttp's own sockets
        await connector.close()
    finally:
        server.close()
        await server.wait_closed()


# -- in a lab namespace ----------------------------------------------------------------------------------


@pytest.mark.lab
def test_exit_node_routes_into_the_tun_and_marked_traffic_takes_the_main_table(
    node: tuple[Host, Host, InNetns],
) -> None:
    a, _, ns = node
    before = _snapshot(a)
    router = Router(TUN)
    ns(router.set, RouterConfig(EXIT.tun, EXIT.addresses, EXIT.routes, local_routes=("198.51.100.0/24",)))
    for fam in ("-4", "-6"):
        rules = [" ".join(line.split()) for line in a.run(["ip", fam, "rule"]).stdout.splitlines()]
        assert rules[1:5] == [
            "5210: from all fwmark 0x80000/0xff0000 lookup main",
            "5230: from all fwmark 0x80000/0xff0000 lookup default",
            "5250: from all fwmark 0x80000/0xff0000 unreachable",
            "5270: from all lookup 52",
        ]
    table = a.run(["ip", "-4", "route", "show", "table", "52"]).stdout
    assert (
        "default dev tpy0" in table and "100.64.0.0/10 dev tpy0" in table and "throw 198.51.100.0/24" in table
    )
    table6 = a.run(["ip", "-6", "route", "show", "table", "52"]).stdout
    assert "default dev tpy0" in table6 and "fd7a:115c:a1e0::/48 dev tpy0" in table6
    # Everything goes into the tunnel; the LAN prefix is thrown back to the main table; the bypass mark
    # takes the host's own routes.
    assert " dev tpy0 table 52" in _route_get(a, "203.0.113.7")
    assert " dev tpy0 table 52" in _route_get(a, "100.101.102.103")
    assert " dev tpy0 table 52" in _route_get(a, "2001:db8:5::7")
    assert "via 203.0.113.2 dev inet" in _route_get(a, "198.51.100.7")
    assert "dev inet" in _route_get(a, "203.0.113.7", "mark", hex(BYPASS_MARK))
    assert "dev inet" in _route_get(a, "2001:db8:5::7", "mark", hex(BYPASS_MARK))
    # Strict reverse-path filtering would drop the replies to the underlay traffic: a warning says so.
    assert ns(router.warnings) == []
    a.sysctl(net__ipv4__conf__inet__rp_filter=1)
    [warning] = ns(router.warnings)
    assert "rp_filter=1) on inet drops the replies" in warning
    a.sysctl(net__ipv4__conf__inet__rp_filter=2)
    assert ns(router.warnings) == []
    # Idempotent; and switching the exit node off removes only its routes.
    during = _snapshot(a)
    ns(router.set, RouterConfig(EXIT.tun, EXIT.addresses, EXIT.routes, local_routes=("198.51.100.0/24",)))
    assert _snapshot(a) == during
    a.run(["ip", "-6", "rule", "del", "pref", "5270"])  # as systemd-networkd may: the next set puts it back
    ns(router.set, RouterConfig(EXIT.tun, EXIT.addresses, EXIT.routes, local_routes=("198.51.100.0/24",)))
    assert _snapshot(a) == during
    ns(router.set, RouterConfig(TUN, ADDRS, tailnet_routes(ADDRS)))
    assert "dev inet" in _route_get(a, "203.0.113.7")
    assert " dev tpy0 table 52" in _route_get(a, "100.101.102.103")
    assert (
        a.run(["ip", "-4", "route", "show", "table", "52"]).stdout.split("\n")[0].startswith("100.64.0.0/10")
    )
    ns(router.close)
    assert _snapshot(a) == before
    ns(router.close)  # idempotent
    assert _snapshot(a) == before


@pytest.mark.lab
def test_forwarding_and_masquerade_only_while_serving_routes(
    node: tuple[Host, Host, InNetns], tmp_path: Path
) -> None:
    a, _, ns = node
    a.sysctl(net__ipv4__ip_forward=0, net__ipv6__conf__all__forwarding=0)
    before = _snapshot(a)
    fw = netfilter.Firewall("on")
    ns(fw.install, TUN, 41641)
    router = Router(TUN, firewall=fw, record=tmp_path / FORWARDING_RECORD)
    base = RouterConfig(TUN, ADDRS, tailnet_routes(ADDRS))
    ns(router.set, base)
    assert "0x40000" not in _nft(a) and _snapshot(a)["forward"] == before["forward"]
    serving = RouterConfig(TUN, ADDRS, base.routes, subnet_routes=("198.51.100.0/24",))
    ns(router.set, serving)
    assert _snapshot(a)["forward"].split() == ["1", "0"]  # IPv4 only: no IPv6 route served
    assert (tmp_path / FORWARDING_RECORD).exists()
    table = _nft(a)
    assert fw.warnings() == []
    assert "meta mark & 0x00ff0000 == 0x00040000 accept" in table and "masquerade" in table
    ns(
        router.set,
        RouterConfig(TUN, ADDRS, base.routes, subnet_routes=("198.51.100.0/24",), snat_subnet_routes=False),
    )
    assert "0x00040000 accept" in _nft(a) and "masquerade" not in _nft(a)
    exit_node = RouterConfig(TUN, ADDRS, base.routes, subnet_routes=("0.0.0.0/0", "::/0"))
    ns(router.set, exit_node)
    assert _snapshot(a)["forward"].split() == ["1", "1"] and "masquerade" in _nft(a)
    ns(router.set, base)
    assert _snapshot(a)["forward"] == before["forward"] and "0x40000" not in _nft(a)
    assert not (tmp_path / FORWARDING_RECORD).exists()
    ns(router.set, exit_node)
    ns(router.close)
    assert (
        _snapshot(a) == before and "0x40000" not in _nft(a) and "iifname" in _nft(a)
    )  # the base table stays
    ns(fw.remove)
    assert _nft(a) == ""


@pytest.mark.lab
def test_cleanup_after_a_crash_restores_routing_and_forwarding(
    node: tuple[Host, Host, InNetns], tmp_path: Path
) -> None:
    a, _, ns = node
    a.sysctl(net__ipv4__ip_forward=0, net__ipv6__conf__all__forwarding=0)
    before = _snapshot(a)
    record = tmp_path / FORWARDING_RECORD
    crashed = Router(TUN, record=record)
    ns(crashed.set, RouterConfig(TUN, ADDRS, EXIT.routes, ("198.51.100.0/24",), ("0.0.0.0/0", "::/0")))
    # The process dies: its TUN goes, and the routes through it; the rules, throw route and sysctls stay,
    # and blackhole nothing.
    a.run(["ip", "link", "del", TUN])
    assert "dev inet" in _route_get(a, "203.0.113.7") and "dev inet" in _route_get(a, "2001:db8:5::7")
    assert "5270" in a.run(["ip", "rule"]).stdout and _snapshot(a)["forward"].split() == ["1", "1"]
    done = ns(cleanup_leftovers, TUN, record)
    assert "restored net.ipv4.ip_forward = 0" in done and any("policy routing rules" in d for d in done)

    def without_the_tun(snapshot: dict[str, str]) -> dict[str, str]:
        return {k: "".join(ln for ln in v.splitlines(True) if TUN not in ln) for k, v in snapshot.items()}

    assert without_the_tun(_snapshot(a)) == without_the_tun(before)
    assert a.run(["ip", "-4", "route", "show", "table", "52"]).stdout == ""
    assert a.run(["ip", "-6", "route", "show", "table", "52"]).stdout == ""
    assert ns(cleanup_leftovers, TUN, record) == []  # nothing more to do


@dataclass(frozen=True)
class Plan:
    routes: tuple[str, ...]
    local_routes: tuple[str, ...] = ()
    subnet_routes: tuple[str, ...] = ()
    snat_subnet_routes: bool = True


@pytest.mark.lab
def test_a_plan_router_leaves_ipv6_out_of_a_tun_below_1280_bytes(node: tuple[Host, Host, InNetns]) -> None:
    a, _, ns = node
    before = _snapshot(a)
    small = PlanRouter(TUN, mtu=1200)
    ns(small.apply, ADDRS, Plan(EXIT.routes))
    assert "default dev tpy0" in a.run(["ip", "-4", "route", "show", "table", "52"]).stdout
    assert a.run(["ip", "-6", "route", "show", "table", "52"], check=False).stdout == ""
    assert "lookup 52" not in a.run(["ip", "-6", "rule"]).stdout
    ns(small.close)
    assert _snapshot(a) == before
    full = PlanRouter(TUN, mtu=1280)
    ns(full.apply, ADDRS, Plan(EXIT.routes))
    assert "default dev tpy0" in a.run(["ip", "-6", "route", "show", "table", "52"]).stdout
    ns(full.close)
    assert _snapshot(a) == before


@pytest.mark.lab
def test_cleanup_leaves_another_live_routers_table(node: tuple[Host, Host, InNetns]) -> None:
    a, _, ns = node
    a.run(["ip", "link", "add", "tpy1", "type", "veth", "peer", "name", "tpy1p"])
    a.run(["ip", "link", "set", "tpy1", "up"])
    live = Router("tpy1")
    ns(live.set, RouterConfig("tpy1", ADDRS, tailnet_routes(ADDRS)))
    rules = a.run(["ip", "rule"]).stdout
    assert ns(cleanup_leftovers, TUN, None) == []
    assert a.run(["ip", "rule"]).stdout == rules and "dev tpy1" in _route_get(a, "100.64.0.5")
    ns(live.close)
    assert "5270" not in a.run(["ip", "rule"]).stdout


@pytest.mark.lab
def test_a_route_the_kernel_refuses_is_one_sentence_and_a_warning(node: tuple[Host, Host, InNetns]) -> None:
    a, _, ns = node
    before = _snapshot(a)
    router = Router("gone0")  # no such interface
    with pytest.raises(DeviceError, match=r"^cannot route 100\.64\.0\.0/10 into gone0: Cannot find device"):
        ns(router.set, RouterConfig("gone0", ("100.64.0.1/32",), ("100.64.0.0/10",), ("198.51.100.0/24",)))
    assert "throw 198.51.100.0/24" in a.run(["ip", "route", "show", "table", "52"]).stdout  # the rest applied
    assert ns(router.warnings) == [
        'routes: cannot route 100.64.0.0/10 into gone0: Cannot find device "gone0"'
    ]
    ns(router.close)
    assert _snapshot(a) == before


_UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("203.0.113.2", 9999))
print("ready", flush=True)
s.settimeout(60)
data, _ = s.recvfrom(100)
print(data.decode(), flush=True)
"""

_HTTP_ECHO = """
import asyncio
async def echo(reader, writer):
    line = await reader.readline()
    if line.startswith(b"GET "):
        while (await reader.readline()) not in (b"\\r\\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 6\\r\\nConnection: close\\r\\n\\r\\nmarked")
    else:
        writer.write(line)
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "203.0.113.2", 8080)
    print("ready", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


@pytest.mark.lab
def test_marked_sockets_leave_through_the_host_while_an_exit_node_takes_everything_else(
    node: tuple[Host, Host, InNetns], native_device: None
) -> None:
    from tailpy._native import Device, generate_private_key

    a, b, ns = node
    router = Router(TUN)
    ns(router.set, EXIT)
    assert " dev tpy0 table 52" in _route_get(a, "203.0.113.2")  # unmarked: into the tunnel

    # The data plane's UDP socket, marked, reaches b over the LAN.
    sink = b.popen([sys.executable, "-c", _UDP_SINK], stdout=subprocess.PIPE)
    _ready(sink)
    dev = ns(Device.userspace, generate_private_key(), 0, ["100.64.0.1/32"])
    try:
        ns(dev.set_fwmark, BYPASS_MARK)
        ns(dev.send_datagram, b"from-the-device", "203.0.113.2:9999")
        out, _ = sink.communicate(timeout=60)
        assert out.strip() == "from-the-device"
    finally:
        ns(dev.close)

    # Python's underlay sockets (control, DERP, DNS upstreams), marked, reach b too.
    server = b.popen([sys.executable, "-c", _HTTP_ECHO], stdout=subprocess.PIPE)
    _ready(server)

    async def talk() -> tuple[bytes, int, str]:
        reader, writer = await bypass.open_connection("203.0.113.2", 8080)
        mark = writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, bypass.SO_MARK)
        writer.write(b"over-the-underlay\n")
        line = await reader.readline()
        writer.close()
        async with (
            aiohttp.ClientSession(connector=bypass.tcp_connector()) as http,
            http.get("http://203.0.113.2:8080/") as r,
        ):
            body = await r.text()
        return line, mark, body

    bypass.set_mark(BYPASS_MARK)
    try:
        line, mark, body = ns(asyncio.run, talk())
    finally:
        bypass.set_mark(None)
        ns(router.close)
    assert (line, mark, body) == (b"over-the-underlay\n", BYPASS_MARK, "marked")


_SOURCE_OF = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("203.0.113.2", 9998))
print("ready", flush=True)
s.settimeout(60)
for _ in range(2):
    _, (source, _) = s.recvfrom(100)
    print(source, flush=True)
"""


@pytest.mark.lab
def test_a_subnet_router_forwards_from_the_tunnel_masquerading_unless_told_not_to(lab: Lab) -> None:
    """Packets from a tailnet address arriving on the TUN reach the LAN behind the router: with the
    router's LAN address as their source (SNAT, the default), or their own (``snat_subnet_routes`` off)."""
    a, b, peer = lab.host("a"), lab.host("b"), lab.host("peer")
    lab.lan("inet", [a, b], subnet="203.0.113.0/24")
    lab.link(a, peer, subnet="198.51.100.0/30", ifname=TUN)  # the TUN: tailnet packets come out of it
    peer.run(["ip", "addr", "add", "100.64.0.2/32", "dev", TUN])
    peer.run(["ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1", "src", "100.64.0.2"])
    a.sysctl(net__ipv4__ip_forward=0)
    sink = b.popen([sys.executable, "-c", _SOURCE_OF], stdout=subprocess.PIPE)
    _ready(sink)
    assert sink.stdout is not None
    send = [sys.executable, "-c", "import socket; socket.socket(2, 2).sendto(b'x', ('203.0.113.2', 9998))"]
    ns = InNetns(a)
    fw = netfilter.Firewall("on")
    router = Router(TUN, firewall=fw)
    try:
        ns(fw.install, TUN, 41641)
        ns(
            router.set,
            RouterConfig(TUN, ("100.64.0.1/32",), ("100.64.0.0/10",), subnet_routes=("203.0.113.0/24",)),
        )
        peer.run(send)
        assert sink.stdout.readline().strip() == "203.0.113.1"  # masqueraded
        no_snat = RouterConfig(
            TUN,
            ("100.64.0.1/32",),
            ("100.64.0.0/10",),
            subnet_routes=("203.0.113.0/24",),
            snat_subnet_routes=False,
        )
        ns(router.set, no_snat)
        a.run(["conntrack", "-F"], check=False)  # the flow above keeps its mapping otherwise
        peer.run(send)
        assert sink.stdout.readline().strip() == "100.64.0.2"  # the tailnet source kept
    finally:
        ns(router.close)
        ns(fw.remove)
        ns.close()
