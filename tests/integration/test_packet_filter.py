"""The data plane's packet filter with real traffic: two bare tailpy data planes (``tailpy.lab.wgnode``) on a
veth pair, each the other's peer, their filters set through the device API (``Device.set_filter``).

What must hold (Tailscale's ``wgengine/filter`` semantics): a TCP connection opens only to a port a rule
admits, while the SYN-ACK coming back to the connecting side passes its own filter (it is no SYN); ping
works where the source may reach some port of the destination; a UDP reply to a flow a node started passes
its filter with no rule for it, while an unsolicited datagram is dropped (a real DNS query answered by a
responder on the other end); each drop is counted under its reason, and a new filter (or none) takes effect
on the running tunnel.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from _tcp_probe import CONNECT, LISTEN

from tailpy.lab import Host, Lab
from tailpy.lab.procs import read_line
from tailpy.lab.tunnels import (
    TUN_A,
    TUN_B,
    TailpyPair,
    missing_tools,
    native_device_reason,
    start_tailpy_pair,
)
from tailpy.packetfilter import FilterRule, NetPortRange, PortRange

pytestmark = pytest.mark.lab

#: A DNS responder on argv[1]:53 answering every A query with 192.0.2.53 (dnspython).
RESPONDER = """
import socket, sys
import dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.53"))
    s.sendto(r.to_wire(), peer)
"""

#: One DNS query (UDP, a fresh source port) to argv[1]:53; prints the answer, exit 2 on timeout.
QUERY = """
import sys
import dns.exception, dns.message, dns.query
q = dns.message.make_query("db.example.", "A")
try:
    r = dns.query.udp(q, sys.argv[1], timeout=float(sys.argv[2]))
except dns.exception.Timeout:
    sys.exit(2)
print(r.answer[0][0])
"""


def _rule(src: str, dst: str, first: int, last: int, protos: tuple[int, ...]) -> FilterRule:
    return FilterRule((f"{src}/32",), (NetPortRange(f"{dst}/32", PortRange(first, last)),), protos)


def _start(host: Host, script: str, *args: str) -> subprocess.Popen[str]:
    proc = host.popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert read_line(proc.stdout, 20, f"{host.name}: a helper to listen") == "ready"
    return proc


def _connects(host: Host, address: str, port: int) -> bool:
    return host.run([sys.executable, "-c", CONNECT, address, str(port), "3"], check=False).returncode == 0


def _pings(host: Host, address: str) -> bool:
    return host.run(["ping", "-c", "2", "-i", "0.3", "-W", "2", address], check=False).returncode == 0


def _dns_answer(host: Host, server: str) -> str | None:
    done = host.run([sys.executable, "-c", QUERY, server, "3"], check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _dropped(node_stats: dict[str, object], reason: str) -> int:
    device = node_stats["device"]
    assert isinstance(device, dict)
    return int(device["filter"][f"dropped_{reason}"])


@pytest.fixture
def pair(lab: Lab) -> Iterator[TailpyPair]:
    reason = missing_tools("ping") or native_device_reason()
    if reason:
        pytest.skip(reason)
    a, b = lab.host("a"), lab.host("b")
    ip_a, ip_b = lab.link(a, b, subnet="198.51.100.0/30")
    p = start_tailpy_pair(a, b, endpoint_a=ip_a, endpoint_b=ip_b)
    # The session up both ways before any filter, so that what follows is the filter's doing.
    a.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", TUN_B])
    yield p


def test_tcp_opens_only_to_admitted_ports_and_ping_follows_reach(pair: TailpyPair) -> None:
    a, b = pair.a.host, pair.b.host
    _start(b, LISTEN, "22", "80")
    _start(a, LISTEN, "22")
    # b admits a on TCP 22 only; a admits nothing.
    pair.b.set_filter((_rule(TUN_A, TUN_B, 22, 22, (6,)),))
    pair.a.set_filter(())
    assert _connects(a, TUN_B, 22)  # and the SYN-ACK back passed a's empty filter
    assert not _connects(a, TUN_B, 80)
    assert not _connects(b, TUN_A, 22)
    assert _dropped(pair.b.stats(), "no_rule") >= 1
    assert _dropped(pair.a.stats(), "no_rule") >= 1
    # a may reach a port of b: a's echo requests pass b's filter, and b's echo replies pass a's.
    assert _pings(a, TUN_B)
    before = _dropped(pair.a.stats(), "no_rule")
    assert not _pings(b, TUN_A)
    assert _dropped(pair.a.stats(), "no_rule") > before
    st = pair.b.stats()["device"]["filter"]
    assert st["rules"] == 1 and st["dropped_malformed"] == 0
    # A new filter takes effect on the running tunnel: with none, everything passes again.
    pair.a.set_filter(None)
    pair.b.set_filter(None)
    assert pair.b.stats()["device"]["filter"]["rules"] is None
    assert _connects(a, TUN_B, 80)
    assert _connects(b, TUN_A, 22)
    assert _pings(b, TUN_A)


def test_udp_replies_to_outbound_flows_pass_and_unsolicited_udp_is_dropped(pair: TailpyPair) -> None:
    """A DNS query is a flow its sender started: the answer passes the sender's filter without a rule."""
    if reason := _dnspython_missing():
        pytest.skip(reason)
    a, b = pair.a.host, pair.b.host
    _start(a, RESPONDER, TUN_A)
    _start(b, RESPONDER, TUN_B)
    # a lets b query its DNS (UDP 53); b lets a reach nothing.
    pair.a.set_filter((_rule(TUN_B, TUN_A, 53, 53, (17,)),))
    pair.b.set_filter(())
    # a's query to b: dropped by b's filter (no rule, not a reply to anything b sent).
    assert _dns_answer(a, TUN_B) is None
    assert _dropped(pair.b.stats(), "not_a_reply") >= 1
    # b's query to a: admitted by a's rule, and a's answer passes b's filter as the reply to b's flow.
    before = _dropped(pair.b.stats(), "not_a_reply")
    assert _dns_answer(b, TUN_A) == "192.0.2.53"
    stats = pair.b.stats()["device"]["filter"]
    assert stats["dropped_not_a_reply"] == before
    assert stats["udp_flows"] >= 1
    # With the rule turned round (b admits a on 53), a's queries are answered too.
    pair.b.set_filter((_rule(TUN_A, TUN_B, 53, 53, (17,)),))
    assert _dns_answer(a, TUN_B) == "192.0.2.53"


def _dnspython_missing() -> str | None:
    try:
        import dns.message  # noqa: F401
    except ImportError:
        return "dnspython is not installed (make build installs it)"
    return None
