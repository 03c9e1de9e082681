"""Primary subnet routers shared by every control replica of one database.

:class:`StoredPrimaries` is the mapper's :class:`~tailpy.control.routes.PrimaryRoutes` for a server with a
store: it keeps the same local view of which routers are eligible (fed by the mapper on every published
record), but the outcome of an election is what the database's ``route_primaries`` table says
(:mod:`tailpy.control.store.primaries`). When this replica notices a router's eligibility change (its stream
opened or closed here or on another replica, a replica reaped, an approval, an expiry, an advertisement) it
runs :func:`~tailpy.control.store.primaries.settle` for the prefixes concerned: a compare-and-set in one
transaction that keeps the stored primary while it is eligible, else picks the lowest eligible id
(:func:`~tailpy.control.routes.choose_primary`). Other replicas learn the outcome from the change feed
(:meth:`sync`), so replicas with different histories (one restarted, streams opened in another order) show
the same primary.

With stream rows (control replicas: PostgreSQL, or a replica id) eligibility is the database's; a single
process without them decides on its own view, which is then the whole truth (the table is written all the
same). When the database cannot be written the election falls back to the local view, so an offline router
never keeps serving, and the prefixes are settled again at the next chance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tailpy.control.routes import PrimaryRoutes
from tailpy.control.store import primaries as store

log = logging.getLogger("tailpy.control")


class StoredPrimaries(PrimaryRoutes):
    """:class:`~tailpy.control.routes.PrimaryRoutes` whose primaries live in ``engine``'s database.

    ``shared``: eligibility from the database (stream rows of live replicas) rather than the local view;
    ``clock``: unix seconds (key expiry is judged by it); ``stale``: seconds without a heartbeat after which
    a replica is dead (read at each election). Starts with the table's rows."""

    def __init__(
        self, engine: Engine, *, shared: bool, clock: Callable[[], float], stale: Callable[[], float]
    ) -> None:
        super().__init__()
        self.engine = engine
        self.shared = shared
        self.clock = clock
        self.stale = stale
        self.settlements = 0
        """Compare-and-set transactions run (for tests and diagnostics)."""
        self._dirty: set[str] = set()  # prefixes whose settlement failed (the database was unreachable)
        with engine.begin() as conn:
            rows = store.read_all(conn)
        for p, n in rows.items():
            self._set(p, n)

    @property
    def dirty(self) -> bool:
        """True while some prefixes wait to be settled again (the database could not be written)."""
        return bool(self._dirty)

    def _elect(self, prefixes: Iterable[str]) -> set[int]:
        todo = set(prefixes) | self._dirty
        if not todo:
            return set()
        out = self._settle(todo)
        if out is None:  # (the database is unreachable: this replica's own view decides meanwhile)
            return super()._elect(todo)
        return self._apply(out)

    def _settle(self, prefixes: set[str] | None) -> dict[str, int | None] | None:
        """Settle ``prefixes`` (None: all) in the database; returns prefix -> primary, or None (the prefixes
        marked for another try) when the database cannot be written."""
        eligible = None if self.shared else self._local(prefixes)
        try:
            with self.engine.begin() as conn:
                out = store.settle(conn, prefixes, self.clock(), stale=self.stale(), eligible=eligible)
        except sa.exc.SQLAlchemyError as e:
            log.warning("primary routes: cannot settle them in the database (%s); deciding locally", e)
            self._dirty |= set(self._primary) | set(self._routers) if prefixes is None else prefixes
            return None
        self.settlements += 1
        self._dirty -= set(out)
        if prefixes is None:  # (prefixes neither stored nor eligible: nobody)
            out.update({p: None for p in self._primary if p not in out})
        return out

    def _apply(self, out: Mapping[str, int | None]) -> set[int]:
        changed: set[int] = set()
        for p, n in out.items():
            changed |= self._set(p, n)
        return changed

    def _local(self, prefixes: set[str] | None) -> dict[str, set[int]]:
        keys = self._routers.keys() if prefixes is None else prefixes
        return {p: set(self._routers.get(p, ())) for p in keys}

    def settle_all(self) -> set[int]:
        """Run the election of every prefix (stored or served): at start, when rows may name routers that
        went offline while no replica ran. Returns the ids whose primary routes changed."""
        out = self._settle(None)
        return super()._elect(self._dirty) if out is None else self._apply(out)

    def sync(self, rows: Mapping[str, int]) -> set[int]:
        """The table as just read (:func:`tailpy.control.store.primaries.read_all`): take its primaries, and
        settle again what failed before. Returns the ids whose primary routes changed."""
        out: dict[str, int | None] = {p: rows.get(p) for p in set(self._primary) | set(rows)}
        if self._dirty:
            again = self._settle(set(self._dirty))
            for p in self._dirty if again is None else again:  # (still unreachable: the local view stays)
                out.pop(p, None)
            out.update(again or {})
        return self._apply(out)


__all__ = ["StoredPrimaries"]
