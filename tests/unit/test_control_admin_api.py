"""The HTTP admin API on a real control server (127.0.0.1): every endpoint of the OpenAPI document refuses
a request without a valid key; each group of endpoints works and tells the nodes; bad input is a 4xx with
a sentence; and `tailpy control … --control-url` (a subprocess) prints what it prints locally."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _admin_api import ThreadedControl, call, threaded_control

from tailpy.control.adminapi import OPENAPI_PATH, PREFIX, ROUTES, located
from tailpy.control.apikeys import expire_api_key, list_api_keys, parse_api_key
from tailpy.control.store.apikeys import TOUCH_INTERVAL

CLI = (sys.executable, "-m", "tailpy.cli.main", "control")


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ThreadedControl]:
    with threaded_control(tmp_path / "state") as c:
        yield c


def _ok(c: ThreadedControl, method: str, path: str, body: Any = None) -> Any:
    status, _, doc = call(c.url, method, PREFIX + path, key=c.key, body=body)
    assert status == 200, (method, path, doc)
    return doc


def _fail(c: ThreadedControl, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, str]:
    status, _, doc = call(c.url, method, PREFIX + path, key=c.key, body=body, **kw)
    assert 400 <= status < 500 and isinstance(doc, dict) and isinstance(doc["error"], str), (status, doc)
    return status, doc["error"]


# --- authentication ---------------------------------------------------------------------------------------


def test_openapi_document_needs_no_key_and_lists_every_route(control: ThreadedControl) -> None:
    status, headers, doc = call(control.url, "GET", OPENAPI_PATH)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert doc["security"] == [{"apiKey": []}]
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert {(r.method, PREFIX + r.path) for r in ROUTES} | {("GET", OPENAPI_PATH)} == listed


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(method, a concrete path) of every operation of ``doc`` that needs a key."""
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op.get("security", doc["security"]) == []:
                continue
            yield method.upper(), re.sub(r"\{[^}]+\}", "1", path)


def test_every_endpoint_refuses_without_a_valid_key(control: ThreadedControl) -> None:
    _, _, doc = call(control.url, "GET", OPENAPI_PATH)
    operations = list(_operations(doc))
    assert len(operations) == len(ROUTES)
    bad_headers: list[tuple[dict[str, str], str]] = [
        ({}, 'Bearer realm="tailpy"'),
        ({"Authorization": f"Bearer {control.expired_key}"}, 'error="invalid_token"'),
        ({"Authorization": "Bearer tpyapi-0000000000-" + "A" * 43}, 'error="invalid_token"'),
        ({"Authorization": "Bearer nonsense"}, 'error="invalid_token"'),
        ({"Authorization": f"Basic {control.key}"}, 'error="invalid_request"'),
        ({"Authorization": "Bearer "}, 'error="invalid_request"'),
    ]
    before = control.on_loop(lambda: len(list_api_keys(control.db)))
    for method, path in operations:
        body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
        for headers, challenge in bad_headers:
            status, got, answer = call(control.url, method, path, body=body, headers=headers)
            assert status == 401, (method, path, headers, answer)
            assert got["WWW-Authenticate"].startswith("Bearer") and challenge in got["WWW-Authenticate"]
            assert isinstance(answer["error"], str) and answer["error"]
    # nothing was done: no user, no key, no policy
    assert control.on_loop(lambda: (control.db.list_users(), control.db.policy())) == ([], None)
    assert control.on_loop(lambda: len(list_api_keys(control.db))) == before


def test_expired_key_is_refused_at_once_and_last_used_is_kept(control: ThreadedControl) -> None:
    _ok(control, "GET", "/users")
    (info,) = [k for k in control.on_loop(lambda: list_api_keys(control.db)) if k.description == "t"]
    assert info.last_used is not None and time.time() - info.last_used < TOUCH_INTERVAL
    created = _ok(control, "POST", "/apikeys", {"description": "second", "expiration": 60})
    assert parse_api_key(created["key"]) is not None and created["created_by"] == f"apikey:{info.prefix}"
    status, _, _ = call(control.url, "GET", PREFIX + "/nodes", key=created["key"])
    assert status == 200
    assert _ok(control, "POST", f"/apikeys/{created['prefix']}/expire")["expired"]
    status, _, _ = call(control.url, "GET", PREFIX + "/nodes", key=created["key"])
    assert status == 401
    listed = {k["prefix"]: k for k in _ok(control, "GET", "/apikeys")}
    assert "key" not in listed[created["prefix"]] and listed[created["prefix"]]["expired"]


# --- each group -------------------------------------------------------------------------------------------


def test_users(control: ThreadedControl) -> None:
    assert _ok(control, "POST", "/users", {"name": "alice"})["name"] == "alice"
    assert [u["name"] for u in _ok(control, "GET", "/users")] == ["alice"]
    assert _fail(control, "POST", "/users", {"name": "alice"}) == (400, "user alice already exists")
    assert _ok(control, "DELETE", "/users/alice") == {}
    status, error = _fail(control, "DELETE", "/users/alice")
    assert status == 404 and error.startswith("there is no user alice")


def test_nodes_changes_reach_the_server_s_netmaps(control: ThreadedControl) -> None:
    node = control.add_node("alpha")
    listed = _ok(control, "GET", "/nodes")
    assert [(n["id"], n["name"], n["fqdn"]) for n in listed] == [(node.id, "alpha", "alpha.tailnet.internal")]
    assert _ok(control, "GET", "/nodes/alpha")["id"] == node.id
    assert _ok(control, "POST", f"/nodes/{node.id}/rename", {"name": "db-1"})["name"] == "db-1"
    assert control.on_loop(lambda: control.control.mapper.nodes[node.id].name) == "db-1"  # published
    assert _ok(control, "POST", f"/nodes/{node.id}/expiry", {"disabled": True})["key_expiry"] is None
    assert _ok(control, "POST", f"/nodes/{node.id}/expire")["expired"]
    assert _ok(control, "POST", "/nodes/db-1/tags", {"tags": ["tag:server"]})["tags"] == ["tag:server"]
    assert control.on_loop(lambda: control.control.mapper.nodes[node.id].tags) == ("tag:server",)
    assert _ok(control, "GET", f"/nodes/{node.id}/filter")["node"] == {"id": node.id, "name": "db-1"}
    assert _ok(control, "GET", "/pending") == []
    assert _ok(control, "DELETE", f"/nodes/{node.id}") == {}
    assert node.id not in control.on_loop(lambda: dict(control.control.mapper.nodes))
    status, error = _fail(control, "GET", f"/nodes/{node.id}")
    assert status == 404 and error.startswith(f"there is no node {node.id}")


def test_auth_keys(control: ThreadedControl) -> None:
    control.on_loop(lambda: control.db.create_user("alice", time.time()))
    key = _ok(control, "POST", "/authkeys", {"user": "alice", "reusable": True})
    assert key["key"].startswith("tskey-auth-") and key["user"] == "alice" and key["reusable"]
    assert 3590 < key["expires"] - key["created"] <= 3600  # the CLI's default lifetime
    (listed,) = _ok(control, "GET", "/authkeys")
    assert listed["id"] == key["id"] and listed["key"].endswith("…") and len(listed["key"]) < len(key["key"])
    assert _ok(control, "POST", f"/authkeys/{key['id']}/expire")["expires"] <= time.time()
    never = _ok(control, "POST", "/authkeys", {"tags": ["tag:ci"], "expiration": None})
    assert never["expires"] is None and never["tags"] == ["tag:ci"]
    assert _fail(control, "POST", "/authkeys", {"user": "bob"})[1].startswith("there is no user bob")
    status, error = _fail(control, "POST", "/authkeys", {"expiration": 1e12})
    assert status == 400 and error.endswith("must be at most 315360000 seconds (3650 days)")


POLICY = '{\n  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],\n}\n'
BAD_POLICY = '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["nope"]},\n  ],\n}\n'


def test_policy(control: ThreadedControl) -> None:
    assert _ok(control, "GET", "/policy")["policy"] is None
    status, _, refused = call(
        control.url, "POST", PREFIX + "/policy/check", key=control.key, body={"text": BAD_POLICY}
    )
    assert status == 400 and refused["error"].startswith("policy:3:")
    (detail,) = refused["details"]
    assert detail["line"] == 3 and detail["column"] > 1 and "nope" in detail["message"]
    status, _, refused = call(
        control.url, "PUT", PREFIX + "/policy", key=control.key, body={"text": BAD_POLICY}
    )
    assert status == 400 and refused["details"][0]["line"] == 3
    assert _ok(control, "GET", "/policy/history") == []
    assert _ok(control, "POST", "/policy/check", {"text": POLICY}) == {"not_enforced": [], "warnings": []}
    running = _ok(control, "PUT", "/policy", {"text": POLICY})
    assert running["policy"] == POLICY and running["set_by"].startswith("apikey:")
    assert control.on_loop(lambda: control.control.policy.policy is not None)  # running at once
    (rec,) = _ok(control, "GET", "/policy/history?limit=5")
    assert _ok(control, "GET", f"/policy/history/{rec['id']}")["text"] == POLICY
    assert _ok(control, "POST", "/policy/test", {"text": POLICY})["tests"] == 0
    assert _fail(control, "GET", "/policy/history?limit=0")[0] == 400
    assert _fail(control, "GET", "/policy/history/99")[0] == 404


def test_routes(control: ThreadedControl) -> None:
    node = control.add_node("router", routes=("198.51.100.0/24", "0.0.0.0/0", "::/0"))
    (router,) = _ok(control, "GET", "/routes")
    assert router["id"] == node.id and router["approved"] == []
    approved = _ok(control, "POST", f"/nodes/{node.id}/routes/approve", {"routes": ["198.51.100.0/24"]})
    assert approved["approved"] == ["198.51.100.0/24"] and approved["not_advertised"] == []
    assert control.on_loop(lambda: control.control.mapper.nodes[node.id].approved_routes) == (
        "198.51.100.0/24",
    )
    assert (
        _ok(control, "POST", "/nodes/router/routes/approve", {"exit_node": True})["exit_node"] == "approved"
    )
    un = _ok(control, "POST", f"/nodes/{node.id}/routes/unapprove", {"exit_node": True})
    assert un["exit_node"] == "awaiting approval" and un["not_approved"] == []
    assert _fail(control, "POST", f"/nodes/{node.id}/routes/approve", {})[1].startswith("give the routes")
    assert _fail(control, "POST", f"/nodes/{node.id}/routes/approve", {"routes": ["nope"]})[0] == 400


def test_dns_and_settings(control: ThreadedControl) -> None:
    assert _ok(control, "GET", "/dns")["magic_dns"] is True
    out = _ok(control, "PATCH", "/dns", {"nameservers": ["192.0.2.53"], "domain": "corp.example"})
    assert out["nameservers"] == ["192.0.2.53"] and out["domain"] == "corp.example"
    assert control.on_loop(lambda: control.control.domain) == "corp.example"  # nodes get the new domain
    assert _ok(control, "GET", "/settings")["domain"] == "corp.example"
    assert _fail(control, "PATCH", "/dns", {"nameservers": ["100.100.100.100"]})[1].startswith("nameserver")


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "says"),
    [
        ("POST", "/users", None, b"{nope", "not JSON"),
        ("POST", "/users", None, b"\xff\xfe", "not JSON"),
        ("POST", "/users", None, b'{"name": NaN}', "not JSON"),
        ("POST", "/users", None, b"[" * 100000, "not JSON"),
        ("POST", "/users", ["alice"], None, "must be an object"),
        ("POST", "/users", None, b"null", "must be an object"),
        ("PATCH", "/dns", None, b"null", "must be an object"),
        ("PATCH", "/dns", None, b"5", "must be an object"),
        ("POST", "/users", {}, None, "needs field 'name'"),
        ("POST", "/users", {"name": 5}, None, "field 'name' must be text"),
        ("POST", "/users", {"name": "a", "admin": True}, None, "unknown field 'admin'"),
        ("POST", "/users", {"name": "a\x00b"}, None, "NUL"),
        ("POST", "/users", None, b'{"name": "\\ud800"}', "surrogate"),
        ("POST", "/nodes/1/expiry", {"disabled": "false"}, None, "true or false"),
        ("POST", "/nodes/1/tags", {"tags": "tag:a"}, None, "must be a list"),
        ("POST", "/nodes/99999999999999999999/rename", {"name": "x"}, None, "not an id"),
        ("POST", "/nodes/%C2%B2/rename", {"name": "x"}, None, "not an id"),
        ("POST", "/authkeys", {"expiration": 0}, None, "more than 0"),
        ("POST", "/authkeys", {"expiration": True}, None, "a number"),
        ("POST", "/authkeys", {"reusable": 1}, None, "true or false"),
        ("POST", "/authkeys/%C2%B2/expire", None, None, "there is no auth key"),
        ("POST", "/apikeys", {"expiration": 1e300}, None, "at most"),
        ("GET", "/policy/history/1e3", None, None, "whole number"),
        ("GET", "/policy/history/99999999999999999999999", None, None, "whole number"),
        ("GET", "/policy/history?limit=x", None, None, "whole number"),
        ("PATCH", "/dns", {"routes": {"corp.example": "192.0.2.1"}}, None, "must be a list"),
        (
            "PATCH",
            "/dns",
            {"extra_records": [{"name": "a", "type": "MX", "value": "x"}]},
            None,
            "one of A, AAAA",
        ),
        ("GET", "/nope", None, None, "Not Found"),
        ("PUT", "/users", {}, None, "Method Not Allowed"),
    ],
)
def test_bad_input_is_a_4xx_with_a_sentence(
    control: ThreadedControl, method: str, path: str, body: Any, raw: bytes | None, says: str
) -> None:
    _, error = _fail(control, method, path, body, raw=raw)
    assert says in error


def test_unknown_pending_login_is_404_by_id_or_hostname(control: ThreadedControl) -> None:
    for ref in ("999", "abc"):
        for verb in ("approve", "reject"):
            status, error = _fail(control, "POST", f"/pending/{ref}/{verb}")
            assert status == 404 and error.startswith("there is no pending"), (ref, verb, error)


def test_refusals_name_fields_not_cli_flags(control: ThreadedControl) -> None:
    _, error = _fail(control, "POST", "/authkeys", {"user": "alice@", "tags": ["tag:a"]})
    assert "--" not in error and "user or tags" in error


def test_wrong_method_is_405_with_allow(control: ThreadedControl) -> None:
    status, headers, doc = call(control.url, "PUT", PREFIX + "/users", key=control.key, body={})
    assert status == 405 and "Method Not Allowed" in doc["error"]
    assert set(headers["Allow"].split(",")) >= {"GET", "POST"}


def test_body_over_the_limit_is_413(control: ThreadedControl) -> None:
    from tailpy.control.admin import MAX_BODY

    status, error = _fail(control, "PUT", "/policy", raw=b" " * (MAX_BODY + 1))
    assert status == 413 and "larger than" in error


def test_database_that_does_not_answer_is_503(
    control: ThreadedControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone() -> None:
        raise sa.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(control.db, "list_users", gone)
    status, _, doc = call(control.url, "GET", PREFIX + "/users", key=control.key)
    assert status == 503 and doc == {"error": "the control database did not answer: try again"}


def test_located_reads_line_and_column() -> None:
    assert located("a.hujson", ["a.hujson:3:7: bad", "a.hujson: too big"]) == [
        {"line": 3, "column": 7, "message": "bad"},
        {"line": None, "column": None, "message": "too big"},
    ]


# --- the remote admin CLI -----------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TAILPY_")} | (env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full, timeout=60, check=False)


def test_remote_cli_prints_what_it_prints_locally(control: ThreadedControl, tmp_path: Path) -> None:
    remote = {"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": control.key}
    r = _cli("users", "create", "alice", env=remote)
    assert r.returncode == 0 and r.stdout.strip() == "created user alice", r.stderr
    r = _cli("authkey", "create", "--user", "alice", "--json", env=remote)
    assert r.returncode == 0 and json.loads(r.stdout)["user"] == "alice", r.stderr
    node = control.add_node("alpha")
    key_file = tmp_path / "key"
    key_file.write_text(control.key + "\n")
    by_file = ("--control-url", control.url, "--api-key-file", str(key_file))
    r = _cli("nodes", "rename", str(node.id), "db-1", *by_file)
    assert r.returncode == 0, r.stderr
    assert control.on_loop(lambda: control.control.mapper.nodes[node.id].name) == "db-1"
    # The same commands on the database directly print the same (the server's store is the same file).
    local = {"TAILPY_CONTROL_STATE_DIR": str(control.state_dir)}
    for cmd in (
        ("users", "list", "--json"),
        ("authkey", "list", "--json"),
        ("dns", "show"),
        ("routes", "list", "--json"),
        ("nodes", "show", "db-1", "--json"),
    ):
        r_remote, r_local = _cli(*cmd, env=remote), _cli(*cmd, env=local)
        assert r_remote.returncode == r_local.returncode == 0, (r_remote.stderr, r_local.stderr)
        assert r_remote.stdout == r_local.stdout, cmd
    policy = tmp_path / "policy.hujson"
    policy.write_text(BAD_POLICY)
    r_remote, r_local = (
        _cli("policy", "check", str(policy), env=remote),
        _cli("policy", "check", str(policy), env=local),
    )
    assert r_remote.returncode == r_local.returncode == 1
    assert r_remote.stderr == r_local.stderr and f"{policy}:3:" in r_remote.stderr
    policy.write_text(POLICY)
    r = _cli("policy", "set", str(policy), env=remote)
    assert r.returncode == 0 and "policy set" in r.stdout, r.stderr
    r = _cli("policy", "history", env=remote)
    assert r.returncode == 0 and "apikey:" in r.stdout
    r = _cli("apikey", "list", env=remote)
    assert r.returncode == 0 and "tpyapi-" in r.stdout


def test_remote_cli_failures_are_one_sentence(control: ThreadedControl, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    expired_key = control.expired_key
    cases = [
        ({"TAILPY_CONTROL_URL": control.url}, "needs an admin API key"),
        ({"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": "tpyapi-nope"}, "refused the API key"),
        ({"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": expired_key}, "refused the API key"),
        ({"TAILPY_CONTROL_URL": closed, "TAILPY_API_KEY": control.key}, "cannot reach the control server"),
        ({"TAILPY_CONTROL_URL": "ftp://x", "TAILPY_API_KEY": control.key}, "must be an http:// or https://"),
        (
            {"TAILPY_CONTROL_URL": control.url + "/key", "TAILPY_API_KEY": control.key},
            "has no admin API endpoint",
        ),
        *(
            ({"TAILPY_CONTROL_URL": bad, "TAILPY_API_KEY": control.key}, "must be an http:// or https://")
            for bad in (
                "http://[::1",
                "http://127.0.0.1:abc",
                "http://ex ample.com",
                "http://user:pw@127.0.0.1:80",
                "http://127.0.0.1:99999",
            )
        ),
        (
            {"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": "bad\nkey"},
            "API key in $TAILPY_API_KEY is malformed",
        ),
        ({"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": "tpyapi-a b"}, "is malformed"),
        (
            {"TAILPY_CONTROL_URL": control.url, "TAILPY_CONTROL_STATE_DIR": str(tmp_path / "none")},
            "TAILPY_CONTROL_URL is set but not used while a state directory is given",
        ),
    ]
    for env, says in cases:
        r = _cli("nodes", "list", env=env)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, (env, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    remote = {"TAILPY_CONTROL_URL": control.url, "TAILPY_API_KEY": control.key}
    r = _cli("users", "delete", "nobody", env=remote)
    assert r.returncode == 1 and r.stderr.startswith("tailpy: there is no user nobody")
    r = _cli(
        "nodes", "list", "--api-key-file", str(tmp_path / "missing"), env={"TAILPY_CONTROL_URL": control.url}
    )
    assert r.returncode == 1 and "cannot read the API key file" in r.stderr
    # $TAILPY_CONTROL_URL (which embedded nodes read too) gives way to a state dir; the flag does not
    local = {"TAILPY_CONTROL_URL": closed, "TAILPY_CONTROL_STATE_DIR": str(control.state_dir)}
    assert _cli("users", "list", "--json", env=local).returncode == 0
    r = _cli("users", "list", "--control-url", closed, env=local | {"TAILPY_API_KEY": control.key})
    assert r.returncode == 1 and "cannot reach" in r.stderr
    r = _cli("nodes", "list")
    assert r.returncode == 2 and "--state-dir" in r.stderr and "--control-url" in r.stderr


def test_key_expired_by_cli_is_refused_by_the_api(control: ThreadedControl) -> None:
    prefix = (parse_api_key(control.key) or ("", ""))[0]
    r = _cli("apikey", "expire", prefix, env={"TAILPY_CONTROL_STATE_DIR": str(control.state_dir)})
    assert r.returncode == 0, r.stderr
    status, _, _ = call(control.url, "GET", PREFIX + "/users", key=control.key)
    assert status == 401
    first = control.on_loop(lambda: expire_api_key(control.db, prefix)).expires_at
    r = _cli("apikey", "expire", prefix, env={"TAILPY_CONTROL_STATE_DIR": str(control.state_dir)})
    assert r.returncode == 0, r.stderr
    again = control.on_loop(lambda: expire_api_key(control.db, prefix))  # (already expired: stays so)
    assert again.expires_at == first
