"""A real tailnet in the lab: `tailpy control serve`, tailpyd per node, `tailpy up`, ping over WireGuard."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


@pytest.fixture
def tailnet(lab: Lab) -> LabTailnet:
    net = LabTailnet(lab)
    net.start_control()
    return net


def test_three_nodes_every_pair_pings_both_ways(tailnet: LabTailnet) -> None:
    nodes = tailnet.connected("n1", "n2", "n3")
    statuses = {n.name: n.status() for n in nodes}
    addrs = {name: st["self"]["addresses"] for name, st in statuses.items()}
    v4 = [a[0] for a in addrs.values()]
    assert len(set(v4)) == 3 and all(a.startswith("100.") for a in v4)
    for src, dst in itertools.permutations(nodes, 2):
        src.ping(dst.ip(), count=2)
        src.ping(dst.ip6(), count=1)
    st = nodes[0].status()
    for p in st["peers"]:
        assert p["last_handshake"] is not None, p
        assert p["rx_bytes"] > 0 and p["tx_bytes"] > 0, p
        assert p["endpoint"].startswith("192.0.2."), p
        assert p["active"] and p["online"] and not p["expired"], p
    # The human table: one row per node, the peers active over a direct path.
    table = nodes[0].cli("status")
    for n in nodes[1:]:
        row = next(line for line in table.splitlines() if f" {n.name} " in line)
        assert n.ip() in row and "active; direct 192.0.2." in row, table
    # whois answers for a peer's address and for this node's own.
    who = json.loads(nodes[0].cli("whois", nodes[2].ip(), "--json"))
    assert who["name"] == "n3" and who["node_key"] == statuses["n3"]["self"]["node_key"]
    assert "n1" in nodes[0].cli("whois", nodes[0].ip6())
    missing = nodes[0].host.run(
        tailpy_argv("whois", "100.64.99.99", "--socket", nodes[0].socket), check=False
    )
    assert missing.returncode == 1 and "no node" in missing.stderr and "Traceback" not in missing.stderr


def test_node_restart_keeps_address(tailnet: LabTailnet) -> None:
    key = tailnet.authkey(reusable=False)
    a = tailnet.add_node("a")
    b = tailnet.add_node("b")
    a.up(key)
    b.up(tailnet.authkey(reusable=False))
    first = a.status()["self"]
    before = first["addresses"]
    a.stop_daemon()
    a.start_daemon()
    # The daemon reconnects by itself from its state file: no key needed, same address.
    st = wait_for(
        lambda: (s := a.status())["backend_state"] == "Running" and s,
        timeout=30,
        what="a to reconnect after restart",
    )
    assert st["self"]["addresses"] == before
    # The machine key lasts; the disco key is new at each start.
    assert st["self"]["machine_key"] == first["machine_key"]
    assert st["self"]["disco_key"] != first["disco_key"]
    b.wait_peers(1)
    b.ping(a.ip(), count=2)
    # `tailpy up` again (no key) also works for a registered node and keeps the address.
    assert a.up()["self"]["addresses"] == before


def test_control_restart_keeps_state_and_nodes_reconnect(tailnet: LabTailnet) -> None:
    key = tailnet.authkey(reusable=True)
    a, b = tailnet.add_node("a"), tailnet.add_node("b")
    a.up(key)
    b.up(key)
    a.wait_peers(1)
    addr_a = a.status()["self"]["addresses"]
    tailnet.stop_control()
    wait_for(lambda: not a.status()["control_connected"], timeout=30, what="a to notice control is gone")
    a.ping(b.ip(), count=2)  # the data plane keeps working without control
    tailnet.start_control()
    for n in (a, b):

        def reconnected(n: LabNode = n) -> bool:
            return bool(n.status()["control_connected"])

        wait_for(reconnected, timeout=60, what=f"{n.name} to reconnect")
    c = tailnet.add_node("c")
    c.up(key)  # the same reusable key still works: the server kept its state
    a.wait_peers(2)
    assert a.status()["self"]["addresses"] == addr_a
    c.ping(a.ip(), count=2)


def test_bad_auth_key_is_one_clear_sentence(tailnet: LabTailnet) -> None:
    n = tailnet.add_node("n")
    argv = tailpy_argv(
        "up", "--login-server", tailnet.control_url, "--auth-key", "tskey-auth-bogus", "--socket", n.socket
    )
    out = n.host.run(argv, check=False)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "auth key" in out.stderr.lower()
    assert n.status()["self"]["addresses"] == []  # nothing was registered


def test_up_starts_the_daemon_and_down_stops_it(tailnet: LabTailnet) -> None:
    """A user's path: no tailpyd running; `tailpy up` starts one, `tailpy down` disconnects and it exits."""
    key = tailnet.authkey()
    peer = tailnet.add_node("peer")
    peer.up(key)
    host = tailnet.lab.host("fresh")
    tailnet.lan.attach(host)
    state = tailnet.root / "fresh"
    sock = str(state / "tailpyd.sock")
    env_cli = ["env", f"TAILPY_STATE_DIR={state}", f"TAILPY_SOCKET={sock}"]
    out = host.run([*env_cli, *tailpy_argv("up", "--login-server", tailnet.control_url, "--auth-key", key)])
    assert "connected:" in out.stdout
    assert (state / "tailpyd.state").stat().st_mode & 0o777 == 0o600
    status = json.loads(host.run([*env_cli, *tailpy_argv("status", "--json")]).stdout)
    assert status["backend_state"] == "Running" and len(status["peers"]) == 1
    peer.wait_peers(1)
    host.run(["ping", "-c", "2", "-W", "2", peer.ip()])
    host.run([*env_cli, *tailpy_argv("down")])
    wait_for(lambda: not os.path.exists(sock), timeout=15, what="tailpyd to exit after `tailpy down`")
    gone = host.run([*env_cli, *tailpy_argv("status")], check=False)
    assert gone.returncode == 1 and "not running" in gone.stderr
