"""tailpyd's underlay never loops into its tunnel: with a default route into the TUN in routing table 52
(what an exit node puts there), a node behind a NAT still reaches control, DERP and its peers through its
own default route (every underlay socket carries the bypass mark), and a crash leaves no route that
blackholes the host. The route is put in table 52 by hand here, so the test needs no exit node."""

from __future__ import annotations

import signal
import sys

import pytest

from tailpy.daemon.router import BYPASS_MARK
from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = pytest.mark.lab


@pytest.fixture
def tailnet(lab: Lab) -> LabTailnet:
    net = LabTailnet(lab)
    net.start_control()
    return net


def _route_get(node: LabNode, *args: str) -> str:
    return node.host.run(["ip", "route", "get", *args]).stdout


def test_underlay_stays_out_of_a_default_route_into_the_tunnel(tailnet: LabTailnet) -> None:
    a, c = tailnet.connected("a", "c", behind="eim")
    control_ip = tailnet.lan.ip(tailnet.control_host)
    rules = c.host.run(["ip", "rule"]).stdout
    assert "5210:" in rules and "lookup 52" in rules
    assert "dev tailpy0 table 52" in _route_get(c, a.ip())  # the tailnet: table 52, not the main table
    c.host.run(["ip", "route", "add", "default", "dev", "tailpy0", "table", "52"])
    assert "dev tailpy0 table 52" in _route_get(c, control_ip)  # everything else would go into the tunnel
    assert "dev tailpy0" not in _route_get(c, control_ip, "mark", hex(BYPASS_MARK))

    # New connections to control and DERP (control restarted with its relay) and a new peer's WireGuard
    # handshake all leave through the NAT router.
    tailnet.stop_control()
    tailnet.start_control()
    (b,) = tailnet.connected("b", behind="eim")
    c.wait_peers(2, timeout=60)
    wait_for(lambda: c.pings(b.ip()), timeout=30, what="c to reach the new peer b")
    wait_for(lambda: c.pings(a.ip()), timeout=30, what="c to reach a")

    # A crash: the TUN goes, and with it every route into it; nothing blackholes the host.
    c.daemon.send_signal(signal.SIGKILL)
    c.daemon.wait(timeout=10)
    c.daemon = None
    assert "dev tailpy0" not in _route_get(c, control_ip)
    c.host.run(["ping", "-c", "1", "-W", "5", control_ip])
    argv = [sys.executable, "-m", "tailpy.daemon", "--state-dir", str(c.state_dir), "--socket", c.socket]
    done = c.host.run([*argv, "--cleanup"], check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "policy routing rules" in done.stdout
    assert "lookup 52" not in c.host.run(["ip", "rule"]).stdout
    assert c.host.run(["ip", "route", "show", "table", "52"]).stdout == ""
