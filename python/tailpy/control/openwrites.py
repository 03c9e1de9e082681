"""Stream-open writes grouped into one transaction: many map streams opening at once (a replica's nodes
moving to it, a restart, a tailnet coming up) each record the endpoints, hostname, home DERP region, disco
key, advertised routes and last seen they report. One commit each is one fsync each on SQLite
(``synchronous=FULL``) and one round trip each on PostgreSQL, taken on the event loop; grouped, the
reports that arrive within :data:`WINDOW` seconds share one transaction
(:meth:`tailpy.control.store.Store.update_nodes`).

A stream still starts only after its own report is committed: :meth:`StreamOpenWrites.report` returns once
the transaction holding it has. When the grouped transaction fails, each report is written on its own, so
one report the database refuses fails only its own stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tailpy.control.store.nodes import NodeReport
from tailpy.netmap import Node

WINDOW = 0.002
"""Seconds a report waits for others to share its transaction (the first of a group starts the window)."""


class StreamOpenWrites:
    """Groups :class:`NodeReport` writes to ``store`` (a :class:`tailpy.control.store.Store`, or any object
    with ``update_node``; one without ``update_nodes`` gets one call per report)."""

    def __init__(self, store: Any, window: float = WINDOW) -> None:
        self.store = store
        self.window = window
        self._pending: list[tuple[NodeReport, asyncio.Future[Node | None]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def report(self, report: NodeReport) -> Node | None:
        """Write ``report``; returns the node as committed (None: no live node of that machine key). Raises
        what the store raises for it (SQLAlchemyError when the database cannot take it)."""
        if getattr(self.store, "update_nodes", None) is None:
            return self._one(report)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Node | None] = loop.create_future()
        self._pending.append((report, fut))
        if self._timer is None:
            self._timer = loop.call_later(self.window, self.flush)
        return await fut

    def flush(self) -> None:
        """Commit every waiting report now (one transaction) and wake their callers."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            nodes: Sequence[Node | None] = self.store.update_nodes([r for r, _ in batch])
        except Exception:  # (one refused report must not fail the others: each on its own)
            for report, fut in batch:
                try:
                    node = self._one(report)
                except Exception as e:
                    if not fut.done():
                        fut.set_exception(e)
                else:
                    if not fut.done():
                        fut.set_result(node)
            return
        for (_, fut), node in zip(batch, nodes, strict=True):
            if not fut.done():  # (a caller cancelled meanwhile: its write is committed all the same)
                fut.set_result(node)

    def _one(self, report: NodeReport) -> Node | None:
        node: Node | None = self.store.update_node(
            report.machine_key,
            now=report.now,
            endpoints=report.endpoints,
            hostname=report.hostname,
            home_derp=report.home_derp,
            disco_key=report.disco_key,
            routable_ips=report.routable_ips,
        )
        return node
