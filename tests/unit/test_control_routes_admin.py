"""Advertised and approved routes in the control store (SQLite here; tests taking ``store`` also run on
PostgreSQL through tests/integration/test_postgres_store.py), the migration that adds them, and the admin
commands `tailpy control routes list|approve|unapprove`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _schema import rewind
from click.testing import CliRunner

from tailpy.cli.main import cli
from tailpy.control import MIGRATIONS, Store
from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate, NodePrivate

NOW = 1_700_000_000.0
LAN = "198.51.100.0/24"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A Store on SQLite (tests/integration/test_postgres_store.py runs the same tests on PostgreSQL)."""
    s = Store(tmp_path)
    yield s
    s.close()


def test_routes_stored_advertised_and_approved(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    mk = MachinePrivate.generate().public
    node = store.register(mk, NodePrivate.generate().public, "r1", key, NOW, routable_ips=[LAN, "::/0"])
    assert node.routable_ips == (LAN, "::/0") and node.approved_routes == ()
    node = store.approve_routes(node.id, ["2001:db8:1::/64", LAN, "0.0.0.0/0", LAN], NOW)
    assert node.approved_routes == ("0.0.0.0/0", LAN, "2001:db8:1::/64")  # sorted, IPv4 first, once each
    # re-advertising (a map request) keeps the approval; a route no longer advertised stays approved
    node = store.update_node(mk, routable_ips=["192.0.2.0/24"], now=NOW)  # type: ignore[assignment]
    assert node is not None and node.routable_ips == ("192.0.2.0/24",)
    assert node.approved_routes == ("0.0.0.0/0", LAN, "2001:db8:1::/64")
    node = store.update_node(mk, endpoints=[], now=NOW)  # type: ignore[assignment]
    assert node is not None and node.routable_ips == ("192.0.2.0/24",)  # None: left as they are
    node = store.unapprove_routes(node.id, ["0.0.0.0/0", "10.0.0.0/8"], NOW)
    assert node.approved_routes == (LAN, "2001:db8:1::/64")
    assert [n.approved_routes for n in store.list_nodes(NOW)] == [(LAN, "2001:db8:1::/64")]
    with pytest.raises(ConfigError, match="there is no node 99"):
        store.approve_routes(99, [LAN], NOW)


def test_migration_adds_empty_route_columns(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = store.create_auth_key(reusable=False, expires=None, now=NOW).key
    node = store.register(MachinePrivate.generate().public, NodePrivate.generate().public, "old", key, NOW)
    store.close()
    rewind(tmp_path / "control.db", 9)  # before the migration that adds routes
    store = Store(tmp_path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        got = store.node(node.id, NOW)
        assert got is not None and got.routable_ips == () and got.approved_routes == ()
        assert store.approve_routes(node.id, [LAN], NOW).approved_routes == (LAN,)
    finally:
        store.close()


def test_routes_cli_list_approve_unapprove(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    r1 = store.register(
        MachinePrivate.generate().public,
        NodePrivate.generate().public,
        "r1",
        key,
        time.time(),
        routable_ips=[LAN, "0.0.0.0/0", "::/0"],
    )
    store.register(MachinePrivate.generate().public, NodePrivate.generate().public, "plain", key, time.time())
    store.close()
    env = {"TAILPY_CONTROL_STATE_DIR": str(tmp_path), "COLUMNS": "200"}

    def run(*args: str) -> object:
        r = CliRunner().invoke(cli, ["control", "routes", *args, "--json"], env=env)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    listed = run("list")
    assert isinstance(listed, list) and len(listed) == 1  # only the node that advertises routes
    assert listed[0]["name"] == "r1" and listed[0]["exit_node"] == "awaiting approval"
    assert {x["prefix"]: x["state"] for x in listed[0]["routes"]} == {
        LAN: "awaiting approval",
        "0.0.0.0/0": "awaiting approval",
        "::/0": "awaiting approval",
    }
    out = run("approve", "r1", f"{LAN},192.0.2.0/24")
    assert isinstance(out, dict) and out["approved"] == ["192.0.2.0/24", LAN]
    assert out["not_advertised"] == ["192.0.2.0/24"]  # approved ahead: said so
    assert {x["prefix"]: x["state"] for x in out["routes"]}[LAN] == "offline"  # no server: nobody online
    out = run("approve", str(r1.id), "--exit-node")
    assert isinstance(out, dict) and out["exit_node"] == "approved"
    out = run("unapprove", "r1.tailnet.internal", "--exit-node")
    assert isinstance(out, dict) and out["exit_node"] == "awaiting approval"
    # a table for people, with a sentence about routes approved ahead
    r = CliRunner().invoke(cli, ["control", "routes", "approve", "r1", "203.0.113.0/24"], env=env)
    assert r.exit_code == 0 and "does not advertise 203.0.113.0/24" in r.output, r.output
    r = CliRunner().invoke(cli, ["control", "routes", "list"], env=env)
    assert r.exit_code == 0 and "r1" in r.output and f"{LAN} (offline)" in r.output
    # one exit route alone: approved, but the node is no exit node until the other is; said so
    r = CliRunner().invoke(cli, ["control", "routes", "approve", "r1", "0.0.0.0/0"], env=env)
    assert r.exit_code == 0 and "note: ::/0 is not approved: node r1 is an exit node only with" in r.output
    assert "`tailpy control routes approve r1 --exit-node`" in r.output, r.output
    out = run("approve", "r1", "::/0")
    assert isinstance(out, dict) and out["exit_node"] == "approved" and out["exit_route_missing"] == []
    # unapproving what was not approved: a note for a part, an error (nothing changed) for all of it
    r = CliRunner().invoke(cli, ["control", "routes", "unapprove", "r1", "::/0,10.9.0.0/16"], env=env)
    assert r.exit_code == 0 and "note: 10.9.0.0/16 of node r1 was not approved (unchanged)" in r.output
    r = CliRunner().invoke(cli, ["control", "routes", "unapprove", "r1", "10.9.0.0/16"], env=env)
    assert r.exit_code == 1 and "node r1 has no approval for 10.9.0.0/16: nothing to unapprove" in r.output
    assert r.output.count("\n") == 1
    # mistakes: one sentence each
    for args, sentence in [
        (["approve", "nope", LAN], "no node named 'nope'"),
        (["approve", "r1", "198.51.100.1/24"], "has host bits set"),
        (["approve", "r1", "banana"], "is not an IP prefix"),
        (["approve", "r1"], "give the routes to approve"),
    ]:
        r = CliRunner().invoke(cli, ["control", "routes", *args], env=env)
        assert r.exit_code == 1 and r.output.startswith("tailpy: ") and sentence in r.output, r.output
        assert r.output.count("\n") == 1
