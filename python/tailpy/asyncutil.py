"""Small asyncio helpers that the standard library gets subtly wrong on the Python versions tailpy runs on."""

from __future__ import annotations

import asyncio

LISTEN_BACKLOG = 4096
"""Connections a server's listening socket queues before it accepts them (``listen(2)``'s backlog; the
kernel caps it at ``net.core.somaxconn``, as Go's ``net.Listen`` asks for). asyncio's default, 100, is too few
for a control replica or DERP relay that takes over thousands of nodes at once when another dies: the
connections past the backlog lose their SYN and retry it after 1, 3, 7, 15... seconds."""


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


CLOSE_TIMEOUT = 2.0
"""Seconds :func:`close_writer` waits for a stream to close before aborting it."""


async def close_writer(writer: asyncio.StreamWriter, timeout: float = CLOSE_TIMEOUT) -> None:
    """Close ``writer`` and wait at most ``timeout`` seconds for it to finish; then abort its transport.

    ``StreamWriter.wait_closed()`` waits until the transport has sent what it buffered (and, for TLS, the
    close_notify exchange): a peer that stopped reading would make it wait forever. Errors of a connection
    already dead are not news here and are swallowed; a cancellation of the caller is not."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except asyncio.TimeoutError:
        writer.transport.abort()
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        pass
