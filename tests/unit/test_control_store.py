"""The control server's SQLite store: migrations, names, addresses, auth keys (a real file in tmp_path)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import nacl.public
import pytest
import sqlalchemy as sa

from tailpy.control import MIGRATIONS, Store, dns_label
from tailpy.control.store import IPV6_RANGE, first_free
from tailpy.errors import AuthKeyError, ConfigError, ControlError
from tailpy.keys import MachinePublic, NodePublic

NOW = 1_700_000_000.0


def mkey() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    yield s  # type: ignore[misc]
    s.close()


def test_fresh_db_reaches_latest_and_rerun_is_noop(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert s.schema_version() == len(MIGRATIONS)
    key = s.create_auth_key(reusable=True, expires=None, now=NOW)
    assert (tmp_path / "control.db").exists()
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert s.migrate() == len(MIGRATIONS)
    s.close()
    s2 = Store(tmp_path)  # opening again migrates nothing and keeps data
    assert s2.schema_version() == len(MIGRATIONS)
    assert [k.key for k in s2.list_auth_keys()] == [key.key]
    s2.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    s = Store(tmp_path)
    with s.engine.begin() as c:
        c.execute(sa.text("UPDATE schema_version SET version = 999"))
    s.close()
    with pytest.raises(ControlError, match="newer than this tailpy knows"):
        Store(tmp_path)


def test_missing_state_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Store(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no control database"):
        Store(tmp_path, create=False)


def test_server_key_file_is_private_and_stable(store: Store, tmp_path: Path) -> None:
    k = store.server_key()
    assert store.server_key() == k
    assert os.stat(tmp_path / "control.key").st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        ("My Laptop.local", "my-laptop"),
        ("--x--", "x"),
        ("ÄÖ", "node"),
        ("a" * 80, "a" * 63),
        ("web_1", "web-1"),
    ],
)
def test_dns_label(hostname: str, label: str) -> None:
    assert dns_label(hostname) == label


def test_names_collide_with_suffix(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    names = [store.register(mkey(), nkey(), "box", key, NOW).name for _ in range(3)]
    assert names == ["box", "box-1", "box-2"]


def test_addresses_skip_reserved() -> None:
    used = {str(IPV6_RANGE.network_address + i) for i in range(1, 0x53)}
    assert str(first_free(IPV6_RANGE, used)) == "fd7a:115c:a1e0::54"
    net = ipaddress.IPv4Network("100.100.100.96/28")
    assert str(first_free(net, {"100.100.100.97", "100.100.100.98", "100.100.100.99"})) == "100.100.100.101"
    with pytest.raises(ControlError, match="address pool 100.64.0.0/30 is exhausted"):
        first_free(ipaddress.IPv4Network("100.64.0.0/30"), {"100.64.0.1", "100.64.0.2"})


def test_first_free_address_reused_never_across_machines(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    a = store.register(mkey(), nkey(), "a", key, NOW)
    b = store.register(mkey(), nkey(), "b", key, NOW)
    assert (a.ipv4, b.ipv4) == ("100.64.0.1", "100.64.0.2")
    assert store.delete_node(a.id, NOW)
    c = store.register(mkey(), nkey(), "c", key, NOW)
    assert c.ipv4 == "100.64.0.3"  # a's address stays reserved for a's machine key
    a2 = store.register(a.machine_key, nkey(), "a", key, NOW)
    assert (a2.id, a2.ipv4, a2.name) == (a.id, a.ipv4, a.name)
    assert [n.id for n in store.list_nodes()] == [a.id, b.id, c.id]


def test_single_use_key_used_only_by_success(store: Store) -> None:
    other = store.register(
        mkey(), nkey(), "o", store.create_auth_key(reusable=False, expires=None, now=NOW).key, NOW
    )
    key = store.create_auth_key(reusable=False, expires=None, now=NOW).key
    with pytest.raises(ControlError, match="belongs to another machine"):
        store.register(mkey(), other.node_key, "x", key, NOW)
    store.register(mkey(), nkey(), "x", key, NOW)  # still unused: works
    with pytest.raises(AuthKeyError, match="already used"):
        store.register(mkey(), nkey(), "y", key, NOW)


def test_expired_key(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=NOW + 10, now=NOW).key
    store.register(mkey(), nkey(), "x", key, NOW + 9)
    with pytest.raises(
        AuthKeyError, match="is expired; create a new one with `tailpy control authkey create`"
    ):
        store.register(mkey(), nkey(), "y", key, NOW + 10)
