"""Operating-system side of a node: addresses and routes of the TUN interface, and local endpoints.

Uses iproute2's ``ip`` (``ip -j`` JSON output). Runs in whatever network namespace the daemon runs in.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterable

from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError, DeviceError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ip")
    if exe is None:
        raise ConfigError("`ip` not found: install iproute2")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise DeviceError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


IPV6_MIN_MTU = 1280  # bytes, RFC 8200 §5: below it the kernel disables IPv6 on the link


def tun_addresses(addresses: list[str], mtu: int) -> list[str]:
    """Which of the node's tailnet ``addresses`` (CIDR host prefixes) a TUN of ``mtu`` bytes carries: all,
    or only the IPv4 ones below 1280 bytes (see :func:`mtu_warnings`)."""
    want = [str(ipaddress.ip_interface(a)) for a in addresses]
    return want if mtu >= IPV6_MIN_MTU else [a for a in want if ":" not in a]


def configure_tun(name: str, addresses: list[str], mtu: int) -> None:
    """Give TUN ``name`` its tailnet addresses (CIDR host prefixes) and bring it up. Idempotent: addresses
    no longer wanted are removed. With ``mtu`` below 1280 bytes the IPv6 addresses are left out
    (:func:`tun_addresses`). Routes into the TUN (the tailnet ranges and more) are the router's
    (:class:`tailpy.daemon.router.Router`, table 52)."""
    _ip("link", "set", "dev", name, "mtu", str(mtu), "up")
    want = set(tun_addresses(addresses, mtu))
    have = set(interface_addresses(name))
    for a in sorted(have - want):
        _ip("addr", "del", a, "dev", name, check=False)
    for a in sorted(want - have):
        if ":" in a:
            _ip("-6", "addr", "add", a, "dev", name, "nodad")
        else:
            _ip("addr", "add", a, "dev", name)


WIREGUARD_OVERHEAD = 80
"""Bytes WireGuard adds to a packet over IPv6 (40 IPv6 + 8 UDP + 32 WireGuard header and tag; 60 over
IPv4): the TUN MTU plus this must fit the underlay link's MTU."""


def mtu_warnings(mtu: int, link: tuple[str, int] | None = None) -> list[str]:
    """Health warnings for a TUN MTU (bytes), one sentence each; ``link``: the underlay's (interface, MTU)
    (:func:`route_mtu`), when known."""
    out = []
    if mtu < IPV6_MIN_MTU:
        out.append(
            f"TUN MTU {mtu} is below IPv6's minimum of {IPV6_MIN_MTU}: the node's IPv6 tailnet address is "
            "not configured; raise --mtu to 1280 if the underlay allows"
        )
    if link is not None and mtu + WIREGUARD_OVERHEAD > link[1]:
        dev, link_mtu = link
        out.append(
            f"TUN MTU {mtu} plus WireGuard's {WIREGUARD_OVERHEAD} bytes exceeds {dev}'s MTU {link_mtu}: "
            "large packets through the tunnel are fragmented or lost; start tailpyd with --mtu "
            f"{max(link_mtu - WIREGUARD_OVERHEAD, 576)} or less"
        )
    return out


def route_mtu() -> tuple[str, int] | None:
    """The interface of the default route and its MTU (the smaller of the link's and a route ``mtu``
    attribute), or None when there is no default route or ``ip`` fails."""
    try:
        proc = _ip("-j", "route", "show", "default", check=False)
        routes = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
        if not routes or not routes[0].get("dev"):
            return None
        dev = str(routes[0]["dev"])
        link = _ip("-j", "link", "show", "dev", dev, check=False)
        links = json.loads(link.stdout) if link.returncode == 0 and link.stdout.strip() else []
    except (ConfigError, ValueError, OSError):
        return None
    if not links or "mtu" not in links[0]:
        return None
    mtu = int(links[0]["mtu"])
    metrics = routes[0].get("metrics") or []
    for m in metrics if isinstance(metrics, list) else []:
        if isinstance(m, dict) and "mtu" in m:
            mtu = min(mtu, int(m["mtu"]))
    return dev, mtu


def interface_addresses(name: str) -> list[str]:
    """Addresses on interface ``name`` as "ip/prefixlen" strings ([] if it does not exist)."""
    proc = _ip("-j", "addr", "show", "dev", name, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    out: list[str] = []
    for link in json.loads(proc.stdout):
        for a in link.get("addr_info", []):
            out.append(str(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")))
    return out


def local_addresses(exclude_ifaces: tuple[str, ...] = ()) -> list[IPInterface]:
    """Addresses of this host's interfaces that peers might reach: up, not loopback, not link-local or
    multicast, not in the tailnet ranges, not on ``exclude_ifaces`` (tailpy's own TUN). IPv4 first."""
    proc = _ip("-j", "addr", "show", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    found: list[IPInterface] = []
    for link in json.loads(proc.stdout):
        flags = link.get("flags", [])
        if link.get("ifname") in exclude_ifaces or "LOOPBACK" in flags or "UP" not in flags:
            continue
        for a in link.get("addr_info", []):
            iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            ip = iface.ip
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            if ip in TAILNET_V4 or ip in TAILNET_V6:
                continue
            found.append(iface)
    return sorted(found, key=lambda i: i.version)


def local_endpoints(port: int, exclude_ifaces: tuple[str, ...] = ()) -> list[Endpoint]:
    """UDP endpoints of :func:`local_addresses` at ``port``."""
    return [Endpoint(i.ip, port) for i in local_addresses(exclude_ifaces)]


def choose_endpoint(candidates: Iterable[Endpoint], local: list[IPInterface]) -> Endpoint | None:
    """Pick the endpoint to send to from a peer's advertised ones: one on a subnet this host is on first
    (same LAN), else the first IPv4 one, else the first."""
    eps = list(candidates)
    for e in eps:
        if any(e.ip.version == i.version and e.ip in i.network for i in local):
            return e
    for e in eps:
        if e.ip.version == 4:
            return e
    return eps[0] if eps else None
