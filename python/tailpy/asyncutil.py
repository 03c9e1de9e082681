"""Small asyncio helpers that the standard library gets subtly wrong on the Python versions tailpy runs on."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set.

    Unlike ``asyncio.wait_for(event.wait(), timeout)`` on Python < 3.12, a cancellation that arrives just as
    the event is set is never swallowed (CPython gh-86296): the caller is cancelled, always."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
