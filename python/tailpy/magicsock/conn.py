"""magicsock.Conn: the one owner of a node's paths to its peers, around the Rust data plane's UDP socket.

After Tailscale's ``wgengine/magicsock/magicsock.go``: one :class:`Conn` per data plane, methods in
(:meth:`Conn.set_netmap`, :meth:`Conn.set_private_key`, :meth:`Conn.ping`, :meth:`Conn.netcheck`,
:meth:`Conn.status`), callbacks out (:class:`Options`: ``on_endpoints``, ``on_home_changed``,
``on_link_change``). Only ``Conn`` calls the device's path, endpoint, send and inject methods, drains its
queue and reads its per-peer counters. It is built from sans-IO parts and I/O shells:

* :class:`~tailpy.magicsock.disco.DiscoNode` (sans-IO): per-peer path machines
  (:mod:`tailpy.magicsock.paths`): a peer with a disco key starts on the relay (its home DERP region) from
  the first packet, goes direct on the first Pong, back to the relay when the direct path stops answering.
  While a peer has no relay region (no home DERP, no DERP map) its best-guess endpoint is used direct.
* :class:`~tailpy.magicsock.relay.Relay`: DERP connections, the home region (hysteresis), the relay region
  of each peer. Relay datagrams drained from the device go over DERP; WireGuard datagrams received over DERP
  are injected into the device, disco datagrams go to the DiscoNode.
* :class:`~tailpy.magicsock.endpoints.LocalEndpoints`: netcheck (STUN) over the data plane's own socket
  every 20-26 s (:data:`NETCHECK_INTERVAL`, and at once when the DERP map arrives or a link changes): region
  latencies go to the home choice, endpoints (local addresses at the listen port, then STUN-mapped ones) to
  the DiscoNode (sent in CallMeMaybe) and, when they changed, to ``on_endpoints``.
* :class:`~tailpy.magicsock.linkmon.LinkMonitor`: when a local address went away, DERP reconnects (its TCP
  was bound to it), direct paths are pinged at once and kept if they answer (else relayed within
  :data:`LINK_CHANGE_GRACE`), and ``on_link_change()`` lets the daemon reconnect to control.

**Both ways while unconfirmed** (as Tailscale sends over UDP and DERP while a direct path is not trusted):
relay datagrams that are WireGuard handshake messages also go straight to the peer's best-guess endpoint, so
a session forms at once where UDP works; every relay datagram does while the peer's region has no live
connection. The other way round, a peer sent direct to an endpoint no Pong confirmed (a peer without disco,
or one with no relay region yet) is set ``confirmed=False`` in the data plane, which then queues its
handshake messages for DERP as well.

**No handshake waits out REKEY_TIMEOUT** (WireGuard retries a lost initiation only after 5 s): whenever a
peer's path changes (relay to direct, a new direct endpoint, a Pong confirming one), its netmap entry changes
(disco key, home region, endpoints), or the DERP connection it is relayed through comes up, a handshake
still pending for it is sent again at once (``Device.retry_handshake``), and the packets the data plane
queued behind it follow. A handshake initiation that arrives over DERP from a node not yet in the netmap
(its netmap entry is on its way) is held for :data:`HELD_INITIATION_TTL` and handed to the data plane when
the peer appears.

**Peers without a disco key** (not a tailpy node of this version; every tailpy node sends one): no path
discovery. Such a peer is sent to directly at the endpoint ``choose_endpoint`` picks from its netmap
endpoints; relayed when it has none (back to direct when control brings one), and relayed for good once a
WireGuard datagram from it arrives over DERP while no handshake is fresh (:data:`HANDSHAKE_FRESH`): it cannot
reach us directly, so the answer goes back the way it can hear.

**The tick** (:mod:`tailpy.magicsock.tick`) follows aioquic's ``asyncio/protocol.py``: every input (a
drained datagram, a DERP packet, a netmap, a ping) is handed to the sans-IO parts at once and their actions
carried out, then one timer is re-armed with ``loop.call_at`` for the earliest deadline of all of them (disco
timers, the next look at the device's counters every :data:`ACTIVITY_INTERVAL`, the next DERP latency probe,
netcheck run and idle sweep). I/O that takes time (DERP connects, probes, netcheck) runs in tasks the tick
starts. ``clock`` (monotonic seconds: disco, DERP, home choice), ``wall_clock`` (unix seconds: the device's
handshake times) and ``rng`` are given once, in :class:`Options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from tailpy.endpoint import Endpoint
from tailpy.errors import DeviceError, EndpointError
from tailpy.ipnstate import DerpStatus, DiscoPeerStatus, PingReply, TraversalStatus
from tailpy.keys import DiscoPrivate, NodePrivate, NodePublic
from tailpy.magicsock.disco import Action, DiscoNode, PingResult, PingTimeout, SendDERP, SendUDP, SetPath
from tailpy.magicsock.endpoints import LocalEndpoints
from tailpy.magicsock.linkmon import LinkMonitor
from tailpy.magicsock.netcheck import Report, stun_targets
from tailpy.magicsock.paths import ViaDERP
from tailpy.magicsock.ping import ping_reply
from tailpy.magicsock.relay import Relay
from tailpy.magicsock.tick import Periodic, Tick
from tailpy.netmap import NetMap, Node
from tailpy.proto import disco as disco_proto
from tailpy.proto import stun as stun_proto

log = logging.getLogger("tailpy.magicsock")

DISCO_MAGIC = "TS💬".encode()  # b"TS\xf0\x9f\x92\xac", disco/disco.go Magic
NETCHECK_INTERVAL = (20.0, 26.0)
"""Seconds between netcheck runs (a uniform draw): re-STUN before the usual 30 s NAT UDP timeout."""
NETCHECK_TIMEOUT = 3.0
"""Seconds each STUN probe of a periodic netcheck may take."""
PROBE_INTERVAL = (20.0, 26.0)
"""Seconds between DERP latency probes (a uniform draw), skipped while netcheck's reports keep coming."""
ACTIVITY_INTERVAL = 0.25
"""Seconds between looks at the device's per-peer counters (``device.peers()``, once per look)."""
SWEEP_INTERVAL = 10.0
"""Seconds between closing idle DERP connections."""
LINK_CHANGE_GRACE = 1.5
"""Seconds a direct path stays trusted after a local address went away, unless it answers a Ping."""
HANDSHAKE_FRESH = 130.0
"""Seconds a WireGuard handshake counts as fresh (REKEY_AFTER 120 s + 2 x REKEY_TIMEOUT)."""
HELD_INITIATION_TTL = 5.0
"""Seconds a handshake initiation from a node not yet in the netmap is held (WireGuard's REKEY_TIMEOUT: its
sender retries after that anyway)."""
HELD_INITIATION_MAX = 64
"""Senders whose handshake initiation is held at most (the oldest is dropped first)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Path = Literal["direct", "relay"]


class ConnDevice(Protocol):
    """What :class:`Conn` needs of :class:`tailpy._native.Device`."""

    def set_path(self, public_key: bytes, path: Path, *, confirmed: bool = True) -> None: ...
    def retry_handshake(self, public_key: bytes) -> bool: ...
    def inject(self, public_key: bytes, datagram: bytes) -> None: ...
    def send_datagram(self, data: bytes, endpoint: str) -> None: ...  # endpoint: Endpoint's text
    def peers(self) -> Any: ...
    def set_peer(
        self,
        public_key: bytes,
        *,
        allowed_ips: list[str],
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: bytes | None = None,
    ) -> None: ...
    def fileno(self) -> int: ...
    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]: ...


class ConnStatus(NamedTuple):
    """:meth:`Conn.status`: the DERP side and the traversal side, as ``tailpy status --json`` shows them."""

    derp: DerpStatus
    traversal: TraversalStatus


def _first(endpoints: list[Endpoint]) -> Endpoint | None:
    return endpoints[0] if endpoints else None


def _addresses(node: Node) -> list[str]:
    return list(node.addresses)


@dataclass
class Options:
    """What :class:`Conn` is given once. ``local_endpoints()``: this host's endpoints at the listen port
    (no loopback, no tailpy interface); ``lan_networks()``: its interfaces' subnets;
    ``choose_endpoint(peer_endpoints)``: the endpoint to try first from a peer's netmap endpoints (same LAN
    first). Callbacks: ``on_endpoints(endpoints)`` when this node's endpoint list changed (tell control),
    ``on_home_changed(region_id)`` when the home DERP region moved, ``on_link_change()`` when a local
    address went away (reconnect to control). ``allowed_ips(peer)``: the peer's allowed IPs in the data plane,
    given again with every endpoint the Conn sets (``Device.set_peer`` replaces them; the daemon's
    :func:`tailpy.daemon.routing.peer_allowed_ips`; default: its addresses)."""

    disco_private: DiscoPrivate
    allowed_ips: Callable[[Node], list[str]] = _addresses
    on_endpoints: Callable[[list[Endpoint]], None] | None = None
    on_home_changed: Callable[[int], None] | None = None
    on_link_change: Callable[[], None] | None = None
    local_endpoints: Callable[[], list[Endpoint]] = list
    lan_networks: Callable[[], Iterable[Network]] = tuple
    choose_endpoint: Callable[[list[Endpoint]], Endpoint | None] = _first
    monitor_links: bool = True
    netcheck_interval: tuple[float, float] = NETCHECK_INTERVAL
    probe_interval: tuple[float, float] = PROBE_INTERVAL
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


class Conn:
    """One node's paths over ``device`` (the data plane) under node key ``private_key``. Call
    :meth:`start` inside the event loop, :meth:`close` at the end."""

    def __init__(self, device: ConnDevice, private_key: NodePrivate, options: Options) -> None:
        self.device = device
        self.options = options
        self.clock = options.clock
        self._wall = options.wall_clock
        self.relay = Relay(private_key, self._on_derp_packet, clock=self.clock)
        self.relay.derp.on_down = self._on_region_down
        self.relay.derp.on_up = self._on_region_up
        self.disco = DiscoNode(options.disco_private, private_key.public)
        self.local = LocalEndpoints(
            self._send_stun,
            self.disco,
            local_endpoints=options.local_endpoints,
            lan_networks=options.lan_networks,
            on_change=options.on_endpoints,
            clock=self.clock,
            wall_clock=self._wall,
        )
        self.linkmon = (
            LinkMonitor(lambda: tuple(sorted(options.local_endpoints())), self._on_link_change)
            if options.monitor_links
            else None
        )
        self.send_errors = 0  # datagrams the kernel refused (a firewall's EPERM, unreachable)
        self.ignored = 0  # datagrams from the socket that were neither disco nor STUN
        self.copied = 0  # relay datagrams also sent straight to a best-guess endpoint
        self.link_changes = 0
        self.handshakes_retried = 0  # pending handshakes sent again at once (a path changed)
        self._peers: dict[NodePublic, Node] = {}  # the netmap's peers as applied to the data plane
        self._guess: dict[NodePublic, Endpoint | None] = {}  # choose_endpoint of its netmap endpoints
        self._relayed: set[NodePublic] = set()  # disco says relay
        self._plain_path: dict[bytes, Path] = {}  # peers without disco: the path last set
        self._plain_relayed: set[bytes] = set()  # ... relayed for good (WireGuard came over DERP)
        self._device_path: dict[bytes, tuple[Path, bool, Endpoint | None]] = {}  # (path, confirmed, endpoint)
        # handshake initiations over DERP from keys not (yet) in the netmap: key -> (datagram, region, at)
        self._held: dict[bytes, tuple[bytes, int, float]] = {}
        self._deferred: set[bytes] | None = None  # retries held back while a netmap is applied
        self._stats: dict[bytes, Mapping[str, Any]] = {}  # device.peers() at the last look
        self._tx: dict[bytes, int] = {}
        self._pings: dict[int, asyncio.Future[PingResult | PingTimeout]] = {}
        self._external_latency_until = -math.inf  # netcheck's latencies stand until then (clock)
        # One timer (the tick) for disco's timers, the look at the counters and the periodic jobs.
        self._tick = Tick(self.clock, self._deadline, self._on_timer)
        self._look_at = math.inf
        rng = options.rng
        self._probe = Periodic(self._tick, "derp-probe", self._probe_regions, options.probe_interval, rng)
        self._netcheck = Periodic(
            self._tick, "netcheck", self._periodic_netcheck, options.netcheck_interval, rng
        )
        self._sweep = Periodic(
            self._tick, "derp-sweep", self._sweep_idle, (SWEEP_INTERVAL, SWEEP_INTERVAL), rng
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading the device's queue, the link monitor and the tick."""
        if self._tick.running:
            return
        asyncio.get_running_loop().add_reader(self.device.fileno(), self._on_readable)
        self.local.refresh()
        if self.linkmon is not None:
            self.linkmon.start()
        self._look_at = self.clock()
        for job in (self._probe, self._netcheck, self._sweep):
            job.schedule()
        self._tick.start()

    def stop(self) -> None:
        """Stop reading the device's queue and the tick, at once (then the device may be closed)."""
        if self._tick.running:
            with contextlib.suppress(ValueError, OSError, DeviceError):  # the device was closed first
                asyncio.get_running_loop().remove_reader(self.device.fileno())
        self._tick.stop()

    async def close(self) -> None:
        """Stop everything (:meth:`stop`, then tasks, the link monitor and DERP). The device itself stays
        open: its owner closes it."""
        self.stop()
        await self._tick.close()
        if self.linkmon is not None:
            await self.linkmon.close()
        await self.relay.close()
        for fut in self._pings.values():
            fut.cancel()

    # -- in: netmap, key ------------------------------------------------------------------------------

    def set_netmap(self, netmap: NetMap) -> None:
        """The netmap as applied to the data plane (no expired peers; the device already has each peer's key
        and allowed IPs): peers' home regions, endpoints and disco keys, and the DERP map (a netmap without
        one keeps the last). A new peer's endpoint is set in the data plane; a changed endpoint list is not
        re-sent for a peer with disco (disco chose its direct endpoint) nor when unchanged (that would undo
        roaming the data plane saw)."""
        now = self.clock()
        self._deferred = set()  # each peer's pending handshake goes again once, on its final path
        try:
            self._apply_netmap(netmap, now)
        finally:
            deferred, self._deferred = self._deferred, None
        for key in deferred:
            self._retry_handshake(key)
        self._tick.rearm()

    def _apply_netmap(self, netmap: NetMap, now: float) -> None:
        peers = list(netmap.peers.values())
        self.relay.set_peers(peers)
        if self.relay.set_derp_map(netmap.derp_map):
            self._tick.spawn(self.relay.apply_derp_map(), "derp-map")
            self._probe.soon()
            if stun_targets(self.relay.derp_map) and self.local.history.last is None:
                self._netcheck.soon()
        old, self._peers = self._peers, {p.node_key: p for p in peers}
        for gone in set(old) - set(self._peers):
            self._guess.pop(gone, None)
            self._relayed.discard(gone)
            for table in (self._plain_path, self._stats, self._tx, self._device_path):
                table.pop(gone.raw, None)
            self._plain_relayed.discard(gone.raw)
        for p in peers:
            prev = old.get(p.node_key)
            # choose_endpoint may look at the host's interfaces: once per change, not per packet
            if prev is None or prev.endpoints != p.endpoints or p.node_key not in self._guess:
                self._guess[p.node_key] = self.options.choose_endpoint(list(p.endpoints))
            if prev is None or (
                prev.endpoints != p.endpoints and (p.disco_key is None or not prev.endpoints)
            ):
                self._set_endpoint(p, self._guess[p.node_key])
        self._act(self.disco.on_netmap([p for p in peers if p.disco_key is not None], now))
        for key in list(self._relayed):  # on relay: its relay region may have become known (or gone)
            self._place_relay(key)
        for p in peers:
            self._place_plain(p)
        for p in peers:
            prev = old.get(p.node_key)
            if prev is None:
                self._release_held(p.node_key, now)
            elif prev != p:
                self._retry_handshake(p.node_key.raw)  # its home region, endpoints or disco key changed

    def set_private_key(self, private_key: NodePrivate) -> None:
        """Node key rotation: DERP connections are made again under the new key; disco Pings carry it."""
        self._tick.spawn(self.relay.derp.set_private_key(private_key), "derp-rekey")
        self.disco.set_node_key(private_key.public)

    # -- in: tailpy ping, netcheck ---------------------------------------------------------------------

    async def ping(self, peer: NodePublic, timeout: float = 5.0) -> PingReply:
        """One disco Ping to ``peer`` (through the trusted direct path, else via DERP and the best
        endpoint): the first Pong's path and round trip, or a timeout reply after ``timeout`` seconds (or the
        disco ping timeout, 5 s, if sooner). Raises KeyError for a peer that is not a disco peer."""
        request, actions = self.disco.ping(peer, self.clock())
        fut: asyncio.Future[PingResult | PingTimeout] = asyncio.get_running_loop().create_future()
        self._pings[request] = fut
        try:
            self._act(actions)
            self._tick.rearm()
            try:
                got = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                return PingReply(False, "", None, timeout=True)
        finally:
            self._pings.pop(request, None)
        if isinstance(got, PingTimeout):
            return PingReply(False, "", None, timeout=True)
        return ping_reply(got, self.relay.region_code)

    async def netcheck(self, *, timeout: float = NETCHECK_TIMEOUT) -> Report | None:
        """Run netcheck now over the data plane's socket (STUN servers of the DERP map, each probe given up
        after ``timeout`` seconds); None when there is no DERP map with STUN servers. The report's region
        latencies update the home-region choice; its endpoints, this node's."""
        report = await self.local.netcheck(self.relay.derp_map, timeout)
        if report is not None and report.region_latency:
            # While netcheck's reports keep coming (within the longest probe interval), no DERP probes.
            self._external_latency_until = self.clock() + self.options.probe_interval[1] + 5.0
            self._report(report.region_latency)
        return report

    @property
    def last_report(self) -> Report | None:
        return self.local.history.last

    @property
    def endpoints(self) -> list[Endpoint]:
        """This node's endpoints: local addresses at the listen port, then STUN-mapped ones."""
        return self.local.endpoints

    # -- status ----------------------------------------------------------------------------------------

    @property
    def home_region(self) -> int:
        """This node's home DERP region id (0: none yet)."""
        return self.relay.home

    def relay_region(self, key: bytes) -> int:
        """The DERP region peer ``key`` (node key bytes) is relayed through (0: none)."""
        return self.relay.relay_region(key)

    def region_code(self, region_id: int) -> str:
        """The DERP map's code for ``region_id`` ("" when unknown)."""
        return self.relay.region_code(region_id)

    def direct_confirmed(self, key: NodePublic, stats: Mapping[str, Any] | None = None) -> bool:
        """Whether peer ``key``'s direct path is one it answered on: for a peer with disco, a Pong confirmed
        the endpoint in use (:meth:`DiscoNode.path`); for one without, a WireGuard handshake completed within
        :data:`HANDSHAKE_FRESH` seconds while the data plane sends to it directly (``stats``: its
        ``device.peers()`` entry, else the last look's)."""
        if self.disco.peer_paths(key) is not None:
            return self.disco.path(key) is not None
        st = stats if stats is not None else self._stats.get(key.raw, {})
        hs = st.get("last_handshake")
        return st.get("path") == "direct" and hs is not None and self._wall() - hs < HANDSHAKE_FRESH

    def peer_stats(self) -> dict[bytes, Mapping[str, Any]]:
        """The data plane's per-peer counters now (``device.peers()`` by node key bytes)."""
        try:
            return {p["public_key"]: p for p in self.device.peers()}
        except DeviceError:
            return dict(self._stats)

    def status(self) -> ConnStatus:
        """The DERP side (:meth:`Relay.status`) and the traversal side: endpoints, disco counters, send
        errors, the last netcheck report and disco's view of each peer (:class:`tailpy.ipnstate.DerpStatus`,
        :class:`tailpy.ipnstate.TraversalStatus`)."""
        traversal = TraversalStatus(
            endpoints=tuple(self.endpoints),
            disco=self.disco.counters.as_dict(),
            send_errors=self.send_errors,
            copied=self.copied,
            link_changes=self.link_changes,
            ignored=self.ignored,
            stun_unmatched=self.local.stun.unmatched,
            netcheck=self.local.history.last,
            peers={
                s.node_key: DiscoPeerStatus(
                    path=s.path,
                    latency_ms=None if s.latency is None else round(s.latency * 1000, 2),
                    active=s.active,
                )
                for s in self.disco.status(self.clock())
            },
        )
        return ConnStatus(self.relay.status(), traversal)

    # -- the tick --------------------------------------------------------------------------------------

    def _deadline(self) -> float:
        nt = self.disco.next_timer()
        jobs = (self._probe.at, self._netcheck.at, self._sweep.at)
        return min(self._look_at, *jobs, math.inf if nt is None else nt)

    def _on_timer(self, now: float) -> None:
        if now >= self._look_at:
            self._look(now)
            self._look_at = now + ACTIVITY_INTERVAL
        self._act(self.disco.poll(now))
        for job in (self._probe, self._netcheck, self._sweep):
            job.run_if_due(now)

    def _look(self, now: float) -> None:
        """Read the device's per-peer counters (once): a peer whose ``tx_packets`` grew has traffic (disco
        starts discovery, keeps heartbeats); peers without disco are placed again."""
        try:
            peers = self.device.peers()
        except DeviceError:
            return
        stats: dict[bytes, Mapping[str, Any]] = {}
        for p in peers:
            key = p["public_key"]
            stats[key] = p
            tx = int(p.get("tx_packets", 0))
            if tx > self._tx.get(key, 0):
                self.disco.note_activity(NodePublic(key), now)
            self._tx[key] = tx
        self._stats = stats
        for node in self._peers.values():
            self._place_plain(node)

    async def _probe_regions(self) -> None:
        if self.relay.derp_map.regions and self.clock() >= self._external_latency_until:
            self._report(await self.relay.probe())

    async def _periodic_netcheck(self) -> None:
        report = await self.netcheck()
        if report is None:
            self.local.refresh()  # local addresses may have changed all the same
        else:
            latency = {r: round(d * 1000, 1) for r, d in sorted(report.region_latency.items())}
            log.debug("netcheck: udp=%s v4=%s varies=%s latency=%s", report.udp, report.global_v4,
                      report.mapping_varies_by_dest_ip, latency)  # fmt: skip

    async def _sweep_idle(self) -> None:
        await self.relay.sweep()

    def _report(self, latencies: Mapping[int, float]) -> None:
        home, moved = self.relay.report(latencies)
        if moved:
            self._tick.spawn(self.relay.derp.set_home(home), "derp-home")
            if self.options.on_home_changed is not None:
                self.options.on_home_changed(home)

    def _on_region_down(self, region_id: int) -> None:
        """The connection to ``region_id`` ended: when it is the home, measure every region now, over DERP
        even while netcheck's reports stand, so the home moves to a live region without waiting."""
        if region_id and region_id == self.relay.home:
            self._external_latency_until = -math.inf
            self._probe.soon()

    def _on_region_up(self, region_id: int) -> None:
        """A DERP connection came up: handshakes pending for peers relayed through it go again now (the
        first ones may have been dropped while it was connecting)."""
        for node_key in list(self._peers):
            key = node_key.raw
            relayed = self._device_path.get(key, ("direct", True, None))[0] == "relay"
            if relayed and self.relay.relay_region(key) == region_id:
                self._retry_handshake(key)

    # -- in: datagrams --------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """The data plane queued datagrams for Python: STUN and disco received on its UDP socket, and
        WireGuard datagrams for peers on the relay path."""
        try:
            datagrams, relay = self.device.drain()
        except DeviceError:
            return
        now = self.clock()
        for payload, text in datagrams:
            try:
                src = Endpoint.parse(text)
            except EndpointError:
                self.ignored += 1
                continue
            if disco_proto.looks_like_disco(payload):
                self._act(self.disco.feed(payload, src, now))
            elif stun_proto.is_stun(payload):
                if not self.local.feed_stun(payload, src):
                    self.ignored += 1
            else:
                self.ignored += 1
        if relay:
            self._copy_direct(relay)
            self.relay.relay(relay)
        self._tick.rearm()

    def _copy_direct(self, items: list[tuple[bytes, bytes]]) -> None:
        """Relay datagrams to disco peers also go to the best-guess endpoint: handshakes always, others
        while the peer's region has no live connection."""
        for key, datagram in items:
            node_key = NodePublic(key)
            if self.disco.peer_paths(node_key) is None:
                continue
            if self._device_path.get(key, ("relay", True, None))[0] == "direct":
                continue  # a handshake relayed while the direct path is unconfirmed: the data plane sent it
            if datagram[:1] not in (b"\x01", b"\x02"):
                region = self.relay.relay_region(key)
                if region and self.relay.connected(region):
                    continue
            to = self._best_guess(node_key)
            if to is None:
                continue
            try:
                self.device.send_datagram(datagram, str(to))
                self.copied += 1
            except (DeviceError, OSError):
                self.send_errors += 1

    def _on_derp_packet(self, src: NodePublic, payload: bytes, region: int) -> None:
        self.relay.derp_received += 1
        if payload.startswith(DISCO_MAGIC):
            self._act(self.disco.feed(payload, ViaDERP(region), self.clock(), derp_src=src))
            self._tick.rearm()
            return
        key = src.raw
        if not self.relay.knows(key):
            if payload[:1] == b"\x01" and len(payload) == 148:  # a handshake initiation (WireGuard §5.4.2)
                self._hold(key, payload, region)
            self.relay.derp_dropped += 1
            return
        self.relay.note_via(key, region)
        unconfirmed = self._device_path.get(key, ("relay", True, None))[:2] == ("direct", False)
        if src in self._relayed and unconfirmed:
            # disco relays it but no region was known (its home region is on its way): now one is; the
            # answer goes back the way it came, not to an endpoint nothing confirmed
            self._place_relay(src)
        node = self._peers.get(src)
        if node is not None and self._plain_path.get(key) == "direct":
            hs = self._stats.get(key, {}).get("last_handshake")
            if (hs is None or self._wall() - hs >= HANDSHAKE_FRESH) and self.relay.relay_region(key):
                self._plain_relayed.add(key)
                self._place_plain(node)
        try:
            self.device.inject(key, payload)
        except DeviceError:
            self.relay.derp_dropped += 1

    # -- out: the data plane --------------------------------------------------------------------------

    def _act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendUDP):
                try:
                    self.device.send_datagram(a.datagram, str(a.endpoint))
                except (DeviceError, OSError):
                    self.send_errors += 1  # e.g. EPERM from a firewall: the missing Pong tells disco
            elif isinstance(a, SendDERP):
                if not self.relay.send(a.node_key, a.datagram):
                    self.send_errors += 1
            elif isinstance(a, SetPath):
                self._set_path(a)
            else:
                fut = self._pings.get(a.request)
                if fut is not None and not fut.done():
                    fut.set_result(a)

    def _set_path(self, a: SetPath) -> None:
        node = self._peers.get(a.node_key)
        name = node.name if node is not None else a.node_key.short()
        if a.endpoint is None:
            self._relayed.add(a.node_key)
            self._place_relay(a.node_key)
            return
        self._relayed.discard(a.node_key)
        if self._go_direct(a.node_key, a.endpoint, confirmed=True):
            log.info("peer %s: direct %s", name, a.endpoint)

    def _set_endpoint(self, node: Node, endpoint: Endpoint | None) -> bool:
        """Point the data plane's endpoint for ``node`` at ``endpoint`` (None: leave it); False when the
        device does not have the peer."""
        if endpoint is None:
            return True
        try:
            self.device.set_peer(
                node.node_key.raw, allowed_ips=self.options.allowed_ips(node), endpoint=str(endpoint)
            )
        except DeviceError as e:
            log.debug("peer %s: cannot set endpoint %s: %s", node.name, endpoint, e)
            return False
        return True

    def _go_direct(self, key: NodePublic, endpoint: Endpoint, *, confirmed: bool) -> bool:
        node = self._peers.get(key)
        if node is None or not self._set_endpoint(node, endpoint):
            return False
        self.relay.override(key.raw, 0)
        return self._set_device_path(key.raw, "direct", confirmed=confirmed, endpoint=endpoint)

    def _set_device_path(
        self, key: bytes, path: Path, *, confirmed: bool = True, endpoint: Endpoint | None = None
    ) -> bool:
        """Set the data plane's path for ``key``; when it changed (or its direct endpoint did), a handshake
        still pending for the peer goes again at once on the new path."""
        try:
            self.device.set_path(key, path, confirmed=confirmed)
        except DeviceError:
            return False
        now = (path, confirmed, endpoint if path == "direct" else None)
        if self._device_path.get(key) != now:
            self._device_path[key] = now
            self._retry_handshake(key)
        return True

    def _retry_handshake(self, key: bytes) -> None:
        if self._deferred is not None:
            self._deferred.add(key)
            return
        try:
            if self.device.retry_handshake(key):
                self.handshakes_retried += 1
                log.debug("peer %s: pending handshake sent again (path %s)", NodePublic(key).short(),
                          self._device_path.get(key))  # fmt: skip
        except DeviceError:
            pass

    def _hold(self, key: bytes, initiation: bytes, region: int) -> None:
        """Keep the latest handshake initiation from ``key`` (not in the netmap yet) for a while."""
        self._held.pop(key, None)
        while len(self._held) >= HELD_INITIATION_MAX:
            del self._held[next(iter(self._held))]
        self._held[key] = (initiation, region, self.clock())

    def _release_held(self, node_key: NodePublic, now: float) -> None:
        """A peer joined the netmap: hand the data plane the initiation it sent before (if still fresh)."""
        for k in [k for k, (_, _, at) in self._held.items() if now - at >= HELD_INITIATION_TTL]:
            del self._held[k]
        held = self._held.pop(node_key.raw, None)
        if held is None:
            return
        initiation, region, _ = held
        self.relay.note_via(node_key.raw, region)
        try:
            self.device.inject(node_key.raw, initiation)
        except DeviceError:
            self.relay.derp_dropped += 1

    def _best_guess(self, key: NodePublic) -> Endpoint | None:
        """The peer's best-guess direct endpoint: disco's best candidate, else the one ``choose_endpoint``
        picked from its netmap endpoints, else the data plane's."""
        paths = self.disco.peer_paths(key)
        if paths is not None and paths.best is not None:
            return paths.best
        if (guess := self._guess.get(key)) is not None:
            return guess
        ep = self._stats.get(key.raw, {}).get("endpoint")
        try:
            return Endpoint.parse(str(ep)) if ep else None
        except EndpointError:
            return None

    def _place_relay(self, key: NodePublic) -> None:
        """Relay through the peer's region; with no region to relay through, direct to its best guess
        (until one is known)."""
        if self.relay.relay_region(key.raw):
            self.relay.override(key.raw, 0)
            self._set_device_path(key.raw, "relay")
        elif (guess := self._best_guess(key)) is not None:
            self._go_direct(key, guess, confirmed=False)

    def _place_plain(self, node: Node) -> None:
        """A peer without disco: direct to its endpoint; relayed when it has none or relayed for good."""
        key = node.node_key.raw
        if self.disco.peer_paths(node.node_key) is not None:
            return
        region = self.relay.relay_region(key)
        no_endpoint = self._best_guess(node.node_key) is None
        path: Path = "relay" if region and (no_endpoint or key in self._plain_relayed) else "direct"
        # direct to a netmap endpoint nothing confirmed: handshakes go over DERP too
        if self._plain_path.get(key) != path and self._set_device_path(key, path, confirmed=False):
            self._plain_path[key] = path
            via = f" via DERP region {region}" if path == "relay" else ""
            log.info("peer %s: path %s%s", node.name, path, via)

    def _send_stun(self, datagram: bytes, dest: Endpoint) -> None:
        self.device.send_datagram(datagram, str(dest))  # DeviceError: the runner counts a failed probe

    # -- links ----------------------------------------------------------------------------------------

    def _on_link_change(self, old: object, new: object) -> None:
        gone = set(old) - set(new) if isinstance(old, tuple) and isinstance(new, tuple) else {old}
        log.info("link change: local endpoints %s -> %s", old, new)
        self.link_changes += 1
        if gone:
            # TCP connections made from a vanished address are dead: DERP and control reconnect. Direct
            # paths are pinged at once and kept if they answer (a public peer follows our new source, as
            # WireGuard roams); one that does not falls back to the relay within LINK_CHANGE_GRACE.
            self._tick.spawn(self.relay.derp.set_private_key(self.relay.derp.private_key), "derp-rebind")
            now = self.clock()
            for key in list(self._peers):
                paths = self.disco.peer_paths(key)
                if paths is not None:
                    paths.revalidate(now, LINK_CHANGE_GRACE)
            self._act(self.disco.poll(now))
            if self.options.on_link_change is not None:
                self.options.on_link_change()
        self.local.refresh()
        self._netcheck.soon()
        self._tick.rearm()


__all__ = [
    "ACTIVITY_INTERVAL",
    "DISCO_MAGIC",
    "HANDSHAKE_FRESH",
    "HELD_INITIATION_TTL",
    "NETCHECK_INTERVAL",
    "Conn",
    "ConnDevice",
    "ConnStatus",
    "Options",
    "PingReply",
]
