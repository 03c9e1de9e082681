"""The NAT matrix (RFC 4787 behaviours), peers behind one NAT, double NAT (RFC 6888) and roaming, with real
tailnet nodes.

Every node runs the real ``tailpyd`` behind real nftables routers (:mod:`tailpy.lab`). For each pair of
topologies the test starts an ICMP ``ping -i 0.2`` between the two nodes' tailnet addresses, runs ``tailpy
ping --until-direct`` and checks the outcome the cell expects: a direct path where NAT traversal can make
one (the pongs end "via <ip:port>" and ``tailpy status --json`` says ``path: direct`` with an endpoint the
peer's packets really come from), the DERP relay otherwise (``tailpy ping`` exits non-zero, status says
``relay``). Meanwhile the ICMP ping must lose nothing after its first reply: the relay carries traffic until
the path upgrades, and the upgrade drops no packet.

One control server (with its embedded DERP and STUN) serves the whole module; each cell adds two fresh nodes
on sites of their own and stops them when it ends. Timings are printed, never asserted (only generous
bounds, as a user would notice).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.matrix import CELLS, Cell
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        shutil.which("nft") is None, reason="`nft` not found: install the Debian package nftables"
    ),
]

#: `tailpy ping` lines: "pong from b (100.64.0.2) via DERP(tailpy) in 3ms", "... via 192.0.2.7:41641 in 1ms".
PONG = re.compile(r"^pong from (?P<name>\S+) \((?P<ip>[^)]+)\) via (?P<via>\S+) in (?P<ms>[\d.]+)\s*ms")
#: Pings `tailpy ping --until-direct` gets (one every 0.5 s after each pong, at least 15 s) before a cell
#: that should go direct is judged a failure.
DIRECT_PINGS = 30
#: Pings (one every 0.5 s after each pong) a relay-only cell gets to show no direct path appears (a path
#: gets 10 s to settle).
RELAY_PINGS = 20
#: ICMP pings keep flowing this long after the path settles (the upgrade must drop none of them).
AFTER_UPGRADE = 2.0
#: Seconds traffic gets to resume after a node roams (the aim is 5 s; only this generous bound fails).
ROAM_WITHIN = 45


@pytest.fixture(scope="module")
def tailnet() -> Iterator[LabTailnet]:
    """One lab and control server (embedded DERP + STUN on the internet LAN) for the whole module."""
    with Lab() as lab:
        net = LabTailnet(lab)
        net.start_control()
        yield net


@pytest.fixture(scope="module")
def authkey(tailnet: LabTailnet) -> str:
    return tailnet.authkey(reusable=True)


# -- helpers ---------------------------------------------------------------------------------------------


def peer(st: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The peer entry called ``name`` (hostname) in a ``tailpy status --json`` document, or None."""
    return next((p for p in st["peers"] if p["hostname"] == name), None)


def wait_sees(node: LabNode, *others: LabNode, timeout: float = 60) -> None:
    """Wait until ``node`` is running and its netmap has every one of ``others`` online."""

    def check() -> bool:
        st = node.status()
        if st["backend_state"] != "Running":
            return False
        return all((p := peer(st, o.name)) is not None and p["online"] for o in others)

    wait_for(check, timeout=timeout, what=f"{node.name} to see {[o.name for o in others]}", interval=0.2)


def bring_up(tailnet: LabTailnet, key: str, *nodes: LabNode) -> None:
    for n in nodes:
        n.up(key)
    for n in nodes:
        wait_sees(n, *(o for o in nodes if o is not n))


def finish(*nodes: LabNode) -> None:
    """Stop the nodes' daemons (their hosts stay until the module's lab closes)."""
    for n in nodes:
        n.stop_daemon()


class IcmpPing:
    """``ping -i 0.2`` from ``src`` to ``address`` in the background; :meth:`stop` ends it and tells which
    sequence numbers were answered."""

    def __init__(self, src: LabNode, address: str) -> None:
        self.src, self.address = src, address
        self.proc = src.host.popen(
            ["ping", "-n", "-i", "0.2", "-W", "5", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.started = time.monotonic()

    def stop(self) -> tuple[list[int], str]:
        """SIGINT (ping prints its summary), then the answered sequence numbers (sorted) and the output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        seqs = sorted({int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", out)})
        return seqs, out

    def losses(self) -> tuple[list[int], list[int], str]:
        """(answered, lost between the first and the last answer, output). Only gaps count: probes before
        the tunnel's first reply (the handshake) and the last one in flight at SIGINT are not losses."""
        seqs, out = self.stop()
        if not seqs:
            return seqs, [], out
        lost = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
        return seqs, lost, out


@dataclass
class PingRun:
    returncode: int
    pongs: list[re.Match[str]]
    out: str
    seconds: float

    @property
    def last_via(self) -> str:
        return self.pongs[-1]["via"] if self.pongs else ""


def is_derp(via: str) -> bool:
    return via.startswith("DERP(")


def tailpy_ping(
    src: LabNode, address: str, *, count: int, timeout: float = 5, until_direct: bool = True
) -> PingRun:
    """``tailpy ping [--until-direct] -c COUNT --timeout T ADDRESS`` on ``src``; its pongs, parsed."""
    args = ["ping", "-c", str(count), "--timeout", f"{timeout:g}"]
    if until_direct:
        args.append("--until-direct")
    started = time.monotonic()
    done = src.host.run(
        tailpy_argv(*args, address, "--socket", src.socket), check=False, timeout=count * (timeout + 2) + 30
    )
    took = time.monotonic() - started
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    pongs = [m for line in done.stdout.splitlines() if (m := PONG.match(line.strip()))]
    return PingRun(done.returncode, pongs, out, took)


def status_row(a: LabNode, b: LabNode) -> str:
    """b's row in a's human ``tailpy status``."""
    rows = [line for line in a.cli("status").splitlines() if f" {b.name} " in line]
    assert len(rows) == 1, rows
    return rows[0]


def expect_direct(a: LabNode, b: LabNode, pings: int = DIRECT_PINGS) -> PingRun:
    """``tailpy ping --until-direct`` from a to b ends with a direct pong from an address b is seen as, and
    a's status shows b on a direct path there."""
    run = tailpy_ping(a, b.ip(), count=pings, timeout=5)
    assert run.returncode == 0, f"{a.name} -> {b.name} did not go direct:\n{run.out}\n{a.log_tail(15)}"
    assert run.pongs and not is_derp(run.last_via), run.out
    assert all(p["ip"] == b.ip() for p in run.pongs), run.out
    ip = run.last_via.rsplit(":", 1)[0]
    assert ip in b.host.seen_as(), (
        f"direct pong via {run.last_via}, but {b.name} is seen as {b.host.seen_as()}"
    )
    st = peer(a.status(), b.name)
    assert st is not None and st["path"] == "direct", st
    assert st["endpoint"] and st["endpoint"].rsplit(":", 1)[0] in b.host.seen_as(), st
    assert f"direct {st['endpoint']}" in status_row(a, b), a.cli("status")
    return run


def expect_relay(a: LabNode, b: LabNode) -> PingRun:
    """``tailpy ping --until-direct`` from a to b gets only DERP pongs and says no direct connection; a's
    status shows b relayed through a named DERP region."""
    run = tailpy_ping(a, b.ip(), count=RELAY_PINGS, timeout=5)
    assert run.returncode != 0, f"{a.name} -> {b.name} should stay relayed:\n{run.out}"
    assert "direct connection not established" in run.out, run.out
    assert run.pongs, f"no pong over DERP:\n{run.out}"
    assert all(is_derp(p["via"]) for p in run.pongs), run.out
    st = peer(a.status(), b.name)
    assert st is not None and st["path"] == "relay" and st["relay_region_code"], st
    assert f'relay "{st["relay_region_code"]}"' in status_row(a, b), a.cli("status")
    return run


def wait_path(node: LabNode, other: LabNode, path: str, timeout: float = 20) -> dict[str, Any]:
    """Wait until ``node``'s status shows ``other`` on ``path`` ("direct" or "relay")."""

    def check() -> dict[str, Any] | None:
        p = peer(node.status(), other.name)
        return p if p is not None and p["path"] == path else None

    return wait_for(check, timeout=timeout, what=f"{node.name} to see {other.name} {path}", interval=0.3)


def until_reply(node: LabNode, address: str, timeout: float = 60) -> float:
    """Seconds until one ICMP echo from ``node`` to ``address`` is answered (each probe waits 1 s)."""
    started = time.monotonic()

    def answered() -> bool:
        return (
            node.host.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False, timeout=10).returncode
            == 0
        )

    wait_for(answered, timeout=timeout, what=f"{node.name} to get a reply from {address}", interval=0.05)
    return time.monotonic() - started


def add_pair(tailnet: LabTailnet, cell: Cell) -> tuple[LabNode, LabNode]:
    a_name, b_name = f"{cell.id}-a", f"{cell.id}-b"
    if cell.same_lan:
        site = f"lan{len(tailnet.sites) + 1}"
        return (
            tailnet.add_node(a_name, behind=cell.a, lan=site),
            tailnet.add_node(b_name, lan=site),
        )
    return tailnet.add_node(a_name, behind=cell.a), tailnet.add_node(b_name, behind=cell.b)


# -- the matrix ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_matrix_cell(tailnet: LabTailnet, authkey: str, cell: Cell) -> None:
    a, b = add_pair(tailnet, cell)
    try:
        bring_up(tailnet, authkey, a, b)
        icmp = IcmpPing(a, b.ip())
        try:
            run = expect_direct(a, b) if cell.direct else expect_relay(a, b)
            if cell.direct:
                # The other side upgrades too (it answers the disco pings and pings back).
                wait_path(b, a, "direct")
            time.sleep(AFTER_UPGRADE)
            assert icmp.proc.poll() is None, "ping exited early"
        finally:
            answered, lost, out = icmp.losses()
        first = [p["via"] for p in run.pongs]
        print(
            f"{cell.id}: tailpy ping {' -> '.join(dict.fromkeys(first))} in {run.seconds:.1f} s; "
            f"ICMP {len(answered)} answered, {len(lost)} lost after the first reply"
        )
        assert len(answered) >= 5, out
        assert lost == [], f"ICMP probes lost while the path settled: {lost}\n{out}"
        if cell.same_lan:
            # Peers on one LAN use their LAN addresses (no hairpinning through the router).
            assert run.last_via.rsplit(":", 1)[0] == b.lan_ip(), run.out
    finally:
        finish(a, b)


# -- peers behind one NAT --------------------------------------------------------------------------------


def test_peers_behind_one_nat(tailnet: LabTailnet, authkey: str) -> None:
    """Three nodes on one listen port (41641) behind one EIM router without hairpinning: each pair is direct
    over LAN addresses, and an outside public node reaches each of them directly on a port of its own (the
    router rewrote the colliding source ports)."""
    h = [tailnet.add_node(f"c15-h{i}", behind="eim", lan="c15home") for i in (1, 2, 3)]
    out = tailnet.add_node("c15-out")
    nodes = [*h, out]
    try:
        for n in nodes:
            n.up(authkey)
        for n in nodes:
            wait_sees(n, *(o for o in nodes if o is not n))
        router = h[0].site.router if h[0].site else None
        assert router is not None and not router.hairpin
        run = expect_direct(h[0], h[1])
        assert run.last_via == f"{h[1].lan_ip()}:41641", run.out
        seen = {}
        for node in h:
            expect_direct(node, out)
            expect_direct(out, node)  # and the outside node reaches each of them directly
            st = peer(out.status(), node.name)
            assert st is not None
            ip, port = st["endpoint"].rsplit(":", 1)
            assert ip == router.public_ip, st
            seen[node.name] = port
        print(f"outside peer sees the three nodes at ports {seen}")
        assert len(set(seen.values())) == 3, seen
        # netcheck from the site: no hairpinning through this router.
        report = h[0].cli("netcheck", "--json", "--timeout", "3")
        assert '"hairpinning": false' in report, report
    finally:
        finish(*nodes)


def test_netcheck_sees_hairpinning_when_enabled(tailnet: LabTailnet) -> None:
    """netcheck's HairPinning is true behind a router that hairpins (false is checked above); Tailscale's
    detection once regressed to always false (tailscale/tailscale#188)."""
    site = tailnet.site("c15hp", "eim", hairpin=True)
    host = tailnet.lab.host("c15-hp")
    site.lan.attach(host)
    stun = f"{tailnet.lan.ip(tailnet.control_host)}:3478"
    done = host.run(tailpy_argv("netcheck", "--json", "--stun", stun, "--timeout", "3"), timeout=60)
    assert '"hairpinning": true' in done.stdout, done.stdout


# -- double NAT ------------------------------------------------------------------------------------------


def test_double_nat_advertises_only_real_endpoints(tailnet: LabTailnet, authkey: str) -> None:
    """Behind two EIM layers the node learns the outer public address (STUN) and advertises its LAN and
    that address, never the address between the two routers."""
    d = tailnet.add_node("c16-d", behind="double-eim")
    try:
        d.up(authkey)
        assert d.site is not None
        outer, inner = d.site.routers
        expected = outer.public_ip

        def endpoints() -> list[str] | None:
            eps: list[str] = d.status()["self"]["endpoints"]
            return eps if any(e.rsplit(":", 1)[0] == expected for e in eps) else None

        eps = wait_for(endpoints, timeout=40, what=f"{d.name} to learn {expected} by STUN", interval=0.5)
        print(f"double NAT: endpoints {eps}")
        assert not any(e.startswith(inner.public_ip + ":") for e in eps), eps
        assert not any(e.startswith("198.19.") for e in eps), eps
    finally:
        finish(d)


# -- roaming ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer_behind", ["eim", "public"])
def test_roaming_traffic_resumes(tailnet: LabTailnet, authkey: str, peer_behind: str) -> None:
    """A node behind EIM on a direct path to a node behind ``peer_behind`` gets a new LAN address (tailpyd
    is not told): ICMP through the tunnel resumes (the aim: within 5 s; asserted only within a
    generous bound) and the path goes direct again."""
    a = tailnet.add_node(f"roam-{peer_behind}-a", behind="eim")
    b = tailnet.add_node(f"roam-{peer_behind}-b", behind=peer_behind)
    try:
        bring_up(tailnet, authkey, a, b)
        # No traffic yet: `tailpy ping` itself starts discovery, and shows the upgrade from DERP to direct
        # (hole punching needs the CallMeMaybe over DERP first).
        run = expect_direct(a, b)
        assert is_derp(run.pongs[0]["via"]), run.out
        old = a.lan_ip()
        new = a.roam()
        assert new != old
        took = until_reply(a, b.ip(), timeout=ROAM_WITHIN)
        print(f"roaming (peer {peer_behind}): {old} -> {new}: ping answered after {took:.1f} s")
        expect_direct(a, b)
    finally:
        finish(a, b)
