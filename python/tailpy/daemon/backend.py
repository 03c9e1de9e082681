"""tailpyd's node: a state machine over a session with control, wiring the data plane, its paths and DNS.

:class:`Backend` handles the local API's commands (``up``, ``down``, ``logout``, ``status``, ``ping``,
``netcheck``, ``whois``) and wires the parts:

* the data plane (``tailpy._native.Device``): WireGuard's peers (keys, allowed IPs) from the netmap;
* :class:`tailpy.magicsock.Conn`: the peers' paths (endpoints, DERP, disco), made with the device;
* :class:`tailpy.daemon.session.ControlSession`: the map stream, key rotation, endpoint and home reports;
* :class:`tailpy.dns.manager.DNSManager`: MagicDNS.

In userspace mode (``userspace=True``: ``tailpyd --tun userspace-networking`` and :class:`tailpy.Node`) the
data plane is a userspace device (``Device.userspace``): the node's addresses go to its TCP/IP stack
(``set_addresses``) instead of a TUN, and nothing of the host is changed (no routes, DNS or firewall).

Its state (:class:`tailpy.daemon.lifecycle.BackendState`) moves only by the table in
:mod:`tailpy.daemon.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from tailpy import netmap as nm
from tailpy.control.client import LoginAnswer, control_urls
from tailpy.control.names import sanitize
from tailpy.daemon import health as hl
from tailpy.daemon import netconf
from tailpy.daemon.lifecycle import BackendState, Event, transition
from tailpy.daemon.pfilter import DeviceRule, device_rules
from tailpy.daemon.router import tailnet_routes
from tailpy.daemon.routing import (
    ExitChoice,
    RoutePlan,
    RoutePrefs,
    check_exit_node,
    lan_prefixes,
    peer_allowed_ips,
    resolve_exit_node,
    route_plan,
)
from tailpy.daemon.session import ROTATE_BEFORE, ControlSession, SessionHooks, logout, poll_login, register
from tailpy.daemon.state import NodeState, StateStore
from tailpy.endpoint import Endpoint
from tailpy.errors import (
    AuthKeyError,
    ConfigError,
    ControlError,
    EndpointError,
    NotRegisteredError,
    StorageError,
    TagError,
    TailpyError,
)
from tailpy.ipnstate import PeerStatus, PingPeer, PingReply, SelfStatus, Status
from tailpy.keys import DiscoPrivate, NodePrivate
from tailpy.magicsock import Conn, ConnDevice, Options
from tailpy.packetfilter import FilterRule
from tailpy.routes import EXIT_ROUTES, has_exit_routes, parse_routes, subnet_routes

if TYPE_CHECKING:
    from tailpy.daemon.netfilter import Firewall
    from tailpy.dns.manager import DNSManager

log = logging.getLogger("tailpy.daemon")

ACTIVE_WINDOW = 180.0  # seconds after a handshake a peer counts as active
HEALTH_INTERVAL = 2.0  # seconds between health checks (each change is logged once)
ROUTE_MTU_INTERVAL = 30.0  # seconds between looks at the default route's MTU


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
    def set_filter(self, rules: list[DeviceRule] | None) -> None: ...
    def stats(self) -> Any: ...
    def close(self) -> None: ...


class UserspaceDataPlane(DataPlane, Protocol):
    """A userspace data plane (``Device.userspace``): the node's addresses go to its TCP/IP stack."""

    def set_addresses(self, addresses: list[str]) -> None: ...


DeviceFactory = Callable[[bytes], DataPlane]

ROUTE_PREFS = (
    "advertise_routes",
    "accept_routes",
    "exit_node",
    "exit_node_allow_lan_access",
    "snat_subnet_routes",
)
"""The route preferences (:class:`tailpy.daemon.routing.RoutePrefs`) as fields of the state file."""
PREF_KEYS = (*ROUTE_PREFS, "advertise_exit_node")
"""The route preferences a local API request may give: :data:`ROUTE_PREFS` and ``advertise_exit_node``
(a boolean: add or remove both exit routes, keeping the subnet routes)."""


class OSRouter(Protocol):
    """The host's routing for this node's TUN (:class:`tailpy.daemon.router.PlanRouter`, which builds the
    router's ``RouterConfig``; a Protocol, so tests can pass their own): ``apply(addresses, plan)``
    (idempotent; DeviceError with one sentence), ``warnings()`` (what keeps the routing in force from
    working, one sentence each: the ``router`` health warning), ``close()`` undoes everything."""

    def apply(self, addresses: tuple[str, ...], plan: RoutePlan) -> None: ...
    def warnings(self) -> list[str]: ...
    def close(self) -> None: ...


RouterFactory = Callable[[str], OSRouter]
"""Makes the :class:`OSRouter` of a TUN (by name)."""


def check_login_server(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL with a host and a valid port; several such
    URLs separated by commas (replicas of one control server: :func:`tailpy.control.client.control_urls`)
    come back joined by commas. Raises ConfigError with what is wrong."""
    if not url:
        raise ConfigError("no login server yet: pass --login-server URL")
    if "," in url:
        return ",".join(check_login_server(u.strip()) for u in url.split(",") if u.strip())
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


def same_control(a: str, b: str) -> bool:
    """Whether login server settings ``a`` and ``b`` (each one URL or a comma-separated list of replicas)
    share a URL: one control database, where the node's registration holds (``http://a,http://b`` adds a
    replica to ``http://a``)."""
    return bool(a and b and set(control_urls(a)) & set(control_urls(b)))


class Backend:
    """One node. ``device_factory(private_key)`` creates the data plane (a real ``tailpy._native.Device``
    in production); ``tun_mtu`` bytes; ``dns``: MagicDNS (None: no resolver, the host's DNS untouched);
    ``rotate_before``: seconds before the node key expires to rotate it (0: never); ``firewall``: the node
    firewall (:mod:`tailpy.daemon.netfilter`; None: the host's nftables untouched). Made and used inside a
    running event loop. ``userspace``: the device is a userspace one (its stack gets the node's addresses;
    the host is left alone whatever ``configure_os`` says, but its interfaces are still read for this
    node's endpoints). ``router_factory(tun)``: the host's routing into the TUN, the tailnet ranges and
    what the route preferences add (:class:`tailpy.daemon.router.PlanRouter` in tailpyd; None, and in
    userspace mode: no route into the TUN is made)."""

    USERSPACE_TUN = "userspace-networking"
    """What status shows as the TUN of a userspace node (tailscaled's ``--tun`` value for it)."""

    def __init__(
        self,
        store: StateStore,
        device_factory: DeviceFactory,
        *,
        tun_mtu: int = 1280,
        configure_os: bool = True,
        rotate_before: float = ROTATE_BEFORE,
        dns: DNSManager | None = None,
        firewall: Firewall | None = None,
        userspace: bool = False,
        router_factory: RouterFactory | None = None,
    ) -> None:
        self.store = store
        self.dns = dns
        self.firewall = firewall  # the node firewall's nftables table, made and removed with the device
        self.state_data: NodeState = store.load_or_create()
        # The disco key is never stored: new at each start (the machine key lasts, the node key rotates).
        self.disco_key = DiscoPrivate.generate()
        self._device_factory = device_factory
        self._mtu = tun_mtu
        self._userspace = userspace
        self._configure_os = configure_os and not userspace
        self.device: DataPlane | None = None
        self.conn: Conn | None = None  # the peers' paths; made with the device
        self.netmap: nm.NetMap | None = None  # as control sent it
        self._applied: nm.NetMap | None = None  # the part of it in the data plane (no expired peers)
        self._applied_filter: tuple[FilterRule, ...] | None = None  # the packet filter in the data plane
        self.state = BackendState.NO_STATE
        self.last_error: str = ""
        self.changed = asyncio.Event()
        self.session = ControlSession(
            store,
            self.state_data,
            self.disco_key.public,
            SessionHooks(
                on_netmap=self._on_netmap,
                on_node_key=self._adopt_node_key,
                on_forgotten=self._forgotten,
                on_error=self._on_session_error,
                on_status=self.changed.set,
                endpoints=self._endpoints,
                home_derp=lambda: self.home_derp,
            ),
            rotate_before=rotate_before,
        )
        self._closing: set[asyncio.Task[None]] = set()
        self.auth_url = ""  # where the user signs in while an interactive login waits
        self._login_server = ""  # the control server of that login
        self._up_accept_dns: bool | None = None  # --accept-dns of the `up` in progress (None: keep)
        self._up_tags: tuple[str, ...] | None = None  # --advertise-tags of the `up` in progress (None: keep)
        self._up_routes: dict[str, Any] = {}  # the route prefs the `up` in progress gives (ROUTE_PREFS keys)
        self._router_factory = None if userspace else router_factory
        self._router: OSRouter | None = None
        self._router_applied: tuple[tuple[str, ...], RoutePlan] | None = None
        self._peer_ips: dict[bytes, list[str]] = {}  # each peer's allowed IPs in the data plane
        self.exit_choice = ExitChoice()
        """The exit node preference resolved against the last netmap (:func:`resolve_exit_node`)."""
        self._login: asyncio.Task[None] | None = None
        self.health = hl.Tracker()
        """Named warnings (:mod:`tailpy.daemon.health`), checked every :data:`HEALTH_INTERVAL` seconds."""
        self._handshakes = hl.HandshakeWatch()
        self._control_down_since: float | None = None
        self._control_error = ""
        self._netmap_since: float | None = None
        self._route_mtu: tuple[float, tuple[str, int] | None] | None = None  # (looked at, value)
        self._health_task: asyncio.Task[None] | None = None

    @property
    def backend_state(self) -> str:
        """The state as ``tailpy status`` shows it ("NoState", "NeedsLogin", "Starting", "Running",
        "Stopped")."""
        return self.state.value

    def _fire(self, event: Event) -> None:
        """Move the state machine (:func:`tailpy.daemon.lifecycle.transition`; IllegalTransition for an
        event the table does not allow here)."""
        self.state = transition(self.state, event)
        self.changed.set()

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """After a restart: reconnect if the node was up before, else wait for ``up``."""
        s = self.state_data
        self._start_health()
        if self.dns is not None:
            self.dns.recover()  # a resolv.conf left pointed at MagicDNS by a crash
        if s.want_running and s.login_server and s.node_id is not None:
            self._fire(Event.START_REGISTERED)
            if s.pending_node_key is not None:
                await self.session.finish_pending_rotation()
            self._ensure_device()
            self.session.start()
        else:
            self._fire(Event.START_LOGGED_OUT)

    async def up(
        self,
        login_server: str,
        auth_key: str | None,
        hostname: str | None,
        *,
        force_reauth: bool = False,
        accept_dns: bool | None = None,
        advertise_tags: Sequence[str] | None = None,
        ephemeral: bool = False,
        routes: Mapping[str, Any] | None = None,
    ) -> None:
        """Register with ``login_server`` (re-registering a known machine needs no key) and start following
        the netmap. ``force_reauth``: log in again with ``auth_key`` and a new node key even if registered.
        ``accept_dns``: point the host's resolver at MagicDNS (None: as before; True on a new node).
        ``advertise_tags``: tags to ask control for, kept for later registrations (None: as before; empty:
        ask for none, the node keeps the tags it has); control refuses with TagError when nobody asking may
        own one (then nothing changes). ``ephemeral``: with an auth key, register as an ephemeral node
        whatever the key (control deletes it when it logs out or has been offline too long). ``routes``: the
        route preferences given (:data:`ROUTE_PREFS` keys, checked by :meth:`check_prefs`; the others stay
        as they were), kept for later registrations; the advertised routes go to control with it.

        Nothing is changed (state file, tunnel, node key) unless control accepts the registration, except
        that a node already registered with this server, finding control unreachable, comes up on what it
        knows and keeps trying to reach control. A connected node stays connected (its session with control,
        its node key, its peers) until a new login succeeds: a refused key, an unreachable control or a
        browser login still waiting change nothing, as in Tailscale's ``tailscale login`` on a running node.
        Raises AuthKeyError / ControlError with the server's sentence, ConfigError for a malformed URL,
        PermissionDeniedError / DeviceError when the tunnel cannot be created."""
        s = self.state_data
        self._start_health()
        url = check_login_server(login_server or s.login_server or self._login_server)
        waiting = self._login is not None and not auth_key and not force_reauth and url == self._login_server
        given = self.check_prefs(routes or {}, self._up_routes if waiting else None)
        if waiting:
            if accept_dns is not None:  # a plain `up` while a browser login waits: keep waiting for it
                self._up_accept_dns = accept_dns
            self._up_routes.update(given)
            return
        registered_here = s.node_id is not None and same_control(url, s.login_server)
        expired = self.netmap is not None and self.netmap.self_node.expired
        why = why_offline = ""
        connected = self.session.running and self.netmap is not None  # a re-login must not disconnect it
        stays = "; this node stays connected with its current key" if connected else ""
        if (not registered_here or force_reauth) and not auth_key:
            if force_reauth:
                head = "logging in again"
                why = f"{head} needs an auth key: {url} offers no sign-in in a browser; pass --auth-key KEY"
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
            why += f" (create a key with `tailpy control authkey create`){stays}"
            # When control cannot be reached, whether it offers a browser login is unknown: name both ways.
            why_offline = (
                f"{head}: once control answers, run `tailpy login` (sign in in a browser, where control "
                "offers it) or `tailpy up --auth-key KEY`"
            )
        hostname = hostname or s.hostname or socket.gethostname()
        # A new node key on every fresh login (forced, or after the key expired): an admin who expired a
        # node because its key may be compromised must not see that key come back.
        node_key = NodePrivate.generate() if force_reauth or expired else s.node_key
        before = (s.hostname, s.pending_node_key)
        self._save_intent(hostname, node_key)  # StorageError: nothing changed, control not asked
        if not connected:
            await self.session.stop()
        await self._stop_login()
        self._up_accept_dns = accept_dns  # applied when the registration (maybe a browser login) completes
        self._up_tags = None if advertise_tags is None else tuple(advertise_tags)
        self._up_routes = dict(given)
        tags = s.advertise_tags if self._up_tags is None else self._up_tags
        advertised = self._up_routes.get("advertise_routes", s.advertise_routes)
        created = self.device is None
        self._ensure_device()  # before registering: a node that cannot make its tunnel must not register
        try:
            # Without an auth key: interactive login where control offers it, an auth key where it does not.
            answer = await register(
                url,
                s.machine_key,
                node_key,
                hostname,
                auth_key,
                tags,
                ephemeral=ephemeral,
                routable_ips=list(advertised),
            )
        except ControlError as e:
            if why and isinstance(e, AuthKeyError):  # control has no interactive login: say what to do
                e = AuthKeyError(why)
            elif why and not isinstance(e, NotRegisteredError):  # unreachable: say both
                e = ControlError(f"{e}; and {why_offline}{stays}")
            elif connected and not why:  # a refused key, say: the node goes on as it was
                e = type(e)(f"{e}{stays}")
            refused = (AuthKeyError, NotRegisteredError, TagError)  # control answered: not "unreachable"
            if isinstance(e, refused) or not registered_here or force_reauth:
                self._drop_intent(*before)  # control said no (or no session carries it): forget it
            if registered_here and not force_reauth and not isinstance(e, refused):
                log.warning("control unreachable at up (%s): starting on the saved state, retrying", e)
                if hostname != before[0]:
                    self.session.rename_pending = True  # registered before the session's next map request
                if not connected:
                    self._bring_up_offline(hostname, str(e))
                return
            if not connected:
                self.last_error = str(e)
            if created:
                self._close_device()
            raise e from None
        node = answer if isinstance(answer, nm.Node) else answer.node
        if node is None:
            assert isinstance(answer, LoginAnswer)
            self._await_login(url, node_key, hostname, answer, connected=connected)
            return
        await self.session.stop()  # it follows control under the node key just registered
        try:
            self._registered(url, node_key, hostname, node)
        except StorageError:  # the state file cannot record it (a full disk): the node stays as it was
            if created:
                self._close_device()
            elif self.netmap is not None and s.want_running and not self.session.running:
                self.session.start()
            raise

    def _save_intent(self, hostname: str, node_key: NodePrivate) -> None:
        """Before control hears of them, save the hostname asked for and a new node key (as the pending key,
        next to the current one): a state file that cannot be written (StorageError, a full disk) then
        changes nothing, and a node key control took is never lost. A rename control cannot take now is
        registered before the session's next map request (``ControlSession.rename_pending``); the next
        start offers control the pending key first (:meth:`ControlSession.finish_pending_rotation`)."""
        s = self.state_data
        pending = node_key if node_key is not s.node_key else s.pending_node_key
        if hostname == s.hostname and pending is s.pending_node_key:
            return
        self.store.save(dataclasses.replace(s, hostname=hostname, pending_node_key=pending))
        s.hostname, s.pending_node_key = hostname, pending

    def _drop_intent(self, hostname: str, pending: NodePrivate | None) -> None:
        """Undo :meth:`_save_intent` after control refused the registration (best effort: the saved pending
        key is one control never took, so the next start drops it anyway)."""
        s = self.state_data
        if (s.hostname, s.pending_node_key) == (hostname, pending):
            return
        s.hostname, s.pending_node_key = hostname, pending
        try:
            self.store.save(s)
        except StorageError as e:
            log.warning("up: %s", e)

    def _registered(self, url: str, node_key: NodePrivate, hostname: str, node: nm.Node) -> None:
        """Control registered this machine as ``node`` with ``node_key``: save it and follow the netmap."""
        s = self.state_data
        # Saved first: a state file that cannot be written (StorageError) leaves the node as it was.
        new = dataclasses.replace(
            s,
            node_key=node_key,
            pending_node_key=None if node_key is not s.node_key else s.pending_node_key,
            login_server=url,
            hostname=hostname,
            node_id=node.id,
            addresses=tuple(node.addresses),
            want_running=True,
            accept_dns=s.accept_dns if self._up_accept_dns is None else self._up_accept_dns,
            advertise_tags=s.advertise_tags if self._up_tags is None else self._up_tags,
            **self._up_routes,
            node_key_issued=s.node_key_issued
            if node_key is s.node_key and s.node_key_issued
            else time.time(),
        )
        unsaved = ""
        try:
            self.store.save(new)
        except StorageError as e:
            if node_key is s.node_key or s.pending_node_key is not node_key:
                raise
            # Control took the new node key and knows no other now: switch to it all the same (the state
            # file holds it as the pending key, which the next start offers control first).
            log.warning("after login: %s; the new node key is kept as the pending one", e)
            unsaved = f"logged in, but {e}"
        self.auth_url = ""
        if node_key is not s.node_key:
            self._adopt_node_key(node_key)
        if not same_control(url, s.login_server):
            self._drop_netmap()
        for f in dataclasses.fields(new):
            setattr(s, f.name, getattr(new, f.name))
        if unsaved:
            s.pending_node_key = node_key  # as on disk: what the next start offers control first
        self.last_error = unsaved
        self.session.rename_pending = False  # this registration carried the hostname
        self._up_routes = {}
        self._fire(Event.REGISTERED)
        self._apply_self(node)
        self._apply_prefs()  # preferences this `up` changed, on the netmap the node has
        self.session.start()

    # -- interactive login -----------------------------------------------------------------------------

    def _await_login(
        self, url: str, node_key: NodePrivate, hostname: str, first: LoginAnswer, *, connected: bool
    ) -> None:
        """Control wants the user to sign in: show ``auth_url`` in the status and long-poll control in the
        background until the login (and any approval) is done, then come up. A ``connected`` node stays as
        it is (state, session, node key) meanwhile; any other needs login (state NeedsLogin)."""
        self._show_login(first)
        if not connected:
            self._fire(Event.LOGIN_NEEDED)
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
        def on_error(sentence: str) -> None:  # control restarting, say: keep waiting, the URL is renewed
            self.last_error = sentence
            self.changed.set()

        machine_key = self.state_data.machine_key
        s = self.state_data
        node = await poll_login(
            url,
            machine_key,
            node_key,
            hostname,
            on_answer=self._show_login,
            on_error=on_error,
            routable_ips=list(self._up_routes.get("advertise_routes", s.advertise_routes)),
        )
        log.info("login done: node %d %s", node.id, node.name)
        self._login = None
        await self.session.stop()  # it follows control under the node key just registered
        try:
            self._registered(url, node_key, hostname, node)
        except TailpyError as e:  # the tunnel's addresses could not be set, say
            log.warning("after login: %s", e)
            self.last_error = str(e)
            self._fire(Event.LOGIN_FAILED)

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
        for name, value in self._up_routes.items():  # control hears of them when it answers
            setattr(s, name, value)
        self._up_routes = {}
        self.store.save(s)
        self.last_error = error
        self._fire(Event.UP_OFFLINE)
        if self.device is not None and s.addresses:
            self._set_addresses(list(s.addresses))
        self.session.start()

    async def down(self) -> None:
        """Disconnect: stop following control and remove the tunnel; the node stays registered. Always
        completes: a state file that cannot be written (a full disk) is logged and shown in the status's
        error (the next start then reconnects)."""
        await self._stop_login()
        await self.session.stop()
        self.state_data.want_running = False
        self._close_device()
        self._drop_netmap()
        self._fire(Event.DOWN)
        try:
            self.store.save(self.state_data)
        except StorageError as e:
            log.warning("down: %s", e)
            self.last_error = f"stopped, but {e}"

    async def logout(self) -> None:
        """Log out: control expires this node's key (the record, address and name stay for the next login),
        the tunnel goes away, and a new node key waits for the next ``up --auth-key``.
        Raises ControlError when control cannot be told."""
        await self._stop_login()
        s = self.state_data
        if s.login_server and s.node_id is not None:
            await logout(s.login_server, s.machine_key, s.node_key)
        await self.session.stop()
        self._close_device()
        self._adopt_node_key(NodePrivate.generate())
        s.node_id, s.addresses, s.want_running, s.node_key_issued = None, (), False, None
        self.store.save(s)
        self._drop_netmap()
        self.last_error = ""
        self._fire(Event.LOGOUT)

    async def close(self) -> None:
        """Daemon exit: like ``down`` but keeps ``want_running`` so the next start reconnects."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._stop_login()
        await self.session.stop()
        self._close_device()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the session with control ----------------------------------------------------------------------

    @property
    def control_connected(self) -> bool:
        return self.session.connected

    def rotate_at(self) -> float | None:
        """Unix time at which the node key will be rotated (:meth:`ControlSession.rotate_at`)."""
        return self.session.rotate_at()

    def _on_netmap(self, netmap: nm.NetMap) -> None:
        if self.state is not BackendState.NEEDS_LOGIN or not netmap.self_node.expired:
            self.last_error = ""
        self._control_error = ""
        self.apply_netmap(netmap)

    def _on_session_error(self, sentence: str) -> None:
        self.last_error = sentence
        self._control_error = sentence

    # -- health ----------------------------------------------------------------------------------------

    def _start_health(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                self.check_health()
            except Exception:  # a check must never stop the daemon
                log.exception("health check failed")

    def _link_mtu(self, now: float) -> tuple[str, int] | None:
        if not self._configure_os:
            return None
        if self._route_mtu is None or now - self._route_mtu[0] >= ROUTE_MTU_INTERVAL:
            self._route_mtu = (now, netconf.route_mtu())
        return self._route_mtu[1]

    def check_health(self) -> None:
        """Look at the node once and update :attr:`health` (:func:`tailpy.daemon.health.evaluate`)."""
        now = time.time()
        s = self.state_data
        following = self.session.running and s.want_running
        if following and not self.session.connected:
            if self._control_down_since is None:
                self._control_down_since = now
        else:
            self._control_down_since = None
        conn = self.conn
        home: hl.HomeDerp | None = None
        peers: list[hl.PeerHandshakes] = []
        if conn is not None:
            region = conn.home_region
            if region:
                c = next((c for c in conn.relay.derp.status() if c.region_id == region), None)
                home = hl.HomeDerp(
                    region,
                    conn.region_code(region),
                    connected=c is not None and c.connected,
                    error=(c.last_error or "") if c is not None else "",
                )
            else:
                errors = list(conn.relay.derp.probe_errors.values())
                home = hl.HomeDerp(0, error=errors[-1] if errors else "")
            stats = conn.peer_stats()
            for node in self._applied.peers.values() if self._applied is not None else ():
                st = stats.get(node.node_key.raw)
                # An offline peer cannot answer: its row in status says so, not a handshake warning.
                if st is not None and "handshakes_sent" in st and node.online:
                    sent, hs = int(st["handshakes_sent"]), st.get("last_handshake")
                    peers.append(hl.PeerHandshakes(node.name, node.node_key.raw, sent, hs))
        dns_error = ""
        if self.dns is not None and self.device is not None and self.netmap is not None:
            dns_error = self.dns.os_error
        hl.evaluate(
            self.health,
            self._handshakes,
            hl.Inputs(
                now=now,
                following=following,
                login_server=s.login_server,
                control_down_since=self._control_down_since,
                control_error=self._control_error,
                netmap_since=self._netmap_since,
                derp_regions=len(conn.relay.derp_map.regions) if conn is not None else 0,
                home=home,
                peers=peers,
                dns_error=dns_error,
                mtu=netconf.mtu_warnings(self._mtu, self._link_mtu(now)),
                firewall=self.firewall.warnings() if self.firewall else (),
                router=self._router.warnings() if self._router is not None else (),
                clock_skew=self.session.clock_skew,
                exit_node_error=self.exit_choice.problem if self.netmap is not None and s.exit_node else "",
            ),
        )

    def _forgotten(self, e: NotRegisteredError) -> None:
        """Control no longer knows this machine (an admin deleted it): drop the peers and need login."""
        log.warning("control does not know this node any more: %s", e)
        s = self.state_data
        s.node_id, s.addresses, s.want_running = None, (), False
        unsaved = ""
        try:
            self.store.save(s)
        except StorageError as se:  # the node is forgotten all the same; a restart finds out again
            log.warning("control forgot this node: %s", se)
            unsaved = f" ({se})"
        self._close_device()
        self._drop_netmap()
        self.last_error = (
            "this node was removed from the tailnet; log in again with `tailpy login` (or "
            f"`tailpy up --auth-key KEY`){unsaved}"
        )
        self._fire(Event.FORGOTTEN)

    def _drop_netmap(self) -> None:
        self.netmap = None
        self._netmap_since = None
        self.session.self_node = None

    def _adopt_node_key(self, key: NodePrivate) -> None:
        self.state_data.node_key, self.state_data.pending_node_key = key, None
        if self.device is not None:
            self.device.set_private_key(key.raw)
        if self.conn is not None:
            self.conn.set_private_key(key)  # DERP knows a node by its node key; disco Pings carry it

    @property
    def home_derp(self) -> int:
        """This node's home DERP region id (0: none yet)."""
        return self.conn.home_region if self.conn is not None else 0

    def _on_home_changed(self, region_id: int) -> None:
        self.session.notify_home()
        self.changed.set()

    def _on_endpoints(self, endpoints: list[Endpoint]) -> None:
        """The Conn found new endpoints (local addresses and STUN-mapped ones, every 20-26 s)."""
        self.session.notify_endpoints()
        self.changed.set()

    def _on_link_change(self) -> None:
        """An address of this host went away: the control connection may be bound to it; reconnect."""
        if not self.session.running or not self.state_data.want_running or self.device is None:
            return
        task = asyncio.get_running_loop().create_task(self.session.restart())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _endpoints(self) -> list[Endpoint]:
        """This node's endpoints now, for control: the Conn's, else the local addresses."""
        if self.conn is not None:
            return list(self.conn.endpoints)
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
            self._peer_ips.pop(old.node_key.raw, None)
        for old, node in d.changed:
            if old.node_key != node.node_key:
                dev.remove_peer(old.node_key.raw)
                self._peer_ips.pop(old.node_key.raw, None)
        before = self.exit_choice.node
        self.exit_choice = resolve_exit_node(new, self.state_data.exit_node)
        after = self.exit_choice.node
        touched = [*d.added, *(node for _, node in d.changed)]
        if (before and before.node_key) != (after and after.node_key):  # exit routes move between peers
            keys = {n.node_key for n in (before, after) if n is not None}
            touched += [n for n in wanted.peers.values() if n.node_key in keys]
        self._set_peers(dev, touched)
        self._apply_filter(dev, new.packet_filter)
        self.netmap, self._applied = new, wanted
        if self._netmap_since is None:
            self._netmap_since = time.time()
        if self.conn is not None:
            self.conn.set_netmap(wanted)
        if self.dns is not None:
            self.dns.apply(new, accept_dns=self.state_data.accept_dns and not me_expired, tun=dev.tun_name)
        self._apply_router()
        if d:
            log.info("netmap: +%d -%d ~%d peers", len(d.added), len(d.removed), len(d.changed))
        if me_expired:
            if self.state is not BackendState.NEEDS_LOGIN:
                log.warning("this node's key has expired: it needs login (`tailpy login`)")
                self.last_error = (
                    "this node's key has expired; log in again with `tailpy login` (or with an auth key)"
                )
            self._fire(Event.KEY_EXPIRED)
        else:
            self._fire(Event.NETMAP)
        return d

    # -- routes: allowed IPs, exit node, the host's routing -------------------------------------------------

    def route_prefs(self) -> RoutePrefs:
        """The route preferences in force (from the state file)."""
        s = self.state_data
        return RoutePrefs(**{name: getattr(s, name) for name in ROUTE_PREFS})

    def peer_allowed_ips(self, node: nm.Node) -> list[str]:
        """Peer ``node``'s allowed IPs in the data plane, for every ``set_peer`` (this backend's and the
        Conn's): :func:`tailpy.daemon.routing.peer_allowed_ips` with the preferences and the exit node."""
        exit_node = self.exit_choice.node
        return peer_allowed_ips(
            node,
            accept_routes=self.state_data.accept_routes,
            exit_node=exit_node is not None and exit_node.node_key == node.node_key,
        )

    def _set_peers(self, dev: DataPlane, peers: Iterable[nm.Node]) -> None:
        """Give the data plane each of ``peers`` whose allowed IPs are new or changed."""
        for node in peers:
            ips = self.peer_allowed_ips(node)
            if self._peer_ips.get(node.node_key.raw) != ips:
                dev.set_peer(node.node_key.raw, allowed_ips=ips)
                self._peer_ips[node.node_key.raw] = ips

    def _apply_prefs(self) -> None:
        """The route preferences changed: resolve the exit node again, and bring the peers' allowed IPs and
        the host's routing in line (nothing before the first netmap)."""
        if self.netmap is None or self.device is None or self._applied is None:
            return
        self.exit_choice = resolve_exit_node(self.netmap, self.state_data.exit_node)
        self._set_peers(self.device, self._applied.peers.values())
        self._apply_router()
        self.changed.set()

    def _apply_router(self) -> None:
        """The host's routing (:class:`OSRouter`) for the preferences and the netmap, when it changed. A
        router that fails is logged and shown in the status's error; the next netmap tries again."""
        if self._router_factory is None or self.device is None:
            return
        s = self.state_data
        peers = self._applied.peers.values() if self._applied is not None else ()
        lan: tuple[str, ...] = ()
        if s.exit_node and s.exit_node_allow_lan_access:
            tun = self.device.tun_name
            lan = lan_prefixes(i.network for i in netconf.local_addresses(exclude_ifaces=(tun,)))
        addresses = tuple(s.addresses)
        want = (addresses, route_plan(self.route_prefs(), peers, lan, tailnet=tailnet_routes(addresses)))
        if want == self._router_applied:
            if self._router is not None:  # shown at once (the `up`/`set` answer carries it)
                hl.set_router(self.health, self._router.warnings())
            return
        try:
            if self._router is None:
                self._router = self._router_factory(self.device.tun_name)
            try:
                self._router.apply(*want)
            finally:  # shown at once (the `up`/`set` answer carries it), not at the next health look
                hl.set_router(self.health, self._router.warnings())
        except TailpyError as e:
            log.error("routing: %s", e)
            self.last_error = f"routing not applied: {e}"
            return
        self._router_applied = want
        log.info(
            "routing: %d routes into the tunnel, %d kept out, serving %d subnets",
            len(want[1].routes),
            len(want[1].local_routes),
            len(want[1].subnet_routes),
        )

    def check_prefs(
        self, given: Mapping[str, Any], pending: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Route preferences as the local API gives them (:data:`PREF_KEYS`; a key absent or None is not
        given), checked and in canonical form, as :data:`ROUTE_PREFS` fields: ``advertise_routes`` a list of
        CIDR prefixes or a comma-separated string (:func:`tailpy.routes.parse_routes`; the exit routes in it
        stay as they are unless given there or by ``advertise_exit_node``), ``exit_node`` a string checked
        against the netmap (:func:`tailpy.daemon.routing.check_exit_node`), the rest booleans. ``pending``:
        preferences an `up` still waiting for its login gives, over the state file's. Raises ConfigError with
        one sentence (nothing is changed), also when the node would offer to be an exit node and use one."""
        out: dict[str, Any] = {}
        exit_flag: bool | None = None
        for name, value in given.items():
            if value is None:
                continue
            if name not in PREF_KEYS:
                raise ConfigError(f"unknown preference {name!r}")
            if name == "advertise_exit_node":
                if not isinstance(value, bool):
                    raise ConfigError("advertise_exit_node must be true or false")
                exit_flag = value
            elif name == "advertise_routes":
                if not isinstance(value, (str, list)) or not all(isinstance(v, str) for v in value):
                    raise ConfigError("advertise_routes must be a list of prefixes like 198.51.100.0/24")
                out[name] = parse_routes(value)
            elif name == "exit_node":
                if not isinstance(value, str):
                    raise ConfigError("exit_node must be a peer's name or tailnet IP")
                check_exit_node(self.netmap, value)
                out[name] = value.strip()
            else:
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false")
                out[name] = value
        if "advertise_routes" in out or exit_flag is not None:
            current = (pending or {}).get("advertise_routes", self.state_data.advertise_routes)
            routes = out.get("advertise_routes", current)
            offer = has_exit_routes(current) or has_exit_routes(routes) if exit_flag is None else exit_flag
            out["advertise_routes"] = subnet_routes(routes) + (EXIT_ROUTES if offer else ())
        now = {**{k: getattr(self.state_data, k) for k in ROUTE_PREFS}, **(pending or {}), **out}
        if now["exit_node"] and has_exit_routes(now["advertise_routes"]):
            raise ConfigError(
                "this node cannot offer itself as an exit node and use one at the same time (as in "
                "Tailscale): give --advertise-exit-node=false or --exit-node="
            )
        return out

    async def set_prefs(
        self,
        *,
        routes: Mapping[str, Any] | None = None,
        hostname: str | None = None,
        accept_dns: bool | None = None,
        advertise_tags: Sequence[str] | None = None,
    ) -> None:
        """``tailpy set``: change the given preferences of this node now, without a new login (None: leave
        it). ``routes``: route preferences (:meth:`check_prefs`); new advertised routes go to control on the
        map stream's session (:meth:`ControlSession.notify_routes`). ``hostname`` and ``advertise_tags`` are
        registered with control as ``up`` does (same node key, no auth key): TagError when the policy refuses
        a tag, ControlError when control cannot be reached for tags (nothing changed); a new hostname control
        cannot take now is registered when it answers. Raises ConfigError (a malformed preference, an exit
        node that is unknown, this node, or not offering), StorageError (the state file; nothing changed)."""
        s = self.state_data
        given = self.check_prefs(routes or {})
        tags = None if advertise_tags is None else tuple(advertise_tags)
        new_name = None
        if hostname is not None:
            if not hostname.strip():
                raise ConfigError("--hostname is empty: give a name")
            new_name = hostname.strip() if hostname.strip() != s.hostname else None
        if tags == s.advertise_tags:
            tags = None
        rename_pending = False
        if new_name is not None or tags is not None:
            if s.node_id is None or not s.login_server:
                raise ConfigError("this node is not logged in: use `tailpy up` to set its name and tags")
            try:
                answer = await register(
                    s.login_server,
                    s.machine_key,
                    s.node_key,
                    new_name or s.hostname,
                    None,
                    s.advertise_tags if tags is None else tags,
                )
            except ControlError as e:
                if tags is not None or isinstance(e, (AuthKeyError, NotRegisteredError, TagError)):
                    raise
                log.warning("set: control unreachable (%s): the new hostname waits for it", e)
                rename_pending = True
            else:
                if not isinstance(answer, nm.Node) and answer.node is None:  # not for `set`
                    raise ControlError("control asks this node to log in again: run `tailpy login`")
        changed = {k: v for k, v in given.items() if getattr(s, k) != v}
        new = dataclasses.replace(
            s,
            hostname=new_name or s.hostname,
            accept_dns=s.accept_dns if accept_dns is None else accept_dns,
            advertise_tags=s.advertise_tags if tags is None else tags,
            **changed,
        )
        if new != s:
            self.store.save(new)  # StorageError: nothing changed here (control may have the new name)
            for f in dataclasses.fields(new):
                setattr(s, f.name, getattr(new, f.name))
        if rename_pending:
            self.session.rename_pending = True
        if "advertise_routes" in changed:
            log.info("advertised routes: %s", ", ".join(s.advertise_routes) or "none")
            self.session.notify_routes()
        if self.dns is not None and accept_dns is not None and self.netmap is not None and self.device:
            expired = self.netmap.self_node.expired
            self.dns.apply(self.netmap, accept_dns=s.accept_dns and not expired, tun=self.device.tun_name)
        self._apply_prefs()
        self.changed.set()

    def _apply_filter(self, dev: DataPlane, rules: tuple[FilterRule, ...] | None) -> None:
        """Give the data plane the netmap's packet filter when it changed (None: control sent none, and the
        device admits everything). A filter the data plane refuses (a malformed address) is logged and the
        one in force stays, to be retried with the next netmap."""
        if rules == self._applied_filter:
            return
        try:
            dev.set_filter(device_rules(rules))
        except ConfigError as e:
            log.error("packet filter from control refused, keeping the one in force: %s", e)
            return
        self._applied_filter = rules
        log.info("packet filter: %s", "none (everything allowed)" if rules is None else f"{len(rules)} rules")

    def _apply_self(self, node: nm.Node) -> None:
        s = self.state_data
        if tuple(node.addresses) != s.addresses or node.id != s.node_id:
            s.addresses, s.node_id = tuple(node.addresses), node.id
            try:
                self.store.save(s)
            except StorageError as e:  # the netmap applies all the same; the next save records them
                log.warning("netmap: %s", e)
                self.last_error = f"netmap applied, but {e}"
        if self.device is not None:
            self._set_addresses(list(node.addresses))

    def _set_addresses(self, addresses: list[str]) -> None:
        """The node's tailnet addresses on its TUN, or in its userspace stack."""
        if self.device is None:
            return
        if self._userspace:
            cast(UserspaceDataPlane, self.device).set_addresses(addresses)
        elif self._configure_os:
            netconf.configure_tun(self.device.tun_name, addresses, self._mtu)
            self._apply_router()  # the tailnet ranges into the TUN (table 52), also before a netmap

    @property
    def tun_name(self) -> str | None:
        """The data plane's TUN ("userspace-networking" for a userspace one; None: no data plane)."""
        if self.device is None:
            return None
        return self.USERSPACE_TUN if self._userspace else self.device.tun_name

    def _ensure_device(self) -> DataPlane:
        """The data plane and its :class:`Conn` (made here, inside the running event loop)."""
        if self.device is None:
            dev = self._device_factory(self.state_data.node_key.raw)
            self.device = dev
            tun = "" if self._userspace else dev.tun_name
            if self._userspace and self.state_data.addresses:
                cast(UserspaceDataPlane, dev).set_addresses(list(self.state_data.addresses))

            def local() -> list[netconf.IPInterface]:
                read = self._configure_os or self._userspace
                return netconf.local_addresses(exclude_ifaces=(tun,)) if read else []

            self.conn = Conn(
                dev,
                self.state_data.node_key,
                Options(
                    self.disco_key,
                    allowed_ips=self.peer_allowed_ips,
                    on_endpoints=self._on_endpoints,
                    on_home_changed=self._on_home_changed,
                    on_link_change=self._on_link_change,
                    local_endpoints=lambda: netconf.local_endpoints(dev.listen_port, exclude_ifaces=(tun,)),
                    lan_networks=lambda: [i.network for i in netconf.local_addresses(exclude_ifaces=(tun,))],
                    choose_endpoint=lambda eps: netconf.choose_endpoint(eps, local()),
                ),
            )
            self.conn.start()
            if self.firewall is not None and self._configure_os:
                self.firewall.install(tun, dev.listen_port)
        return self.device

    def set_netfilter_mode(self, mode: str) -> None:
        """``up --netfilter-mode``: switch the node firewall on or off now (for this daemon's life)."""
        if self.firewall is not None and self._configure_os and mode != self.firewall.mode:
            dev = self.device
            self.firewall.set_mode(mode, dev.tun_name if dev else None, dev.listen_port if dev else 0)
            self.changed.set()

    def _close_device(self) -> None:
        router, self._router, self._router_applied = self._router, None, None
        if router is not None:
            try:
                router.close()  # the host's routes and rules back as they were, before the TUN goes
            except TailpyError as e:
                log.error("routing: %s", e)
        if self.firewall is not None:
            self.firewall.remove()
        if self.dns is not None:
            self.dns.stop()  # the host's resolver back as it was
        dev, self.device = self.device, None
        self._applied = None  # a new device starts with no peers
        self._peer_ips = {}
        self._applied_filter = None  # and no filter
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.stop()  # no more reads of the device's queue, no more ticks
            task = asyncio.get_running_loop().create_task(conn.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if dev is not None:
            dev.close()

    # -- status ---------------------------------------------------------------------------------------

    def _peer_status(self, node: nm.Node, st: Mapping[str, Any], now: float) -> PeerStatus:
        """``node`` from the netmap with ``st``, the data plane's counters of it (``Device.peers()``; empty
        when the data plane does not have it)."""
        domain = self.netmap.domain if self.netmap else ""
        hs = st.get("last_handshake")
        conn = self.conn
        path = st.get("path")
        relay_region = conn.relay_region(node.node_key.raw) if conn is not None and path == "relay" else 0
        endpoint = None
        if path == "direct" and (conn is None or not conn.direct_confirmed(node.node_key, st)):
            # Sent to directly but never answered there (a best guess, say a LAN address behind the
            # peer's NAT): not a path yet. Status says "direct" only for an endpoint that answered.
            path = None
        # Only a direct path's endpoint: on relay the data plane still holds its would-be direct endpoint
        # (often an unreachable LAN address), which would contradict "path": "relay" for scripts.
        if path == "direct" and st.get("endpoint"):
            with contextlib.suppress(EndpointError):
                endpoint = Endpoint.parse(str(st["endpoint"]))
        return PeerStatus(
            id=node.id,
            name=node.name,
            fqdn=node.fqdn(domain),
            hostname=node.hostname,
            user=node.user,
            tags=tuple(node.tags),
            os=node.os,
            node_key=node.node_key,
            addresses=tuple(node.addresses),
            online=node.online,
            last_seen=node.last_seen,
            key_expiry=node.key_expiry,
            expired=node.expired,
            home_derp=node.home_derp,
            disco_key=node.disco_key,
            endpoints=tuple(node.endpoints),
            endpoint=endpoint,
            path=path,
            relay_region=relay_region,
            relay_region_code=conn.region_code(relay_region) if conn is not None and relay_region else "",
            last_handshake=hs,
            # A WireGuard session lives 180 s past its handshake, and handshakes happen only for traffic.
            active=hs is not None and now - hs < ACTIVE_WINDOW,
            tx_bytes=st.get("tx_bytes", 0),
            rx_bytes=st.get("rx_bytes", 0),
            primary_routes=tuple(node.primary_routes),
            allowed_ips=tuple(node.effective_allowed_ips()),
            exit_node_option=node.exit_node_option(),
            exit_node=self.exit_choice.node is not None
            and self.exit_choice.node.node_key == node.node_key
            and bool(self.state_data.exit_node),
        )

    def status(self) -> Status:
        """The node and its peers, as ``tailpy status --json`` prints it (:class:`tailpy.ipnstate.Status`;
        fields in README "Status JSON"). Times are unix seconds."""
        s = self.state_data
        self.check_health()
        now = time.time()
        conn = self.conn
        stats = conn.peer_stats() if conn is not None else {}
        paths = conn.status() if conn is not None else None
        me = self.netmap.self_node if self.netmap else None
        peers = tuple(
            self._peer_status(node, stats.get(node.node_key.raw, {}), now)
            for node in (sorted(self.netmap.peers.values(), key=lambda n: n.name) if self.netmap else [])
        )
        login_server = s.login_server or (self._login_server if self._login is not None else "")
        control_url = self.session.control_url
        return Status(
            backend_state=self.backend_state,
            login_server=login_server,
            control_connected=self.control_connected,
            control_url=control_url if control_url in control_urls(login_server) else "",
            map_stream_starts=dict(self.session.stream_starts),
            error=self.last_error,
            auth_url=self.auth_url,
            login_pending=self._login is not None,
            health=self.health.warnings(),
            now=now,
            self_node=SelfStatus(
                id=s.node_id,
                name=me.name if me else "",
                fqdn=me.fqdn(self.netmap.domain) if me and self.netmap else "",
                hostname=s.hostname,
                user=me.user if me else "",
                tags=tuple(me.tags) if me else (),
                os=me.os if me else "",
                key_expiry=me.key_expiry if me else None,
                expired=me.expired if me else False,
                node_key=s.node_key.public,
                machine_key=s.machine_key.public,
                disco_key=self.disco_key.public,
                addresses=tuple(s.addresses),
                listen_port=self.device.listen_port if self.device else None,
                endpoints=tuple(self.session.reported_endpoints),
                tun=self.tun_name,
                home_derp=self.home_derp,
                home_derp_code=conn.region_code(self.home_derp) if conn is not None else "",
                name_by_admin=me.name_by_admin if me else False,
                name_pending=me is not None
                and bool(s.hostname)
                and sanitize(me.hostname) != sanitize(s.hostname),
                advertised_routes=tuple(s.advertise_routes),
                approved_routes=tuple(me.approved_routes) if me else (),
                primary_routes=tuple(me.primary_routes) if me else (),
                control_routes=tuple(me.routable_ips) if me else (),
            ),
            domain=self.netmap.domain if self.netmap else "",
            peers=peers,
            device=dict(self.device.stats()) if self.device else None,
            derp=paths.derp if paths is not None else None,
            derp_map=self.netmap.derp_map if self.netmap and self.netmap.derp_map else None,
            traversal=paths.traversal if paths is not None else None,
            # datagrams from the socket that were neither disco nor STUN
            ignored_datagrams=conn.ignored if conn is not None else 0,
            dns=self.dns.status() if self.dns is not None else None,
            exit_node=self._exit_node_name(),
        )

    def _exit_node_name(self) -> str | None:
        """The exit node for status: the peer's name, else the preference as given; None without one."""
        want = self.state_data.exit_node
        if not want:
            return None
        node = self.exit_choice.node if self.netmap is not None else None
        return node.name if node is not None else want

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

    async def ping(self, target: str, timeout: float = 5.0) -> PingReply:
        """One disco ping to peer ``target`` (name or tailnet IP, :meth:`find_peer`), waiting up to
        ``timeout`` seconds (:class:`tailpy.ipnstate.PingReply`, with its ``peer``). Raises ConfigError
        (unknown peer, one without disco, node not running)."""
        node = self.find_peer(target)
        if node.expired:
            raise ConfigError(
                f"{node.name}: peer's key has expired; it cannot be reached until it logs in again "
                f"(`tailpy login` on {node.name}, or `tailpy control nodes expiry` to extend it)"
            )
        if not node.online:
            seen = ""
            if node.last_seen:
                seen = f", last seen {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(node.last_seen))}"
            raise ConfigError(f"{node.name}: peer is offline (not connected to control{seen})")
        if self.conn is None:
            raise ConfigError("this node is not running (no data plane): run `tailpy up`")
        if node.disco_key is None:
            raise ConfigError(f"peer {node.name} runs no disco (an older tailpy?): `tailpy ping` needs it")
        try:
            reply = await self.conn.ping(node.node_key, timeout)
        except KeyError:
            raise ConfigError(f"peer {node.name} is not in the data plane yet; try again") from None
        domain = self.netmap.domain if self.netmap else ""
        peer = PingPeer(node.name, node.fqdn(domain), node.ipv4 or node.ipv6 or "")
        return dataclasses.replace(reply, peer=peer)

    async def netcheck(self, timeout: float = 5.0) -> dict[str, Any]:
        """A netcheck run now over the data plane's socket: ``{"report": Report JSON, "derp_map": DERP map
        JSON}``. Raises ConfigError when there is no data plane or no DERP map with STUN servers yet."""
        if self.conn is None:
            raise ConfigError("this node is not running (no data plane): run `tailpy up`")
        report = await self.conn.netcheck(timeout=timeout)
        if report is None:
            raise ConfigError("tailpyd has no DERP map with STUN servers yet")
        return {"report": report.to_json(), "derp_map": self.conn.relay.derp_map.to_json()}

    def whois(self, address: str) -> PeerStatus | None:
        """The node (self or a peer) owning tailnet ``address`` ("100.64.0.2", "fd7a:115c:a1e0::2";
        an "ip:port" is accepted), as in ``status``; None when no node has it."""
        if self.netmap is None:
            return None
        try:
            ip = (
                Endpoint.parse(address).ip
                if address.count(":") == 1 or "]" in address
                else (ipaddress.ip_address(address))
            )
        except ValueError:
            raise ConfigError(f"{address!r} is not an IP address") from None
        stats = self.conn.peer_stats() if self.conn is not None else {}
        now = time.time()
        for node in (self.netmap.self_node, *self.netmap.peers.values()):
            if any(ipaddress.ip_interface(a).ip == ip for a in node.addresses):
                return self._peer_status(node, stats.get(node.node_key.raw, {}), now)
        return None
