"""Per-peer path selection: which of a peer's endpoints to send WireGuard to, or the DERP relay. Sans-IO.

One :class:`PeerPaths` per peer, driven by :class:`tailpy.magicsock.disco.DiscoNode` (which seals, opens and
routes the disco messages); it takes decoded messages and ``now`` (seconds, any monotonic clock) and queues
:data:`PeerAction` values: messages to send (over UDP to an endpoint, or via DERP), path changes, results of
``tailpy ping``. Nothing here does I/O or reads a clock. The behaviour follows Tailscale's magicsock
(``wgengine/magicsock/endpoint.go``), with its timing:

* **Candidates**: the peer's endpoints from the netmap, those in its last CallMeMaybe, and the sources of
  Pings it sent us (kept :data:`SESSION_ACTIVE_TIMEOUT` after the last Ping from there). At most
  :data:`MAX_CANDIDATES`.
* **Relay first**: a peer starts on the relay path. When traffic to it starts
  (:meth:`PeerPaths.note_activity`) it pings every candidate at once and sends a CallMeMaybe with our
  endpoints via DERP, so the peer pings back at the same moment (simultaneous open through
  port-restricted NATs).
* **Pong**: the round trip of the Ping it answers is the endpoint's latency. The first Pong makes that
  endpoint the best one; a later Pong from another endpoint takes over if it is better (:func:`better`:
  lower latency by more than :data:`LATENCY_TIE`, or within it a LAN/link-local/loopback address over a
  public one; otherwise the current one stays). Each Pong from the best endpoint trusts it for
  :data:`TRUST_DURATION` (6.5 s); while trusted the path is direct to it.
* **Heartbeat**: every :data:`HEARTBEAT_INTERVAL` (3 s) while traffic flows (activity within
  :data:`SESSION_ACTIVE_TIMEOUT`, 45 s), a Ping to the best endpoint; and a full round (every candidate not
  pinged in the last :data:`PING_INTERVAL`, 5 s, plus a CallMeMaybe) when there is no trusted best endpoint,
  or every :data:`UPGRADE_INTERVAL` when the best one is slower than :data:`GOOD_ENOUGH_LATENCY`. An idle
  peer gets no heartbeats.
* **Fallback**: when the trust runs out with no Pong, the path goes back to relay (so within 6.5 s of the
  last Pong, plus however late the caller polls). A Ping unanswered for :data:`PING_TIMEOUT` to an untrusted
  best endpoint forgets it.
* **Answering**: a Ping is answered with a Pong carrying the source it came from, on the way it came (UDP to
  that source, or DERP); over DERP the source is ``127.3.3.40:<region id>`` (Tailscale's DERP magic IP).
  A CallMeMaybe replaces the previous one's endpoints and pings them all at once, even those pinged lately.
* **Ping back** (not in Tailscale): a Ping from the peer while we have traffic for it and no trusted path
  is answered with a Pong and also a Ping of our own to its source if our last Ping there got no Pong (at
  most every :data:`PING_BACK_INTERVAL`): its NAT has just opened towards us, so the initiator of a
  simultaneous open goes direct one round trip after the peer does, not at its next round (up to 5 s on).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Final, TypeAlias

from tailpy.keys import NodePublic
from tailpy.proto.disco import CallMeMaybe, Endpoint, IPAddress, Message, Ping, Pong, new_txid

HEARTBEAT_INTERVAL: Final = 3.0
"""Seconds between heartbeat Pings to the best endpoint while traffic flows (``heartbeatInterval``)."""

TRUST_DURATION: Final = 6.5
"""Seconds a direct path is used after a Pong on it (magicsock ``trustUDPAddrDuration``)."""

PING_INTERVAL: Final = 5.0
"""Least seconds between discovery Pings to one endpoint (magicsock ``discoPingInterval``); CallMeMaybe
overrides it."""

PING_TIMEOUT: Final = 5.0
"""Seconds after which a Ping without a Pong is given up (magicsock ``pingTimeoutDuration``)."""

SESSION_ACTIVE_TIMEOUT: Final = 45.0
"""Seconds without traffic after which a peer is idle: no more heartbeats (magicsock
``sessionActiveTimeout``); also how long an endpoint learned from a Ping is kept."""

PING_BACK_INTERVAL: Final = 1.0
"""Least seconds between Pings sent back to an endpoint a Ping came from (while no direct path is trusted)."""

CALL_ME_MAYBE_GRACE: Final = 1.5
"""Seconds a trusted direct path the peer's CallMeMaybe no longer lists stays trusted without a new Pong."""

DISCOVERY_RETRY: Final = 0.5
"""Seconds after which a discovery Ping to a candidate that has never answered is sent once more: when both
peers ping each other's new endpoints at the same instant, each NAT drops the other's first Ping (it has not
sent there yet); the retry, after both have, gets through."""

UPGRADE_INTERVAL: Final = 60.0
"""Seconds between full rounds while a trusted direct path is slower than :data:`GOOD_ENOUGH_LATENCY`."""

GOOD_ENOUGH_LATENCY: Final = 0.005
"""Round trip (seconds) at or under which a direct path is not re-probed for a better one."""

LATENCY_TIE: Final = 0.003
"""Round trips (seconds) this close count as equal: the better address class wins, else the path stays."""

MAX_CANDIDATES: Final = 64
"""Most endpoints kept per peer; more from Pings or CallMeMaybe are ignored (and counted)."""

DERP_MAGIC_IP: Final = IPv4Address("127.3.3.40")
"""The source a Pong reports for a Ping that came via DERP (Tailscale's ``tailcfg.DerpMagicIP``); the port
is the DERP region id."""

LAN_NETWORKS: Final[tuple[IPv4Network | IPv6Network, ...]] = tuple(
    ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15", "fc00::/7")
)
"""Addresses that count as LAN wherever they are: RFC 1918, RFC 4193 unique-local, and 198.18.0.0/15 (the
lab's LANs behind NAT). The daemon adds the subnets of its own interfaces (``lan_networks``)."""


class AddrClass(enum.IntEnum):
    """How near an endpoint's address is; higher wins a latency tie."""

    PUBLIC = 0
    LAN = 1
    LINK_LOCAL = 2
    LOOPBACK = 3


def addr_class(ip: IPAddress, lan_networks: Iterable[IPv4Network | IPv6Network] = ()) -> AddrClass:
    """The class of ``ip``: loopback, link-local, LAN (:data:`LAN_NETWORKS` or one of ``lan_networks``),
    else public."""
    if ip.is_loopback:
        return AddrClass.LOOPBACK
    if ip.is_link_local:
        return AddrClass.LINK_LOCAL
    for n in (*LAN_NETWORKS, *lan_networks):
        if ip.version == n.version and ip in n:
            return AddrClass.LAN
    return AddrClass.PUBLIC


def better(
    a: Endpoint,
    a_latency: float,
    b: Endpoint,
    b_latency: float,
    lan_networks: Iterable[IPv4Network | IPv6Network] = (),
) -> bool:
    """Whether endpoint ``a`` (round trip ``a_latency`` seconds) should replace the current best ``b``.

    Lower latency wins when the two differ by more than :data:`LATENCY_TIE`; within it the nearer
    :class:`AddrClass` wins (LAN over public), and between equals ``b`` stays (no flapping)."""
    if a == b:
        return False
    if abs(a_latency - b_latency) > LATENCY_TIE:
        return a_latency < b_latency
    nets = tuple(lan_networks)
    return addr_class(a.ip, nets) > addr_class(b.ip, nets)


# --- what a peer asks the caller to do ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ViaDERP:
    """A message came via DERP region ``region`` (its id, or code when that is all the caller has; None:
    not known)."""

    region: int | str | None = None

    def __str__(self) -> str:
        return "DERP" if self.region is None else f"DERP({self.region})"


Via: TypeAlias = Endpoint | ViaDERP
"""How a message arrived: from a UDP endpoint, or via DERP."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the peer ``node_key``: over UDP to ``to``, or via DERP when ``to`` is None."""

    node_key: NodePublic
    to: Endpoint | None
    message: Message


@dataclass(frozen=True, slots=True)
class SetPath:
    """Use this path for the peer's WireGuard datagrams from now on: direct to ``endpoint``, or the DERP relay
    when it is None (data plane: ``set_peer(endpoint=str(endpoint))`` + ``set_path("direct")``, or
    ``set_path("relay")``; sessions are kept)."""

    node_key: NodePublic
    endpoint: Endpoint | None

    @property
    def direct(self) -> bool:
        return self.endpoint is not None


@dataclass(frozen=True, slots=True)
class PingResult:
    """The answer to ``tailpy ping`` request ``request``: a Pong came ``via`` (an endpoint or DERP) after
    ``rtt`` seconds; ``peer_saw`` is our source as the peer saw it."""

    request: int
    node_key: NodePublic
    via: Via
    rtt: float
    peer_saw: Endpoint

    @property
    def direct(self) -> bool:
        return isinstance(self.via, Endpoint)

    def describe(self, name: str) -> str:
        """``pong from NAME via DERP(1) in 23ms`` / ``pong from NAME via 192.0.2.7:41641 in 1ms``."""
        return f"pong from {name} via {self.via} in {self.rtt * 1000:.0f}ms"


@dataclass(frozen=True, slots=True)
class PingTimeout:
    """No Pong came for ``tailpy ping`` request ``request`` within :data:`PING_TIMEOUT`."""

    request: int
    node_key: NodePublic


PeerAction: TypeAlias = Send | SetPath | PingResult | PingTimeout


# --- state --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LocalInfo:
    """What every peer's machine needs of this node, shared and kept current by the node object: its node key
    (sent in Pings), its endpoints (sent in CallMeMaybe) and the subnets counting as LAN."""

    node_key: NodePublic
    endpoints: tuple[Endpoint, ...] = ()
    lan_networks: tuple[IPv4Network | IPv6Network, ...] = ()


class Purpose(enum.Enum):
    DISCOVERY = "discovery"
    HEARTBEAT = "heartbeat"
    CLI = "cli"


@dataclass(slots=True)
class Candidate:
    """One endpoint of a peer and what we know of it (times in the caller's clock, seconds)."""

    endpoint: Endpoint
    from_netmap: bool = False
    from_call_me_maybe: bool = False
    last_cmm_gone: bool = False  # listed in the peer's previous CallMeMaybe, not in its last one
    retry_at: float | None = None  # when to ping again a candidate that has never answered (one retry)
    last_got_ping: float | None = None  # a Ping came from here (learned endpoint)
    last_got_ping_txid: bytes = b""
    last_ping: float | None = None  # we last pinged it
    last_ping_back: float | None = None  # we last pinged it because a Ping came from it
    latency: float | None = None  # round trip of the last Pong, seconds
    last_pong: float | None = None
    pong_src: Endpoint | None = None  # our source as the peer saw it

    def expired(self, now: float) -> bool:
        """Whether nothing but an old Ping keeps this endpoint (learned, not pinged us for 45 s)."""
        if self.from_netmap or self.from_call_me_maybe:
            return False
        return self.last_got_ping is None or now - self.last_got_ping > SESSION_ACTIVE_TIMEOUT


@dataclass(slots=True)
class SentPing:
    to: Endpoint | None  # None: via DERP
    at: float
    purpose: Purpose
    request: int | None = None


@dataclass(slots=True)
class PeerCounters:
    pings_sent: int = 0
    pongs_received: int = 0
    pongs_unknown_txid: int = 0
    pings_received: int = 0
    pings_duplicate: int = 0
    call_me_maybe_sent: int = 0
    call_me_maybe_received: int = 0
    candidates_refused: int = 0
    ping_timeouts: int = 0
    path_changes: int = 0


def _usable(ep: Endpoint) -> bool:
    ip = ep.ip
    if ep.port == 0 or ip.is_unspecified or ip.is_multicast:
        return False
    if isinstance(ip, IPv4Address) and ip == IPv4Address("255.255.255.255"):
        return False
    return not (isinstance(ip, IPv6Address) and ip.is_link_local)  # would need a zone; Tailscale skips too


class PeerPaths:
    """Path state of one peer (see the module docstring). Methods queue :data:`PeerAction` values;
    :meth:`drain` returns and clears them. ``now`` is seconds on the caller's monotonic clock."""

    def __init__(
        self,
        node_key: NodePublic,
        local: LocalInfo,
        endpoints: Iterable[Endpoint] = (),
        *,
        txid: Callable[[], bytes] = new_txid,
    ) -> None:
        self.node_key = node_key
        self.local = local
        self.candidates: dict[Endpoint, Candidate] = {}
        self.path: Endpoint | None = None  # what the data plane was last told: None = relay
        self.best: Endpoint | None = None
        self.best_latency = math.inf
        self.trust_until = -math.inf
        self.last_activity: float | None = None
        self.heartbeat_at: float | None = None
        self.last_full_ping: float | None = None
        self.last_call_me_maybe: float | None = None
        self.sent: dict[bytes, SentPing] = {}
        self.requests: dict[int, set[bytes]] = {}
        self.counters = PeerCounters()
        self._txid = txid
        self._out: list[PeerAction] = []
        self._beat_delay: float | None = None  # new endpoints: beat this long after the next poll
        self.set_endpoints(endpoints)

    # --- inputs ---------------------------------------------------------------------------------------------

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The peer's endpoints from the netmap (replacing the previous netmap's)."""
        want = [e for e in dict.fromkeys(endpoints) if _usable(e)]
        new = [e for e in want if e not in self.candidates]
        for c in self.candidates.values():
            c.from_netmap = False
        for e in want:
            got = self._candidate(e)
            if got is not None:
                got.from_netmap = True
        self._prune(None)
        if new and self.heartbeat_at is not None:
            # Traffic is flowing and the peer has new endpoints (its STUN-mapped address, say): ping them at
            # the next poll rather than at the next heartbeat (up to 3 s on). Both peers usually learn each
            # other's at the same instant; the one with the higher node key waits DISCOVERY_RETRY so the two
            # first Pings do not cross (each NAT would drop the other's before it has sent there itself).
            self.heartbeat_at = -math.inf
            self._beat_delay = 0.0 if self.local.node_key.raw < self.node_key.raw else DISCOVERY_RETRY

    def note_activity(self, now: float) -> None:
        """Traffic is flowing to this peer (call it when WireGuard datagrams go out to it, at any rate).
        On a peer that was idle, discovery starts at the next :meth:`poll`."""
        self.last_activity = now
        if self.heartbeat_at is None:
            self.heartbeat_at = now

    def active(self, now: float) -> bool:
        return self.last_activity is not None and now - self.last_activity <= SESSION_ACTIVE_TIMEOUT

    def trusted(self, now: float) -> bool:
        return self.best is not None and now < self.trust_until

    def on_ping(self, ping: Ping, via: Via, now: float) -> None:
        """A Ping from this peer arrived ``via``: learn its source as a candidate and answer with a Pong."""
        self.counters.pings_received += 1
        if isinstance(via, ViaDERP):
            region = via.region if isinstance(via.region, int) and 0 <= via.region <= 0xFFFF else 0
            self._send(None, Pong(ping.txid, Endpoint(DERP_MAGIC_IP, region)))
            return
        c = self.candidates.get(via)
        if c is not None and c.last_got_ping_txid == ping.txid:
            self.counters.pings_duplicate += 1  # the same Ping twice (a retransmit or a replay): one Pong
            return
        if c is None and _usable(via):
            c = self._candidate(via)
        if c is not None:
            c.last_got_ping = now
            c.last_got_ping_txid = ping.txid
        self._send(via, Pong(ping.txid, via))
        # tailpy addition: while we are looking for a path to this peer, its Ping shows the way back is open
        # now (its NAT just sent to us), so ping that source at once rather than at the next round.
        if (
            c is not None
            and self.active(now)
            and not self.trusted(now)
            and (c.last_pong is None or c.last_ping is None or c.last_pong < c.last_ping)
            and (c.last_ping_back is None or now - c.last_ping_back >= PING_BACK_INTERVAL)
        ):
            c.last_ping_back = now
            self._ping(via, now, Purpose.DISCOVERY)

    def on_pong(self, pong: Pong, via: Via, now: float) -> bool:
        """A Pong from this peer arrived ``via``. Returns False (and counts it) when it answers no pending
        Ping of ours."""
        sp = self.sent.pop(pong.txid, None)
        if sp is None:
            self.counters.pongs_unknown_txid += 1
            return False
        self.counters.pongs_received += 1
        rtt = max(0.0, now - sp.at)
        if sp.request is not None and sp.request in self.requests:
            for t in self.requests.pop(sp.request):
                other = self.sent.get(t)
                if other is not None:
                    other.request = None  # answered: its other Pings still probe their path
            self._out.append(PingResult(sp.request, self.node_key, via, rtt, pong.src))
        if isinstance(via, ViaDERP) or sp.to is None:
            return True
        c = self.candidates.get(sp.to)
        if c is None:
            return True  # no longer a candidate
        c.latency, c.last_pong, c.pong_src, c.retry_at = rtt, now, pong.src, None
        ep = sp.to
        old = self.candidates.get(self.best) if self.best is not None else None
        if (
            self.best is None
            or not self.trusted(now)
            or better(ep, rtt, self.best, self.best_latency, self.local.lan_networks)
            # the peer's last CallMeMaybe lists this endpoint and not the one in use: its network changed
            or (c.from_call_me_maybe and old is not None and not old.from_call_me_maybe and old.last_cmm_gone)
        ):
            self.best = ep
        if self.best == ep:
            self.best_latency = rtt
            self.trust_until = now + TRUST_DURATION
        self._update_path(now)
        return True

    def on_call_me_maybe(self, cmm: CallMeMaybe, now: float) -> None:
        """The peer sent CallMeMaybe (via DERP): it has just pinged us, so ping all its endpoints now."""
        self.counters.call_me_maybe_received += 1
        for c in self.candidates.values():
            c.last_cmm_gone = c.from_call_me_maybe and c.endpoint not in cmm.endpoints
            c.from_call_me_maybe = False
        for e in dict.fromkeys(cmm.endpoints):
            if _usable(e):
                got = self._candidate(e)
                if got is not None:
                    got.from_call_me_maybe = True
        self._prune(now)
        for c in self.candidates.values():
            c.last_ping = None  # the first Pings probably died in the peer's NAT: try again at once
        self._full_ping(now, call_me_maybe=False)
        best = self.candidates.get(self.best) if self.best is not None else None
        if best is not None and best.last_cmm_gone and self.trusted(now):
            # The peer no longer lists the endpoint we use (its network changed): keep it only if it still
            # answers soon; the full round above pinged it.
            self.trust_until = min(self.trust_until, now + CALL_ME_MAYBE_GRACE)

    def start_ping(self, request: int, now: float) -> None:
        """``tailpy ping``: one disco Ping to the trusted direct path, or else via DERP and to the best
        endpoint if any. The first Pong yields :class:`PingResult`; none in :data:`PING_TIMEOUT`,
        :class:`PingTimeout`. Counts as traffic, so discovery runs and a later ``ping`` can go direct."""
        self.note_activity(now)
        txids: set[bytes] = set()
        targets: list[Endpoint | None] = []
        if self.best is not None:
            targets.append(self.best)
        if not self.trusted(now):
            targets.append(None)
        for to in targets:
            txids.add(self._ping(to, now, Purpose.CLI, request))
        self.requests[request] = txids

    def revalidate(self, now: float, grace: float) -> None:
        """This host's network changed (an address went away): ping the direct path now and trust it at most
        ``grace`` more seconds unless that Ping is answered, so a path that died with the old address falls
        back to the relay soon (and rediscovery, with a CallMeMaybe of the new endpoints, starts) while one
        that still works is kept. Nothing happens without a direct path."""
        if self.best is None or self.path is None:
            return
        self.trust_until = min(self.trust_until, now + grace)
        for c in self.candidates.values():
            c.last_ping = None  # pings from the old address proved nothing: the next round tries them all
        self._ping(self.best, now, Purpose.HEARTBEAT)

    # --- timers ---------------------------------------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Run what is due at ``now``: ping timeouts, trust expiry (back to relay), heartbeat."""
        for txid, sp in list(self.sent.items()):
            if now < sp.at + PING_TIMEOUT:  # the same sum next_timer gives (no float edge that spins)
                continue
            del self.sent[txid]
            self.counters.ping_timeouts += 1
            if sp.to is not None and sp.to == self.best and not self.trusted(now):
                self._clear_best()
            if sp.request is not None and sp.request in self.requests:
                self.requests[sp.request].discard(txid)
                if not self.requests[sp.request]:
                    del self.requests[sp.request]
                    self._out.append(PingTimeout(sp.request, self.node_key))
        if self.path is not None and not self.trusted(now) and self.active(now):
            self.heartbeat_at = (
                now  # the direct path just lapsed: look for another one now, not at the next beat
            )
        if self._beat_delay is not None and self.heartbeat_at is not None:
            self.heartbeat_at, self._beat_delay = now + self._beat_delay, None
        if self.heartbeat_at is not None and now >= self.heartbeat_at:
            self._heartbeat(now)
        for c in list(self.candidates.values()):
            if c.retry_at is not None and now >= c.retry_at:
                c.retry_at = None
                if c.last_pong is None and not self.trusted(now) and self.active(now):
                    self._ping(c.endpoint, now, Purpose.DISCOVERY)
        self._update_path(now)

    def next_timer(self) -> float | None:
        """When :meth:`poll` next has something to do (caller's clock), or None."""
        times = [sp.at + PING_TIMEOUT for sp in self.sent.values()]
        if self.heartbeat_at is not None:
            times.append(self.heartbeat_at)
        if self.path is not None:
            times.append(self.trust_until)
        times.extend(c.retry_at for c in self.candidates.values() if c.retry_at is not None)
        return min(times) if times else None

    def drain(self) -> list[PeerAction]:
        out, self._out = self._out, []
        return out

    def reset(self) -> None:
        """Forget paths and pending Pings (the peer's disco key changed: it restarted)."""
        self._clear_best()
        self.sent.clear()
        for request in self.requests:
            self._out.append(PingTimeout(request, self.node_key))
        self.requests.clear()
        for c in self.candidates.values():
            c.last_ping = c.latency = c.last_pong = c.pong_src = None
            c.last_got_ping_txid = b""
        self.last_full_ping = None

    # --- internals ------------------------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        if not self.active(now):
            self.heartbeat_at = None  # idle: stop until traffic resumes
            return
        if self.best is not None:
            self._ping(self.best, now, Purpose.HEARTBEAT)
        if self._want_full_ping(now):
            self._full_ping(now, call_me_maybe=True)
        self.heartbeat_at = now + HEARTBEAT_INTERVAL

    def _want_full_ping(self, now: float) -> bool:
        if self.best is None or self.last_full_ping is None or not self.trusted(now):
            return True
        if self.best_latency <= GOOD_ENOUGH_LATENCY:
            return False
        return now - self.last_full_ping >= UPGRADE_INTERVAL

    def _full_ping(self, now: float, *, call_me_maybe: bool) -> None:
        self.last_full_ping = now
        self._prune(now)
        sent_any = False
        for c in list(self.candidates.values()):
            if c.last_ping is not None and now - c.last_ping < PING_INTERVAL:
                continue
            self._ping(c.endpoint, now, Purpose.DISCOVERY)
            if c.last_pong is None:
                c.retry_at = now + DISCOVERY_RETRY
            sent_any = True
        if not call_me_maybe or not self.local.endpoints:
            return
        # With no candidate at all the peer can still reach us if we are reachable: tell it, at most every
        # PING_INTERVAL.
        nothing_to_ping = not self.candidates
        recent = self.last_call_me_maybe is not None and now - self.last_call_me_maybe < PING_INTERVAL
        if sent_any or (nothing_to_ping and not recent):
            self.last_call_me_maybe = now
            self.counters.call_me_maybe_sent += 1
            self._send(None, CallMeMaybe(self.local.endpoints))

    def _ping(self, to: Endpoint | None, now: float, purpose: Purpose, request: int | None = None) -> bytes:
        txid = self._txid()
        self.sent[txid] = SentPing(to, now, purpose, request)
        if to is not None and purpose is not Purpose.CLI and to in self.candidates:
            self.candidates[to].last_ping = now
        self.counters.pings_sent += 1
        self._send(to, Ping(txid, self.local.node_key))
        return txid

    def _send(self, to: Endpoint | None, msg: Message) -> None:
        self._out.append(Send(self.node_key, to, msg))

    def _candidate(self, ep: Endpoint) -> Candidate | None:
        c = self.candidates.get(ep)
        if c is not None:
            return c
        if len(self.candidates) >= MAX_CANDIDATES:
            self.counters.candidates_refused += 1
            return None
        c = self.candidates[ep] = Candidate(ep)
        return c

    def _prune(self, now: float | None) -> None:
        for ep, c in list(self.candidates.items()):
            if c.from_netmap or c.from_call_me_maybe:
                continue
            if now is None and c.last_got_ping is not None:
                continue  # learned endpoints age out in _full_ping, with a clock
            if now is None or c.expired(now):
                del self.candidates[ep]
                if ep == self.best:
                    self._clear_best()
        if self.best is None and self.path is not None:
            self.path = None  # the endpoint in use is gone: back to relay at once
            self.counters.path_changes += 1
            self._out.append(SetPath(self.node_key, None))

    def _clear_best(self) -> None:
        self.best = None
        self.best_latency = math.inf
        self.trust_until = -math.inf

    def _update_path(self, now: float) -> None:
        want = self.best if self.trusted(now) else None
        if want != self.path:
            self.path = want
            self.counters.path_changes += 1
            self._out.append(SetPath(self.node_key, want))


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer's path for ``tailpy status``: ``path`` the direct endpoint in use (None: relay), its round trip
    (seconds), and every candidate with its last round trip (None: no Pong yet)."""

    node_key: NodePublic
    path: Endpoint | None
    latency: float | None
    active: bool
    candidates: tuple[tuple[Endpoint, float | None], ...] = field(default=())


def status(peer: PeerPaths, now: float) -> PeerStatus:
    return PeerStatus(
        peer.node_key,
        peer.path,
        peer.best_latency if peer.path is not None else None,
        peer.active(now),
        tuple((c.endpoint, c.latency) for c in peer.candidates.values()),
    )


__all__ = [
    "DERP_MAGIC_IP",
    "GOOD_ENOUGH_LATENCY",
    "HEARTBEAT_INTERVAL",
    "LAN_NETWORKS",
    "LATENCY_TIE",
    "MAX_CANDIDATES",
    "PING_BACK_INTERVAL",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "SESSION_ACTIVE_TIMEOUT",
    "TRUST_DURATION",
    "UPGRADE_INTERVAL",
    "AddrClass",
    "Candidate",
    "LocalInfo",
    "PeerAction",
    "PeerPaths",
    "PeerStatus",
    "PingResult",
    "PingTimeout",
    "Purpose",
    "Send",
    "SetPath",
    "Via",
    "ViaDERP",
    "addr_class",
    "better",
    "status",
]
