"""DERP mesh, the dialing side: this server watches the connections of every other server of its region and
forwards them the packets of their clients (Tailscale's ``cmd/derper/mesh.go`` and
``derp/derphttp/mesh_client.go`` ``RunWatchConnectionLoop``; the serving side is in :mod:`tailpy.derp.relay`).

For each peer URL a :class:`MeshPeer` logs in with this server's own key and the region's mesh key
(ClientInfo ``meshKey``), sends WatchConns, and turns each PeerPresent into
:meth:`~tailpy.derp.relay.Relay.add_forwarder` and each PeerGone into
:meth:`~tailpy.derp.relay.Relay.remove_forwarder`. Packets for those keys go back over the same connection
as ForwardPacket frames, and the peer delivers them to its own client (one hop). When the connection ends,
every key learnt through it is removed (derphttp's "reconnected; clearing forwarding mappings") and it is
dialed again after a backoff (``base`` doubling to ``cap`` seconds, jittered; derphttp waits 5 s). A peer
that turns out to be this server (same server key: ``--mesh-with`` may list every server of the region,
this one included) is dropped, as derper does. Liveness: a Ping after ``idle_ping`` quiet seconds, closed
without a Pong within ``ping_timeout``.

:func:`start_mesh` is the one entry point: ``tailpy derp serve --mesh-with`` calls it, and so can any other
process that runs a :class:`~tailpy.derp.relay.Relay` (the relay embedded in a control server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tailpy.backoff import reconnect_delays
from tailpy.derp.client import IDLE_PING, PING_TIMEOUT, DerpClient, DerpClientError
from tailpy.derp.relay import Relay
from tailpy.errors import ConfigError, ParseError
from tailpy.keys import NodePrivate, NodePublic
from tailpy.proto import derp as proto

log = logging.getLogger("tailpy.derp.mesh")

STABLE_AFTER = 10.0
"""Seconds a mesh connection must stay up before the backoff starts again from ``base``."""


def read_mesh_key(path: Path) -> bytes:
    """The mesh key in ``path`` (64 hex digits, whitespace trimmed; derper's ``--mesh-psk-file``).
    Raises ConfigError (one sentence)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read mesh key file {path}: {e.strerror or e}") from None
    try:
        return proto.parse_mesh_key(text)
    except ParseError as e:
        raise ConfigError(f"mesh key file {path}: {e}") from None


def mesh_urls(entries: str | Sequence[str], *, tls: bool) -> list[str]:
    """DERP URLs of ``--mesh-with`` entries (a comma-separated string or a list): an entry is a URL
    (``http(s)://host[:port]/derp``) or ``HOST[:PORT]``, dialed as ``https://HOST[:PORT]/derp`` when ``tls``
    (as derper dials) else ``http://``. Empty entries are skipped. Raises ConfigError (one sentence)."""
    items = entries.split(",") if isinstance(entries, str) else list(entries)
    urls: list[str] = []
    for raw in items:
        entry = raw.strip()
        if not entry:
            continue
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"--mesh-with entry {entry!r} must be HOST[:PORT] or http(s)://HOST[:PORT]/derp"
                )
            urls.append(entry if parts.path else entry.rstrip("/") + "/derp")
        elif "/" in entry:
            raise ConfigError(
                f"--mesh-with entry {entry!r}: derper's HOST/DIAL-HOST form is not supported; give the "
                "address to dial as HOST[:PORT] or a URL"
            )
        else:
            urls.append(f"{'https' if tls else 'http'}://{entry}/derp")
    return urls


class MeshPeer:
    """The watch connection to one other server of the mesh, and the forwarder of packets to its clients
    (:class:`~tailpy.derp.relay.Forwarder`). Durations are seconds."""

    def __init__(
        self,
        relay: Relay,
        url: str,
        mesh_key: bytes,
        *,
        ssl_context: ssl.SSLContext | None = None,
        base: float = 0.5,
        cap: float = 5.0,
        connect_timeout: float = 10.0,
        idle_ping: float = IDLE_PING,
        ping_timeout: float = PING_TIMEOUT,
        write_limit: int = 4 << 20,
    ) -> None:
        self.relay = relay
        self.url = url
        self.mesh_key = mesh_key
        self.ssl_context = ssl_context
        self.base, self.cap = base, cap
        self.connect_timeout = connect_timeout
        self.idle_ping = idle_ping
        self.ping_timeout = ping_timeout
        self.write_limit = write_limit
        """Bytes that may wait unsent on the mesh connection; a packet beyond that is dropped (queue_tail)."""
        self.present: set[NodePublic] = set()
        """Keys the peer said are connected to it (on the current connection)."""
        self.server_key: NodePublic | None = None
        """The peer's server key, once it was reached."""
        self.is_self = False
        """The URL reached this server itself (then this peer stopped)."""
        self.connects = 0
        self.last_error: str | None = None
        self._client: DerpClient | None = None
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"MeshPeer({self.url})"

    @property
    def connected(self) -> bool:
        """Whether the watch connection is up."""
        return self._up.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the watch connection; whether it is up."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self._up.is_set()

    def forward_packet(self, src: NodePublic, dst: NodePublic, data: bytes) -> str | None:
        """Send ``data`` from ``src`` to ``dst`` (a client of the peer) as a ForwardPacket. None when written;
        ``"write_error"`` when the connection is down, ``"queue_tail"`` when it already holds
        :attr:`write_limit` bytes unsent."""
        c = self._client
        if c is None or c.closed:
            return "write_error"
        if not c.write_nowait(proto.encode_forward_packet(src, dst, data), self.write_limit):
            return "write_error" if c.closed else "queue_tail"
        return None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"derp-mesh {self.url}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        if self._client is not None:
            await self._client.close()

    async def _run(self) -> None:
        delays = reconnect_delays(self.base, self.cap)
        m = self.relay.metrics
        while True:
            try:
                client = await DerpClient.connect(
                    self.url,
                    NodePrivate(self.relay.private_key.raw),
                    timeout=self.connect_timeout,
                    ssl_context=self.ssl_context,
                    mesh_key=self.mesh_key,
                )
            except DerpClientError as e:
                if self.last_error != str(e):
                    log.warning("DERP mesh peer %s: %s; retrying", self.url, e)
                self.last_error = str(e)
                await asyncio.sleep(next(delays))
                continue
            self.server_key = NodePublic(client.server_key.raw)
            if client.server_key.raw == self.relay.public_key.raw:
                log.info("DERP mesh peer %s is this server; not meshing with itself", self.url)
                self.is_self = True
                m.mesh_peers -= 1
                await client.close()
                return
            up_at = time.monotonic()
            why = await self._serve(client)
            self.last_error = why
            log.warning(
                "DERP mesh peer %s (%s): connection ended after %.1f s (%s); forgetting its %d clients",
                self.url,
                self.server_key.short(),
                time.monotonic() - up_at,
                why,
                len(self.present),
            )
            if time.monotonic() - up_at >= STABLE_AFTER:
                delays = reconnect_delays(self.base, self.cap)
            await asyncio.sleep(next(delays))

    async def _serve(self, client: DerpClient) -> str:
        """Watch the peer's connections on ``client`` until it ends; the reason, one phrase."""
        m = self.relay.metrics
        self._client = client
        liveness = asyncio.get_running_loop().create_task(self._liveness(client))
        try:
            await client.watch_conns()
            # Frames are handled in order: a Pong means the server took WatchConns (a server with another
            # mesh key closes the connection instead).
            await client.ping(timeout=self.ping_timeout)
            self.connects += 1
            self._up.set()
            m.mesh_peers_connected += 1
            assert self.server_key is not None
            log.info("DERP mesh peer %s (%s): watching its connections", self.url, self.server_key.short())
            async for msg in client:
                if isinstance(msg, proto.PeerPresent):
                    if msg.key != self.relay.public_key_node:
                        self.present.add(msg.key)
                        self.relay.add_forwarder(msg.key, self)
                elif isinstance(msg, proto.PeerGone):
                    self.present.discard(msg.key)
                    self.relay.remove_forwarder(msg.key, self)
                elif isinstance(msg, proto.Health) and msg.problem:
                    log.warning("DERP mesh peer %s: server health: %s", self.url, msg.problem)
            reason = client._reason().removeprefix(": ")
            return reason or "closed by the peer (a different mesh key refuses WatchConns)"
        except DerpClientError as e:
            return str(e)
        except asyncio.TimeoutError:
            return f"no Pong within {self.ping_timeout:g} s after WatchConns"
        finally:
            if self._up.is_set():
                m.mesh_peers_connected -= 1
            self._up.clear()
            self._client = None
            liveness.cancel()
            await asyncio.wait({liveness})
            for key in list(self.present):
                self.relay.remove_forwarder(key, self)
            self.present.clear()
            await client.close()

    async def _liveness(self, client: DerpClient) -> None:
        while not client.closed:
            idle = time.monotonic() - client.last_recv
            if idle < self.idle_ping:
                await asyncio.sleep(self.idle_ping - idle)
                continue
            try:
                await asyncio.wait_for(client.ping(timeout=self.ping_timeout), self.ping_timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "DERP mesh peer %s did not answer a ping within %g s", self.url, self.ping_timeout
                )
                await client.close()
                return
            except DerpClientError:
                return


class Mesh:
    """This server's side of a DERP mesh: one :class:`MeshPeer` per other server. Made by
    :func:`start_mesh`; peers may come and go (:meth:`add`, :meth:`remove`: the relay embedded in a control
    replica follows the live replicas of its region); ``await stop()`` ends every watch connection."""

    def __init__(
        self,
        relay: Relay,
        peers: list[MeshPeer],
        *,
        ssl_context: ssl.SSLContext | None = None,
        base: float = 0.5,
        cap: float = 5.0,
    ) -> None:
        self.relay = relay
        self.peers = peers
        self.ssl_context = ssl_context
        self.base, self.cap = base, cap

    @property
    def urls(self) -> list[str]:
        """The URLs of the peers, in the order they were added."""
        return [p.url for p in self.peers]

    def add(self, url: str) -> MeshPeer:
        """Start watching the server at DERP URL ``url`` (the peer already there when it is one)."""
        for p in self.peers:
            if p.url == url:
                return p
        assert self.relay.mesh_key is not None
        peer = MeshPeer(
            self.relay, url, self.relay.mesh_key, ssl_context=self.ssl_context, base=self.base, cap=self.cap
        )
        self.peers.append(peer)
        self.relay.metrics.mesh_peers += 1
        peer.start()
        return peer

    async def remove(self, url: str) -> bool:
        """Stop watching the server at ``url``: its clients are forgotten (no more forwarding to them).
        Returns whether it was a peer."""
        for p in self.peers:
            if p.url == url:
                self.peers.remove(p)
                if not p.is_self:
                    self.relay.metrics.mesh_peers -= 1
                await p.stop()
                return True
        return False

    def health(self) -> dict[str, Any]:
        """The mesh's ``GET /health`` check: ``{"status": "ok" | "warning", "peers": N, "connected": N,
        "not_connected": [{"url": ..., "error": ...}, ...]}``; "warning" (degraded) while a peer (other than
        this server itself) is not watched, e.g. one that refuses this server's mesh key."""
        others = [p for p in self.peers if not p.is_self]
        down = [p for p in others if not p.connected]
        return {
            "status": "warning" if down else "ok",
            "peers": len(others),
            "connected": len(others) - len(down),
            "not_connected": [{"url": p.url, "error": p.last_error} for p in down],
        }

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every peer (but this server itself) is watched."""
        deadline = time.monotonic() + timeout
        for p in self.peers:
            while not p.is_self and not p.connected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                await p.wait_connected(min(left, 0.1))
        return True

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.peers))


def start_mesh(
    relay: Relay,
    urls: Sequence[str],
    mesh_key: bytes,
    *,
    ssl_context: ssl.SSLContext | None = None,
    base: float = 0.5,
    cap: float = 5.0,
) -> Mesh:
    """Join ``relay`` to the mesh of the servers at ``urls`` (DERP URLs, see :func:`mesh_urls`; this
    server's own URL may be among them) with ``mesh_key`` (32 bytes): sets ``relay.mesh_key`` (so those
    servers may watch this one too) and starts a :class:`MeshPeer` per URL. Call in a running event loop."""
    if len(mesh_key) != proto.MESH_KEY_LEN:
        raise ValueError(f"a DERP mesh key is {proto.MESH_KEY_LEN} bytes, got {len(mesh_key)}")
    relay.mesh_key = mesh_key
    peers = [MeshPeer(relay, u, mesh_key, ssl_context=ssl_context, base=base, cap=cap) for u in urls]
    relay.metrics.mesh_peers += len(peers)
    for p in peers:
        p.start()
    return Mesh(relay, peers, ssl_context=ssl_context, base=base, cap=cap)


__all__ = ["Mesh", "MeshPeer", "mesh_urls", "read_mesh_key", "start_mesh"]
