"""`tailpy control`: admin commands on a real state dir, and `serve` as a real process stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nacl.public
import pytest
from click.testing import CliRunner

from tailpy.cli.control import parse_duration
from tailpy.cli.main import cli
from tailpy.control import Store
from tailpy.keys import MachinePublic, NodePublic


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("never") is None


def test_authkey_create_and_nodes_list(tmp_path: Path) -> None:
    Store(tmp_path).close()
    runner = CliRunner()
    r = runner.invoke(
        cli, ["control", "authkey", "create", "--state-dir", str(tmp_path), "--expiration", "1h"]
    )
    assert r.exit_code == 0, r.output
    key = r.output.strip()
    assert re.fullmatch(r"tskey-auth-[A-Za-z0-9_-]{32}", key)
    store = Store(tmp_path)
    mk = MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))
    nk = NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))
    node = store.register(mk, nk, "alpha", key, time.time())
    (ak,) = store.list_auth_keys()
    assert ak.used and not ak.reusable and ak.expires is not None and 3590 < ak.expires - ak.created <= 3600
    store.close()
    r = runner.invoke(
        cli, ["control", "nodes", "list", "--json"], env={"TAILPY_CONTROL_STATE_DIR": str(tmp_path)}
    )
    assert r.exit_code == 0, r.output
    (listed,) = json.loads(r.output)
    assert listed["id"] == node.id and listed["addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    r = runner.invoke(cli, ["control", "nodes", "list", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "alpha" in r.output and "100.64.0.1" in r.output


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["authkey", "create", "--expiration", "2x"], "--expiration '2x' is not a duration"),
        (["nodes", "list"], "no control database in"),
    ],
)
def test_user_mistakes_get_one_sentence(tmp_path: Path, args: list[str], sentence: str) -> None:
    r = CliRunner().invoke(cli, ["control", *args, "--state-dir", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.startswith("tailpy: ") and sentence in r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1


def test_missing_state_dir(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["control", "nodes", "list", "--state-dir", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output


LISTEN = ("--listen", "127.0.0.1:0")


def test_serve_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailpy.cli.main", "control", "serve", "--state-dir", str(state), *LISTEN],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) \(key (mkey:[0-9a-f]{64})", line)
        assert m, line
        with urllib.request.urlopen(m.group(1) + "/key", timeout=10) as resp:
            assert resp.read().decode() == m.group(2)
        assert (state / "control.db").exists() and (state / "control.key").stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_admin_commands_json_and_sentences(tmp_path: Path) -> None:
    Store(tmp_path).close()
    env = {"TAILPY_CONTROL_STATE_DIR": str(tmp_path), "COLUMNS": "200"}

    def run(*args: str) -> object:
        r = CliRunner().invoke(cli, ["control", *args, "--json"], env=env)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    assert run("users", "create", "alice")["name"] == "alice"  # type: ignore[index]
    k = run("authkey", "create", "--user", "alice", "--ephemeral")
    assert isinstance(k, dict) and k["user"] == "alice" and k["ephemeral"] and not k["reusable"]
    assert 3590 < k["expires"] - k["created"] <= 3600  # default 1 h
    t = run("authkey", "create", "--tags", "tag:server,web", "--reusable", "--expiration", "never")
    assert isinstance(t, dict) and t["tags"] == ["tag:server", "tag:web"] and t["expires"] is None
    store = Store(tmp_path)
    mk = lambda: MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))  # noqa: E731
    nk = lambda: NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))  # noqa: E731
    pi = store.register(mk(), nk(), "pi", str(t["key"]), time.time())
    pi1 = store.register(mk(), nk(), "pi", str(k["key"]), time.time())
    store.close()
    listed = run("nodes", "list")
    assert isinstance(listed, list) and [(n["name"], n["user"]) for n in listed] == [
        ("pi", ""),
        ("pi-1", "alice"),
    ]
    assert run("nodes", "show", str(pi.id))["fqdn"] == "pi.tailnet.internal"  # type: ignore[index]
    r = CliRunner().invoke(cli, ["control", "nodes", "rename", str(pi1.id), "pi"], env=env)
    assert r.exit_code == 1 and r.output == f"tailpy: name pi is taken by node {pi.id}\n"
    assert run("nodes", "expire", str(pi1.id))["expired"] is True  # type: ignore[index]
    assert run("nodes", "expiry", str(pi1.id), "--disable")["key_expiry"] is None  # type: ignore[index]
    keys = run("authkey", "list")
    assert isinstance(keys, list) and all(x["key"].endswith("…") for x in keys)
    assert run("authkey", "expire", str(keys[0]["id"]))["expires"] is not None  # type: ignore[index]
    r = CliRunner().invoke(cli, ["control", "users", "delete", "alice"], env=env)
    assert r.exit_code == 1 and "still owns 1 node" in r.output
    r = CliRunner().invoke(cli, ["control", "users", "list"], env=env)
    assert r.exit_code == 0 and "alice" in r.output
