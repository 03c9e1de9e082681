"""MagicDNS in the lab with `dig` (bind9-dnsutils) and real upstream resolvers (dnsmasq): names on every node,
joins, renames and removals, forwarding, split DNS, truncation and TCP, the host's resolver pointed at
MagicDNS and put back; names match case-insensitively (RFC 4343), big answers are truncated for UDP and
whole over TCP (RFC 1035 §4.2), and with no upstream outside names get SERVFAIL."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.dns import Dnsmasq, dnsmasq_reason, resolv_conf_path
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig not found: install Debian's bind9-dnsutils"),
    pytest.mark.skipif(dnsmasq_reason() is not None, reason=str(dnsmasq_reason())),
]

DOMAIN = "tailnet.internal"
UPSTREAM = "192.0.2.53"
SPLIT = "192.0.2.54"
ORIGINAL = f"# lab host resolver\nnameserver {UPSTREAM}\nsearch lab.example\noptions timeout:2\n"
BIG = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(200)]


@pytest.fixture(autouse=True)
def host_resolv_conf_untouched() -> Iterator[None]:
    """Guard: the machine's own /etc/resolv.conf is byte for byte the same after every test."""
    path = Path("/etc/resolv.conf")
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    yield
    after = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    assert before == after, "a MagicDNS test modified the machine's /etc/resolv.conf"


class Resolvers:
    """The lab's "internet" resolvers on host ``dns``: an upstream (192.0.2.53) and a split DNS server for
    corp.example (192.0.2.54), both dnsmasq, authoritative only."""

    def __init__(self, net: LabTailnet) -> None:
        host = net.lab.host("dns")
        net.lan.attach(host)
        host.add_address("lan0", f"{UPSTREAM}/24")
        host.add_address("lan0", f"{SPLIT}/24")
        work = net.root / "dns"
        self.upstream = Dnsmasq(
            host, UPSTREAM, {"www.example": ["198.51.100.10"], "big.example": BIG}, work, "upstream"
        )
        self.split = Dnsmasq(
            host,
            SPLIT,
            {"x.corp.example": ["198.51.100.20"], "unknownhost.corp.example": ["198.51.100.99"]},
            work,
            "split",
        )


@pytest.fixture
def tailnet(lab: Lab) -> LabTailnet:
    net = LabTailnet(lab)
    net.resolv_conf = ORIGINAL
    net.start_control()
    return net


@pytest.fixture
def resolvers(tailnet: LabTailnet) -> Resolvers:
    return Resolvers(tailnet)


def dig(node: LabNode, *args: str, check: bool = True) -> str:
    """``dig`` inside ``node`` (2 s per try, 2 tries); its stdout."""
    return node.host.run(["dig", "+time=2", "+tries=2", *args], check=check, timeout=30).stdout


def short(node: LabNode, *args: str) -> list[str]:
    return sorted(dig(node, "+short", *args).split())


def status_of(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def flags_of(out: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]+);", out)
    assert m, out
    return set(m.group(1).split())


def test_names_resolve_on_every_node_ping_by_name_and_resolv_conf_restored(
    tailnet: LabTailnet, resolvers: Resolvers
) -> None:
    nodes = tailnet.connected("a", "b", "Foo-Bar")
    ips = {n.status()["self"]["name"]: n.ip() for n in nodes}
    assert set(ips) == {"a", "b", "foo-bar"}  # stored lowercase (RFC 4343: names compare case-insensitively)
    for n in nodes:
        conf = resolv_conf_path(n.host).read_text()
        assert "nameserver 100.100.100.100" in conf and f"search {DOMAIN} lab.example" in conf, conf
        assert "options timeout:2" in conf

        # Both listeners on every node (the IPv6 one used to fail at random: its address was tentative).
        def both_listening(n: LabNode = n) -> bool:
            return len(n.status()["dns"]["listening"]) == 2

        wait_for(both_listening, timeout=30, what=f"{n.name}'s listeners")
        assert n.status()["dns"]["error"] == ""
        for name, ip in ips.items():
            assert short(n, "@100.100.100.100", f"{name}.{DOMAIN}") == [ip], (n.name, name)
            assert short(n, "@fd7a:115c:a1e0::53", f"{name}.{DOMAIN}") == [ip], (n.name, name)
            assert short(n, f"{name}.{DOMAIN}", "AAAA") == [tailnet.nodes[_lab(name)].ip6()]
            assert short(n, "-q", name) == [ip]  # the short name, from the node's own resolv.conf server
        # The host's resolver is MagicDNS now, and the host's other DNS still answers (its old upstream).
        got = n.host.run(["getent", "ahostsv4", "www.example"]).stdout
        assert "198.51.100.10" in got
    # ping <peer-name> works from every node with nothing configured by hand.
    for src in nodes:
        for name in ips:
            if tailnet.nodes[_lab(name)] is not src:
                src.ping(name, count=1)
    # Any case resolves, and the answer echoes the question's case (RFC 4343).
    for asked in ("foo-bar.tailnet.internal.", "FOO-BAR.tailnet.internal.", "fOo-BaR.TaIlNeT.InTeRnAl."):
        out = dig(nodes[0], "@100.100.100.100", asked, "A", "+noall", "+answer")
        assert out.split()[0] == asked and ips["foo-bar"] in out, out
    # IPv6 listener, TCP, NODATA and NXDOMAIN.
    assert short(nodes[0], "@fd7a:115c:a1e0::53", "b", "A") == [ips["b"]]
    assert short(nodes[0], "@100.100.100.100", "+tcp", f"b.{DOMAIN}") == [ips["b"]]
    out = dig(nodes[0], "@100.100.100.100", f"b.{DOMAIN}", "MX")
    assert status_of(out) == "NOERROR" and "ANSWER: 0" in out and "SOA" in out
    out = dig(nodes[0], "@100.100.100.100", f"nosuch.{DOMAIN}")
    assert status_of(out) == "NXDOMAIN" and "SOA" in out
    # down (and daemon exit) puts the original back byte for byte.
    nodes[0].cli("down")
    assert resolv_conf_path(nodes[0].host).read_text() == ORIGINAL
    nodes[1].stop_daemon()
    assert resolv_conf_path(nodes[1].host).read_text() == ORIGINAL


def _lab(name: str) -> str:
    return {"foo-bar": "Foo-Bar"}.get(name, name)


def test_join_rename_and_removal_follow_the_netmap(tailnet: LabTailnet) -> None:
    (a,) = tailnet.connected("a")
    key = tailnet.authkey()
    c = tailnet.add_node("c")

    def resolves(name: str) -> list[str]:
        return short(a, "@100.100.100.100", f"{name}.{DOMAIN}")

    assert resolves("c") == []
    c.up(key)
    joined = time.monotonic()
    wait_for(lambda: resolves("c") == [c.ip()], timeout=20, what="a to resolve c", interval=0.05)
    print(f"c resolved on a {time.monotonic() - joined:.2f} s after its `tailpy up` returned")
    node_id = c.status()["self"]["id"]
    tailnet.control("nodes", "rename", str(node_id), "renamed")
    wait_for(lambda: resolves("renamed") == [c.ip()], timeout=20, what="a to resolve the new name")
    out = dig(a, "@100.100.100.100", f"c.{DOMAIN}")
    assert status_of(out) == "NXDOMAIN"
    ptr = short(a, "@100.100.100.100", "-x", c.ip())
    assert ptr == [f"renamed.{DOMAIN}."]
    tailnet.control("nodes", "delete", str(node_id))
    wait_for(
        lambda: status_of(dig(a, "@100.100.100.100", f"renamed.{DOMAIN}")) == "NXDOMAIN",
        timeout=20,
        what="the removed node to stop resolving",
    )


def test_forwarding_split_dns_ptr_truncation_and_tcp(tailnet: LabTailnet, resolvers: Resolvers) -> None:
    tailnet.control(
        "dns",
        "set",
        "--nameserver",
        UPSTREAM,
        "--route",
        f"corp.example={SPLIT}",
        "--search-domain",
        "corp.example",
    )
    a, b = tailnet.connected("a", "b")
    conf = resolv_conf_path(a.host).read_text()
    assert f"search {DOMAIN} corp.example lab.example" in conf, conf
    # Upstream forwarding and split DNS: x.corp.example only ever reaches the split server.
    assert short(a, "@100.100.100.100", "www.example") == ["198.51.100.10"]
    assert short(a, "@100.100.100.100", "x.corp.example") == ["198.51.100.20"]
    assert short(a, "x") == []  # a single label that is no node: forwarded as it is, NXDOMAIN upstream
    assert "x.corp.example" not in resolvers.upstream.queries()
    # A single label never becomes <label>.corp.example at the resolver: it goes upstream as it is.
    out = dig(a, "@100.100.100.100", "unknownhost")
    assert status_of(out) == "NXDOMAIN"
    assert "unknownhost" in resolvers.upstream.queries()
    assert "unknownhost.corp.example" not in resolvers.split.queries()
    # A trailing dot changes nothing; PTR for a tailnet address is answered here and never forwarded.
    assert short(a, "@100.100.100.100", "b.") == short(a, "@100.100.100.100", "b") == [b.ip()]
    assert short(a, "@100.100.100.100", "-x", b.ip()) == [f"b.{DOMAIN}."]
    assert short(a, "@100.100.100.100", "-x", b.ip6()) == [f"b.{DOMAIN}."]
    missing = dig(a, "@100.100.100.100", "-x", "100.64.99.99")
    assert status_of(missing) == "NXDOMAIN"
    forwarded = resolvers.upstream.queries() + resolvers.split.queries()
    assert not [q for q in forwarded if q.endswith("100.in-addr.arpa") or "ip6.arpa" in q], forwarded
    # 200 A records (about 3.2 KB). Over UDP: TC, cut at a record boundary within 512 / 1232 bytes.
    for opts, limit in ((("+noedns",), 512), (("+bufsize=1232",), 1232)):
        out = dig(a, "@100.100.100.100", "big.example", "+ignore", *opts)
        size = int(re.search(r"MSG SIZE\s+rcvd: (\d+)", out).group(1))  # type: ignore[union-attr]
        records = re.findall(r"^big\.example\.\s+\d+\s+IN\s+A\s+198\.18\.", out, re.M)
        assert "tc" in flags_of(out) and size <= limit and 0 < len(records) < 200, out
        assert "WARNING" not in out and "malformed" not in out.lower(), out
    out = dig(a, "@100.100.100.100", "big.example", "+tcp")
    assert len(re.findall(r"^big\.example\.\s+\d+\s+IN\s+A\s", out, re.M)) == 200
    assert "tc" not in flags_of(out)
    # No upstream answers: SERVFAIL, not NXDOMAIN (the name may well exist; only the upstream failed).
    tailnet.control("dns", "set", "--nameserver", "192.0.2.99")  # nothing there
    wait_for(lambda: _servfail(a, "www.example"), timeout=60, what="SERVFAIL from a dead upstream")


def _servfail(node: LabNode, name: str) -> bool:
    out = dig(node, "@100.100.100.100", name, "+time=8", "+tries=1", check=False)
    return "status: SERVFAIL" in out


def test_accept_dns_false_crash_recovery_and_garbage(tailnet: LabTailnet, resolvers: Resolvers) -> None:
    a = tailnet.add_node("a")
    a.cli("up", "--login-server", tailnet.control_url, "--hostname", "a", "--auth-key", tailnet.authkey(),
          "--accept-dns=false")  # fmt: skip
    path = resolv_conf_path(a.host)
    assert path.read_text() == ORIGINAL  # left alone
    assert short(a, "@100.100.100.100", f"a.{DOMAIN}") == [a.ip()]  # the resolver runs regardless
    a.cli("up", "--accept-dns=true")
    wait_for(
        lambda: "100.100.100.100" in path.read_text(), timeout=20, what="resolv.conf to point at MagicDNS"
    )
    # kill -9: nothing restores the file; the next tailpyd start does (then points it at MagicDNS again
    # once the netmap is back), and `down` leaves the original, byte for byte.
    a.daemon.send_signal(signal.SIGKILL)
    a.daemon.wait(timeout=10)
    assert "100.100.100.100" in path.read_text()
    a.start_daemon()
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=30, what="a to run again")
    a.cli("down")
    assert path.read_text() == ORIGINAL
    a.cli("up")
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=30, what="a to run again")
    # Fuzzed garbage at the resolver: malformed queries get FORMERR or are dropped, and it keeps serving.
    rng = random.Random(6)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80))) for _ in range(300)]
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for h in sys.argv[1:]:\n"
        "    s.sendto(bytes.fromhex(h), ('100.100.100.100', 53))\n"
    )
    a.host.run([sys.executable, "-c", script, *(b.hex() for b in blobs)])
    assert short(a, "@100.100.100.100", f"a.{DOMAIN}") == [a.ip()]
    assert a.status()["dns"]["bad"] > 0
    # The guard: in a lab namespace with no /etc/netns/<ns>/resolv.conf, /etc/resolv.conf is the machine's
    # own file, and tailpy refuses to touch it (checked without writing anything).
    bare = tailnet.lab.host("bare")
    probe = (
        "from pathlib import Path\n"
        "from tailpy.dns.osconfig import check_not_host_file\n"
        "from tailpy.errors import ConfigError\n"
        "try:\n    check_not_host_file(Path('/etc/resolv.conf'))\n"
        "except ConfigError as e:\n    print('refused:', e)\n"
    )
    out = bare.run([sys.executable, "-c", probe]).stdout
    assert out.startswith("refused:"), out


def test_only_local_processes_are_answered_not_the_lan(tailnet: LabTailnet, resolvers: Resolvers) -> None:
    """A LAN neighbour routing the MagicDNS addresses through a node gets nothing (Linux would accept the
    packets for the node's lo addresses on its LAN interface); the node itself still gets answers."""
    a, b = tailnet.connected("a", "b")
    neighbour = tailnet.lab.hosts["dns"]  # the resolvers' host, on the same LAN as a
    neighbour.run(["ip", "route", "replace", "100.100.100.100/32", "via", a.lan_ip()])
    a6 = a.host.run(["ip", "-6", "-o", "addr", "show", "dev", "lan0", "scope", "global"]).stdout.split()
    assert len(a6) > 3, a6
    neighbour.run(["ip", "-6", "route", "replace", "fd7a:115c:a1e0::53/128", "via", a6[3].split("/")[0]])
    assert short(a, "@100.100.100.100", f"b.{DOMAIN}") == [b.ip()]
    assert short(a, "@fd7a:115c:a1e0::53", f"b.{DOMAIN}") == [b.ip()]
    assert short(a, "@100.100.100.100", "+tcp", f"b.{DOMAIN}") == [b.ip()]
    for server in ("@100.100.100.100", "@fd7a:115c:a1e0::53"):
        for opts in ((), ("+tcp",)):
            for q in ((f"b.{DOMAIN}",), ("www.example",), ("-x", b.ip())):
                out = neighbour.run(
                    ["dig", "+time=1", "+tries=1", server, *opts, *q], check=False, timeout=30
                ).stdout
                assert "status:" not in out, (server, opts, q, out)


def test_dead_first_nameserver_fails_over_quickly(tailnet: LabTailnet, resolvers: Resolvers) -> None:
    """A nameserver that does not answer (192.0.2.99, nothing there) or refuses (the resolvers' host, port
    5399: ICMP port unreachable) ahead of a working one: lookups are answered within dig's 1 s."""
    (a,) = tailnet.connected("a")
    for dead in ("192.0.2.99", f"{UPSTREAM}:5399"):
        tailnet.control("dns", "set", "--nameserver", dead, "--nameserver", UPSTREAM)
        for name in ("www.example", "big.example"):

            def answered(name: str = name) -> bool:
                return short(a, "+time=1", "+tries=1", "@100.100.100.100", name)[:1] in (
                    ["198.51.100.10"],
                    ["198.18.0.1"],
                )

            wait_for(
                answered,
                timeout=30,
                what=f"{name} through the second nameserver",
            )
        for _ in range(5):  # and every lookup, not only one
            assert short(a, "+time=1", "+tries=1", "@100.100.100.100", "www.example") == ["198.51.100.10"]
    assert a.status()["dns"]["dropped"] == 0


def test_dns_set_refuses_magicdns_as_nameserver(tailnet: LabTailnet) -> None:
    argv = tailpy_argv("control", "dns", "set", "--nameserver", "100.100.100.100")
    out = tailnet.control_host.run([*argv, "--state-dir", str(tailnet.control_state)], check=False)
    assert out.returncode != 0 and "MagicDNS itself" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_idle_tcp_flood_and_update_opcode(tailnet: LabTailnet, resolvers: Resolvers) -> None:
    """1,100 idle TCP connections to MagicDNS (the reviewer's tcpflood.py) do not stop forwarded UDP
    lookups, and are counted in status's dns.dropped; an UPDATE query gets NOTIMP."""
    (a,) = tailnet.connected("a")
    script = (
        "import resource, socket, subprocess, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n"
        "socks = [socket.create_connection(('100.100.100.100', 53)) for _ in range(1100)]\n"
        "for name in ('www.example', 'a.tailnet.internal'):\n"
        "    out = subprocess.run(['dig', '+time=3', '+tries=1', '+short', '@100.100.100.100', name],\n"
        "                         capture_output=True, text=True).stdout.split()\n"
        "    print(name, ' '.join(out))\n"
    )
    out = a.host.run([sys.executable, "-c", script], timeout=120).stdout
    assert "www.example 198.51.100.10" in out and f"a.{DOMAIN} {a.ip()}" in out, out
    assert a.status()["dns"]["dropped"] >= 1100 - 256
    out = dig(a, "@100.100.100.100", "+opcode=update", f"b.{DOMAIN}", check=False)
    assert status_of(out) == "NOTIMP", out
