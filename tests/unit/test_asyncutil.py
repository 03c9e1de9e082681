import asyncio

from tailpy.asyncutil import close_writer, wait_event


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


async def test_close_writer_ends_when_the_peer_stops_reading() -> None:
    """A peer that never reads keeps the data in the transport's buffer: StreamWriter.wait_closed() alone
    would wait forever; close_writer aborts after its timeout."""
    stalled = asyncio.Event()
    handlers: list[asyncio.StreamWriter] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(writer)
        await stalled.wait()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\0" * (64 << 20))  # far more than the socket buffers hold
    done, _ = await asyncio.wait({asyncio.ensure_future(close_writer(writer, 0.2))}, timeout=30)
    assert done and writer.transport.is_closing()
    stalled.set()
    for w in handlers:
        w.transport.abort()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0)
