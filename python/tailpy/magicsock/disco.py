"""Disco for one node: seals, opens and routes disco messages to each peer's path machine. Sans-IO.

Design note: how the daemon drives it
-------------------------------------
:class:`DiscoNode` holds this node's :class:`~tailpy.keys.DiscoPrivate` and one
:class:`~tailpy.magicsock.paths.PeerPaths` per peer. It does no I/O and reads no clock: the daemon passes
``now`` (``time.monotonic()``) and carries out the :data:`Action` values every call returns::

    node = DiscoNode(disco_private, node_key, endpoints=my_endpoints, lan_networks=my_subnets)
    act(node.on_netmap(peers, now))          # peers: objects with .node_key, .disco_key, .endpoints
    # a disco datagram drained from the Rust device's UDP socket (Device.drain() -> (payload, "ip:port")):
    act(node.feed(payload, Endpoint.parse("192.0.2.7:41641"), now))
    # a disco datagram from DERP (src_node_key: the DERP frame's source; region: where it came through):
    act(node.feed(payload, ViaDERP(region), now, derp_src=src_node_key))
    node.note_activity(peer_node_key, now)   # WireGuard datagrams went to this peer (e.g. tx_packets moved)
    act(node.poll(now))                      # at node.next_timer() at the latest (and after note_activity)
    request, actions = node.ping(peer_node_key, now)  # `tailpy ping`; answers: PingResult / PingTimeout
    act(actions)

    def act(actions):
        for a in actions:
            match a:
                case SendUDP(endpoint, datagram):   device.send_datagram(datagram, str(endpoint))
                case SendDERP(node_key, datagram):  relay.send(node_key, datagram)  # the peer's region
                case SetPath(node_key, None):       device.set_path(node_key.raw, "relay")
                case SetPath(node_key, endpoint):   device.set_peer(node_key.raw, allowed_ips=allowed_ips,
                                                                    endpoint=str(endpoint))
                                                    device.set_path(node_key.raw, "direct")
                case PingResult() | PingTimeout():  hand to the waiting `tailpy ping` (by .request)

:class:`tailpy.magicsock.conn.Conn` is this driver in tailpyd: it feeds disco datagrams from the device's
queue and from DERP, calls :meth:`DiscoNode.note_activity` for every peer whose ``tx_packets`` grew (it reads
``device.peers()`` every 0.25 s), and polls at :meth:`DiscoNode.next_timer` from its one timer.

``device.send_datagram`` raises DeviceError when the kernel refuses a datagram (EPERM from a firewall,
network unreachable): catch it and carry on, the missing Pong is how disco notices. A complete driver of this
kind, against the real data plane with a TCP stand-in for DERP, is ``tests/integration/_disco_lab_node.py``.

Every peer starts on the relay path (``SetPath(peer, None)`` from :meth:`DiscoNode.on_netmap`); the switch
to direct and back never touches the WireGuard session (``set_peer`` keeps it when only the endpoint
changes; ``allowed_ips`` are the peer's as the daemon computes them,
:func:`tailpy.daemon.routing.peer_allowed_ips`, since ``set_peer`` replaces them). Timing and path choice are
in :mod:`tailpy.magicsock.paths`.

Other inputs: :meth:`DiscoNode.set_endpoints` when this node's own endpoints change (local addresses, STUN
results: they go out in CallMeMaybe; refresh them before they are 27 s old, as Tailscale re-STUNs before
sending one), :meth:`DiscoNode.set_node_key` after a node-key rotation. :meth:`DiscoNode.status` gives each
peer's path for ``tailpy status``; :attr:`DiscoNode.counters` the counts of what was dropped and why.

What is dropped and counted (never raised): datagrams that are not disco or are malformed
(``malformed``), whose sender disco key is not a peer's in the netmap (``unknown_sender``, checked before
any crypto), whose box does not open (``undecryptable``: spoofed sender key, altered bytes, not for us),
of a message type this codec does not handle (``unknown_type``), our own (``from_self``), a Ping whose
claimed node key is not the netmap's for that disco key (``node_key_mismatch``), a message via DERP whose
DERP source node is not the one owning the disco key (``derp_source_mismatch``), a CallMeMaybe over UDP
(``call_me_maybe_not_via_derp``; it is only sent via DERP), a Pong for no pending Ping (``unknown_txid``).

The netmap must give each peer's disco public key (Tailscale's ``Node.DiscoKey``); a peer without one gets
no disco (its path is left as the daemon set it). If two peers share a disco key, the last one listed wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol, TypeAlias

import nacl.public

from tailpy.keys import DiscoPrivate, DiscoPublic, NodePublic
from tailpy.magicsock.paths import (
    LocalInfo,
    PeerPaths,
    PeerStatus,
    PingResult,
    PingTimeout,
    Send,
    SetPath,
    Via,
    ViaDERP,
    status,
)
from tailpy.proto import disco
from tailpy.proto.disco import CallMeMaybe, Endpoint, Message, Ping, Pong


class DiscoPeer(Protocol):
    """What :meth:`DiscoNode.on_netmap` needs of a peer (a netmap node with its disco key)."""

    @property
    def node_key(self) -> NodePublic: ...
    @property
    def disco_key(self) -> DiscoPublic | None: ...
    @property
    def endpoints(self) -> Iterable[Endpoint]: ...


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A plain :class:`DiscoPeer`: node key, disco key, endpoints."""

    node_key: NodePublic
    disco_key: DiscoPublic | None
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class SendUDP:
    """Send ``datagram`` (a sealed disco message) from the node's UDP socket to ``endpoint``."""

    endpoint: Endpoint
    datagram: bytes
    node_key: NodePublic
    message: Message


@dataclass(frozen=True, slots=True)
class SendDERP:
    """Send ``datagram`` (a sealed disco message) via DERP to the peer ``node_key`` (its home region)."""

    node_key: NodePublic
    datagram: bytes
    message: Message


Action: TypeAlias = SendUDP | SendDERP | SetPath | PingResult | PingTimeout
"""What the daemon must do; see the module docstring."""


@dataclass(slots=True)
class DiscoCounters:
    """Counts since start. ``received`` counts datagrams handed to :meth:`DiscoNode.feed`; the others, those
    accepted by type and those dropped by reason."""

    received: int = 0
    pings: int = 0
    pongs: int = 0
    call_me_maybes: int = 0
    sent_udp: int = 0
    sent_derp: int = 0
    malformed: int = 0
    unknown_sender: int = 0
    undecryptable: int = 0
    unknown_type: int = 0
    from_self: int = 0
    node_key_mismatch: int = 0
    derp_source_mismatch: int = 0
    call_me_maybe_not_via_derp: int = 0
    unknown_txid: int = 0

    def dropped(self) -> int:
        return sum(
            getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("received", "pings", "pongs", "call_me_maybes", "sent_udp", "sent_derp")
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _Peer:
    disco_key: DiscoPublic
    box: nacl.public.Box
    paths: PeerPaths


class DiscoNode:
    """This node's disco: one path machine per peer, routed by the sender's disco key. See the module
    docstring for the calls and the actions. ``txid`` makes Ping txids (tests pass a counter)."""

    def __init__(
        self,
        private: DiscoPrivate,
        node_key: NodePublic,
        *,
        endpoints: Iterable[Endpoint] = (),
        lan_networks: Iterable[IPv4Network | IPv6Network] = (),
        txid: Callable[[], bytes] = disco.new_txid,
    ) -> None:
        self.private = private
        self.public = private.public
        self.local = LocalInfo(node_key, tuple(endpoints), tuple(lan_networks))
        self.counters = DiscoCounters()
        self._txid = txid
        self._peers: dict[NodePublic, _Peer] = {}
        self._by_disco: dict[DiscoPublic, NodePublic] = {}
        self._requests = itertools.count(1)

    # --- configuration --------------------------------------------------------------------------------------

    def on_netmap(self, peers: Iterable[DiscoPeer], now: float) -> list[Action]:
        """The netmap's peers (all of them, not a delta). New peers start on relay; a peer whose disco key
        changed (it restarted) loses its paths and goes back to relay; peers gone are forgotten."""
        seen: set[NodePublic] = set()
        out: list[Action] = []
        self._by_disco.clear()
        for p in peers:
            if p.disco_key is None or p.disco_key == self.public:
                continue
            seen.add(p.node_key)
            eps = list(p.endpoints)
            peer = self._peers.get(p.node_key)
            if peer is not None and peer.disco_key != p.disco_key:
                box = self._box(p.disco_key)
                if box is None:
                    del self._peers[p.node_key]
                    seen.discard(p.node_key)
                    continue
                peer.paths.reset()
                peer.disco_key, peer.box = p.disco_key, box
            if peer is None:
                box = self._box(p.disco_key)
                if box is None:
                    seen.discard(p.node_key)
                    continue
                peer = _Peer(p.disco_key, box, PeerPaths(p.node_key, self.local, eps, txid=self._txid))
                self._peers[p.node_key] = peer
                out.append(SetPath(p.node_key, None))  # relay from the first packet
            else:
                peer.paths.set_endpoints(eps)
            self._by_disco[p.disco_key] = p.node_key
        for gone in set(self._peers) - seen:
            del self._peers[gone]
        out.extend(self._collect())
        return out

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """This node's own endpoints (local addresses and STUN-discovered ones), sent in CallMeMaybe."""
        self.local.endpoints = tuple(dict.fromkeys(endpoints))

    def set_lan_networks(self, networks: Iterable[IPv4Network | IPv6Network]) -> None:
        """Subnets of this host's interfaces: a peer endpoint in one counts as LAN."""
        self.local.lan_networks = tuple(networks)

    def set_node_key(self, node_key: NodePublic) -> None:
        """This node's node key after a rotation (it goes in every Ping)."""
        self.local.node_key = node_key

    # --- inputs ---------------------------------------------------------------------------------------------

    def feed(
        self, datagram: bytes, src: Via, now: float, *, derp_src: NodePublic | None = None
    ) -> list[Action]:
        """A disco datagram arrived: over UDP from ``src`` (an :class:`Endpoint`), or via
        DERP (``src`` a :class:`ViaDERP` with the region; ``derp_src`` the DERP frame's source node key).
        Returns what to do now (Pong replies, pings, a path change). Bad datagrams are counted and dropped."""
        self.counters.received += 1
        via = src
        try:
            sender = disco.sender(datagram)
        except disco.DiscoParseError:
            self.counters.malformed += 1
            return []
        if sender == self.public:
            self.counters.from_self += 1
            return []
        node_key = self._by_disco.get(sender)
        peer = self._peers.get(node_key) if node_key is not None else None
        if peer is None or node_key is None:
            self.counters.unknown_sender += 1
            return []
        if isinstance(via, ViaDERP) and derp_src is not None and derp_src != node_key:
            self.counters.derp_source_mismatch += 1
            return []
        try:
            msg = disco.open_with(peer.box, datagram)
        except disco.UnknownMessageError:
            self.counters.unknown_type += 1
            return []
        except disco.DecryptError:
            self.counters.undecryptable += 1
            return []
        except disco.DiscoParseError:
            self.counters.malformed += 1
            return []
        self._dispatch(peer, node_key, msg, via, now)
        return self._collect(peer)

    def note_activity(self, node_key: NodePublic, now: float) -> None:
        """WireGuard traffic went to peer ``node_key`` (unknown keys are ignored); call :meth:`poll` after."""
        peer = self._peers.get(node_key)
        if peer is not None:
            peer.paths.note_activity(now)

    def ping(self, node_key: NodePublic, now: float) -> tuple[int, list[Action]]:
        """Start a ``tailpy ping`` to peer ``node_key``: (request id, actions). The answer comes later from
        :meth:`feed` as :class:`PingResult` (``.via`` is ``DERP(<region>)`` or ``ip:port``, ``.rtt`` seconds)
        or from :meth:`poll` as :class:`PingTimeout`, both with this request id. KeyError for an unknown
        peer or one without a disco key."""
        peer = self._peers[node_key]
        request = next(self._requests)
        peer.paths.start_ping(request, now)
        return request, self._collect(peer)

    def poll(self, now: float) -> list[Action]:
        """Run every peer's timers due at ``now``; returns what to do."""
        for peer in self._peers.values():
            peer.paths.poll(now)
        return self._collect()

    def next_timer(self) -> float | None:
        """The earliest time (caller's clock) at which :meth:`poll` has work, or None."""
        times = [t for p in self._peers.values() if (t := p.paths.next_timer()) is not None]
        return min(times) if times else None

    # --- views ----------------------------------------------------------------------------------------------

    def peer_paths(self, node_key: NodePublic) -> PeerPaths | None:
        peer = self._peers.get(node_key)
        return peer.paths if peer is not None else None

    def path(self, node_key: NodePublic) -> Endpoint | None:
        """The direct endpoint in use for the peer, or None (relay, or unknown peer)."""
        peer = self._peers.get(node_key)
        return peer.paths.path if peer is not None else None

    def status(self, now: float) -> list[PeerStatus]:
        return [status(p.paths, now) for p in self._peers.values()]

    # --- internals ------------------------------------------------------------------------------------------

    def _box(self, key: DiscoPublic) -> nacl.public.Box | None:
        try:
            return disco.box_for(self.private, key)
        except disco.DecryptError:
            return None  # a low-order key in the netmap: no disco with that peer

    def _dispatch(self, peer: _Peer, node_key: NodePublic, msg: Message, via: Via, now: float) -> None:
        match msg:
            case Ping():
                if msg.node_key is not None and msg.node_key != node_key:
                    self.counters.node_key_mismatch += 1
                    return
                self.counters.pings += 1
                peer.paths.on_ping(msg, via, now)
            case Pong():
                self.counters.pongs += 1
                if not peer.paths.on_pong(msg, via, now):
                    self.counters.unknown_txid += 1
            case CallMeMaybe():
                if not isinstance(via, ViaDERP):
                    self.counters.call_me_maybe_not_via_derp += 1
                    return
                self.counters.call_me_maybes += 1
                peer.paths.on_call_me_maybe(msg, now)

    def _collect(self, only: _Peer | None = None) -> list[Action]:
        out: list[Action] = []
        for peer in self._peers.values() if only is None else (only,):
            for a in peer.paths.drain():
                if isinstance(a, Send):
                    sealed = disco.seal_with(peer.box, self.public, a.message)
                    if a.to is None:
                        self.counters.sent_derp += 1
                        out.append(SendDERP(a.node_key, sealed, a.message))
                    else:
                        self.counters.sent_udp += 1
                        out.append(SendUDP(a.to, sealed, a.node_key, a.message))
                else:
                    out.append(a)
        return out


__all__ = [
    "Action",
    "DiscoCounters",
    "DiscoNode",
    "DiscoPeer",
    "PeerInfo",
    "PingResult",
    "PingTimeout",
    "SendDERP",
    "SendUDP",
    "SetPath",
    "ViaDERP",
]
