"""The node's side of the control protocol (see :mod:`tailpy.control.server` for the routes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp

from tailpy.errors import AuthKeyError, ControlError, InvalidKeyError, ParseError
from tailpy.keys import MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import NetMap, Node
from tailpy.proto import control as proto

STREAM_SILENCE = 45.0
"""Seconds without a line (the server sends keepalives every ~15 s) after which a map stream is dead."""


class ControlClient:
    """Talks to the control server at ``server_url`` ("http://host:port") as the machine ``machine_key``.

    Every method raises ControlError with a sentence when the server refuses the request (AuthKeyError for
    a refused auth key) or cannot be reached ("cannot reach control server at URL: ..."). ``clock`` gives
    unix seconds (the request timestamp). Call :meth:`close` when done.
    """

    def __init__(
        self,
        server_url: str,
        machine_key: MachinePrivate,
        *,
        clock: Callable[[], float] = time.time,
        stream_silence: float = STREAM_SILENCE,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.machine_key = machine_key
        self.clock = clock
        self.stream_silence = stream_silence
        self._server_key: MachinePublic | None = None
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    def _unreachable(self, e: BaseException) -> ControlError:
        detail = str(e) or type(e).__name__
        return ControlError(f"cannot reach control server at {self.server_url}: {detail}")

    async def close(self) -> None:
        """Close the HTTP session (ends any open map stream). Idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def server_key(self) -> MachinePublic:
        """The server's machine public key from ``GET /key`` (fetched once, then cached)."""
        if self._server_key is None:
            try:
                async with self._http().get(
                    self.server_url + "/key", timeout=aiohttp.ClientTimeout(total=30)
                ) as r:
                    text = (await r.text()).strip()
                    if r.status != 200:
                        raise ControlError(
                            f"control server at {self.server_url} answered /key with {r.status}"
                        )
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                raise self._unreachable(e) from None
            try:
                self._server_key = MachinePublic.from_text(text)
            except InvalidKeyError as e:
                raise ControlError(f"control server at {self.server_url} sent a bad key: {e}") from None
        return self._server_key

    async def _call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        server_key = await self.server_key()
        req = proto.seal_request(self.machine_key, server_key, path, body, now=self.clock())
        try:
            async with self._http().post(
                self.server_url + path, data=req.data, timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                data = await r.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise self._unreachable(e) from None
        return self._decode(data, r.status, req.nonce_id)

    def _decode(self, data: bytes, status: int, nonce_id: str) -> dict[str, Any]:
        assert self._server_key is not None
        try:
            outer = proto.parse_unary(data)
            if "box" not in outer:
                error = outer.get("error") or f"HTTP {status}"
                raise ControlError(f"control server refused the request: {error}")
            body = proto.open_response(self.machine_key, self._server_key, outer["box"], reply_to=nonce_id)
        except ParseError as e:
            raise ControlError(
                f"bad response from control server at {self.server_url} (HTTP {status}): {e}"
            ) from None
        if "error" in body:
            cls = AuthKeyError if body.get("kind") == "auth_key" else ControlError
            raise cls(str(body["error"]))
        if status != 200:
            raise ControlError(f"control server answered HTTP {status}")
        return body

    async def register(self, node_key: NodePublic, hostname: str, auth_key: str | None) -> Node:
        """Register this machine with ``node_key`` and ``hostname``; returns its node (id, name, addresses).

        ``auth_key`` (``tskey-auth-...``) is needed the first time and whenever the node key changes.
        Raises AuthKeyError (unknown, expired or used-up key: the server's sentence) or ControlError.
        """
        body: dict[str, Any] = {"node_key": node_key.text(), "hostname": hostname}
        if auth_key is not None:
            body["auth_key"] = auth_key
        return self._node(await self._call("/machine/register", body))

    async def update_endpoints(self, endpoints: list[str]) -> None:
        """Tell the server this node's UDP endpoints ("ip:port" / "[ipv6]:port"); pushed to every peer."""
        await self._call("/machine/update", {"endpoints": list(endpoints)})

    def _node(self, body: Mapping[str, Any]) -> Node:
        try:
            return Node.from_json(body["node"])
        except (KeyError, TypeError, ParseError) as e:
            raise ControlError(f"control server sent a malformed node: {e}") from None

    async def stream_map(
        self, node_key: NodePublic, endpoints: list[str], hostname: str
    ) -> AsyncIterator[NetMap]:
        """Open the map stream and yield each netmap the server sends: the full netmap first, then a new one
        after every change (keepalives are consumed here).

        Ends with ControlError when the stream breaks, the server closes it, or nothing arrives for
        ``stream_silence`` seconds; the caller reconnects (with its current endpoints).
        """
        server_key = await self.server_key()
        body = {"node_key": node_key.text(), "endpoints": list(endpoints), "hostname": hostname}
        req = proto.seal_request(self.machine_key, server_key, "/machine/map", body, now=self.clock())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.stream_silence)
        try:
            async with self._http().post(
                self.server_url + "/machine/map", data=req.data, timeout=timeout
            ) as r:
                if r.status != 200:
                    self._decode(await r.read(), r.status, req.nonce_id)
                    raise ControlError(f"control server answered HTTP {r.status} to the map request")
                seq = 0
                while True:
                    line = await r.content.readline()
                    if not line:
                        break
                    if line.strip():
                        msg = self._open_line(line, server_key, req.nonce_id, seq)
                        seq += 1
                        if msg.get("type") == "netmap":
                            yield self._netmap(msg)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise ControlError(
                f"map stream from control server at {self.server_url} broke: {e or type(e).__name__}"
            ) from None
        raise ControlError(f"control server at {self.server_url} closed the map stream")

    def _open_line(self, line: bytes, server_key: MachinePublic, nonce_id: str, seq: int) -> dict[str, Any]:
        try:
            return proto.open_response(
                self.machine_key,
                server_key,
                line.strip().decode("ascii", "replace"),
                reply_to=nonce_id,
                seq=seq,
            )
        except ParseError as e:
            raise ControlError(f"bad map message from control server at {self.server_url}: {e}") from None

    def _netmap(self, msg: Mapping[str, Any]) -> NetMap:
        try:
            return NetMap.from_json(msg["netmap"])
        except (KeyError, TypeError, ParseError) as e:
            raise ControlError(f"control server sent a malformed netmap: {e}") from None


__all__ = ["ControlClient"]
