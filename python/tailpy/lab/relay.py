"""A stand-in for DERP in the lab: bridge a Device's relay queue over one plain TCP connection.

Each side drains its device's relay queue when the device's eventfd is readable (``loop.add_reader``) and
writes one frame per WireGuard datagram; the other side reads frames and calls ``device.inject``.

Frame: big-endian u32 length N, then N bytes = 32-byte public key of the sending device + the datagram.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol

KEY_LEN = 32
MAX_FRAME = 64 * 1024 + KEY_LEN
_LEN = struct.Struct(">I")


class RelayDevice(Protocol):
    """The part of ``tailpy._native.Device`` the bridge uses."""

    @property
    def public_key(self) -> bytes: ...
    def fileno(self) -> int: ...
    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]: ...
    def inject(self, public_key: bytes, datagram: bytes) -> None: ...


def encode_frame(sender: bytes, datagram: bytes) -> bytes:
    """One frame: u32 length + 32-byte sender key + datagram."""
    return _LEN.pack(KEY_LEN + len(datagram)) + sender + datagram


class RelayBridge:
    """Moves relay datagrams between ``device`` and a TCP stream until the stream ends.

    Counters: ``sent`` / ``received`` frames, ``other`` STUN/disco datagrams drained and ignored."""

    def __init__(
        self, device: RelayDevice, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.device, self.reader, self.writer = device, reader, writer
        self.sent = self.received = self.other = 0

    def _on_readable(self) -> None:
        while True:
            datagrams, relay = self.device.drain()
            self.other += len(datagrams)
            me = self.device.public_key
            for _peer, datagram in relay:
                self.writer.write(encode_frame(me, datagram))
            self.sent += len(relay)
            if len(datagrams) + len(relay) < 1024:
                return

    async def run(self) -> None:
        """Bridge until the TCP stream closes; then stop watching the device."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.device.fileno(), self._on_readable)
        self._on_readable()  # anything queued before we started watching
        try:
            while True:
                try:
                    header = await self.reader.readexactly(_LEN.size)
                    (length,) = _LEN.unpack(header)
                    if not KEY_LEN < length <= MAX_FRAME:
                        raise ValueError(f"bad relay frame length {length}")
                    body = await self.reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    return
                self.device.inject(body[:KEY_LEN], body[KEY_LEN:])
                self.received += 1
        finally:
            loop.remove_reader(self.device.fileno())
            self.writer.close()


async def connect(
    host: str, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a listening bridge, retrying while it is not up yet (polls until ``timeout`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.05)


async def accept_one(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Listen on host:port and return the first connection (the listener then closes)."""
    got: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if got.done():
            w.close()
        else:
            got.set_result((r, w))

    server = await asyncio.start_server(on_client, host, port)
    try:
        return await got
    finally:
        server.close()
