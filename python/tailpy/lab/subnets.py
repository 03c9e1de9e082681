"""Lab pieces for subnet routers and exit nodes: a LAN behind tailnet nodes, hosts that report the source
address they see, a ping loop that counts its losses, and nftables packet counters.

A *subnet* is a LAN (its own bridge, :class:`tailpy.lab.netns.Lan`) that one or more tailnet nodes join with
a second interface; those nodes advertise its prefix (``tailpy up --advertise-routes``) and forward between
it and the tailnet. Plain hosts on it are not tailnet nodes: by default they have no route beyond the LAN,
so they can answer a tailnet node only when the router masquerades (SNAT, the default) or when they are
given a route back to the tailnet through a router (:meth:`LabSubnet.route_tailnet_via`)::

    net = LabTailnet(lab); net.start_control()
    r1, r2, client = net.connected("r1", "r2", "client")
    corp = subnet_behind(net, [r1, r2])        # 198.51.100.0/24: r1 .1, r2 .2
    printer = corp.add_host("printer")         # .100, no default route
    serve_whoami(printer)                      # TCP: answers with the address it sees
    whoami(client.host, corp.ip(printer))      # -> "198.51.100.1" through r1 with SNAT

A *whoami* server (:func:`serve_whoami`) is the lab's web host: it answers each TCP connection with the
peer address it accepted it from, so a test sees which address a flow left the tailnet with.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tailpy.errors import LabError
from tailpy.lab.netns import Host, Lan
from tailpy.lab.procs import read_line, stop_process

if TYPE_CHECKING:
    from tailpy.lab.tailnet import LabNode, LabTailnet

#: The subnet behind the lab's subnet routers (a documentation range, RFC 5737) and its IPv6 twin.
SUBNET = "198.51.100.0/24"
SUBNET6 = "2001:db8:5::/64"
#: The tailnet's ranges (tailpy.routes.TAILNET_RANGES), routed back through a router for the no-SNAT case.
TAILNET_V4 = "100.64.0.0/10"
TAILNET_V6 = "fd7a:115c:a1e0::/48"
#: First host number given to plain hosts on a subnet (routers take .1, .2, ...).
FIRST_HOST = 100
#: The port :func:`serve_whoami` listens on by default.
WHOAMI_PORT = 8000

#: TCP server on port argv[1], IPv4 and IPv6: each connection gets the peer address it came from (IPv4 without
#: its ::ffff: prefix) and a newline, then is closed.
WHOAMI = """
import socket, sys
s = socket.create_server(("", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
print("ready", flush=True)
while True:
    conn, peer = s.accept()
    try:
        conn.sendall(peer[0].removeprefix("::ffff:").encode() + b"\\n")
    except OSError:
        pass
    conn.close()
"""

#: Connect to argv[1]:argv[2] within argv[3] seconds and print what the server says; exit 1 on failure.
ASK_WHOAMI = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.makefile().readline().strip())
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""


def serve_whoami(host: Host, port: int = WHOAMI_PORT) -> subprocess.Popen[str]:
    """Start a whoami server (see :data:`WHOAMI`) on ``host``, TCP ``port`` on every address; returns once it
    listens. The lab stops it on close. Raises LabError when it does not start within 20 s."""
    proc = host.popen([sys.executable, "-c", WHOAMI, str(port)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    read_line(proc.stdout, 20, f"{host.name}: the whoami server to listen")
    return proc


def whoami(host: Host, address: str, port: int = WHOAMI_PORT, timeout: float = 3.0) -> str | None:
    """The source address the whoami server at ``address:port`` saw ``host`` connect from, or None when the
    connection did not open (or gave no answer) within ``timeout`` seconds. Never raises for the network."""
    argv = [sys.executable, "-c", ASK_WHOAMI, address, str(port), str(timeout)]
    done = host.run(argv, check=False, timeout=timeout + 30)
    seen = done.stdout.strip()
    return seen if done.returncode == 0 and seen else None


@dataclass
class LabSubnet:
    """A LAN behind tailnet nodes (see the module docstring): ``routers`` joined it with a second interface
    (named like the LAN), ``hosts`` are plain hosts on it."""

    tailnet: LabTailnet
    lan: Lan
    routers: list[LabNode] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The subnet's IPv4 prefix (what its routers advertise)."""
        return str(self.lan.subnet)

    @property
    def prefix6(self) -> str | None:
        return str(self.lan.subnet6) if self.lan.subnet6 is not None else None

    def add_router(self, node: LabNode) -> str:
        """Connect tailnet node ``node``'s host to this LAN (a second interface); returns its address."""
        address = self.lan.attach(node.host)
        self.routers.append(node)
        return address

    def add_host(self, name: str) -> Host:
        """A new plain host on this LAN, at host number 100 and up; no route beyond the LAN."""
        host = self.tailnet.lab.host(name)
        index = FIRST_HOST + len(self.hosts)
        self.lan.attach(host, str(self.lan.subnet.network_address + index))
        self.hosts.append(host)
        return host

    def ip(self, member: Host | LabNode) -> str:
        """The IPv4 address of a host or router node on this LAN."""
        host = member if isinstance(member, Host) else member.host
        return self.lan.ip(host)

    def ip6(self, member: Host | LabNode) -> str:
        """The IPv6 address of a host or router node on this LAN. Raises LabError when it has none."""
        host = member if isinstance(member, Host) else member.host
        net = self.lan.subnet6
        for cidr in host.addresses.get(self.lan.name, []):
            addr = cidr.split("/")[0]
            if net is not None and ":" in addr:
                return addr
        raise LabError(f"{host.name} has no IPv6 address on LAN {self.lan.name}")

    def route_tailnet_via(self, host: Host, router: LabNode | None) -> None:
        """Route the tailnet's ranges from ``host`` through ``router``'s address on this LAN (what a LAN
        host needs to answer tailnet sources a router does not masquerade), or remove that route (None)."""
        for prefix, six in ((TAILNET_V4, False), (TAILNET_V6, True)):
            if six and self.lan.subnet6 is None:
                continue
            flag = "-6" if six else "-4"
            if router is None:
                host.run(["ip", flag, "route", "del", prefix], check=False)
            else:
                via = self.ip6(router) if six else self.ip(router)
                host.run(["ip", flag, "route", "replace", prefix, "via", via, "dev", self.lan.name])


def subnet_behind(
    tailnet: LabTailnet,
    routers: Sequence[LabNode],
    name: str = "corp",
    subnet: str = SUBNET,
    subnet6: str | None = SUBNET6,
) -> LabSubnet:
    """A new LAN ``name`` (``subnet``, ``subnet6``) joined by each of ``routers`` in order (.1, .2, ...).
    Raises LabError (a LAN of that name exists, a subnet outside the lab's ranges)."""
    lan = tailnet.lab.lan(name, subnet=subnet, subnet6=subnet6)
    sub = LabSubnet(tailnet, lan)
    for node in routers:
        sub.add_router(node)
    return sub


@dataclass(frozen=True)
class PingStats:
    """What a :class:`PingLoop` saw: probes ``sent`` and ``received``, the longest run of consecutive lost
    probes (``longest_gap``, in probes), the probe interval in seconds, and the longest time between two
    consecutive answers (``longest_silence``, seconds, from ``ping -D`` timestamps; 0.0 without them)."""

    sent: int
    received: int
    longest_gap: int
    interval: float
    longest_silence: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def longest_gap_seconds(self) -> float:
        return self.longest_gap * self.interval

    def __str__(self) -> str:
        return (
            f"{self.sent} sent, {self.received} received, {self.lost} lost; longest outage "
            f"{self.longest_gap} probes at {self.interval:g} s per probe; longest time between two answers "
            f"{self.longest_silence:.2f} s"
        )


_SEQ = re.compile(r"icmp_seq=(\d+)")
_STAMP = re.compile(r"^\[(\d+\.\d+)\]")


def ping_seqs(text: str) -> tuple[set[int], int]:
    """From iputils ``ping -O`` output: the probe numbers answered, and the highest probe number reported
    (answered, or "no answer yet")."""
    answered: set[int] = set()
    highest = 0
    for line in text.splitlines():
        m = _SEQ.search(line)
        if m is None:
            continue
        seq = int(m.group(1))
        highest = max(highest, seq)
        if "bytes from" in line:
            answered.add(seq)
    return answered, highest


def ping_stats(text: str, interval: float) -> PingStats:
    """:class:`PingStats` of iputils ``ping -O`` output (``-D`` adds the timestamps the longest silence is
    measured from) sent every ``interval`` seconds: probes 1..highest reported, those answered, the longest
    run of unanswered ones."""
    answered, highest = ping_seqs(text)
    longest = run = 0
    for seq in range(1, highest + 1):
        run = 0 if seq in answered else run + 1
        longest = max(longest, run)
    stamps = [
        float(m.group(1)) for line in text.splitlines() if "bytes from" in line and (m := _STAMP.match(line))
    ]
    silence = max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)
    return PingStats(highest, len(answered), longest, interval, silence)


class PingLoop:
    """``ping -i interval -W 1 -D -O address`` running on ``host`` until :meth:`stop`, its output in a file.

    :meth:`received` reads how many answers came so far (to wait for pings to resume); :meth:`stop` ends it
    (SIGINT, as a user would) and counts. The lab stops it on close if a test fails first."""

    def __init__(self, host: Host, address: str, workdir: Path, interval: float = 0.2) -> None:
        self.host, self.address, self.interval = host, address, interval
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / f"ping-{host.name}-{address.replace(':', '_')}.txt"
        flag = ["-6"] if ":" in address else []
        with open(self.out, "w") as f:
            self.proc = host.popen(
                ["ping", *flag, "-n", "-D", "-O", "-i", str(interval), "-W", "1", address], stdout=f
            )

    def _seqs(self) -> tuple[set[int], int]:
        return ping_seqs(self.out.read_text(errors="replace"))

    def received(self) -> int:
        """Answers so far."""
        return len(self._seqs()[0])

    def answered_since(self, seq: int) -> int:
        """Answers to probes numbered above ``seq``."""
        return sum(1 for s in self._seqs()[0] if s > seq)

    def last_seq(self) -> int:
        """The highest probe number seen in the output so far (answered or reported unanswered)."""
        return self._seqs()[1]

    def stop(self) -> PingStats:
        """Stop the loop and count: probes 1..highest seen, those answered, the longest unanswered run."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        return ping_stats(self.out.read_text(errors="replace"), self.interval)


class Counters:
    """Named nftables counters in one host's namespace (table ``inet <table>``, hooks ``output`` and
    ``forward`` at priority filter - 20, policy accept: they count, never drop). ``rules`` maps a counter
    name to an nftables match, e.g. ``{"control": 'oifname "site1" ip daddr 192.0.2.1 tcp dport 8080'}``.
    :meth:`read` gives packets per name; :meth:`remove` deletes the table (the namespace goes with the lab
    anyway)."""

    def __init__(self, host: Host, rules: Mapping[str, str], table: str = "tailpy_probe") -> None:
        self.host, self.table = host, table
        lines = [f"table inet {table} {{"]
        lines += [f"  counter {name} {{ }}" for name in rules]
        for chain in ("output", "forward"):
            lines += [
                f"  chain {chain} {{",
                f"    type filter hook {chain} priority filter - 20; policy accept;",
            ]
            lines += [f'    {match} counter name "{name}"' for name, match in rules.items()]
            lines.append("  }")
        lines.append("}")
        host.nft("\n".join(lines) + "\n")

    def read(self) -> dict[str, int]:
        """Packets counted so far, per counter name."""
        out = self.host.run(["nft", "-j", "list", "counters", "table", "inet", self.table]).stdout
        found: dict[str, int] = {}
        for item in json.loads(out).get("nftables", []):
            counter = item.get("counter")
            if isinstance(counter, dict) and "name" in counter:
                found[str(counter["name"])] = int(counter.get("packets", 0))
        return found

    def remove(self) -> None:
        self.host.run(["nft", "delete", "table", "inet", self.table], check=False)


def policy_routing(host: Host) -> tuple[str, str]:
    """``ip rule`` (v4 and v6) and ``ip route show table all`` (v4 and v6) of ``host``, as text with the
    kernel's own routes (local/broadcast tables, link-local and multicast) left out: what a test compares
    before and after a change that must leave the routing exactly as it was."""
    rules = "\n".join(host.run(["ip", f, "rule", "show"]).stdout.strip() for f in ("-4", "-6"))
    routes: list[str] = []
    for f in ("-4", "-6"):
        for line in host.run(["ip", f, "route", "show", "table", "all"]).stdout.splitlines():
            if "table local" in line or line.startswith(("fe80::", "multicast ", "ff00::")):
                continue
            routes.append(line.strip())
    return rules, "\n".join(sorted(routes))


def route_get(host: Host, address: str, mark: int | None = None) -> str:
    """``ip route get address [mark M]`` in ``host``: the one-line answer (the route the kernel picks for a
    packet to ``address`` carrying ``mark``), or the error text when there is no route."""
    argv = ["ip", "route", "get", address]
    if mark is not None:
        argv += ["mark", hex(mark)]
    done = host.run(argv, check=False)
    return (
        (done.stdout.strip() or done.stderr.strip()).splitlines()[0] if (done.stdout or done.stderr) else ""
    )


def route_dev(host: Host, address: str, mark: int | None = None) -> str | None:
    """The interface :func:`route_get` names (``dev X``), or None (unreachable, no route)."""
    words = route_get(host, address, mark).split()
    return words[words.index("dev") + 1] if "dev" in words else None


__all__ = [
    "FIRST_HOST",
    "SUBNET",
    "SUBNET6",
    "TAILNET_V4",
    "TAILNET_V6",
    "WHOAMI_PORT",
    "Counters",
    "LabSubnet",
    "PingLoop",
    "PingStats",
    "ping_seqs",
    "ping_stats",
    "policy_routing",
    "route_dev",
    "route_get",
    "serve_whoami",
    "subnet_behind",
    "whoami",
]
