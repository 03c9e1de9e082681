"""NAT traversal in tailpyd: disco keys in the netmap, STUN endpoints, disco path
selection and `tailpy ping`, on real nodes in the lab (control with its embedded DERP+STUN, region 900
"tailpy", on the internet LAN).

* Two nodes behind endpoint-independent-mapping routers go direct: `tailpy ping` prints pongs via DERP
  (or direct at once) and then via the peer's public ip:port; `tailpy status` says ``direct``.
* Two nodes behind endpoint-dependent ("symmetric") routers stay on the relay; ping still works, and
  `tailpy ping --until-direct` exits 1 with "direct connection not established".
* Two nodes on one LAN: direct; UDP between them dropped -> relay (traffic keeps flowing), dropping lifted
  -> direct again (within ~10 s; the time is printed, not asserted).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from typing import Any

import pytest

from tailpy.errors import LabError
from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) is not installed"),
]

PONG = re.compile(r"^pong from (\S+) \((\S+)\) via (\S+) in \d+ms$")


def _peer(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in st["peers"] if p["name"] == name)


def _diagnose(*nodes: LabNode) -> str:
    out = []
    for n in nodes:
        try:
            st = n.status()
            out.append(f"{n.name}: peers={st['peers']} traversal={st.get('traversal')}")
        except LabError as e:
            out.append(f"{n.name}: status failed: {e}")
        out.append(f"{n.name} log: {n.log_tail(25)}")
    return "\n".join(out)


def _ready(a: LabNode, b: LabNode, endpoints: int) -> None:
    """Wait until each node sees the other's home region 900, disco key and at least ``endpoints``
    endpoints (local ones plus the STUN-mapped one)."""
    for node, other in ((a, b), (b, a)):

        def seen(node: LabNode = node, other: LabNode = other) -> bool:
            st = node.status()
            p = _peer(st, other.name)
            return bool(
                st["self"]["home_derp"] == 900
                and p["home_derp"] == 900
                and p.get("disco_key")
                and len(p.get("endpoints", [])) >= endpoints
            )

        try:
            wait_for(
                seen, timeout=90, what=f"{node.name} to see {other.name} homed with endpoints", interval=0.5
            )
        except LabError as e:
            raise AssertionError(f"{e}\n{_diagnose(a, b)}") from None


def _tailpy_ping(node: LabNode, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return node.host.run(tailpy_argv("ping", *args, "--socket", node.socket), check=False, timeout=timeout)


def _vias(stdout: str) -> list[str]:
    vias = []
    for line in stdout.splitlines():
        m = PONG.match(line.strip())
        if m:
            vias.append(m.group(3))
    return vias


def _path(node: LabNode, other: LabNode) -> tuple[str | None, str | None]:
    p = _peer(node.status(), other.name)
    return p["path"], p["endpoint"]


def test_eim_nodes_go_direct(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b", behind="eim")
    _ready(a, b, endpoints=2)
    b_public = _peer(a.status(), "b")["endpoints"]
    res = _tailpy_ping(a, "-c", "30", "b")
    vias = _vias(res.stdout)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{_diagnose(a, b)}"
    assert vias and all(v == "DERP(tailpy)" for v in vias[:-1]), res.stdout
    assert re.fullmatch(r"192\.0\.2\.\d+:\d+", vias[-1]) and vias[-1] in b_public, (res.stdout, b_public)
    assert f"({b.ip()})" in res.stdout
    # Both sides keep the direct path while traffic flows, and status says so.
    for node, other in ((a, b), (b, a)):

        def direct(node: LabNode = node, other: LabNode = other) -> bool:
            node.ping(other.ip(), count=2)
            path, endpoint = _path(node, other)
            return path == "direct" and bool(endpoint and endpoint.startswith("192.0.2."))

        wait_for(direct, timeout=60, what=f"{node.name} to reach {other.name} directly", interval=0.5)
        table = node.cli("status")
        row = next(line for line in table.splitlines() if f" {other.name} " in line)
        assert "direct 192.0.2." in row, table
    # `tailpy netcheck` runs in tailpyd over the data plane's socket: its mapping is the one peers use.
    report = json.loads(a.cli("netcheck", "--json", "--timeout", "3"))
    assert report["udp"] and report["global_v4"] in a.status()["self"]["endpoints"], report
    assert report["global_v4"] in _peer(b.status(), "a")["endpoints"], report
    # A peer given by tailnet IP answers too; --json reports the direct pong.
    out = _tailpy_ping(b, "-c", "5", "--json", a.ip())
    assert out.returncode == 0, out.stderr
    assert '"direct": true' in out.stdout


def test_edm_nodes_stay_on_relay(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b", behind="edm")
    _ready(a, b, endpoints=2)
    a.ping(b.ip(), count=3)
    b.ping(a.ip(), count=3)
    res = _tailpy_ping(a, "-c", "4", "--until-direct", "b")
    assert res.returncode == 1, f"{res.stdout}\n{res.stderr}"
    assert "direct connection not established" in res.stderr and "Traceback" not in res.stderr, res.stderr
    vias = _vias(res.stdout)
    assert vias and all(v == "DERP(tailpy)" for v in vias), res.stdout
    # Without --until-direct the same pings succeed.
    ok = _tailpy_ping(a, "-c", "2", "--no-until-direct", "b")
    assert ok.returncode == 0 and len(_vias(ok.stdout)) == 2, ok.stdout + ok.stderr
    for node, other in ((a, b), (b, a)):
        st = node.status()
        p = _peer(st, other.name)
        assert p["path"] == "relay" and p["relay_region_code"] == "tailpy", p
        row = next(line for line in node.cli("status").splitlines() if f" {other.name} " in line)
        assert 'relay "tailpy"' in row
    # An unknown peer is one sentence, no traceback.
    bad = _tailpy_ping(a, "-c", "1", "nosuchpeer")
    assert bad.returncode == 1 and "nosuchpeer" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_lan_nodes_fall_back_to_relay_and_return_direct(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    _ready(a, b, endpoints=1)
    res = _tailpy_ping(a, "-c", "20", "b")
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{_diagnose(a, b)}"
    # Traffic runs throughout (ping every 0.2 s), so disco keeps probing.
    traffic = a.host.popen(["ping", "-i", "0.2", "-W", "1", b.ip()])
    try:
        wait_for(lambda: _path(a, b)[0] == "direct", timeout=30, what="a to go direct to b", interval=0.3)
        with lab.block_udp(a.host, b.host):
            try:
                wait_for(lambda: _path(a, b)[0] == "relay", timeout=30, what="a to fall back to relay")
            except LabError as e:
                raise AssertionError(f"{e}\n{_diagnose(a, b)}") from None
            a.ping(b.ip(), count=3)  # still answered, through DERP
            relayed = _tailpy_ping(a, "-c", "2", "--no-until-direct", "b")
            assert relayed.returncode == 0 and set(_vias(relayed.stdout)) == {"DERP(tailpy)"}, relayed.stdout
            st = a.status()
            assert st["derp"]["relay_sent"] > 0, st["derp"]
        healed = time.monotonic()
        try:
            wait_for(
                lambda: _path(a, b)[0] == "direct", timeout=30, what="a to go direct again", interval=0.3
            )
        except LabError as e:
            raise AssertionError(f"{e}\n{_diagnose(a, b)}") from None
        print(f"direct again {time.monotonic() - healed:.1f} s after UDP was unblocked")
        a.ping(b.ip(), count=2)
    finally:
        traffic.terminate()
        traffic.wait()
