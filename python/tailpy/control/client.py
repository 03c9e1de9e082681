"""The node's side of the control protocol (see :mod:`tailpy.control.server` for the routes)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import aiohttp

from tailpy import bypass
from tailpy.endpoint import Endpoint
from tailpy.errors import (
    AuthKeyError,
    ControlError,
    InvalidKeyError,
    NotRegisteredError,
    ParseError,
    TagError,
)
from tailpy.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import MapDelta, NetMap, Node, apply_delta
from tailpy.proto import control as proto
from tailpy.proto import mapcodec

_T = TypeVar("_T")

STREAM_SILENCE = 45.0
"""Seconds without a message (the server sends keepalives every ~15 s) after which a map stream is dead."""

_PREFERRED: dict[tuple[str, ...], int] = {}
"""Control URL list -> index of the URL the last client of that list moved to (the next client starts
there)."""


def control_urls(server_url: str) -> tuple[str, ...]:
    """The control URLs of a login server setting: one URL, or several separated by commas (replicas of one
    control database: ``http://a:8080,http://b:8080``), each without a trailing slash."""
    urls = tuple(u.strip().rstrip("/") for u in server_url.split(",") if u.strip())
    return urls or (server_url,)


class _Unreachable(ControlError):
    """The server could not be connected to (the request was not delivered: another URL may take it)."""


@dataclass(frozen=True)
class MapState:
    """What a client has applied: its netmap and where it is in the server's change stream (``generation``
    and ``version`` from the last message; ``feed``: the resume point control replicas add, None from a
    single server), sent back as ``resume`` on reconnect (:mod:`tailpy.control.mapper`)."""

    netmap: NetMap
    generation: str
    version: int
    feed: str | None = None

    @property
    def resume(self) -> tuple[str, int, str | None]:
        """What :meth:`ControlClient.stream_messages` takes as ``resume``."""
        return self.generation, self.version, self.feed


class MapMessage:
    """One opened map stream message (``type`` "netmap" or "delta"; see :mod:`tailpy.control.mapper`).

    ``raw`` is the plaintext JSON object (bytes; inflated when it came zstd-compressed); it is parsed only
    when :attr:`body` is first read, since a full netmap of 10,000 peers is ~6 MB. ``wire_bytes``: the
    length of the stream line it came in (base64 of the box), or of its frame (4-byte length + box) on a
    framed stream (:data:`tailpy.proto.control.FRAMES_CONTENT_TYPE`); 0 when unknown.
    """

    def __init__(self, raw: bytes, wire_bytes: int = 0) -> None:
        self.raw = raw
        self.wire_bytes = wire_bytes

    @cached_property
    def type(self) -> str:
        """The message type; the server writes ``"type"`` first, so this needs no full parse."""
        for t in ("netmap", "delta", "keepalive"):
            if self.raw.startswith(b'{"type":"%s"' % t.encode()):
                return t
        return str(self.body.get("type"))

    @cached_property
    def body(self) -> dict[str, Any]:
        """The parsed JSON object. Raises ControlError if it is not one."""
        try:
            obj = json.loads(self.raw)
        except (UnicodeDecodeError, ValueError):
            raise ControlError("control server sent a map message that is not JSON") from None
        if not isinstance(obj, dict):
            raise ControlError("control server sent a map message that is not a JSON object")
        return obj

    def netmap(self) -> NetMap:
        """The full netmap of a "netmap" message. Raises ControlError when malformed."""
        try:
            return NetMap.from_json(self.body["netmap"])
        except (KeyError, TypeError, ParseError) as e:
            raise ControlError(f"control server sent a malformed netmap: {e}") from None

    def delta(self) -> MapDelta:
        """The delta of a "delta" message. Raises ControlError when malformed."""
        try:
            return MapDelta.from_json(self.body)
        except ParseError as e:
            raise ControlError(f"control server sent a malformed delta: {e}") from None

    def version(self) -> int:
        v = self.body.get("version", 0)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    def feed(self) -> str | None:
        """The message's resume point on control replicas (``"feed"``), None without one."""
        f = self.body.get("feed")
        return f if isinstance(f, str) and len(f) <= 128 else None


def apply_message(state: MapState | None, msg: MapMessage) -> MapState:
    """The state after ``msg`` (pure): a netmap replaces it, a delta is applied to it. Raises ControlError for
    a delta with nothing to apply it to (or, unless the state has a feed resume point, for another
    generation). A delta that names another generation is the first of a stream resumed on another control
    replica: the state moves to that generation."""
    generation = msg.body.get("generation")
    if msg.type == "netmap":
        if not isinstance(generation, str):
            raise ControlError("control server sent a netmap without a generation")
        return MapState(msg.netmap(), generation, msg.version(), msg.feed())
    if msg.type != "delta":
        raise ControlError(f"control server sent a map message of unknown type {msg.type!r}")
    if state is None or (generation is not None and generation != state.generation and state.feed is None):
        raise ControlError("control server sent a delta to a node that has no netmap to apply it to")
    if not isinstance(generation, str):
        generation = state.generation
    feed = msg.feed() or state.feed
    return MapState(apply_delta(state.netmap, msg.delta()), generation, msg.version(), feed)


@dataclass(frozen=True)
class LoginAnswer:
    """One answer to :meth:`ControlClient.login_poll`: ``node`` when registered; else ``auth_url`` (the
    page the user opens to sign in; ``error`` says why the last sign-in was refused), or
    ``pending_approval`` with the server's ``message``."""

    node: Node | None = None
    auth_url: str = ""
    error: str = ""
    pending_approval: bool = False
    message: str = ""


class ControlClient:
    """Talks to the control server at ``server_url`` ("http://host:port") as the machine ``machine_key``.

    ``server_url`` may name several replicas of one control database, separated by commas
    (:func:`control_urls`): a request that cannot connect goes to the next one, and a map stream that broke
    makes the next stream (of any client of the same list) start at the next one (:meth:`next_server`).
    A host name with several addresses is tried address by address when connecting.

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
        self.server_urls = control_urls(server_url)
        self._url_index = _PREFERRED.get(self.server_urls, 0) % len(self.server_urls)
        self.machine_key = machine_key
        self.clock = clock
        self.stream_silence = stream_silence
        self._server_key: MachinePublic | None = None
        self._session: aiohttp.ClientSession | None = None
        self.map_state: MapState | None = None
        self.stream_starts: dict[str, int] = {"netmap": 0, "delta": 0}
        """How the map streams of :meth:`stream_map` began: with a full netmap, or resumed with a delta
        (on the same server, or on another control replica of its database)."""
        self.clock_skew: float | None = None
        """Seconds control's clock is ahead of ``clock`` (negative: behind), from the ``Date`` header of its
        last reply (RFC 9110 section 6.6.1, one-second resolution); None before one."""
        self.on_clock_skew: Callable[[float], None] | None = None
        """Called with :attr:`clock_skew` at each reply that has a ``Date`` header."""

    @property
    def server_url(self) -> str:
        """The control URL requests go to now."""
        return self.server_urls[self._url_index]

    @server_url.setter
    def server_url(self, url: str) -> None:
        self.server_urls, self._url_index, self._server_key = control_urls(url), 0, None

    def next_server(self) -> None:
        """Move to the next control URL (after the last, the first again), also for the next client of the
        same URL list; no-op with one URL."""
        if len(self.server_urls) > 1:
            self._url_index = (self._url_index + 1) % len(self.server_urls)
            _PREFERRED[self.server_urls] = self._url_index
            self._server_key = None  # (replicas of one database share one key: fetched again all the same)

    async def _failover(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """``fn()``, again on the next URLs while the server cannot be connected to."""
        for i in range(len(self.server_urls)):
            try:
                return await fn()
            except _Unreachable:
                if i == len(self.server_urls) - 1:
                    raise
                self.next_server()
        raise AssertionError("unreachable")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = bypass.client_session(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    def _note_date(self, headers: Mapping[str, str]) -> None:
        """Compare a reply's ``Date`` header with our clock (:attr:`clock_skew`)."""
        date = headers.get("Date")
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # Date is truncated to the second: the midpoint of that second is the best guess.
        self.clock_skew = server + 0.5 - self.clock()
        if self.on_clock_skew is not None:
            self.on_clock_skew(self.clock_skew)

    def _unreachable(self, e: BaseException) -> ControlError:
        if isinstance(e, aiohttp.ClientConnectorError):
            detail = e.os_error.strerror or str(e.os_error)  # not aiohttp's "ssl:default [...]" wording
        elif isinstance(e, asyncio.TimeoutError):
            detail = "timed out"
        else:
            detail = str(e) or type(e).__name__
        cls = _Unreachable if isinstance(e, aiohttp.ClientConnectorError) else ControlError
        return cls(f"cannot reach control server at {self.server_url}: {detail}")

    async def close(self) -> None:
        """Close the HTTP session (ends any open map stream). Idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def server_key(self) -> MachinePublic:
        """The server's machine public key from ``GET /key`` (fetched once, then cached)."""
        return await self._failover(self._fetch_key)

    async def _fetch_key(self) -> MachinePublic:
        if self._server_key is None:
            try:
                async with self._http().get(
                    self.server_url + "/key", timeout=aiohttp.ClientTimeout(total=30)
                ) as r:
                    self._note_date(r.headers)
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

    async def _call(self, path: str, body: Mapping[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return await self._failover(lambda: self._call_once(path, body, timeout))

    async def _call_once(self, path: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        server_key = await self._fetch_key()
        req = proto.seal_request(self.machine_key, server_key, path, body, now=self.clock())
        try:
            async with self._http().post(
                self.server_url + path, data=req.data, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                self._note_date(r.headers)
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
            cls: type[ControlError] = ControlError
            if body.get("kind") == "auth_key":
                cls = AuthKeyError
            elif body.get("kind") == "tags":
                cls = TagError
            elif status == 403:
                cls = NotRegisteredError
            raise cls(str(body["error"]))
        if status != 200:
            raise ControlError(f"control server answered HTTP {status}")
        return body

    async def register(
        self,
        node_key: NodePublic,
        hostname: str,
        auth_key: str | None,
        *,
        os: str = "",
        old_node_key: NodePublic | None = None,
        old_node_proof: str | None = None,
        request_tags: Sequence[str] = (),
        ephemeral: bool = False,
        routable_ips: Sequence[str] | None = None,
    ) -> Node:
        """Register this machine with ``node_key`` and ``hostname``; returns its node (id, name, addresses).

        ``auth_key`` (``tskey-auth-...``) is needed the first time, after logout or expiry, and when the node
        key changes without a rotation proof. Rotation: ``old_node_key`` (the current key) with
        ``old_node_proof`` from :func:`tailpy.proto.control.seal_rotation_proof` replaces it, no auth key.
        ``os``: the node's operating system ("linux"). ``request_tags``: tags this node asks for (``tailpy up
        --advertise-tags``; empty: no request, its tags stay). ``ephemeral``: register as an ephemeral node
        whatever the auth key (control deletes it at logout or after its offline timeout; tsnet's
        ``Server.Ephemeral``, Tailscale's ``RegisterRequest.Ephemeral``). ``routable_ips``: the routes this
        node advertises (canonical CIDR text, :mod:`tailpy.routes`; Tailscale's ``Hostinfo.RoutableIPs``;
        None: leave what the server has, ``[]``: none). Raises AuthKeyError (unknown,
        expired or used-up key: the server's sentence), TagError (a tag nobody asking may own),
        or ControlError.
        """
        body: dict[str, Any] = {"node_key": node_key.text(), "hostname": hostname}
        if request_tags:
            body["request_tags"] = list(request_tags)
        if auth_key is not None:
            body["auth_key"] = auth_key
        if ephemeral:
            body["ephemeral"] = True
        if routable_ips is not None:
            body["routable_ips"] = list(routable_ips)
        if os:
            body["os"] = os
        if old_node_key is not None:
            body["old_node_key"] = old_node_key.text()
            body["old_node_proof"] = old_node_proof
        return self._node(await self._call("/machine/register", body))

    async def login_poll(
        self,
        node_key: NodePublic,
        hostname: str,
        *,
        os: str = "",
        wait: float = 25.0,
        request_tags: Sequence[str] = (),
        routable_ips: Sequence[str] | None = None,
    ) -> LoginAnswer:
        """Register with no auth key, interactively (an OpenID Connect login, :mod:`tailpy.control.oidc`):
        the server answers at once with the node when the machine needs no login, else holds the request up
        to ``wait`` seconds and answers the login URL to show the user, or that the user signed in and an
        admin's approval is awaited, or the node once the login is done. Call again until
        :attr:`LoginAnswer.node` is set. Raises AuthKeyError when the server has no interactive login (the
        sentence asks for an auth key), ControlError."""
        body: dict[str, Any] = {"node_key": node_key.text(), "hostname": hostname, "interactive": True}
        body["wait"] = wait
        if routable_ips is not None:
            body["routable_ips"] = list(routable_ips)
        if request_tags:
            body["request_tags"] = list(request_tags)
        if os:
            body["os"] = os
        answer = await self._call("/machine/register", body, timeout=wait + 30.0)
        if "node" in answer:
            return LoginAnswer(node=self._node(answer))
        if answer.get("pending_approval") is True:
            return LoginAnswer(pending_approval=True, message=str(answer.get("message", "")))
        url = answer.get("auth_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise ControlError(f"control server at {self.server_url} sent no usable login URL")
        return LoginAnswer(auth_url=url, error=str(answer.get("login_error") or ""))

    async def logout(self, node_key: NodePublic) -> Node:
        """Log this machine out: the server expires ``node_key`` and keeps the node record (id, address,
        name) for the next registration with an auth key; an ephemeral node is deleted instead. Raises
        ControlError."""
        return self._node(await self._call("/machine/logout", {"node_key": node_key.text()}))

    async def update_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Tell the server this node's UDP endpoints (sent as "ip:port" / "[ipv6]:port"); pushed to every
        peer."""
        await self.update(endpoints=endpoints)

    async def update(
        self,
        *,
        endpoints: Sequence[Endpoint] | None = None,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
        routable_ips: Sequence[str] | None = None,
    ) -> None:
        """Tell the server what changed of this node: its UDP endpoints ("ip:port" / "[ipv6]:port"), its
        home DERP region id (0: none), its disco public key and/or the routes it advertises (canonical CIDR
        text; ``[]``: none); pushed to every peer. Raises ControlError."""
        body: dict[str, Any] = {}
        if routable_ips is not None:
            body["routable_ips"] = list(routable_ips)
        if disco_key is not None:
            body["disco_key"] = disco_key.text()
        if endpoints is not None:
            body["endpoints"] = [str(e) for e in endpoints]
        if home_derp is not None:
            body["home_derp"] = home_derp
        if body:
            await self._call("/machine/update", body)

    async def stream_alive(self) -> bool:
        """Whether the server holds an open map stream of this node (``/machine/update`` with
        ``check_stream``): False means the stream this client reads is dead though it has not noticed yet
        (e.g. a NAT on the way lost its state). Raises ControlError."""
        body = await self._call("/machine/update", {"check_stream": True})
        return body.get("streaming") is True

    def _node(self, body: Mapping[str, Any]) -> Node:
        try:
            return Node.from_json(body["node"])
        except (KeyError, TypeError, ParseError) as e:
            raise ControlError(f"control server sent a malformed node: {e}") from None

    async def stream_messages(
        self,
        node_key: NodePublic,
        endpoints: Sequence[Endpoint],
        hostname: str,
        *,
        resume: tuple[str, int] | tuple[str, int, str | None] | None = None,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
        routable_ips: Sequence[str] | None = None,
        accept: Sequence[str] | None = None,
    ) -> AsyncGenerator[MapMessage, None]:
        """Open the map stream and yield each "netmap" / "delta" message as it arrives, opened and checked
        (reply_to, seq) but parsed lazily; keepalives are consumed here. ``resume``: (generation, version[,
        feed]) of the last message applied (:attr:`MapState.resume`), to get a delta since then instead of a
        full netmap (the server decides: the first message says which). ``home_derp``: this node's home
        DERP region id (0: none; None: leave what the server has). ``disco_key``: this node's disco public
        key (None: leave what the server has).
        ``routable_ips``: the routes this node advertises (None: leave what the server has). ``accept``: the
        compact forms this client reads (:mod:`tailpy.proto.mapcodec`; None: all it can, zstd when the
        ``zstandard`` package is there; empty: plain JSON, as an old client). The stream is read as binary
        frames when the server answers :data:`tailpy.proto.control.FRAMES_CONTENT_TYPE` (it granted
        ``"frames"``), else as base64 lines.

        Ends with ControlError when the stream breaks, the server closes it, or nothing arrives for
        ``stream_silence`` seconds.
        """
        server_key = await self.server_key()
        body: dict[str, Any] = {
            "node_key": node_key.text(),
            "endpoints": [str(e) for e in endpoints],
            "hostname": hostname,
        }
        if resume is not None:
            body["resume"] = {"generation": resume[0], "version": resume[1]}
            if len(resume) > 2 and resume[2] is not None:
                body["resume"]["feed"] = resume[2]
        if home_derp is not None:
            body["home_derp"] = home_derp
        if disco_key is not None:
            body["disco_key"] = disco_key.text()
        if routable_ips is not None:
            body["routable_ips"] = list(routable_ips)
        features = mapcodec.offered() if accept is None else list(accept)
        if features:
            body["accept"] = features
        req = proto.seal_request(self.machine_key, server_key, "/machine/map", body, now=self.clock())
        opener = proto.StreamOpener(self.machine_key, server_key, req.nonce_id)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.stream_silence)
        try:
            async with self._http().post(
                self.server_url + "/machine/map", data=req.data, timeout=timeout
            ) as r:
                self._note_date(r.headers)
                if r.status != 200:
                    try:
                        self._decode(await r.read(), r.status, req.nonce_id)
                    finally:
                        if r.status >= 500:  # (a replica that cannot serve: the next stream tries another)
                            self.next_server()
                    raise ControlError(f"control server answered HTTP {r.status} to the map request")
                self._fit_silence(r)
                if r.content_type == proto.FRAMES_CONTENT_TYPE:
                    frames = proto.FrameReader()
                    async for chunk in r.content.iter_any():
                        for sealed in self._feed(frames, chunk):
                            size = len(sealed) + proto.FRAME_HEADER
                            msg = MapMessage(self._open_frame(opener, sealed), size)
                            if msg.type != "keepalive":
                                yield msg
                    if frames.pending:
                        url = self.server_url
                        self.next_server()
                        raise ControlError(
                            f"control server at {url} closed the map stream in the middle of a message "
                            f"({frames.pending} of {frames.expected() or '?'} bytes)"
                        )
                else:
                    buf = bytearray()
                    async for chunk in r.content.iter_any():
                        start = len(buf)
                        buf += chunk
                        while (i := buf.find(b"\n", start)) >= 0:
                            line = bytes(buf[:i])
                            del buf[: i + 1]
                            start = 0
                            if line.strip():
                                msg = MapMessage(self._open_line(opener, line), len(line) + 1)
                                if msg.type != "keepalive":
                                    yield msg
                        if len(buf) > proto.MAX_STREAM_LINE:
                            raise ControlError(
                                f"control server at {self.server_url} sent a map message larger than "
                                f"{proto.MAX_STREAM_LINE} bytes"
                            )
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            url = self.server_url
            self.next_server()  # (the next stream tries another replica, if there is one)
            raise ControlError(
                f"map stream from control server at {url} broke: {e or type(e).__name__}"
            ) from None
        url = self.server_url
        self.next_server()
        raise ControlError(f"control server at {url} closed the map stream")

    async def stream_map(
        self,
        node_key: NodePublic,
        endpoints: Sequence[Endpoint],
        hostname: str,
        *,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
        routable_ips: Sequence[str] | None = None,
        accept: Sequence[str] | None = None,
    ) -> AsyncGenerator[NetMap, None]:
        """Open the map stream and yield the full netmap after each message the server sends: the netmap
        first, then the netmap with each delta applied (keepalives are consumed here).

        Resumes from :attr:`map_state` (set by the previous stream of this client; assignable to carry it to
        a new client): the server then sends only what changed since. Ends with ControlError when the stream
        breaks, the server closes it, or nothing arrives for ``stream_silence`` seconds; the caller
        reconnects (with its current endpoints) after :func:`tailpy.backoff.reconnect_delays`, as tailpyd's
        session does. ``accept``: as for :meth:`stream_messages`.
        """
        state = self.map_state
        resume = None if state is None else state.resume
        first = True
        async for msg in self.stream_messages(
            node_key,
            endpoints,
            hostname,
            resume=resume,
            home_derp=home_derp,
            disco_key=disco_key,
            routable_ips=routable_ips,
            accept=accept,
        ):
            if first:
                self.stream_starts[msg.type] = self.stream_starts.get(msg.type, 0) + 1
                if msg.type == "netmap":
                    state = None  # the server could not resume: start over
            first = False
            state = self.map_state = apply_message(state, msg)
            yield state.netmap

    def _fit_silence(self, r: aiohttp.ClientResponse) -> None:
        """Count the stream dead after :data:`~tailpy.proto.control.SILENCE_KEEPALIVES` of the keepalive
        intervals the server announced (:data:`~tailpy.proto.control.KEEPALIVE_HEADER`; control replicas
        announce one heartbeat, so a node leaves a hung replica about when the others count it dead), one
        second more, at most ``stream_silence``."""
        try:
            keepalive = float(r.headers.get(proto.KEEPALIVE_HEADER, ""))
        except ValueError:
            return
        if not 0 < keepalive < self.stream_silence:
            return
        silence = min(self.stream_silence, proto.SILENCE_KEEPALIVES * keepalive + 1.0)
        protocol = None if r.connection is None else r.connection.protocol
        if protocol is not None:
            protocol.read_timeout = silence
            protocol.start_timeout()  # (a timer set before with the old limit would otherwise stay)

    def _open_line(self, opener: proto.StreamOpener, line: bytes) -> bytes:
        try:
            return opener.open(line)
        except ParseError as e:
            raise ControlError(f"bad map message from control server at {self.server_url}: {e}") from None

    def _open_frame(self, opener: proto.StreamOpener, sealed: bytes) -> bytes:
        try:
            return opener.open_frame(sealed)
        except ParseError as e:
            raise ControlError(f"bad map message from control server at {self.server_url}: {e}") from None

    def _feed(self, frames: proto.FrameReader, chunk: bytes) -> list[bytes]:
        try:
            return frames.feed(chunk)
        except ParseError:
            raise ControlError(
                f"control server at {self.server_url} sent a map message larger than {frames.limit} bytes"
            ) from None


__all__ = ["ControlClient", "LoginAnswer", "MapMessage", "MapState", "apply_message"]
