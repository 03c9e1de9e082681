"""The DERP side of :class:`tailpy.magicsock.conn.Conn`: connections by region, the home region, and where
to relay each peer. No tasks and no data-plane calls of its own: ``Conn`` drives it from its tick.

* **Connections** (:class:`~tailpy.magicsock.derp.DerpConnections`): one to the home region (NotePreferred),
  others to peers' regions on demand, closed after 60 s idle (:meth:`Relay.sweep`).
* **Home region** (:class:`~tailpy.magicsock.home.HomeChooser`, hysteresis): from latency reports, either
  this module's DERP probes (:meth:`Relay.probe`) or netcheck's STUN round; :meth:`Relay.report` returns
  whether the home moved (``Conn`` then connects there and calls ``on_home_changed``).
* **Relay region of a peer** (:meth:`Relay.relay_region`): the region disco asked for, else the peer's home
  region from the netmap, else the region a DERP packet from it last came through.
* **"Not here"**: when a region answers a packet with PeerGone reason ``NotHere`` (``derp/derp.go``
  ``PeerGoneReasonNotHere``: the peer is not connected there), nothing more is sent to that peer through
  that region until its netmap entry changes (home region, endpoints or node key) or a packet from it
  arrives through that region; logged once per peer and region, counted in :attr:`Relay.not_here`.

Times are seconds on the clock ``Conn`` passes (monotonic).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

from tailpy.endpoint import Endpoint
from tailpy.ipnstate import DerpStatus
from tailpy.keys import NodePrivate, NodePublic
from tailpy.magicsock.derp import DerpConnections, PacketHandler
from tailpy.magicsock.home import HomeChooser
from tailpy.netmap import DerpMap, Node
from tailpy.proto import derp as proto

log = logging.getLogger("tailpy.magicsock")


class Relay:
    """DERP connections and home choice for one node key. ``on_packet(src, payload, region_id)`` gets every
    packet received over DERP; ``clock()`` is monotonic seconds."""

    def __init__(
        self,
        private_key: NodePrivate,
        on_packet: PacketHandler,
        *,
        clock: Callable[[], float],
        chooser: HomeChooser | None = None,
        derp: DerpConnections | None = None,
    ) -> None:
        self.clock = clock
        self.chooser = chooser or HomeChooser()
        self.derp = derp or DerpConnections(private_key, on_packet, clock=clock)
        self.derp_map = DerpMap()
        """The DERP map of the last netmap that had one (empty before)."""
        self.latency: dict[int, float] = {}  # last report, region id -> seconds
        self._home_derp: dict[bytes, int] = {}  # node key -> home region from the netmap
        self._via_region: dict[bytes, int] = {}  # node key -> region a DERP packet from it last came through
        self._override: dict[bytes, int] = {}  # node key -> region disco chose
        self._entries: dict[bytes, tuple[int, tuple[Endpoint, ...]]] = {}  # node key -> (home, endpoints)
        self._not_here: dict[bytes, int] = {}  # node key -> region that answered PeerGone "not here"
        self.derp.on_peer_gone = self._on_peer_gone
        self.not_here = 0
        """PeerGone "not here" answers received (a peer not connected to the region it was sent through)."""
        self.not_here_dropped = 0
        """Datagrams not sent to a peer through a region that said it is not there."""
        self.relay_sent = 0
        self.relay_dropped = 0  # relay datagrams with no region to go to, or dropped by a full queue
        self.derp_received = 0
        self.derp_dropped = 0  # DERP packets from keys that are not peers, or the device refused

    # -- configuration ---------------------------------------------------------------------------------

    def set_peers(self, peers: Iterable[Node]) -> None:
        """The netmap's peers: their home regions; what is known of peers that left is forgotten."""
        peers = list(peers)
        homes = {n.node_key.raw: n.home_derp for n in peers}
        for key in set(self._home_derp) - set(homes):
            self._via_region.pop(key, None)
            self._override.pop(key, None)
            self._entries.pop(key, None)
            self._not_here.pop(key, None)
        self._home_derp = homes
        for n in peers:
            key, entry = n.node_key.raw, (n.home_derp, tuple(n.endpoints))
            if self._entries.get(key) != entry:
                self._entries[key] = entry
                if self._not_here.pop(key, None) is not None:
                    log.info("peer %s: netmap entry changed; sending through DERP to it again", n.name)

    def set_derp_map(self, derp_map: DerpMap | None) -> bool:
        """Adopt the netmap's DERP map (None keeps the last); True when it changed (then call
        :meth:`apply_derp_map`)."""
        if derp_map is None or derp_map == self.derp_map:
            return False
        self.derp_map = derp_map
        return True

    async def apply_derp_map(self) -> None:
        """Bring the connections in line with :attr:`derp_map` (closing regions that left or changed)."""
        if self.derp_map != self.derp.derp_map:
            await self.derp.set_derp_map(self.derp_map)
            self.chooser.keep_regions(self.derp_map.regions)

    def override(self, key: bytes, region: int) -> None:
        """Relay peer ``key`` through ``region`` (0: back to its home region)."""
        if region:
            self._override[key] = region
        else:
            self._override.pop(key, None)

    def note_via(self, key: bytes, region: int) -> None:
        self._via_region[key] = region
        if self._not_here.get(key) == region:  # it is there after all (it connected since)
            del self._not_here[key]

    def _on_peer_gone(self, key: NodePublic, region: int, reason: int) -> None:
        if reason != proto.PeerGoneReason.NOT_HERE or key.raw not in self._home_derp:
            return
        self.not_here += 1
        if self._not_here.get(key.raw) != region:
            self._not_here[key.raw] = region
            log.warning(
                "peer %s is not connected to DERP region %d (PeerGone: not here): not sending to it there "
                "until its netmap entry changes",
                key.short(),
                region,
            )

    def not_here_region(self, key: bytes) -> int:
        """The region that said peer ``key`` is not connected there (0: none)."""
        return self._not_here.get(key, 0)

    def knows(self, key: bytes) -> bool:
        return key in self._home_derp

    # -- relaying --------------------------------------------------------------------------------------

    def relay_region(self, key: bytes) -> int:
        """The DERP region to reach peer ``key`` through: set by :meth:`override`, else its home region
        from the netmap, else the region it last sent us a packet through; 0 when there is none."""
        region = self._override.get(key)
        if region:
            return region
        home = self._home_derp.get(key, 0)
        if home and home in self.derp_map.regions:
            return home
        return self._via_region.get(key, 0)

    def send(self, peer: NodePublic, payload: bytes) -> bool:
        """Queue a raw datagram (WireGuard, disco) to ``peer`` through :meth:`relay_region`, connecting on
        demand. False when there is no region to send through or its queue is full."""
        region = self.relay_region(peer.raw)
        if region and self._not_here.get(peer.raw) == region:
            self.not_here_dropped += 1
            return False
        return bool(region) and self.derp.send(region, peer, payload)

    def relay(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        """WireGuard datagrams the data plane queued for the relay, ``(node key, datagram)``: sent and
        counted."""
        for key, datagram in items:
            if self.send(NodePublic(key), datagram):
                self.relay_sent += 1
            else:
                self.relay_dropped += 1

    def connected(self, region_id: int) -> bool:
        return self.derp.connected(region_id)

    # -- home region -----------------------------------------------------------------------------------

    @property
    def home(self) -> int:
        return self.chooser.home

    async def probe(self) -> dict[int, float]:
        """Latency to every region of the DERP map, measured concurrently: region id -> seconds (regions
        that did not answer are left out)."""
        await self.apply_derp_map()
        ids = sorted(self.derp_map.regions)
        results = await asyncio.gather(*(self.derp.measure(rid) for rid in ids))
        return {rid: d for rid, d in zip(ids, results, strict=True) if d is not None}

    def report(self, latencies: Mapping[int, float]) -> tuple[int, bool]:
        """A latency report (region id -> seconds): ``(home region after it, whether it moved)``."""
        self.latency = dict(latencies)
        before = self.chooser.home
        home = self.chooser.add_report(
            self.clock(), self.latency, home_traffic_at=self.derp.last_recv(before) if before else None
        )
        if home != before:
            log.info("home DERP region: %d -> %d (latencies %s)", before, home,
                     {r: round(d * 1000, 1) for r, d in sorted(self.latency.items())})  # fmt: skip
        return home, home != before

    async def sweep(self) -> list[int]:
        return await self.derp.sweep()

    async def close(self) -> None:
        await self.derp.close()

    # -- status ----------------------------------------------------------------------------------------

    def region_code(self, region_id: int) -> str:
        region = self.derp_map.regions.get(region_id)
        return region.region_code if region is not None else ""

    def status(self) -> DerpStatus:
        """The home region, the last latency report (milliseconds), the open connections
        (:meth:`DerpConnections.status`) and the counters (:class:`tailpy.ipnstate.DerpStatus`)."""
        return DerpStatus(
            home_derp=self.chooser.home,
            home_derp_code=self.region_code(self.chooser.home),
            latency_ms={r: round(d * 1000, 2) for r, d in sorted(self.latency.items())},
            connections=tuple(self.derp.status()),
            relay_sent=self.relay_sent,
            relay_dropped=self.relay_dropped,
            derp_received=self.derp_received,
            derp_dropped=self.derp_dropped,
            disco_dropped=0,  # every DERP disco datagram goes to disco now; kept for the JSON's shape
            not_here=self.not_here,
            not_here_peers=tuple(NodePublic(k).text() for k in sorted(self._not_here)),
        )


__all__ = ["Relay"]
