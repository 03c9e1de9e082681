"""This node's endpoints, as :class:`tailpy.magicsock.conn.Conn` finds them over the data plane's socket.

The list is the host's local addresses at the listen port (``local_endpoints()``: no loopback, no tailpy
interface, no tailnet ranges), then the STUN-mapped ones of the last netcheck report (Tailscale's
``magicsock.Conn.determineEndpoints``). STUN runs over the data plane's own UDP socket (``send``), so the
mapped address is the one peers must use; answers come back through :meth:`LocalEndpoints.feed_stun`. The
list goes to disco (sent in CallMeMaybe; refreshed before it is 27 s old, as Tailscale re-STUNs before sending
one) and, when it changed, to ``on_change`` (the daemon tells control). A mapped endpoint not yet known is
published as soon as its STUN answer arrives, before the run ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable

from tailpy.endpoint import Endpoint
from tailpy.errors import TailpyError
from tailpy.magicsock.disco import DiscoNode
from tailpy.magicsock.netcheck import Netcheck, Report, run, stun_targets
from tailpy.magicsock.stun import SendFn, StunRunner
from tailpy.netmap import DerpMap

log = logging.getLogger("tailpy.magicsock")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class LocalEndpoints:
    """The endpoint list and netcheck history of one node. ``clock``: monotonic seconds (STUN timers);
    ``wall_clock``: unix seconds (report times)."""

    def __init__(
        self,
        send: SendFn,
        disco: DiscoNode,
        *,
        local_endpoints: Callable[[], list[Endpoint]],
        lan_networks: Callable[[], Iterable[Network]],
        on_change: Callable[[list[Endpoint]], None] | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.disco = disco
        self.local_endpoints = local_endpoints
        self.lan_networks = lan_networks
        self.on_change = on_change
        self.wall_clock = wall_clock
        self.stun = StunRunner(send, clock=clock)
        self.history = Netcheck()
        self.endpoints: list[Endpoint] = []
        self._lock = asyncio.Lock()

    def feed_stun(self, payload: bytes, src: Endpoint) -> bool:
        """A STUN datagram from the socket; False when it answered nothing in flight."""
        return self.stun.feed(payload, src)

    async def netcheck(self, derp_map: DerpMap, timeout: float) -> Report | None:
        """One netcheck run over the socket (the STUN servers of ``derp_map``, each probe given up after
        ``timeout`` seconds; one run at a time), then the list refreshed. None when the map has no STUN
        servers."""
        targets = stun_targets(derp_map)
        if not targets:
            return None
        async with self._lock:
            report = await run(
                self.stun,
                targets,
                self.history,
                timeout=timeout,
                clock=self.wall_clock,
                on_mapped=self._on_mapped,
            )
        self.refresh()
        return report

    def refresh(self) -> None:
        """Make the list again from the local addresses and the last report."""
        try:
            eps = list(self.local_endpoints())
        except TailpyError as e:
            log.warning("local endpoints: %s", e)
            eps = list(self.endpoints)
        report = self.history.last
        if report is not None:
            eps += [e for e in report.endpoints() if e not in eps]
        self.disco.set_lan_networks(self.lan_networks())
        self.disco.set_endpoints(eps)
        if eps != self.endpoints:
            self.endpoints = eps
            log.info("endpoints: %s", ", ".join(map(str, eps)) or "none")
            if self.on_change is not None:
                self.on_change(list(eps))

    def _on_mapped(self, endpoint: Endpoint) -> None:
        """A STUN answer of a run in progress: a mapped endpoint not yet known goes out at once (peers behind
        NAT need it to go direct); the end of the run then sets the list (:meth:`refresh`)."""
        if endpoint in self.endpoints:
            return
        eps = [*self.endpoints, endpoint]
        self.disco.set_endpoints(eps)
        self.endpoints = eps
        log.info("endpoints: %s (STUN)", ", ".join(map(str, eps)))
        if self.on_change is not None:
            self.on_change(list(eps))


__all__ = ["LocalEndpoints"]
