"""Netmap distribution: the server's view of every node, its map streams, and the deltas it fans out.

Wire format of a map stream (``POST /machine/map``; response ``application/x-ndjson``, chunked): one line
per message, each line the base64 NaCl box (server machine key -> node machine key, see
:mod:`tailpy.proto.control`) of one compact JSON object, ``\\n`` terminated. When the map request's
``accept`` names ``"frames"`` the response is ``application/x-tailpy-frames`` instead: each message is a
4-byte big-endian length and the raw box (24-byte nonce + ciphertext), no base64
(:class:`tailpy.proto.control.FrameReader`); the messages are the same. Every object ends with
``"reply_to"`` (the request's ``nonce_id``) and ``"seq"`` (0, 1, 2, ... per stream). Types:

* ``{"type": "netmap", "generation": G, "version": V, "netmap": NetMap JSON}``: the full netmap (with the
  server's DERP map, when it has one). First on a stream that does not resume, and again whenever the stream
  fell behind (its queue overflowed).
* ``{"type": "delta", "version": V, "self"?: Node JSON, "peers_changed"?: [Node JSON], "peers_removed"?:
  [node id], "derp_map"?: DERPMap}``: what changed (:class:`tailpy.netmap.MapDelta`); a changed peer
  carries its full new record (endpoints, keys, name, online, expiry, ...); ``derp_map`` only to clients
  that read it (a new DERP map reaches the others as a full netmap). The first message of a resumed stream
  is a delta that also carries ``"generation"`` (everything that changed since the version the client
  named; possibly empty).
* ``{"type": "keepalive"}`` after ``keepalive`` seconds of silence.

Records leave out the fields at their defaults (:func:`tailpy.proto.mapcodec.compact_record`: no
``"tags":[]``, ``"expired":false``, ...; :meth:`tailpy.netmap.Node.from_json` reads them back). A map
request may name compact forms its client reads, ``"accept": ["zstd", "patches", "frames"]``
(:mod:`tailpy.proto.mapcodec`); a client that names none gets the plain stream above.

* ``zstd``: a message's sealed plaintext may be concatenated zstd frames whose contents, concatenated, are
  the JSON object (messages under ``MIN_COMPRESS`` bytes stay plain JSON). A full netmap's ``peers`` then
  lists the recipient itself too (first, and again among the others; the client drops its own id): the
  records are grouped in blocks of :data:`BLOCK` node ids, each block (routers left out) compressed once
  per view into a frame shared by every stream that shows it until one of its nodes changes, so a full
  netmap costs a stream only its head, its routers' records, its tail, the seal and the write. About 120 B
  a peer on the wire at 10,000 nodes instead of 600.
* ``patches``: a delta carries ``"peers_patched": [{"id": N, field: value, ...}]`` (Tailscale's
  ``PeersChangedPatch``) instead of the whole record for a peer whose previous record the client holds:
  a node coming online is ``{"id", "endpoints", "online", "last_seen"}``, not its keys and names again
  (``last_seen`` is null while a node is online: it says when an offline node was last seen).

``generation`` is 32 hex characters chosen when the server process starts; ``version`` counts the changes the
server published (every node add/change/remove is one version). A client that reconnects sends
``"resume": {"generation": G, "version": V}`` in its map request (V: the version of the last message it
applied); when G is the current generation and the server's change log still reaches back to V, the stream
starts with a delta of the nodes changed since V, else with a full netmap.

Control replicas (:mod:`tailpy.control.replicas`) add ``"feed": "<feed id>.<seq>.<time>"`` after
``"version"`` of every netmap and delta: the database's change feed id, the feed sequence number up to which
the message holds every change, and the unix time that position was read. A client that read DERP maps in
deltas (``accept`` ``"derp_map"``) sends it back as ``resume.feed``; another replica of the same database that
has applied the feed that far resumes the stream there (:meth:`Mapper.resume_point`): its first delta carries
its own generation, its DERP map, the whole packet filter, every node changed since, and the keys that
expired since (each replica publishes expiries on its own clock). So a node whose replica died moves with one
small delta instead of a full netmap. Whatever no delta carries (a policy change, a DNS config or domain
change, a change of the peers the node may see, a DERP map for a client that does not read it in deltas)
still costs a full netmap.

Costs: a change is one JSON encoding of the node, one entry in a shared change log, and a wake-up of the
streams that are idle; a stream holds no queue, only the version its client has. When its writer runs it
collects the nodes changed since that version from the log (each once, latest record: a stream that fell
behind merges everything into one delta and pays one seal), and after writing a delta it waits
``batch_delay`` seconds before the next, longer while the streams together write more than
:data:`DELTA_RATE` deltas a second, so a burst of changes (thousands of nodes coming online) reaches each
stream as a few merged deltas instead of one message per change. Streams at the same version without a
policy share one delta body (built and compressed once). A stream whose version fell out of the log gets
one full netmap instead.

Memory is bounded per stream and in total: full netmaps and merged deltas of more than ``LARGE_DELTA`` nodes
are built, sealed and written at most ``full_map_concurrency`` at a time (the body is freed before the
write), written in ``CHUNK``-byte slices that each wait for the socket to drain, so a slow reader holds at
most one sealed message and its socket buffer.

Access control (:mod:`tailpy.control.policy`): every full netmap carries ``"packet_filters"``, its node's
filter as named parts (Tailscale's ``MapResponse.PacketFilters``; see :mod:`tailpy.packetfilter`), each a
list in tailcfg.FilterRule's JSON shape: one part per policy rule that reaches the node, or
:data:`~tailpy.packetfilter.ALLOW_ALL` as the part ``"allow-all"`` while no policy is set (Tailscale's
default); and with a policy only the peers the node sees (it may reach them or they it). A delta carries
``"packet_filters"`` with the parts that changed (``null`` for a part gone; ``"*"`` first when the stream's
parts are unknown) when the node's filter changed (a policy change, or a node change that alters the rule
sources, such as a new member of a group), and sends a peer that is no longer visible as
``peers_removed``; a node change reaches only the streams that see the node. Parts are named after their
rule's content, so a policy edit sends each node only the parts of the rules that changed (a full filter
at 10,000 nodes is tens of kB; one rule's part a few kB), and a stream keeps only a hash per part.
:meth:`Mapper.set_policy` logs a change under :data:`POLICY_CHANGE` (a stream resuming across it gets a
full netmap) and merges each stream's new filter and peer differences into its next delta.

Routes (:mod:`tailpy.control.routes`): every record carries the routes its node advertises
(``routable_ips``), serves (``approved_routes``: approved and advertised), is primary for
(``primary_routes``) and ``allowed_ips`` (its addresses, its primary routes, and both exit routes for an
approved exit node; absent when that is just the addresses). The mapper elects the primary routers
(:class:`~tailpy.control.routes.PrimaryRoutes`) from the records it is given: a router whose stream
closes, whose key expires or whose approval goes loses its primary routes at once, and the records of the
routers concerned go out as one change each. Under a policy a recipient sees only the routes it may use
(:meth:`tailpy.control.policy.Compiled.may_use_route`): a router's record is encoded once, and again per
distinct reduction only for recipients that may not use all its routes (cached until the router or the
policy changes).

A node whose key has expired (or that logged out) is shown itself, expired, and no peers: its full netmap
has no peers and its deltas carry only ``self``; when its key expires or becomes valid again its streams get
a full netmap. Nothing here touches the database: the server reads records and hands them in.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.control.policy import Compiled, Policy, PolicyNode
from tailpy.control.policy.compiler import PartSpec, part_json
from tailpy.control.routes import PrimaryRoutes, allowed_ips, node_served
from tailpy.dns.config import DNSConfig
from tailpy.keys import MachinePrivate, MachinePublic
from tailpy.netmap import DerpMap, NetMap, Node
from tailpy.packetfilter import (
    ALLOW_ALL,
    ALLOW_ALL_PART,
    CLEAR_PARTS,
    FilterRule,
    filter_from_json,
    filter_to_json,
)
from tailpy.proto import control as proto
from tailpy.proto import mapcodec
from tailpy.routes import has_exit_routes

log = logging.getLogger("tailpy.control")

LOG_LIMIT = 65536
"""Changes remembered for resuming streams and for streams that fell behind (older: a full netmap)."""

KEEPALIVE = b'{"type":"keepalive"}'

BLOCK = 256
"""Node ids per block of peer records that zstd streams share: a block's records are compressed once into a
zstd frame (per view, under a policy) and that frame goes into every full netmap that shows them, until one
of its nodes changes."""

LARGE_DELTA = 128
"""Changed nodes above which a delta is built and written with the full netmaps (at most
``full_map_concurrency`` at once), so that many streams catching up at once do not each hold a large
message."""

CHUNK = 64 << 10
"""Bytes per write of a large message (each write waits for the socket to drain)."""

BATCH_DELAY = 0.1
"""Seconds a stream waits after writing a delta before it writes the next (changes meanwhile are merged)."""

DELTA_RATE = 4000
"""Deltas per second the streams write together before each waits longer than ``batch_delay`` between two
of its deltas. Every second the pause is scaled by (deltas written right after a pause / DELTA_RATE: a
stream's first delta after it was idle does not count, so one change told to every stream leaves the
pause as it is), between ``batch_delay``
and :data:`MAX_PAUSE`; one task releases the paused streams (streams paused together are released
together, so they stay at the same version and share one delta body). While thousands of streams come up,
every stream opening is a change every open stream is told of: merged into fewer, larger deltas the
fan-out stays near DELTA_RATE messages per second instead of growing with streams times changes. An idle
stream still writes a change at once, and the pause is back to ``batch_delay`` a second after the burst."""

MAX_PAUSE = 5.0
"""Longest pause between two deltas of one stream, seconds."""

SHARED_LARGE = 256 << 10
"""Bytes of a shared delta body above which its streams seal and write it at most ``full_map_concurrency``
at a time (each sealed copy is the stream's own)."""

POLICY_CHANGE = -1
"""The node id under which a policy change is logged (it names no node; a stream resuming across it gets a
full netmap)."""
SETTINGS_CHANGE = -2
"""The node id under which a new DNS config or tailnet domain is logged (a stream resuming across it gets a
full netmap: deltas do not carry them)."""
DERP_CHANGE = -3
"""The node id under which a new DERP map is logged (a stream resuming across it gets a full netmap unless
its client reads DERP maps in deltas)."""
_VIEW_CHANGE = -16
"""``_VIEW_CHANGE - node_id`` is logged when the peers node ``node_id`` may see changed (a policy matched it
differently: its streams get a full netmap, and so does a stream of it resuming across that)."""
INF_VERSION = 1 << 62
"""Above any version, node id or sequence number (a bound for bisections)."""
FEED_MARKS = 4096
"""Change feed positions remembered for streams resuming from another control replica (one per read of the
feed that brought changes)."""
EXPIRY_SLACK = 60.0
"""Seconds before a resume point's time from which keys that expired are sent again to a stream resuming
from another replica (each replica publishes expiries on its own clock)."""
CHANGE_TIMES = 4096
"""Changes whose time is kept for the delta latency metric (:attr:`Mapper.on_delta_written`): a stream
further behind than that is catching up, not measuring fan-out."""


_FEED_POINT = re.compile(r"([0-9a-f]{1,32})\.([0-9]{1,18})\.([0-9]{1,12})")


def parse_feed_point(text: str) -> tuple[str, int, int] | None:
    """A map stream resume point ``"<feed id>.<seq>.<unix seconds>"`` (ASCII: hex id, decimal numbers) as
    (feed id, seq, time); None for anything else (a client's garbage is no resume point)."""
    m = _FEED_POINT.fullmatch(text)
    return None if m is None else (m[1], int(m[2]), int(m[3]))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(eq=False)
class MapStream:
    """One open map stream: its node, sealer, and how far its client is (``sent``: the mapper version its
    last message brought it to)."""

    node_id: int
    machine_key: MachinePublic
    sealer: proto.StreamSealer
    sent: int = 0
    first: bool = False  # its first message is the delta of a resumed stream (since ``sent``)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = False  # a full netmap is due (first message, fell behind the log, expiry changed)
    ended: bool = False  # the node was removed or the server is closing: end the stream
    overflows: int = 0  # times it fell behind the change log
    filter_sig: Any = None  # what its client's filter was made of (Compiled.filter_signature); None: unknown
    filter_epoch: Any = None  # (compile serial, changes) when filter_sig was last worked out
    filter_parts: dict[str, int] | None = None  # name -> hash of the spec of each filter part its client has
    pend_changed: set[int] = field(default_factory=set)  # peers that became visible (send their records)
    pend_removed: set[int] = field(default_factory=set)  # peers that stopped being visible
    keepalive: float = 0.0  # seconds of silence before a keepalive line (set by Mapper.serve)
    idle_since: float = 0.0  # loop time its writer went idle
    keepalive_due: bool = False  # woken by the keepalive sweep, not by a change
    zstd: bool = False  # its client reads zstd frames (tailpy.proto.mapcodec)
    patches: bool = False  # its client applies peers_patched
    derp: bool = False  # its client applies a DERP map carried by a delta
    pend_derp: bool = False  # its next delta carries the DERP map
    expired_since: float | None = None  # resumed from another replica: also send keys expired since then
    start: str = "netmap"  # how it began: "netmap", "resumed" (this process), "resumed_elsewhere" (replica)
    paced: bool = False  # its last delta was followed by a pause (its next one counts towards the rate)

    def end(self) -> None:
        self.ended = True
        self.first = False
        self.wake.set()


class Mapper:
    """Every live node as peers see it (``online`` set from open streams), and the streams to tell.

    ``server_key`` seals stream messages; ``domain`` and ``derp_map`` (full netmaps carry them, deltas
    never; :meth:`set_derp_map`) go into netmaps. Call :meth:`load` with the store's
    nodes first, :meth:`publish` / :meth:`remove` for every change, :meth:`open_stream` / :meth:`serve` /
    :meth:`close_stream` per map request. ``batch_delay``: seconds between two deltas of one stream.
    """

    def __init__(
        self,
        server_key: MachinePrivate,
        domain: str,
        *,
        log_limit: int = LOG_LIMIT,
        full_map_concurrency: int = 4,
        batch_delay: float = BATCH_DELAY,
        derp_map: DerpMap | None = None,
        dns: DNSConfig | None = None,
    ) -> None:
        self.server_key = server_key
        self.domain = domain
        self.derp_map = derp_map
        self._derp_json = b"" if derp_map is None else b',"derp_map":' + _dumps(derp_map.to_json())
        self.dns = dns
        self._dns_json = b"" if dns is None else b',"dns":' + _dumps(dns.to_json())
        self.generation = secrets.token_hex(16)
        self.version = 0
        self.batch_delay = batch_delay
        self.nodes: dict[int, Node] = {}
        self._by_machine: dict[MachinePublic, int] = {}  # machine key -> node id
        self._json: dict[int, bytes] = {}
        self._changed_at: dict[int, int] = {}  # node id -> version of its last change
        self._log: collections.deque[tuple[int, int]] = collections.deque(maxlen=log_limit)
        self._log_floor = 0  # every change with a version above this is in _log
        self._streams: set[MapStream] = set()
        self._by_node: dict[int, set[MapStream]] = {}
        self._idle: set[MapStream] = set()  # writers waiting for a change
        self._full_maps = asyncio.Semaphore(full_map_concurrency)
        self.policy: Policy | None = None
        self._compiled: Compiled | None = None  # None: no policy, everyone sees everyone, ALLOW_ALL
        self._emails: dict[str, str] = {}
        self._last_parts: tuple[int, dict[str, int]] | None = None
        self._sweeper: asyncio.Task[None] | None = None  # wakes idle streams whose keepalive is due
        self.elsewhere: set[int] = set()
        """Nodes with a map stream on another live control replica (online too; see
        :mod:`tailpy.control.replicas`)."""
        self.primary = PrimaryRoutes()
        """The primary router of each subnet route (:class:`tailpy.control.routes.PrimaryRoutes`)."""
        self._routers: set[int] = set()  # nodes whose allowed IPs hold routes (reduced per recipient)
        self._variants: dict[int, dict[tuple[str, ...], bytes]] = {}  # router -> its reduced encodings
        self._prev_at: dict[int, int] = {}  # node id -> version of the change before its last one
        self._patches: dict[int, tuple[int, bytes]] = {}  # node id -> (_prev_at, its last change's patch)
        self._blocks: dict[int, set[int]] = {}  # id // BLOCK -> the live ids in it
        self._frames: dict[int, dict[int | None, tuple[frozenset[int] | None, bytes]]] = {}
        # block -> view key (None: no policy) -> (the view's peer set, the block's shared zstd frame)
        self._shared: dict[tuple[int, bool], bytes | None] = {}  # (from version, zstd) -> shared delta
        self._shared_version = 0  # the version the shared deltas lead to
        self._paused: collections.deque[tuple[float, MapStream]] = collections.deque()  # by pause time
        self._pause = batch_delay  # seconds between two deltas of a stream now (see DELTA_RATE)
        self._delta_writes = 0  # deltas written since _rate_since
        self._rate_since = 0.0
        self._pacer: asyncio.Task[None] | None = None  # releases paused streams
        self._change_times = [0.0] * CHANGE_TIMES  # monotonic time of version v at [v % CHANGE_TIMES]
        self.on_policy_compiled: Callable[[float], None] | None = None
        """Called with the seconds each policy compile took (:meth:`set_policy`; metrics)."""
        self.on_delta_written: Callable[[float], None] | None = None
        """Called after a stream's delta was written with the seconds since the oldest change in it
        (changes older than :data:`CHANGE_TIMES` versions are not timed; metrics)."""
        self.feed_id: str | None = None
        """The database's change feed id when this server is one of several control replicas
        (:mod:`tailpy.control.replicas`): messages then carry a resume point any replica of the database
        understands (see :meth:`feed_applied`). None: resume only on this process."""
        self._marks: list[tuple[int, int, float]] = []  # (feed seq, version after its read, unix time)
        self._feed_json = b""  # ',"feed":"<id>.<seq>.<time>"' of the newest mark
        self._expiries: list[tuple[float, int]] | None = []  # (key expiry, node id) sorted; None: rebuild
        self.clock: Callable[[], float] = time.time
        """Unix seconds now (the server's clock: which keys have expired)."""

    # --- state ---

    def is_online(self, node_id: int) -> bool:
        """True while node ``node_id`` has a map stream open here, or on another replica
        (:attr:`elsewhere`)."""
        return bool(self._by_node.get(node_id)) or node_id in self.elsewhere

    def node_by_machine_key(self, machine_key: MachinePublic) -> Node | None:
        """The record of the live node of ``machine_key`` as streams are told it (None: none known)."""
        i = self._by_machine.get(machine_key)
        return None if i is None else self.nodes.get(i)

    @property
    def streams(self) -> int:
        return len(self._streams)

    def netmap(self, node_id: int) -> NetMap | None:
        """Node ``node_id``'s full netmap as its stream would carry it (O(nodes); the filter as named parts),
        None if it is not live (an expired node: no peers)."""
        me = self.nodes.get(node_id)
        if me is None:
            return None
        pfs = {k: filter_from_json(json.loads(_part_json(v))) for k, v in self._filter_parts(node_id).items()}
        if me.expired:
            return NetMap(me, {}, self.domain, self.derp_map, self.dns, None, pfs)
        if self._compiled is None:
            peers = {i: n for i, n in self.nodes.items() if i != node_id}
        else:
            peers = {
                i: self.peer_record(node_id, i) for i in self._compiled.peers(node_id) if i in self.nodes
            }
        return NetMap(me, peers, self.domain, self.derp_map, self.dns, None, pfs)

    # --- routes ---

    def _routed(self, node: Node) -> Node:
        """``node`` (``online`` set) with its route fields as recipients see them: the routes it serves as
        ``approved_routes``, the subnet routes it is primary for, and its allowed IPs."""
        if not node.routable_ips and not node.approved_routes and node.allowed_ips is None:
            return node  # (the common case: no routes; nothing to elect)
        served = node_served(node)
        primary = self.primary.primary_routes(node.id, node.routable_ips)
        exit_node = has_exit_routes(served)
        allowed = allowed_ips(node.addresses, primary, exit_node) if primary or exit_node else None
        if (node.approved_routes, node.primary_routes, node.allowed_ips) == (served, primary, allowed):
            return node
        return dataclasses.replace(node, approved_routes=served, primary_routes=primary, allowed_ips=allowed)

    def _elect(self, node: Node) -> set[int]:
        """Feed ``node``'s eligibility to the election: the subnet routes it serves while it is online and
        its key valid. Returns the ids of the nodes whose primary routes changed."""
        eligible = node_served(node) if node.routable_ips and node.online and not node.expired else ()
        return self.primary.update(node.id, eligible)

    def _store(self, node: Node) -> None:
        """Keep ``node`` as the record streams are told (encoded once, fields at their defaults left out;
        reduced encodings and its block's shared frames dropped). Right after its change was logged, also
        the field patch from its previous record, for streams that hold that one (not for routers, whose
        records may be reduced per recipient, nor when what the policy matches on changed: its visibility
        may have changed with it)."""
        old = self.nodes.get(node.id)
        self.nodes[node.id] = node
        if old is not None and old.machine_key != node.machine_key:
            self._by_machine.pop(old.machine_key, None)
        self._by_machine[node.machine_key] = node.id
        if old is None or old.key_expiry != node.key_expiry:
            self._expiries = None
        full = node.to_json()
        self._json[node.id] = _dumps(mapcodec.compact_record(full))
        self._variants.pop(node.id, None)
        self._frames.pop(node.id // BLOCK, None)
        self._blocks.setdefault(node.id // BLOCK, set()).add(node.id)
        self._patches.pop(node.id, None)
        if (
            old is not None
            and self._log
            and self._log[-1] == (self.version, node.id)
            and old.allowed_ips is None
            and node.allowed_ips is None
            and (self._compiled is None or self._policy_node(old) == self._policy_node(node))
        ):
            p = mapcodec.patch(old.to_json(), full)
            if p is not None:
                self._patches[node.id] = (self._prev_at.get(node.id, 0), _dumps(p))
        if node.allowed_ips is not None:
            self._routers.add(node.id)
        else:
            self._routers.discard(node.id)

    def _reroute(self, ids: Iterable[int]) -> None:
        """The primary routes of nodes ``ids`` changed: publish their new records."""
        for i in sorted(ids):
            n = self.nodes.get(i)
            if n is None:
                continue
            new = self._routed(n)
            if new != n:
                self._bump(i)
                self._store(new)
                self._policy_changes(i, new)

    def peer_record(self, viewer: int, node_id: int) -> Node:
        """Node ``node_id``'s record as node ``viewer`` is sent it: under a policy, its ``allowed_ips`` and
        ``primary_routes`` keep only the routes ``viewer`` may use."""
        n = self.nodes[node_id]
        reduced = self._reduction(viewer, n)
        if reduced is None:
            return n
        primary = tuple(r for r in n.primary_routes if r in reduced)
        allowed = (*n.addresses, *reduced) if reduced else None
        return dataclasses.replace(n, allowed_ips=allowed, primary_routes=primary)

    def _reduction(self, viewer: int, n: Node) -> tuple[str, ...] | None:
        """The routes of router ``n``'s allowed IPs ``viewer`` may use; None when that is all of them (or
        there is no policy)."""
        c = self._compiled
        if c is None or n.allowed_ips is None or viewer == n.id:
            return None
        routes = n.allowed_ips[len(n.addresses) :]
        keep = tuple(r for r in routes if c.may_use_route(viewer, r))
        return None if len(keep) == len(routes) else keep

    def _peer_json(self, viewer: int, node_id: int) -> bytes:
        """The encoded record of ``node_id`` for ``viewer``: the shared encoding unless ``node_id`` is a
        router whose routes ``viewer`` may not all use (then one encoding per distinct reduction)."""
        if node_id not in self._routers or self._compiled is None:
            return self._json[node_id]
        n = self.nodes[node_id]
        keep = self._reduction(viewer, n)
        if keep is None:
            return self._json[node_id]
        mine = self._variants.setdefault(node_id, {})
        b = mine.get(keep)
        if b is None:
            b = mine[keep] = _dumps(mapcodec.compact_record(self.peer_record(viewer, node_id).to_json()))
        return b

    # --- policy ---

    def filter_for(self, node_id: int) -> tuple[FilterRule, ...] | None:
        """Node ``node_id``'s packet filter (tailcfg.FilterRule shape, as its netmap carries it): ALLOW_ALL
        without a policy, the compiled rules whose destination is the node with one (empty: nothing may
        reach it); None for a node that is not live."""
        if node_id not in self.nodes:
            return None
        if self._compiled is None:
            return ALLOW_ALL
        return self._compiled.filter(node_id)

    def _filter_parts(self, node_id: int) -> Mapping[str, PartSpec | None]:
        """Node ``node_id``'s filter parts: name -> spec (None: the allow-all part)."""
        if self._compiled is None:
            return _ALLOW_ALL_PARTS
        return self._compiled.filter_parts(node_id)

    def _filter_sig(self, node_id: int) -> Any:
        c = self._compiled
        return ("allow-all",) if c is None else (c.serial, c.filter_signature(node_id))

    def _policy_node(self, node: Node) -> PolicyNode:
        user = "" if node.tags else node.user
        email = self._emails.get(user, "") if user else ""
        return PolicyNode(node.id, node.addresses, user, email, node.tags, node_served(node))

    def _visible(self, a: int, b: int) -> bool:
        return self._compiled is None or self._compiled.visible(a, b)

    def set_policy(self, policy: Policy | None) -> None:
        """Make ``policy`` the tailnet's (None: none, everyone reaches everyone): recompile every node's
        filter and visible peers, then tell the streams whose view changed, merged into their next delta:
        ``packet_filter`` when a node's filter differs, ``peers_changed`` (full records) for peers that
        became visible, ``peers_removed`` for peers that no longer are; a stream whose peer set changed
        by more than half gets a full netmap instead. O(nodes) compile plus O(nodes) per distinct view of
        the streams' nodes (nodes with the same rules share a view)."""
        old = self._compiled
        self.policy = policy
        started = time.perf_counter()
        new = (
            None
            if policy is None
            else Compiled(policy, (self._policy_node(n) for n in self.nodes.values()), previous=old)
        )
        if new is not None and self.on_policy_compiled is not None:
            self.on_policy_compiled(time.perf_counter() - started)
        self._compiled = new
        self._variants.clear()  # (route reductions follow the policy)
        self._frames.clear()  # (and the views)
        self._bump(POLICY_CHANGE)
        everyone = frozenset(self.nodes)
        keep: list[frozenset[int]] = []  # the shared sets, alive while their ids key the diffs
        diffs: dict[tuple[int, int], tuple[frozenset[int], frozenset[int]] | None] = {}
        for node_id, streams in self._by_node.items():
            me = self.nodes.get(node_id)
            if me is None or me.expired:
                continue
            # peer sets are shared by nodes of one view: one diff per pair of views
            before = everyone if old is None else old.visible_set(node_id)
            after = everyone if new is None else new.visible_set(node_id)
            key = (id(before), id(after))
            if key not in diffs:
                keep += (before, after)
                added, removed = after - before, before - after
                big = len(added) + len(removed) > max(LARGE_DELTA, len(after) // 2)
                diffs[key] = None if big else (added, removed)
            diff = diffs[key]
            for st in streams:  # (their filter signatures changed with the compiled policy)
                if diff is None:
                    st.resync = True
                else:
                    st.pend_changed.update(diff[0])
                    st.pend_removed.update(diff[1])
                    st.pend_changed.update(self._routers)  # the routes each may use may differ
        for st in self._streams:
            st.wake.set()

    def set_user_emails(self, emails: Mapping[str, str]) -> None:
        """Login name -> email of every user (users are matched by either in a policy). The nodes of users
        whose email changed are matched again (as a change of those nodes)."""
        emails = dict(emails)
        if emails == self._emails:
            return
        changed = {u for u in self._emails.keys() | emails.keys() if self._emails.get(u) != emails.get(u)}
        self._emails = emails
        if self._compiled is None:
            return
        for n in [n for n in self.nodes.values() if n.user in changed]:  # their owners' nodes, re-matched
            self._bump(n.id)
            self._policy_changes(n.id, n)
        self._wake()

    def _policy_changes(self, node_id: int, node: Node | None) -> None:
        """Feed a node's new record (None: removed) to the compiled policy and mark the streams it
        affects: filters that may differ, peers that lost sight of it, its own streams when its view
        changed."""
        c = self._compiled
        if c is None:
            return
        known = node_id in c.nodes
        ch = c.remove(node_id) if node is None else c.update(self._policy_node(node))
        for i in ch.lost:  # (changed filters: each stream compares its filter signature)
            for st in self._by_node.get(i, ()):
                st.pend_removed.add(node_id)
        if known and ch.view_changed:
            self._bump(_VIEW_CHANGE - node_id)  # (a stream of it resuming across this: a full netmap)
            for st in self._by_node.get(node_id, ()):
                st.resync = True

    def set_dns(self, dns: DNSConfig | None, domain: str) -> bool:
        """New DNS config or tailnet domain (admin ``dns set``): every stream gets a full netmap (deltas
        never carry them; such changes are rare). Returns whether anything changed."""
        if dns == self.dns and domain == self.domain:
            return False
        self.dns, self.domain = dns, domain
        self._dns_json = b"" if dns is None else b',"dns":' + _dumps(dns.to_json())
        self._bump(SETTINGS_CHANGE)
        for s in self._streams:
            s.resync = True
            s.wake.set()
        return True

    def set_derp_map(self, derp_map: DerpMap | None) -> bool:
        """A new DERP map (the live control replicas' relays changed): a stream whose client reads DERP maps
        in deltas (``accept`` ``"derp_map"``) gets it in its next delta, every other stream (and every
        stream when there is no DERP map any more) a full netmap. Returns whether it changed."""
        if derp_map == self.derp_map:
            return False
        self.derp_map = derp_map
        self._derp_json = b"" if derp_map is None else b',"derp_map":' + _dumps(derp_map.to_json())
        self._bump(DERP_CHANGE)
        for s in self._streams:
            if s.derp and derp_map is not None:
                s.pend_derp = True
            else:
                s.resync = True
            s.wake.set()
        return True

    def load(self, nodes: Iterable[Node]) -> None:
        """Set the starting records (no stream is told: call before streams open)."""
        for n in nodes:
            n = self._with_online(n)
            self._elect(n)
            n = self._routed(n)
            self._store(n)
            if self._compiled is not None:
                self._compiled.update(self._policy_node(n))

    def _with_online(self, node: Node) -> Node:
        """``node`` with ``online`` from the streams, and no ``last_seen`` while online (as Tailscale's
        ``tailcfg.Node.LastSeen``, it tells when an offline node was last seen; a node that opens a stream
        records its last seen each time, and reconnecting must not be a change every peer is sent)."""
        online = self.is_online(node.id)
        last_seen = None if online else node.last_seen
        if node.online == online and node.last_seen == last_seen:
            return node
        return dataclasses.replace(node, online=online, last_seen=last_seen)

    def _bump(self, node_id: int) -> int:
        if len(self._log) == self._log.maxlen:
            self._log_floor = self._log[0][0]
        self.version += 1
        self._log.append((self.version, node_id))
        self._prev_at[node_id] = self._changed_at.get(node_id, 0)
        self._patches.pop(node_id, None)
        self._changed_at[node_id] = self.version
        self._change_times[self.version % CHANGE_TIMES] = time.monotonic()
        return self.version

    def _wake(self) -> None:
        """Wake every idle writer (O(idle streams)); busy ones look at the version before they sleep."""
        for s in self._idle:
            s.wake.set()
        self._idle.clear()

    # --- changes ---

    def publish(self, node: Node) -> bool:
        """``node``'s record as the store has it (``online`` is replaced by the stream count). If it differs
        from what streams were told, log it and wake the streams: its own streams get it as ``self``, the
        others as ``peers_changed``; when its expiry flipped its own streams get a full netmap. Returns
        whether anything changed."""
        node = self._with_online(node)
        others = self._elect(node)
        node = self._routed(node)
        old = self.nodes.get(node.id)
        if old == node:
            return False
        self._bump(node.id)
        self._store(node)
        self._policy_changes(node.id, node)
        self._reroute(others - {node.id})
        if others:
            log.info(
                "primary routes now: %s",
                "; ".join(
                    f"node {i}: {', '.join(self.primary.primary_routes(i)) or 'none'}" for i in sorted(others)
                ),
            )
        if old is not None and old.expired != node.expired:
            for s in self._by_node.get(node.id, ()):
                s.resync = True
                s.wake.set()
        self._wake()
        return True

    def remove(self, node_id: int) -> bool:
        """Node ``node_id`` left the tailnet: peers get ``peers_removed``, its own streams end. Returns
        whether it was known."""
        old = self.nodes.pop(node_id, None)
        if old is None:
            return False
        if self._by_machine.get(old.machine_key) == node_id:
            del self._by_machine[old.machine_key]
        del self._json[node_id]
        self._variants.pop(node_id, None)
        self._frames.pop(node_id // BLOCK, None)
        self._blocks.get(node_id // BLOCK, set()).discard(node_id)
        self._routers.discard(node_id)
        self._bump(node_id)
        self._policy_changes(node_id, None)
        others = self.primary.remove(node_id)
        self._reroute(others)
        if others - {node_id}:
            log.info("node %d removed: primary routes move to nodes %s", node_id, sorted(others - {node_id}))
        for s in self._by_node.get(node_id, ()):
            s.end()
        self._wake()
        return True

    def resync(self, nodes: Iterable[Node], since: int) -> int:
        """Bring the records in line with ``nodes`` (every live node, read from the store when the version
        was ``since``): publish what changed, remove what is gone; records published after ``since`` are
        newer than the read and left alone. O(nodes) compares; returns how many changes were sent."""
        seen: set[int] = set()
        sent = 0
        for n in nodes:
            seen.add(n.id)
            if self._changed_at.get(n.id, 0) <= since:
                sent += self.publish(n)
        for i in [i for i in self.nodes if i not in seen and self._changed_at.get(i, 0) <= since]:
            sent += self.remove(i)
        return sent

    # --- streams ---

    def open_stream(
        self,
        node_id: int,
        machine_key: MachinePublic,
        reply_to: str,
        resume: tuple[str, int] | tuple[str, int, str | None] | None = None,
        accept: Iterable[str] = (),
    ) -> MapStream:
        """Register a stream for ``node_id`` (it counts as online from now: publish its record next). Its
        first message is a delta since ``resume`` ((generation, version[, feed resume point])) when
        :meth:`resume_point` places it and the change log reaches back that far, else a full netmap.
        ``accept``: what its client reads besides plain JSON in base64 lines ("zstd", "patches", "frames",
        "derp_map": :mod:`tailpy.proto.mapcodec`)."""
        features = set(accept)
        sealer = proto.StreamSealer(self.server_key, machine_key, reply_to, framed="frames" in features)
        s = MapStream(node_id, machine_key, sealer)
        s.zstd = "zstd" in features and mapcodec.ZSTD
        s.patches = "patches" in features
        s.derp = "derp_map" in features
        me = self.nodes.get(node_id)
        point = None if resume is None else self.resume_point(resume, derp=s.derp)
        if (
            point is not None
            and self._resumable(point[0], node_id, derp=s.derp)
            and not (me is not None and me.expired)
        ):
            s.sent, s.expired_since = point
            s.filter_sig = s.filter_epoch = None  # the filter may have changed meanwhile
            s.first = True
            s.start = "resumed" if s.expired_since is None else "resumed_elsewhere"
        else:
            s.resync = True
        self._streams.add(s)
        self._by_node.setdefault(node_id, set()).add(s)
        return s

    def resume_point(
        self, resume: tuple[str, int] | tuple[str, int, str | None], *, derp: bool = False
    ) -> tuple[int, float | None] | None:
        """Where a stream resuming from ``resume`` (generation, version[, feed resume point]) starts:
        (version of this process's log, unix time from which expired keys are sent again, or None), or None
        for a full netmap. Same process: the version it names. Another replica of this database (a client
        that reads DERP maps in deltas, ``derp``): the feed resume point ``"<feed id>.<seq>.<time>"`` its
        last message carried says its netmap holds every change of the feed up to ``seq``; it resumes from
        the version of this replica's newest mark at or before ``seq`` (:meth:`feed_applied`: every change
        with a later sequence number was published after that version). None when the feed is another
        database's, this replica has not applied ``seq`` yet, or its marks no longer reach back."""
        generation, version = resume[0], resume[1]
        if generation == self.generation:
            return version, None
        feed = resume[2] if len(resume) > 2 else None
        point = None if feed is None else parse_feed_point(feed)
        if not derp or point is None or point[0] != self.feed_id:
            return None
        _, seq, at = point
        marks = self._marks
        if not marks or seq > marks[-1][0]:
            return None
        k = bisect.bisect_right(marks, (seq, INF_VERSION, 0.0)) - 1
        if k < 0:
            return None
        return marks[k][1], float(at) - EXPIRY_SLACK

    def feed_applied(self, seq: int) -> None:
        """The change feed was applied up to sequence number ``seq``, by a read that published what it
        found synchronously (nothing else was published while it ran): every message from now on holds
        every change up to ``seq`` (their resume point says so), and every change with a higher sequence
        number is published after the current version (it is read later, or it is this replica's own
        write, committed after the read and published after it; what :meth:`resume_point` resumes from).
        Marks nothing while :attr:`feed_id` is None."""
        if self.feed_id is None or (self._marks and self._marks[-1][0] >= seq):
            return
        now = self.clock()
        self._marks.append((seq, self.version, now))
        if len(self._marks) > FEED_MARKS:
            del self._marks[: FEED_MARKS // 2]
        self._feed_json = b',"feed":"%s.%d.%d"' % (self.feed_id.encode(), seq, int(now))

    def _resumable(self, since: int, node_id: int, *, derp: bool = False) -> bool:
        """The log still reaches back to ``since``, and nothing since calls for a full netmap: a policy
        change (which may have changed any peer set), a new DNS config or domain, a change of what
        ``node_id`` may see, or (unless its client reads them in deltas, ``derp``) a new DERP map."""
        if not self._log_floor <= since <= self.version:
            return False
        full = {POLICY_CHANGE, SETTINGS_CHANGE, _VIEW_CHANGE - node_id}
        if not derp:
            full.add(DERP_CHANGE)
        return full.isdisjoint(_since(self._log, since))

    def _expired_since(self, since: float) -> list[int]:
        """Ids of the nodes whose key expired at or after unix time ``since`` (by now)."""
        if self._expiries is None:
            self._expiries = sorted(
                (n.key_expiry, i) for i, n in self.nodes.items() if n.key_expiry is not None
            )
        ex = self._expiries
        lo = bisect.bisect_left(ex, (since, -INF_VERSION))
        hi = bisect.bisect_right(ex, (self.clock(), INF_VERSION))
        return [i for _, i in ex[lo:hi]]

    def changed_since(self, since: int) -> set[int] | None:
        """Ids of the nodes changed after version ``since``; None when the log no longer reaches back."""
        if since < self._log_floor:
            return None
        return set(_since(self._log, since))

    def delta_body(self, s: MapStream, *, resumed: bool = False) -> bytes | None:
        """The delta that brings ``s`` from ``s.sent`` to the current version (and moves ``s.sent`` there):
        None when nothing it can see changed, or (setting ``s.resync``) when the log no longer reaches back.
        O(changes since) joins of cached node JSON. ``resumed``: the first message of a resumed stream,
        which carries the generation and is sent even when empty."""
        ids = self.changed_since(s.sent)
        if ids is None:
            s.resync = True
            s.overflows += 1
            return None
        before, s.sent = s.sent, self.version
        me = self.nodes.get(s.node_id)
        if me is None:
            return None
        parts = [b'{"type":"delta","version":%d%s' % (self.version, self._feed_json)]
        if resumed:
            parts = [
                b'{"type":"delta","generation":%s,"version":%d%s'
                % (_dumps(self.generation), self.version, self._feed_json)
            ]
            if s.expired_since is not None:  # (resumed from another replica: its clock's expiries again)
                ids.update(self._expired_since(s.expired_since))
                s.expired_since = None
        if s.derp and (s.pend_derp or resumed) and self.derp_map is not None:
            parts.append(self._derp_json[1:])
        s.pend_derp = False
        if s.node_id in ids:
            parts.append(b'"self":' + self._json[s.node_id])
        if not me.expired:  # an expired node is shown no peers
            ids.update(s.pend_changed)
            vis = self._visible
            me_id = s.node_id
            changed_ids = sorted(i for i in ids if i != me_id and i in self._json and vis(me_id, i))
            js, routers = self._json, self._routers
            patched: list[bytes] = []
            if s.patches and not resumed:  # peers it holds as of their previous change: only what changed
                pats, pend = self._patches, s.pend_changed
                whole = []
                for i in changed_ids:
                    p = pats.get(i)
                    if p is not None and p[0] <= before and i not in pend:
                        patched.append(p[1])
                    else:
                        whole.append(i)
                changed_ids = whole
            changed = [js[i] if i not in routers else self._peer_json(me_id, i) for i in changed_ids]
            if changed:
                parts.append(b'"peers_changed":[' + b",".join(changed) + b"]")
            if patched:
                parts.append(b'"peers_patched":[' + b",".join(patched) + b"]")
            # gone from the tailnet, or no longer visible (a resumed client may hold any earlier peer)
            gone = {i for i in ids if i >= 0 and i not in self._json}
            gone.update(i for i in s.pend_removed if i != me_id and i in self._json and not vis(me_id, i))
            if resumed:
                gone.update(i for i in ids if i >= 0 and i != me_id and i in self._json and not vis(me_id, i))
            removed = sorted(gone)
            if removed:
                parts.append(b'"peers_removed":' + _dumps(removed))
        s.pend_changed.clear()
        s.pend_removed.clear()
        c = self._compiled
        epoch = None if c is None else (c.serial, c.changes)
        sig = s.filter_sig if epoch is not None and epoch == s.filter_epoch else self._filter_sig(s.node_id)
        s.filter_epoch = epoch
        if sig != s.filter_sig:  # the filter may have changed: its parts compared, the changed ones sent
            s.filter_sig = sig
            specs = self._filter_parts(s.node_id)
            hashes = {k: hash(v) for k, v in specs.items()}
            had = s.filter_parts
            if hashes != had:
                out = [b'"%s":null' % CLEAR_PARTS.encode()] if had is None else []
                out += [
                    b'"%s":%s' % (k.encode(), _part_json(v))
                    for k, v in specs.items()
                    if had is None or had.get(k) != hashes[k]
                ]
                if had is not None:
                    out += [b'"%s":null' % k.encode() for k in had if k not in hashes]
                s.filter_parts = hashes
                parts.append(b'"packet_filters":{' + b",".join(out) + b"}")
        if len(parts) == 1 and not resumed:
            return None
        return b",".join(parts) + b"}"

    def close_stream(self, s: MapStream) -> None:
        """Forget ``s`` (publish the node's record next: it may have gone offline)."""
        self._streams.discard(s)
        if not self._streams and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self._streams and self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
            self._paused.clear()
        self._idle.discard(s)
        mine = self._by_node.get(s.node_id)
        if mine is not None:
            mine.discard(s)
            if not mine:
                del self._by_node[s.node_id]

    def end_all(self) -> None:
        """End every stream (server shutdown)."""
        for s in self._streams:
            s.end()

    def full_map_body(self, node_id: int) -> bytes | None:
        """The encoded ``{"type": "netmap", ...}`` body for ``node_id`` (None if it is not live): O(nodes)
        byte joins of cached node JSON, no per-node encoding. An expired node gets no peers."""
        me = self._json.get(node_id)
        if me is None:
            return None
        head = self._map_head()
        if self.nodes[node_id].expired:
            peers = b""
        elif self._compiled is None:
            peers = b",".join([j for i, j in self._json.items() if i != node_id])
        else:
            js, routers = self._json, self._routers  # (routers' records may be reduced for this node)
            peers = b",".join(
                [
                    js[i] if i not in routers else self._peer_json(node_id, i)
                    for i in self._compiled.peers(node_id)
                    if i in js
                ]
            )
        return b"".join((head, b',"netmap":{"self":', me, b',"peers":[', peers, self._map_tail(node_id)))

    def _map_head(self) -> bytes:
        head = _dumps({"type": "netmap", "generation": self.generation, "version": self.version})[:-1]
        return head + self._feed_json

    def _map_tail(self, node_id: int) -> bytes:
        """What follows the peers of ``node_id``'s full netmap: ``],"domain":...}}}`` (remembers the filter
        parts for :meth:`full_map_sent`)."""
        specs = self._filter_parts(node_id)
        self._last_parts = (node_id, {k: hash(v) for k, v in specs.items()})  # for full_map_sent, next
        pf = b",".join(b'"%s":%s' % (k.encode(), _part_json(v)) for k, v in specs.items())
        return (
            b'],"domain":'
            + _dumps(self.domain)
            + self._derp_json
            + self._dns_json
            + b',"packet_filters":{'
            + pf
            + b"}}}"
        )

    def full_map_frames(self, node_id: int) -> tuple[list[bytes], bytes] | None:
        """``node_id``'s full netmap for a zstd stream (None if it is not live): (zstd frames, the rest of
        the JSON) for :meth:`tailpy.proto.control.StreamSealer.seal_frames`. The same JSON object as
        :meth:`full_map_body` except that ``peers`` lists the recipient itself too (first, and in its
        block: clients drop their own id); every block of :data:`BLOCK` ids is one shared frame, compressed
        once per view until one of its nodes changes; only the head, the routers (reduced per recipient)
        and the tail are compressed per stream."""
        me = self._json.get(node_id)
        if me is None:
            return None
        if self.nodes[node_id].expired:
            body = self.full_map_body(node_id)
            return None if body is None else ([], body)
        head = b"".join((self._map_head(), b',"netmap":{"self":', me, b',"peers":[', me))
        frames = [mapcodec.compress(head)]
        view = None if self._compiled is None else self._compiled.visible_set(node_id)
        for b in sorted(self._blocks):
            f = self._block_frame(b, view)
            if f:
                frames.append(f)
        routers = [
            self._peer_json(node_id, i)
            for i in sorted(self._routers)
            if i != node_id and i in self._json and (view is None or i in view)
        ]
        extra = b"".join(b"," + r for r in routers)
        return frames, extra + self._map_tail(node_id)

    def _block_frame(self, b: int, view: frozenset[int] | None) -> bytes:
        """Block ``b``'s records (routers left out) that ``view`` holds (None: all), as one zstd frame of
        ``,record,record...`` (empty bytes: none). Cached per block and view."""
        cache = self._frames.setdefault(b, {})
        key = None if view is None else id(view)
        hit = cache.get(key)
        if hit is not None and hit[0] is view:
            return hit[1]
        js, routers = self._json, self._routers
        ids = sorted(i for i in self._blocks[b] if i not in routers and (view is None or i in view))
        frame = mapcodec.compress(b"".join(b"," + js[i] for i in ids)) if ids else b""
        if len(cache) >= 64:  # (many views: keep the memory bounded)
            cache.clear()
        cache[key] = (view, frame)
        return frame

    def full_map_sent(self, s: MapStream) -> None:
        """Record that ``s`` was just given a full netmap of the current version (with its filter and all its
        visible peers: nothing is pending)."""
        s.sent = self.version
        s.filter_sig = self._filter_sig(s.node_id)
        s.filter_epoch = None
        last, self._last_parts = self._last_parts, None
        if last is not None and last[0] == s.node_id:
            s.filter_parts = last[1]
        else:
            s.filter_parts = {k: hash(v) for k, v in self._filter_parts(s.node_id).items()}
        s.pend_changed.clear()
        s.pend_removed.clear()
        s.pend_derp = False
        s.expired_since = None

    async def serve(self, s: MapStream, write: Callable[[bytes], Awaitable[None]], keepalive: float) -> None:
        """Write ``s``'s messages with ``write`` (which applies backpressure) until it ends: a full netmap
        when due, else one merged delta of what changed since its last message (then ``batch_delay``
        seconds' pause), a keepalive after ``keepalive`` seconds of silence. Returns when the stream ended
        (node removed, server closing); write errors propagate."""
        s.keepalive = keepalive
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep_keepalives())
        while not s.ended:
            if s.resync:
                if not await self._write_full_map(s, write):
                    break
            elif s.first:
                await self._write_first(s, write)
            elif s.sent < self.version:
                if self.on_delta_written is None:
                    await self._write_delta(s, write)
                else:
                    await self._timed_delta(s, write, self.on_delta_written)
                self._delta_writes += s.paced  # (one delta per stream for one change is no load to pace)
                if self.batch_delay > 0 and not s.ended:
                    s.paced = True
                    if self._pacer is None or self._pacer.done():
                        self._rate_since = loop.time()
                        self._delta_writes = 0
                        self._pause = self.batch_delay
                        self._pacer = loop.create_task(self._release_paused())
                    s.wake.clear()
                    self._paused.append((loop.time(), s))
                    await s.wake.wait()  # (woken by _release_paused, or early by a policy change or end)
            else:
                s.paced = False
                s.wake.clear()
                s.idle_since = loop.time()
                self._idle.add(s)
                try:
                    await s.wake.wait()  # (a plain wait: a timeout per wait would cost a task per wake-up)
                finally:
                    self._idle.discard(s)
                if s.keepalive_due:
                    s.keepalive_due = False
                    if not s.ended and not s.resync and not s.first and s.sent >= self.version:
                        await write(s.sealer.seal(KEEPALIVE))

    async def _sweep_keepalives(self) -> None:
        """While streams are open: every quarter of the shortest keepalive (at most 1 s), wake the idle
        streams silent for their ``keepalive`` seconds to write a keepalive line. One timer for all
        streams instead of one per stream per wait."""
        loop = asyncio.get_running_loop()
        while self._streams:
            idle = list(self._idle)
            period = min([1.0, *(st.keepalive / 4 for st in idle if st.keepalive > 0)])
            now = loop.time()
            for st in idle:
                if st.keepalive > 0 and now - st.idle_since >= st.keepalive:
                    st.keepalive_due = True
                    st.wake.set()
            await asyncio.sleep(period)

    # Each message is built, sealed and written in a function of its own, so that no reference to it outlives
    # the write (a local of serve() would pin every idle stream's last full netmap: hundreds of MB).

    @contextlib.asynccontextmanager
    async def _full_turn(
        self, s: MapStream, write: Callable[[bytes], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Hold one of the ``full_map_concurrency`` slots for a large message of ``s``; while it waits for
        one, write a keepalive every ``s.keepalive`` seconds, so that its client, which counts a silent
        stream dead after a few keepalive intervals (:data:`tailpy.proto.control.SILENCE_KEEPALIVES`),
        does not give up and reconnect while thousands of streams wait for their first netmap (each
        reconnection would queue again, behind the others)."""
        sem = self._full_maps
        if not sem.locked():  # (a free slot: taken at once, no task, no trip through the event loop)
            await sem.acquire()
            try:
                yield
            finally:
                sem.release()
            return
        turn = asyncio.ensure_future(sem.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({turn}, timeout=s.keepalive if s.keepalive > 0 else None)
                if done:
                    break
                if s.ended:
                    break
                await write(s.sealer.seal(KEEPALIVE))
        except BaseException:
            turn.cancel()
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                sem.release()
            raise
        if not turn.done():  # (ended while waiting)
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn
            if turn.cancelled():
                yield
                return
        turn.result()
        try:
            yield
        finally:
            sem.release()

    async def _write_full_map(self, s: MapStream, write: Callable[[bytes], Awaitable[None]]) -> bool:
        async with self._full_turn(s, write):
            if s.ended:
                return False
            s.resync = False
            s.first = False
            if s.zstd:
                got = self.full_map_frames(s.node_id)
                if got is None:
                    return False
                self.full_map_sent(s)
                line = s.sealer.seal_frames(*got)
                del got
            else:
                body = self.full_map_body(s.node_id)
                if body is None:
                    return False
                self.full_map_sent(s)
                line = s.sealer.seal(body)
                del body
            await _write_line(write, line)
        return True

    async def _write_first(self, s: MapStream, write: Callable[[bytes], Awaitable[None]]) -> None:
        """The first message of a resumed stream: the delta since its resume point, built, sealed and
        written with the full netmaps (at most ``full_map_concurrency`` at once) when it is large (many
        streams resuming at once after a replica died must not each hold one)."""
        ids = self.changed_since(s.sent)
        large = ids is None or len(ids) > LARGE_DELTA
        del ids
        if not large:
            s.first = False
            body = self.delta_body(s, resumed=True)
            if body is not None:
                await _write_line(write, s.sealer.seal(body, zstd=s.zstd))
            return
        async with self._full_turn(s, write):
            if s.ended or not s.first:
                return
            s.first = False
            body = self.delta_body(s, resumed=True)
            if body is not None:
                line = s.sealer.seal(body, zstd=s.zstd)
                del body
                await _write_line(write, line)

    async def _release_paused(self) -> None:
        """While streams are paused after a delta: every ``batch_delay`` seconds wake those paused for the
        current pause, and every second scale the pause by the delta rate (:data:`DELTA_RATE`). One timer
        for all streams."""
        loop = asyncio.get_running_loop()
        paused = self._paused
        while paused:
            await asyncio.sleep(self.batch_delay)
            now = loop.time()
            if now - self._rate_since >= 1.0:
                rate = self._delta_writes / (now - self._rate_since)
                self._delta_writes, self._rate_since = 0, now
                self._pause = min(MAX_PAUSE, max(self.batch_delay, self._pause * rate / DELTA_RATE))
            due = now - self._pause + self.batch_delay / 2
            while paused and paused[0][0] <= due:
                paused.popleft()[1].wake.set()

    def shared_delta(self, s: MapStream) -> tuple[bool, bytes | None]:
        """The delta of ``s`` when it is the same for every stream at its version: (True, body or None when
        nothing changed), the body built once per (version it starts from, zstd) and moving ``s.sent`` as
        :meth:`delta_body` would; a zstd body is one frame of the JSON object without its closing brace
        (for ``seal_frames([frame], b"}")``). (False, None) when ``s``'s delta is its own: a policy, its own
        record changed, peers pending, a client without patches."""
        if (
            self._compiled is not None
            or not s.patches
            or s.pend_changed
            or s.pend_removed
            or s.pend_derp
            or s.filter_sig != self._filter_sig(s.node_id)
            or s.sent < self._log_floor
            or self._changed_at.get(s.node_id, 0) > s.sent
        ):
            return False, None
        me = self.nodes.get(s.node_id)
        if me is None or me.expired:
            return False, None
        if self._shared_version != self.version:
            self._shared.clear()
            self._shared_version = self.version
        key = (s.sent, s.zstd)
        if key in self._shared:
            s.sent = self.version
            return True, self._shared[key]
        body = self.delta_body(s)  # (nothing in it is s's own: the same for every stream at key)
        shared = body if body is None or not s.zstd else mapcodec.compress(body[:-1])
        self._shared[key] = shared
        return True, shared

    async def _write_delta(self, s: MapStream, write: Callable[[bytes], Awaitable[None]]) -> None:
        ok, shared = self.shared_delta(s)
        if ok:
            if shared is None:
                return
            if len(shared) > SHARED_LARGE:
                async with self._full_turn(s, write):
                    if s.ended or s.resync:
                        return
                    await self._write_shared(s, shared, write)
            else:
                await self._write_shared(s, shared, write)
            return
        large = self.version - s.sent > LARGE_DELTA  # (an upper bound of the nodes changed)
        if large:
            ids = self.changed_since(s.sent)
            large = ids is None or len(ids) > LARGE_DELTA
            del ids
        if not large:
            body = self.delta_body(s)
            if body is not None:
                await _write_line(write, s.sealer.seal(body, zstd=s.zstd))
            return
        async with self._full_turn(s, write):  # a large merged delta: built, sealed and written a few at once
            if s.ended or s.resync:
                return
            body = self.delta_body(s)
            if body is not None:
                line = s.sealer.seal(body, zstd=s.zstd)
                del body
                await _write_line(write, line)

    async def _timed_delta(
        self, s: MapStream, write: Callable[[bytes], Awaitable[None]], observe: Callable[[float], None]
    ) -> None:
        """:meth:`_write_delta`, then ``observe`` the seconds since the oldest change it carried (when a
        line was written and that change is still timed)."""
        oldest = s.sent + 1
        wrote = False

        async def counting(data: bytes) -> None:
            nonlocal wrote
            wrote = True
            await write(data)

        await self._write_delta(s, counting)
        if wrote and oldest > self.version - CHANGE_TIMES:
            observe(time.monotonic() - self._change_times[oldest % CHANGE_TIMES])

    async def _write_shared(
        self, s: MapStream, shared: bytes, write: Callable[[bytes], Awaitable[None]]
    ) -> None:
        line = s.sealer.seal_frames([shared], b"}") if s.zstd else s.sealer.seal(shared)
        await _write_line(write, line)


async def _write_line(write: Callable[[bytes], Awaitable[None]], line: bytes) -> None:
    """Write ``line`` in ``CHUNK``-byte slices, each waiting for the socket to drain, so the transport never
    holds a second copy of a large message."""
    if len(line) <= CHUNK:
        await write(line)
        return
    for i in range(0, len(line), CHUNK):
        await write(line[i : i + CHUNK])


_ALLOW_ALL_JSON = _dumps(filter_to_json(ALLOW_ALL))
_ALLOW_ALL_PARTS: Mapping[str, PartSpec | None] = {ALLOW_ALL_PART: None}


def _part_json(spec: PartSpec | None) -> bytes:
    return _ALLOW_ALL_JSON if spec is None else part_json(spec)


def _since(log: collections.deque[tuple[int, int]], version: int) -> Iterator[int]:
    """Node ids changed after ``version`` (newest first)."""
    for v, node_id in reversed(log):
        if v <= version:
            break
        yield node_id


__all__ = [
    "CHUNK",
    "KEEPALIVE",
    "LARGE_DELTA",
    "LOG_LIMIT",
    "POLICY_CHANGE",
    "MapStream",
    "Mapper",
    "parse_feed_point",
]
