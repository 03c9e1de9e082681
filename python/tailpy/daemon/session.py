"""The node's session with control, after Tailscale's ``control/controlclient/auto.go`` (``Auto``) beside
:class:`tailpy.control.ControlClient` (the ``Direct`` part: one request each).

:class:`ControlSession` keeps a registered node in touch with control until stopped:

* **map stream**: follows the netmap (:meth:`ControlClient.stream_map`), handing each one to ``on_netmap``;
  reconnects with jittered exponential backoff (:data:`BACKOFF_MIN` to :data:`BACKOFF_MAX`), resuming from
  what the last stream applied (only deltas since);
* **stream check**: every :data:`STREAM_CHECK` seconds asks control whether it still holds this node's
  stream, and reconnects at once when it does not (a NAT on the way lost its state);
* **reports**: this node's endpoints and home DERP region go to control when they change
  (:meth:`notify_endpoints`, :meth:`notify_home`; the map request carries both at each connection);
* **node key rotation**: before the node key expires (:meth:`rotate_at`) a new key is registered with a
  proof signed by the old one (:func:`tailpy.proto.control.seal_rotation_proof`), handed to ``on_node_key``,
  and the stream reconnects under it.

Registration itself (:func:`register`, :func:`poll_login`) is one request, or a long poll while the user signs
in in a browser. Everything the session learns goes out through :class:`SessionHooks`; it changes nothing of
the node itself but the state file's key fields (:class:`tailpy.daemon.state.NodeState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tailpy import netmap as nm
from tailpy.asyncutil import wait_event
from tailpy.backoff import reconnect_delays
from tailpy.control import ControlClient
from tailpy.control.client import LoginAnswer
from tailpy.daemon.state import NodeState, StateStore
from tailpy.endpoint import Endpoint
from tailpy.errors import ControlError, NotRegisteredError, StorageError, TailpyError
from tailpy.keys import DiscoPublic, MachinePrivate, NodePrivate
from tailpy.proto import control as proto

log = logging.getLogger("tailpy.daemon")

OS_NAME = platform.system().lower()  # "linux", as the node reports it to control
ROTATE_BEFORE = 7 * 86400.0  # seconds before node key expiry to rotate it (at most half its lifetime)
ENDPOINT_REFRESH = 20.0  # seconds between looks at this node's endpoints besides the change notices
BACKOFF_MIN = 0.5  # seconds, first reconnect delay to control
BACKOFF_MAX = 15.0  # seconds, cap of the exponential backoff
STREAM_CHECK = (15.0, 20.0)  # seconds between checks that control still holds the map stream (a draw)
LOGIN_POLL = 25.0  # seconds control may hold a login poll (control's /machine/login long poll)


async def register(
    url: str,
    machine_key: MachinePrivate,
    node_key: NodePrivate,
    hostname: str,
    auth_key: str | None,
    request_tags: Sequence[str] = (),
    *,
    ephemeral: bool = False,
    routable_ips: Sequence[str] | None = None,
) -> nm.Node | LoginAnswer:
    """Register ``node_key`` with control at ``url``: with ``auth_key``, the node; without, control's first
    login answer (the node when the machine is known, else where the user signs in). ``request_tags``: the
    tags this node asks for (``tailpy up --advertise-tags``). ``ephemeral``: register as an ephemeral node
    whatever the auth key (:meth:`ControlClient.register`). ``routable_ips``: the routes this node advertises
    (None: leave what control has). Raises ControlError (AuthKeyError,
    NotRegisteredError, TagError) with the server's sentence."""
    client = ControlClient(url, machine_key)
    try:
        if auth_key:
            return await client.register(
                node_key.public,
                hostname,
                auth_key,
                os=OS_NAME,
                request_tags=request_tags,
                ephemeral=ephemeral,
                routable_ips=routable_ips,
            )
        return await client.login_poll(
            node_key.public,
            hostname,
            os=OS_NAME,
            wait=0,
            request_tags=request_tags,
            routable_ips=routable_ips,
        )
    finally:
        await client.close()


async def poll_login(
    url: str,
    machine_key: MachinePrivate,
    node_key: NodePrivate,
    hostname: str,
    *,
    on_answer: Callable[[LoginAnswer], None],
    on_error: Callable[[str], None],
    routable_ips: Sequence[str] | None = None,
) -> nm.Node:
    """Long-poll control until the interactive login (and any approval) is done: the node. Each answer
    without one (a new sign-in URL, pending approval) goes to ``on_answer``; a ControlError (control
    restarting, say) to ``on_error``, then the poll goes on after a backoff. ``routable_ips``: the routes this
    node advertises (None: leave what control has)."""
    delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
    client = ControlClient(url, machine_key)
    try:
        while True:
            try:
                answer = await client.login_poll(
                    node_key.public, hostname, os=OS_NAME, wait=LOGIN_POLL, routable_ips=routable_ips
                )
            except ControlError as e:
                log.warning("waiting for login: %s", e)
                on_error(str(e))
                await asyncio.sleep(next(delays))
                continue
            delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
            if answer.node is not None:
                return answer.node
            on_answer(answer)
    finally:
        await client.close()


async def logout(url: str, machine_key: MachinePrivate, node_key: NodePrivate) -> None:
    """Tell control to expire ``node_key``. Raises ControlError."""
    client = ControlClient(url, machine_key)
    try:
        await client.logout(node_key.public)
    finally:
        await client.close()


@dataclass
class SessionHooks:
    """How the session reaches the node. In: ``endpoints()`` (this node's endpoints now), ``home_derp()``
    (its home region id, 0 none). Out: ``on_netmap(netmap)`` for each netmap from the stream,
    ``on_node_key(key)`` after a rotation (switch the data plane and DERP to it), ``on_forgotten(error)``
    when control no longer knows this machine (the session has ended), ``on_error(sentence)`` when a stream
    ended with an error, ``on_status()`` when :attr:`ControlSession.connected` changed."""

    on_netmap: Callable[[nm.NetMap], None]
    on_node_key: Callable[[NodePrivate], None]
    on_forgotten: Callable[[NotRegisteredError], None]
    on_error: Callable[[str], None]
    on_status: Callable[[], None]
    endpoints: Callable[[], list[Endpoint]]
    home_derp: Callable[[], int]


class ControlSession:
    """The session of the node in ``state`` (saved through ``store``) with its control server
    (``state.login_server``). ``disco_key`` goes in every map request; ``rotate_before``: seconds before the
    node key expires to rotate it (0: never)."""

    def __init__(
        self,
        store: StateStore,
        state: NodeState,
        disco_key: DiscoPublic,
        hooks: SessionHooks,
        *,
        rotate_before: float = ROTATE_BEFORE,
    ) -> None:
        self.store = store
        self.state = state
        self.disco_key = disco_key
        self.hooks = hooks
        self.rotate_before = rotate_before
        self.connected = False
        """A map stream is open (set at its first netmap)."""
        self.self_node: nm.Node | None = None
        """This node as the last netmap had it (its key expiry drives rotation)."""
        self._task: asyncio.Task[None] | None = None
        self._ending: asyncio.Task[None] | None = None  # forgotten by control: still closing its client
        self.reported_endpoints: list[Endpoint] = []
        """This node's endpoints as control was last told them (at the last connection or update)."""
        self.reported_endpoints_changed = asyncio.Event()
        self._home_changed = asyncio.Event()
        self._routes_changed = asyncio.Event()
        self._netmap_changed = asyncio.Event()
        self._unextendable_expiry: float | None = None  # a key expiry that rotation did not extend
        self.control_url = ""
        """The control URL of the current map stream, or of the last one while none is up ("" before any):
        one of ``state.login_server``'s URLs (:func:`tailpy.control.client.control_urls`)."""
        self.stream_starts: dict[str, int] = {"netmap": 0, "delta": 0}
        """How this session's map streams began, over all its clients (``ControlClient.stream_starts``):
        ``netmap`` (a full netmap) or ``delta`` (resumed, on the same server or another control replica)."""
        self.clock_skew: float | None = None
        self.rename_pending = False
        """A new hostname control could not take (``up --hostname`` while it was unreachable): registered
        before the next map request, since control renames a node at registration only (a map request's
        hostname is stored without a rename)."""
        """Seconds control's clock is ahead of ours, from its last reply (``ControlClient.clock_skew``)."""

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start following control (a task until :meth:`stop`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="control-session")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ending, self._ending = self._ending, None
        if ending is not None and ending is not asyncio.current_task():
            # (not cancelled: it is closing its HTTP client, which a cancellation could leave open)
            with contextlib.suppress(asyncio.CancelledError):
                await ending
        self._set_connected(False)

    async def restart(self) -> None:
        """Reconnect now (an address of this host went away: the connection may be bound to it)."""
        if self.running:
            await self.stop()
            log.info("link change: reconnecting to control")
            self.start()

    # -- notices ---------------------------------------------------------------------------------------

    def notify_endpoints(self) -> None:
        """This node's endpoints may have changed: tell control if so."""
        self.reported_endpoints_changed.set()

    def notify_home(self) -> None:
        """This node's home DERP region changed: tell control."""
        self._home_changed.set()

    def notify_routes(self) -> None:
        """The routes this node advertises (``state.advertise_routes``) changed: tell control."""
        self._routes_changed.set()

    # -- node key rotation -------------------------------------------------------------------------------

    def rotate_at(self) -> float | None:
        """Unix time at which to rotate the node key: ``rotate_before`` seconds before it expires, but no
        earlier than half its lifetime; None when rotation is off, the key never expires or has expired."""
        me = self.self_node
        if self.rotate_before <= 0 or me is None or me.key_expiry is None or me.expired:
            return None
        if me.key_expiry == self._unextendable_expiry:  # a rotation kept it: only a new login renews it
            return None
        issued = self.state.node_key_issued or time.time()
        lead = min(self.rotate_before, max(0.0, me.key_expiry - issued) / 2)
        return me.key_expiry - lead

    async def finish_pending_rotation(self) -> None:
        """At start, after a crash mid-rotation: if control took the pending key, adopt it; else drop it."""
        s = self.state
        pending, s.pending_node_key = s.pending_node_key, None
        assert pending is not None
        client = ControlClient(s.login_server, s.machine_key)
        try:
            await client.register(pending.public, s.hostname, None, os=OS_NAME)
            self.hooks.on_node_key(pending)
            s.node_key_issued = time.time()
        except ControlError as e:
            log.info("pending node key not taken by control (%s); keeping the current one", e)
        finally:
            await client.close()
        self.store.save(s)

    # -- internals -------------------------------------------------------------------------------------

    def _note_skew(self, skew: float) -> None:
        self.clock_skew = skew

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.hooks.on_status()

    async def _run(self) -> None:
        """Follow the netmap stream, reconnecting with backoff; rotate the node key when it is due (then
        reconnect at once with the new key)."""
        delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
        resume = None
        while True:
            client = ControlClient(self.state.login_server, self.state.machine_key)
            client.on_clock_skew = self._note_skew
            client.map_state = resume  # resume from what the last stream applied (only deltas since)
            client.stream_starts = self.stream_starts  # counted on across reconnects
            tasks = {
                asyncio.create_task(self._follow(client), name="follow"),
                asyncio.create_task(self._rotate_when_due(client), name="rotate"),
                asyncio.create_task(self._report_endpoints(client), name="endpoints"),
                asyncio.create_task(self._report_home(client), name="home-derp"),
                asyncio.create_task(self._report_routes(client), name="routes"),
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
                self._ending, self._task = self._task, None  # (stop() still waits for its cleanup)
                self._set_connected(False)
                try:
                    self.hooks.on_forgotten(e)
                except StorageError as se:  # never an unretrieved task exception: say it once
                    log.warning("control session: %s", se)
                    self.hooks.on_error(str(se))
                return
            except TailpyError as e:
                log.warning("control session: %s", e)
                self.hooks.on_error(str(e))
            except Exception as e:  # keep the node up whatever one stream did
                log.exception("control session failed")
                self.hooks.on_error(f"control session failed: {e!r}")
            finally:
                for task in tasks:
                    task.cancel()
                try:
                    await asyncio.gather(*tasks, return_exceptions=True)
                finally:  # (stop() may cancel this cleanup itself: the client is closed all the same)
                    resume = client.map_state if client.map_state is not None and not rotated else None
                    await client.close()
            self._set_connected(False)
            self.hooks.on_status()
            if rotated:
                delays = reconnect_delays(BACKOFF_MIN, BACKOFF_MAX)
                continue
            await asyncio.sleep(next(delays))

    async def _follow(self, client: ControlClient) -> None:
        s = self.state
        if self.rename_pending:
            await client.register(s.node_key.public, s.hostname, None, os=OS_NAME)
            log.info("hostname %s registered with control", s.hostname)
            self.rename_pending = False
        self.reported_endpoints = self.hooks.endpoints()
        self._home_changed.clear()  # the map request carries the current home
        self._routes_changed.clear()  # and the advertised routes
        self.reported_endpoints_changed.clear()  # and the current endpoints
        async for netmap in client.stream_map(
            s.node_key.public,
            self.reported_endpoints,
            s.hostname,
            home_derp=self.hooks.home_derp(),
            disco_key=self.disco_key,
            routable_ips=list(s.advertise_routes),
        ):
            self.self_node = netmap.self_node
            self.control_url = client.server_url  # (the URL this stream was opened on)
            self.connected = True  # on_netmap reports it with the rest
            self.hooks.on_netmap(netmap)
            self._netmap_changed.set()

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
        s = self.state
        new = s.pending_node_key or NodePrivate.generate()
        s.pending_node_key = new
        self.store.save(s)
        proof = proto.seal_rotation_proof(s.node_key, await client.server_key(), new.public, time.time())
        before = self.self_node.key_expiry if self.self_node else None
        node = await client.register(
            new.public, s.hostname, None, os=OS_NAME, old_node_key=s.node_key.public, old_node_proof=proof
        )
        log.info("node key rotated: %s -> %s", s.node_key.public.short(), new.public.short())
        if node.key_expiry is not None and before is not None and node.key_expiry <= before:
            # Control kept the expiry (it follows the login's ID token): do not rotate again before it.
            log.info("node key expiry stays %s; `tailpy login` renews it", time.ctime(node.key_expiry))
            self._unextendable_expiry = node.key_expiry
        self.hooks.on_node_key(new)
        s.node_key_issued = time.time()
        self.store.save(s)

    async def _report_home(self, client: ControlClient) -> None:
        """Tell control each new home region (peers reach this node there)."""
        while True:
            await wait_event(self._home_changed, 3600.0)
            if not self._home_changed.is_set():
                continue
            self._home_changed.clear()
            try:
                await client.update(home_derp=self.hooks.home_derp())
            except ControlError as e:
                log.warning("home DERP update: %s", e)
                self._home_changed.set()
                await asyncio.sleep(5.0)

    async def _report_routes(self, client: ControlClient) -> None:
        """Tell control the advertised routes each time they change (``tailpy set --advertise-routes``)."""
        while True:
            await wait_event(self._routes_changed, 3600.0)
            if not self._routes_changed.is_set():
                continue
            self._routes_changed.clear()
            try:
                await client.update(routable_ips=list(self.state.advertise_routes))
            except ControlError as e:
                log.warning("advertised routes update: %s", e)
                self._routes_changed.set()
                await asyncio.sleep(5.0)

    async def _check_stream(self, client: ControlClient) -> None:
        """Every :data:`STREAM_CHECK` seconds while connected, ask control whether it still holds this
        node's map stream; when it does not (a NAT on the way lost its state, so control's writes no longer
        reach this node and it closed the stream), end the session to reconnect now, rather than after the
        stream's 45 s of silence."""
        while True:
            await asyncio.sleep(random.uniform(*STREAM_CHECK))
            if not self.connected:
                continue
            try:
                alive = await client.stream_alive()
            except ControlError as e:  # unreachable: the stream's own silence timeout decides
                log.debug("map stream check: %s", e)
                continue
            if not alive:
                raise ControlError("control no longer holds this node's map stream: reconnecting")

    async def _report_endpoints(self, client: ControlClient) -> None:
        """Tell control this node's endpoints when they change: at each notice (netcheck re-STUNs every
        20-26 s) and every :data:`ENDPOINT_REFRESH` seconds."""
        while True:
            await wait_event(self.reported_endpoints_changed, ENDPOINT_REFRESH)
            self.reported_endpoints_changed.clear()
            now = self.hooks.endpoints()
            if now != self.reported_endpoints:
                self.reported_endpoints = now
                try:
                    await client.update_endpoints(now)
                except ControlError as e:
                    log.warning("endpoint update: %s", e)
                    self.reported_endpoints = []  # try again at the next round


__all__ = [
    "OS_NAME",
    "ROTATE_BEFORE",
    "ControlSession",
    "SessionHooks",
    "logout",
    "poll_login",
    "register",
]
