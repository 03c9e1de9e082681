"""Control replicas: several ``tailpy control serve`` processes on one database serve one tailnet.

Each :class:`~tailpy.control.server.ControlServer` runs one :class:`Replicas`, which does two things:

* **Follows the change feed** (:mod:`tailpy.control.store.changes`): every write that changes what nodes see
  (by this replica, another one, or a ``tailpy control`` admin command writing straight to the database)
  appends a row in its own transaction; the replica reads the rows after the last sequence number it
  applied, re-reads the nodes they name (and which of them stream on other live replicas) and publishes them
  to its mapper; a policy, settings or users change reloads that. It reads when PostgreSQL's ``NOTIFY``
  wakes its ``LISTEN`` connection (psycopg, asynchronous), and every ``poll_interval`` seconds besides (the
  only trigger with SQLite, and a safety net if a notification is lost).
* **Liveness** (on with PostgreSQL, or when a replica id is given): a heartbeat row refreshed every
  ``heartbeat`` seconds, a ``node_streams`` row per node this replica holds a map stream of. A replica whose
  heartbeat is :data:`STALE_BEATS` intervals old is dead: the first live replica to notice removes it and its
  stream rows, so its nodes go offline on every replica (unless they already stream elsewhere), each as a
  change of the feed. A node is online while it streams on a live replica (:meth:`Replicas.online`).
  The row also records the replica's embedded DERP relay (:attr:`Replicas.relay`); after each heartbeat
  :attr:`Replicas.on_relays` gets the live replicas' relays (the DERP mesh of a region and the DERP map
  follow them: :mod:`tailpy.control.derpmesh`).
  A replica judges others dead only after its own heartbeats have succeeded for a whole stale window (after
  a database outage every row is old: the first replica back must not reap the others, which are about to
  beat again). A replica whose heartbeats fail for a stale window ends its map streams (the others count it
  dead by then: its nodes reconnect to a replica that can reach the database instead of being shown offline).
  Each process's row carries a random token: a second process started with a replica id whose row beats
  under another token is refused (:class:`ReplicaConflict`), and a process whose row was taken over stops.

* **Primary subnet routers** (:class:`~tailpy.control.primaries.StoredPrimaries`, the mapper's election):
  the primary of each subnet prefix is a row of the database's ``route_primaries`` table, settled by
  whichever replica notices a router's eligibility change (compare-and-set in one transaction, eligibility
  from the database: served, key valid, streaming on a live replica); the row change is a ``"routes"`` row
  of the feed, so every replica republishes both routers. A replica that starts reads the table, so
  replicas with different histories show the same primary.

Streams keep per-replica versions: the mapper's ``generation`` is the process's and its ``version`` counts
that process's publications. The feed's sequence is not used as the stream version because a replica
publishes its own writes at once (before the feed echoes them) and logs changes no row records (policy
recompiles, stream counts), so the two orders differ. Instead, after each read of the feed (synchronous: it
publishes what it read with nothing else in between) the replica marks its mapper with the sequence number
read up to (:meth:`~tailpy.control.mapper.Mapper.feed_applied`), and every message carries the newest mark
as a resume point (``"<feed id>.<seq>.<time>"``, the feed id from
:func:`~tailpy.control.store.changes.feed_id`). A node that moves to another replica sends it back, and that
replica resumes its stream with a delta from its own newest mark at or before that sequence number
(:meth:`~tailpy.control.mapper.Mapper.resume_point`; it reads the feed first when the node's replica was
ahead, :meth:`Replicas.catch_up`). So the nodes of a dead replica move with one small delta each, not a full
netmap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from tailpy.asyncutil import wait_event
from tailpy.control.mapper import parse_feed_point
from tailpy.control.primaries import StoredPrimaries
from tailpy.control.store import changes, primaries, schema
from tailpy.control.store import nodes as node_repo
from tailpy.errors import ConfigError
from tailpy.netmap import Node

if TYPE_CHECKING:
    from tailpy.control.server import ControlServer

log = logging.getLogger("tailpy.control")

HEARTBEAT = 2.0
"""Seconds between a replica's heartbeats."""
STALE_BEATS = 3
"""Missed heartbeats after which a replica counts as dead (its nodes go offline)."""
FEED_POLL = 1.0
"""Seconds between reads of the change feed without a notification (SQLite's only trigger)."""
FEED_BATCH_DELAY = 0.05
"""Seconds after a read of the feed before the next (a burst of writes is read as one batch)."""
UNJUDGED = 1e9
"""The stale window (seconds) of a replica that has not beaten for a whole window yet: nobody is dead."""
OPEN_WINDOW = 0.002
"""Seconds a new stream row waits for others to share its transaction (many streams open at once when a
replica's nodes move here)."""
PRUNE_INTERVAL = 60.0
"""Seconds between prunings of the change feed (by each replica: all but the newest
:data:`~tailpy.control.store.changes.KEEP` rows go)."""


@dataclass(frozen=True)
class Liveness:
    """Who is alive, at one moment (:meth:`Replicas.live`): ``online`` the ids of the nodes with a map
    stream on a live replica; ``replicas`` live replica id -> advertised URL (this one included)."""

    online: frozenset[int]
    replicas: Mapping[str, str]

    def node_online(self, node_id: int) -> bool:
        return node_id in self.online


class ReplicaConflict(ConfigError):
    """Another live process holds this replica id (its row beats under another process token)."""


def new_replica_id() -> str:
    """A random replica id (``r-`` and 8 hex digits)."""
    return "r-" + secrets.token_hex(4)


def _listen_url(url: str) -> str:
    """psycopg's connection string for SQLAlchemy URL ``url`` (``postgresql+psycopg://`` -> libpq URI)."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Replicas:
    """The replica side of one control server (see the module docstring).

    ``replica_id``: this replica's id (None: a random one); ``url``: where nodes reach it (advertised in the
    ``replicas`` table); ``liveness``: keep heartbeats and stream rows (None: when the database is
    PostgreSQL or ``replica_id`` was given); ``heartbeat``: seconds between heartbeats; ``poll_interval``:
    seconds between reads of the feed without a notification. :attr:`seq` is the last feed sequence number
    applied; :attr:`applied` counts reads that brought changes (for tests and diagnostics)."""

    def __init__(
        self,
        server: ControlServer,
        *,
        replica_id: str | None = None,
        url: str = "",
        liveness: bool | None = None,
        heartbeat: float = HEARTBEAT,
        poll_interval: float = FEED_POLL,
    ) -> None:
        self.server = server
        self.store = server.store
        self.engine = server.store.engine
        self.postgres = self.engine.dialect.name == "postgresql"
        self.id = replica_id or new_replica_id()
        self.url = url
        self.liveness = (self.postgres or replica_id is not None) if liveness is None else liveness
        self.heartbeat_interval = heartbeat
        self.poll_interval = poll_interval
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.token = secrets.token_hex(8)
        """This process's token in its row (another process of the same replica id has another)."""
        self._beating_since: float | None = None  # monotonic time of the first beat of the current good run
        self._last_beat: float | None = None  # monotonic time of the last good beat
        self._severed = False  # heartbeats failed for a stale window: streams ended, new ones refused
        self._unclosed: set[int] = set()  # stream rows whose removal failed (database unreachable)
        self._opening: set[int] = set()  # stream rows waiting for their grouped insert (OPEN_WINDOW)
        self._open_timer: asyncio.TimerHandle | None = None
        self._unopened: set[int] = set()  # stream rows whose insert failed (written at the next heartbeat)
        self.on_fatal: Callable[[str], None] | None = None
        """Called with a sentence when this replica must stop (its row was taken over by another process);
        None: the replica only logs it and ends its streams."""
        self.applied = 0
        self.elsewhere: dict[int, str] = {}  # node id -> the other live replica holding its stream
        self._alive: dict[str, str] = {}
        self._local: set[int] = set()  # nodes with a stream here (as recorded in node_streams)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._beating: asyncio.Future[tuple[list[str], dict[str, str] | None]] | None = None
        self._running = False
        self.relay: str | None = None
        """This replica's embedded DERP relay as recorded in its row (a one-region DERP map region, JSON;
        None: none). Set before :meth:`start`."""
        self.on_relays: Callable[[dict[str, str]], None] | None = None
        """Called after each heartbeat with replica id -> recorded relay of every live replica that has one
        (this one included); exceptions are logged."""
        with self.engine.begin() as conn:
            self.seq = changes.last_seq(conn)
            if self.liveness:
                server.mapper.feed_id = changes.feed_id(conn)
        self.primaries = StoredPrimaries(
            self.engine, shared=self.liveness, clock=server.clock, stale=lambda: self.stale
        )
        """The primary subnet routers, as the database has them (the mapper's election)."""
        server.mapper.primary = self.primaries

    @property
    def stale(self) -> float:
        """Seconds without a heartbeat after which a replica is dead, as this replica judges now: an
        unbounded window (nobody is dead) until its own heartbeats have succeeded for
        :attr:`stale_window` seconds in a row."""
        if self._beating_since is None or time.monotonic() - self._beating_since < self.stale_window:
            return UNJUDGED
        return self.stale_window

    @property
    def stale_window(self) -> float:
        """Seconds without a heartbeat after which a replica is dead (:data:`STALE_BEATS` heartbeats)."""
        return STALE_BEATS * self.heartbeat_interval

    @property
    def severed(self) -> bool:
        """True while this replica's heartbeats have failed for a stale window (its streams were ended)."""
        return self._severed

    # --- what the rest of control asks ---

    def online(self, node_id: int) -> bool:
        """True when node ``node_id`` has a map stream on a live replica (this one or another)."""
        return self.server.is_online(node_id) or node_id in self.elsewhere

    def online_nodes(self) -> set[int]:
        """Ids of the nodes with a map stream on a live replica."""
        return self.server.streaming() | set(self.elsewhere)

    def live(self) -> Liveness:
        """Which nodes are online and which replicas alive, as this replica knows now (from its own streams,
        the last feed read and the last heartbeat): what an election among nodes (a primary subnet router)
        decides on. O(online nodes)."""
        return Liveness(frozenset(self.online_nodes()), self.alive())

    def alive(self) -> dict[str, str]:
        """Replica id -> advertised URL of the live replicas (as of the last heartbeat; this one always)."""
        return {**self._alive, self.id: self.url}

    # --- lifecycle ---

    async def start(self) -> None:
        """Start following the feed (and, with liveness, the heartbeat); reads the other replicas' streams
        first so that nodes streaming elsewhere count as online."""
        self._running = True
        if self.liveness:
            await self._claim()
            with self.engine.begin() as conn:  # what an earlier process of this id left (killed): no streams
                changes.leave(conn, self.id)
            self._beat()
            with self.engine.begin() as conn:
                self.elsewhere = changes.streaming_elsewhere(conn, None, self.id, list(self._alive))
            self.server.mapper.elsewhere = set(self.elsewhere)
            for node_id in self.elsewhere:
                known = self.server.mapper.nodes.get(node_id)
                if known is not None:
                    self.server.mapper.publish(known)  # (online now)
            self._tasks.append(asyncio.create_task(self._heartbeats(), name="replica-heartbeat"))
        self._reroute(self.primaries.settle_all())  # (rows naming routers that went offline meanwhile)
        self._tasks.append(asyncio.create_task(self._follow(), name="change-feed"))
        if self.postgres:
            self._tasks.append(asyncio.create_task(self._listen(), name="change-listen"))

    async def stop(self) -> None:
        """Stop; with liveness, remove this replica's row and stream rows (its nodes go offline on the
        others at once, until they reconnect there)."""
        self._running = False
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        self._opening.clear()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._beating is not None:  # (a heartbeat in its thread would record this replica again)
            with contextlib.suppress(Exception):
                await self._beating
            self._beating = None
        if self.liveness:
            try:
                with self.engine.begin() as conn:
                    changes.leave(conn, self.id)
            except sa.exc.SQLAlchemyError as e:
                log.warning("replica %s: could not leave the replicas table: %s", self.id, e)
            self._local.clear()

    async def _claim(self) -> None:
        """Refuse to start (:class:`ReplicaConflict`) while another process beats under this replica id: a
        row with another token whose heartbeat is fresh is watched for up to two heartbeats (a process of
        this id killed just now beats no more: it is taken over)."""
        loop = asyncio.get_running_loop()
        first: tuple[str | None, float] | None = None
        deadline = loop.time() + 2 * self.heartbeat_interval + 0.5
        while True:
            with self.engine.begin() as conn:
                now = changes.db_now(conn)
                held = changes.holder(conn, self.id)
            if held is None or held[0] in (None, self.token) or now - held[1] >= self.stale_window:
                return
            if first is None:
                first = held
            elif held[1] != first[1]:
                raise ReplicaConflict(
                    f"another control process is running as replica {self.id!r} (its heartbeat is "
                    f"{now - held[1]:.1f} s old): give each replica its own --replica-id"
                )
            if loop.time() >= deadline:
                return
            await asyncio.sleep(min(0.25, self.heartbeat_interval / 4))

    def opened(self, node_id: int) -> None:
        """This replica now holds a map stream of ``node_id`` (its first). Its row is written within
        :data:`OPEN_WINDOW` seconds, in one transaction with the rows of the streams opening meanwhile; a
        row the database does not take is written at the next good heartbeat."""
        if not self.liveness or not self._running:
            return
        self._local.add(node_id)
        self._opening.add(node_id)
        if self._open_timer is None:
            self._open_timer = asyncio.get_running_loop().call_later(OPEN_WINDOW, self._write_opened)

    def _write_opened(self) -> None:
        self._open_timer = None
        ids, self._opening = self._opening, set()
        if not ids or not self._running:
            return
        try:
            with self.engine.begin() as conn:
                changes.streams_opened(conn, ids, self.id, time.time())
        except sa.exc.SQLAlchemyError as e:
            log.warning("replica %s: could not record %d map streams: %s", self.id, len(ids), _short(e))
            self._unopened |= ids

    def closed(self, node_id: int) -> None:
        """This replica's last map stream of ``node_id`` ended."""
        self._local.discard(node_id)
        self._unopened.discard(node_id)
        if node_id in self._opening:  # (its row was never written)
            self._opening.discard(node_id)
            return
        if not self.liveness or not self._running:
            return
        try:
            with self.engine.begin() as conn:
                changes.stream_closed(conn, node_id, self.id)
        except sa.exc.SQLAlchemyError:
            self._unclosed.add(node_id)  # (removed at the next good heartbeat)
            return
        self._unclosed.discard(node_id)

    def wake(self) -> None:
        """Read the feed soon (a notification arrived, or a caller knows of a write)."""
        self._wake.set()

    # --- the feed ---

    def apply(self) -> int:
        """Read the feed after :attr:`seq` and publish what it names; returns how many rows' worth of nodes
        and kinds were applied (0: nothing new). Synchronous: no other publication interleaves."""
        server = self.server
        total = 0
        while True:
            with self.engine.begin() as conn:
                batch = changes.read_since(conn, self.seq)
                if batch.seq == self.seq:
                    break
                if batch.lost:
                    found: list[Node] | None = None
                else:
                    found = self._read_nodes(conn, batch.nodes, server.clock())
                if self.liveness:
                    self._alive = changes.alive(conn, changes.db_now(conn), self.stale)
                    ids = None if batch.lost else batch.nodes
                    seen = changes.streaming_elsewhere(conn, ids, self.id, list(self._alive))
                again = batch.lost or changes.ROUTES in batch.kinds or self.primaries.dirty
                routes = primaries.read_all(conn) if again else None
            self.seq = batch.seq
            self.applied += 1
            total += len(batch.nodes) + len(batch.kinds)
            if self.liveness:
                if batch.lost:
                    self.elsewhere = seen
                else:
                    for i in batch.nodes:
                        self.elsewhere.pop(i, None)
                    self.elsewhere.update(seen)
                server.mapper.elsewhere = set(self.elsewhere)
            if routes is not None:  # (before the batch's records are published: they show the new primaries)
                self._reroute(self.primaries.sync(routes) - batch.nodes)
            if found is None:
                log.warning("change feed: pruned past this replica's position; reloading every node")
                server._changed()
            else:
                by_id = {n.id: n for n in found}
                for i in sorted(batch.nodes):
                    n = by_id.get(i)
                    if n is None:
                        server.publish_removed(i)
                    else:
                        server.mapper.publish(n)
            if changes.USERS in batch.kinds:
                server.users_changed()
            if changes.SETTINGS in batch.kinds:
                server.dns_changed()
            if changes.POLICY in batch.kinds and server.policy.path is None:
                server.policy.reload()
            server.mapper.feed_applied(batch.seq)  # (synchronous: nothing else was published meanwhile)
        if total:
            server._lifecycle()
        return total

    def catch_up(self, point: str) -> None:
        """Read the feed now when the map stream resume point ``point`` (``"<feed id>.<seq>.<time>"``, see
        :mod:`tailpy.control.mapper`) is ahead of this replica, so that its node resumes here with a delta
        (it came from a replica that read the feed more recently). A database error is logged: the stream
        then starts with a full netmap."""
        parsed = parse_feed_point(point)
        if parsed is None or parsed[0] != self.server.mapper.feed_id or parsed[1] <= self.seq:
            return
        try:
            self.apply()
        except sa.exc.SQLAlchemyError as e:
            log.warning("change feed: cannot read the database: %s", _short(e))

    def _reroute(self, ids: set[int]) -> None:
        """The primary routes of nodes ``ids`` changed: publish their records again."""
        mapper = self.server.mapper
        for i in sorted(ids):
            known = mapper.nodes.get(i)
            if known is not None:
                mapper.publish(known)

    @staticmethod
    def _read_nodes(conn: sa.Connection, ids: frozenset[int], now: float) -> list[Node]:
        out: list[Node] = []
        order = sorted(ids)
        nodes = schema.nodes
        for i in range(0, len(order), 500):
            q = node_repo.query().where(nodes.c.id.in_(order[i : i + 500]), nodes.c.deleted.is_(None))
            out += [node_repo.to_node(r, now) for r in conn.execute(q)]
        return out

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        pruned = loop.time()
        failing = False
        while True:
            await wait_event(self._wake, self.poll_interval)
            self._wake.clear()
            try:
                self.apply()
                if loop.time() - pruned >= PRUNE_INTERVAL:
                    pruned = loop.time()
                    with self.engine.begin() as conn:
                        changes.prune(conn)
            except sa.exc.SQLAlchemyError as e:
                if not failing:  # (once per outage, not once per poll)
                    log.warning("change feed: cannot read the database: %s", _short(e))
                    failing = True
            else:
                if failing:
                    log.warning("change feed: reading the database again")
                    failing = False
            await asyncio.sleep(FEED_BATCH_DELAY)

    async def _listen(self) -> None:
        """PostgreSQL ``LISTEN`` on :data:`~tailpy.control.store.changes.CHANNEL`: each notification wakes
        the feed reader; reconnects after a second when the connection drops."""
        import psycopg

        conninfo = _listen_url(self.store.url)
        lost = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {changes.CHANNEL}")
                    if lost:
                        log.warning("change feed: LISTEN connection back")
                        lost = False
                    self._wake.set()  # whatever was written while not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as e:
                if not lost:  # (once until it is back, not once per attempt)
                    log.warning(
                        "change feed: LISTEN connection lost (%s); reconnecting every second", _short(e)
                    )
                    lost = True
            await asyncio.sleep(1.0)

    # --- liveness ---

    def _beat(self) -> list[str]:
        """One heartbeat on the event loop (at start): :meth:`_beat_db`, then :meth:`_beat_done`."""
        local, unclosed, unopened = self._beat_state()
        dead, relays = self._beat_db(local, unclosed, unopened)
        self._beat_done(unclosed, unopened, relays)
        return dead

    async def _beat_off_loop(self) -> list[str]:
        """One heartbeat whose database work runs in a worker thread, so that a slow database (a lock held
        by a hung replica, a lost connection) never stalls this replica's map streams."""
        local, unclosed, unopened = self._beat_state()
        self._beating = asyncio.ensure_future(asyncio.to_thread(self._beat_db, local, unclosed, unopened))
        dead, relays = await asyncio.shield(self._beating)
        self._beat_done(unclosed, unopened, relays)
        return dead

    def _beat_state(self) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
        """What a heartbeat writes besides the replica's row: (nodes streaming here, stream rows whose
        removal failed, stream rows of nodes still streaming here whose insert failed)."""
        local = frozenset(self._local)
        return local, frozenset(self._unclosed), frozenset(self._unopened) & local

    def _beat_db(
        self, local: frozenset[int], unclosed: frozenset[int], unopened: frozenset[int] = frozenset()
    ) -> tuple[list[str], dict[str, str] | None]:
        """The database part of a heartbeat (any thread; reads no mutable state of this object but
        ``local``, the nodes streaming here, ``unclosed``, stream rows whose removal failed, and
        ``unopened``, stream rows whose insert failed): refresh this replica's row (re-recording its
        streams when another replica took it for dead), remove dead replicas, note the live ones. Returns
        the ids removed and, with :attr:`on_relays`, the live replicas' relays."""
        stale = self.stale
        with self.engine.begin() as conn:
            now = changes.db_now(conn)
            known = conn.execute(
                sa.select(changes.replicas.c.id).where(changes.replicas.c.id == self.id)
            ).first()
            if not changes.heartbeat(
                conn, self.id, self.url, now, started=self.started, derp=self.relay, token=self.token
            ):
                raise ReplicaConflict(
                    f"control replica {self.id!r}: another process took over this replica id: stopping "
                    "(give each replica its own --replica-id)"
                )
            # (reaped while it could not beat: all its streams again; else those whose insert failed)
            changes.streams_opened(conn, local if known is None else unopened, self.id, now)
            for node_id in sorted(unclosed - local):
                changes.stream_closed(conn, node_id, self.id)
            dead = changes.reap(conn, now, stale)
            self._alive = changes.alive(conn, now, stale)
            relays = changes.relays(conn, now, stale) if self.on_relays is not None else None
        return dead, relays

    def _beat_done(
        self, unclosed: frozenset[int], unopened: frozenset[int], relays: dict[str, str] | None
    ) -> None:
        """The event-loop part of a good heartbeat: forget the stream rows it removed or wrote, note the
        time, tell :attr:`on_relays`."""
        self._unclosed -= unclosed
        self._unopened -= unopened
        mono = time.monotonic()
        if self._beating_since is None:
            self._beating_since = mono
        self._last_beat = mono
        if relays is not None and self.on_relays is not None:
            try:
                self.on_relays(relays)
            except Exception:
                log.exception("replica %s: following the replicas' DERP relays failed", self.id)

    async def _heartbeats(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                dead = await self._beat_off_loop()
            except ReplicaConflict as e:
                log.error("%s", e)
                self._sever()
                if self.on_fatal is not None:
                    self.on_fatal(str(e))
                return
            except sa.exc.SQLAlchemyError as e:
                self._beating_since = None  # (others' rows age meanwhile: judge them only after a window)
                if not failing:
                    log.warning("replica %s: heartbeat failed: %s", self.id, _short(e))
                    failing = True
                last = self._last_beat if self._last_beat is not None else self.started_mono
                if not self._severed and time.monotonic() - last >= self.stale_window:
                    log.warning(
                        "replica %s: no heartbeat for %.0f s (the database cannot be reached): ending its "
                        "%d map streams so that their nodes move to another replica",
                        self.id,
                        time.monotonic() - last,
                        len(self.server.streaming()),
                    )
                    self._sever()
                continue
            if failing:
                log.warning("replica %s: heartbeat succeeded again", self.id)
                failing = False
            self._severed = False
            if dead:
                log.warning("control replicas %s stopped beating: their nodes are offline", ", ".join(dead))
                self._wake.set()

    def _sever(self) -> None:
        """End every map stream (they come back here or elsewhere once this replica can serve them)."""
        self._severed = True
        self.server.mapper.end_all()


def _short(e: BaseException) -> str:
    """The first line of a database error (SQLAlchemy appends the statement and a link)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


__all__ = [
    "FEED_POLL",
    "HEARTBEAT",
    "STALE_BEATS",
    "UNJUDGED",
    "Liveness",
    "ReplicaConflict",
    "Replicas",
    "new_replica_id",
]
