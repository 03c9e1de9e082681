"""The coordination server: an aiohttp app over :class:`tailpy.control.store.Store`.

Routes (requests and responses sealed as :mod:`tailpy.proto.control` describes):

* ``GET /key`` -> the server's machine public key, ``mkey:<hex>`` as text/plain (public, unauthenticated).
* ``POST /machine/register`` sealed ``{node_key, hostname, os?, auth_key?, old_node_key?, old_node_proof?,
  request_tags?, ephemeral?, routable_ips?}`` -> sealed ``{"node": Node JSON}``. ``"ephemeral": true``
  (Tailscale's ``RegisterRequest.Ephemeral``, tsnet's ``Server.Ephemeral``) makes the node ephemeral whatever
  the auth key. ``request_tags`` (``["tag:a", ...]``, Tailscale's ``Hostinfo.RequestTags``: ``tailpy up
  --advertise-tags``) are granted only when the auth key's creator or the node's owner may own them
  (:mod:`tailpy.control.tags`); refused, the registration is refused (403, ``"kind": "tags"``, nothing
  changed). With ``old_node_key`` (the machine's current node key) and ``old_node_proof``
  (:func:`tailpy.proto.control.seal_rotation_proof`, fresh) the node key is rotated to ``node_key`` with no
  auth key: same id, addresses and name, a new expiry, the old key refused at once. Otherwise see
  :meth:`tailpy.control.store.Store.register` (a restart with the same, unexpired node key needs no auth key;
  a new machine, new node key, expired or logged-out key needs one). With ``"interactive": true``, no auth key
  and a login provider configured (``oidc``), a machine that needs one gets instead sealed ``{"auth_url"}`` /
  ``{"pending_approval": true}`` after a long poll of up to ``wait`` seconds, or ``{"node"}`` once its user
  has signed in (:meth:`tailpy.control.oidc.Logins.poll`).
* ``GET /login/<id>``, ``GET /login/<id>/start``, ``GET /oidc/callback``: the login pages (HTML), with
  ``oidc`` only.
* ``POST /machine/logout`` sealed ``{node_key}`` -> sealed ``{"node": Node JSON}``: the node's key is expired
  and logged out (its record stays; a later register with an auth key brings it back). An ephemeral node
  is deleted instead, as by ``nodes delete`` (its addresses go to the address quarantine).
* ``POST /machine/map`` sealed ``{node_key, endpoints, hostname?, home_derp?, disco_key?, routable_ips?,
  resume?: {generation, version, feed?}, accept?: ["zstd", "patches", "frames", "derp_map"]}`` -> a stream
  (``application/x-ndjson``, chunked), one sealed message per line (``application/x-tailpy-frames``, one
  length-prefixed binary frame per message, when ``accept`` names ``frames``; zstd-compressed and with peer
  field patches when it names those: :mod:`tailpy.proto.mapcodec`): a full netmap (or, resuming, a delta
  since ``version``) first, then a ``delta`` per change the node can see, keepalives after
  :attr:`ControlServer.keepalive` seconds of silence; the exact format is in :mod:`tailpy.control.mapper`.
  The node is online while one of its map streams is open.
* ``POST /machine/update`` sealed ``{endpoints?, home_derp?, disco_key?, routable_ips?}`` (at least one) ->
  sealed ``{"node": Node JSON}``; pushed to all streams. ``home_derp``: the DERP region id the node is homed
  on (0: none), which peers use to reach it over DERP; ``disco_key``: ``"discokey:<hex>"``, the node's current
  disco public key (peers' disco pings are sealed to it). ``{"check_stream": true}`` alone changes nothing and
  answers ``{"streaming": bool}``: whether the server holds an open map stream of this node.
* ``POST /derp/admit`` plain JSON ``{"NodePublic": "nodekey:<hex>", "Source": ip}`` -> ``{"Allow": bool}``:
  DERP admission (Tailscale's ``tailcfg.DERPAdmitClientRequest``, derper's ``-verify-client-url``); Allow
  when the key is a live node's current, unexpired key (:meth:`ControlServer.derp_admits`). Unsealed, as
  derper sends it; it tells only whether a given 32-byte public key is in the tailnet.
* ``/api/v1/…``: the HTTP admin API, authenticated by admin API keys, described at ``GET
  /api/v1/openapi.json`` (:mod:`tailpy.control.adminapi`).
* ``GET /metrics`` -> Prometheus metrics (text format; :mod:`tailpy.control.metrics`), to loopback peers
  only (403 otherwise: ``tailpy control serve --metrics-listen`` serves them on a listener of their own).
* ``/admin`` and below: the web console, HTML pages for admins (:mod:`tailpy.control.console`).
* ``GET /health`` -> ``{"status": "ok" | "degraded" | "error", "checks": {name: {"status": ..., ...}}}``,
  200, or 503 when a check failed (:meth:`ControlServer.health`: the database, the map streams, and
  :attr:`ControlServer.extra_health`, the embedded relay's, say); unauthenticated, for load balancers and
  service managers.

``routable_ips`` (register, map, update): the routes the node advertises, a list of CIDR prefixes (exit
routes ``0.0.0.0/0`` and ``::/0`` when it offers itself as an exit node; Tailscale's
``Hostinfo.RoutableIPs``), checked with :func:`tailpy.routes.parse_routes` (a bad list: 400 with the
sentence) and stored canonical; absent or null leaves the stored ones. The policy's ``autoApprovers``
approve what they name at once; an admin approves the rest (``tailpy control routes approve``). Netmaps
carry each router's served, primary and allowed routes (:mod:`tailpy.control.mapper`).

Every request acts only on the node of the machine key that sealed it. Errors: 400 malformed, 401 a box that
does not open / stale or replayed request / refused auth key, 403 an unregistered machine or wrong node key;
their JSON ``{"error": sentence}`` is sealed when the request was authenticated (with ``"kind": "auth_key"``
for auth key refusals), plain otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from tailpy.asyncutil import LISTEN_BACKLOG
from tailpy.control import dnsconfig, pages
from tailpy.control.acl import PolicyKeeper, policy_nodes
from tailpy.control.admin import Admin
from tailpy.control.adminapi import AdminApi
from tailpy.control.console import PREFIX as CONSOLE_PREFIX
from tailpy.control.console import Console, ConsoleConfig
from tailpy.control.mapper import Mapper, MapStream
from tailpy.control.metrics import METRICS_PATH, ControlMetrics, failure_reason
from tailpy.control.oidc import Logins, OIDCConfig
from tailpy.control.openwrites import StreamOpenWrites
from tailpy.control.policy import Policy, PolicyNode
from tailpy.control.replicas import FEED_POLL, HEARTBEAT, Replicas
from tailpy.control.routes import auto_approved
from tailpy.control.store import DEFAULT_KEY_LIFETIME, Store
from tailpy.control.store.database import db_error
from tailpy.control.store.nodes import NodeReport
from tailpy.control.tags import Requester, check_tags
from tailpy.endpoint import Endpoint
from tailpy.errors import (
    AuthKeyError,
    ConfigError,
    ControlError,
    EndpointError,
    InvalidKeyError,
    ParseError,
    TagError,
)
from tailpy.httperrors import make_json_errors
from tailpy.httpguard import RUNNER_OPTIONS, install_log_guards, refuse_encoded_bodies
from tailpy.keys import DiscoPublic, NodePublic
from tailpy.netmap import DerpMap, NetMap, Node, parse_disco_key, parse_home_derp
from tailpy.proto import control as proto
from tailpy.proto import mapcodec
from tailpy.routes import parse_routes

log = logging.getLogger("tailpy.control")

MAX_ENDPOINTS = 64
MAX_REQUEST_TAGS = 64
DERP_ADMIT_PATH = "/derp/admit"  # (tailpy.derp.verify.CONTROL_ADMIT_PATH)
EPHEMERAL_TIMEOUT = 1800.0  # seconds an ephemeral node may be offline before it is removed
POLL_INTERVAL = FEED_POLL  # seconds between reads of the change feed without a notification
HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send a complete request head, counted from its accept or from the end
of the previous response (so also the longest idle keep-alive), as the relay's front
(:class:`tailpy.derp.server.DerpServer`'s ``header_timeout``) and Go's ``http.Server.ReadHeaderTimeout``."""


class _Refused(Exception):
    """Internal: answer with ``status`` and ``message`` (sealed to ``machine_key`` when known); ``reason``,
    when given, is the registration failure's metrics label (else :func:`failure_reason`'s)."""

    def __init__(self, status: int, message: str, kind: str = "control", reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.reason = status, message, kind, reason


def parse_endpoints(obj: object) -> list[Endpoint]:
    """Validate a list of at most 64 UDP endpoints "ip:port" / "[ipv6]:port" (port 1-65535). Raises
    ParseError (:class:`~tailpy.errors.EndpointError` for a malformed endpoint)."""
    if not isinstance(obj, list) or len(obj) > MAX_ENDPOINTS:
        raise ParseError(f'endpoints must be a list of at most {MAX_ENDPOINTS} "ip:port" strings')
    out = []
    for e in obj:
        if not isinstance(e, str):
            raise ParseError(f'endpoint {e!r} is not "ip:port"')
        ep = Endpoint.parse(e)
        if ep.port == 0:
            raise EndpointError(f'endpoint {e!r} has port 0: expected "ip:port" with a port of 1-65535')
        out.append(ep)
    return out


def parse_request_tags(obj: object) -> tuple[str, ...]:
    """The ``request_tags`` field of a registration: absent/None -> (); else a list of at most 64 strings
    (validated as tags later, against the policy). Raises ParseError."""
    if obj is None:
        return ()
    if (
        not isinstance(obj, list)
        or len(obj) > MAX_REQUEST_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= 128 for t in obj)
    ):
        raise ParseError(f'request_tags must be a list of at most {MAX_REQUEST_TAGS} tags like "tag:server"')
    return tuple(obj)


def parse_routable_ips(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The ``routable_ips`` field of a request: None when absent or null (leave the stored routes), else
    the routes canonical (:func:`tailpy.routes.parse_routes`). Raises ParseError with one sentence."""
    v = body.get("routable_ips")
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(r, str) for r in v):
        raise ParseError('routable_ips must be a list of CIDR prefixes like "198.51.100.0/24"')
    try:
        return parse_routes(v)
    except ConfigError as e:
        raise ParseError(f"routable_ips: {e}") from None


def _str_field(
    body: Mapping[str, Any], name: str, *, max_len: int = 255, required: bool = True
) -> str | None:
    v = body.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise _Refused(400, f"field {name!r} must be a string of 1-{max_len} characters")
    return v


def _node_key(body: Mapping[str, Any]) -> NodePublic:
    try:
        return NodePublic.from_text(str(body.get("node_key")))
    except InvalidKeyError as e:
        raise _Refused(400, f"field 'node_key': {e}") from None


class ControlServer:
    """The control server's request handling and netmap streams.

    ``clock`` gives unix seconds (injected for tests); ``keepalive`` seconds of stream silence before a
    keepalive line; ``poll_interval`` seconds between reads of the database's change feed without a
    notification (changes other processes made: other replicas, ``tailpy control nodes delete``; see
    :mod:`tailpy.control.replicas`); ``replica_id`` / ``replica_url`` / ``heartbeat``: this process as a
    replica of its database (:class:`tailpy.control.replicas.Replicas`, :attr:`replicas`); ``domain`` is
    the tailnet's DNS domain sent in netmaps (None: the one stored in the database, default
    ``tailnet.internal``); ``key_lifetime`` seconds a node key is valid after
    registration (None: never expires); ``ephemeral_timeout`` seconds an ephemeral node may stay offline
    before it is removed; ``derp_map``: the DERP relays every full netmap carries (static for the server's
    life; None: no DERP map); ``oidc``: login with an OpenID Connect provider for nodes without an auth key
    (:class:`tailpy.control.oidc.OIDCConfig`; None: auth keys only). One timer fires at the next key
    expiry or ephemeral deadline (no per-node polling). ``policy_file``: the tailnet policy is that file's
    (``serve --policy``), else the database's (:class:`tailpy.control.acl.PolicyKeeper`, :attr:`policy`).
    ``console``: who may sign in to the web console at ``/admin`` (:mod:`tailpy.control.console`; None: API
    keys only). ``header_timeout``: seconds a connection may take to send a request head, from its accept or
    the previous response (:data:`HEADER_TIMEOUT`; aiohttp's ``keepalive_timeout``, whose timer runs until a
    complete head has arrived); a connection still without one is closed (slowloris). Raises ConfigError
    when the policy cannot be loaded (a bad policy file: line, column, what
    is wrong).
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        keepalive: float = 15.0,
        poll_interval: float = POLL_INTERVAL,
        domain: str | None = None,
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
        ephemeral_timeout: float = EPHEMERAL_TIMEOUT,
        derp_map: DerpMap | None = None,
        oidc: OIDCConfig | None = None,
        policy_file: Path | None = None,
        replica_id: str | None = None,
        replica_url: str = "",
        heartbeat: float = HEARTBEAT,
        console: ConsoleConfig | None = None,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.store = store
        self.header_timeout = header_timeout
        self.open_writes = StreamOpenWrites(store)
        """The reports of map streams opening, grouped into shared transactions."""
        self.key = store.server_key()
        self.public_key = proto.public_of(self.key)
        self.clock = clock
        self.keepalive = keepalive
        self.poll_interval = poll_interval
        self.domain = domain if domain is not None else store.settings().domain
        self.key_lifetime = key_lifetime
        self.ephemeral_timeout = ephemeral_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_check = self.clock()
        self._started = self._last_check  # offline time of ephemeral nodes counts from here at the earliest
        self._guard = proto.ReplayGuard()
        self._online: Counter[int] = Counter()
        self._stream_socks: dict[MapStream, socket.socket | None] = {}  # open map streams and their sockets
        self.mapper = Mapper(self.key, self.domain, derp_map=derp_map, dns=dnsconfig.for_netmap(store))
        self.mapper.clock = clock
        self.replicas = Replicas(  # (reads the feed's position before the nodes: nothing is missed)
            self, replica_id=replica_id, url=replica_url, heartbeat=heartbeat, poll_interval=poll_interval
        )
        """This process as one replica of the database: the change feed, and which nodes are online on
        which live replica (:meth:`Replicas.online`, :meth:`Replicas.alive`)."""
        self.metrics = ControlMetrics()
        """Prometheus metrics served at ``GET /metrics`` (:mod:`tailpy.control.metrics`)."""
        self.metrics.attach(self)
        self.mapper.load(store.list_nodes())
        self._emails: dict[str, str] = {}
        self.users_changed()
        self.policy = PolicyKeeper(
            store, path=policy_file, on_change=self._apply_policy, nodes=self.policy_nodes, clock=clock
        )
        self.policy.load()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.extra_health: dict[str, Callable[[], dict[str, Any]]] = {}
        """More checks for ``GET /health``: name -> a function answering ``{"status": ..., ...}``."""
        self.logins: Logins | None = None  # interactive login (OpenID Connect), see tailpy.control.oidc
        if oidc is not None:
            self.logins = Logins(
                oidc, store, on_node=self.admin_changed, key_lifetime=key_lifetime, clock=clock
            )
        self.console = Console(self, console)
        """The web console (:mod:`tailpy.control.console`)."""

    # --- app and lifecycle ---

    def app(self) -> web.Application:
        """The aiohttp application (its shutdown ends every map stream)."""
        where = getattr(self.store, "where", "")
        app = web.Application(
            client_max_size=proto.MAX_MESSAGE + 4096,
            # every error JSON (login pages keep their own HTML error pages)
            middlewares=[
                self.metrics.middleware(),
                refuse_encoded_bodies,
                make_json_errors(
                    skip=(*pages.PAGE_PREFIXES, CONSOLE_PREFIX), translate=lambda e: db_error(e, where)
                ),
            ],
        )
        app.router.add_get("/key", self._key)
        app.router.add_get("/health", self._health)
        app.router.add_get(METRICS_PATH, self.metrics.handle)
        app.router.add_post("/machine/register", self._register)
        app.router.add_post("/machine/map", self._map)
        app.router.add_post("/machine/update", self._update)
        app.router.add_post("/machine/logout", self._logout)
        app.router.add_post(DERP_ADMIT_PATH, self._derp_admit)
        AdminApi(Admin(self.store, server=self, clock=self.clock, key_lifetime=self.key_lifetime)).install(
            app
        )
        if self.logins is not None:
            self.logins.install(app)
        self.console.install(app)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers: ``{"status": "ok" | "degraded" | "error", "checks": {...}}``, each
        check ``{"status": "ok" | "warning" | "error", ...}``: ``database`` (a read of the settings),
        ``map_streams`` (how many are open), ``policy`` ("warning" while a policy file's content is refused
        and the previous policy runs: :meth:`tailpy.control.acl.PolicyKeeper.health`), and
        :attr:`extra_health`'s. "degraded": some check warns, none failed (still HTTP 200)."""
        checks: dict[str, dict[str, Any]] = {}
        try:
            self.store.settings()
            checks["database"] = {"status": "ok"}
        except Exception as e:  # whatever the driver raises: the answer is "not healthy", with why
            checks["database"] = {"status": "error", "error": str(e) or type(e).__name__}
        checks["map_streams"] = {"status": "ok", "open": self.mapper.streams}
        checks["policy"] = self.policy.health()
        for name, check in self.extra_health.items():
            try:
                checks[name] = check()
            except Exception as e:
                checks[name] = {"status": "error", "error": repr(e)}
        states = {c.get("status") for c in checks.values()}
        status = "error" if "error" in states else "degraded" if "warning" in states else "ok"
        return {"status": status, "checks": checks}

    async def _health(self, _request: web.Request) -> web.Response:
        doc = self.health()
        return web.json_response(doc, status=503 if doc["status"] == "error" else 200)

    async def start(self, host: str | None, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (``host`` None: every address, IPv4 and IPv6; ``port`` 0: any free port);
        returns the first bound (host, port), all of them in :attr:`addresses`. Raises OSError."""
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            shutdown_timeout=5.0,
            keepalive_timeout=self.header_timeout,  # an unfinished head is closed after this
            access_log_class=pages.AccessLogger,  # login link ids and callback codes stay out of logs
            **RUNNER_OPTIONS,
        )
        install_log_guards()
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        return self.addresses[0]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs the server listens on (none before :meth:`start`)."""
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def stop(self) -> None:
        """Close every stream and the listener; the store stays open (the caller owns it)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_startup(self, _app: web.Application) -> None:
        self._closing = False
        self.metrics.listen_db(self.store)
        await self.replicas.start()
        self.policy.start_watching()
        self._lifecycle()

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.replicas.stop()
        await self.policy.stop()
        self.open_writes.flush()
        self.mapper.end_all()
        self.metrics.detach()

    # --- netmaps ---

    def publish_node(self, node_id: int) -> None:
        """Node ``node_id``'s record changed in the store: read it once and send a delta to every stream that
        can see it (its own streams get it as ``self``). A node that is no longer live is removed."""
        node = self._read_node(node_id)
        if node is None:
            self.publish_removed(node_id)
        else:
            self.mapper.publish(node)

    def publish_removed(self, node_id: int) -> None:
        """Node ``node_id`` left the tailnet: its peers get ``peers_removed`` and its own streams end."""
        self.mapper.remove(node_id)

    def _read_node(self, node_id: int) -> Node | None:
        by_id = getattr(self.store, "node", None)  # Store.node(node_id) -> live Node | None, when it has one
        if callable(by_id):
            found = by_id(node_id)
            return found if isinstance(found, Node) else None
        known = self.mapper.nodes.get(node_id)
        if known is not None:
            node = self.store.node_by_machine_key(known.machine_key)
            return node if node is not None and node.id == node_id else None
        return next((n for n in self.store.list_nodes() if n.id == node_id), None)

    def _changed(self) -> None:
        """Full resync: read every node from the store and send deltas for what differs (O(nodes) reads and
        compares; only changed records are sent). For a replica that fell behind the change feed."""
        since = self.mapper.version
        self.mapper.resync(self.store.list_nodes(), since)

    def dns_changed(self) -> None:
        """Re-read the DNS config and domain from the store; if they changed, every node gets a full
        netmap."""
        self.domain = self.store.settings().domain
        self.mapper.set_dns(dnsconfig.for_netmap(self.store), self.domain)

    # --- the tailnet policy ---

    def _apply_policy(self, policy: Policy | None) -> None:
        """The running policy changed (or was loaded): every node's filter is recompiled and sent, and the
        advertised routes its ``autoApprovers`` name are approved (approvals are never taken back here)."""
        self.mapper.set_policy(policy)
        if policy is None or not (policy.auto_approvers.routes or policy.auto_approvers.exit_node):
            return
        for node in [n for n in self.mapper.nodes.values() if n.routable_ips]:
            approved = self.auto_approve(node)
            if approved is not node:
                self.mapper.publish(approved)

    def auto_approve(self, node: Node) -> Node:
        """Approve the routes ``node`` advertises that the running policy's ``autoApprovers`` name and are
        not approved yet (stored at once); returns the node as stored then (``node`` itself when nothing
        was approved)."""
        policy = self.policy.policy if hasattr(self, "policy") else None
        if policy is None or not node.routable_ips:
            return node
        pn = policy_nodes([node], self._emails)[0]
        missing = [r for r in auto_approved(policy, pn, node.routable_ips) if r not in node.approved_routes]
        if not missing:
            return node
        log.info("node %d %s: routes %s approved by the policy's autoApprovers", node.id, node.name, missing)
        return self.store.approve_routes(node.id, missing, self.clock())

    def policy_nodes(self) -> list[PolicyNode]:
        """The live nodes as the policy compiler sees them (owner emails included)."""
        return policy_nodes(self.mapper.nodes.values(), self._emails)

    def users_changed(self) -> None:
        """Re-read the users' emails; when they changed, the mapper matches policies against the new ones."""
        emails = self.store.user_emails()
        if emails != self._emails:
            self._emails = emails
            self.mapper.set_user_emails(emails)

    def check_tags(
        self, tags: Sequence[str], requesters: Sequence[Requester], held: Sequence[str]
    ) -> tuple[str, ...]:
        """Decide requested tags under the running policy (:func:`tailpy.control.tags.check_tags`)."""
        return check_tags(self.policy.policy, tags, requesters, held)

    # --- lifecycle: admin changes, key expiry, ephemeral nodes ---

    def is_online(self, node_id: int) -> bool:
        """True while node ``node_id`` has a map stream open on this replica (any live replica:
        :meth:`Replicas.online`)."""
        return self._online[node_id] > 0

    def streaming(self) -> set[int]:
        """Ids of the nodes with a map stream open on this replica."""
        return {i for i, c in self._online.items() if c > 0}

    def admin_changed(self, node_id: int) -> None:
        """An admin command changed node ``node_id`` (name, expiry, tags) or a login registered it: tell the
        nodes now."""
        self.users_changed()  # (a login may have made its user)
        self.publish_node(node_id)
        self._lifecycle()

    def admin_removed(self, node_id: int) -> None:
        """An admin command deleted node ``node_id``: tell its peers now and end its streams."""
        self.publish_removed(node_id)
        self._lifecycle()

    def _lifecycle(self) -> None:
        """Publish keys that expired since the last look, remove ephemeral nodes offline for longer than
        ``ephemeral_timeout``, and set the one timer to the next such moment."""
        if self._closing:
            return
        now = self.clock()
        online = self.replicas.online_nodes()  # (an ephemeral node streaming on another replica stays)
        for node_id in self.store.expired_between(self._last_check, now):
            log.info("node %d: key expired", node_id)
            self.publish_node(node_id)
        self._last_check = now
        for node_id in self.store.ephemeral_gc(now, self.ephemeral_timeout, online, self._started):
            log.info("node %d: ephemeral and offline for %.0f s, removed", node_id, self.ephemeral_timeout)
            self.publish_removed(node_id)
        at = self.store.next_deadline(now, self.ephemeral_timeout, online, self._started)
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            delay = min(max(at - now, 0.0) + 0.01, 86400.0)  # re-armed at least daily (clock changes)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._lifecycle()

    def derp_admits(self, node_key: NodePublic) -> bool:
        """True when ``node_key`` is the current key of a live node that is not expired or logged out (as
        the netmap streams know the nodes: admin changes from other processes count after the next poll)."""
        now = self.clock()
        for n in self.mapper.nodes.values():
            if n.node_key == node_key:
                return not n.expired and (n.key_expiry is None or n.key_expiry > now)
        return False

    async def _derp_admit(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.content.read(4096))
            key = NodePublic.from_text(str(body["NodePublic"]))
        except (ValueError, TypeError, KeyError, InvalidKeyError):
            return web.json_response({"error": 'expected JSON {"NodePublic": "nodekey:<hex>"}'}, status=400)
        allow = self.derp_admits(key)
        if not allow:
            log.info("DERP admission refused for %s from %s", key.short(), body.get("Source", "?"))
        return web.json_response({"Allow": allow})

    def netmap(self, node_id: int) -> NetMap | None:
        """The netmap of node ``node_id`` as streams know it (None if it is not live)."""
        return self.mapper.netmap(node_id)

    # --- request plumbing ---

    async def _authenticate(self, request: web.Request, path: str) -> proto.OpenedRequest:
        data = await request.read()
        try:
            opened = proto.open_request(self.key, data, path=path)
            self._guard.check(opened, self.clock())
        except proto.UnauthenticatedError as e:
            raise _Refused(401, str(e)) from None
        except proto.ReplayError as e:
            raise _Refused(401, str(e)) from None
        except ParseError as e:
            raise _Refused(400, str(e)) from None
        return opened

    def _reply(self, req: proto.OpenedRequest, body: Mapping[str, Any], status: int = 200) -> web.Response:
        sealed = proto.seal_response(self.key, req.machine_key, req.nonce_id, body)
        return web.Response(status=status, body=proto.unary_envelope(sealed), content_type="application/json")

    async def _handle(
        self, request: web.Request, path: str, fn: Callable[[proto.OpenedRequest], Any]
    ) -> web.StreamResponse:
        req: proto.OpenedRequest | None = None
        try:
            req = await self._authenticate(request, path)
            result = fn(req)
            if asyncio.iscoroutine(result):
                result = await result
            assert isinstance(result, web.StreamResponse)
            return result
        except _Refused as e:
            if path == "/machine/register":
                reason = e.reason or failure_reason(e.status, e.kind)
                self.metrics.registration_failures.labels(reason).inc()
            who = req.machine_key.short() if req is not None else request.remote
            log.warning("refused %s from %s: %s", path, who, e.message)
            if req is None:
                return web.json_response({"error": e.message}, status=e.status)
            return self._reply(req, {"error": e.message, "kind": e.kind}, e.status)
        except SQLAlchemyError as e:  # (a lost connection, a lock wait that timed out: the next try may work)
            if path == "/machine/register":
                self.metrics.registration_failures.labels("database").inc()
            log.warning("%s failed: the database did not answer: %s", path, str(e).splitlines()[0])
            return web.json_response(
                {"error": "the control database did not answer: try again (or another replica)"}, status=503
            )

    def _live_node(
        self, req: proto.OpenedRequest, node_key: NodePublic | None, *, known: bool = False
    ) -> Node:
        """The live node of the request's machine key, refused (403) when there is none or ``node_key`` is
        not its key. ``known``: the mapper's record may answer (no database round trip on the event loop:
        thousands of map streams open at once when a replica's nodes move here); the database is asked
        when the mapper knows no such node with that key (it may lag another replica's write by a feed
        read), and the stream's opening write checks again that the node is live."""
        if known:
            cached = self.mapper.node_by_machine_key(req.machine_key)
            if cached is not None and (node_key is None or cached.node_key == node_key):
                return cached
        node = self.store.node_by_machine_key(req.machine_key)
        if node is None:
            raise _Refused(403, "this machine is not registered (or was deleted); register with an auth key")
        if node_key is not None and node.node_key != node_key:
            raise _Refused(
                403, f"node key {node_key.short()} is not this machine's registered key; register again"
            )
        return node

    # --- handlers ---

    async def _key(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.public_key.text())

    async def _register(self, request: web.Request) -> web.StreamResponse:
        async def do(req: proto.OpenedRequest) -> web.Response:
            node_key = _node_key(req.body)
            hostname = _str_field(req.body, "hostname")
            auth_key = _str_field(req.body, "auth_key", max_len=200, required=False)
            os_name = _str_field(req.body, "os", max_len=64, required=False) or ""
            try:
                request_tags = parse_request_tags(req.body.get("request_tags"))
                routable_ips = parse_routable_ips(req.body)
            except ParseError as e:
                raise _Refused(400, str(e)) from None
            assert hostname is not None
            now = self.clock()
            try:
                if req.body.get("old_node_key") is not None:
                    node = self._rotate(req, node_key, now)
                else:
                    node = self.store.register(
                        req.machine_key,
                        node_key,
                        hostname,
                        auth_key,
                        now,
                        os_name=os_name,
                        key_lifetime=self.key_lifetime,
                        request_tags=request_tags,
                        tag_check=self.check_tags,
                        ephemeral=req.body.get("ephemeral") is True,
                        routable_ips=routable_ips,
                    )
            except TagError as e:
                raise _Refused(403, str(e), "tags") from None
            except AuthKeyError as e:
                if auth_key is None and self.logins is not None and req.body.get("interactive") is True:
                    wait = req.body.get("wait", 0)
                    wait = (
                        float(wait) if isinstance(wait, (int, float)) and not isinstance(wait, bool) else 0.0
                    )
                    answer = await self.logins.poll(req.machine_key, node_key, hostname, os_name, wait)
                    return self._reply(req, answer)
                # (no key at all, and no interactive login: unauthenticated rather than a refused key)
                raise _Refused(
                    401, str(e), "auth_key", reason="unauthenticated" if auth_key is None else None
                ) from None
            except ControlError as e:
                raise _Refused(409, str(e)) from None
            self._lifecycle()
            log.info("registered node %d %s (%s) %s", node.id, node.name, node.ipv4, req.machine_key.short())
            node = self.auto_approve(node)
            self.mapper.publish(node)
            self.metrics.registrations.inc()
            return self._reply(req, {"node": _with_online(node, self._online[node.id] > 0).to_json()})

        return await self._handle(request, "/machine/register", do)

    def _rotate(self, req: proto.OpenedRequest, new_key: NodePublic, now: float) -> Node:
        try:
            old_key = NodePublic.from_text(str(req.body.get("old_node_key")))
        except InvalidKeyError as e:
            raise _Refused(400, f"field 'old_node_key': {e}") from None
        try:
            proto.open_rotation_proof(
                self.key, old_key, req.body.get("old_node_proof"), new_node_key=new_key, now=now
            )
        except (ParseError, ControlError) as e:
            raise _Refused(401, str(e)) from None
        node = self.store.rotate_node_key(
            req.machine_key, old_key, new_key, now, key_lifetime=self.key_lifetime
        )
        log.info("node %d: node key rotated %s -> %s", node.id, old_key.short(), new_key.short())
        return node

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        def do(req: proto.OpenedRequest) -> web.Response:
            self._live_node(req, _node_key(req.body))
            now = self.clock()
            node = self.store.logout(req.machine_key, now)
            if node is None:
                raise _Refused(403, "this machine is not registered (or was deleted)")
            if self.store.is_ephemeral(node.id) and self.store.delete_node(node.id, now):
                log.info("node %d %s logged out: ephemeral, removed", node.id, node.name)
                self.admin_removed(node.id)
            else:
                log.info("node %d %s logged out", node.id, node.name)
                self.publish_node(node.id)
            return self._reply(req, {"node": _with_online(node, self.is_online(node.id)).to_json()})

        return await self._handle(request, "/machine/logout", do)

    async def _update(self, request: web.Request) -> web.StreamResponse:
        def do(req: proto.OpenedRequest) -> web.Response:
            body = req.body
            fields = {"endpoints", "home_derp", "disco_key", "routable_ips"}
            if body.get("check_stream") is True and not fields & set(body):
                # tailpyd's check that its map stream still reaches it (a NAT that lost its state drops
                # the stream's packets silently on the node's side): changes nothing
                live = self._live_node(req, None)
                return self._reply(req, {"streaming": self.is_online(live.id)})
            if not fields & set(body):
                raise _Refused(
                    400, "an update needs 'endpoints' or 'home_derp' or 'disco_key' or 'routable_ips'"
                )
            try:
                endpoints = parse_endpoints(body["endpoints"]) if "endpoints" in body else None
                home_derp = parse_home_derp(body["home_derp"]) if "home_derp" in body else None
                disco_key = parse_disco_key(body.get("disco_key"))
                routable_ips = parse_routable_ips(body)
            except ParseError as e:
                raise _Refused(400, str(e)) from None
            self._live_node(req, None)
            node = self.store.update_node(
                req.machine_key,
                endpoints=endpoints,
                home_derp=home_derp,
                disco_key=disco_key,
                routable_ips=routable_ips,
                now=self.clock(),
            )
            if node is None:
                raise _Refused(403, "this machine is not registered (or was deleted)")
            if routable_ips is not None:
                node = self.auto_approve(node)
                self._tune_node_liveness(node.id, router=bool(node.routable_ips))
            self.mapper.publish(node)
            return self._reply(req, {"node": _with_online(node, self._online[node.id] > 0).to_json()})

        return await self._handle(request, "/machine/update", do)

    async def _map(self, request: web.Request) -> web.StreamResponse:
        async def do(req: proto.OpenedRequest) -> web.StreamResponse:
            node_key = _node_key(req.body)
            hostname = _str_field(req.body, "hostname", required=False)
            try:
                endpoints = parse_endpoints(req.body.get("endpoints", []))
                home_derp = parse_home_derp(req.body["home_derp"]) if "home_derp" in req.body else None
                disco_key = parse_disco_key(req.body.get("disco_key"))
                routable_ips = parse_routable_ips(req.body)
                accept = mapcodec.accepted(req.body.get("accept"))
            except ParseError as e:
                raise _Refused(400, str(e)) from None
            resume = _resume(req.body.get("resume"))
            if self.replicas.severed:
                raise _Refused(503, "this control replica cannot reach its database: try another replica")
            node = self._live_node(req, node_key, known=True)
            if resume is not None and resume[2] is not None:
                self.replicas.catch_up(resume[2])  # (a node from a replica ahead of this one)
            sock = None if request.transport is None else request.transport.get_extra_info("socket")
            set_stream_keepalive(sock)
            resp = web.StreamResponse(
                headers={
                    "Content-Type": proto.FRAMES_CONTENT_TYPE
                    if "frames" in accept
                    else proto.LINES_CONTENT_TYPE,
                    proto.KEEPALIVE_HEADER: f"{self.stream_keepalive:g}",
                }
            )
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            try:
                stream = self.mapper.open_stream(node.id, req.machine_key, req.nonce_id, resume, accept)
            except Exception:  # (the answer has begun: a 500 now would be written into the stream's body)
                log.exception("map stream for node %d could not start", node.id)
                return resp
            self._stream_socks[stream] = sock
            try:
                await self._serve_stream(
                    resp, stream, endpoints, hostname, home_derp, disco_key, routable_ips
                )
            finally:
                self._stream_socks.pop(stream, None)
            return resp

        return await self._handle(request, "/machine/map", do)

    @property
    def stream_keepalive(self) -> float:
        """Seconds of silence before a keepalive line on a map stream: :attr:`keepalive`, or with replica
        liveness at most one heartbeat interval, so that a node notices a hung replica (its client gives up
        after a few keepalives' silence, :data:`tailpy.proto.control.KEEPALIVE_HEADER`) about when the
        others count it dead."""
        if self.replicas.liveness:
            return min(self.keepalive, self.replicas.heartbeat_interval)
        return self.keepalive

    def _tune_liveness(self, stream: MapStream, *, router: bool) -> None:
        """Give ``stream`` the keepalive and TCP user timeout of a router's stream (:data:`ROUTER_KEEPALIVE`,
        :data:`ROUTER_USER_TIMEOUT`) when its node advertises routes, else the default ones."""
        keepalive = min(self.stream_keepalive, ROUTER_KEEPALIVE) if router else self.stream_keepalive
        stream.keepalive = keepalive
        set_stream_keepalive(
            self._stream_socks.get(stream),
            user_timeout=ROUTER_USER_TIMEOUT if router else STREAM_USER_TIMEOUT,
        )

    def _tune_node_liveness(self, node_id: int, *, router: bool) -> None:
        """:meth:`_tune_liveness` for every open stream of node ``node_id`` (its advertised routes
        changed)."""
        for stream in [st for st in self._stream_socks if st.node_id == node_id]:
            self._tune_liveness(stream, router=router)  # (the keepalive sweep reads it at its next round)

    async def _serve_stream(
        self,
        resp: web.StreamResponse,
        stream: MapStream,
        endpoints: list[Endpoint],
        hostname: str | None,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
        routable_ips: tuple[str, ...] | None = None,
    ) -> None:
        self._online[stream.node_id] += 1
        try:
            if self._online[stream.node_id] == 1:
                self.replicas.opened(stream.node_id)  # (online on every replica)
            node = await self.open_writes.report(  # (committed before the stream starts)
                NodeReport(
                    stream.machine_key,
                    endpoints=endpoints,
                    hostname=hostname,
                    home_derp=home_derp,
                    disco_key=disco_key,
                    routable_ips=routable_ips,
                    now=self.clock(),
                )
            )
            if node is None:
                self.publish_removed(stream.node_id)
                return
            if routable_ips is not None:
                node = self.auto_approve(node)
            self.mapper.publish(node)  # endpoints, online (a router may become primary)
            self.metrics.stream_starts.labels(stream.start).inc()
            log.info(
                "map stream opened for node %d (%s)%s",
                stream.node_id,
                stream.machine_key.short(),
                _STARTS.get(stream.start, ""),
            )
            self._tune_liveness(stream, router=bool(node.routable_ips))
            await self.mapper.serve(stream, resp.write, stream.keepalive)
        except (ConnectionError, RuntimeError) as e:  # client went away mid-write
            log.info("map stream for node %d broke: %s", stream.node_id, e)
        finally:
            self.mapper.close_stream(stream)
            self._online[stream.node_id] -= 1
            if self._online[stream.node_id] <= 0:
                del self._online[stream.node_id]
                if not self._closing:
                    self.replicas.closed(stream.node_id)
            if not self._closing:
                try:
                    node = self.store.update_node(stream.machine_key, now=self.clock())
                except SQLAlchemyError as e:  # (the database is unreachable: the feed brings it later)
                    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    log.info("map stream for node %d: cannot record its last seen: %s", stream.node_id, why)
                    node = None
                if node is not None:
                    self.mapper.publish(node)  # last_seen, offline
                self._lifecycle()  # an ephemeral node's offline timeout starts now
            log.info("map stream closed for node %d", stream.node_id)


STREAM_KEEPALIVE = (10, 5, 3)
"""TCP keepalive of a map stream's connection: first probe after 10 s idle, then every 5 s, 3 unanswered
probes end it (tcp(7) ``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``)."""
STREAM_USER_TIMEOUT = 30.0
"""Seconds written data may stay unacknowledged before the kernel ends a map stream's connection (tcp(7)
``TCP_USER_TIMEOUT``, RFC 5482). With keepalive lines every 15 s, a node whose host vanished (power cut,
cable, a crashed VM: no FIN or RST) counts as offline within about 45 s instead of TCP's ~15 minutes of
retransmissions."""


ROUTER_KEEPALIVE = 2.0
"""Seconds of silence before a keepalive line on the map stream of a node that advertises routes (a subnet
router or exit node). With :data:`ROUTER_USER_TIMEOUT` control notices such a node vanishing (power cut,
cable, its LAN link down: no FIN or RST) within about 7 s instead of 45 s, and moves its routes to a standby
(Tailscale fails over HA subnet routers when control sees the primary offline). Routers are few: the extra
lines cost nothing that matters."""
ROUTER_USER_TIMEOUT = 5.0
"""``TCP_USER_TIMEOUT`` of a router's map stream, seconds (see :data:`STREAM_USER_TIMEOUT`)."""


def set_stream_keepalive(sock: socket.socket | None, user_timeout: float = STREAM_USER_TIMEOUT) -> None:
    """Make ``sock`` (a map stream's TCP connection) notice a peer that vanished: keepalive probes
    (:data:`STREAM_KEEPALIVE`) and a user timeout (``user_timeout`` seconds, by default
    :data:`STREAM_USER_TIMEOUT`), where the OS has them."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = STREAM_KEEPALIVE
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        opt_user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if opt_user_timeout is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt_user_timeout, int(user_timeout * 1000))


_STARTS = {"resumed": ", resumed", "resumed_elsewhere": ", resumed from another replica"}
"""What the log line of a stream that opened says of how it began (a full netmap: nothing)."""


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets (``http://[::1]:8080``)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _resume(obj: object) -> tuple[str, int, str | None] | None:
    """The ``resume`` field of a map request: ``{"generation": str, "version": int, "feed"?: str}`` or
    absent (:mod:`tailpy.control.mapper`)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        g, v, f = obj.get("generation"), obj.get("version"), obj.get("feed")
        if (
            isinstance(g, str)
            and len(g) <= 64
            and isinstance(v, int)
            and not isinstance(v, bool)
            and v >= 0
            and (f is None or (isinstance(f, str) and len(f) <= 128))
        ):
            return g, v, f
    raise _Refused(
        400,
        'field \'resume\' must be {"generation": string, "version": integer >= 0, "feed"?: string}',
    )


def _with_online(node: Node, online: bool) -> Node:
    return node if node.online == online else dataclasses.replace(node, online=online)


__all__ = ["ControlServer", "http_url", "parse_endpoints", "parse_request_tags", "parse_routable_ips"]
