"""Lab topologies from Linux network namespaces: hosts, LANs (a bridge in its own "switch" namespace),
point-to-point veth links, and routers (NAT, firewall or plain; rules in :mod:`tailpy.lab.nat`).

Every namespace is named ``<prefix><name>`` where the prefix (``tpy<4 hex>-``) is unique to one :class:`Lab`,
so labs running in parallel never collide. Nothing is ever attached to the machine's own (root) namespace:
veth pairs are created inside a lab namespace with their other end moved straight into another one.
:meth:`Lab.close` stops every process the lab started (SIGTERM, then SIGKILL, by pid) and deletes every
namespace it made; it is idempotent and runs on exceptions, at interpreter exit, and on SIGINT/SIGTERM
when :meth:`Lab.install_signal_handlers` was called (the CLI does).

Example::

    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lan = lab.lan("lan", [a, b])            # a = 192.0.2.1, b = 192.0.2.2
        a.run(["ping", "-c1", lan.ip(b)])

    with Lab() as lab:                          # a host behind a NAT router on the lab's "internet"
        net = lab.lan("inet", [lab.host("server")], subnet="203.0.113.0/24")
        home = lab.lan("home", subnet="198.18.1.0/24")
        router = lab.router("r", inside=home, outside=net, nat="eim")   # 203.0.113.2 / 198.18.1.1
        laptop = lab.host("laptop")
        home.attach(laptop)                      # 198.18.1.2, default route via the router

Only IPv4 is routed: routers never forward IPv6, so IPv6 addresses given to a LAN reach only that LAN.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

from tailpy.errors import LabError
from tailpy.lab.nat import (
    DEFAULT_MAP_TIMEOUT,
    TABLE,
    TRANSLATING,
    NatKind,
    block_ruleset,
    check_kind,
    router_ruleset,
)
from tailpy.lab.procs import GRACE, stop_process

#: Address ranges a lab may use: documentation ranges for the lab's "internet", 198.18.0.0/15 for LANs
#: behind NAT. Anything else is refused, so a typo cannot put a real address on a lab interface.
ALLOWED_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15", "2001:db8::/32")
)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
H = TypeVar("H", bound="Host")


def unavailable_reason() -> str | None:
    """Why no lab can be built on this machine (one sentence), or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "`ip` not found: install iproute2"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip() or 'exit ' + str(probe.returncode)}"
    return None


def _check_subnet(subnet: str) -> IpNetwork:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise LabError(f"lab subnet {subnet!r} is not a network prefix: {e}") from None
    if not any(net.version == r.version and net.subnet_of(r) for r in ALLOWED_RANGES):  # type: ignore[arg-type]
        allowed = ", ".join(str(r) for r in ALLOWED_RANGES)
        raise LabError(f"lab subnet {subnet} is outside the lab's address ranges ({allowed})")
    return net


def _check_ifname(name: str) -> str:
    if not 0 < len(name) <= 15 or "/" in name or " " in name:
        raise LabError(f"interface name {name!r} must be 1-15 characters without '/' or spaces")
    return name


@dataclass
class Host:
    """One network namespace of a lab; loopback up, IPv6 DAD off (addresses are usable at once).

    ``addresses`` maps interface name to the addresses (with prefix length) the lab gave it.
    """

    lab: Lab
    name: str
    netns: str
    addresses: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r})"

    # -- running things inside -------------------------------------------------------------------------

    def argv(self, args: Sequence[str]) -> list[str]:
        """``args`` prefixed with ``ip netns exec <netns>`` (which execs: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float | None = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside the namespace to completion, capturing text output.

        Raises LabError (command, exit status, last line of stderr) when ``check`` and it fails."""
        try:
            done = subprocess.run(
                self.argv(args), capture_output=True, text=True, timeout=timeout, input=input, check=False
            )
        except subprocess.TimeoutExpired:
            raise LabError(f"`{' '.join(args)}` in {self.name} did not finish within {timeout:g} s") from None
        if check and done.returncode != 0:
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LabError(f"`{' '.join(args)}` in {self.name} failed (exit {done.returncode}): {err}")
        return done

    async def arun(
        self, args: Sequence[str], *, check: bool = True, timeout: float | None = 60
    ) -> subprocess.CompletedProcess[str]:
        """:meth:`run` for async code (runs in a worker thread)."""
        return await asyncio.to_thread(self.run, args, check=check, timeout=timeout)

    def popen(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = None,
        text: bool = True,
    ) -> subprocess.Popen[str]:
        """Start ``args`` inside the namespace, in its own session (so its children can be stopped with it),
        tracked by the lab: :meth:`Lab.close` stops it. ``env`` is added to this process's environment."""
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            self.argv(args),
            env=full_env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            start_new_session=True,
        )
        self.lab._track(proc)
        return proc

    def python(self, module: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``sys.executable -m module args...`` inside (see :meth:`popen` for keyword arguments).
        The tailpy package this process imported is put on PYTHONPATH, so a source checkout works too."""
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(kwargs.pop("env", None) or {})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return self.popen([sys.executable, "-m", module, *args], env=env, **kwargs)

    def ip(self, iface: str | None = None) -> str:
        """The first address (without prefix length) the lab gave this host, on ``iface`` or any interface."""
        for name, addrs in self.addresses.items():
            if addrs and (iface is None or name == iface):
                return addrs[0].split("/")[0]
        raise LabError(f"host {self.name} has no lab address{' on ' + iface if iface else ''}")

    def add_address(self, iface: str, cidr: str) -> None:
        """Add ``cidr`` (address/prefix) to ``iface`` and record it in :attr:`addresses`."""
        self.lab._ip("-n", self.netns, "addr", "add", cidr, "dev", iface)
        self.addresses.setdefault(iface, []).append(cidr)

    def sysctl(self, **settings: str | int) -> None:
        """Set sysctls in this namespace; keys use ``__`` for ``.`` (``net__ipv4__ip_forward=1``)."""
        args = [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
        self.run(["sysctl", "-qw", *args])

    def nft(self, ruleset: str) -> None:
        """Load ``ruleset`` (``nft -f`` syntax) into this namespace's nftables. Raises LabError."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def lans(self) -> list[Lan]:
        """The lab's LANs this host is attached to, in creation order."""
        return [lan for lan in self.lab.lans.values() if self.name in lan.members]

    def seen_as(self) -> set[str]:
        """Every address other hosts may see this host's packets come from: its own addresses and the
        outside address of each NAT router it sits behind, layer by layer up to the lab's internet."""
        seen = {cidr.split("/")[0] for addrs in self.addresses.values() for cidr in addrs}
        for lan in self.lans():
            gw = lan.gateway
            if gw is not None and gw is not self and gw.nat in TRANSLATING:
                seen |= gw.seen_as()
        return seen

    def default_route(self) -> str | None:
        """The IPv4 default gateway of this namespace, or None."""
        out = self.run(["ip", "-4", "route", "show", "default"]).stdout.split()
        return out[out.index("via") + 1] if "via" in out else None


@dataclass
class Lan:
    """A LAN: a bridge ``br0`` in its own switch namespace, one veth per host (named like the LAN).

    ``gateway`` is the router whose inside this LAN is (hosts attached get their IPv4 default route
    through it); ``routes`` are (prefix, via) IPv4 routes every member gets, such as the inside prefix of
    a firewall or plain router on this LAN."""

    lab: Lab
    name: str
    switch: str  # the switch's namespace
    subnet: IpNetwork
    subnet6: IpNetwork | None
    members: dict[str, str] = field(default_factory=dict)  # host name -> its IPv4/IPv6 address (first given)
    gateway: Router | None = None
    routes: list[tuple[str, str]] = field(default_factory=list)
    _next: int = 1
    _ports: int = 0

    def ip(self, host: Host) -> str:
        """The address ``host`` has on this LAN (no prefix length)."""
        try:
            return self.members[host.name]
        except KeyError:
            raise LabError(f"host {host.name} is not on LAN {self.name}") from None

    def hosts(self) -> list[Host]:
        """The hosts on this LAN, in the order they were attached."""
        return [self.lab.hosts[name] for name in self.members]

    def attach(self, host: Host, address: str | None = None) -> str:
        """Connect ``host`` to this LAN; give it ``address`` or the next free one, and the LAN's routes
        (the default route through :attr:`gateway`, :attr:`routes`). Returns the address."""
        if host.name in self.members:
            raise LabError(f"host {host.name} is already on LAN {self.name}")
        index: int | None = None
        if address is None:
            index = self._free_index()
            address = str(self.subnet.network_address + index)
        else:
            self._check_address(address)
        lab, ifname = self.lab, self.name
        port = f"p{self._ports}"
        self._ports += 1
        lab._ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            host.netns,
        )
        lab._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        lab._ip("-n", host.netns, "link", "set", ifname, "up")
        host.add_address(ifname, f"{address}/{self.subnet.prefixlen}")
        if self.subnet6 is not None:
            six = self.subnet6.network_address + (index if index is not None else self._free_index(v6=True))
            host.add_address(ifname, f"{six}/{self.subnet6.prefixlen}")
        self.members[host.name] = address
        self._apply_routes(host)
        return address

    def readdress(self, host: Host, address: str | None = None) -> str:
        """Roaming: give ``host`` a new IPv4 address on this LAN (``address`` or the next free one) in place
        of its current one, keeping the interface, the IPv6 address and the routes. Sockets bound to the
        wildcard address keep working; a NAT router in front maps the new address afresh. Returns it."""
        old = self.ip(host)
        if address is None:
            address = str(self.subnet.network_address + self._free_index())
        else:
            self._check_address(address)
        plen = self.subnet.prefixlen
        self.lab._ip("-n", host.netns, "addr", "del", f"{old}/{plen}", "dev", self.name)
        addrs = host.addresses[self.name]
        addrs.remove(f"{old}/{plen}")
        self.members[host.name] = address
        self.lab._ip("-n", host.netns, "addr", "add", f"{address}/{plen}", "dev", self.name)
        addrs.insert(0, f"{address}/{plen}")
        self._apply_routes(host)
        return address

    def detach(self, host: Host) -> None:
        """Disconnect ``host`` from this LAN (its interface is deleted, with its addresses and routes)."""
        self.ip(host)
        self.lab._ip("-n", host.netns, "link", "del", self.name)
        del self.members[host.name]
        host.addresses.pop(self.name, None)

    def add_route(self, prefix: str, via: str) -> None:
        """Route IPv4 ``prefix`` through ``via`` (an address on this LAN) on every member, now and later."""
        self.routes.append((prefix, via))
        for host in self.hosts():
            if self.members[host.name] != via:
                self.lab._ip("-n", host.netns, "route", "replace", prefix, "via", via, "dev", self.name)

    def _apply_routes(self, host: Host) -> None:
        gw = self.gateway
        if gw is not None and gw is not host:
            via = self.ip(gw)
            self.lab._ip("-n", host.netns, "route", "replace", "default", "via", via, "dev", self.name)
        mine = self.members[host.name]
        for prefix, via in self.routes:
            if via != mine:
                self.lab._ip("-n", host.netns, "route", "replace", prefix, "via", via, "dev", self.name)

    def _used(self, v6: bool = False) -> set[str]:
        net = self.subnet6 if v6 else self.subnet
        if net is None:
            return set()
        used = set()
        for name in self.members:
            for cidr in self.lab.hosts[name].addresses.get(self.name, []):
                addr = ipaddress.ip_address(cidr.split("/")[0])
                if addr in net:
                    used.add(str(addr))
        return used

    def _free_index(self, v6: bool = False) -> int:
        used = self._used(v6)
        net = self.subnet6 if v6 else self.subnet
        assert net is not None
        index = self._next
        while str(net.network_address + index) in used:
            index += 1
        if index >= net.num_addresses - 1:
            raise LabError(f"LAN {self.name} has no free address left in {net}")
        self._next = index + 1
        return index

    def _check_address(self, address: str) -> None:
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            raise LabError(f"{address!r} is not an IP address") from None
        if addr not in self.subnet:
            raise LabError(f"{address} is not in LAN {self.name}'s subnet {self.subnet}")
        if address in self._used():
            raise LabError(f"{address} is already used on LAN {self.name}")


@dataclass
class Router(Host):
    """A host forwarding IPv4 between an inside LAN and an outside LAN with nftables rules of one kind
    (see :mod:`tailpy.lab.nat`): ``"eim"`` (``masquerade``: endpoint-independent mapping, port-restricted
    filtering), ``"full-cone"`` (``masquerade`` with endpoint-independent filtering), ``"edm"`` or
    ``"symmetric"`` (``masquerade fully-random``: endpoint-dependent mapping), ``"firewall"`` (no NAT,
    stateful, unsolicited inbound dropped) or ``"none"`` (routes both ways). Made by :meth:`Lab.router`."""

    nat: NatKind = "eim"
    inside: Lan | None = None
    outside: Lan | None = None
    hairpin: bool = False

    def __repr__(self) -> str:
        return f"Router({self.name!r}, nat={self.nat!r}, netns={self.netns!r})"

    @property
    def public_ip(self) -> str:
        """The router's IPv4 address on its outside LAN (what NATed inside hosts are seen as)."""
        assert self.outside is not None
        return self.outside.ip(self)

    @property
    def inside_ip(self) -> str:
        """The router's IPv4 address on its inside LAN (the inside hosts' default gateway)."""
        assert self.inside is not None
        return self.inside.ip(self)

    def flush_conntrack(self) -> None:
        """Forget every connection-tracking entry (so every NAT mapping and every "established" flow) and
        every recorded full-cone/hairpin mapping. Needs the ``conntrack`` tool (Debian package conntrack)."""
        if shutil.which("conntrack") is None:
            raise LabError("`conntrack` not found: install the Debian package conntrack")
        done = self.run(["conntrack", "-F"], check=False)
        if done.returncode != 0 and "0 flow entries" not in done.stderr:
            raise LabError(f"`conntrack -F` in {self.name} failed: {done.stderr.strip()}")
        if self.nat == "full-cone" or self.hairpin:
            self.run(["nft", "flush", "map", "ip", TABLE, "cone"])

    def conntrack(self, *args: str) -> list[str]:
        """``conntrack -L [args]`` in this router, one line per entry (``-p udp``, ``--orig-src ADDR``...)."""
        if shutil.which("conntrack") is None:
            raise LabError("`conntrack` not found: install the Debian package conntrack")
        out = self.run(["conntrack", "-L", *args]).stdout
        return [line for line in out.splitlines() if line.strip()]


@dataclass
class UdpBlock:
    """UDP dropped between two hosts (nftables tables in both namespaces); :meth:`remove` lifts it."""

    lab: Lab
    table: str
    hosts: tuple[Host, Host]
    active: bool = True

    def remove(self) -> None:
        """Let UDP through again. Idempotent."""
        if self.active:
            self.active = False
            for host in self.hosts:
                host.run(["nft", "delete", "table", "inet", self.table], check=False)

    def __enter__(self) -> UdpBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Lab:
    """Namespaces, links and processes torn down as one; a (sync or async) context manager."""

    def __init__(self, *, grace: float = GRACE) -> None:
        reason = unavailable_reason()
        if reason:
            raise LabError(reason)
        self.grace = grace
        self.prefix = self._unique_prefix()
        self.hosts: dict[str, Host] = {}
        self.lans: dict[str, Lan] = {}
        self._netns: list[str] = []  # creation order
        self._procs: list[subprocess.Popen[str]] = []
        self._paths: list[Path] = []
        self._blocks = 0
        self._closed = False
        self._signals_installed = False
        self._saved_handlers: dict[int, Any] = {}  # dispositions before install_signal_handlers
        self._lock = threading.RLock()  # a signal handler may close while close runs
        atexit.register(_close_ref, weakref.ref(self))

    # -- context manager -------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    # -- building ------------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """A new namespace ``<prefix><name>`` with loopback up and IPv6 DAD off."""
        return self._new_host(Host, name)

    def _new_host(self, cls: type[H], name: str, **fields: Any) -> H:
        if name in self.hosts:
            raise LabError(f"the lab already has a host named {name!r}")
        host = cls(self, name, self._add_netns(name), **fields)
        self._ip("-n", host.netns, "link", "set", "lo", "up")
        host.sysctl(
            net__ipv6__conf__all__accept_dad=0,
            net__ipv6__conf__default__accept_dad=0,
            net__ipv6__conf__all__forwarding=0,
        )
        self.hosts[name] = host
        return host

    def lan(
        self, name: str, hosts: Iterable[Host] = (), subnet: str = "192.0.2.0/24", subnet6: str | None = None
    ) -> Lan:
        """A LAN ``name`` (also the hosts' interface name, at most 15 characters) through a bridge in its own
        switch namespace; each host gets the next address of ``subnet`` (.1, .2, ...) and of ``subnet6``."""
        _check_ifname(name)
        if name in self.lans:
            raise LabError(f"the lab already has a LAN named {name!r}")
        net = _check_subnet(subnet)
        net6 = _check_subnet(subnet6) if subnet6 else None
        switch = self._add_netns(f"sw-{name}")
        self._ip("-n", switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        self._ip("-n", switch, "link", "set", "br0", "up")
        lan = Lan(self, name, switch, net, net6)
        self.lans[name] = lan
        for h in hosts:
            lan.attach(h)
        return lan

    def link(
        self, a: Host, b: Host, subnet: str = "198.51.100.0/30", ifname: str = "eth0"
    ) -> tuple[str, str]:
        """A point-to-point veth pair between ``a`` and ``b`` (both ends named ``ifname``), addresses
        .1 and .2 of ``subnet``. Returns (address of a, address of b)."""
        _check_ifname(ifname)
        net = _check_subnet(subnet)
        self._ip(
            "-n", a.netns, "link", "add", ifname, "type", "veth", "peer", "name", ifname, "netns", b.netns
        )
        addrs = (str(net.network_address + 1), str(net.network_address + 2))
        for host, addr in zip((a, b), addrs, strict=True):
            self._ip("-n", host.netns, "link", "set", ifname, "up")
            host.add_address(ifname, f"{addr}/{net.prefixlen}")
        return addrs

    def router(
        self,
        name: str,
        *,
        inside: Lan,
        outside: Lan,
        nat: NatKind = "eim",
        hairpin: bool = False,
        udp_timeout: int | None = None,
    ) -> Router:
        """A router host ``name`` between ``inside`` and ``outside`` doing ``nat`` (see :class:`Router`).

        It takes the next free address on each LAN, forwards IPv4 (in its own namespace only) and becomes
        ``inside``'s gateway: every inside host, now and later, routes by default through it. A
        ``"firewall"`` or ``"none"`` router's inside prefix is routed through it on ``outside``'s hosts
        (and on through further non-NAT routers); a NAT router's inside is reachable only through NAT.
        ``hairpin`` lets inside hosts reach each other through the router's public address (NAT kinds
        only). ``udp_timeout`` (seconds) sets conntrack's UDP timeouts (both unreplied and assured flows;
        Linux defaults 30 s and 120 s) and the lifetime of recorded mappings. Raises LabError."""
        nat = check_kind(nat)
        if shutil.which("nft") is None:
            raise LabError("`nft` not found: install the Debian package nftables")
        if inside is outside:
            raise LabError("a router needs two different LANs (inside and outside)")
        if inside.gateway is not None:
            raise LabError(f"LAN {inside.name} already has router {inside.gateway.name} as its gateway")
        if inside.subnet.version != 4 or outside.subnet.version != 4:
            raise LabError("lab routers route IPv4: give both LANs an IPv4 subnet")
        if udp_timeout is not None and udp_timeout <= 0:
            raise LabError(f"udp_timeout must be a positive number of seconds, not {udp_timeout}")
        if hairpin and nat not in TRANSLATING:
            raise LabError(f"hairpinning needs a NAT router, not a {nat!r} one")
        router = self._new_host(Router, name, nat=nat, inside=inside, outside=outside, hairpin=hairpin)
        outside.attach(router)
        inside.attach(router)
        ruleset = router_ruleset(
            nat,
            inside_if=inside.name,
            outside_if=outside.name,
            inside_net=str(inside.subnet),
            public_ip=router.public_ip,
            hairpin=hairpin,
            map_timeout=udp_timeout or DEFAULT_MAP_TIMEOUT,
        )
        router.sysctl(net__ipv4__ip_forward=1)
        router.nft(ruleset)
        if udp_timeout is not None:
            router.sysctl(
                net__netfilter__nf_conntrack_udp_timeout=udp_timeout,
                net__netfilter__nf_conntrack_udp_timeout_stream=udp_timeout,
            )
        inside.gateway = router
        for host in inside.hosts():
            inside._apply_routes(host)
        if nat not in TRANSLATING:
            # The inside prefix is routed from the outside, through every non-NAT router further out.
            lan, via = outside, router.public_ip
            while True:
                lan.add_route(str(inside.subnet), via)
                gw = lan.gateway
                if gw is None or gw.nat in TRANSLATING or gw.outside is None:
                    break
                lan, via = gw.outside, gw.public_ip
        return router

    def block_udp(self, a: Host, b: Host) -> UdpBlock:
        """Drop UDP between ``a`` and ``b`` until the returned handle's ``remove()`` (also a context
        manager): in each host's namespace, UDP to and from every address the other may be seen as
        (:meth:`Host.seen_as`: its own addresses and its NAT routers' public ones). TCP (control, DERP)
        still flows. Behind a NAT this also cuts UDP with other hosts behind the same router."""
        self._blocks += 1
        table = f"tailpy_block_{self._blocks}"
        block = UdpBlock(self, table, (a, b))
        a.nft(block_ruleset(table, b.seen_as()))
        try:
            b.nft(block_ruleset(table, a.seen_as()))
        except LabError:
            block.remove()
            raise
        return block

    def track_path(self, path: str | os.PathLike[str]) -> None:
        """Remove ``path`` on close: a file some tracked process leaves behind (a UAPI socket, say) or a
        directory (removed with its contents)."""
        self._paths.append(Path(path))

    # -- tearing down ----------------------------------------------------------------------------------

    def stop(self, proc: subprocess.Popen[str]) -> int | None:
        """Stop one tracked process now (SIGTERM, then SIGKILL after the grace period); its exit status."""
        return stop_process(proc, self.grace)

    def close(self) -> None:
        """Stop every process the lab started, then delete every namespace it made. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._signals_installed and threading.current_thread() is threading.main_thread():
                # A second Ctrl-C (or the SIGINT that `timeout` and a terminal send to the whole group)
                # must not interrupt the cleanup it asked for.
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
            for proc in reversed(self._procs):
                with contextlib.suppress(Exception):
                    stop_process(proc, self.grace)
            for ns in reversed(self._netns):
                self._kill_leftovers(ns)
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
            for path in self._paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
            if self._signals_installed and threading.current_thread() is threading.main_thread():
                # Give the process its own dispositions back: an ignored SIGTERM would be inherited by
                # every program it starts later (a `ping` that `terminate()` can no longer stop).
                for signum, old in self._saved_handlers.items():
                    signal.signal(signum, old)

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT close the lab and exit (status 130/143), for CLI use."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self._closed:
                sys.stderr.write(f"interrupted ({signal.Signals(signum).name}): removing the lab\n")
            first = not self._closed
            self.close()
            if first:
                sys.stderr.write("lab removed\n")
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, handler)
        self._signals_installed = True

    def namespaces(self) -> list[str]:
        """The namespaces this lab made (hosts and switches), oldest first."""
        return list(self._netns)

    # -- internals -----------------------------------------------------------------------------------

    def _track(self, proc: subprocess.Popen[str]) -> None:
        if self._closed:
            stop_process(proc, self.grace)
            raise LabError("the lab is closed")
        self._procs.append(proc)

    def _unique_prefix(self) -> str:
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        for _ in range(16):
            prefix = f"tpy{secrets.token_hex(2)}-"
            if prefix not in existing:
                return prefix
        raise LabError("could not find an unused lab prefix (are many stale tpy*- namespaces left over?)")

    def _add_netns(self, name: str) -> str:
        if self._closed:
            raise LabError("the lab is closed")
        ns = self.prefix + name
        self._ip("netns", "add", ns)
        self._netns.append(ns)
        return ns

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            err = done.stderr.strip() or f"exit {done.returncode}"
            raise LabError(f"`ip {' '.join(args)}` failed: {err}")

    @staticmethod
    def _kill_leftovers(ns: str) -> None:
        """SIGKILL, by pid, any process still inside ``ns`` (only processes the lab started can be there)."""
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def _close_ref(ref: weakref.ReferenceType[Lab]) -> None:
    lab = ref()
    if lab is not None:
        lab.close()
