"""The lab itself: hosts on a LAN reach each other, and closing leaves no namespace or process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tailpy.errors import LabError
from tailpy.lab import Lab

pytestmark = pytest.mark.lab


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _ours(lab: Lab) -> list[str]:
    return [line.split()[0] for line in _netns_list().splitlines() if line.startswith(lab.prefix)]


def test_two_hosts_on_a_lan_ping_each_other(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    lan = lab.lan("lan", [a, b], subnet="192.0.2.0/24", subnet6="2001:db8:1::/64")
    assert lan.ip(a) == "192.0.2.1" and lan.ip(b) == "192.0.2.2"
    a.run(["ping", "-c", "1", "-W", "5", lan.ip(b)])
    b.run(["ping", "-c", "1", "-W", "5", lan.ip(a)])
    a.run(["ping", "-c", "1", "-W", "5", "2001:db8:1::2"])


def test_close_removes_every_namespace_and_process() -> None:
    lab = Lab()
    a, b = lab.host("a"), lab.host("b")
    lab.lan("lan", [a, b])
    lab.link(a, b)
    procs = [a.popen(["sleep", "600"]), b.popen(["sh", "-c", "sleep 600 & sleep 600"])]
    assert sorted(_ours(lab)) == sorted(lab.namespaces())
    assert len(lab.namespaces()) == 3  # a, b and the LAN's switch
    pids = [int(p) for ns in lab.namespaces() for p in _netns_pids(ns)]
    assert len(pids) == 4  # two sleeps, sh and its background sleep
    lab.close()
    lab.close()  # idempotent
    assert _ours(lab) == []
    for proc in procs:
        assert proc.poll() is not None
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _netns_pids(ns: str) -> list[str]:
    return subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, check=True
    ).stdout.split()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


SIGNALLED = """
import sys
from tailpy.lab import Lab
lab = Lab()
lab.install_signal_handlers()
lab.host("a").popen(["sleep", "600"])
print(lab.prefix, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_closes_the_lab(sig: signal.Signals) -> None:
    argv = [sys.executable, "-c", SIGNALLED]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        prefix = proc.stdout.readline().strip()
        assert prefix.startswith("tpy")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 128 + sig
        assert not [line for line in _netns_list().splitlines() if line.startswith(prefix)]


def test_close_runs_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError), Lab() as lab:
        lab.host("a").popen(["sleep", "600"])
        raise RuntimeError("boom")
    assert _ours(lab) == []


def test_prefixes_are_unique_and_names_checked(lab: Lab) -> None:
    with Lab() as other:
        assert other.prefix != lab.prefix
    lab.host("a")
    with pytest.raises(LabError, match="already has a host"):
        lab.host("a")
    with pytest.raises(LabError, match="outside the lab's address ranges"):
        lab.lan("bad", subnet="10.0.0.0/24")


SLOW_TO_STOP = SIGNALLED.replace('["sleep", "600"]', '["sh", "-c", "trap \'\' TERM; sleep 600"]')


def test_a_second_interrupt_during_cleanup_does_not_stop_it() -> None:
    """A double Ctrl-C (or `timeout -s INT`, which signals the whole group) must not leave the lab behind:
    the second signal arrives while close() waits for a process that ignores SIGTERM."""
    argv = [sys.executable, "-c", SLOW_TO_STOP]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        prefix = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGINT)
        assert "removing the lab" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)  # close() is now waiting out the grace period
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
        assert not [line for line in _netns_list().splitlines() if line.startswith(prefix)]


def test_routers_gateways_routes_and_roaming(lab: Lab) -> None:
    """Router plumbing without NAT semantics: gateways, routes to non-NAT insides, readdressing, detaching,
    argument checks, and the router namespaces going away with the lab."""
    inet = lab.lan("inet", [lab.host("srv")], subnet="203.0.113.0/24")
    home = lab.lan("home", [lab.host("early")], subnet="198.18.1.0/24")
    fw = lab.router("fw", inside=home, outside=inet, nat="firewall")
    late = lab.host("late")
    home.attach(late)
    assert fw.inside_ip == "198.18.1.2" and fw.public_ip == "203.0.113.2"  # next free on each LAN
    assert home.gateway is fw and inet.gateway is None
    for host in (lab.hosts["early"], late):  # attached before and after the router
        assert host.default_route() == fw.inside_ip
    srv = lab.hosts["srv"]
    assert srv.default_route() is None
    assert "198.18.1.0/24 via 203.0.113.2" in srv.run(["ip", "-4", "route"]).stdout
    late.run(["ping", "-c", "1", "-W", "5", srv.ip()])
    assert fw.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert srv.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"

    old = late.ip()
    new = home.readdress(late)
    assert new != old and home.ip(late) == new and late.ip("home") == new
    assert late.default_route() == fw.inside_ip
    late.run(["ping", "-c", "1", "-W", "5", srv.ip()])
    assert home.readdress(late, "198.18.1.200") == "198.18.1.200"
    with pytest.raises(LabError, match="already used"):
        home.readdress(late, fw.inside_ip)
    with pytest.raises(LabError, match="not in LAN"):
        home.readdress(late, "198.18.2.9")
    home.detach(late)
    assert "home" not in late.addresses and late.default_route() is None
    assert home.attach(late) not in (fw.inside_ip, "198.18.1.200")

    with pytest.raises(LabError, match="unknown router kind 'cone'"):
        lab.router("bad", inside=lab.lan("x", subnet="198.18.9.0/24"), outside=inet, nat="cone")  # type: ignore[arg-type]
    with pytest.raises(LabError, match="already has router fw"):
        lab.router("bad2", inside=home, outside=inet)
    with pytest.raises(LabError, match="hairpinning needs a NAT router"):
        lab.router(
            "bad3", inside=lab.lan("y", subnet="198.18.8.0/24"), outside=inet, nat="none", hairpin=True
        )
    assert not {"bad", "bad2", "bad3"} & set(lab.hosts)  # nothing half-built was left

    cgn_lan = lab.lan("cgn", subnet="198.19.1.0/24")
    nat = lab.router("cgn", inside=cgn_lan, outside=inet, nat="edm", udp_timeout=25)
    for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
        assert nat.run(["sysctl", "-n", f"net.netfilter.{key}"]).stdout.strip() == "25"
    assert "fully-random" in nat.run(["nft", "list", "ruleset"]).stdout
    names = lab.namespaces()
    lab.close()
    assert not set(names) & set(_ours(lab)) and _ours(lab) == []


def test_closing_a_lab_gives_the_process_its_signal_dispositions_back() -> None:
    """A lab run in-process (the demo) ignores SIGINT/SIGTERM while it cleans up; afterwards the process, and
    every program it starts, must be stoppable again (an ignored SIGTERM is inherited across exec)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    lab = Lab()
    lab.install_signal_handlers()
    lab.close()
    assert {s: signal.getsignal(s) for s in before} == before
    child = subprocess.Popen(["sleep", "30"])
    child.terminate()
    assert child.wait(timeout=10) == -signal.SIGTERM
