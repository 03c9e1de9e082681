"""The lab's routers behave as each NAT kind claims, proven with plain UDP between real sockets.

Every host runs a small UDP agent (one socket for its whole life, so NAT mappings stay put). Commands go in
on stdin ("<ip> <port> <text>" sends a datagram); every datagram received comes out on stdout as
"from <ip>:<port> <text>". A reflecting agent (on the lab's "internet") also answers each datagram with the
source ``ip:port`` it saw, as a STUN server does. Absence is checked by sending for a while and seeing
nothing arrive; each such check sits beside one showing the same path does work once allowed, so a router
that let everything through (or nothing) fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tailpy.errors import LabError
from tailpy.lab import Host, Lab, Lan, read_line, wait_for
from tailpy.lab.netns import Router
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        shutil.which("nft") is None, reason="`nft` not found: install the Debian package nftables"
    ),
]

AGENT = r"""
import os, socket, sys, threading
port, reflect = int(sys.argv[1]), sys.argv[2] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("ready", flush=True)
def commands():
    for line in sys.stdin:
        ip, p, text = line.split(maxsplit=2)
        try:
            s.sendto(text.strip().encode(), (ip, int(p)))
        except OSError as e:
            print("error", e, flush=True)
    os._exit(0)
threading.Thread(target=commands, daemon=True).start()
while True:
    try:
        data, (ip, p) = s.recvfrom(2048)
    except OSError:
        continue
    if reflect:
        s.sendto(f"{ip}:{p}".encode(), (ip, p))
    print(f"from {ip}:{p} {data.decode(errors='replace')}", flush=True)
"""

needs_conntrack = pytest.mark.skipif(
    shutil.which("conntrack") is None, reason="`conntrack` not found: install the Debian package conntrack"
)

STUN_PORT = 3478
#: Seconds a datagram that should not arrive is given to arrive anyway (sent several times meanwhile).
QUIET = 2.0


class Udp:
    """A UDP agent on ``host`` bound to ``port`` (all addresses); reflects if ``reflect``."""

    def __init__(self, host: Host, port: int, *, reflect: bool = False) -> None:
        self.host, self.port = host, port
        self.proc = host.popen(
            [sys.executable, "-c", AGENT, str(port), "1" if reflect else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert read_line(self.proc.stdout, 20, f"the UDP agent on {host.name}") == "ready"
        self.received: list[tuple[str, str]] = []  # (source ip:port, text)
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("from "):
                src, _, text = line[5:].rstrip("\n").partition(" ")
                with self._lock:
                    self.received.append((src, text))

    def send(self, ip: str, port: int, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{ip} {port} {text}\n")
        self.proc.stdin.flush()

    def got(self, text: str) -> list[str]:
        """Sources (``ip:port``) of every datagram received with payload ``text``."""
        with self._lock:
            return [src for src, t in self.received if t == text]

    def from_(self, src: str) -> list[str]:
        """Payloads of every datagram received from ``src`` (``ip:port``)."""
        with self._lock:
            return [t for s, t in self.received if s == src]

    def mapped(self, reflector: Host, via: str | None = None) -> str:
        """This socket's ``ip:port`` as the reflector on ``reflector`` (at ``via``) sees it."""
        ip = via or reflector.ip()
        src = f"{ip}:{STUN_PORT}"

        def answer() -> str | None:
            self.send(ip, STUN_PORT, "whoami")
            answers = self.from_(src)
            return answers[0] if answers else None

        return wait_for(
            answer, timeout=20, what=f"{reflector.name} to reflect {self.host.name}", interval=0.2
        )

    def keeps_sending(self, ip: str, port: int, text: str, *, until: float = QUIET) -> None:
        """Send ``text`` to ``ip:port`` every 0.2 s for ``until`` seconds."""
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            self.send(ip, port, text)
            time.sleep(0.2)


def reaches(sender: Udp, dst: tuple[str, int], text: str, receiver: Udp) -> str:
    """Send ``text`` from ``sender`` to ``dst`` every 0.2 s until ``receiver`` has it; the source
    ``ip:port`` it saw. Raises LabError after 10 s."""

    def attempt() -> list[str]:
        sender.send(dst[0], dst[1], text)
        return receiver.got(text)

    what = f"{receiver.host.name} to hear {text!r} from {sender.host.name} via {dst[0]}:{dst[1]}"
    return wait_for(attempt, timeout=10, what=what, interval=0.2)[0]


def split(endpoint: str) -> tuple[str, int]:
    ip, _, port = endpoint.rpartition(":")
    return ip, int(port)


@pytest.fixture
def inet(lab: Lab) -> Iterator[Lan]:
    """The lab's internet (203.0.113.0/24) with two public hosts, s1 and s2, each running a reflector."""
    net = lab.lan("inet", subnet="203.0.113.0/24")
    for name in ("s1", "s2"):
        host = lab.host(name)
        net.attach(host)
        Udp(host, STUN_PORT, reflect=True)
    yield net


def site(lab: Lab, inet: Lan, n: int, nat: str, *hosts: str, hairpin: bool = False) -> tuple[Router, Lan]:
    """LAN ``home<n>`` (198.18.<n>.0/24) behind a router ``r<n>`` of kind ``nat``, with ``hosts`` on it."""
    lan = lab.lan(f"home{n}", subnet=f"198.18.{n}.0/24")
    router = lab.router(f"r{n}", inside=lan, outside=inet, nat=nat, hairpin=hairpin)  # type: ignore[arg-type]
    for name in hosts:
        lan.attach(lab.host(name))
    return router, lan


def double_site(lab: Lab, inet: Lan, n: int, outer: str, inner: str, host: str) -> tuple[Router, Router]:
    """A host on ``home<n>`` behind router ``r<n>`` (``inner``) behind carrier router ``cg<n>`` (``outer``,
    CGNAT-like, inside 198.19.<n>.0/24)."""
    carrier = lab.lan(f"cg{n}", subnet=f"198.19.{n}.0/24")
    outer_r = lab.router(f"cg{n}", inside=carrier, outside=inet, nat=outer)  # type: ignore[arg-type]
    home = lab.lan(f"home{n}", subnet=f"198.18.{n}.0/24")
    inner_r = lab.router(f"r{n}", inside=home, outside=carrier, nat=inner)  # type: ignore[arg-type]
    home.attach(lab.host(host))
    return outer_r, inner_r


def test_eim_keeps_one_mapping_for_every_destination(lab: Lab, inet: Lan) -> None:
    router, lan = site(lab, inet, 1, "eim", "h")
    h = Udp(lab.hosts["h"], 41641)
    m1 = h.mapped(lab.hosts["s1"])
    m2 = h.mapped(lab.hosts["s2"])
    assert m1 == m2 == f"{router.public_ip}:41641"
    # A second inside host on the same port: Linux masquerade moves it to another public port towards the
    # destination already mapped for the first, as port-preserving NATs do on a collision.
    lan.attach(lab.host("h2"))
    other = Udp(lab.hosts["h2"], 41641)
    m3 = other.mapped(lab.hosts["s1"])
    assert split(m3)[0] == router.public_ip and m3 != m1


def test_edm_gives_a_port_per_destination(lab: Lab, inet: Lan) -> None:
    router, _ = site(lab, inet, 1, "edm", "h")
    h = Udp(lab.hosts["h"], 41641)
    m1 = h.mapped(lab.hosts["s1"])
    m2 = h.mapped(lab.hosts["s2"])
    assert split(m1)[0] == split(m2)[0] == router.public_ip
    assert split(m1)[1] != split(m2)[1]
    assert h.mapped(lab.hosts["s1"]) == m1  # the mapping lasts for the same destination


@pytest.mark.parametrize("kind", ["eim", "edm"])
def test_port_restricted_filtering(lab: Lab, inet: Lan, kind: str) -> None:
    """Inbound reaches the inside only from the exact ip:port it sent to (address-and-port-dependent
    filtering), for both mapping kinds."""
    site(lab, inet, 1, kind, "h")
    h = Udp(lab.hosts["h"], 41641)
    s1, s2 = lab.hosts["s1"], lab.hosts["s2"]
    mapped_ip, mapped_port = split(h.mapped(s1))
    stranger = Udp(s2, 5000)  # s2 never heard from h on this port
    other_port = Udp(s1, 5001)  # the host h talks to, but another port
    stranger.keeps_sending(mapped_ip, mapped_port, "unsolicited")
    other_port.keeps_sending(mapped_ip, mapped_port, "other-port")
    assert h.got("unsolicited") == [] and h.got("other-port") == []
    # Once h has sent to s2:5000, s2:5000 gets through to the mapping of that flow.
    h.send(s2.ip(), 5000, "opening")
    wait_for(lambda: stranger.got("opening"), timeout=10, what="s2:5000 to hear h")
    flow_ip, flow_port = split(stranger.got("opening")[0])
    reaches(stranger, (flow_ip, flow_port), "solicited", h)


def test_full_cone_accepts_anyone_on_a_mapping(lab: Lab, inet: Lan) -> None:
    router, _ = site(lab, inet, 1, "full-cone", "h")
    h = Udp(lab.hosts["h"], 41641)
    m1, m2 = h.mapped(lab.hosts["s1"]), h.mapped(lab.hosts["s2"])
    assert m1 == m2 == f"{router.public_ip}:41641"
    stranger = Udp(lab.hosts["s2"], 5000)
    assert reaches(stranger, (router.public_ip, 41641), "unsolicited", h) == f"{stranger.host.ip()}:5000"


# (kind of A's side, kind of B's side, A hears B, B hears A) after both send to the other's reflected
# endpoint at the same time. "public" is a host on the internet; "double-eim" an EIM router behind an
# EIM carrier NAT.
PUNCH = [
    ("eim", "eim", True, True),
    ("double-eim", "eim", True, True),
    ("eim", "public", True, True),
    ("edm", "edm", False, False),
    ("eim", "edm", False, False),
    # The public side hears the EDM side (from a port it never saw), and answers nothing here.
    ("public", "edm", True, False),
]


@pytest.mark.parametrize(("kind_a", "kind_b", "a_hears", "b_hears"), PUNCH)
def test_simultaneous_send(
    lab: Lab, inet: Lan, kind_a: str, kind_b: str, a_hears: bool, b_hears: bool
) -> None:
    agents = []
    for n, (kind, name) in enumerate(((kind_a, "a"), (kind_b, "b")), start=1):
        if kind == "public":
            inet.attach(lab.host(name))
        elif kind.startswith("double-"):
            k = kind.removeprefix("double-")
            double_site(lab, inet, n, k, k, name)
        else:
            site(lab, inet, n, kind, name)
        agents.append(Udp(lab.hosts[name], 41641))
    a, b = agents
    ea, eb = split(a.mapped(lab.hosts["s1"])), split(b.mapped(lab.hosts["s1"]))
    deadline = time.monotonic() + 5 * QUIET
    while time.monotonic() < deadline:
        a.send(*eb, "punch")
        b.send(*ea, "punch")
        if a_hears and b_hears and a.got("punch") and b.got("punch"):
            break
        time.sleep(0.2)
    assert bool(a.got("punch")) == a_hears, (a.received, ea, eb)
    assert bool(b.got("punch")) == b_hears, (b.received, ea, eb)
    if a_hears and b_hears:
        assert a.got("punch")[0] == f"{eb[0]}:{eb[1]}"  # the path is the reflected endpoints, both ways


def test_firewall_drops_unsolicited_inbound_without_nat(lab: Lab, inet: Lan) -> None:
    site(lab, inet, 1, "firewall", "h")
    h_host, s1 = lab.hosts["h"], lab.hosts["s1"]
    h = Udp(h_host, 41641)
    probe = Udp(s1, 5000)
    probe.keeps_sending(h_host.ip(), 41641, "unsolicited")
    assert h.got("unsolicited") == []
    # The inside address is routed (no NAT): s1's reflector sees h as it is.
    assert h.mapped(s1) == f"{h_host.ip()}:41641"
    h.send(s1.ip(), 5000, "opening")
    reaches(probe, (h_host.ip(), 41641), "solicited", h)
    # A plain router ("none") lets the unsolicited datagram in: the drop above was the firewall's.
    lan2 = lab.lan("home2", subnet="198.18.2.0/24")
    lab.router("r2", inside=lan2, outside=inet, nat="none")
    lan2.attach(lab.host("open"))
    opened = Udp(lab.hosts["open"], 41641)
    reaches(probe, (lab.hosts["open"].ip(), 41641), "unsolicited", opened)


@pytest.mark.parametrize("hairpin", [False, True])
def test_hairpinning_off_by_default(lab: Lab, inet: Lan, hairpin: bool) -> None:
    router, lan = site(lab, inet, 1, "eim", "a", "b", hairpin=hairpin)
    a, b = Udp(lab.hosts["a"], 41641), Udp(lab.hosts["b"], 41642)
    eb = split(b.mapped(lab.hosts["s1"]))
    ea = split(a.mapped(lab.hosts["s1"]))
    # On the LAN they always reach each other.
    reaches(a, (lan.ip(lab.hosts["b"]), 41642), "lan", b)
    if hairpin:
        assert reaches(a, eb, "hairpin", b) == f"{router.public_ip}:{ea[1]}"  # b sees a's public endpoint
        reaches(a, ea, "self", a)  # a datagram to one's own public endpoint comes back (netcheck's test)
    else:
        a.keeps_sending(*eb, "hairpin")
        a.keeps_sending(*ea, "self")
        assert b.got("hairpin") == [] and a.got("self") == []


def test_double_nat_works_outward(lab: Lab, inet: Lan) -> None:
    outer, inner = double_site(lab, inet, 1, "eim", "eim", "h")
    h_host = lab.hosts["h"]
    assert h_host.default_route() == inner.inside_ip and inner.default_route() == outer.inside_ip
    h = Udp(h_host, 41641)
    m1, m2 = h.mapped(lab.hosts["s1"]), h.mapped(lab.hosts["s2"])
    assert m1 == m2 and split(m1)[0] == outer.public_ip  # the outer (public) address, not 198.19.x
    assert split(m1)[0] != inner.public_ip and inner.public_ip.startswith("198.19.")
    assert h_host.seen_as() >= {h_host.ip(), inner.public_ip, outer.public_ip}


@needs_conntrack
def test_roaming_new_lan_address_and_traffic_resumes(lab: Lab, inet: Lan) -> None:
    router, lan = site(lab, inet, 1, "eim", "h")
    h_host, s1 = lab.hosts["h"], lab.hosts["s1"]
    h = Udp(h_host, 41641)
    before = h.mapped(s1)
    old = lan.ip(h_host)
    new = lan.readdress(h_host)
    assert new != old and h_host.ip() == new
    assert router.conntrack("-p", "udp", "--orig-src", old)  # the old mapping is still there
    h.received.clear()
    after = h.mapped(s1)  # the same socket: traffic resumes from the new address
    assert split(after)[0] == router.public_ip
    assert router.conntrack("-p", "udp", "--orig-src", new)
    assert h_host.default_route() == router.inside_ip
    # The old mapping still holds port 41641 towards s1, so the new flow gets another port.
    assert after != before
    # Moving to another network altogether: a different router's public address.
    router2, lan2 = site(lab, inet, 2, "eim")
    lan.detach(h_host)
    lan2.attach(h_host)
    h.received.clear()
    assert split(h.mapped(s1))[0] == router2.public_ip


def test_block_udp_between_two_hosts(lab: Lab, inet: Lan) -> None:
    site(lab, inet, 1, "eim", "h")
    h_host, s1, s2 = lab.hosts["h"], lab.hosts["s1"], lab.hosts["s2"]
    h = Udp(h_host, 41641)
    with lab.block_udp(h_host, s1):
        h.keeps_sending(s1.ip(), STUN_PORT, "whoami")
        assert h.from_(f"{s1.ip()}:{STUN_PORT}") == []
        h.mapped(s2)  # other hosts are still reachable
        s1.run(["ping", "-c", "1", "-W", "5", lab.hosts["r1"].ip("inet")])  # and s1 still pings
    h.mapped(s1)


@needs_conntrack
@pytest.mark.parametrize("kind", ["eim", "full-cone"])
def test_udp_timeout_expires_idle_mappings(lab: Lab, inet: Lan, kind: str) -> None:
    """``udp_timeout`` (a carrier-grade NAT's short timeout, RFC 6888): an idle mapping is forgotten, and the
    remote end is unsolicited again until the inside sends."""
    lan = lab.lan("home1", subnet="198.18.1.0/24")
    router = lab.router("r1", inside=lan, outside=inet, nat=kind, udp_timeout=2)  # type: ignore[arg-type]
    lan.attach(lab.host("h"))
    h_host, s1 = lab.hosts["h"], lab.hosts["s1"]
    h, peer = Udp(h_host, 41641), Udp(s1, 5000)
    mapped = split(reaches(h, (s1.ip(), 5000), "opening", peer))
    reaches(peer, mapped, "before", h)
    # Two seconds idle end the flow; conntrack removes expired entries lazily, so wait until it has.
    wait_for(
        lambda: not router.conntrack("-p", "udp", "--orig-src", h_host.ip()),
        timeout=60,
        what="the idle mapping to expire",
        interval=0.5,
    )
    # (A full-cone router's recorded mapping has the same timeout, counted from h's last datagram, which
    # came before s1's last one: it is gone too.)
    peer.keeps_sending(*mapped, "after-idle")
    assert h.got("after-idle") == []
    reaches(h, (s1.ip(), 5000), "again", peer)


@needs_conntrack
def test_flush_conntrack_forgets_mappings(lab: Lab, inet: Lan) -> None:
    router, _ = site(lab, inet, 1, "eim", "h")
    h_host, s1 = lab.hosts["h"], lab.hosts["s1"]
    h = Udp(h_host, 41641)
    peer = Udp(s1, 5000)
    mapped = split(reaches(h, (s1.ip(), 5000), "opening", peer))
    reaches(peer, mapped, "before", h)
    assert router.conntrack("-p", "udp", "--orig-src", h_host.ip())
    router.flush_conntrack()
    assert router.conntrack("-p", "udp", "--orig-src", h_host.ip()) == []
    peer.keeps_sending(*mapped, "after-flush")
    assert h.got("after-flush") == []  # the mapping is gone: s1 is unsolicited again


def first_reply(node: LabNode, address: str) -> float:
    """Seconds until ``node`` gets a ping reply from ``address`` (one probe at a time, 1 s each)."""
    started = time.monotonic()

    def answered() -> bool:
        probe = ["ping", "-c", "1", "-W", "1", address]
        return node.host.run(probe, check=False, timeout=10).returncode == 0

    wait_for(answered, timeout=60, what=f"{node.name} to get a ping reply from {address}", interval=0.05)
    return time.monotonic() - started


def test_tailnet_sites(lab: Lab) -> None:
    """The topology builder: nodes behind each router kind register through their NAT and see each other;
    two nodes on one site LAN talk directly; a NATed node reaches a public one through its NAT."""
    net = LabTailnet(lab)
    net.start_control()
    key = net.authkey(reusable=True)
    pub = net.add_node("pub")
    a = net.add_node("a", behind="eim", lan="home")
    b = net.add_node("b", lan="home")
    c = net.add_node("c", behind="edm")
    d = net.add_node("d", behind="double-eim")
    f = net.add_node("f", behind="firewall")
    nodes = [pub, a, b, c, d, f]
    assert pub.site is None and pub.lan_ip().startswith("192.0.2.")
    assert a.site is b.site and a.site is not None and a.site.kinds == ("eim",)
    assert a.lan_ip().startswith("198.18.") and a.host.default_route() == a.site.router.inside_ip
    assert d.site is not None and d.site.kinds == ("eim", "eim")
    assert d.site.routers[0].public_ip.startswith("192.0.2.")
    assert d.site.routers[1].public_ip.startswith("198.19.")
    outside = net.public_host("outside")
    assert outside.ip().startswith("192.0.2.") and outside.default_route() is None
    with pytest.raises(LabError, match="behind eim, not edm"):
        net.add_node("x", behind="edm", lan="home")
    for n in nodes:
        n.up(key)
    for n in nodes:
        n.wait_peers(len(nodes) - 1, timeout=60)
    a.ping(b.ip(), count=2)  # same LAN: LAN endpoints work without any NAT traversal
    for n in (c, d, f):
        n.ping(pub.ip(), count=2, timeout=60)  # outward through the NAT (or firewall)
    # Roaming: a new LAN address behind the same NAT, then another network; tailpyd is not told, and its
    # traffic to the public node resumes through the new NAT mapping.
    new = a.roam()
    assert a.lan_ip() == new and new.startswith("198.18.")
    print(f"roam (new LAN address): ping answered after {first_reply(a, pub.ip()):.1f} s")
    assert c.site is not None
    a.move(c.site)
    assert a.lan_ip().startswith(c.lan_ip().rsplit(".", 1)[0] + ".")
    print(f"roam (another network): ping answered after {first_reply(a, pub.ip()):.1f} s")
