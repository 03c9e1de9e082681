"""``tailpy.Node``: a tailnet node inside a Python program, without root (after Tailscale's ``tsnet``).

A :class:`Node` runs the same node as tailpyd (:class:`tailpy.daemon.backend.Backend`: the control session,
key storage and rotation, :class:`tailpy.magicsock.Conn` with NAT traversal and DERP fallback, the packet
filter in the data plane) in the calling process, on a userspace data plane (``Device.userspace``): a TCP/IP
stack in Rust terminates the node's TCP and UDP, so there is no TUN, no route, no DNS or firewall change, and
its UDP port is unprivileged (0: any free one). Sockets reach Python as file descriptors
(:mod:`tailpy.netstack`), served by asyncio like any other.

Serve HTTP on the tailnet and fetch from a peer::

    import asyncio, tailpy

    async def main() -> None:
        async with tailpy.Node(control_url="http://192.0.2.1:8080", auth_key="tskey-...",
                               state_dir="./state", hostname="hello") as node:
            async def handle(reader, writer):
                await reader.readuntil(b"\\r\\n\\r\\n")
                writer.write(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello from the tailnet\\n")
                writer.close()
            server = await node.start_server(handle, port=80)
            reader, writer = await node.open_connection("beta", 80)   # a MagicDNS name
            ...
            await server.serve_forever()

    asyncio.run(main())

Several nodes may run in one process, each with its own ``state_dir`` (one node per state directory, as one
tailpyd: the directory's lock is held while the node runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar, cast

from tailpy.daemon.backend import Backend, UserspaceDataPlane
from tailpy.daemon.lifecycle import BackendState
from tailpy.daemon.lock import DaemonLock, RunRecord
from tailpy.daemon.state import StateStore
from tailpy.errors import ConfigError, ControlError, TailpyError
from tailpy.ipnstate import PeerStatus, PingReply, Status
from tailpy.netstack import (
    DIAL_TIMEOUT,
    STREAM_LIMIT,
    IPAddress,
    Netstack,
    TailnetDatagramTransport,
    TailnetServer,
    UserspaceDevice,
    check_peer,
    lookup,
)

log = logging.getLogger("tailpy.node")

P = TypeVar("P", bound=asyncio.BaseProtocol)

START_TIMEOUT = 60.0
"""Seconds :meth:`Node.start` waits for the first netmap after registering (None waits forever)."""


class NodeDevice(UserspaceDataPlane, UserspaceDevice, Protocol):
    """What a node needs of its data plane: ``tailpy._native.Device.userspace(...)``."""


NodeDeviceFactory = Callable[[bytes, int, list[str], int], NodeDevice]
"""``(private_key, listen_port, addresses, mtu) -> device``; by default ``Device.userspace``."""


def _userspace_device(private_key: bytes, listen_port: int, addresses: list[str], mtu: int) -> NodeDevice:
    from tailpy import _native

    if not hasattr(_native.Device, "userspace"):
        raise ConfigError(
            "this build of tailpy has no userspace data plane (Device.userspace): rebuild the extension"
        )
    return cast(NodeDevice, _native.Device.userspace(private_key, listen_port, addresses, mtu))


def default_state_dir(hostname: str | None) -> Path:
    """``$XDG_STATE_HOME/tailpy/node-<name>`` (``~/.local/state`` when unset), ``<name>`` the hostname or
    the program's name, as tsnet keeps ``tsnet-<program>`` under the user's config directory."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = hostname or Path(sys.argv[0] or "python").stem or "python"
    return Path(base) / "tailpy" / f"node-{name}"


class Node:
    """One tailnet node in this process.

    ``control_url``: the control server ("http://192.0.2.1:8080"; None: the one the state directory was
    registered with). ``auth_key``: a pre-auth key (``tailpy control authkey create``); None: reconnect
    with the saved registration, else log in interactively (the sign-in URL goes to ``on_login_url`` and
    :attr:`login_url`). ``state_dir``: where the keys are kept (mode 0700; default
    :func:`default_state_dir`). ``hostname``: the name asked for (default: the host's name).
    ``ephemeral``: register as an ephemeral node whatever the auth key, keep no state (a temporary
    directory removed at :meth:`close`) and log out at close, which makes control delete the node (as
    tsnet's ``Server.Ephemeral``); a node that dies without closing is deleted after control's ephemeral
    timeout. ``port``: the UDP port for
    WireGuard, STUN and disco (0: any free port). ``mtu``: bytes. ``start_timeout``: seconds
    :meth:`start` waits for the node to come up (None: forever, e.g. for an interactive login).

    ``async with Node(...) as node`` starts and closes it. Errors: ConfigError (bad URL, a state directory
    another node or tailpyd holds: DaemonRunningError), AuthKeyError / ControlError (control refused or
    is unreachable), DialError (from the network methods), TimeoutError from :meth:`start`.
    """

    def __init__(
        self,
        *,
        control_url: str | None = None,
        auth_key: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        hostname: str | None = None,
        ephemeral: bool = False,
        port: int = 0,
        mtu: int = 1280,
        on_login_url: Callable[[str], None] | None = None,
        start_timeout: float | None = START_TIMEOUT,
        device_factory: NodeDeviceFactory | None = None,
    ) -> None:
        self.control_url = control_url
        self.auth_key = auth_key
        self.hostname = hostname
        self.ephemeral = ephemeral
        self.port = port
        self.mtu = mtu
        self.on_login_url = on_login_url
        self.start_timeout = start_timeout
        self._factory = device_factory or _userspace_device
        self._tmp: Path | None = None
        if state_dir is None and ephemeral:
            self.state_dir: Path | None = None  # made at start
        else:
            self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir(hostname)
        self.backend: Backend | None = None
        self._lock: DaemonLock | None = None
        self._stack: Netstack | None = None
        self._login_url: asyncio.Future[str] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._reported_url = ""

    # -- life ------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Take the state directory, register with control when needed (auth key, or an interactive login
        reported through ``on_login_url``) and wait until the node is up (its first netmap applied).
        Raises what :class:`Node` lists; on failure everything is released again."""
        if self.backend is not None:
            raise ConfigError("this node is already started")
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        if self.state_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="tailpy-node-"))
            self.state_dir = self._tmp
        lock = DaemonLock(self.state_dir)
        lock.acquire()
        self._lock = lock
        lock.record(RunRecord(pid=os.getpid(), tun="", socket="", netfilter_table=""))
        port, mtu, factory = self.port, self.mtu, self._factory

        def make_device(private_key: bytes) -> NodeDevice:
            return factory(private_key, port, [], mtu)

        backend = Backend(StateStore(self.state_dir), make_device, tun_mtu=mtu, userspace=True)
        self.backend = backend
        self._stack = Netstack(self._device, self._resolve, self._local_ip, self._check_peer, mtu)
        self._watch = asyncio.create_task(self._watch_login(), name="tailpy-node-login")
        await backend.start()
        s = backend.state_data
        url = self.control_url or s.login_server
        if not url:
            raise ConfigError("no control server: pass control_url")
        registered = s.node_id is not None and s.login_server.rstrip("/") == url.rstrip("/")
        if not registered or not s.want_running or backend.state is not BackendState.STARTING:
            await backend.up(
                url, self.auth_key, self.hostname or None, accept_dns=False, ephemeral=self.ephemeral
            )
        await asyncio.wait_for(self._until_running(), self.start_timeout)

    async def _until_running(self) -> None:
        backend = self._backend()
        while backend.state is not BackendState.RUNNING:
            st = backend.status()
            if backend.state is BackendState.NEEDS_LOGIN and not st.login_pending and st.error:
                raise ControlError(st.error)  # an expired key, a node control forgot
            backend.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(backend.changed.wait(), 1.0)

    async def _watch_login(self) -> None:
        """Report each new sign-in URL (``on_login_url``, :attr:`login_url`, :meth:`wait_login_url`)."""
        backend = self._backend()
        while True:
            url = backend.auth_url
            if url and url != self._reported_url:
                self._reported_url = url
                if self._login_url is not None and not self._login_url.done():
                    self._login_url.set_result(url)
                if self.on_login_url is not None:
                    try:
                        self.on_login_url(url)
                    except Exception:  # the caller's callback must not stop the node
                        log.exception("on_login_url raised")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Stop the node and release everything: its connections, servers and datagram endpoints, the
        data plane (socket, threads), the control session, the state directory's lock (and for an
        ephemeral node, its registration and state). Idempotent."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._stack is not None:
            await self._stack.close()
        backend, self.backend = self.backend, None
        if backend is not None:
            if self.ephemeral and backend.state_data.node_id is not None:
                with contextlib.suppress(TailpyError):
                    await backend.logout()
            await backend.close()
        if self._stack is not None:
            await self._stack.wait_threads()
            self._stack = None
        if backend is not None:
            # The data plane's eventfds go with the Device object, which reference cycles among the
            # session's and magicsock's callbacks can keep alive until the next collection: collect now,
            # so that a closed node holds no descriptor.
            del backend
            gc.collect()
        if self._login_url is not None and not self._login_url.done():
            self._login_url.cancel()
        self._login_url = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.state_dir = None

    # -- what the node is ------------------------------------------------------------------------------

    def _backend(self) -> Backend:
        if self.backend is None:
            raise ConfigError("this node is not started: use `async with Node(...)` or `await node.start()`")
        return self.backend

    def _device(self) -> UserspaceDevice | None:
        return cast(UserspaceDevice | None, self.backend.device if self.backend is not None else None)

    def _resolve(self, host: str) -> list[IPAddress]:
        return lookup(self.backend.netmap if self.backend is not None else None, host)

    def _check_peer(self, ip: IPAddress) -> None:
        check_peer(self.backend.netmap if self.backend is not None else None, ip)

    def _local_ip(self, version: int) -> str:
        for ip in self.addresses:
            if ip.version == version:
                return str(ip)
        return "0.0.0.0" if version == 4 else "::"

    def _netstack(self) -> Netstack:
        self._backend()
        assert self._stack is not None
        return self._stack

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """The node's tailnet addresses (IPv4 first; empty before control assigned them)."""
        if self.backend is None:
            return ()
        ips = (ipaddress.ip_interface(a).ip for a in self.backend.state_data.addresses)
        return tuple(sorted(ips, key=lambda ip: ip.version))

    @property
    def login_url(self) -> str | None:
        """Where the user signs in while an interactive login waits (None otherwise)."""
        return (self.backend.auth_url or None) if self.backend is not None else None

    async def wait_login_url(self) -> str:
        """The first sign-in URL of an interactive login: waits until control gives one (may be awaited
        before or while :meth:`start` runs, from another task)."""
        if self._login_url is None:
            self._login_url = asyncio.get_running_loop().create_future()
            if self._reported_url:
                self._login_url.set_result(self._reported_url)
        return await asyncio.shield(self._login_url)

    async def status(self) -> Status:
        """The node and its peers, as ``tailpy status --json`` (:class:`tailpy.ipnstate.Status`)."""
        return self._backend().status()

    async def ping(self, peer: str, timeout: float = 5.0) -> PingReply:
        """One disco ping to ``peer`` (name, FQDN or tailnet IP): its latency and path (direct endpoint or
        DERP region). Raises ConfigError (unknown peer, not running)."""
        return await self._backend().ping(peer, timeout)

    async def whois(self, address: str) -> PeerStatus | None:
        """The node owning tailnet ``address`` ("100.64.0.2", or "ip:port" as a peername gives it); None
        when no node has it."""
        return self._backend().whois(address)

    def resolve(self, host: str) -> list[IPAddress]:
        """``host``'s tailnet addresses from this node's netmap (:func:`tailpy.netstack.lookup`)."""
        return self._netstack().resolve(host)

    # -- sockets ---------------------------------------------------------------------------------------

    async def open_connection(
        self, host: str, port: int, *, timeout: float = DIAL_TIMEOUT, limit: int = STREAM_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``reader, writer`` of a TCP connection to ``host``:``port`` over the tailnet, as
        :func:`asyncio.open_connection`. ``host``: a MagicDNS name ("beta"), an FQDN or a tailnet IP.
        ``timeout``: seconds for the TCP handshake. Raises DialError (reason "no-name", "refused",
        "timeout")."""
        return await self._netstack().open_connection(host, port, timeout=timeout, limit=limit)

    async def create_connection(
        self, protocol_factory: Callable[[], P], host: str, port: int, *, timeout: float = DIAL_TIMEOUT
    ) -> tuple[asyncio.Transport, P]:
        """A TCP connection with a protocol, as ``loop.create_connection``. Raises DialError."""
        return await self._netstack().create_connection(protocol_factory, host, port, timeout=timeout)

    async def dial(self, host: str, port: int, *, timeout: float = DIAL_TIMEOUT) -> socket.socket:
        """A connected non-blocking socket to ``host``:``port`` over the tailnet (for libraries that take a
        socket: ``asyncio.open_connection(sock=...)``, aiohttp connectors). Raises DialError."""
        return await self._netstack().dial(host, port, timeout=timeout)

    async def start_server(
        self,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None],
        port: int,
        *,
        backlog: int = 128,
        limit: int = STREAM_LIMIT,
    ) -> TailnetServer:
        """Serve TCP ``port`` on the node's tailnet addresses, as :func:`asyncio.start_server`:
        ``client_connected_cb(reader, writer)`` per connection; ``writer.get_extra_info("peername")`` is the
        client's tailnet (ip, port) (see :meth:`whois`). Returns a server with ``close()``,
        ``wait_closed()``, ``serve_forever()``."""
        return await self._netstack().start_server(client_connected_cb, port, backlog=backlog, limit=limit)

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int, *, backlog: int = 128
    ) -> TailnetServer:
        """As ``loop.create_server``: a protocol per connection to TCP ``port`` (an aiohttp
        ``AppRunner.server`` works as the factory)."""
        return await self._netstack().create_server(protocol_factory, port, backlog=backlog)

    async def create_datagram_endpoint(
        self,
        protocol_factory: Callable[[], P],
        *,
        local_port: int = 0,
        remote_addr: tuple[str, int] | None = None,
    ) -> tuple[TailnetDatagramTransport, P]:
        """A UDP socket on ``local_port`` of the node's tailnet addresses, as
        ``loop.create_datagram_endpoint`` with an :class:`asyncio.DatagramProtocol`: ``sendto(data,
        (name or ip, port))``, ``datagram_received(data, (ip, port))``. Raises DialError."""
        return await self._netstack().create_datagram_endpoint(
            protocol_factory, local_port=local_port, remote_addr=remote_addr
        )


__all__ = ["Node", "NodeDevice", "NodeDeviceFactory", "default_state_dir"]
