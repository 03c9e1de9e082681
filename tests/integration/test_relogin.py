"""Re-login without loss: on a connected node, a login that fails (`tailpy login` where control offers no
browser sign-in, `tailpy up --force-reauth` with a refused key, `tailpy login` with a used-up key) leaves the
node as it was: connected to control, same node key, peers reachable; the messages say what to do without
naming flags the user never typed. An empty ``--auth-key`` is a usage error, not "no key". A login that
succeeds gives a new node key and the node carries on.
"""

from __future__ import annotations

import subprocess

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


def _cli(node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.host.run(tailpy_argv(*args, "--socket", node.socket), check=False, timeout=90)


def _still_connected(node: LabNode, node_key: str, peer_ip: str) -> None:
    st = node.status()
    assert st["backend_state"] == "Running", st["backend_state"]
    assert st["self"]["node_key"] == node_key
    wait_for(lambda: node.status()["control_connected"], timeout=20, what=f"{node.name} to follow control")
    node.ping(peer_ip, count=2)


def test_failed_relogin_keeps_the_node_connected(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")
    key = a.status()["self"]["node_key"]
    b_ip = b.ip()

    plain = _cli(a, "login")  # control offers no browser sign-in here
    assert plain.returncode == 1, plain
    assert "--force-reauth" not in plain.stderr and "--auth-key" in plain.stderr, plain.stderr
    assert "stays connected" in plain.stderr, plain.stderr
    _still_connected(a, key, b_ip)

    bad = _cli(a, "up", "--force-reauth", "--auth-key", "tskey-auth-bogus")
    assert bad.returncode == 1 and "stays connected" in bad.stderr, bad.stderr
    _still_connected(a, key, b_ip)

    spent = net.authkey(reusable=False)
    assert _cli(b, "login", "--auth-key", spent).returncode == 0  # b uses it up
    used = _cli(a, "login", "--auth-key", spent)
    assert used.returncode == 1 and "auth key" in used.stderr.lower(), used.stderr
    _still_connected(a, key, b.ip())

    empty = _cli(a, "up", "--auth-key", "")
    assert empty.returncode == 2 and "--auth-key is empty" in empty.stderr, empty.stderr
    _still_connected(a, key, b.ip())

    fresh = _cli(a, "login", "--auth-key", net.authkey(reusable=False))
    assert fresh.returncode == 0, fresh.stderr
    assert a.status()["self"]["node_key"] != key
    b.wait_peers(1)
    wait_for(
        lambda: a.host.run(["ping", "-c", "1", "-W", "2", b.ip()], check=False).returncode == 0,
        timeout=20,
        what="a to reach b with its new key",
    )
