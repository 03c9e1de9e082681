"""The tick of :class:`tailpy.magicsock.conn.Conn`: one timer over sans-IO state machines, and the jobs it
starts.

Shaped after aioquic's ``asyncio/protocol.py`` (``QuicConnectionProtocol``): after every event the owner
handles (a datagram, a netmap, a ping) it calls :meth:`Tick.rearm`, which asks the owner for its earliest
deadline and re-arms the one ``loop.call_at`` timer for it; when the timer fires, the owner's
``on_timer(now)`` runs what is due. Work that takes time (a DERP connect, a latency probe, a netcheck run) is
a task the tick starts (:meth:`Tick.spawn`), cancelled at :meth:`Tick.close`; :class:`Periodic` is such a
job run every draw of an interval, or soon on request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("tailpy.magicsock")


class Tick:
    """One timer for an owner's deadlines. ``clock()``: the owner's clock (seconds); ``deadline()``: its
    earliest deadline on that clock (``math.inf``: none); ``on_timer(now)``: runs what is due."""

    def __init__(
        self, clock: Callable[[], float], deadline: Callable[[], float], on_timer: Callable[[float], None]
    ) -> None:
        self.clock = clock
        self.deadline = deadline
        self.on_timer = on_timer
        self.running = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._jobs: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.running = True
        self.rearm()

    def stop(self) -> None:
        """No more timer callbacks (jobs keep running until :meth:`close`)."""
        self.running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    async def close(self) -> None:
        self.stop()
        jobs = list(self._jobs)
        for t in jobs:
            t.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    def rearm(self) -> None:
        """Re-arm the timer for the owner's earliest deadline (no-op when it is already armed for it)."""
        if not self.running:
            return
        when = self.deadline()
        if self._timer is not None:
            if when == self._timer_at:
                return
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when < math.inf:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + max(0.0, when - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.on_timer(self.clock())
        self.rearm()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task (cancelled at :meth:`close`; an exception is logged)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return task

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("%s failed: %r", task.get_name(), e, exc_info=e)


class Periodic:
    """A job (``job()``, a coroutine) the tick runs every uniform draw of ``interval`` seconds (``(lo, hi)``)
    from the end of the last run, or soon on request (:meth:`soon`; a request during a run runs it again right
    after). ``at`` is when it is next due (owner's clock; ``math.inf`` while it runs)."""

    def __init__(
        self,
        tick: Tick,
        name: str,
        job: Callable[[], Coroutine[Any, Any, None]],
        interval: tuple[float, float],
        rng: random.Random,
    ) -> None:
        self.tick = tick
        self.name = name
        self.job = job
        self.interval = interval
        self.rng = rng
        self.at = math.inf
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def schedule(self) -> None:
        """Due one draw from now."""
        lo, hi = self.interval
        self.at = self.tick.clock() + lo + self.rng.random() * (hi - lo)

    def soon(self) -> None:
        if self._task is not None:
            self._again = True
        else:
            self.at = -math.inf
            self.tick.rearm()

    def run_if_due(self, now: float) -> None:
        if now >= self.at and self._task is None:
            self.at = math.inf
            self._task = self.tick.spawn(self._run(), self.name)

    async def _run(self) -> None:
        try:
            await self.job()
        finally:
            self._task = None
            if self._again:
                self._again = False
                self.at = -math.inf
            else:
                self.schedule()
            self.tick.rearm()


__all__ = ["Periodic", "Tick"]
