"""DERP over WebSocket (Tailscale's ``derphttp`` WebSocket variant, ``derpserver/websocket.go``): the client
sends ``GET /derp`` with ``Upgrade: websocket`` and ``Sec-WebSocket-Protocol: derp``; after the 101 the DERP
frame stream (the same bytes as over a DERP upgrade) is carried in binary WebSocket messages, split anywhere
(a message may hold part of a frame or several frames). No compression, as derper.

The WebSocket framing is `wsproto <https://python-hyper.org/projects/wsproto/>`_ (sans-IO). :class:`WsReader`
and :class:`WsWriter` wrap an asyncio stream pair so that the DERP code reads and writes the frame stream
through the same calls it makes on a plain connection (``read``, ``write``, ``drain``, ``transport``):

* reading pulls raw bytes only when no message data is waiting (the TCP window stays the backpressure),
  answers WebSocket pings, and ends (``b""``) on a Close, a text message or a framing error;
* writing sends each write as one binary message (masked by the client, as RFC 6455 §5.3 requires).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tailpy.errors import ParseError

SUBPROTOCOL = "derp"
"""The WebSocket subprotocol DERP is spoken under."""


class Reader(Protocol):
    """What the DERP code reads from: an asyncio StreamReader or a :class:`WsReader`."""

    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    """What the DERP code writes to: an asyncio StreamWriter or a :class:`WsWriter`."""

    @property
    def transport(self) -> asyncio.WriteTransport: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class WsWriter:
    """Writes each ``write`` as one binary WebSocket message on ``raw`` (see the module docstring)."""

    def __init__(self, raw: asyncio.StreamWriter, ws: WSConnection) -> None:
        self.raw = raw
        self.ws = ws

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.raw.transport

    def write(self, data: bytes) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            return  # closing: nothing more goes out (the connection is about to end)
        self.raw.write(self.ws.send(Message(data=data)))

    async def drain(self) -> None:
        await self.raw.drain()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def close(self) -> None:
        if self.ws.state is ConnectionState.OPEN:
            with contextlib.suppress(LocalProtocolError, RuntimeError):
                self.raw.write(self.ws.send(CloseConnection(code=1000)))
        self.raw.close()

    async def wait_closed(self) -> None:
        await self.raw.wait_closed()


class WsReader:
    """Reads the data of binary WebSocket messages from ``raw`` (see the module docstring)."""

    def __init__(self, raw: asyncio.StreamReader, ws: WSConnection, writer: WsWriter) -> None:
        self.raw = raw
        self.ws = ws
        self.writer = writer
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        """The next message data available (at most what arrived; ``n`` bounds each raw read); ``b""`` at
        the end of the stream."""
        chunk = n if n > 0 else 1 << 16
        while True:
            buf = bytearray()
            try:
                for ev in self.ws.events():
                    if isinstance(ev, BytesMessage):
                        buf += ev.data
                    elif isinstance(ev, Ping):
                        self.writer.raw.write(self.ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            self.writer.raw.write(self.ws.send(ev.response()))
                        self._eof = True
                    elif isinstance(ev, Message):  # a text message: not DERP
                        self._eof = True
            except RemoteProtocolError:
                self._eof = True
            if buf:
                return bytes(buf)
            if self._eof:
                return b""
            data = await self.raw.read(chunk)
            if not data:
                self._eof = True
                return b""
            self.ws.receive_data(data)


def wants_websocket(headers: dict[str, str]) -> bool:
    """True for a WebSocket-DERP request: ``Upgrade: websocket`` and a ``derp`` subprotocol offered
    (lower-cased header names), as derpserver's AddWebSocketSupport decides."""
    return headers.get("upgrade", "").lower() == "websocket" and SUBPROTOCOL in headers.get(
        "sec-websocket-protocol", ""
    )


def server_accept(
    head: bytes, raw_reader: asyncio.StreamReader, raw_writer: asyncio.StreamWriter
) -> tuple[WsReader, WsWriter]:
    """Answer the WebSocket upgrade request ``head`` (the full request head, bytes) with 101 and subprotocol
    ``derp`` (written to ``raw_writer``, not drained); the reader and writer of the DERP stream. Raises
    ParseError (the caller answers 400) when the request is not a valid WebSocket handshake or does not
    offer the ``derp`` subprotocol."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        events = list(ws.events())
    except RemoteProtocolError as e:
        raise ParseError(f"bad WebSocket handshake: {e}") from None
    if len(events) != 1 or not isinstance(events[0], Request):
        raise ParseError("bad WebSocket handshake")
    if SUBPROTOCOL not in events[0].subprotocols:
        raise ParseError("the client must speak the derp WebSocket subprotocol")
    raw_writer.write(ws.send(AcceptConnection(subprotocol=SUBPROTOCOL)))
    writer = WsWriter(raw_writer, ws)
    return WsReader(raw_reader, ws, writer), writer


async def client_handshake(
    raw_reader: asyncio.StreamReader, raw_writer: asyncio.StreamWriter, host: str, target: str
) -> tuple[WsReader, WsWriter]:
    """Send the WebSocket upgrade for ``target`` with subprotocol ``derp`` and read the answer; the reader
    and writer of the DERP stream. Raises ParseError when the server refuses or answers badly."""
    ws = WSConnection(ConnectionType.CLIENT)
    raw_writer.write(ws.send(Request(host=host, target=target, subprotocols=[SUBPROTOCOL])))
    await raw_writer.drain()
    writer = WsWriter(raw_writer, ws)
    reader = WsReader(raw_reader, ws, writer)
    while True:
        data = await raw_reader.read(1 << 16)
        if not data:
            raise ParseError("the server closed the connection during the WebSocket handshake")
        try:
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, AcceptConnection):
                    if ev.subprotocol != SUBPROTOCOL:
                        raise ParseError("the server did not accept the derp WebSocket subprotocol")
                    return reader, writer
                if isinstance(ev, RejectConnection):
                    raise ParseError(f"the server refused the WebSocket upgrade: HTTP {ev.status_code}")
                if isinstance(ev, RejectData):
                    continue
        except RemoteProtocolError as e:
            raise ParseError(f"bad WebSocket handshake answer: {e}") from None


__all__ = [
    "SUBPROTOCOL",
    "Reader",
    "Writer",
    "WsReader",
    "WsWriter",
    "client_handshake",
    "server_accept",
    "wants_websocket",
]
