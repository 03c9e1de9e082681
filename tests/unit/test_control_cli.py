"""`tailpy control`: admin commands on a real state dir, and `serve` as a real process stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nacl.public
import pytest
from click.testing import CliRunner

from tailpy.cli.main import cli
from tailpy.control import Store
from tailpy.control.options import parse_duration, parse_listen
from tailpy.errors import ConfigError
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

    def mk() -> MachinePublic:
        return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))

    def nk() -> NodePublic:
        return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))

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
    # by name (or FQDN) as well as by id
    assert run("nodes", "show", "pi-1")["id"] == pi1.id  # type: ignore[index]
    assert run("nodes", "rename", "pi-1.tailnet.internal", "bee")["name"] == "bee"  # type: ignore[index]
    assert run("nodes", "expire", "bee")["expired"] is True  # type: ignore[index]
    r = CliRunner().invoke(cli, ["control", "nodes", "delete", "wasp"], env=env)
    assert r.exit_code == 1 and "no node named 'wasp'" in r.output, r.output
    r = CliRunner().invoke(cli, ["control", "nodes", "rename", "bee", "localhost"], env=env)
    assert r.exit_code == 1 and "reserved" in r.output, r.output
    keys = run("authkey", "list")
    assert isinstance(keys, list) and all(x["key"].endswith("…") for x in keys)
    assert run("authkey", "expire", str(keys[0]["id"]))["expires"] is not None  # type: ignore[index]
    r = CliRunner().invoke(cli, ["control", "users", "delete", "alice"], env=env)
    assert r.exit_code == 1 and "still owns 1 node" in r.output
    r = CliRunner().invoke(cli, ["control", "users", "list"], env=env)
    assert r.exit_code == 0 and "alice" in r.output


# --- durations, --listen ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        (" 1H ", 3600),
        ("1.5h", 5400),
        (".5m", 30),
        ("2w", 14 * 86400),
        ("1d12h", 36 * 3600),
        ("3650d", 3650 * 86400),
        ("Never", None),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("0", "--expiration must be a positive duration like 1h, or 'never'; '0' is zero"),
        ("0s", "--expiration must be a positive duration like 1h, or 'never'; '0s' is zero"),
        ("0.0h", "is zero"),
        ("99999999d", "--expiration must be at most 3650d (or 'never'), not '99999999d'"),
        ("3651d", "must be at most 3650d"),
        ("9" * 300 + "s", "must be at most 3650d"),
        ("9" * 400 + "s", "must be at most 3650d"),
        ("5", "is not a duration like 90s"),
        ("1y", "is not a duration like 90s"),
        ("-1h", "is not a duration like 90s"),
        ("1h 30m", "is not a duration like 90s"),
        ("", "is not a duration like 90s"),
    ],
)
def test_parse_duration_refuses(text: str, sentence: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_duration(text)
    assert sentence in str(e.value)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:18082", ("::1", 18082)),
        ("[::]:0", ("::", 0)),
        (":8080", (None, 8080)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def testparse_listen(text: str, parsed: tuple[str | None, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["8080", "[::1]", "[]:80", "[::1]8080", "::1:80", "host:", "h:65536", "h:x"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["authkey", "create", "--expiration", "9" * 300 + "s"], "--expiration must be at most 3650d"),
        (["authkey", "create", "--expiration", "0"], "--expiration must be a positive duration"),
        (["serve", "--key-expiry", "0s"], "--key-expiry must be a positive duration"),
        (["serve", "--key-expiry", "99999999d"], "--key-expiry must be at most 3650d"),
        (["serve", "--ephemeral-timeout", "1x"], "--ephemeral-timeout '1x' is not a duration"),
        (["serve", "--listen", "::1:80"], "put an IPv6 address in brackets, like [::1]:80"),
        # the README's first try: nodes behind NAT need to be told where the embedded relay is
        (["serve", "--listen", "0.0.0.0:8080"], "add --server-url http://HOST:8080"),
        (["serve", "--listen", ":8080", "--derp-listen", "0.0.0.0:3340"], "or --derp-hostname HOST"),
    ],
)
def test_duration_and_listen_mistakes_get_one_sentence(
    tmp_path: Path, args: list[str], sentence: str
) -> None:
    Store(tmp_path).close()
    r = CliRunner().invoke(cli, ["control", *args, "--state-dir", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("tailpy: ") and sentence in r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1


SERVE = (sys.executable, "-m", "tailpy.cli.main", "control", "serve")


def _serve(state: Path, listen: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*SERVE, "--state-dir", str(state), "--listen", listen, *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    return proc, proc.stderr.readline()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_logs_an_ipv6_url_in_brackets(tmp_path: Path) -> None:
    proc, line = _serve(tmp_path / "state", "[::1]:0")
    try:
        m = re.search(r"listening on (http://\[::1\]:\d+) \(key (mkey:[0-9a-f]{64})", line)
        assert m, line
        with urllib.request.urlopen(m.group(1) + "/key", timeout=10) as resp:
            assert resp.read().decode() == m.group(2)
    finally:
        _stop(proc)


def test_serve_listen_port_only_means_every_address(tmp_path: Path) -> None:
    proc, line = _serve(tmp_path / "state", ":0", "--no-derp")
    try:
        urls = dict(re.findall(r"http://(0\.0\.0\.0|\[::\]):(\d+)", line))
        assert "0.0.0.0" in urls, line  # (port 0: each family gets its own free port)
        with urllib.request.urlopen(f"http://127.0.0.1:{urls['0.0.0.0']}/key", timeout=10) as resp:
            assert resp.read().decode().startswith("mkey:")
    finally:
        _stop(proc)


# --- files and auth keys at rest ---


def test_database_files_are_private_and_hold_no_auth_key(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        Store(tmp_path).close()
        r = CliRunner().invoke(
            cli, ["control", "authkey", "create", "--state-dir", str(tmp_path), "--reusable"]
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    key = r.output.strip()
    assert re.fullmatch(r"tskey-auth-[A-Za-z0-9_-]{32}", key)
    store = Store(tmp_path)  # an open connection: -wal and -shm exist
    with store.engine.connect() as c:
        c.exec_driver_sql("SELECT 1")
        files = sorted(p.name for p in tmp_path.glob("control.db*"))
        assert files == ["control.db", "control.db-shm", "control.db-wal"]
        for name in files:
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
            assert key.encode() not in (tmp_path / name).read_bytes()
            assert key[len("tskey-auth-") :].encode() not in (tmp_path / name).read_bytes()
    (listed,) = store.list_auth_keys()
    assert listed.key == key[:15] + "…" and listed.to_json()["key"] == key[:15] + "…"
    node = store.register(_mk(), _nk(), "alpha", key, time.time())  # the key still works
    assert node.name == "alpha"
    assert store.expire_auth_key(key, time.time()).id == listed.id  # and is found by its full text
    store.close()


def test_existing_database_files_are_made_private(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = tmp_path / "control.db"
    wal = tmp_path / "control.db-wal"
    wal.write_bytes(b"")
    for p in (db, wal):
        p.chmod(0o644)
    Store(tmp_path).close()
    assert db.stat().st_mode & 0o777 == 0o600
    assert not wal.exists() or wal.stat().st_mode & 0o777 == 0o600


def test_migration_hashes_existing_auth_keys(tmp_path: Path) -> None:
    """A database of the previous schema (version 2: keys in the clear) is migrated: keys hashed, still
    usable, and listed by prefix."""
    import sqlalchemy as sa

    from tailpy.control.store import MIGRATIONS

    plain, used = "tskey-auth-" + "A" * 32, "tskey-auth-" + "B" * 32
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'control.db'}")
    with engine.begin() as conn:
        for step in MIGRATIONS[:2]:
            step(conn)
        conn.exec_driver_sql("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO schema_version VALUES (2)")
        for k, u in ((plain, 0), (used, 1)):
            conn.exec_driver_sql(
                "INSERT INTO auth_keys (key, reusable, expires, used, created, tags, ephemeral) "
                f"VALUES ('{k}', 1, NULL, {u}, 1.0, '[]', 0)"
            )
    engine.dispose()
    store = Store(tmp_path)
    assert store.schema_version() == len(MIGRATIONS)
    assert [(k.key, k.uses) for k in store.list_auth_keys()] == [
        ("tskey-auth-AAAA…", 0),
        ("tskey-auth-BBBB…", 1),
    ]
    assert store.register(_mk(), _nk(), "alpha", plain, time.time()).name == "alpha"
    store.close()
    for p in tmp_path.glob("control.db*"):
        assert plain.encode() not in p.read_bytes() and used.encode() not in p.read_bytes()
    Store(tmp_path).close()  # once only


def test_authkey_list_counts_uses_of_reusable_keys(tmp_path: Path) -> None:
    store = Store(tmp_path)
    reusable = store.create_auth_key(reusable=True, expires=None, now=time.time())
    single = store.create_auth_key(reusable=False, expires=None, now=time.time())
    store.create_auth_key(reusable=True, expires=None, now=time.time())
    for host in ("a", "b"):
        store.register(_mk(), _nk(), host, reusable.key, time.time())
    store.register(_mk(), _nk(), "c", single.key, time.time())
    store.close()
    env = {"TAILPY_CONTROL_STATE_DIR": str(tmp_path)}
    r = CliRunner().invoke(cli, ["control", "authkey", "list", "--json"], env=env)
    assert r.exit_code == 0, r.output
    keys = json.loads(r.output)
    assert [(k["used"], k["uses"]) for k in keys] == [(True, 2), (True, 1), (False, 0)]
    assert keys[0]["last_used"] is not None and keys[2]["last_used"] is None
    r = CliRunner().invoke(cli, ["control", "authkey", "list"], env=env)
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in r.output.splitlines()]
    assert rows[0] == ["ID", "KEY", "USER/TAGS", "REUSABLE", "EPHEMERAL", "USED", "LAST USED", "EXPIRES"]
    assert [row[5] for row in rows[1:]] == ["2 times", "yes", "no"]
    assert rows[3][6] == "-" and rows[1][6].endswith("ago")


def test_nodes_list_piped_is_not_truncated(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = store.create_auth_key(reusable=True, expires=None, now=time.time(), tags=["tag:a-rather-long-tag"])
    long = "a-very-long-hostname-that-a-narrow-terminal-would-cut-short"
    store.register(_mk(), _nk(), long, key.key, time.time(), os_name="linux")
    store.close()
    r = CliRunner().invoke(cli, ["control", "nodes", "list", "--state-dir", str(tmp_path)])  # 80 columns
    assert r.exit_code == 0, r.output
    header, row = (line.split("\t") for line in r.output.splitlines())
    assert header[:4] == ["ID", "NAME", "USER/TAGS", "IPV4"] and len(header) == len(row) == 10
    assert row[1:6] == [long, "tag:a-rather-long-tag", "100.64.0.1", "fd7a:115c:a1e0::1", "linux"]
    assert "…" not in "".join(row[:9])


def _mk() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def _nk() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


# --- a state dir this user cannot write ---


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as an unprivileged user (root bypasses file modes), or None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    return None


@pytest.mark.parametrize("where", ["existing", "missing"])
def test_serve_on_a_state_dir_it_cannot_write_says_so(where: str) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv or runuser: cannot test as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="tailpy-ro-"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        state = ro if where == "existing" else ro / "state"
        r = subprocess.run(
            [*prefix, *SERVE, "--state-dir", str(state), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        if "ModuleNotFoundError" in r.stderr or "Permission denied: '" + sys.executable in r.stderr:
            pytest.skip("the unprivileged user cannot run this interpreter")
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        what = "control database" if where == "existing" else "state directory"
        assert r.stderr.startswith(f"tailpy: cannot create {what} {state}"), r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_nodes_list_last_seen_of_a_streaming_node_is_now() -> None:
    """A node online (streaming) is seen now, whatever its stored last seen (the end of its last stream)."""
    from tailpy.cli.control.nodes import last_seen

    now = 1_800_000_000.0
    assert last_seen({"online": True, "last_seen": now - 3600}, now) == "now"
    assert last_seen({"online": False, "last_seen": None}, now) == "-"
    assert last_seen({"online": False, "last_seen": now - 3600}, now) != "now"
