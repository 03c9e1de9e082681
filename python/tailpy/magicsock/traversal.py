"""NAT traversal in tailpyd: disco, STUN, netcheck and endpoints over the data plane's one UDP socket.

:class:`Traversal` is the I/O shell around the sans-IO :class:`~tailpy.magicsock.disco.DiscoNode` (design
note there) and :mod:`tailpy.magicsock.netcheck`, beside :class:`~tailpy.magicsock.conn.MagicSock`:

* **Inputs**: datagrams the device queued for Python (:meth:`Traversal.on_datagrams`, from
  ``device.drain()``): disco goes to the DiscoNode, STUN to the :class:`~tailpy.magicsock.stun.StunRunner`,
  anything else is counted; disco datagrams that came over DERP (:meth:`Traversal.on_derp_disco`, set as
  ``MagicSock.on_disco``); the netmap (:meth:`Traversal.set_netmap`).
* **Paths**: a peer with a disco key starts on the relay (its home DERP region) from the first packet and
  goes direct on the first Pong, back to relay when the direct path stops answering (timing in
  :mod:`tailpy.magicsock.paths`); SetPath actions become :meth:`MagicSock.set_peer_path` calls. While a peer
  has no relay region (no home DERP yet, no DERP map) the best guess, its netmap endpoint, is used direct.
  A peer without a disco key (an older node) is left to MagicSock's fallback policy.
* **Both ways while unconfirmed** (as Tailscale sends over UDP and DERP while a direct path is not trusted):
  relay datagrams (:meth:`Traversal.on_relay`, before MagicSock sends them over DERP) that are WireGuard
  handshake messages also go straight to the peer's best-guess endpoint (its best disco candidate, else the
  endpoint the daemon chose from the netmap), so a session forms at once where UDP works; every relay
  datagram does while the peer's DERP region has no live connection (control and its relay down).
* **Activity**: every :data:`ACTIVITY_INTERVAL` the device's per-peer ``tx_packets`` are read; a peer whose
  count grew has traffic (:meth:`DiscoNode.note_activity`), which starts discovery and keeps heartbeats.
* **netcheck** every 20-26 s (:data:`NETCHECK_INTERVAL`, and at once when the DERP map arrives) over the
  data plane's socket, so the mapped address is the one peers must use: region latencies go to MagicSock's
  home-region choice; the endpoints (local interface addresses at the listen port, then the STUN-mapped
  ones) go to the DiscoNode (sent in CallMeMaybe) and, when they changed, to ``on_endpoints`` (the daemon
  tells control).
* **tailpy ping**: :meth:`Traversal.ping` sends one disco Ping and waits for its Pong.
* **Link changes** (:mod:`tailpy.magicsock.linkmon`): when the host's local endpoints change, the endpoints
  are refreshed and netcheck runs at once; when an address went away, DERP reconnects (its TCP was bound to
  it) and ``on_link_change()`` lets the daemon reconnect to control; direct paths are pinged at once and
  kept if they answer, else relayed within :data:`LINK_CHANGE_GRACE`.

Clock: ``time.monotonic()`` for disco timers; netcheck reports carry unix times.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from tailpy.asyncutil import wait_event
from tailpy.endpoint import Endpoint
from tailpy.errors import DeviceError, EndpointError, TailpyError
from tailpy.ipnstate import DiscoPeerStatus, PingReply, TraversalStatus
from tailpy.keys import DiscoPrivate, NodePublic
from tailpy.magicsock.conn import MagicSock
from tailpy.magicsock.disco import (
    Action,
    DiscoNode,
    PingResult,
    PingTimeout,
    SendDERP,
    SendUDP,
    SetPath,
    ViaDERP,
)
from tailpy.magicsock.linkmon import LinkMonitor
from tailpy.magicsock.netcheck import Netcheck, Report, run, stun_targets
from tailpy.magicsock.stun import StunRunner
from tailpy.netmap import NetMap, Node
from tailpy.proto import disco as disco_proto
from tailpy.proto import stun as stun_proto

log = logging.getLogger("tailpy.magicsock")

NETCHECK_INTERVAL = (20.0, 26.0)
"""Seconds between netcheck runs (a uniform draw): re-STUN before the usual 30 s NAT UDP timeout."""
NETCHECK_TIMEOUT = 3.0
"""Seconds each STUN probe of a periodic netcheck may take."""
ACTIVITY_INTERVAL = 0.25
"""Seconds between looks at the device's per-peer tx counters."""
LINK_CHANGE_GRACE = 1.5
"""Seconds a direct path stays trusted after a local address went away, unless it answers a Ping."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TraversalDevice(Protocol):
    """What :class:`Traversal` needs of :class:`tailpy._native.Device`."""

    def send_datagram(self, data: bytes, endpoint: str) -> None: ...
    def peers(self) -> Any: ...


def ping_reply(got: PingResult, region_code: Callable[[int], str]) -> PingReply:
    """The ``tailpy ping`` answer for disco's ``got``; ``region_code(region id)`` names a DERP region ("" if
    unknown). A Pong via DERP carries the DERP placeholder ``127.3.3.40:<region>`` as our source: the
    answer's ``peer_saw`` is None there, not that address."""
    if isinstance(got.via, ViaDERP):
        region = got.via.region
        code = region_code(region) if isinstance(region, int) else ""
        return PingReply(False, f"DERP({code or region})", got.rtt, None)
    return PingReply(got.direct, str(got.via), got.rtt, got.peer_saw)


class Traversal:
    """Disco, STUN and netcheck for one node's data plane. ``local_endpoints()`` gives this host's
    endpoints at the listen port (no loopback, no tailpy interface, no tailnet ranges);
    ``lan_networks()`` its interfaces' subnets; ``on_endpoints(endpoints)`` is called when the endpoint list
    changed (the daemon sends it to control); ``choose_endpoint(peer_endpoints)`` picks the endpoint to try
    first from a peer's netmap endpoints (same LAN first)."""

    def __init__(
        self,
        device: TraversalDevice,
        magicsock: MagicSock,
        disco_private: DiscoPrivate,
        node_key: NodePublic,
        *,
        local_endpoints: Callable[[], list[Endpoint]] = list,
        lan_networks: Callable[[], Iterable[Network]] = tuple,
        on_endpoints: Callable[[list[Endpoint]], None] | None = None,
        choose_endpoint: Callable[[list[Endpoint]], Endpoint | None] = lambda eps: eps[0] if eps else None,
        on_link_change: Callable[[], None] | None = None,
        monitor_links: bool = True,
        netcheck_interval: tuple[float, float] = NETCHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.device = device
        self.magicsock = magicsock
        self.clock = clock
        self.local_endpoints = local_endpoints
        self.lan_networks = lan_networks
        self.on_endpoints = on_endpoints
        self.choose_endpoint = choose_endpoint
        self.on_link_change = on_link_change
        self.link_changes = 0
        self.linkmon = (
            LinkMonitor(lambda: tuple(sorted(self.local_endpoints())), self._on_link_change)
            if monitor_links
            else None
        )
        self.netcheck_interval = netcheck_interval
        self.disco = DiscoNode(disco_private, node_key)
        self.stun = StunRunner(self._send_stun)
        self.history = Netcheck()
        self.endpoints: list[Endpoint] = []
        self.send_errors = 0  # datagrams the kernel refused (a firewall's EPERM, unreachable)
        self.ignored = 0  # datagrams from the socket that were neither disco nor STUN
        self._rng = rng or random.Random()
        self._peers: dict[NodePublic, Node] = {}  # disco peers of the last netmap
        self._relayed: set[NodePublic] = set()  # disco says relay (None path)
        self._tx: dict[bytes, int] = {}
        self._device_endpoint: dict[bytes, Endpoint] = {}  # the data plane's endpoint per peer (last look)
        self._netmap_guess: dict[NodePublic, Endpoint | None] = {}  # choose_endpoint of its netmap endpoints
        self.copied = 0  # relay datagrams also sent straight to a best-guess endpoint
        self._pings: dict[int, asyncio.Future[PingResult | PingTimeout]] = {}
        self._wake = asyncio.Event()
        self._netcheck_now = asyncio.Event()
        self._netcheck_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        magicsock.on_disco = self.on_derp_disco

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            self._refresh_endpoints()
            if self.linkmon is not None:
                self.linkmon.start()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._timer_loop(), name="disco-timers"),
                loop.create_task(self._netcheck_loop(), name="netcheck"),
            ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.linkmon is not None:
            await self.linkmon.close()
        for fut in self._pings.values():
            fut.cancel()

    # -- inputs ----------------------------------------------------------------------------------------

    def on_datagrams(self, datagrams: list[tuple[bytes, str]]) -> None:
        """Datagrams from the data plane's UDP socket (``device.drain()``'s first list: payload, source
        "ip:port" text): disco to the DiscoNode, STUN to the runner, others counted."""
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
                if not self.stun.feed(payload, src):
                    self.ignored += 1
            else:
                self.ignored += 1

    def on_relay(self, items: list[tuple[bytes, bytes]]) -> None:
        """Relay datagrams drained from the device (``(node key, WireGuard datagram)``), before they go over
        DERP: copies go straight to the peer's best-guess endpoint as the module docstring says."""
        for key, datagram in items:
            node_key = NodePublic(key)
            if node_key not in self._peers:
                continue
            handshake = datagram[:1] in (b"\x01", b"\x02")
            if not handshake:
                region = self.magicsock.relay_region(key)
                if region and self.magicsock.derp.connected(region):
                    continue
            to = self._guess(node_key)
            if to is None:
                continue
            try:
                self.device.send_datagram(datagram, str(to))
                self.copied += 1
            except (DeviceError, OSError):
                self.send_errors += 1

    def on_derp_disco(self, src: NodePublic, payload: bytes, region: int | None) -> None:
        """A disco datagram that came over DERP from node ``src`` through ``region`` (MagicSock's hook)."""
        self._act(self.disco.feed(payload, ViaDERP(region), self.clock(), derp_src=src))

    def set_netmap(self, netmap: NetMap) -> None:
        """The netmap as applied to the data plane (no expired peers). Peers with a disco key are driven by
        disco (MagicSock's fallback policy leaves them alone); the others are not."""
        peers = [p for p in netmap.peers.values() if p.disco_key is not None]
        old = self._peers
        self._peers = {p.node_key: p for p in peers}
        for p in peers:  # choose_endpoint may look at the host's interfaces: once per change, not per packet
            prev = old.get(p.node_key)
            if prev is None or prev.endpoints != p.endpoints or p.node_key not in self._netmap_guess:
                self._netmap_guess[p.node_key] = self.choose_endpoint(list(p.endpoints))
        for gone in set(self._netmap_guess) - set(self._peers):
            del self._netmap_guess[gone]
        self.magicsock.disco_peers = {p.node_key.raw for p in peers}
        self._relayed &= set(self._peers)
        if netmap.derp_map is not None and stun_targets(netmap.derp_map) and self.history.last is None:
            self._netcheck_now.set()
        self._act(self.disco.on_netmap(peers, self.clock()))
        # A peer on relay whose relay region became known (or went away) is placed again.
        for key in self._relayed:
            self._place_relay(key)

    def set_node_key(self, node_key: NodePublic) -> None:
        """This node's node key after a rotation (it goes in every Ping)."""
        self.disco.set_node_key(node_key)

    # -- tailpy ping -----------------------------------------------------------------------------------

    async def ping(self, peer: NodePublic, timeout: float = 5.0) -> PingReply:
        """One disco Ping to ``peer`` (through the trusted direct path, else via DERP and the best
        endpoint): the first Pong's path and round trip, or a timeout reply after ``timeout`` seconds (or the
        disco ping timeout, 5 s, if sooner). Raises KeyError for a peer that is not a disco peer."""
        request, actions = self.disco.ping(peer, self.clock())
        fut: asyncio.Future[PingResult | PingTimeout] = asyncio.get_running_loop().create_future()
        self._pings[request] = fut
        try:
            self._act(actions)
            try:
                got = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                return PingReply(False, "", None, timeout=True)
        finally:
            self._pings.pop(request, None)
        if isinstance(got, PingTimeout):
            return PingReply(False, "", None, timeout=True)
        return ping_reply(got, self.magicsock.region_code)

    # -- netcheck --------------------------------------------------------------------------------------

    async def netcheck(self, *, timeout: float = NETCHECK_TIMEOUT) -> Report | None:
        """Run netcheck now over the data plane's socket (STUN servers of the DERP map); None when there is
        no DERP map with STUN servers. The report updates the home-region choice and the endpoints."""
        targets = stun_targets(self.magicsock.derp_map)
        if not targets:
            return None
        async with self._netcheck_lock:
            report = await run(self.stun, targets, self.history, timeout=timeout, on_mapped=self._mapped_now)
        if report.region_latency:
            self.magicsock.add_latency_report(report.region_latency)
        self._refresh_endpoints()
        return report

    @property
    def last_report(self) -> Report | None:
        return self.history.last

    # -- status ----------------------------------------------------------------------------------------

    def status(self) -> TraversalStatus:
        """Endpoints, disco counters, send errors, the last netcheck report and disco's view of each peer
        (:class:`tailpy.ipnstate.TraversalStatus`)."""
        now = self.clock()
        return TraversalStatus(
            endpoints=tuple(self.endpoints),
            disco=self.disco.counters.as_dict(),
            send_errors=self.send_errors,
            copied=self.copied,
            link_changes=self.link_changes,
            ignored=self.ignored,
            stun_unmatched=self.stun.unmatched,
            netcheck=self.history.last,
            peers={
                s.node_key: DiscoPeerStatus(
                    path=s.path,
                    latency_ms=None if s.latency is None else round(s.latency * 1000, 2),
                    active=s.active,
                )
                for s in self.disco.status(now)
            },
        )

    # -- internals -------------------------------------------------------------------------------------

    def _on_link_change(self, old: object, new: object) -> None:
        gone = set(old) - set(new) if isinstance(old, tuple) and isinstance(new, tuple) else {old}
        log.info("link change: local endpoints %s -> %s", old, new)
        self.link_changes += 1
        if gone:
            # TCP connections made from a vanished address are dead: DERP and control reconnect. Direct
            # paths are pinged at once and kept if they answer (a public peer follows our new source, as
            # WireGuard roams); one that does not falls back to the relay within LINK_CHANGE_GRACE.
            self.magicsock.rebind()
            now = self.clock()
            for key in list(self._peers):
                paths = self.disco.peer_paths(key)
                if paths is not None:
                    paths.revalidate(now, LINK_CHANGE_GRACE)
            self._act(self.disco.poll(now))
            if self.on_link_change is not None:
                self.on_link_change()
        self._refresh_endpoints()
        self._netcheck_now.set()
        self._wake.set()

    def _send_stun(self, datagram: bytes, dest: Endpoint) -> None:
        self.device.send_datagram(datagram, str(dest))  # DeviceError: the runner counts a failed probe

    def _act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendUDP):
                try:
                    self.device.send_datagram(a.datagram, str(a.endpoint))
                except (DeviceError, OSError):
                    self.send_errors += 1  # e.g. EPERM from a firewall: the missing Pong tells disco
            elif isinstance(a, SendDERP):
                if not self.magicsock.send_via_derp(a.node_key, a.datagram):
                    self.send_errors += 1
            elif isinstance(a, SetPath):
                self._set_path(a)
            else:
                fut = self._pings.get(a.request)
                if fut is not None and not fut.done():
                    fut.set_result(a)
        self._wake.set()

    def _set_path(self, a: SetPath) -> None:
        node = self._peers.get(a.node_key)
        name = node.name if node is not None else a.node_key.short()
        if a.endpoint is None:
            self._relayed.add(a.node_key)
            self._place_relay(a.node_key)
            return
        self._relayed.discard(a.node_key)
        try:
            self.magicsock.set_peer_path(a.node_key, endpoint=a.endpoint)
        except DeviceError as e:
            log.debug("peer %s: cannot go direct: %s", name, e)
            return
        log.info("peer %s: direct %s", name, a.endpoint)

    def _guess(self, key: NodePublic) -> Endpoint | None:
        """The peer's best-guess direct endpoint: disco's best candidate, else the one ``choose_endpoint``
        picks from its netmap endpoints, else the data plane's."""
        paths = self.disco.peer_paths(key)
        if paths is not None and paths.best is not None:
            return paths.best
        return self._netmap_guess.get(key) or self._device_endpoint.get(key.raw)

    def _place_relay(self, key: NodePublic) -> None:
        """Relay through the peer's region; with no region to relay through, direct to its netmap endpoint
        (the data plane keeps the endpoint the daemon chose) until one is known."""
        region = self.magicsock.relay_region(key.raw)
        try:
            if region:
                self.magicsock.set_peer_path(key, region=0)
            elif (guess := self._guess(key)) is not None:
                self.magicsock.set_peer_path(key, endpoint=guess)
        except DeviceError:
            return

    def _mapped_now(self, endpoint: Endpoint) -> None:
        """A STUN answer of a netcheck in progress: a mapped endpoint not yet known goes to disco and to
        control at once (peers behind NAT need it to go direct); the report at the end of the run then sets
        the list (:meth:`_refresh_endpoints`)."""
        if endpoint in self.endpoints:
            return
        eps = [*self.endpoints, endpoint]
        self.disco.set_endpoints(eps)
        self.endpoints = eps
        log.info("endpoints: %s (STUN)", ", ".join(map(str, eps)))
        if self.on_endpoints is not None:
            self.on_endpoints(list(eps))

    def _refresh_endpoints(self) -> None:
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
            if self.on_endpoints is not None:
                self.on_endpoints(list(eps))

    def _note_activity(self, now: float) -> None:
        try:
            peers = self.device.peers()
        except DeviceError:
            return
        for p in peers:
            key = p["public_key"]
            tx = int(p.get("tx_packets", 0))
            ep = p.get("endpoint")
            if ep:
                with contextlib.suppress(EndpointError):
                    self._device_endpoint[key] = Endpoint.parse(str(ep))
            if tx > self._tx.get(key, 0):
                self.disco.note_activity(NodePublic(key), now)
            self._tx[key] = tx

    async def _timer_loop(self) -> None:
        next_look = 0.0
        while True:
            now = self.clock()
            if now >= next_look:
                self._note_activity(now)
                next_look = now + ACTIVITY_INTERVAL
            self._wake.clear()
            self._act(self.disco.poll(now))
            self._wake.clear()
            nt = self.disco.next_timer()
            until = next_look if nt is None else min(nt, next_look)
            await wait_event(self._wake, max(0.0, until - self.clock()))

    async def _netcheck_loop(self) -> None:
        while True:
            lo, hi = self.netcheck_interval
            await wait_event(self._netcheck_now, lo + self._rng.random() * (hi - lo))
            self._netcheck_now.clear()
            try:
                report = await self.netcheck()
            except Exception:  # keep the loop whatever one run did
                log.exception("netcheck failed")
                continue
            if report is not None:
                log.debug(
                    "netcheck: udp=%s v4=%s varies=%s latency=%s",
                    report.udp,
                    report.global_v4,
                    report.mapping_varies_by_dest_ip,
                    {r: round(d * 1000, 1) for r, d in sorted(report.region_latency.items())},
                )
            else:
                self._refresh_endpoints()  # local addresses may have changed all the same


__all__ = [
    "ACTIVITY_INTERVAL",
    "NETCHECK_INTERVAL",
    "PingReply",
    "Traversal",
    "TraversalDevice",
    "ping_reply",
]
