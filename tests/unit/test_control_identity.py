"""Users from an identity provider and logins waiting for approval (tailpy.control.identity), on SQLite here
and on PostgreSQL through tests/integration/test_postgres_store.py (every test taking ``store``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import nacl.public
import pytest

from tailpy.control import Store
from tailpy.control import identity as ident
from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate, NodePublic


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A Store on SQLite (tests/integration/test_postgres_store.py runs the same tests on PostgreSQL)."""
    s = Store(tmp_path)
    yield s
    s.close()


def test_users_from_identities(store: Store) -> None:
    store.create_user("alice@example.com", 1.0)  # a local user already has the name
    a = ident.Identity("https://idp.example", "s1", "alice@example.com", True, "Alice")
    uid = ident.user_for_identity(store, a, 2.0)
    assert ident.user_for_identity(store, replace(a, email="alice@new.example"), 3.0) == uid
    names = {u.name for u in store.list_users()}
    assert "alice@example.com-2" in names  # no clash with the local user
    other = ident.user_for_identity(store, replace(a, issuer="https://other.example"), 4.0)
    assert other != uid  # same subject at another issuer: another user
    node = store.add_pending(mkey().public, nkey(), "pc", "linux", uid, 5.0, None)
    assert [p.id for p in store.list_pending()] == [node.id]
    assert store.reject_pending(node.id).hostname == "pc"
    assert store.list_pending() == []
    with pytest.raises(ConfigError, match="no pending node"):
        store.approve_pending(node.id, 6.0)
    # Approval registers the machine for the user; a second login of it replaces nothing but the key.
    mk = mkey().public
    p = store.add_pending(mk, nkey(), "pc2", "linux", uid, 7.0, 1e12)
    approved = store.approve_pending(p.id, 8.0)
    assert approved.user == "alice@example.com-2" and approved.key_expiry == 1e12
    assert store.node_by_machine_key(mk) is not None and store.pending_for(mk) is None
    again = store.register_for_user(mk, nkey(), "pc2", "linux", other, 9.0, None)
    assert again.id == approved.id and again.addresses == approved.addresses


def test_rotation_keeps_a_fixed_expiry_and_a_key_login_clears_it(store: Store) -> None:
    """S5: an expiry from the ID token (``expiry_fixed``) survives node key rotation, also through
    approval; registering with an auth key later gives the server's lifetime again."""
    uid = ident.user_for_identity(store, ident.Identity("https://idp.example", "s1", "a@example.com"), 1.0)
    mk, k1, k2, k3 = mkey().public, nkey(), nkey(), nkey()
    p = store.add_pending(mk, k1, "pc", "linux", uid, 2.0, 500.0, expiry_fixed=True)
    node = store.approve_pending(p.id, 3.0)
    assert node.key_expiry == 500.0
    assert store.rotate_node_key(mk, k1, k2, 100.0, key_lifetime=3600).key_expiry == 500.0
    # Without the flag (the server's lifetime), rotation gives a fresh lifetime.
    mk2, j1, j2 = mkey().public, nkey(), nkey()
    store.register_for_user(mk2, j1, "pc2", "linux", uid, 4.0, 500.0)
    assert store.rotate_node_key(mk2, j1, j2, 100.0, key_lifetime=3600).key_expiry == 3700.0
    # The fixed node logs in with an auth key: its expiry is the server's again, and rotation extends it.
    key = store.create_auth_key(reusable=False, expires=None, now=200.0)
    again = store.register(mk, k3, "pc", key.key, 200.0, key_lifetime=3600)
    assert again.key_expiry == 3800.0
    assert store.rotate_node_key(mk, k3, nkey(), 300.0, key_lifetime=3600).key_expiry == 3900.0
