"""Control's policy surfaces: the policy's history in the database, the admin operations and `tailpy control
policy` commands (refusals as FILE:LINE:COLUMN, the running policy kept), file mode (reload on change and
on SIGHUP, a bad edit kept out), and tags decided by tagOwners when they are requested.

Tests taking ``store`` also run on PostgreSQL (tests/integration/test_postgres_store.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nacl.public
import pytest
from click.testing import CliRunner

from tailpy.cli.main import cli
from tailpy.control import ControlClient, ControlConfig, ControlProcess, Store, acl
from tailpy.control import admin as admin_module
from tailpy.control.admin import SOCKET_NAME, Admin, call_socket
from tailpy.control.policy import Policy
from tailpy.control.tags import ADMIN, Requester, check_tags
from tailpy.errors import ConfigError, TagError
from tailpy.keys import MachinePrivate, MachinePublic, NodePublic

POLICY = """{
  // who may do what
  "groups": {"group:ops": ["alice@"]},
  "tagOwners": {
    "tag:web": ["group:ops"],
    "tag:db": ["bob@"],
  },
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]},
  ],
  "tests": [{"src": "alice@", "accept": ["tag:web:80"]}],
}
"""

FAILING_TEST = """{
  "groups": {"group:ops": ["alice@"]},
  "tagOwners": {"tag:db": ["bob@"]},
  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"]}],
  "tests": [
    {"src": "alice@", "accept": ["tag:db:5432"]},
    {"src": "alice@", "accept": ["tag:db:22"]},
  ],
}
"""

CLOSED = """{
  "groups": {"group:ops": ["alice@"]},
  "tagOwners": {"tag:db": ["bob@"]},
  "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:db:5432"]}],
}
"""

UNDEFINED_GROUP = """{
  "tagOwners": {
    "tag:web": ["group:nope"],
  },
}
"""

WITH_SSH = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}],
}
"""


WITH_GRANT_WARNING = """{
  "grants": [{"src": ["*"], "dst": ["*"], "app": {"example.com/cap/x": [{}]}}],
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


def _mk() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def _nk() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A Store on SQLite (tests/integration/test_postgres_store.py runs the same tests on PostgreSQL)."""
    s = Store(tmp_path)
    yield s
    s.close()


# --- the database: history -----------------------------------------------------------------------------


def test_policy_history_newest_runs(store: Store) -> None:
    assert store.policy() is None and store.policy_id() == 0 and store.policy_history() == []
    first = store.add_policy(POLICY, "alice", 100.0)
    second = store.add_policy(CLOSED, "bob", 200.0)
    assert second.id > first.id
    running = store.policy()
    assert running is not None and running.text == CLOSED and running.set_by == "bob"
    assert running.set_at == 200.0 and store.policy_id() == second.id
    assert [(r.text, r.set_by) for r in store.policy_history()] == [(CLOSED, "bob"), (POLICY, "alice")]
    assert store.policy_history(limit=1) == [second]


# --- tags ----------------------------------------------------------------------------------------------


def test_tag_decisions_follow_tag_owners() -> None:
    policy = Policy.parse(POLICY)
    alice, bob = Requester("alice"), Requester("bob", "bob@example.com")
    assert check_tags(policy, ["tag:web"], [alice]) == ("tag:web",)
    assert check_tags(policy, ["web"], [alice]) == ("tag:web",)  # a bare name gets tag:
    with pytest.raises(TagError, match=r"^tag:db is not permitted: .*user alice"):
        check_tags(policy, ["tag:db"], [alice])
    assert check_tags(policy, ["tag:db", "tag:web"], [alice, bob]) == ("tag:db", "tag:web")
    with pytest.raises(TagError, match="does not define it"):
        check_tags(policy, ["tag:nope"], [ADMIN])  # the admin may apply any tag the policy defines
    assert check_tags(policy, ["tag:db"], [ADMIN]) == ("tag:db",)
    assert check_tags(policy, ["tag:nope"], [alice], held=["tag:nope"]) == ("tag:nope",)  # held: kept
    with pytest.raises(TagError, match="may contain only letters"):
        check_tags(policy, ["tag:Bad Name"], [ADMIN])
    with pytest.raises(
        TagError,
        match=r"^tag:web is not permitted: tag:web's owners do not include this node's tags \(tag:db\)$",
    ):
        check_tags(policy, ["tag:web"], [], held=["tag:db"])
    with pytest.raises(TagError, match="this node has no owner who could own it"):
        check_tags(policy, ["tag:web"], [])


def test_a_tagged_node_may_ask_for_tags_its_tags_own() -> None:
    policy = Policy.parse(
        '{"tagOwners": {"tag:dev": ["alice@"], "tag:web": ["tag:dev"], "tag:db": ["alice@"]}}'
    )
    # a tag:dev node (no owner left) asks for tag:dev and tag:web: tag:dev owns tag:web
    assert check_tags(policy, ["tag:dev", "tag:web"], [], held=["tag:dev"]) == ("tag:dev", "tag:web")
    with pytest.raises(TagError, match=r"tag:db's owners do not include this node's tags \(tag:dev\)"):
        check_tags(policy, ["tag:db", "tag:dev"], [], held=["tag:dev"])
    with pytest.raises(TagError, match="does not let user bob own it"):  # an untagged node: its owner
        check_tags(policy, ["tag:web"], [Requester("bob")])


def test_without_a_policy_only_the_admin_tags() -> None:
    assert check_tags(None, ["tag:any"], [ADMIN]) == ("tag:any",)
    with pytest.raises(TagError, match="no policy is set, so no user owns any tag"):
        check_tags(None, ["tag:any"], [Requester("alice")])


def _checker(policy: Policy | None):  # type: ignore[no-untyped-def]
    return lambda tags, who, held: check_tags(policy, tags, who, held)


def test_registration_tags_granted_refused_and_never_taken_away(store: Store) -> None:
    store.create_user("alice", 1.0)
    key = store.create_auth_key(reusable=True, expires=None, now=1.0, user="alice").key
    policy = Policy.parse(POLICY)
    mk = _mk()
    with pytest.raises(TagError, match="tag:db is not permitted"):
        store.register(mk, _nk(), "a", key, 2.0, request_tags=["tag:db"], tag_check=_checker(policy))
    assert store.list_nodes() == [] and store.list_auth_keys()[0].uses == 0  # refused: nothing changed
    nk = _nk()
    node = store.register(mk, nk, "a", key, 3.0, request_tags=["tag:web"], tag_check=_checker(policy))
    assert node.tags == ("tag:web",) and node.user == "" and node.key_expiry is None
    # a later policy no longer lets alice own tag:web: the node keeps it, re-registering included
    later = Policy.parse(CLOSED)
    again = store.register(mk, nk, "a", None, 4.0, request_tags=["tag:web"], tag_check=_checker(later))
    assert again.tags == ("tag:web",)
    assert store.get_node(node.id).tags == ("tag:web",)
    # a new tag is decided for the node's owner (alice, kept behind the tags) and for its tags
    with pytest.raises(TagError, match=r"tag:db's owners do not include this node's tags \(tag:web\)"):
        store.register(mk, nk, "a", None, 5.0, request_tags=["tag:db"], tag_check=_checker(later))


def test_tagged_key_creator_is_the_admin(store: Store) -> None:
    key = store.create_auth_key(reusable=False, expires=None, now=1.0, tags=["tag:db"]).key
    policy = Policy.parse(POLICY)
    node = store.register(_mk(), _nk(), "s", key, 2.0, request_tags=["tag:web"], tag_check=_checker(policy))
    assert node.tags == ("tag:web",)  # the admin made the key: may apply any defined tag


def test_admin_sets_tags_as_an_override(store: Store) -> None:
    store.create_user("alice", 1.0)
    key = store.create_auth_key(reusable=False, expires=None, now=1.0, user="alice").key
    node = store.register(_mk(), _nk(), "a", key, 2.0)
    admin = Admin(store)
    out = admin.run("nodes.tag", {"id": node.id, "tags": ["tag:x", "y"]})
    assert out["tags"] == ["tag:x", "tag:y"] and out["user"] == "" and out["key_expiry"] is None
    with pytest.raises(ConfigError, match="at least one tag"):
        admin.run("nodes.tag", {"id": node.id, "tags": []})
    with pytest.raises(ConfigError, match="must start with a letter"):
        admin.run("nodes.tag", {"id": node.id, "tags": ["tag:1abc"]})
    # with a policy, a tag it does not define is refused as for auth keys; tags held already stay allowed
    admin.run("policy.set", {"text": POLICY})
    refused = "tag:undefined is not permitted: the policy's tagOwners does not define it"
    with pytest.raises(TagError, match=f"^{refused}$"):
        admin.run("nodes.tag", {"id": node.id, "tags": ["tag:undefined"]})
    with pytest.raises(TagError, match=f"^{refused}$"):
        admin.run("authkey.create", {"tags": ["tag:undefined"]})
    assert admin.run("nodes.tag", {"id": node.id, "tags": ["tag:x", "tag:db"]})["tags"] == ["tag:db", "tag:x"]


def test_authkey_tags_checked_against_the_policy(store: Store) -> None:
    admin = Admin(store)
    assert admin.run("authkey.create", {"tags": ["tag:free"]})["tags"] == ["tag:free"]  # no policy yet
    admin.run("policy.set", {"text": POLICY, "by": "root"})
    assert admin.run("authkey.create", {"tags": ["tag:db"]})["tags"] == ["tag:db"]
    with pytest.raises(TagError, match="tag:free is not permitted: the policy's tagOwners does not define"):
        admin.run("authkey.create", {"tags": ["tag:free"]})


# --- admin operations ------------------------------------------------------------------------------------


def test_admin_policy_get_set_and_refusals(store: Store) -> None:
    admin = Admin(store, clock=lambda: 1000.0)
    got = admin.run("policy.get", {})
    assert got["policy"] is None and got["message"] == acl.NO_POLICY
    assert acl.NO_POLICY == "no policy set: every node may reach every other (Tailscale's default)"
    out = admin.run("policy.set", {"text": POLICY, "file": "p.hujson", "by": "root"})
    assert out["policy"] == POLICY and out["set_by"] == "root" and out["set_at"] == 1000.0
    with pytest.raises(acl.PolicyRefused) as refused:
        admin.run("policy.set", {"text": UNDEFINED_GROUP, "file": "bad.hujson", "by": "root"})
    assert str(refused.value).startswith("bad.hujson:3:")
    assert "group:nope" in str(refused.value)
    with pytest.raises(acl.PolicyRefused, match=r"^broken\.hujson:\d+:\d+: "):
        admin.run("policy.set", {"text": '{"acls": [}', "file": "broken.hujson"})
    with pytest.raises(acl.PolicyRefused, match=r"^t\.hujson:7:5: tests\[1\]: .*tag:db:22"):
        admin.run("policy.set", {"text": FAILING_TEST, "file": "t.hujson"})
    assert admin.run("policy.get", {})["policy"] == POLICY  # the running policy stayed
    assert len(store.policy_history()) == 1
    tested = admin.run("policy.test", {"text": FAILING_TEST, "file": "t.hujson"})
    assert tested["tests"] == 2 and [r["ok"] for r in tested["results"]] == [True, False]
    assert tested["results"][1]["at"] == "t.hujson:7:5"


def test_admin_policy_check_reports_not_enforced_sections(store: Store) -> None:
    out = Admin(store).run("policy.check", {"text": WITH_SSH, "file": "p.hujson"})
    assert "ssh" in out["not_enforced"]
    assert store.policy() is None  # check stores nothing


def test_admin_policy_filter_by_name_or_id(store: Store) -> None:
    store.create_user("alice", 1.0)
    key = store.create_auth_key(reusable=True, expires=None, now=1.0, user="alice").key
    a = store.register(_mk(), _nk(), "alpha", key, 2.0)
    store.register(_mk(), _nk(), "beta", key, 2.0)
    admin = Admin(store)
    no_policy = admin.run("policy.filter", {"node": "alpha"})
    assert no_policy["node"] == {"id": a.id, "name": "alpha"}
    assert no_policy["rules"] and no_policy["rules"][0]["SrcIPs"]  # no policy: everything allowed
    admin.run("policy.set", {"text": CLOSED})
    assert admin.run("policy.filter", {"node": a.id})["rules"] == []  # no rule reaches alpha
    with pytest.raises(ConfigError, match="there is no node named 'gamma'"):
        admin.run("policy.filter", {"node": "gamma"})


# --- the CLI (straight to the database: no server runs) ---------------------------------------------------


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["control", *args])
    return r.exit_code, r.output


def test_cli_policy_commands(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    Store(state).close()
    sd = ["--state-dir", str(state)]
    code, out = _run("policy", "get", *sd)
    assert code == 0 and out.strip() == acl.NO_POLICY
    bad = tmp_path / "bad.hujson"
    bad.write_text(UNDEFINED_GROUP)
    code, out = _run("policy", "set", str(bad), *sd)
    assert code == 1 and out.startswith(f"tailpy: {bad}:3:") and out.count("\n") == 1, out
    good = tmp_path / "good.hujson"
    good.write_text(POLICY)
    code, out = _run("policy", "set", str(good), *sd)
    assert code == 0 and out.startswith("policy set: policy 1, set by "), out
    code, out = _run("policy", "get", *sd)
    assert code == 0 and "// who may do what" in out and out.startswith("# policy 1, set by ")
    code, out = _run("policy", "get", "--json", *sd)
    assert json.loads(out)["policy"] == POLICY
    code, out = _run("policy", "history", *sd)
    assert code == 0 and out.splitlines()[0].split("\t") == ["ID", "SET BY", "SET", "LINES"], out
    assert out.splitlines()[1].startswith("1\t")
    code, out = _run("policy", "history", "show", "1", *sd)
    assert code == 0 and out == POLICY, out
    code, out = _run("policy", "history", "show", "7", *sd)
    assert code == 1 and "there is no stored policy 7" in out, out
    code, out = _run("policy", "history", "--limit", "1", *sd)
    assert code == 0 and len(out.splitlines()) == 2, out
    ssh = tmp_path / "ssh.hujson"
    ssh.write_text(WITH_SSH)
    code, out = _run("policy", "check", str(ssh), *sd)
    assert code == 0 and "not enforced yet: ssh" in out, out
    code, out = _run("policy", "test", str(good), *sd)
    assert code == 0 and "1 of 1 tests pass" in out and out.startswith(f"PASS {good}:"), out
    failing = tmp_path / "failing.hujson"
    failing.write_text(FAILING_TEST)
    code, out = _run("policy", "test", str(failing), *sd)
    assert code == 1 and f"FAIL {failing}:7:5: " in out and "1 of 2 tests pass" in out, out
    assert Store(state).policy_history()[0].text == POLICY  # check and test stored nothing
    code, out = _run("policy", "filter", "nope", *sd)
    assert code == 1 and "there is no node named 'nope'" in out
    for sub in ("get", "set", "history", "check", "test", "filter"):
        code, out = _run("policy", sub, "--help")
        assert code == 0 and "admin.sock" in out
    code, out = _run("policy", "set", "--help")
    assert "policy history show ID > old.hujson" in " ".join(out.split())


def test_cli_policy_check_without_a_database_and_as_json(tmp_path: Path) -> None:
    """`policy check` lints a policy with no control anywhere (CI); --json answers JSON either way."""
    good = tmp_path / "good.hujson"
    good.write_text(POLICY)
    for sd in ([], ["--state-dir", str(tmp_path / "nothing-here")]):
        code, out = _run("policy", "check", str(good), *sd)
        assert code == 0 and out.startswith(
            f"{good}: ok\nnote: no control database: tests were evaluated without nodes"
        ), out
    code, out = _run("policy", "check", "--json", str(good))
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["not_enforced"] == [] and "without nodes" in doc["note"]
    failing = tmp_path / "failing.hujson"
    failing.write_text(FAILING_TEST)
    code, out = _run("policy", "check", "--json", str(failing))
    assert code == 1 and json.loads(out) == {
        "ok": False,
        "errors": [f"{failing}:7:5: tests[1]: alice@ may not reach tag:db:22"],
    }
    bad = tmp_path / "bad.hujson"
    bad.write_text(UNDEFINED_GROUP)
    code, out = _run("policy", "check", "--json", str(bad))
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["errors"][0].startswith(f"{bad}:3:")
    code, out = _run("policy", "check", str(bad))
    assert code == 1 and out.startswith(f"tailpy: {bad}:3:"), out
    # with a database: the same answers, the tests against its nodes
    state = tmp_path / "state"
    state.mkdir()
    Store(state).close()
    code, out = _run("policy", "check", "--json", str(failing), "--state-dir", str(state))
    assert code == 1 and json.loads(out)["errors"] == [
        f"{failing}:7:5: tests[1]: alice@ may not reach tag:db:22"
    ]
    code, out = _run("policy", "check", str(good), "--state-dir", str(state))
    assert code == 0 and out == f"{good}: ok\n", out


def test_cli_refuses_a_policy_over_the_size_limit_itself(tmp_path: Path) -> None:
    from tailpy.control.store.policy import MAX_POLICY_BYTES

    big = tmp_path / "big.hujson"
    big.write_text(POLICY + "// " + "x" * MAX_POLICY_BYTES + "\n")
    for sub in ("check", "set", "test"):
        code, out = _run("policy", sub, str(big), "--state-dir", str(tmp_path))
        assert code == 1 and out == f"tailpy: {big}: a policy may have at most {MAX_POLICY_BYTES} bytes\n", (
            out
        )


# --- the server: database mode, file mode ---------------------------------------------------------------


def _config(state_dir: Path, **kw: object) -> ControlConfig:
    base: dict[str, object] = {"host": "127.0.0.1", "port": 0, "derp": False}
    return ControlConfig(state_dir=state_dir, **{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
async def file_mode(tmp_path: Path) -> AsyncIterator[tuple[ControlProcess, Path]]:
    path = tmp_path / "policy.hujson"
    path.write_text(POLICY)
    process = ControlProcess(_config(tmp_path / "state", policy_file=path))
    await process.start()
    yield process, path
    await process.stop()


async def _admin(process: ControlProcess, op: str, args: dict[str, object]) -> object:
    return await call_socket(process.config.state_dir / SOCKET_NAME, op, args)


async def _until(what: str, check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _rewrite(path: Path, text: str) -> None:
    """Replace the file as editors do (a new inode), so a change shows even within one mtime tick."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_file_mode_reloads_on_change_and_keeps_a_bad_edit_out(
    file_mode: tuple[ControlProcess, Path], caplog: pytest.LogCaptureFixture
) -> None:
    process, path = file_mode
    assert process.server is not None
    keeper = process.server.policy
    got = await _admin(process, "policy.get", {})
    assert isinstance(got, dict) and got["source"] == "file" and got["path"] == str(path)
    assert got["policy"] == POLICY
    _rewrite(path, CLOSED)
    await _until("the edit to load", lambda: keeper.policy is not None and keeper.policy.text == CLOSED)
    _rewrite(path, UNDEFINED_GROUP)
    await _until("the bad edit to be logged", lambda: "keeping the running policy" in caplog.text)
    assert f"{path}:3:" in caplog.text
    assert keeper.policy is not None and keeper.policy.text == CLOSED  # the running policy stayed
    with pytest.raises(ConfigError, match=r"takes its policy from .*policy\.hujson .*edit that file"):
        await _admin(process, "policy.set", {"text": POLICY})
    # the refused edit shows in policy get (JSON and text) and as a degraded health check
    got = await _admin(process, "policy.get", {})
    assert isinstance(got, dict) and got["policy"] == CLOSED
    assert got["refused"]["error"].startswith(f"{path}:3:") and isinstance(got["refused"]["at"], float)
    state = ["--state-dir", str(process.config.state_dir)]
    code, out = await asyncio.to_thread(_run, "policy", "get", *state)
    assert code == 0 and out.startswith(f"# from file {path}: the file's current content was refused at "), (
        out
    )
    assert f": {path}:3:" in out.splitlines()[0] and "; running the policy loaded at " in out.splitlines()[0]
    assert "group:nope" in out.splitlines()[0] and out.splitlines()[1:] == CLOSED.splitlines()
    health = process.server.health()
    assert health["status"] == "degraded" and health["checks"]["policy"]["status"] == "warning"
    assert f"{path}:3:" in health["checks"]["policy"]["error"]
    # fixed: loaded, nothing refused any more, its warnings logged
    _rewrite(path, WITH_GRANT_WARNING)
    await _until(
        "the fix to load", lambda: keeper.policy is not None and keeper.policy.text == WITH_GRANT_WARNING
    )
    assert keeper.refused is None and process.server.health()["checks"]["policy"]["status"] == "ok"
    assert process.server.health()["status"] == "ok"
    got = await _admin(process, "policy.get", {})
    assert isinstance(got, dict) and "refused" not in got
    assert f"{path}: grants[0]: " in caplog.text and "capability" in caplog.text


async def test_file_mode_reloads_on_sighup(
    file_mode: tuple[ControlProcess, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tailpy.control")
    process, path = file_mode
    assert process.server is not None
    keeper = process.server.policy
    await keeper.stop()  # no watching: only SIGHUP can bring the change in
    path.write_text(CLOSED)
    os.kill(os.getpid(), signal.SIGHUP)
    await _until("SIGHUP to reload", lambda: keeper.policy is not None and keeper.policy.text == CLOSED)
    assert f"policy file {path} loaded (on SIGHUP)" in caplog.text
    path.unlink()  # a SIGHUP that cannot read the file says so, and does not claim a reload
    os.kill(os.getpid(), signal.SIGHUP)
    await _until("the failed SIGHUP to be logged", lambda: "cannot read" in caplog.text)
    line = next(ln for ln in caplog.text.splitlines() if "cannot read" in ln)
    assert "policy file on SIGHUP: not loaded: cannot read policy file" in line, line
    assert line.endswith("; keeping the running policy") and "reloaded" not in line
    assert keeper.policy is not None and keeper.policy.text == CLOSED and keeper.refused is not None


async def test_a_bad_policy_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "p.hujson"
    path.write_text(UNDEFINED_GROUP)
    process = ControlProcess(_config(tmp_path / "state", policy_file=path))
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: .*group:nope"):
        await process.start()
    assert process.server is None and process.store is None
    missing = ControlProcess(_config(tmp_path / "state", policy_file=tmp_path / "none.hujson"))
    with pytest.raises(ConfigError, match="cannot read policy file"):
        await missing.start()


async def test_database_mode_set_through_the_socket_and_tags_at_registration(tmp_path: Path) -> None:
    process = ControlProcess(_config(tmp_path / "state"))
    await process.start()
    client: ControlClient | None = None
    try:
        assert process.server is not None and process.store is not None
        out = await _admin(process, "policy.set", {"text": POLICY, "by": "root"})
        assert isinstance(out, dict) and out["source"] == "database" and out["set_by"] == "root"
        keeper = process.server.policy
        assert keeper.policy is not None and keeper.policy.text == POLICY
        with pytest.raises(ConfigError, match=r"^bad\.hujson:3:"):
            await _admin(process, "policy.set", {"text": UNDEFINED_GROUP, "file": "bad.hujson"})
        assert keeper.policy.text == POLICY
        # tags requested at registration, decided by the running policy
        process.store.create_user("alice", 1.0)
        key = process.store.create_auth_key(reusable=True, expires=None, now=time.time(), user="alice").key
        host, port = process.addresses[0]
        client = ControlClient(
            f"http://{host}:{port}", MachinePrivate(bytes(nacl.public.PrivateKey.generate()))
        )
        with pytest.raises(TagError, match="tag:db is not permitted"):
            await client.register(_nk(), "a", key, request_tags=["tag:db"])
        node = await client.register(_nk(), "a", key, request_tags=["tag:web"])
        assert node.tags == ("tag:web",)
        # a policy change leaves the tag in place
        await _admin(process, "policy.set", {"text": CLOSED})
        assert process.store.get_node(node.id).tags == ("tag:web",)
    finally:
        if client is not None:
            await client.close()
        await process.stop()


async def test_control_answers_health_while_a_policy_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests of a big policy take a while: control checks them in a worker thread, so it keeps
    answering (here: /health while the check is held), then runs the policy back on its loop."""
    entered, release = threading.Event(), threading.Event()
    threads: list[int] = []
    from tailpy.control.policy import check_tests as real

    def held_check(policy: Policy, nodes: object) -> object:
        threads.append(threading.get_ident())
        entered.set()
        release.wait(30)
        return real(policy, nodes)  # type: ignore[arg-type]

    monkeypatch.setattr(acl, "check_tests", held_check)
    monkeypatch.setattr(admin_module, "check_tests", held_check)
    process = ControlProcess(_config(tmp_path / "state"))
    await process.start()
    try:
        assert process.server is not None
        setting = asyncio.create_task(_admin(process, "policy.set", {"text": POLICY, "by": "root"}))
        await asyncio.to_thread(entered.wait, 30)
        assert entered.is_set() and threads[0] != threading.get_ident()  # not on the event loop's thread
        host, port = process.addresses[0]
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        assert not setting.done() and process.server.policy.policy is None  # still checking
        release.set()
        out = await setting
        assert isinstance(out, dict) and out["set_by"] == "root"
        keeper = process.server.policy
        assert keeper.policy is not None and keeper.policy.text == POLICY
        # policy check and test through the socket are checked off the loop as well
        await _admin(process, "policy.check", {"text": POLICY})
        await _admin(process, "policy.test", {"text": POLICY})
        assert len(threads) == 3 and threading.get_ident() not in threads
    finally:
        release.set()
        await process.stop()


async def test_a_policy_near_the_size_limit_passes_the_admin_socket(tmp_path: Path) -> None:
    """A policy just under MAX_POLICY_BYTES, full of characters JSON escapes, reaches control's check."""
    from tailpy.control.store.policy import MAX_POLICY_BYTES

    line = '// "quoted" \\ back\tslash\n'
    text = POLICY + line * ((MAX_POLICY_BYTES - len(POLICY) - 100) // len(line))
    assert MAX_POLICY_BYTES - 200 < len(text.encode()) <= MAX_POLICY_BYTES
    process = ControlProcess(_config(tmp_path / "state"))
    await process.start()
    try:
        out = await _admin(process, "policy.check", {"text": text, "file": "big.hujson"})
        assert out == {"not_enforced": [], "warnings": []}
        with pytest.raises(
            ConfigError, match=f"^big.hujson: a policy may have at most {MAX_POLICY_BYTES} bytes$"
        ):
            await _admin(process, "policy.check", {"text": text + "/" * 2000, "file": "big.hujson"})
    finally:
        await process.stop()


async def test_a_policy_file_edit_reaches_the_nodes_netmaps(file_mode: tuple[ControlProcess, Path]) -> None:
    process, path = file_mode
    assert process.store is not None
    process.store.create_user("alice", 1.0)
    key = process.store.create_auth_key(reusable=True, expires=None, now=time.time(), user="alice").key
    host, port = process.addresses[0]
    client = ControlClient(f"http://{host}:{port}", MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    node = await client.register(_nk(), "a", key)
    stream = client.stream_map(node.node_key, [], "a")
    try:
        first = await asyncio.wait_for(stream.__anext__(), 10)
        assert first.packet_filter  # everyone may reach a
        _rewrite(path, CLOSED)  # now nothing reaches a (untagged)
        deadline = time.monotonic() + 10
        while (nm := await asyncio.wait_for(stream.__anext__(), 10)).packet_filter != ():
            assert time.monotonic() < deadline, "the edit did not reach a's netmap"
        assert nm.self_node.id == node.id
    finally:
        await stream.aclose()
        await client.close()


# --- the node side: --advertise-tags ----------------------------------------------------------------------


def test_asking_for_no_tags_on_a_tagged_node_says_why_they_stay() -> None:
    from tailpy.cli.up import kept_tags

    assert kept_tags(None, ("tag:dev",)) == ""  # not asked
    assert kept_tags(["tag:dev"], ("tag:dev",)) == ""
    assert kept_tags([], ()) == ""  # an untagged node: nothing to drop
    said = kept_tags([], ("tag:dev", "tag:web"))
    assert said.startswith("this node keeps its tags (tag:dev, tag:web): a tagged node cannot drop all")
    assert "--force-reauth" in said


def test_advertise_tags_are_parsed_and_kept_in_the_state_file() -> None:
    from tailpy.cli.up import _tags
    from tailpy.daemon.state import NodeState
    from tailpy.keys import NodePrivate

    assert _tags(None) is None and _tags("") == [] and _tags("tag:web, tag:db") == ["tag:db", "tag:web"]
    with pytest.raises(ConfigError, match=r"""'junk' is not a tag: tags start with "tag:" \(tag:junk\)"""):
        _tags("tag:web,junk")  # as tailscale (tailcfg.CheckTag), not "tag:junk is not permitted" by control
    with pytest.raises(ConfigError, match="may contain only letters"):
        _tags("tag:web_1")
    assert _tags("tag:Web") == ["tag:Web"]  # Tailscale's rule: ASCII letters of either case
    s = NodeState(MachinePrivate(bytes(nacl.public.PrivateKey.generate())), NodePrivate.generate())
    s.advertise_tags = ("tag:web",)
    assert NodeState.from_json(json.loads(json.dumps(s.to_json()))).advertise_tags == ("tag:web",)
    old = s.to_json()
    del old["advertise_tags"]  # a state file written before the flag existed
    assert NodeState.from_json(old).advertise_tags == ()
