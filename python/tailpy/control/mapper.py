"""Netmap distribution: the server's view of every node, its map streams, and the deltas it fans out.

Wire format of a map stream (``POST /machine/map``; response ``application/x-ndjson``, chunked): one line
per message, each line the base64 NaCl box (server machine key -> node machine key, see
:mod:`tailpy.proto.control`) of one compact JSON object, ``\\n`` terminated. Every object ends with
``"reply_to"`` (the request's ``nonce_id``) and ``"seq"`` (0, 1, 2, ... per stream). Types:

* ``{"type": "netmap", "generation": G, "version": V, "netmap": NetMap JSON}``: the full netmap. First on a
  stream that does not resume, and again whenever the stream fell behind (its queue overflowed).
* ``{"type": "delta", "version": V, "self"?: Node JSON, "peers_changed"?: [Node JSON], "peers_removed"?:
  [node id]}``: what changed (:class:`tailpy.netmap.MapDelta`); a changed peer carries its full new record
  (endpoints, keys, name, online, expiry, ...). The first message of a resumed stream is a delta that also
  carries ``"generation"`` (everything that changed since the version the client named; possibly empty).
* ``{"type": "keepalive"}`` after ``keepalive`` seconds of silence.

``generation`` is 32 hex characters chosen when the server process starts; ``version`` counts the changes the
server published (every node add/change/remove is one version). A client that reconnects sends
``"resume": {"generation": G, "version": V}`` in its map request (V: the version of the last message it
applied); when G is the current generation and the server's change log still reaches back to V, the stream
starts with a delta of the nodes changed since V, else with a full netmap.

Costs: a change is one JSON encoding shared by every stream plus one NaCl seal per stream that can see the
node (every stream today: there are no ACLs yet); a stream's messages wait in a bounded queue of shared
encoded bodies (when several are waiting, the writer merges them into one delta and seals once); a stream
whose queue overflows (a slow reader) drops it and gets one full netmap when it
catches up.
Full netmaps are built from per-node JSON cached here, at most ``full_map_concurrency`` at a time. Nothing
here touches the database: the server reads records and hands them in.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tailpy.asyncutil import wait_event
from tailpy.keys import MachinePrivate, MachinePublic
from tailpy.netmap import NetMap, Node
from tailpy.proto import control as proto

log = logging.getLogger("tailpy.control")

QUEUE_LIMIT = 512
"""Messages a stream may have waiting before it is dropped to a full resync."""

LOG_LIMIT = 65536
"""Changes remembered for resuming streams."""

KEEPALIVE = b'{"type":"keepalive"}'

LARGE = 64 << 10
"""Bytes above which a write waits its turn with full netmaps (at most ``full_map_concurrency`` at once), so
that many streams catching up at once do not each hold a large message in their socket buffers."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Change:
    """One published change, shared by every stream's queue: ``node_json`` None means removed; the two
    bodies are the encoded delta messages for peers and for the node's own streams."""

    version: int
    node_id: int
    node_json: bytes | None
    to_peers: bytes
    to_self: bytes


@dataclass(eq=False)
class MapStream:
    """One open map stream: its node, sealer and queue of changes (shared between streams)."""

    node_id: int
    machine_key: MachinePublic
    sealer: proto.StreamSealer
    limit: int = QUEUE_LIMIT
    queue: collections.deque[Change | bytes] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = False  # a full netmap is due (first message, or the queue overflowed)
    ended: bool = False  # the node was removed or the server is closing: end the stream
    overflows: int = 0

    def push(self, body: Change | bytes) -> None:
        """Queue ``body`` (a change, or an encoded message; O(1)); on overflow drop the queue and ask for a
        full netmap instead."""
        if self.resync or self.ended:
            return
        if len(self.queue) >= self.limit:
            self.queue.clear()
            self.resync = True
            self.overflows += 1
        else:
            self.queue.append(body)
        self.wake.set()

    def take(self) -> list[bytes]:
        """Empty the queue into encoded message bodies: one change as its shared body; several consecutive
        changes merged into one delta (latest record per node), so a stream that fell behind pays one seal."""
        out: list[bytes] = []
        run: list[Change] = []
        for item in self.queue:
            if isinstance(item, Change):
                run.append(item)
                continue
            out += self._merge(run)
            run = []
            out.append(item)
        out += self._merge(run)
        self.queue.clear()
        return out

    def _merge(self, run: list[Change]) -> list[bytes]:
        if len(run) <= 1:
            return [c.to_self if c.node_id == self.node_id else c.to_peers for c in run]
        me: bytes | None = None
        changed: dict[int, bytes] = {}
        removed: set[int] = set()
        for c in run:
            if c.node_id == self.node_id:
                me = c.node_json or me
            elif c.node_json is None:
                changed.pop(c.node_id, None)
                removed.add(c.node_id)
            else:
                removed.discard(c.node_id)
                changed[c.node_id] = c.node_json
        parts = [b'{"type":"delta","version":%d' % run[-1].version]
        if me is not None:
            parts.append(b'"self":' + me)
        if changed:
            parts.append(b'"peers_changed":[' + b",".join(changed.values()) + b"]")
        if removed:
            parts.append(b'"peers_removed":' + _dumps(sorted(removed)))
        return [b",".join(parts) + b"}"]

    def end(self) -> None:
        self.ended = True
        self.queue.clear()
        self.wake.set()


class Mapper:
    """Every live node as peers see it (``online`` set from open streams), and the streams to tell.

    ``server_key`` seals stream messages; ``domain`` goes into netmaps. Call :meth:`load` with the store's
    nodes first, :meth:`publish` / :meth:`remove` for every change, :meth:`open_stream` / :meth:`serve` /
    :meth:`close_stream` per map request.
    """

    def __init__(
        self,
        server_key: MachinePrivate,
        domain: str,
        *,
        queue_limit: int = QUEUE_LIMIT,
        log_limit: int = LOG_LIMIT,
        full_map_concurrency: int = 8,
    ) -> None:
        self.server_key = server_key
        self.domain = domain
        self.generation = secrets.token_hex(16)
        self.version = 0
        self.queue_limit = queue_limit
        self.nodes: dict[int, Node] = {}
        self._json: dict[int, bytes] = {}
        self._changed_at: dict[int, int] = {}  # node id -> version of its last change
        self._log: collections.deque[tuple[int, int]] = collections.deque(maxlen=log_limit)
        self._log_floor = 0  # every change with a version above this is in _log
        self._streams: set[MapStream] = set()
        self._by_node: dict[int, set[MapStream]] = {}
        self._full_maps = asyncio.Semaphore(full_map_concurrency)

    # --- state ---

    def is_online(self, node_id: int) -> bool:
        """True while node ``node_id`` has a map stream open."""
        return bool(self._by_node.get(node_id))

    @property
    def streams(self) -> int:
        return len(self._streams)

    def netmap(self, node_id: int) -> NetMap | None:
        """Node ``node_id``'s full netmap (O(nodes)), None if it is not live."""
        me = self.nodes.get(node_id)
        if me is None:
            return None
        return NetMap(me, {i: n for i, n in self.nodes.items() if i != node_id}, self.domain)

    def load(self, nodes: Iterable[Node]) -> None:
        """Set the starting records (no stream is told: call before streams open)."""
        for n in nodes:
            n = self._with_online(n)
            self.nodes[n.id] = n
            self._json[n.id] = _dumps(n.to_json())

    def _with_online(self, node: Node) -> Node:
        online = self.is_online(node.id)
        return node if node.online == online else dataclasses.replace(node, online=online)

    def _bump(self, node_id: int) -> int:
        if len(self._log) == self._log.maxlen:
            self._log_floor = self._log[0][0]
        self.version += 1
        self._log.append((self.version, node_id))
        self._changed_at[node_id] = self.version
        return self.version

    # --- changes ---

    def publish(self, node: Node) -> bool:
        """``node``'s record as the store has it (``online`` is replaced by the stream count). If it differs
        from what streams were told, send every stream a delta: ``self`` to the node's own streams,
        ``peers_changed`` to the others. O(streams) seals happen later, in each stream's writer. Returns
        whether anything was sent."""
        node = self._with_online(node)
        if self.nodes.get(node.id) == node:
            return False
        v = self._bump(node.id)
        self.nodes[node.id] = node
        j = self._json[node.id] = _dumps(node.to_json())
        head = b'{"type":"delta","version":%d,' % v
        change = Change(v, node.id, j, head + b'"peers_changed":[' + j + b"]}", head + b'"self":' + j + b"}")
        for s in self._streams:
            s.push(change)
        return True

    def remove(self, node_id: int) -> bool:
        """Node ``node_id`` left the tailnet: peers get ``peers_removed``, its own streams end. Returns
        whether it was known."""
        if self.nodes.pop(node_id, None) is None:
            return False
        del self._json[node_id]
        v = self._bump(node_id)
        body = b'{"type":"delta","version":%d,"peers_removed":[%d]}' % (v, node_id)
        change = Change(v, node_id, None, body, body)
        for s in self._streams:
            if s.node_id == node_id:
                s.end()
            else:
                s.push(change)
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
        self, node_id: int, machine_key: MachinePublic, reply_to: str, resume: tuple[str, int] | None = None
    ) -> MapStream:
        """Register a stream for ``node_id`` (it counts as online from now: publish its record next). Its
        first message is a delta since ``resume`` ((generation, version)) when the change log reaches back
        that far, else a full netmap."""
        s = MapStream(
            node_id, machine_key, proto.StreamSealer(self.server_key, machine_key, reply_to), self.queue_limit
        )
        first = self._resume_body(node_id, resume) if resume is not None else None
        if first is None:
            s.resync = True
        else:
            s.queue.append(first)
        self._streams.add(s)
        self._by_node.setdefault(node_id, set()).add(s)
        return s

    def _resume_body(self, node_id: int, resume: tuple[str, int]) -> bytes | None:
        generation, since = resume
        if generation != self.generation or not self._log_floor <= since <= self.version:
            return None
        ids = set(_since(self._log, since))
        body: dict[str, Any] = {"type": "delta", "generation": self.generation, "version": self.version}
        parts = [_dumps(body)[:-1]]
        if node_id in ids and node_id in self._json:
            parts.append(b'"self":' + self._json[node_id])
        changed = [self._json[i] for i in sorted(ids) if i != node_id and i in self._json]
        if changed:
            parts.append(b'"peers_changed":[' + b",".join(changed) + b"]")
        removed = sorted(i for i in ids if i not in self._json)
        if removed:
            parts.append(b'"peers_removed":' + _dumps(removed))
        return b",".join(parts) + b"}"

    def close_stream(self, s: MapStream) -> None:
        """Forget ``s`` (publish the node's record next: it may have gone offline)."""
        self._streams.discard(s)
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
        byte joins of cached node JSON, no per-node encoding."""
        me = self._json.get(node_id)
        if me is None:
            return None
        head = _dumps({"type": "netmap", "generation": self.generation, "version": self.version})[:-1]
        peers = b",".join([j for i, j in self._json.items() if i != node_id])
        tail = b'],"domain":' + _dumps(self.domain) + b"}}"
        return b"".join((head, b',"netmap":{"self":', me, b',"peers":[', peers, tail))

    async def serve(self, s: MapStream, write: Callable[[bytes], Awaitable[None]], keepalive: float) -> None:
        """Write ``s``'s messages with ``write`` (which applies backpressure) until it ends: queued deltas
        in one write per wake-up, a full netmap when due, a keepalive after ``keepalive`` seconds of
        silence. Returns when the stream ended (node removed, server closing); write errors propagate."""
        while not s.ended:
            if s.resync:
                async with self._full_maps:
                    if s.ended:
                        break
                    s.resync = False
                    s.queue.clear()
                    body = self.full_map_body(s.node_id)
                    if body is None:
                        break
                    await write(s.sealer.seal(body))
                continue
            if s.queue:
                bodies = s.take()
                if sum(map(len, bodies)) < LARGE:
                    await write(b"".join([s.sealer.seal(b) for b in bodies]))
                else:  # a merged delta of many nodes: bound the bytes in flight like full netmaps
                    async with self._full_maps:
                        await write(b"".join([s.sealer.seal(b) for b in bodies]))
                continue
            s.wake.clear()
            if not await wait_event(s.wake, keepalive):
                await write(s.sealer.seal(KEEPALIVE))


def _since(log: collections.deque[tuple[int, int]], version: int) -> Iterator[int]:
    """Node ids changed after ``version`` (newest first)."""
    for v, node_id in reversed(log):
        if v <= version:
            break
        yield node_id


__all__ = ["KEEPALIVE", "LOG_LIMIT", "QUEUE_LIMIT", "Change", "MapStream", "Mapper"]
