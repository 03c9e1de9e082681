"""Map stream openings' reports grouped into shared transactions (:mod:`tailpy.control.openwrites`): each
caller gets its own node as committed, many reports at once take one transaction, one refused report fails
only itself, and a server's streams still carry what their nodes reported."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nacl.public
import pytest

from tailpy.control import Store
from tailpy.control.openwrites import StreamOpenWrites
from tailpy.control.store.nodes import NodeReport
from tailpy.endpoint import Endpoint
from tailpy.keys import MachinePublic, NodePublic
from tailpy.netmap import Node

NOW = 1_700_000_000.0


def mkey() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


class CountingStore:
    """A Store whose grouped writes are counted (and can be made to fail once)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.groups: list[int] = []
        self.fail_next = False

    def update_nodes(self, reports: Sequence[NodeReport]) -> list[Node | None]:
        self.groups.append(len(reports))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the database refused the transaction")
        return self.store.update_nodes(reports)

    def update_node(self, machine_key: MachinePublic, **kw: Any) -> Node | None:
        if kw.get("hostname") == "refused":
            raise ValueError("refused report")
        return self.store.update_node(machine_key, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path)
    yield s
    s.close()


def _nodes(store: Store, n: int) -> list[MachinePublic]:
    key = store.create_auth_key(reusable=True, expires=None, now=NOW).key
    keys = [mkey() for _ in range(n)]
    for i, k in enumerate(keys):
        store.register(k, nkey(), f"n{i}", key, NOW)
    return keys


def test_reports_at_once_share_one_transaction(store: Store) -> None:
    keys = _nodes(store, 50)
    counting = CountingStore(store)
    writes = StreamOpenWrites(counting)

    async def go() -> list[Node | None]:
        return await asyncio.gather(
            *(
                writes.report(
                    NodeReport(k, NOW + 5, endpoints=[Endpoint.parse(f"192.0.2.1:{i + 1}")], hostname=f"h{i}")
                )
                for i, k in enumerate(keys)
            )
        )

    got = asyncio.run(go())
    assert counting.groups == [50]
    for i, (k, node) in enumerate(zip(keys, got, strict=True)):
        assert node is not None and node.machine_key == k
        assert list(node.endpoints) == [Endpoint.parse(f"192.0.2.1:{i + 1}")]
        stored = store.node_by_machine_key(k)  # committed before report() returned
        assert stored is not None and stored.hostname == f"h{i}" and stored.last_seen == NOW + 5


def test_unknown_machine_key_gets_none(store: Store) -> None:
    (known,) = _nodes(store, 1)
    writes = StreamOpenWrites(store)

    async def go() -> list[Node | None]:
        return list(
            await asyncio.gather(
                writes.report(NodeReport(mkey(), NOW)), writes.report(NodeReport(known, NOW))
            )
        )

    unknown, node = asyncio.run(go())
    assert unknown is None and node is not None and node.machine_key == known


def test_a_failed_group_is_written_report_by_report(store: Store) -> None:
    keys = _nodes(store, 3)
    counting = CountingStore(store)
    counting.fail_next = True
    writes = StreamOpenWrites(counting)

    async def go() -> list[Node | BaseException | None]:
        return list(
            await asyncio.gather(
                writes.report(NodeReport(keys[0], NOW, hostname="fine0")),
                writes.report(NodeReport(keys[1], NOW, hostname="refused")),
                writes.report(NodeReport(keys[2], NOW, hostname="fine2")),
                return_exceptions=True,
            )
        )

    a, b, c = asyncio.run(go())
    assert isinstance(a, Node) and a.hostname == "fine0"
    assert isinstance(b, ValueError)
    assert isinstance(c, Node) and c.hostname == "fine2"


def test_store_without_grouped_writes_is_written_directly(store: Store) -> None:
    (k,) = _nodes(store, 1)

    class Plain:
        def update_node(self, machine_key: MachinePublic, **kw: Any) -> Node | None:
            return store.update_node(machine_key, **kw)

    node = asyncio.run(StreamOpenWrites(Plain()).report(NodeReport(k, NOW, hostname="direct")))
    assert node is not None and node.hostname == "direct"


def test_grouped_reports_with_different_fields_each_keep_their_own(store: Store) -> None:
    """One transaction, reports setting different columns (one executemany per set of columns): each node
    gets exactly what it reported, the rest stays; answers come in the reports' order."""
    keys = _nodes(store, 4)
    before = store.node_by_machine_key(keys[3])
    assert before is not None
    got = store.update_nodes(
        [
            NodeReport(keys[2], NOW + 1, hostname="two"),
            NodeReport(mkey(), NOW + 1, hostname="nobody"),
            NodeReport(
                keys[0], NOW + 2, endpoints=[Endpoint.parse("192.0.2.9:9")], routable_ips=["10.0.0.0/24"]
            ),
            NodeReport(keys[1], NOW + 3, endpoints=[Endpoint.parse("192.0.2.8:8")], hostname="one"),
            NodeReport(keys[3], NOW + 4),
        ]
    )
    two, nobody, zero, one, three = got
    assert nobody is None
    assert two is not None and (two.machine_key, two.hostname, two.last_seen) == (keys[2], "two", NOW + 1)
    assert zero is not None and zero.machine_key == keys[0] and zero.routable_ips == ("10.0.0.0/24",)
    assert [str(e) for e in zero.endpoints] == ["192.0.2.9:9"] and zero.hostname == "n0"
    assert one is not None and one.hostname == "one" and [str(e) for e in one.endpoints] == ["192.0.2.8:8"]
    assert three is not None and three.last_seen == NOW + 4
    assert (three.hostname, three.endpoints) == (before.hostname, before.endpoints)
