"""Admin API keys: creation, checking (unknown, expired, malformed, tampered), last use written at most once
a minute, expiry by id or prefix, and `tailpy control apikey create|list|expire`."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tailpy.cli.main import cli
from tailpy.control import Store
from tailpy.control.apikeys import (
    check_api_key,
    create_api_key,
    expire_api_key,
    list_api_keys,
    parse_api_key,
)
from tailpy.control.store.apikeys import TOUCH_INTERVAL
from tailpy.errors import ConfigError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def test_create_check_and_stored_hashed(store: Store, tmp_path: Path) -> None:
    info, key = create_api_key(store, expiration_seconds=3600, description="ci", created_by="op", now=1000.0)
    assert re.fullmatch(r"tpyapi-[0-9a-f]{10}-[A-Za-z0-9_-]{43}", key)
    assert parse_api_key(key) == (info.prefix, key.split("-", 2)[2])
    assert (info.description, info.created_by, info.expires_at, info.last_used) == ("ci", "op", 4600.0, None)
    got = check_api_key(store, key, now=1001.0)
    assert got is not None and got.id == info.id and got.last_used == 1001.0
    with sqlite3.connect(tmp_path / "control.db") as db:  # only the prefix and a hash are kept
        (row,) = db.execute("SELECT prefix, hash FROM api_keys").fetchall()
    assert row[0] == info.prefix and key.split("-", 2)[2] not in row[1] and row[1].startswith("sha256:")


def test_check_refuses_unknown_expired_malformed(store: Store) -> None:
    _, key = create_api_key(store, expiration_seconds=60, description="", now=1000.0)
    prefix, secret = parse_api_key(key) or ("", "")
    wrong = "A" if secret[0] != "A" else "B"
    for bad in ("", "tpyapi-", key + "x", key[:-1], f"tpyapi-{prefix}-{wrong}{secret[1:]}", "Bearer " + key):
        assert check_api_key(store, bad, now=1001.0) is None, bad
    _, other = create_api_key(store, expiration_seconds=60, description="", now=1000.0)
    assert check_api_key(store, f"tpyapi-{prefix}-{other.split('-', 2)[2]}", now=1001.0) is None
    assert check_api_key(store, key, now=1059.0) is not None
    assert check_api_key(store, key, now=1060.0) is None  # expired at its expires_at
    assert check_api_key(store, 12345, now=1001.0) is None  # type: ignore[arg-type]


def test_last_used_written_at_most_once_a_minute(store: Store) -> None:
    _, key = create_api_key(store, expiration_seconds=None, description="", now=0.0)
    assert (check_api_key(store, key, now=100.0) or pytest.fail()).last_used == 100.0
    assert (check_api_key(store, key, now=100.0 + TOUCH_INTERVAL - 1) or pytest.fail()).last_used == 100.0
    (listed,) = list_api_keys(store)
    assert listed.last_used == 100.0
    assert (check_api_key(store, key, now=100.0 + TOUCH_INTERVAL) or pytest.fail()).last_used == 160.0


def test_expire_by_id_prefix_or_key(store: Store) -> None:
    a, ka = create_api_key(store, expiration_seconds=None, description="a", now=0.0)
    b, kb = create_api_key(store, expiration_seconds=None, description="b", now=0.0)
    c, kc = create_api_key(store, expiration_seconds=None, description="c", now=0.0)
    assert expire_api_key(store, a.id, now=10.0).expires_at == 10.0
    assert expire_api_key(store, b.prefix, now=10.0).expires_at == 10.0
    assert expire_api_key(store, kc, now=10.0).expires_at == 10.0
    assert expire_api_key(store, str(c.id), now=20.0).expires_at == 10.0  # stays expired at its time
    assert all(check_api_key(store, k, now=11.0) is None for k in (ka, kb, kc))
    assert [k.expired(11.0) for k in list_api_keys(store)] == [True, True, True]
    for ref in ("nope", "999", 999, ""):
        with pytest.raises(ConfigError, match="no API key"):
            expire_api_key(store, ref, now=10.0)


@pytest.mark.parametrize("seconds", [0, -1, 3650 * 86400 + 1, True, "60", float("nan")])
def test_create_refuses_bad_expiration(store: Store, seconds: object) -> None:
    with pytest.raises(ConfigError, match="expiration"):
        create_api_key(store, expiration_seconds=seconds, description="")  # type: ignore[arg-type]


def test_create_refuses_long_description(store: Store) -> None:
    with pytest.raises(ConfigError, match="description"):
        create_api_key(store, expiration_seconds=60, description="x" * 257)


def test_cli_create_list_expire(tmp_path: Path) -> None:
    Store(tmp_path).close()
    runner = CliRunner()
    env = {"TAILPY_CONTROL_STATE_DIR": str(tmp_path)}
    r = runner.invoke(cli, ["control", "apikey", "create", "--description", "ci runner"], env=env)
    assert r.exit_code == 0, r.output
    key = r.output.strip()
    assert parse_api_key(key) is not None
    r = runner.invoke(cli, ["control", "apikey", "list", "--json"], env=env)
    (listed,) = json.loads(r.output)
    assert listed["description"] == "ci runner" and not listed["expired"]
    assert 89.9 * 86400 < listed["expires_at"] - listed["created_at"] <= 90 * 86400
    r = runner.invoke(cli, ["control", "apikey", "list"], env=env)
    header, row = r.output.splitlines()
    assert header.split("\t")[:3] == ["ID", "KEY", "DESCRIPTION"]
    assert row.split("\t")[1] == f"tpyapi-{listed['prefix']}…"
    r = runner.invoke(cli, ["control", "apikey", "expire", listed["prefix"]], env=env)
    assert r.exit_code == 0 and r.output.strip() == f"expired API key {listed['prefix']}"
    r = runner.invoke(cli, ["control", "apikey", "create", "--expiration", "never", "--json"], env=env)
    assert json.loads(r.output)["expires_at"] is None
    r = runner.invoke(cli, ["control", "apikey", "expire", "nope"], env=env)
    assert r.exit_code == 1 and "no API key nope" in r.output
    r = runner.invoke(cli, ["control", "apikey", "create", "--expiration", "0s"], env=env)
    assert r.exit_code == 1 and "--expiration" in r.output
