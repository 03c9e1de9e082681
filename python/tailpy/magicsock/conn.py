"""MagicSock: the node's paths to its peers around the data plane: DERP home and relay, path policy.

The Rust data plane sends a peer's WireGuard datagrams straight out of its UDP socket when the peer's path is
"direct", and queues them for Python when it is "relay". :class:`MagicSock`

* measures latency to every DERP region, keeps a home region with hysteresis (:mod:`tailpy.magicsock.home`),
  connects there with NotePreferred and reports it (``on_home_changed``, which the daemon sends to control);
* sends relay datagrams drained from the device (:meth:`on_relay`) to the peer's home region over DERP,
  connecting on demand (:mod:`tailpy.magicsock.derp`; idle non-home connections close after 60 s);
* hands WireGuard datagrams received over DERP to the device (``device.inject``), and disco datagrams
  (payload starting with :data:`DISCO_MAGIC`) to ``on_disco(src_node_key, payload, via_region)``;
* runs the path policy every second (:class:`tailpy.magicsock.fallback.FallbackPolicy`) for the peers disco
  does not drive: with :class:`tailpy.magicsock.traversal.Traversal` running, peers with a disco key
  (:attr:`MagicSock.disco_peers`) get their paths only through :meth:`set_peer_path`, the others (older nodes
  without disco) keep the fallback policy; ``policy=None`` turns the policy off for all.

``now`` for decisions: the monotonic clock for DERP timing and home choice, the wall clock for WireGuard
handshake ages (the device reports unix times).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

from tailpy.asyncutil import wait_event
from tailpy.endpoint import Endpoint
from tailpy.errors import DeviceError
from tailpy.ipnstate import DerpStatus
from tailpy.keys import NodePrivate, NodePublic
from tailpy.magicsock.derp import DerpConnections
from tailpy.magicsock.fallback import FallbackPolicy
from tailpy.magicsock.home import HomeChooser
from tailpy.netmap import DerpMap, NetMap, Node

log = logging.getLogger("tailpy.magicsock")

DISCO_MAGIC = "TS💬".encode()  # b"TS\xf0\x9f\x92\xac", disco/disco.go Magic
PROBE_INTERVAL = (20.0, 26.0)  # seconds between latency reports (a uniform draw), as netcheck's re-STUN
POLICY_INTERVAL = 1.0  # seconds between looks at the device's peer counters
SWEEP_INTERVAL = 10.0  # seconds between closing idle DERP connections

DiscoHandler = Callable[[NodePublic, bytes, int | None], None]


class RelayDevice(Protocol):
    """What MagicSock needs of :class:`tailpy._native.Device`."""

    def set_path(self, public_key: bytes, path: Literal["direct", "relay"]) -> None: ...
    def inject(self, public_key: bytes, datagram: bytes) -> None: ...
    def peers(self) -> Any: ...
    def stats(self) -> Any: ...
    def set_peer(
        self,
        public_key: bytes,
        *,
        allowed_ips: list[str],
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: bytes | None = None,
    ) -> None: ...


class MagicSock:
    """One node's DERP side and path choice. ``device``: the data plane; ``private_key``: the node key (DERP
    identifies a node by it); ``on_home_changed(region_id)`` is called when the home region changes."""

    def __init__(
        self,
        device: RelayDevice,
        private_key: NodePrivate,
        *,
        on_home_changed: Callable[[int], None] | None = None,
        policy: FallbackPolicy | Literal["default"] | None = "default",
        chooser: HomeChooser | None = None,
        derp: DerpConnections | None = None,
        probe_interval: tuple[float, float] = PROBE_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        self.device = device
        self.on_home_changed = on_home_changed
        self.policy = FallbackPolicy() if policy == "default" else policy
        self.chooser = chooser or HomeChooser()
        self.derp = derp or DerpConnections(private_key, self._on_derp_packet)
        self.probe_interval = probe_interval
        self.on_disco: DiscoHandler = self._no_disco
        self._rng = rng or random.Random()
        self._derp_map = DerpMap()
        self._peers: dict[bytes, Node] = {}  # node key -> netmap record
        self._via_region: dict[bytes, int] = {}  # node key -> region a DERP packet from it last came through
        self._region_override: dict[bytes, int] = {}  # set_peer_path(region=...)
        self._stats: dict[bytes, Mapping[str, Any]] = {}  # device.peers() at the last policy round
        self._send_errors = -1  # the device's dropped_send_error at the last policy round
        self._map_changed = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.latency: dict[int, float] = {}  # last report, region id -> seconds
        self.relay_sent = 0
        self.relay_dropped = 0  # relay datagrams with no region to go to, or dropped by a full queue
        self.derp_received = 0
        self.derp_dropped = 0  # DERP packets from keys that are not peers
        self.disco_dropped = 0  # disco datagrams while no disco handler is set
        self.disco_peers: set[bytes] = set()
        """Node keys of the peers whose paths disco decides (the fallback policy leaves them alone)."""
        self._external_latency_until = 0.0  # monotonic time until which netcheck's latencies stand
        self.derp.on_down = self._on_region_down

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._probe_loop(), name="magicsock-probe"),
                loop.create_task(self._policy_loop(), name="magicsock-policy"),
            ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.derp.close()

    # -- inputs ----------------------------------------------------------------------------------------

    def set_netmap(self, netmap: NetMap) -> None:
        """Adopt the peers (their home regions and endpoints) and the DERP map of ``netmap`` (a netmap
        without one keeps the last)."""
        peers = {n.node_key.raw: n for n in netmap.peers.values()}
        for key in set(self._peers) - set(peers):
            if self.policy is not None:
                self.policy.forget(key)
            self._via_region.pop(key, None)
            self._region_override.pop(key, None)
        self._peers = peers
        if netmap.derp_map is not None and netmap.derp_map != self._derp_map:
            self._derp_map = netmap.derp_map
            self._probe_now.set()
        self._map_changed.set()

    def _on_region_down(self, region_id: int) -> None:
        """The connection to ``region_id`` ended (closed, or found dead by its liveness ping): when it is
        the home, measure every region now, over DERP even while netcheck's reports stand, so the home moves
        to a live region without waiting for the next round."""
        if region_id and region_id == self.chooser.home:
            self._external_latency_until = 0.0
            self._probe_now.set()

    def add_latency_report(self, latencies: Mapping[int, float]) -> int:
        """Take a latency report from elsewhere (netcheck's STUN round): region id -> seconds. Returns the
        home region after it (a change is applied and reported in the background). While such reports keep
        coming (within the longest probe interval), the DERP latency probes are skipped."""
        if latencies:
            self._external_latency_until = time.monotonic() + self.probe_interval[1] + 5.0
        return self._report(dict(latencies))

    @property
    def derp_map(self) -> DerpMap:
        """The DERP map of the last netmap that had one (empty before)."""
        return self._derp_map

    def set_private_key(self, private_key: NodePrivate) -> None:
        """Node key rotation: DERP connections are made again under the new key."""
        asyncio.get_running_loop().create_task(self.derp.set_private_key(private_key))

    def rebind(self) -> None:
        """The host's addresses changed: every DERP connection (TCP from a maybe vanished address) is made
        again, the home one at once."""
        task = asyncio.get_running_loop().create_task(self.derp.set_private_key(self.derp.private_key))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    @property
    def home_region(self) -> int:
        return self.chooser.home

    # -- relay -----------------------------------------------------------------------------------------

    def relay_region(self, key: bytes) -> int:
        """The DERP region to reach peer ``key`` through: set by :meth:`set_peer_path`, else its home region
        from the netmap, else the region it last sent us a packet through; 0 when there is none."""
        region = self._region_override.get(key)
        if region:
            return region
        node = self._peers.get(key)
        if node is not None and node.home_derp and node.home_derp in self._derp_map.regions:
            return node.home_derp
        return self._via_region.get(key, 0)

    def on_relay(self, items: list[tuple[bytes, bytes]]) -> None:
        """Relay datagrams drained from the device (``(node key, WireGuard datagram)``): sent over DERP."""
        for key, datagram in items:
            if self.send_via_derp(NodePublic(key), datagram):
                self.relay_sent += 1
            else:
                self.relay_dropped += 1

    def send_via_derp(self, peer: NodePublic, payload: bytes) -> bool:
        """Send a raw datagram (WireGuard, disco) to ``peer`` over DERP through :meth:`relay_region`,
        connecting on demand. False when there is no region to send through or the queue is full."""
        region = self.relay_region(peer.raw)
        return bool(region) and self.derp.send(region, peer, payload)

    def set_peer_path(
        self, peer: NodePublic, *, endpoint: Endpoint | None = None, region: int | None = None
    ) -> None:
        """Point ``peer``'s WireGuard datagrams at a direct ``endpoint`` or at
        DERP ``region`` (region id; 0 = the peer's home region). Exactly one of the two. Raises ValueError for
        neither/both, DeviceError for a peer the device does not have."""
        if (endpoint is None) == (region is None):
            raise ValueError("set_peer_path takes exactly one of endpoint or region")
        node = self._peers.get(peer.raw)
        if endpoint is not None:
            if node is None:
                raise DeviceError(f"peer {peer.short()} is not in the netmap")
            self.device.set_peer(peer.raw, allowed_ips=list(node.addresses), endpoint=str(endpoint))
            self.device.set_path(peer.raw, "direct")
            self._region_override.pop(peer.raw, None)
        else:
            if region:
                self._region_override[peer.raw] = region
            else:
                self._region_override.pop(peer.raw, None)
            self.device.set_path(peer.raw, "relay")

    def _on_derp_packet(self, src: NodePublic, payload: bytes, region: int) -> None:
        self.derp_received += 1
        if payload.startswith(DISCO_MAGIC):
            self.on_disco(src, payload, region)
            return
        key = src.raw
        node = self._peers.get(key)
        if node is None:
            self.derp_dropped += 1
            return
        self._via_region[key] = region
        if self.policy is not None and key not in self.disco_peers and self.policy.path(key) == "direct":
            st = self._stats.get(key, {})
            if (
                self.policy.received_via_derp(
                    time.time(),
                    key,
                    home_derp=self.relay_region(key),
                    last_handshake=st.get("last_handshake"),
                )
                == "relay"
            ):
                self._apply_path(key, "relay")
        try:
            self.device.inject(key, payload)
        except DeviceError:
            self.derp_dropped += 1

    def _no_disco(self, src: NodePublic, payload: bytes, via_region: int | None) -> None:
        self.disco_dropped += 1

    def _apply_path(self, key: bytes, path: Literal["direct", "relay"]) -> None:
        try:
            self.device.set_path(key, path)
        except DeviceError:
            return
        node = self._peers.get(key)
        log.info("peer %s: path %s%s", node.name if node else key.hex()[:8], path,
                 f' via DERP region {self.relay_region(key)}' if path == "relay" else "")  # fmt: skip

    # -- loops -----------------------------------------------------------------------------------------

    async def _policy_loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while True:
            if self._map_changed.is_set():
                self._map_changed.clear()
                if self._derp_map != self.derp.derp_map:
                    await self.derp.set_derp_map(self._derp_map)
                    self.chooser.keep_regions(self._derp_map.regions)
            self._policy_round()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                await self.derp.sweep()
            await wait_event(self._map_changed, POLICY_INTERVAL)

    def _policy_round(self) -> None:
        try:
            stats = {p["public_key"]: p for p in self.device.peers()}
            errors = int(self.device.stats().get("dropped_send_error", 0))
        except DeviceError:
            return
        self._stats = stats
        send_errors, self._send_errors = errors > self._send_errors >= 0, errors
        if self.policy is None:
            return
        now = time.time()
        for key in self._peers:
            st = stats.get(key)
            if st is None or key in self.disco_peers:
                continue
            path = self.policy.observe(
                now,
                key,
                has_endpoint=bool(st.get("endpoint")),
                home_derp=self.relay_region(key),
                tx_packets=int(st.get("tx_packets", 0)),
                rx_packets=int(st.get("rx_packets", 0)),
                last_handshake=st.get("last_handshake"),
                send_errors=send_errors,
            )
            if path != st.get("path"):
                self._apply_path(key, path)

    async def _probe_loop(self) -> None:
        while True:
            if self._derp_map.regions and time.monotonic() >= self._external_latency_until:
                await self.probe()
            lo, hi = self.probe_interval
            self._probe_now.clear()
            await wait_event(self._probe_now, lo + self._rng.random() * (hi - lo))

    async def probe(self) -> int:
        """Measure every region now (concurrently) and update the home region; returns it."""
        if self._derp_map != self.derp.derp_map:
            await self.derp.set_derp_map(self._derp_map)
            self.chooser.keep_regions(self._derp_map.regions)
        ids = sorted(self._derp_map.regions)
        results = await asyncio.gather(*(self.derp.measure(rid) for rid in ids))
        return self._report({rid: d for rid, d in zip(ids, results, strict=True) if d is not None})

    def _report(self, latencies: dict[int, float]) -> int:
        self.latency = latencies
        before = self.chooser.home
        home = self.chooser.add_report(
            time.monotonic(), latencies, home_traffic_at=self.derp.last_recv(before) if before else None
        )
        if home != before:
            log.info("home DERP region: %d -> %d (latencies %s)", before, home,
                     {r: round(d * 1000, 1) for r, d in sorted(latencies.items())})  # fmt: skip
            task = asyncio.get_running_loop().create_task(self.derp.set_home(home))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
            if self.on_home_changed is not None:
                self.on_home_changed(home)
        return home

    # -- status ----------------------------------------------------------------------------------------

    def region_code(self, region_id: int) -> str:
        region = self._derp_map.regions.get(region_id)
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
            disco_dropped=self.disco_dropped,
        )


__all__ = ["DISCO_MAGIC", "DiscoHandler", "MagicSock", "RelayDevice"]
