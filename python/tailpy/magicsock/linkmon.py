"""Link monitor: notices when this host's addresses change (a laptop moving between networks, a DHCP renewal),
as Tailscale's ``net/netmon`` does, so tailpyd re-STUNs, reconnects DERP and control, and re-probes its paths
at once instead of at the next 20-26 s round.

A rtnetlink socket (``AF_NETLINK``/``NETLINK_ROUTE``) joined to the link and IPv4/IPv6 address groups wakes
the monitor on any change in the host's network namespace; the messages are not parsed: after a short quiet
time (:data:`DEBOUNCE`, events come in bursts) ``snapshot()`` is called, and ``on_change(old, new)`` runs only
when its result differs (so tailpyd's own TUN address changes, filtered out of the snapshot, do not count).
Where netlink is unavailable (not Linux) the monitor polls every :data:`POLL_INTERVAL` seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Hashable

from tailpy.asyncutil import wait_event

log = logging.getLogger("tailpy.magicsock")

DEBOUNCE = 0.3
"""Seconds of quiet after a netlink event before the snapshot is taken."""
POLL_INTERVAL = 10.0
"""Seconds between snapshots when no netlink event came (and the only source without netlink)."""

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100


class LinkMonitor:
    """Calls ``on_change(old, new)`` when ``snapshot()`` (e.g. the sorted local endpoints) changes."""

    def __init__(
        self,
        snapshot: Callable[[], Hashable],
        on_change: Callable[[Hashable, Hashable], None],
        *,
        debounce: float = DEBOUNCE,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.snapshot = snapshot
        self.on_change = on_change
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.events = 0  # netlink wake-ups
        self.changes = 0
        self._last: Hashable = None
        self._sock: socket.socket | None = None
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = self.snapshot()
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
            )
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except (OSError, AttributeError) as e:  # no netlink: poll only
            log.info("link monitor: no rtnetlink (%s); polling every %.0f s", e, self.poll_interval)
        else:
            self._sock = sock
            loop.add_reader(sock.fileno(), self._on_readable)
        self._task = loop.create_task(self._run(), name="link-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        while True:  # drain: only the wake-up matters
            try:
                if not self._sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: events were lost, which is still a wake-up
                break
        self.events += 1
        self._event.set()

    async def _run(self) -> None:
        while True:
            await wait_event(self._event, self.poll_interval)
            if self._event.is_set():
                # let a burst settle (several addresses, a link flap) before looking
                while self._event.is_set():
                    self._event.clear()
                    await asyncio.sleep(self.debounce)
            try:
                now = self.snapshot()
            except Exception:  # the snapshot shells out; keep monitoring whatever one attempt did
                log.exception("link monitor: snapshot failed")
                continue
            if now != self._last:
                old, self._last = self._last, now
                self.changes += 1
                self.on_change(old, now)


__all__ = ["DEBOUNCE", "POLL_INTERVAL", "LinkMonitor"]
