"""The control server's SQLite store: migrations, names, addresses, auth keys (a real file in tmp_path)."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
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
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
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
    assert [k.shown for k in s2.list_auth_keys()] == [key.shown]
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
    with pytest.raises(ControlError, match=r"address pool 100\.64\.0\.0/30 is exhausted"):
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


# --- users, tags, ephemeral, settings -----------------------------------------------------------------------


def test_keys_carry_owner_tags_and_ephemerality(store: Store) -> None:
    store.create_user("alice", NOW)
    a = store.create_auth_key(reusable=False, expires=None, now=NOW, user="alice", ephemeral=True)
    t = store.create_auth_key(reusable=True, expires=None, now=NOW, tags=["server", "tag:web"])
    d = store.create_auth_key(reusable=True, expires=None, now=NOW)
    assert (a.user, a.ephemeral, t.user, t.tags, d.user) == (
        "alice",
        True,
        "",
        ("tag:server", "tag:web"),
        "default",
    )
    na = store.register(mkey(), nkey(), "a", a.key, NOW, os_name="linux")
    nt = store.register(mkey(), nkey(), "t", t.key, NOW)
    assert (na.user, na.tags, na.os) == ("alice", (), "linux")
    assert (nt.user, nt.tags, nt.key_expiry) == ("", ("tag:server", "tag:web"), None)  # tagged: no expiry
    assert na.key_expiry == NOW + 180 * 86400 and not na.expired
    with pytest.raises(ConfigError, match="there is no user bob; create it with"):
        store.create_auth_key(reusable=False, expires=None, now=NOW, user="bob")
    with pytest.raises(ConfigError, match="not both"):
        store.create_auth_key(reusable=False, expires=None, now=NOW, user="alice", tags=["x"])
    with pytest.raises(ConfigError, match="still owns 1 node"):
        store.delete_user("alice")
    with pytest.raises(ConfigError, match="already exists"):
        store.create_user("alice", NOW)
    assert store.delete_node(na.id, NOW)
    store.delete_user("alice")
    assert [u.name for u in store.list_users()] == ["default"]


def test_ephemeral_gc_spares_online_and_recent(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW, ephemeral=True).key
    e1 = store.register(mkey(), nkey(), "e1", key, NOW)
    e2 = store.register(mkey(), nkey(), "e2", key, NOW)
    e3 = store.register(mkey(), nkey(), "e3", key, NOW + 100)
    keeper = store.register(
        mkey(), nkey(), "k", store.create_auth_key(reusable=True, expires=None, now=NOW).key, NOW
    )
    assert store.next_deadline(NOW, 60, online={e2.id}) == NOW + 60
    assert store.ephemeral_gc(NOW + 60, 60, online={e2.id}) == [e1.id]
    assert {n.id for n in store.list_nodes()} == {e2.id, e3.id, keeper.id}


def test_ephemeral_offline_time_counts_from_server_start(store: Store) -> None:
    """A node connected when the server stopped has a stale last_seen: a restarted server must not remove
    it at once, only once it stays offline for the timeout after the start."""
    key = store.create_auth_key(reusable=True, expires=None, now=NOW, ephemeral=True).key
    e = store.register(mkey(), nkey(), "e", key, NOW)
    started = NOW + 3600  # the server restarts an hour after e was last seen
    assert store.ephemeral_gc(started + 1, 60, online=set(), not_before=started) == []
    assert store.next_deadline(started + 1, 60, online=set(), not_before=started) == started + 60
    assert store.ephemeral_gc(started + 60, 60, online=set(), not_before=started) == [e.id]


def test_settings_prefixes_and_exhaustion(store: Store) -> None:
    assert store.settings().domain == "tailnet.internal"
    cfg = store.configure(domain="Corp.Internal", prefix_v4="100.70.0.0/30")
    assert (cfg.domain, str(cfg.prefix_v4)) == ("corp.internal", "100.70.0.0/30")
    with pytest.raises(ConfigError, match=r"must lie within 100\.64\.0\.0/10"):
        store.configure(prefix_v4="10.0.0.0/8")
    with pytest.raises(ConfigError, match="is not a DNS name"):
        store.configure(domain="bad domain")
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    assert [store.register(mkey(), nkey(), "n", key, NOW).ipv4 for _ in range(2)] == [
        "100.70.0.1",
        "100.70.0.2",
    ]
    with pytest.raises(ControlError, match=r"address pool 100.70.0.0/30 is exhausted.*--prefix-v4"):
        store.register(mkey(), nkey(), "n", key, NOW)
    assert len(store.list_nodes()) == 2  # the key and nothing else changed


# --- expiry, logout, rotation -------------------------------------------------------------------------------


def test_restart_needs_no_auth_even_with_expired_preauth_key(store: Store) -> None:  # C29a
    key = store.create_auth_key(reusable=False, expires=NOW + 60, now=NOW).key
    mk, nk = mkey(), nkey()
    n = store.register(mk, nk, "pi", key, NOW)
    again = store.register(mk, nk, "pi", None, NOW + 3600)
    assert (again.id, again.name, again.addresses) == (n.id, n.name, n.addresses)


def test_node_key_expiry_and_reauth(store: Store) -> None:
    k1 = store.create_auth_key(reusable=False, expires=None, now=NOW).key
    mk, nk = mkey(), nkey()
    n = store.register(mk, nk, "pi", k1, NOW, key_lifetime=100)
    assert store.next_deadline(NOW, 1800, online=()) == NOW + 100
    assert store.expired_between(NOW, NOW + 99) == [] and store.expired_between(NOW + 99, NOW + 100) == [n.id]
    assert store.list_nodes(NOW + 100)[0].expired
    with pytest.raises(AuthKeyError, match="node key expired: pass an auth key"):
        store.register(mk, nk, "pi", None, NOW + 101)
    k2 = store.create_auth_key(reusable=False, expires=None, now=NOW).key
    back = store.register(mk, nk, "pi", k2, NOW + 101, key_lifetime=100)  # same node key, re-auth
    assert (back.id, back.name, back.addresses, back.expired, back.key_expiry) == (
        n.id,
        n.name,
        n.addresses,
        False,
        NOW + 201,
    )
    off = store.set_key_expiry(n.id, disabled=True, now=NOW + 300)
    assert (off.key_expiry, off.expired) == (None, False)
    assert store.expire_node(n.id, NOW + 400).expired


def test_logout_keeps_record_and_key_used_only_on_success(store: Store) -> None:  # C29c
    mk, nk = mkey(), nkey()
    n = store.register(mk, nk, "pi", store.create_auth_key(reusable=False, expires=None, now=NOW).key, NOW)
    out = store.logout(mk, NOW + 1)
    assert out is not None and out.expired and [x.id for x in store.list_nodes()] == [n.id]
    with pytest.raises(AuthKeyError, match="logged out"):
        store.register(mk, nk, "pi", None, NOW + 2)
    single_key = store.create_auth_key(reusable=False, expires=None, now=NOW)
    single = single_key.key
    other = store.register(
        mkey(), nkey(), "o", store.create_auth_key(reusable=True, expires=None, now=NOW).key, NOW
    )
    with pytest.raises(ControlError, match="belongs to another machine"):
        store.register(mk, other.node_key, "pi", single, NOW + 3)
    assert not next(k for k in store.list_auth_keys() if k.id == single_key.id).used
    back = store.register(mk, nkey(), "pi", single, NOW + 4)
    assert (back.id, back.name, back.addresses, back.expired) == (n.id, n.name, n.addresses, False)
    assert next(k for k in store.list_auth_keys() if k.id == single_key.id).used


def test_rotation_keeps_identity(store: Store) -> None:
    mk, old, new = mkey(), nkey(), nkey()
    n = store.register(mk, old, "pi", store.create_auth_key(reusable=False, expires=None, now=NOW).key, NOW)
    r = store.rotate_node_key(mk, old, new, NOW + 10, key_lifetime=50)
    assert (r.id, r.name, r.addresses, r.node_key, r.key_expiry) == (n.id, n.name, n.addresses, new, NOW + 60)
    with pytest.raises(ControlError, match="not this machine's current key"):
        store.rotate_node_key(mk, old, nkey(), NOW + 11)


# --- concurrency ------------------------------------------------------------------------------------------


def test_concurrent_registrations_get_distinct_addresses(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda i: store.register(mkey(), nkey(), f"h{i % 3}", key, NOW), range(30)))
    assert len({n.ipv4 for n in got}) == len({n.ipv6 for n in got}) == len({n.name for n in got}) == 30


def _register_many(state_dir: str, key: str, count: int) -> list[str]:
    s = Store(state_dir)
    try:
        return [str(s.register(mkey(), nkey(), "p", key, NOW).ipv4) for _ in range(count)]
    finally:
        s.close()


def test_concurrent_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    s = Store(tmp_path)
    key = s.create_auth_key(reusable=True, expires=None, now=NOW).key
    s.close()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        results = list(pool.map(_register_many, [str(tmp_path)] * 4, [key] * 4, [5] * 4))
    addrs = [a for r in results for a in r]
    assert len(addrs) == len(set(addrs)) == 20


# --- addresses come back ---


def test_ephemeral_cycles_reuse_addresses_after_quarantine(store: Store) -> None:
    """1,000 CI runners on a /24 (253 usable addresses) register with an ephemeral key, go offline and are
    removed, 10 s apart on a fake clock, beside one node that stays: every registration gets an address,
    no address is held by two live nodes, and none comes back within the 600 s quarantine."""
    store.configure(prefix_v4="100.64.7.0/24")
    assert store.addresses.quarantine == 600.0  # the default
    key = store.create_auth_key(reusable=True, expires=None, now=NOW, ephemeral=True).key
    keeper_key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    keeper = store.register(mkey(), nkey(), "keeper", keeper_key, NOW)
    freed: dict[str, float] = {}  # address -> when its node was removed
    reused = 0
    for i in range(1000):
        t = NOW + 10.0 * i
        node = store.register(mkey(), nkey(), "ci-runner", key, t)
        ip = node.ipv4
        assert node.name == "ci-runner" and ip is not None and ip != keeper.ipv4
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("100.64.7.0/24")
        if ip in freed:
            assert t - freed[ip] >= 600.0, f"{ip} reissued {t - freed[ip]} s after its node was removed"
            reused += 1
        assert store.ephemeral_gc(t + 5.0, 5.0, online={keeper.id}) == [node.id]
        freed[ip] = t + 5.0
    assert reused > 700
    live = store.list_nodes()
    assert [n.name for n in live] == ["keeper"] and live[0].ipv4 == keeper.ipv4


def test_quarantined_addresses_are_not_given_and_a_deleted_node_gets_its_own_back(tmp_path: Path) -> None:
    s = Store(tmp_path, address_quarantine=60.0)
    try:
        s.configure(prefix_v4="100.64.9.0/29")  # .1-.6
        key = s.create_auth_key(reusable=True, expires=None, now=NOW).key
        mks = [mkey() for _ in range(6)]
        first = [s.register(mk, nkey(), "n", key, NOW) for mk in mks]
        assert [n.ipv4 for n in first] == [f"100.64.9.{i}" for i in range(1, 7)]
        for n in first[:3]:
            assert s.delete_node(n.id, NOW)
        with pytest.raises(ControlError, match="exhausted"):  # all three still in quarantine
            s.register(mkey(), nkey(), "n", key, NOW + 59.0)
        # the deleted machine itself may come back to its address within the quarantine
        assert s.register(mks[0], nkey(), "n", key, NOW + 30.0).ipv4 == "100.64.9.1"
        new = s.register(mkey(), nkey(), "n", key, NOW + 60.0)
        assert new.ipv4 == "100.64.9.2"  # the longest-deleted first
        back = s.register(mks[1], nkey(), "n", key, NOW + 61.0)
        assert back.ipv4 == "100.64.9.3" and back.id == first[1].id  # its own was given away: a free one
        with s.engine.begin() as conn:  # the database refuses one address on two rows
            row = conn.execute(sa.text("SELECT ipv4 FROM nodes WHERE id = :i"), {"i": new.id}).scalar()
            with pytest.raises(sa.exc.IntegrityError):
                conn.execute(sa.text("UPDATE nodes SET ipv4 = :a WHERE id = :i"), {"a": row, "i": back.id})
    finally:
        s.close()


def test_user_names_equal_ignoring_case_and_trailing_at_are_refused(store: Store) -> None:
    """The policy compares user names ignoring ASCII case and a trailing '@', so the store refuses such a
    second name on every path that creates users (admin, OpenID Connect login, the default user)."""
    store.create_user("alice", NOW)
    for other in ("ALICE", "Alice", "alice@", "ALICE@"):
        with pytest.raises(ConfigError, match="would be the same user as 'alice' in the policy"):
            store.create_user(other, NOW)
    store.create_user("Bob@", NOW)
    with pytest.raises(ConfigError, match="same user as 'Bob@'"):
        store.create_user("bob", NOW)
    store.create_user("alicea", NOW)  # only exact equality after folding counts
    with pytest.raises(ConfigError, match=r"^there is no user '<script>' \(not a valid user name\)$"):
        store.delete_user("<script>")
    uid = store.user_for_login("https://idp.example", "s1", "ALICE", "", NOW)
    assert {u.id: u.name for u in store.list_users()}[uid] == "ALICE-2"
    store.create_user("DEFAULT", NOW)
    with pytest.raises(ConfigError, match="same user as 'DEFAULT'"):
        store.create_auth_key(reusable=False, expires=None, now=NOW)


def test_console_token_revoked_once_even_when_sent_at_once(store: Store) -> None:
    """Revoking a console one-time token answers True once and False after, also for simultaneous revokes
    (two replicas: one INSERT ... ON CONFLICT DO NOTHING, never an IntegrityError)."""
    assert store.revoke_console_token("t1", NOW + 60, NOW) is True
    assert store.revoke_console_token("t1", NOW + 60, NOW) is False
    assert store.console_token_revoked("t1", NOW)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: store.revoke_console_token("t2", NOW + 60, NOW), range(16)))
    assert got.count(True) == 1 and got.count(False) == 15
    assert store.revoke_console_token("t1", NOW + 120, NOW + 61) is True  # its row expired: pruned, then new
