"""tailpyd's life on a real node: one daemon per state directory, `down` that always ends with the host as it
was (a wedged daemon, a full disk), cleanup after kill -9 (`tailpyd --cleanup`, `tailpy down`, the next
start), and the node firewall dropping a forged tailnet source from the LAN while tailnet traffic flows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _tmpfs import fill, tiny_tmpfs, tmpfs_reason
from tailpy.daemon.lock import holder
from tailpy.lab import Lab, wait_for
from tailpy.lab.dns import give_resolv_conf, resolv_conf_path
from tailpy.lab.tailnet import WG_PORT, LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab

ORIGINAL = "# lab host resolver\nnameserver 192.0.2.53\noptions timeout:2\n"


@pytest.fixture
def tailnet(lab: Lab) -> LabTailnet:
    net = LabTailnet(lab)
    net.resolv_conf = ORIGINAL
    net.start_control()
    return net


def _run(node: LabNode, *args: str, state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*args, "--socket", node.socket, "--state-dir", str(state_dir or node.state_dir)]
    return node.host.run(tailpy_argv(*argv), check=False, timeout=120)


def _tailpyd(node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "tailpy.daemon",
        "--state-dir",
        str(node.state_dir),
        "--socket",
        node.socket,
    ]
    return node.host.run([*argv, "--port", str(WG_PORT), *args], check=False, timeout=60)


def _table(node: LabNode) -> dict[str, object] | None:
    done = node.host.run(["nft", "-j", "list", "table", "inet", "tailpy"], check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _lo_has_magicdns(node: LabNode) -> bool:
    return "100.100.100.100" in node.host.run(["ip", "-4", "addr", "show", "dev", "lo"]).stdout


def _tailnet_route(node: LabNode) -> str:
    return node.host.run(["ip", "-4", "route", "show", "table", "52", "100.64.0.0/10"]).stdout.strip()


def _resolv(node: LabNode) -> str:
    return resolv_conf_path(node.host).read_text()


def test_second_daemon_and_racing_ups_change_nothing(tailnet: LabTailnet) -> None:
    (a,) = tailnet.connected("a")
    assert "nameserver 100.100.100.100" in _resolv(a)
    conf = _resolv(a)
    second = _tailpyd(a)
    assert second.returncode == 3 and "Traceback" not in second.stderr
    assert (
        second.stderr.strip().splitlines()[-1] == f"tailpyd: tailpyd is already running (pid {a.daemon.pid})"
    )
    # `tailpy up` on the same state directory with another socket: the running daemon is named.
    up = a.host.run(
        tailpy_argv("up", "--socket", str(a.state_dir / "other.sock"), "--state-dir", str(a.state_dir)),
        check=False,
    )
    assert (
        up.returncode == 1 and up.stderr.strip() == f"tailpy: tailpyd is already running (pid {a.daemon.pid})"
    )
    assert a.status()["backend_state"] == "Running" and _resolv(a) == conf and Path(a.socket).exists()
    assert _table(a) is not None

    # Two `tailpy up` racing on a fresh state directory: one daemon, and a second `up` that either found
    # it answering or says which pid runs.
    key = tailnet.authkey()
    b = LabNode(tailnet, tailnet.lab.host("b"), tailnet.root / "b")
    give_resolv_conf(b.host, ORIGINAL)
    tailnet.lan.attach(b.host)
    up_argv = tailpy_argv(
        "up", "--login-server", tailnet.control_url, "--auth-key", key, "--hostname", "b",
        "--socket", b.socket, "--state-dir", str(b.state_dir),
    )  # fmt: skip
    racers = [b.host.popen(up_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in racers]
    for code, err in results:
        assert "Traceback" not in err
        assert code == 0 or "tailpy: tailpyd is already running (pid" in err, err
    assert any(code == 0 for code, _ in results)
    running = holder(b.state_dir)
    assert running is not None and running.pid is not None
    st = wait_for(lambda: (s := b.status())["backend_state"] == "Running" and s, timeout=30, what="b up")
    assert st["self"]["addresses"] and "nameserver 100.100.100.100" in _resolv(b)
    b.ping(a.ip(), count=1)
    down = _run(b, "down")
    assert down.returncode == 0 and down.stdout.strip() == "stopped"
    wait_for(lambda: holder(b.state_dir) is None, timeout=20, what="b's daemon to exit after down")
    assert _resolv(b) == ORIGINAL and not Path(b.socket).exists()


def test_daemons_of_other_state_dirs_leave_the_running_ones_dns_and_socket(tailnet: LabTailnet) -> None:
    """Another tailpyd on the host (its own state directory; userspace or another TUN) neither takes the
    running daemon's socket nor removes its MagicDNS addresses or resolv.conf, starting or stopping."""
    (a,) = tailnet.connected("a")
    conf = _resolv(a)
    assert "nameserver 100.100.100.100" in conf and _lo_has_magicdns(a)
    base = [sys.executable, "-m", "tailpy.daemon", "--port", "0"]
    # Same socket: refused with one sentence, the running daemon's socket untouched.
    other = tailnet.root / "other"
    same_socket = a.host.run(
        [*base, "--state-dir", str(other), "--socket", a.socket, "--tun", "userspace-networking"],
        check=False,
        timeout=60,
    )
    assert same_socket.returncode != 0 and "Traceback" not in same_socket.stderr
    assert f"another tailpyd is listening on {a.socket} (pid {a.daemon.pid})" in same_socket.stderr
    assert Path(a.socket).exists() and a.status()["backend_state"] == "Running"
    # Other socket, userspace and another TUN: each starts and stops, a's DNS stays.
    for tun in ("userspace-networking", "tailpy9"):
        sock = str(tailnet.root / f"other-{tun}.sock")
        argv = [*base, "--state-dir", str(tailnet.root / f"other-{tun}"), "--socket", sock, "--tun", tun]
        proc = a.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            listening = Path(sock)
            wait_for(listening.exists, timeout=30, what=f"tailpyd --tun {tun} to listen")
            assert _lo_has_magicdns(a) and _resolv(a) == conf, tun
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        assert _lo_has_magicdns(a) and _resolv(a) == conf, tun
    assert a.status()["backend_state"] == "Running"


def test_down_stops_a_wedged_daemon_and_restores_dns(tailnet: LabTailnet) -> None:
    (a,) = tailnet.connected("a")
    assert "100.100.100.100" in _resolv(a)
    pid = a.daemon.pid
    os.kill(pid, signal.SIGSTOP)  # alive, holding its lock and socket, answering nothing
    done = _run(a, "down")
    assert done.returncode == 0, done.stderr
    assert f"stopped tailpyd (pid {pid})" in done.stdout and "Traceback" not in done.stderr
    a.daemon.wait(timeout=10)
    assert _resolv(a) == ORIGINAL and _table(a) is None and not _lo_has_magicdns(a)


def test_kill_9_then_cleanup_by_flag_by_down_and_by_the_next_start(tailnet: LabTailnet) -> None:
    a, b = tailnet.connected("a", "b")

    def crash() -> None:
        assert "100.100.100.100" in _resolv(a) and _table(a) is not None and _tailnet_route(a)
        a.daemon.send_signal(signal.SIGKILL)
        a.daemon.wait(timeout=10)
        a.daemon = None
        # What kill -9 leaves: DNS pointing at a dead MagicDNS, its addresses on lo, the firewall table.
        assert "100.100.100.100" in _resolv(a) and _table(a) is not None and _lo_has_magicdns(a)

    def clean() -> None:
        assert _resolv(a) == ORIGINAL and _table(a) is None and not _lo_has_magicdns(a)
        assert _tailnet_route(a) == "" and "tailpy0" not in a.host.run(["ip", "link"]).stdout
        assert "lookup 52" not in a.host.run(["ip", "-4", "rule"]).stdout  # the policy routing rules

    crash()
    done = _tailpyd(a, "--cleanup")
    assert done.returncode == 0, done.stderr
    assert "restored /etc/resolv.conf" in done.stdout and "removed nftables table inet tailpy" in done.stdout
    clean()

    a.start_daemon()  # reconnects by itself (it was up)
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=30, what="a to come back")
    crash()
    # `down` with only --socket, as one types it: the state directory is the one tailpyd recorded beside it.
    done = a.host.run(tailpy_argv("down", "--socket", a.socket), check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("tailpyd is not running: cleaned up after it:")
    assert "removed nftables table inet tailpy" in done.stdout
    clean()

    a.start_daemon()
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=30, what="a to come back")
    crash()
    a.start_daemon()  # the next start cleans up first, then comes up again
    wait_for(lambda: a.status()["backend_state"] == "Running", timeout=30, what="a to come back")
    a.wait_peers(1)
    a.ping(b.ip(), count=2)
    assert "100.100.100.100" in _resolv(a)
    assert a.cli("down").strip() == "stopped"
    assert _resolv(a) == ORIGINAL and _table(a) is None


def test_firewall_drops_a_forged_tailnet_source_from_the_lan(tailnet: LabTailnet) -> None:
    a, b = tailnet.connected("a", "b")
    table = _table(a)
    assert table is not None
    assert not [h for h in a.status()["health"] if h["name"] == "firewall"]
    spoofer = tailnet.lab.host("spoof")
    tailnet.lan.attach(spoofer)
    iface = next(iter(spoofer.addresses))
    spoofer.add_address(iface, "100.64.99.99/32")
    ping = spoofer.run(
        ["ping", "-c", "3", "-W", "1", "-i", "0.2", "-I", "100.64.99.99", a.lan_ip()], check=False
    )
    assert ping.returncode != 0  # no reply
    dropped = _drops(a)
    assert dropped >= 3
    a.ping(b.ip(), count=2)  # tailnet traffic over the TUN still flows
    b.ping(a.ip(), count=2)
    assert _drops(a) == dropped
    assert a.cli("down").strip() == "stopped"
    assert _table(a) is None


def _drops(node: LabNode) -> int:
    table = _table(node)
    assert table is not None
    total = 0
    for item in table["nftables"]:  # type: ignore[attr-defined]
        rule = item.get("rule")
        if rule and any("drop" in e for e in rule["expr"]):
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def test_netfilter_mode_off_leaves_nftables_alone(tailnet: LabTailnet) -> None:
    key = tailnet.authkey()
    a = tailnet.add_node("a", ("--netfilter-mode", "off"))
    a.up(key)
    assert a.status()["backend_state"] == "Running" and _table(a) is None
    done = _run(a, "up", "--netfilter-mode", "on")
    assert done.returncode == 0, done.stderr
    assert _table(a) is not None
    done = _run(a, "up", "--netfilter-mode", "off")
    assert done.returncode == 0 and _table(a) is None


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    reason = tmpfs_reason()
    if reason:
        pytest.skip(reason)
    with tiny_tmpfs(tmp_path / "disk", "4m") as where:
        yield where


def test_full_disk_one_sentence_each_and_down_still_stops(tailnet: LabTailnet, full_disk: Path) -> None:
    key = tailnet.authkey()
    host = tailnet.lab.host("a")
    give_resolv_conf(host, ORIGINAL)
    tailnet.lan.attach(host)
    a = LabNode(tailnet, host, full_disk / "a")
    a.start_daemon()
    a.up(key)
    assert "100.100.100.100" in _resolv(a)
    filler = fill(full_disk)

    def one_sentence(done: subprocess.CompletedProcess[str]) -> str:
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr.strip()

    saved = (a.state_dir / "tailpyd.state").read_bytes()
    name = a.status()["self"]["name"]
    up = _run(a, "up", "--hostname", "renamed")
    assert up.returncode == 1 and "no space left" in one_sentence(up)
    assert (a.state_dir / "tailpyd.state").read_bytes() == saved  # nothing acknowledged is lost
    assert a.status()["backend_state"] == "Running"  # still up as it was
    assert a.status()["self"]["name"] == name  # control was not asked to rename it
    # A re-login that cannot save its new node key first: control never hears of it, the session goes on.
    reauth = _run(a, "up", "--force-reauth", "--auth-key", key)
    assert reauth.returncode == 1 and "no space left" in one_sentence(reauth)
    assert (a.state_dir / "tailpyd.state").read_bytes() == saved
    st = a.status()
    assert st["backend_state"] == "Running" and st["control_connected"] and not st["error"]
    down = _run(a, "down")  # restoring DNS frees the saved copy: the state file fits again
    assert down.returncode == 0 and down.stdout.strip() == "stopped" and "Traceback" not in down.stderr
    assert _resolv(a) == ORIGINAL and _table(a) is None
    fill(full_disk)
    saved = (a.state_dir / "tailpyd.state").read_bytes()
    logout = a.host.run(tailpy_argv("logout", "--socket", a.socket), check=False)
    assert logout.returncode == 1 and "no space left" in one_sentence(logout)
    assert (a.state_dir / "tailpyd.state").read_bytes() == saved
    fill(full_disk)
    down = _run(a, "down")
    assert down.returncode == 0 and down.stdout.strip() == "stopped"
    assert "no space left" in one_sentence(down)
    assert holder(a.state_dir) is not None and a.status()["backend_state"] == "Stopped"

    # A daemon that cannot even start on the full disk says why.
    a.stop_daemon()
    fresh = LabNode(tailnet, host, full_disk / "fresh")
    start = _run(fresh, "up", "--login-server", tailnet.control_url, "--auth-key", key)
    last = start.stderr.strip().splitlines()[-1]  # after the "starting tailpyd" progress line
    assert start.returncode == 1 and last.startswith("tailpy: tailpyd exited at start: no space left on")
    assert "Traceback" not in start.stderr and "exit code" not in start.stderr
    filler.unlink()
