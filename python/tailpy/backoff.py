"""Reconnect backoff shared by every client tailpy runs (control map stream, DERP)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def reconnect_delays(
    base: float = 1.0, cap: float = 60.0, rng: Callable[[], float] = random.random
) -> Iterator[float]:
    """Seconds to wait before each reconnection: exponential backoff (``base`` * 2^n, at most ``cap``) with
    jitter (a uniform draw from [d/2, d]; ``rng`` gives [0, 1)), so many clients cut off together do not
    come back together."""
    d = base
    while True:
        yield d / 2 + rng() * d / 2
        d = min(cap, d * 2)
