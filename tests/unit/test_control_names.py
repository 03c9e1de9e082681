"""Node names: sanitising hostnames to DNS labels, collisions (``pi``, ``pi-1``, … also under concurrent
registrations), renames, and that names stay put."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.public
import pytest

from tailpy.control import Store
from tailpy.control.names import check_label, sanitize, unique
from tailpy.errors import ConfigError
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


@pytest.mark.parametrize(
    ("hostname", "name"),
    [
        ("Pi", "pi"),
        ("raspberrypi.local", "raspberrypi"),
        ("nas.localdomain", "nas"),
        ("router.lan", "router"),
        ("My Laptop", "my-laptop"),
        ("web.example.com", "web-example-com"),
        ("bob@home", "bob-home"),
        ("web_1", "web-1"),
        ("Bob's MacBook Pro", "bobs-macbook-pro"),
        ("--x--", "x"),
        ("ÄÖ", "node"),
        ("", "node"),
        ("a" * 80, "a" * 63),
        ("a" * 62 + "_b", "a" * 62),
        ("7", "node-7"),
        ("0042.local", "node-0042"),
        ("1" * 80, "node-" + "1" * 58),
    ],
)
def test_sanitize(hostname: str, name: str) -> None:
    assert sanitize(hostname) == name


def test_unique_suffixes_fit_63() -> None:
    assert unique("pi", {"pi", "pi-1"}) == "pi-2"
    long = "a" * 63
    assert unique(long, {long}) == "a" * 61 + "-1"


def test_check_label() -> None:
    assert check_label("pi-2") == "pi-2"
    with pytest.raises(ConfigError, match="not a valid node name"):
        check_label("Pi 2")


def test_collisions_concurrency_rename_and_stability(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    pis = [store.register(mkey(), nkey(), "pi", key, NOW) for _ in range(3)]
    assert [n.name for n in pis] == ["pi", "pi-1", "pi-2"]
    with ThreadPoolExecutor(10) as pool:  # ten machines named cam at the same moment
        cams = list(pool.map(lambda _: store.register(mkey(), nkey(), "cam", key, NOW), range(10)))
    assert sorted(n.name for n in cams) == sorted(["cam"] + [f"cam-{i}" for i in range(1, 10)])
    with pytest.raises(ConfigError, match=f"name pi is taken by node {pis[0].id}"):
        store.rename_node(pis[2].id, "pi")
    assert store.delete_node(pis[0].id, NOW)
    names = {n.id: n.name for n in store.list_nodes()}
    assert (names[pis[1].id], names[pis[2].id]) == ("pi-1", "pi-2")  # nobody moves up
    assert store.rename_node(pis[2].id, "pi").name == "pi"  # the freed name can be taken by rename
    again = store.register(mkey(), nkey(), "pi", key, NOW)
    assert again.name == "pi-2"  # pi-2 was freed by the rename


def test_name_kept_across_reregistration_and_follows_a_new_hostname(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    mk = mkey()
    n = store.register(mk, nkey(), "pi", key, NOW)
    store.register(mkey(), nkey(), "pi", key, NOW)  # pi-1
    again = store.register(mk, nkey(), "Pi.local", key, NOW)  # new node key, same hostname as a label
    assert again.name == n.name == "pi"
    # `tailpy up --hostname` on the registered node (same node key, no auth key): the name follows
    nk = nkey()
    moved = store.register(mk, nk, "Other Name", key, NOW)
    assert (moved.id, moved.name, moved.hostname) == (n.id, "other-name", "Other Name")
    assert store.register(mk, nk, "pi", None, NOW).name == "pi"  # back: its old name is free again
    # a hostname another node's name has: a suffix
    assert store.register(mk, nk, "pi", None, NOW).name == "pi"  # unchanged hostname: stays
    clash = store.register(mk, nk, "box", None, NOW).name
    other = store.register(mkey(), nkey(), "box", key, NOW)
    assert (clash, other.name) == ("box", "box-1")
    assert store.register(other.machine_key, other.node_key, "pi", None, NOW).name == "pi"
    assert store.register(mk, nk, "pi", None, NOW).name == "pi-2"  # pi and pi-1 are taken
    # a map request's hostname is stored but does not rename
    updated = store.update_node(mk, now=NOW, hostname="renamed-host")
    assert updated is not None and updated.name == "pi-2" and updated.hostname == "renamed-host"


def test_a_name_an_admin_gave_stays(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    mk, nk = mkey(), nkey()
    n = store.register(mk, nk, "laptop", key, NOW)
    assert store.rename_node(n.id, "build-server").name == "build-server"
    assert store.register(mk, nk, "bee", None, NOW).name == "build-server"
    assert store.register(mk, nkey(), "wasp", key, NOW).name == "build-server"  # new key too
    assert store.delete_node(n.id, NOW)
    back = store.register(mk, nkey(), "bee", key, NOW)  # a deleted node comes back under its hostname
    assert back.name == "bee"
    assert store.register(mk, back.node_key, "wasp", None, NOW).name == "wasp"


@pytest.mark.parametrize(
    "hostname", ["localhost", "LOCALHOST.local", "ip6-localhost", "broadcasthost", "wpad"]
)
def test_reserved_names_get_a_suffix(store: Store, hostname: str) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    base = hostname.lower().removesuffix(".local")
    n = store.register(mkey(), nkey(), hostname, key, NOW)
    assert n.name == f"{base}-1"
    assert store.register(mkey(), nkey(), hostname, key, NOW).name == f"{base}-2"
    with pytest.raises(ConfigError, match="reserved"):
        store.rename_node(n.id, base)


def test_all_digit_names_never_shadow_node_ids(store: Store) -> None:
    """A hostname of digits only is named ``node-<digits>``, and an admin cannot rename a node to digits:
    ``nodes show 6`` always means node id 6."""
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    n = store.register(mkey(), nkey(), "7", key, NOW)
    assert n.name == "node-7"
    with pytest.raises(ConfigError, match="would read as a node id"):
        store.rename_node(n.id, str(n.id + 1))
    assert store.find_node(str(n.id)) == n.id


def test_nodes_found_by_id_name_or_fqdn(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    n = store.register(mkey(), nkey(), "bee", key, NOW)
    domain = store.settings().domain
    for ref in (n.id, str(n.id), "bee", "BEE", f"bee.{domain}", f"bee.{domain}."):
        assert store.find_node(ref) == n.id
    for ref in ("wasp", "999", 999):
        with pytest.raises(ConfigError, match="no node"):
            store.find_node(ref)
    assert store.delete_node(n.id, NOW)
    with pytest.raises(ConfigError):
        store.find_node("bee")
