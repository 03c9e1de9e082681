"""Choosing the home DERP region from latency reports, with hysteresis (sans-IO: the caller passes ``now``).

A node keeps one DERP connection as its *home*: peers send to it there, and control tells them which region
that is. Moving home costs every peer a new connection, so it must not flap. The rule (tailpy's own, after
reading Tailscale's ``net/netcheck`` ``addReportHistoryAndSetPreferredDERP``):

* Each report maps region id -> latency (seconds) for the regions that answered; a region missing from a
  report did not answer this time.
* A region's *recent best* is its lowest latency over its last ``history`` measurements no older than
  ``max_age`` seconds (a report that lacks the region leaves its measurements as they were). Only regions in
  the current report are candidates; the best candidate has the lowest recent best.
* With no home yet, the best candidate becomes home.
* The home stays unless the best candidate is clearly better than the home's recent best: lower by at least
  ``rel_better`` of it (a third) *and* by ``abs_better`` seconds (10 ms). Because both sides use the recent
  best, one slow probe of the home changes nothing; the home must be slow ``history`` times in a row.
  (Tailscale compares against the home's latency in the current report only; the recent best of both is
  steadier against flapping.)
* The home missing from a report (its probe lost) is kept while its connection is live: DERP frames
  arrived on it within ``traffic_window`` seconds (as in Tailscale PR 10528). The caller passes None when the
  connection is down; a silent connection is found dead by the DERP client's liveness ping (Ping after
  15 s without a frame, no Pong in 5 s). Otherwise the home is taken to be unreachable and the best
  candidate replaces it.
* A report with no candidates at all (no network) keeps the home.

The unit test of this module, tests/unit/test_magicsock_home.py, plays a stale home region and flapping
latencies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

HISTORY = 3  # reports a region's recent best looks back over
MAX_AGE = 300.0  # seconds after which a report is forgotten
REL_BETTER = 1 / 3  # fraction by which a new region must beat the home's recent best
ABS_BETTER = 0.010  # seconds by which a new region must beat the home's recent best
TRAFFIC_WINDOW = 30.0  # seconds: DERP frames from the home this recent keep it when its probe is lost


@dataclass(frozen=True)
class LatencyReport:
    """One measurement round: ``at`` (seconds, the caller's clock) and region id -> latency (seconds)."""

    at: float
    latencies: Mapping[int, float]


class HomeChooser:
    """Keeps the home DERP region (0: none yet) and the recent measurements it was chosen from."""

    def __init__(
        self,
        *,
        history: int = HISTORY,
        max_age: float = MAX_AGE,
        rel_better: float = REL_BETTER,
        abs_better: float = ABS_BETTER,
        traffic_window: float = TRAFFIC_WINDOW,
    ) -> None:
        if history < 1:
            raise ValueError("history must be at least 1 report")
        self.history = history
        self.max_age = max_age
        self.rel_better = rel_better
        self.abs_better = abs_better
        self.traffic_window = traffic_window
        self.home = 0
        self.samples: dict[int, deque[tuple[float, float]]] = {}  # region id -> (at, latency), newest last
        self.last: LatencyReport | None = None

    def recent_best(self, region_id: int) -> float | None:
        """The lowest latency of ``region_id`` over its kept measurements (seconds), or None."""
        seen = self.samples.get(region_id)
        return min(d for _, d in seen) if seen else None

    def add_report(
        self, now: float, latencies: Mapping[int, float], *, home_traffic_at: float | None = None
    ) -> int:
        """Record a report made at ``now`` (region id -> latency in seconds; regions that did not answer are
        left out) and return the home region after it. ``home_traffic_at``: when a DERP frame last arrived
        on the home connection (same clock as ``now``), None if never."""
        clean = {int(r): float(d) for r, d in latencies.items() if d >= 0}
        for rid, d in clean.items():
            self.samples.setdefault(rid, deque(maxlen=self.history)).append((now, d))
        for rid in list(self.samples):
            q = self.samples[rid]
            while q and now - q[0][0] > self.max_age:
                q.popleft()
            if not q:
                del self.samples[rid]
        self.last = LatencyReport(now, clean)
        if not clean:
            return self.home
        best = min(clean, key=lambda r: (self._best(r), r != self.home, r))
        if self.home == 0 or best == self.home:
            self.home = best
            return self.home
        if self.home not in clean:
            alive = home_traffic_at is not None and now - home_traffic_at <= self.traffic_window
            if not alive:
                self.home = best
            return self.home
        old, new = self._best(self.home), self._best(best)
        if new < old * (1 - self.rel_better) and old - new >= self.abs_better:
            self.home = best
        return self.home

    def _best(self, region_id: int) -> float:
        b = self.recent_best(region_id)
        return float("inf") if b is None else b

    def keep_regions(self, region_ids: Iterable[int]) -> int:
        """Forget regions no longer in the DERP map (the home too, if it went); returns the home."""
        valid = set(region_ids)
        if self.home not in valid:
            self.home = 0
        self.samples = {rid: q for rid, q in self.samples.items() if rid in valid}
        return self.home


__all__ = ["ABS_BETTER", "HISTORY", "MAX_AGE", "REL_BETTER", "TRAFFIC_WINDOW", "HomeChooser", "LatencyReport"]
