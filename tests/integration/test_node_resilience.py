"""What a tester broke in a real tailnet, each now a test: a mistyped login server, control down during
`tailpy up`, a node deleted by the admin, a failed `up` that must not register, and a flood of datagrams
for Python that must not fill the daemon's queue."""

from __future__ import annotations

import json
import sys

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import WG_PORT, LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


@pytest.fixture
def pair(lab: Lab) -> tuple[LabTailnet, LabNode, LabNode]:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    return net, a, b


def _cli(node: LabNode, *args: str) -> tuple[int, str, str]:
    done = node.host.run(tailpy_argv(*args, "--socket", node.socket), check=False)
    return done.returncode, done.stdout, done.stderr


def test_mistyped_login_server_changes_nothing(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    net, a, b = pair
    before = a.status()["self"]
    wrong = net.control_url.replace(":8080", ":9999")
    code, _, err = _cli(a, "up", "--login-server", wrong, "--timeout", "5")
    assert code == 1 and "Traceback" not in err
    assert f"registered with {net.control_url}, not {wrong}" in err
    code, _, err = _cli(a, "up", "--login-server", "http://[bad")
    assert code == 1 and "not a valid URL" in err
    after = a.status()
    assert after["self"]["addresses"] == before["addresses"] and after["self"]["id"] == before["id"]
    assert a.ip() == before["addresses"][0].split("/")[0]
    a.ping(b.ip(), count=1)
    assert _cli(a, "up")[0] == 0  # the saved login server still works, no key needed


def test_up_while_control_is_down_comes_up_and_reconnects(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    net, a, b = pair
    a.cli("down")  # a's daemon is not auto-started by `up`, so it stays
    net.stop_control()
    code, _, err = _cli(a, "up", "--timeout", "3")
    assert code == 1 and "cannot reach control server" in err and "ssl:default" not in err
    st = a.status()
    assert st["backend_state"] == "Starting" and st["self"]["addresses"]
    net.start_control()
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=60, what="a to reconnect by itself")
    a.wait_peers(1)
    # (b learns a's new endpoints once its own stream to the restarted control is back: a busy machine may
    # take a few seconds, so reachability is awaited, not the first two probes)
    wait_for(lambda: a.pings(b.ip()), timeout=30, what="a to reach b again")


def test_deleted_node_needs_login(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    net, a, b = pair
    net.control("nodes", "delete", str(a.status()["self"]["id"]))
    st = wait_for(
        lambda: (s := a.status())["backend_state"] == "NeedsLogin" and s, timeout=30, what="a to need login"
    )
    assert st["peers"] == [] and "removed from the tailnet" in st["error"]
    wait_for(lambda: b.status()["peers"] == [], timeout=30, what="b to drop a")
    a.up(net.authkey())
    b.wait_peers(1)
    b.ping(a.ip(), count=2)


def test_up_that_cannot_make_its_tunnel_registers_nothing(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    net, a, _ = pair
    # A second node in a's namespace wants the TUN name a already uses.
    twin = LabNode(net, a.host, net.root / "twin")
    code, _, err = _cli(
        twin,
        "up",
        "--login-server",
        net.control_url,
        "--auth-key",
        net.authkey(),
        "--state-dir",
        str(twin.state_dir),
    )
    assert code == 1 and "in use" in err and "Traceback" not in err
    nodes = json.loads(net.control("nodes", "list", "--json"))
    assert sorted(n["name"] for n in nodes) == ["a", "b"]
    assert not (twin.state_dir / "tailpyd.sock").exists()  # the daemon `up` started was stopped again


_FLOOD = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(6000):
    s.sendto(b"TS\\xf0\\x9f\\x92\\xac" + os.urandom(40), (sys.argv[1], int(sys.argv[2])))
"""


def test_datagrams_for_python_are_drained(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    """More disco-looking (too short) datagrams than the data plane's queue holds: the daemon drains them,
    so the queue never stays full; they are counted as ignored (STUN and disco go to NAT traversal)."""
    net, a, b = pair
    b.host.run([sys.executable, "-c", _FLOOD, net.lan.ip(a.host), str(WG_PORT)])
    st = wait_for(
        lambda: (s := a.status())["ignored_datagrams"] > 4096 and s, timeout=30, what="a to drain the queue"
    )
    assert st["device"]["to_python"] >= st["ignored_datagrams"]
    b.ping(a.ip(), count=1)


def test_ip_flags(pair: tuple[LabTailnet, LabNode, LabNode]) -> None:
    _, a, _ = pair
    both = a.cli("ip", "-4", "-6").split()
    assert both == [a.ip(), a.ip6()] and ":" not in both[0]
