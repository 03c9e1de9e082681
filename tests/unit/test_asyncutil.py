import asyncio

from tailpy.asyncutil import wait_event


async def test_wait_event_times_out_and_sees_set() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 5) is True


async def test_cancel_racing_the_event_is_never_swallowed() -> None:
    """A task looping on wait_event must end when cancelled in the same step the event is set (the
    asyncio.wait_for of Python < 3.12 swallowed that cancellation and the loop went on: a hang)."""
    ev = asyncio.Event()

    async def loop_forever() -> None:
        while True:
            ev.clear()
            await wait_event(ev, 3600)

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0.01)
    ev.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
