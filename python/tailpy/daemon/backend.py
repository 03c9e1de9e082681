"""tailpyd's node state machine: log in to control, follow the netmap, and keep the data plane in step.

States (as Tailscale names them): ``NoState`` (just started), ``NeedsLogin`` (no login server or key yet),
``Starting`` (registered, waiting for the first netmap), ``Running`` (netmap applied, tunnel up),
``Stopped`` (``tailpy down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import platform
import random
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from tailpy import netmap as nm
from tailpy.asyncutil import wait_event
from tailpy.backoff import reconnect_delays
from tailpy.control import ControlClient
from tailpy.control.client import LoginAnswer
from tailpy.daemon import netconf
from tailpy.daemon.state import NodeState, StateStore
from tailpy.errors import AuthKeyError, ConfigError, ControlError, NotRegisteredError, TailpyError
from tailpy.keys import DiscoPrivate, NodePrivate
from tailpy.magicsock import Conn, ConnDevice, Options
from tailpy.proto import control as proto

if TYPE_CHECKING:
    from tailpy.dns.manager import DNSManager

log = logging.getLogger("tailpy.daemon")

ACTIVE_WINDOW = 180.0  # seconds after a handshake a peer counts as active
ROTATE_BEFORE = 7 * 86400.0  # seconds before node key expiry to rotate it (at most half its lifetime)
OS_NAME = platform.system().lower()  # "linux", as the node reports it to control
ENDPOINT_REFRESH = 20.0  # seconds between checks of local endpoints (without NAT traversal running)
BACKOFF_MIN = 0.5  # seconds, first reconnect delay to control
BACKOFF_MAX = 15.0  # seconds, cap of the exponential backoff
STREAM_CHECK = (15.0, 20.0)  # seconds between checks that control still holds the map stream (a draw)
LOGIN_POLL = 25.0  # seconds control may hold a login poll (issue 7)


class DataPlane(ConnDevice, Protocol):
    """What the backend needs of :class:`tailpy._native.Device` (a Protocol, so tests can pass their own):
    what :class:`~tailpy.magicsock.Conn` needs (paths, endpoints, sending, the queue), and the rest below:
    peers' keys and allowed IPs, the node key, counters."""

    @property
    def listen_port(self) -> int: ...
    @property
    def tun_name(self) -> str: ...
    def remove_peer(self, public_key: bytes) -> bool: ...
    def set_private_key(self, private_key: bytes) -> None: ...
    def stats(self) -> Any: ...
    def close(self) -> None: ...


DeviceFactory = Callable[[bytes], DataPlane]


def check_login_server(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL with a host and a valid port.
    Raises ConfigError with what is wrong."""
    if not url:
        raise ConfigError("no login server yet: pass --login-server URL")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ConfigError(f"login server {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"login server {url!r} must be an http:// or https:// URL with a host, e.g. http://192.0.2.1:8080"
        )
    return url.rstrip("/")


class Backend:
    """One node. ``device_factory(private_key)`` creates the data plane (a real ``tailpy._native.Device``
    in production); ``tun_mtu`` bytes; ``dns``: MagicDNS (None: no resolver, the host's DNS untouched)."""

    def __init__(
        self,
        store: StateStore,
        device_factory: DeviceFactory,
        *,
        tun_mtu: int = 1280,
        configure_os: bool = True,
        rotate_before: float = ROTATE_BEFORE,
        dns: DNSManager | None = None,
    ) -> None:
        self.store = store
        self.dns = dns
        self.state_data: NodeState = store.load_or_create()
        # The disco key is never stored: new at each start (the machine key lasts, the node key rotates).
        self.disco_key = DiscoPrivate.generate()
        self._device_factory = device_factory
        self._mtu = tun_mtu
        self._configure_os = configure_os
        self.device: DataPlane | None = None
        self.netmap: nm.NetMap | None = None  # as control sent it
        self._applied: nm.NetMap | None = None  # the part of it in the data plane (no expired peers)
        self.backend_state = "NoState"
        self.last_error: str = ""
        self.control_connected = False
        self._session: asyncio.Task[None] | None = None
        self._endpoints: list[str] = []
        self.changed = asyncio.Event()
        self._netmap_changed = asyncio.Event()
        # The peers' paths (DERP, disco, STUN, netcheck, endpoints); made with the device.
        self.conn: Conn | None = None
        self._endpoints_changed = asyncio.Event()
        self._home_changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self._rotate_before = rotate_before
        self._unextendable_expiry: float | None = None  # a key expiry that rotation did not extend
        self.auth_url = ""  # where the user signs in while an interactive login waits (issue 7)
        self._login_server = ""  # the control server of that login
        self._up_accept_dns: bool | None = None  # --accept-dns of the `up` in progress (None: keep)
        self._login: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """After a restart: reconnect if the node was up before, else wait for ``up``."""
        s = self.state_data
        if self.dns is not None:
            self.dns.recover()  # a resolv.conf left pointed at MagicDNS by a crash
        if s.want_running and s.login_server and s.node_id is not None:
            self._set_state("Starting")
            if s.pending_node_key is not None:
                await self._finish_pending_rotation()
            self._ensure_device()
            self._start_session()
        else:
            self._set_state("NeedsLogin")

    async def up(
        self,
        login_server: str,
        auth_key: str | None,
        hostname: str | None,
        *,
        force_reauth: bool = False,
        accept_dns: bool | None = None,
    ) -> None:
        """Register with ``login_server`` (re-registering a known machine needs no key) and start following
        the netmap. ``force_reauth``: log in again with ``auth_key`` and a new node key even if registered.
        ``accept_dns``: point the host's resolver at MagicDNS (None: as before; True on a new node).

        Nothing is changed (state file, tunnel) unless control accepts the registration, except that a node
        already registered with this server, finding control unreachable, comes up on what it knows and keeps
        trying to reach control. Raises AuthKeyError / ControlError with the server's sentence, ConfigError
        for a malformed URL, PermissionDeniedError / DeviceError when the tunnel cannot be created."""
        s = self.state_data
        url = check_login_server(login_server or s.login_server or self._login_server)
        if self._login is not None and not auth_key and not force_reauth and url == self._login_server:
            if accept_dns is not None:  # a plain `up` while a browser login waits: keep waiting for it
                self._up_accept_dns = accept_dns
            return
        registered_here = s.node_id is not None and url == s.login_server
        expired = self.netmap is not None and self.netmap.self_node.expired
        why = why_offline = ""
        if (not registered_here or force_reauth) and not auth_key:
            if force_reauth:
                head, why = "this node logs in again", "--force-reauth needs a new --auth-key"
            elif s.node_id is not None:
                head = f"this node is registered with {s.login_server}, not {url}"
                why = (
                    f"{head}: pass --auth-key to join {url}, or leave out --login-server to reconnect to "
                    f"{s.login_server}"
                )
            elif s.login_server and url == s.login_server:
                head = "this node is logged out"
                why = f"{head}: pass --auth-key to log in again"
            else:
                head = f"this node is not registered with {url} yet"
                why = f"{head}: pass --auth-key"
            why += " (create a key with `tailpy control authkey create`)"
            # When control cannot be reached, whether it offers a browser login is unknown: name both ways.
            why_offline = (
                f"{head}: once control answers, run `tailpy login` (sign in in a browser, where control "
                "offers it) or `tailpy up --auth-key KEY`"
            )
        await self._stop_session()
        await self._stop_login()
        self._up_accept_dns = accept_dns  # applied when the registration (maybe a browser login) completes
        hostname = hostname or s.hostname or socket.gethostname()
        # A new node key on every fresh login (forced, or after the key expired): an admin who expired a
        # node because its key may be compromised must not see that key come back.
        node_key = NodePrivate.generate() if force_reauth or expired else s.node_key
        created = self.device is None
        self._ensure_device()  # before registering: a node that cannot make its tunnel must not register
        client = ControlClient(url, s.machine_key)
        login: LoginAnswer | None = None
        try:
            if auth_key:
                node: nm.Node | None = await client.register(node_key.public, hostname, auth_key, os=OS_NAME)
            else:  # interactive login where control offers it (issue 7); an auth key where it does not
                login = await client.login_poll(node_key.public, hostname, os=OS_NAME, wait=0)
                node = login.node
        except ControlError as e:
            if why and isinstance(e, AuthKeyError):  # control has no interactive login: say what to do
                e = AuthKeyError(why)
            elif why and not isinstance(e, NotRegisteredError):  # unreachable: say both
                e = ControlError(f"{e}; and {why_offline}")
            if registered_here and not force_reauth and not isinstance(e, (AuthKeyError, NotRegisteredError)):
                log.warning("control unreachable at up (%s): starting on the saved state, retrying", e)
                self._bring_up_offline(hostname, str(e))
                return
            self.last_error = str(e)
            if created:
                self._close_device()
            if self.netmap is not None and not force_reauth and s.want_running:
                self._start_session()  # a failed re-login leaves a running node as it was
            raise e from None
        finally:
            await client.close()
        if node is None:
            assert login is not None
            self._await_login(url, node_key, hostname, login)
            return
        self._registered(url, node_key, hostname, node)

    def _registered(self, url: str, node_key: NodePrivate, hostname: str, node: nm.Node) -> None:
        """Control registered this machine as ``node`` with ``node_key``: save it and follow the netmap."""
        s = self.state_data
        self.auth_url = ""
        if node_key is not s.node_key:
            self._adopt_node_key(node_key)
        if url != s.login_server:
            self.netmap = None
        s.login_server, s.hostname = url, hostname
        s.node_id, s.addresses, s.want_running = node.id, tuple(node.addresses), True
        if self._up_accept_dns is not None:
            s.accept_dns = self._up_accept_dns
        s.node_key_issued = s.node_key_issued if node_key is s.node_key and s.node_key_issued else time.time()
        self.store.save(s)
        self.last_error = ""
        self._set_state("Starting")
        self._apply_self(node)
        self._start_session()

    # -- interactive login (issue 7) -----------------------------------------------------------------

    def _await_login(self, url: str, node_key: NodePrivate, hostname: str, first: LoginAnswer) -> None:
        """Control wants the user to sign in: show ``auth_url`` in the status (state NeedsLogin) and long-poll
        control in the background until the login (and any approval) is done, then come up."""
        self._show_login(first)
        self._set_state("NeedsLogin")
        self._login_server = url
        self._login = asyncio.create_task(self._wait_login(url, node_key, hostname), name="login")

    def _show_login(self, answer: LoginAnswer) -> None:
        if answer.auth_url:
            self.auth_url = answer.auth_url
        if answer.pending_approval:
            self.auth_url = ""
        self.last_error = answer.message if answer.pending_approval else answer.error
        self.changed.set()

    async def _wait_login(self, url: str, node_key: NodePrivate, hostname: str) -> None:
        delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
        client = ControlClient(url, self.state_data.machine_key)
        try:
            while True:
                try:
                    answer = await client.login_poll(node_key.public, hostname, os=OS_NAME, wait=LOGIN_POLL)
                except ControlError as e:  # control restarting, say: keep waiting, the URL is renewed
                    log.warning("waiting for login: %s", e)
                    self.last_error = str(e)
                    self.changed.set()
                    await asyncio.sleep(next(delays))
                    continue
                delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
                if answer.node is not None:
                    log.info("login done: node %d %s", answer.node.id, answer.node.name)
                    self._login = None
                    try:
                        self._registered(url, node_key, hostname, answer.node)
                    except TailpyError as e:  # the tunnel's addresses could not be set, say
                        log.warning("after login: %s", e)
                        self.last_error = str(e)
                        self._set_state("NeedsLogin")
                    return
                self._show_login(answer)
        finally:
            await client.close()

    async def _stop_login(self) -> None:
        task, self._login = self._login, None
        self.auth_url = ""
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _bring_up_offline(self, hostname: str, error: str) -> None:
        s = self.state_data
        s.hostname, s.want_running = hostname, True
        self.store.save(s)
        self.last_error = error
        self._set_state("Starting")
        if self.device is not None and self._configure_os and s.addresses:
            netconf.configure_tun(self.device.tun_name, list(s.addresses), self._mtu)
        self._start_session()

    async def down(self) -> None:
        """Disconnect: stop following control and remove the tunnel; the node stays registered."""
        await self._stop_login()
        await self._stop_session()
        self.state_data.want_running = False
        self.store.save(self.state_data)
        self._close_device()
        self.netmap = None
        self._set_state("Stopped")

    async def logout(self) -> None:
        """Log out: control expires this node's key (the record, address and name stay for the next login),
        the tunnel goes away, and a new node key waits for the next ``up --auth-key``.
        Raises ControlError when control cannot be told."""
        await self._stop_login()
        s = self.state_data
        if s.login_server and s.node_id is not None:
            client = ControlClient(s.login_server, s.machine_key)
            try:
                await client.logout(s.node_key.public)
            finally:
                await client.close()
        await self._stop_session()
        self._close_device()
        self._adopt_node_key(NodePrivate.generate())
        s.node_id, s.addresses, s.want_running, s.node_key_issued = None, (), False, None
        self.store.save(s)
        self.netmap = None
        self.last_error = ""
        self._set_state("NeedsLogin")

    async def close(self) -> None:
        """Daemon exit: like ``down`` but keeps ``want_running`` so the next start reconnects."""
        await self._stop_login()
        await self._stop_session()
        self._close_device()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the session with control ----------------------------------------------------------------------

    def _start_session(self) -> None:
        self._session = asyncio.create_task(self._run_session(), name="control-session")

    async def _stop_session(self) -> None:
        task, self._session = self._session, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.control_connected = False

    async def _run_session(self) -> None:
        """Follow the netmap stream, reconnecting with backoff; rotate the node key when it is due (then
        reconnect at once with the new key)."""
        delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
        resume = None
        while True:
            client = ControlClient(self.state_data.login_server, self.state_data.machine_key)
            client.map_state = resume  # resume from what the last stream applied (only deltas since)
            tasks = {
                asyncio.create_task(self._follow(client), name="follow"),
                asyncio.create_task(self._rotate_when_due(client), name="rotate"),
                asyncio.create_task(self._refresh_endpoints(client), name="endpoints"),
                asyncio.create_task(self._report_home(client), name="home-derp"),
                asyncio.create_task(self._check_stream(client), name="stream-check"),
            }
            rotated = False
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.get_name() == "rotate" and task.exception() is None:
                        rotated = True
                    else:
                        task.result()  # raises what ended it
                if not rotated:
                    raise ControlError("control server ended the map stream")
            except asyncio.CancelledError:
                raise
            except NotRegisteredError as e:
                self._forgotten(e)
                return
            except TailpyError as e:
                self.last_error = str(e)
                log.warning("control session: %s", e)
            except Exception as e:  # keep the node up whatever one stream did
                self.last_error = f"control session failed: {e!r}"
                log.exception("control session failed")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.control_connected = False
                resume = client.map_state if client.map_state is not None and not rotated else None
                await client.close()
            self.changed.set()
            if rotated:
                delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
                continue
            await asyncio.sleep(next(delays))

    def _forgotten(self, e: NotRegisteredError) -> None:
        """Control no longer knows this machine (an admin deleted it): drop the peers and need login."""
        log.warning("control does not know this node any more: %s", e)
        s = self.state_data
        s.node_id, s.addresses, s.want_running = None, (), False
        self.store.save(s)
        self._close_device()
        self.netmap = None
        self.control_connected = False
        self.last_error = (
            "this node was removed from the tailnet; log in again with `tailpy login` (or "
            "`tailpy up --auth-key KEY`)"
        )
        self._set_state("NeedsLogin")

    async def _follow(self, client: ControlClient) -> None:
        s = self.state_data
        self._endpoints = list(self.conn.endpoints) if self.conn else self._local_endpoints()
        self._home_changed.clear()  # the map request carries the current home
        self._endpoints_changed.clear()  # and the current endpoints
        async for netmap in client.stream_map(
            s.node_key.public,
            self._endpoints,
            s.hostname,
            home_derp=self.home_derp,
            disco_key=self.disco_key.public,
        ):
            self.control_connected = True
            if self.backend_state != "NeedsLogin" or not netmap.self_node.expired:
                self.last_error = ""
            self.apply_netmap(netmap)
            self._netmap_changed.set()

    # -- node key rotation -------------------------------------------------------------------------------

    def rotate_at(self) -> float | None:
        """Unix time at which to rotate the node key: ``rotate_before`` seconds before it expires, but no
        earlier than half its lifetime; None when rotation is off, the key never expires or has expired."""
        me = self.netmap.self_node if self.netmap else None
        if self._rotate_before <= 0 or me is None or me.key_expiry is None or me.expired:
            return None
        if me.key_expiry == self._unextendable_expiry:  # a rotation kept it: only a new login renews it
            return None
        issued = self.state_data.node_key_issued or time.time()
        lead = min(self._rotate_before, max(0.0, me.key_expiry - issued) / 2)
        return me.key_expiry - lead

    async def _rotate_when_due(self, client: ControlClient) -> None:
        """Return once the node key has been rotated (the session then reconnects with the new key)."""
        while True:
            due = self.rotate_at()
            wait = 3600.0 if due is None else due - time.time()
            if wait <= 0:
                await self._rotate(client)
                return
            self._netmap_changed.clear()
            await wait_event(self._netmap_changed, min(wait, 3600.0))

    async def _rotate(self, client: ControlClient) -> None:
        """Replace the node key: prove the old one to control, then switch the data plane. Peers learn the
        new key from their netmaps; traffic resumes after one handshake."""
        s = self.state_data
        new = s.pending_node_key or NodePrivate.generate()
        s.pending_node_key = new
        self.store.save(s)
        proof = proto.seal_rotation_proof(s.node_key, await client.server_key(), new.public, time.time())
        before = self.netmap.self_node.key_expiry if self.netmap else None
        node = await client.register(
            new.public, s.hostname, None, os=OS_NAME, old_node_key=s.node_key.public, old_node_proof=proof
        )
        log.info("node key rotated: %s -> %s", s.node_key.public.short(), new.public.short())
        if node.key_expiry is not None and before is not None and node.key_expiry <= before:
            # Control kept the expiry (it follows the login's ID token): do not rotate again before it.
            log.info("node key expiry stays %s; `tailpy login` renews it", time.ctime(node.key_expiry))
            self._unextendable_expiry = node.key_expiry
        self._adopt_node_key(new)
        s.node_key_issued = time.time()
        self.store.save(s)

    async def _finish_pending_rotation(self) -> None:
        """At start, after a crash mid-rotation: if control took the pending key, adopt it; else drop it."""
        s = self.state_data
        pending, s.pending_node_key = s.pending_node_key, None
        assert pending is not None
        client = ControlClient(s.login_server, s.machine_key)
        try:
            await client.register(pending.public, s.hostname, None, os=OS_NAME)
            self._adopt_node_key(pending)
            s.node_key_issued = time.time()
        except ControlError as e:
            log.info("pending node key not taken by control (%s); keeping the current one", e)
        finally:
            await client.close()
        self.store.save(s)

    def _adopt_node_key(self, key: NodePrivate) -> None:
        self.state_data.node_key, self.state_data.pending_node_key = key, None
        if self.device is not None:
            self.device.set_private_key(key.raw)
        if self.conn is not None:
            self.conn.set_private_key(key)  # DERP knows a node by its node key; disco Pings carry it

    # -- home DERP region ------------------------------------------------------------------------------

    @property
    def home_derp(self) -> int:
        """This node's home DERP region id (0: none yet)."""
        return self.conn.home_region if self.conn is not None else 0

    def _on_home_changed(self, region_id: int) -> None:
        self._home_changed.set()
        self.changed.set()

    async def _report_home(self, client: ControlClient) -> None:
        """Tell control each new home region (peers reach this node there); the map request carries it
        at each (re)connection."""
        while True:
            await wait_event(self._home_changed, 3600.0)
            if not self._home_changed.is_set():
                continue
            self._home_changed.clear()
            try:
                await client.update(home_derp=self.home_derp)
            except ControlError as e:
                log.warning("home DERP update: %s", e)
                self._home_changed.set()
                await asyncio.sleep(5.0)

    async def _check_stream(self, client: ControlClient) -> None:
        """Every :data:`STREAM_CHECK` seconds while connected, ask control whether it still holds this
        node's map stream; when it does not (a NAT on the way lost its state, so control's writes no longer
        reach this node and it closed the stream), end the session to reconnect now, rather than after the
        stream's 45 s of silence."""
        while True:
            await asyncio.sleep(random.uniform(*STREAM_CHECK))
            if not self.control_connected:
                continue
            try:
                alive = await client.stream_alive()
            except ControlError as e:  # unreachable: the stream's own silence timeout decides
                log.debug("map stream check: %s", e)
                continue
            if not alive:
                raise ControlError("control no longer holds this node's map stream: reconnecting")

    def _on_endpoints(self, endpoints: list[str]) -> None:
        """NAT traversal found new endpoints (local addresses and STUN-mapped ones, every 20-26 s)."""
        self._endpoints_changed.set()
        self.changed.set()

    def _on_link_change(self) -> None:
        """An address of this host went away: the control connection may be bound to it; reconnect."""
        if self._session is None or self._session.done():
            return
        task = asyncio.get_running_loop().create_task(self._restart_session())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _restart_session(self) -> None:
        await self._stop_session()
        if self.state_data.want_running and self.device is not None and self._session is None:
            log.info("link change: reconnecting to control")
            self._start_session()

    async def _refresh_endpoints(self, client: ControlClient) -> None:
        """Tell control this node's endpoints when they change: as the traversal finds them (re-STUN every
        20-26 s), or, without it, from the local addresses every :data:`ENDPOINT_REFRESH` seconds."""
        while True:
            await wait_event(self._endpoints_changed, ENDPOINT_REFRESH)
            self._endpoints_changed.clear()
            now = list(self.conn.endpoints) if self.conn else self._local_endpoints()
            if now != self._endpoints:
                self._endpoints = now
                try:
                    await client.update_endpoints(now)
                except ControlError as e:
                    log.warning("endpoint update: %s", e)
                    self._endpoints = []  # try again at the next round

    def _local_endpoints(self) -> list[str]:
        if self.device is None:
            return []
        return netconf.local_endpoints(self.device.listen_port, exclude_ifaces=(self.device.tun_name,))

    # -- applying the netmap ---------------------------------------------------------------------------

    def apply_netmap(self, new: nm.NetMap) -> nm.NetMapDiff:
        """Bring the data plane in line with ``new``: add, update and remove peers as the diff says.

        Peers whose node key has expired are left out of WireGuard (they stay in the netmap, shown as
        expired); when this node's own key has expired, every peer is left out and the node needs login."""
        dev = self._ensure_device()
        self._apply_self(new.self_node)
        me_expired = new.self_node.expired
        wanted = new.with_peers(() if me_expired else (p for p in new.peers.values() if not p.expired))
        d = nm.diff(self._applied, wanted)
        # WireGuard's part here (keys, allowed IPs); endpoints and paths are the Conn's.
        for old in d.removed:
            dev.remove_peer(old.node_key.raw)
        for old, node in d.changed:
            if old.node_key != node.node_key:
                dev.remove_peer(old.node_key.raw)
                dev.set_peer(node.node_key.raw, allowed_ips=list(node.addresses))
            elif old.addresses != node.addresses:
                dev.set_peer(node.node_key.raw, allowed_ips=list(node.addresses))
        for node in d.added:
            dev.set_peer(node.node_key.raw, allowed_ips=list(node.addresses))
        self.netmap, self._applied = new, wanted
        if self.conn is not None:
            self.conn.set_netmap(wanted)
        if self.dns is not None:
            self.dns.apply(new, accept_dns=self.state_data.accept_dns and not me_expired, tun=dev.tun_name)
        if d:
            log.info("netmap: +%d -%d ~%d peers", len(d.added), len(d.removed), len(d.changed))
        if me_expired:
            if self.backend_state != "NeedsLogin":
                log.warning("this node's key has expired: it needs login (`tailpy login`)")
                self.last_error = (
                    "this node's key has expired; log in again with `tailpy login` (or with an auth key)"
                )
            self._set_state("NeedsLogin")
        else:
            self._set_state("Running")
        return d

    def _apply_self(self, node: nm.Node) -> None:
        s = self.state_data
        if tuple(node.addresses) != s.addresses or node.id != s.node_id:
            s.addresses, s.node_id = tuple(node.addresses), node.id
            self.store.save(s)
        if self.device is not None and self._configure_os:
            netconf.configure_tun(self.device.tun_name, list(node.addresses), self._mtu)

    def _ensure_device(self) -> DataPlane:
        """The data plane and its :class:`Conn` (made here, inside the running event loop)."""
        if self.device is None:
            dev = self._device_factory(self.state_data.node_key.raw)
            self.device = dev
            tun = dev.tun_name

            def local() -> list[netconf.IPInterface]:
                return netconf.local_addresses(exclude_ifaces=(tun,)) if self._configure_os else []

            self.conn = Conn(
                dev,
                self.state_data.node_key,
                Options(
                    self.disco_key,
                    on_endpoints=self._on_endpoints,
                    on_home_changed=self._on_home_changed,
                    on_link_change=self._on_link_change,
                    local_endpoints=self._local_endpoints,
                    lan_networks=lambda: [i.network for i in netconf.local_addresses(exclude_ifaces=(tun,))],
                    choose_endpoint=lambda eps: netconf.choose_endpoint(eps, local()),
                ),
            )
            self.conn.start()
        return self.device

    def _close_device(self) -> None:
        if self.dns is not None:
            self.dns.stop()  # the host's resolver back as it was
        dev, self.device = self.device, None
        self._applied = None  # a new device starts with no peers
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.stop()  # no more reads of the device's queue, no more ticks
            task = asyncio.get_running_loop().create_task(conn.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if dev is not None:
            dev.close()

    def _set_state(self, state: str) -> None:
        self.backend_state = state
        self.changed.set()

    # -- status ---------------------------------------------------------------------------------------

    def _node_json(self, node: nm.Node, st: Mapping[str, Any], now: float) -> dict[str, Any]:
        domain = self.netmap.domain if self.netmap else ""
        hs = st.get("last_handshake")
        conn = self.conn
        relay_region = (
            conn.relay_region(node.node_key.raw) if conn is not None and st.get("path") == "relay" else 0
        )
        return {
            "id": node.id,
            "name": node.name,
            "fqdn": node.fqdn(domain),
            "hostname": node.hostname,
            "user": node.user,
            "tags": list(node.tags),
            "os": node.os,
            "node_key": node.node_key.text(),
            "addresses": list(node.addresses),
            "online": node.online,
            "last_seen": node.last_seen,
            "key_expiry": node.key_expiry,
            "expired": node.expired,
            "home_derp": node.home_derp,
            "disco_key": node.disco_key.text() if node.disco_key is not None else None,
            "endpoints": list(node.endpoints),
            # Only a direct path's endpoint: on relay the data plane still holds its would-be direct endpoint
            # (often an unreachable LAN address), which would contradict "path": "relay" for scripts.
            "endpoint": None if st.get("path") == "relay" else st.get("endpoint"),
            "path": st.get("path"),
            "relay_region": relay_region,
            "relay_region_code": conn.region_code(relay_region) if conn is not None and relay_region else "",
            "last_handshake": hs,
            # A WireGuard session lives 180 s past its handshake, and handshakes happen only for traffic.
            "active": hs is not None and now - hs < ACTIVE_WINDOW,
            "tx_bytes": st.get("tx_bytes", 0),
            "rx_bytes": st.get("rx_bytes", 0),
        }

    def status(self) -> dict[str, Any]:
        """The node and its peers, as ``tailpy status --json`` prints it (fields in README "Status JSON").
        Times are unix seconds."""
        s = self.state_data
        now = time.time()
        stats = self.conn.peer_stats() if self.conn is not None else {}
        paths = self.conn.status() if self.conn is not None else {"derp": None, "traversal": None}
        me = self.netmap.self_node if self.netmap else None
        peers = [
            self._node_json(node, stats.get(node.node_key.raw, {}), now)
            for node in (sorted(self.netmap.peers.values(), key=lambda n: n.name) if self.netmap else [])
        ]
        return {
            "backend_state": self.backend_state,
            "login_server": s.login_server or (self._login_server if self._login is not None else ""),
            "control_connected": self.control_connected,
            "error": self.last_error,
            "auth_url": self.auth_url,
            "login_pending": self._login is not None,
            "health": netconf.mtu_warnings(self._mtu),
            "now": now,
            "self": {
                "id": s.node_id,
                "name": me.name if me else "",
                "fqdn": me.fqdn(self.netmap.domain) if me and self.netmap else "",
                "hostname": s.hostname,
                "user": me.user if me else "",
                "tags": list(me.tags) if me else [],
                "os": me.os if me else "",
                "key_expiry": me.key_expiry if me else None,
                "expired": me.expired if me else False,
                "node_key": s.node_key.public.text(),
                "machine_key": s.machine_key.public.text(),
                "disco_key": self.disco_key.public.text(),
                "addresses": list(s.addresses),
                "listen_port": self.device.listen_port if self.device else None,
                "endpoints": list(self._endpoints),
                "tun": self.device.tun_name if self.device else None,
                "home_derp": self.home_derp,
                "home_derp_code": self.conn.region_code(self.home_derp) if self.conn else "",
            },
            "domain": self.netmap.domain if self.netmap else "",
            "peers": peers,
            "device": dict(self.device.stats()) if self.device else None,
            "derp": paths["derp"],
            "derp_map": self.netmap.derp_map.to_json() if self.netmap and self.netmap.derp_map else None,
            "traversal": paths["traversal"],
            # datagrams from the socket that were neither disco nor STUN
            "ignored_datagrams": self.conn.ignored if self.conn else 0,
            "dns": self.dns.status() if self.dns is not None else None,
        }

    def find_peer(self, target: str) -> nm.Node:
        """The peer called ``target`` (its name, its FQDN with or without the final dot, or its hostname)
        or owning tailnet address ``target``. Raises ConfigError with a sentence when there is none."""
        if self.netmap is None:
            raise ConfigError("this node has no netmap yet: run `tailpy up` and wait for it to connect")
        want = target.strip().rstrip(".").lower()
        ip: Any = None
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(want)
        domain = self.netmap.domain
        for node in sorted(self.netmap.peers.values(), key=lambda n: n.id):
            if ip is not None:
                if any(ipaddress.ip_interface(a).ip == ip for a in node.addresses):
                    return node
            elif want in (node.name.lower(), node.fqdn(domain).lower()):
                return node
        if ip is None:
            for node in self.netmap.peers.values():
                if node.hostname.lower() == want:
                    return node
        me = self.netmap.self_node
        if (ip is not None and any(ipaddress.ip_interface(a).ip == ip for a in me.addresses)) or (
            want in (me.name.lower(), me.fqdn(domain).lower())
        ):
            raise ConfigError(f"{target} is this node; ping a peer")
        raise ConfigError(f"no peer {target!r} in this tailnet (see `tailpy status`)")

    async def ping(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        """One disco ping to peer ``target`` (name or tailnet IP, :meth:`find_peer`), waiting up to
        ``timeout`` seconds: ``{"peer": {name, fqdn, ip}, "direct", "via" ("DERP(<code>)" or "ip:port"),
        "rtt" (seconds or None), "peer_saw", "timeout"}``. Raises ConfigError (unknown peer, one without
        disco, node not running)."""
        node = self.find_peer(target)
        if node.expired:
            raise ConfigError(f"peer {node.name}'s key has expired: it cannot be reached")
        if self.conn is None:
            raise ConfigError("this node is not running (no data plane): run `tailpy up`")
        if node.disco_key is None:
            raise ConfigError(f"peer {node.name} runs no disco (an older tailpy?): `tailpy ping` needs it")
        try:
            reply = await self.conn.ping(node.node_key, timeout)
        except KeyError:
            raise ConfigError(f"peer {node.name} is not in the data plane yet; try again") from None
        domain = self.netmap.domain if self.netmap else ""
        peer = {"name": node.name, "fqdn": node.fqdn(domain), "ip": node.ipv4 or node.ipv6 or ""}
        return {"peer": peer, **reply.to_json()}

    async def netcheck(self, timeout: float = 5.0) -> dict[str, Any]:
        """A netcheck run now over the data plane's socket: ``{"report": Report JSON, "derp_map": DERP map
        JSON}``. Raises ConfigError when there is no data plane or no DERP map with STUN servers yet."""
        if self.conn is None:
            raise ConfigError("this node is not running (no data plane): run `tailpy up`")
        report = await self.conn.netcheck(timeout=timeout)
        if report is None:
            raise ConfigError("tailpyd has no DERP map with STUN servers yet")
        return {"report": report.to_json(), "derp_map": self.conn.relay.derp_map.to_json()}

    def whois(self, address: str) -> dict[str, Any] | None:
        """The node (self or a peer) owning tailnet ``address`` ("100.64.0.2", "fd7a:115c:a1e0::2";
        an "ip:port" is accepted), as in ``status``; None when no node has it."""
        if self.netmap is None:
            return None
        try:
            ip = (
                netconf.parse_endpoint(address)[0]
                if address.count(":") == 1 or "]" in address
                else (ipaddress.ip_address(address))
            )
        except ValueError:
            raise ConfigError(f"{address!r} is not an IP address") from None
        stats = self.conn.peer_stats() if self.conn is not None else {}
        now = time.time()
        for node in (self.netmap.self_node, *self.netmap.peers.values()):
            if any(ipaddress.ip_interface(a).ip == ip for a in node.addresses):
                return self._node_json(node, stats.get(node.node_key.raw, {}), now)
        return None
