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


def test_name_kept_across_reregistration_and_hostname_change(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    mk = mkey()
    n = store.register(mk, nkey(), "pi", key, NOW)
    store.register(mkey(), nkey(), "pi", key, NOW)
    again = store.register(mk, nkey(), "Other Name", key, NOW)  # new node key, new hostname
    assert again.name == n.name == "pi"
    updated = store.update_node(mk, now=NOW, hostname="renamed-host")
    assert updated is not None and updated.name == "pi" and updated.hostname == "renamed-host"
