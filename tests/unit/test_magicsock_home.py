"""Home DERP region choice with hysteresis (a stale home region must not flap: tailscale/tailscale#8603);
sans-IO, ``now`` passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tailpy.magicsock.home import HomeChooser

R1, R2, R3 = 1, 2, 3
MS = 0.001


def test_stale_home_region_and_flapping() -> None:
    """R1 30 ms, R2 32 ms, home R1; one R1 probe lost while frames still arrive; then R1 at 80 ms for
    three reports: home stays R1 through the first two steps and moves to R2 in the third."""
    c = HomeChooser()
    t = 1000.0
    assert c.add_report(t, {R1: 30 * MS, R2: 32 * MS}) == R1
    # Step 1: R1 and R2 nearly equal for a while; R2 sometimes a little faster: no flip (hysteresis).
    for i in range(10):
        t += 25
        lat = {R1: 30 * MS, R2: 32 * MS} if i % 2 else {R1: 33 * MS, R2: 29 * MS}
        assert c.add_report(t, lat) == R1
    # Step 2: the R1 probe is lost, but a DERP frame came from R1 5 s ago: keep R1.
    t += 25
    assert c.add_report(t, {R2: 32 * MS}, home_traffic_at=t - 5) == R1
    # Step 3: R1 at 80 ms: two slow reports are not enough, the third moves home to R2.
    t += 25
    assert c.add_report(t, {R1: 80 * MS, R2: 32 * MS}, home_traffic_at=t - 1) == R1
    t += 25
    assert c.add_report(t, {R1: 80 * MS, R2: 32 * MS}, home_traffic_at=t - 1) == R1
    t += 25
    assert c.add_report(t, {R1: 80 * MS, R2: 32 * MS}, home_traffic_at=t - 1) == R2
    # And it stays on R2 while R1 recovers only to about the same latency.
    for _ in range(5):
        t += 25
        assert c.add_report(t, {R1: 31 * MS, R2: 32 * MS}) == R2


def test_lost_probe_without_traffic_moves_home() -> None:
    c = HomeChooser()
    assert c.add_report(0.0, {R1: 0.030, R2: 0.032}) == R1
    assert c.add_report(25.0, {R2: 0.032}, home_traffic_at=None) == R2  # R1 silent: unreachable
    c2 = HomeChooser()
    c2.add_report(0.0, {R1: 0.030, R2: 0.032})
    assert c2.add_report(200.0, {R2: 0.032}, home_traffic_at=100.0) == R2  # traffic too long ago


def test_clearly_better_region_wins_after_history() -> None:
    c = HomeChooser()
    assert c.add_report(0.0, {R1: 0.100}) == R1
    # R3 appears at 20 ms: far better, yet only by its recent best against R1's recent best (100 ms).
    assert c.add_report(20.0, {R1: 0.100, R3: 0.020}) == R3
    # Better by a third but not by 10 ms: kept.
    c = HomeChooser()
    c.add_report(0.0, {R1: 0.012})
    assert c.add_report(20.0, {R1: 0.012, R2: 0.004}) == R1


def test_empty_report_keeps_home_and_old_reports_expire() -> None:
    c = HomeChooser(max_age=60.0)
    c.add_report(0.0, {R1: 0.030})
    assert c.add_report(10.0, {}) == R1
    assert c.recent_best(R1) == 0.030
    c.add_report(100.0, {R2: 0.050}, home_traffic_at=95.0)
    assert c.recent_best(R1) is None  # the 0 s report is older than max_age


def test_region_removed_from_map_drops_home() -> None:
    c = HomeChooser()
    c.add_report(0.0, {R1: 0.030, R2: 0.040})
    assert c.keep_regions([R2]) == 0
    assert c.add_report(20.0, {R2: 0.040}) == R2


@given(
    st.lists(st.dictionaries(st.integers(1, 4), st.floats(0.001, 0.5), max_size=4), min_size=1, max_size=30)
)
def test_home_is_always_a_region_that_answered(reports: list[dict[int, float]]) -> None:
    c = HomeChooser()
    answered: set[int] = set()
    for i, r in enumerate(reports):
        answered |= set(r)
        home = c.add_report(i * 25.0, r)
        assert home == 0 or home in answered


@given(st.lists(st.floats(0.025, 0.035), min_size=6, max_size=40), st.lists(st.floats(0.025, 0.035)))
def test_flapping_within_a_third_never_moves_home(r1: list[float], r2: list[float]) -> None:
    """Latencies jittering between 25 and 35 ms never move the home (35 ms is not a third worse than 25)."""
    c = HomeChooser()
    first = c.add_report(0.0, {R1: r1[0], R2: r2[0] if r2 else 0.03})
    for i, d in enumerate(r1[1:]):
        other = r2[i % len(r2)] if r2 else 0.03
        assert c.add_report((i + 1) * 25.0, {R1: d, R2: other}) == first
