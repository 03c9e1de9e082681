"""tailpyd under bad conditions, without a lab: the state directory's lock, systemd's readiness datagram,
files on a full or read-only disk (a tiny tmpfs), and HTTP errors as JSON on control, its admin socket and
tailpyd's local API. Daemons run under ``unshare -n`` (a network namespace of their own, empty): nothing
here touches the machine's network, DNS or firewall."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web

from _tmpfs import fill, remount, tiny_tmpfs, tmpfs_reason
from tailpy.control import ControlServer, Store
from tailpy.control.admin import Admin, AdminServer, call_socket
from tailpy.control.store.database import db_error
from tailpy.daemon import health, netfilter
from tailpy.daemon.api import make_app
from tailpy.daemon.lock import LOCK_FILE, DaemonLock, RunRecord, holder, leftover
from tailpy.daemon.sdnotify import notify
from tailpy.daemon.state import NodeState, StateStore
from tailpy.errors import ControlError, DaemonRunningError, StorageError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.storage import directory_problem, write_atomic

PKG_ROOT = str(Path(__file__).resolve().parents[2] / "python")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _unshare_reason() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace of its own (unshare -n) needs root"
    if shutil.which("unshare") is None:
        return "unshare(1) (util-linux) is not installed"
    return None


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    reason = tmpfs_reason()
    if reason:
        pytest.skip(reason)
    with tiny_tmpfs(tmp_path / "tiny", "256k") as where:
        yield where


# -- the lock -------------------------------------------------------------------------------------------


def test_a_second_lock_names_the_holder_and_a_clean_release_leaves_no_record(tmp_path: Path) -> None:
    first = DaemonLock(tmp_path / "s")
    first.acquire()
    first.record(
        RunRecord(pid=os.getpid(), tun="tailpy7", socket="/x.sock", netfilter_table="tailpy-tailpy7")
    )
    with pytest.raises(DaemonRunningError) as e:
        DaemonLock(tmp_path / "s").acquire()
    assert str(e.value) == f"tailpyd is already running (pid {os.getpid()})"
    held = holder(tmp_path / "s")
    assert held is not None and held.pid == os.getpid() and held.tun == "tailpy7"
    assert leftover(tmp_path / "s") is None  # held: not a leftover
    first.release()
    assert holder(tmp_path / "s") is None and leftover(tmp_path / "s") is None
    again = DaemonLock(tmp_path / "s")
    again.acquire()
    assert again.previous is None  # the last one exited cleanly
    again.release()


_HOLD = """
import sys, time
from tailpy.daemon.lock import DaemonLock, RunRecord
lock = DaemonLock(sys.argv[1])
lock.acquire()
lock.record(RunRecord(pid=__import__("os").getpid(), tun="tailpy9"))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_leaves_its_record_for_cleanup(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        held = holder(tmp_path)
        assert held is not None and held.pid == proc.pid
    finally:
        proc.kill()  # SIGKILL: no clean exit
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert holder(tmp_path) is None
    old = leftover(tmp_path)
    assert old is not None and old.pid == proc.pid and old.tun == "tailpy9"
    lock = DaemonLock(tmp_path)
    lock.acquire()
    assert lock.previous is not None and lock.previous.tun == "tailpy9"
    lock.release()


def test_holder_pid_comes_from_the_kernel_when_the_record_is_empty(tmp_path: Path) -> None:
    lock = DaemonLock(tmp_path)
    lock.acquire()
    os.truncate(tmp_path / LOCK_FILE, 0)  # as on a disk too full to write the record
    try:
        held = holder(tmp_path)
        assert held is not None and held.pid == os.getpid()
        with pytest.raises(DaemonRunningError, match=rf"\(pid {os.getpid()}\)"):
            DaemonLock(tmp_path).acquire()
    finally:
        lock.release()


# -- systemd readiness ------------------------------------------------------------------------------------


def test_notify_sends_one_datagram_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify("READY=1", "STATUS=Running")
        assert s.recv(4096) == b"READY=1\nSTATUS=Running"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        name = f"tailpy-test-{os.getpid()}"
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # abstract namespace
        assert notify("STOPPING=1")
        assert s.recv(4096) == b"STOPPING=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def _tailpyd(state: Path, sock: Path, *extra: str) -> list[str]:
    return [
        "unshare",
        "-n",
        sys.executable,
        "-m",
        "tailpy.daemon",
        "--state-dir",
        str(state),
        "--socket",
        str(sock),
        "--port",
        "0",
        "--no-magicdns",
        *extra,
    ]


def test_tailpyd_says_ready_and_a_second_one_changes_nothing(tmp_path: Path) -> None:
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    state, sock = tmp_path / "state", tmp_path / "tailpyd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(tmp_path / "notify"))
        notify_sock.settimeout(30)
        first = subprocess.Popen(
            _tailpyd(state, sock),
            env=_env(NOTIFY_SOCKET=str(tmp_path / "notify")),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            got = notify_sock.recv(4096).decode()
            assert "READY=1" in got.splitlines() and "STATUS=NeedsLogin" in got.splitlines()
            assert sock.exists()
            before = (state / "tailpyd.state").read_bytes()
            second = subprocess.run(
                _tailpyd(state, sock), env=_env(), capture_output=True, text=True, timeout=60
            )
            assert second.returncode == 3
            assert (
                second.stderr.strip().splitlines()[-1]
                == f"tailpyd: tailpyd is already running (pid {first.pid})"
            )
            assert "Traceback" not in second.stderr
            cleanup = subprocess.run(
                _tailpyd(state, sock, "--cleanup"), env=_env(), capture_output=True, text=True, timeout=60
            )
            assert cleanup.returncode == 3 and "already running" in cleanup.stderr
            assert sock.exists() and (state / "tailpyd.state").read_bytes() == before
            assert first.poll() is None
        finally:
            first.send_signal(signal.SIGTERM)
            _, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        assert "STOPPING=1" in notify_sock.recv(4096).decode()
    assert not sock.exists() and (state / LOCK_FILE).read_text() == ""


# -- a full or read-only disk ---------------------------------------------------------------------------


def _state() -> NodeState:
    return NodeState(MachinePrivate.generate(), NodePrivate.generate(), login_server="http://192.0.2.1:8080")


def test_state_file_on_a_full_disk_keeps_the_old_copy(tmpfs: Path) -> None:
    store = StateStore(tmpfs / "state")
    first = store.load_or_create()
    saved = store.path.read_bytes()
    fill(tmpfs)
    assert directory_problem(tmpfs) is not None
    first.hostname = "x" * 200_000  # too big for what is left
    with pytest.raises(StorageError) as e:
        store.save(first)
    msg = str(e.value)
    assert "no space left" in msg and "free some space" in msg and "\n" not in msg
    assert store.path.read_bytes() == saved  # the acknowledged state is intact
    assert [p.name for p in store.dir.iterdir()] == ["tailpyd.state"]  # no temporary file left
    (tmpfs / "filler").unlink()
    store.save(first)
    assert StateStore(tmpfs / "state").load_or_create().hostname == first.hostname


def test_state_file_on_a_read_only_disk(tmpfs: Path) -> None:
    store = StateStore(tmpfs / "state")
    store.load_or_create()
    saved = store.path.read_bytes()
    remount(tmpfs, "ro")
    try:
        assert "read-only" in (directory_problem(tmpfs) or "")
        with pytest.raises(StorageError, match="read-only; remount it read-write"):
            store.save(_state())
        with pytest.raises(StorageError, match="read-only"):
            DaemonLock(tmpfs / "state").acquire()
        assert store.path.read_bytes() == saved
    finally:
        remount(tmpfs, "rw")


def test_write_atomic_failure_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot write thing .*missing"):
        write_atomic(tmp_path / "missing" / "f", b"x", what="thing")


def _sqlite_full() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))


def test_database_errors_become_one_sentence() -> None:
    full = db_error(_sqlite_full(), "/var/lib/tailpy-control/control.db")
    assert isinstance(full, StorageError) and "disk is full; free some space" in str(full)
    ro = db_error(
        sa.exc.OperationalError(
            "INSERT", {}, sqlite3.OperationalError("attempt to write a readonly database")
        ),
        "x.db",
    )
    assert isinstance(ro, StorageError) and "read-only" in str(ro)
    other = db_error(sa.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: t")), "x")
    assert isinstance(other, ControlError) and "no such table" in str(other)
    assert db_error(RuntimeError("x"), "x") is None


def test_users_create_on_a_full_disk_is_one_sentence(tmpfs: Path) -> None:
    state = tmpfs / "control"
    state.mkdir()
    Store(state).close()
    fill(tmpfs)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tailpy.cli.main",
            "control",
            "users",
            "create",
            "bob",
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    # (SQLite says "disk I/O error" or "database or disk is full" depending on which page could not grow)
    assert len(done.stderr.strip().splitlines()) == 1
    assert "no space left" in done.stderr or "disk is full" in done.stderr


# -- errors as JSON -------------------------------------------------------------------------------------


async def _get(url: str, method: str = "GET", **kw: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        return r.status, r.content_type, json.loads(await r.read())


async def test_control_answers_every_error_as_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path)
    server = ControlServer(store)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    async def full(request: web.Request) -> web.Response:
        raise _sqlite_full()

    server._key = boom  # type: ignore[method-assign,assignment]
    server._update = full  # type: ignore[method-assign]
    host, port = await server.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    try:
        status, ctype, body = await _get(url + "/no/such/path")
        assert (status, ctype) == (404, "application/json") and body == {"error": "Not Found"}
        status, _, body = await _get(url + "/machine/register")  # GET on a POST route
        assert status == 405 and body == {"error": "Method Not Allowed"}
        with caplog.at_level(logging.ERROR, logger="tailpy.http"):
            status, ctype, body = await _get(url + "/key")
        assert (
            status == 500
            and ctype == "application/json"
            and "the server's log has the details" in body["error"]
        )
        assert any("handler bug" in (r.exc_text or "") for r in caplog.records)
        status, _, body = await _get(url + "/machine/update", "POST", data=b"{}")
        assert status == 507 and "disk is full" in body["error"]
    finally:
        await server.stop()
        store.close()


async def test_admin_socket_answers_a_full_database_as_json(tmp_path: Path) -> None:
    store = Store(tmp_path)

    class FullAdmin(Admin):
        def run(self, op: str, args: Any) -> Any:
            raise _sqlite_full()

    server = AdminServer(FullAdmin(store), tmp_path / "admin.sock")
    await server.start()
    try:
        with pytest.raises(StorageError, match="disk is full"):
            await call_socket(tmp_path / "admin.sock", "users.create", {"name": "bob"})
    finally:
        await server.stop()
        store.close()


async def test_local_api_answers_a_handler_exception_as_json(tmp_path: Path) -> None:
    class Broken:
        def status(self) -> Any:
            raise RuntimeError("status bug")

        async def logout(self) -> None:
            raise StorageError("cannot write state file x: no space left on its filesystem")

    app = make_app(Broken())  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        status, ctype, body = await _get(f"http://127.0.0.1:{port}/localapi/v0/status")
        assert status == 500 and ctype == "application/json" and "RuntimeError" in body["error"]
        status, _, body = await _get(f"http://127.0.0.1:{port}/localapi/v0/logout", "POST")
        assert status == 507 and "no space left" in body["error"]
    finally:
        await runner.cleanup()


def test_down_without_a_daemon_and_with_a_wedged_one(tmp_path: Path) -> None:
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    state, sock = tmp_path / "state", tmp_path / "tailpyd.sock"

    def down() -> subprocess.CompletedProcess[str]:
        argv = ["unshare", "-n", sys.executable, "-m", "tailpy.cli.main", "down"]
        return subprocess.run(
            [*argv, "--socket", str(sock), "--state-dir", str(state)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=90,
        )

    done = down()
    assert done.returncode == 0 and done.stdout.strip().startswith("tailpyd is not running (nothing answers")
    assert done.stdout.strip().endswith("no record of a daemon that crashed): nothing to stop")
    # A "daemon" that holds the lock and accepts on its socket but never answers.
    wedged = """
import socket, sys, time
from tailpy.daemon.lock import DaemonLock
lock = DaemonLock(sys.argv[1]); lock.acquire()
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[2]); s.listen(8)
print("ready", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", wedged, str(state), str(sock)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGSTOP)
        done = down()
        assert done.returncode == 0, done.stderr
        assert f"stopped tailpyd (pid {proc.pid}) with SIGTERM" in done.stdout
        assert "did not answer" in done.stdout and "Traceback" not in done.stderr
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert holder(state) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_lock_for_a_crash_record_round_trips() -> None:
    r = RunRecord(pid=7, tun="t", socket="/s", netfilter_table="tailpy")
    assert RunRecord.parse(json.dumps(r.to_json())) == r
    assert RunRecord.parse("") is None and RunRecord.parse("[1]") is None


def test_holder_is_none_without_a_lock_file(tmp_path: Path) -> None:
    assert holder(tmp_path) is None and leftover(tmp_path) is None


# -- the node firewall ----------------------------------------------------------------------------------


def test_firewall_ruleset_follows_ts_input() -> None:
    script = netfilter.ruleset("tailpy", "tailpy0", 41641)
    rules = [line.strip() for line in script.splitlines()]
    # Replaced in one transaction: create (if missing), delete, define.
    assert rules[:3] == ["table inet tailpy", "delete table inet tailpy", "table inet tailpy {"]
    start = rules.index("type filter hook input priority filter - 1; policy accept;") + 1
    body = rules[start : rules.index("}", start)]
    assert body == [
        'iifname "lo" accept',
        'iifname != "tailpy0" ip saddr 100.64.0.0/10 counter drop',
        'iifname != "tailpy0" ip6 saddr fd7a:115c:a1e0::/48 counter drop',
        'iifname "tailpy0" accept',
        "udp dport 41641 accept",
    ]
    start = rules.index("type filter hook forward priority filter - 1; policy accept;") + 1
    assert rules[start : rules.index("}", start)] == [
        'iifname != "tailpy0" ip saddr 100.64.0.0/10 counter drop',
        'iifname != "tailpy0" ip6 saddr fd7a:115c:a1e0::/48 counter drop',
    ]
    assert netfilter.table_name("tailpy0") == "tailpy" and netfilter.table_name("ts1") == "tailpy-ts1"


def test_missing_nft_is_a_health_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tailpy.daemon.netfilter.shutil.which", lambda name: None)
    fw = netfilter.Firewall("on")
    fw.install("tailpy0", 41641)
    [warning] = fw.warnings()
    assert "nft (nftables) is not installed" in warning and "--netfilter-mode=off" in warning
    assert fw.table == ""
    fw.set_mode("off", "tailpy0", 41641)
    assert fw.warnings() == []


def test_a_firewall_warning_is_a_named_health_warning() -> None:
    tracker = health.Tracker()
    health.evaluate(tracker, health.HandshakeWatch(), health.Inputs(now=0.0, firewall=("nft refused",)))
    (w,) = [w for w in tracker.warnings() if w.name == "firewall"]
    assert w.text == "nft refused"
    health.evaluate(tracker, health.HandshakeWatch(), health.Inputs(now=1.0))
    assert not [w for w in tracker.warnings() if w.name == "firewall"]
