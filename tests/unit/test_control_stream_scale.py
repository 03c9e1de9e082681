"""What keeps the control server's cost per node flat at thousands of nodes: registration looks up names and
addresses through indexes (no query reads every node), and still gives the lowest free address and name."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import nacl.public
import pytest
import sqlalchemy as sa

from tailpy.control import Store
from tailpy.control.store import first_free
from tailpy.control.store.schema import nodes
from tailpy.keys import MachinePublic, NodePublic

NOW = 1_000_000.0


def mkey() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path)
    yield s
    s.close()


def test_registration_reads_no_whole_table(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    for i in range(40):
        store.register(mkey(), nkey(), f"h{i % 4}", key, NOW)  # warm: the address hint is set
    seen: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        node = store.register(mkey(), nkey(), "h1", key, NOW)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert node.name == "h1-10" and node.ipv4 == "100.64.0.41"
    reads = [s for s in seen if s.startswith("SELECT") and " FROM nodes" in s]
    assert reads and all(" WHERE " in s for s in reads), reads


def test_names_past_one_batch_and_long_names(store: Store) -> None:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    got = [store.register(mkey(), nkey(), "box", key, NOW).name for _ in range(40)]
    assert got == ["box"] + [f"box-{i}" for i in range(1, 40)]
    long = "a" * 63
    got = [store.register(mkey(), nkey(), long, key, NOW).name for _ in range(12)]
    assert got[0] == long and got[1] == "a" * 61 + "-1" and got[11] == "a" * 60 + "-11"
    deleted = store.list_nodes()[3]  # box-3 is deleted: its name is free again
    assert store.delete_node(deleted.id, NOW)
    assert store.register(mkey(), nkey(), "box", key, NOW).name == "box-3"


def test_lowest_free_address_across_stores_prefixes_and_rollbacks(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)  # two servers on one database
    try:
        key = a.create_auth_key(reusable=True, expires=None, now=NOW).key
        ips = [s.register(mkey(), nkey(), "n", key, NOW).ipv4 for s in (a, b, a, a, b)]
        assert ips == [f"100.64.0.{i}" for i in range(1, 6)]
        with pytest.raises(Exception, match="boom"), a.engine.begin() as conn:  # a registration rolled back
            net = ipaddress.IPv4Network("100.64.0.0/10")
            assert str(a.addresses.allocate(conn, net, nodes.c.ipv4, NOW)) == "100.64.0.6"
            raise RuntimeError("boom")
        assert a.register(mkey(), nkey(), "n", key, NOW).ipv4 == "100.64.0.6"  # no gap
        a.configure(prefix_v4="100.64.0.0/28")  # .1-.6 taken
        assert b.register(mkey(), nkey(), "n", key, NOW).ipv4 == "100.64.0.7"
        a.configure(prefix_v4="100.64.0.0/30")
        with pytest.raises(Exception, match=r"100\.64\.0\.0/30 is exhausted"):
            a.register(mkey(), nkey(), "n", key, NOW)
        a.configure(prefix_v4="100.64.1.0/24")
        assert a.register(mkey(), nkey(), "n", key, NOW).ipv4 == "100.64.1.1"
        v6 = {n.ipv6 for n in a.list_nodes()}
        assert len(v6) == 8 and "fd7a:115c:a1e0::1" in v6 and "fd7a:115c:a1e0::53" not in v6
        assert str(first_free(ipaddress.IPv4Network("100.64.1.0/24"), set())) == "100.64.1.1"
    finally:
        a.close()
        b.close()
