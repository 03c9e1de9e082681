"""The control server's Prometheus metrics (text exposition format, served at ``GET /metrics``).

Each :class:`ControlMetrics` has its own ``prometheus_client.CollectorRegistry`` (never the library's global
one), so several servers in one process (tests, replicas) keep apart. Values that describe state (nodes by
state, open map streams) are read from the server at scrape time (:class:`_StateCollector`); events are
counted where they happen:

* ``tailpy_control_nodes{state}`` (gauge): live nodes ``online`` (a map stream open on some live replica),
  ``offline``, ``expired`` (key expired or logged out); ``pending``: sign-ins waiting for an admin's approval.
* ``tailpy_control_map_streams`` (gauge): map streams open on this replica.
* ``tailpy_control_map_stream_starts_total{start}`` (counter): map streams opened, by how they began:
  ``netmap`` (a full netmap), ``resumed`` (a delta since the client's version on this server),
  ``resumed_elsewhere`` (a delta since the client's resume point from another replica of the database).
* ``tailpy_control_registrations_total`` (counter): registrations that succeeded;
  ``tailpy_control_registration_failures_total{reason}`` (counter): refused ones
  (:data:`REGISTRATION_FAILURES`).
* ``tailpy_control_delta_latency_seconds`` (histogram): from a change to its delta written to a stream.
* ``tailpy_control_db_operation_duration_seconds{operation}`` (histogram): database statements, by
  ``select``, ``insert``, ``update``, ``delete``, ``other``.
* ``tailpy_control_policy_compile_seconds`` (histogram): compiling the tailnet policy for every node.
* ``tailpy_control_http_requests_total{route, method, status}`` (counter): ``route`` is the route's pattern
  (``/login/{id}``), ``unmatched`` for paths no route serves; ``status`` 499 (:data:`CLIENT_CLOSED`) when the
  client left before the handler returned; ``method`` is one of :data:`METHODS` as sent, any other
  ``other`` (so a client cannot add series by inventing methods).
* ``tailpy_control_replica_info{replica}`` (gauge, 1): this replica's id (with replica liveness only).

With the embedded DERP relay, its metrics (:mod:`tailpy.derp.metrics`) join the same exposition.

On control's main listener ``/metrics`` answers loopback peers only (as derper's ``/debug/*`` handlers:
Tailscale's ``tsweb.AllowDebugAccess``); ``--metrics-listen`` serves it on a listener of its own to anyone
who reaches that address (:func:`tailpy.metrics.start_metrics_listener`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tailpy.httpguard import came_through_proxy
from tailpy.metrics import METRICS_PATH, is_loopback, metrics_response
from tailpy.metrics import exposition as text_exposition

if TYPE_CHECKING:
    from tailpy.control.server import ControlServer

LOOPBACK_ONLY = (
    "metrics are served on this listener to loopback clients only: start control with --metrics-listen "
    "HOST:PORT to serve them to a Prometheus elsewhere\n"
)
"""The 403 body for ``/metrics`` asked on the main listener by a peer that is not on loopback."""

STREAM_STARTS = ("netmap", "resumed", "resumed_elsewhere")
"""The ``start`` label values of ``tailpy_control_map_stream_starts_total``."""
REGISTRATION_FAILURES = (
    "bad_request",
    "unauthenticated",
    "auth_key",
    "tags",
    "not_registered",
    "conflict",
    "database",
    "other",
)
"""``reason`` labels of ``tailpy_control_registration_failures_total``: a malformed request; a box that did
not open, a stale or replayed request, a refused key rotation proof, a registration with no auth key (and
no interactive login); a refused auth key; requested tags the
policy does not grant; a machine control does not know; a conflict with the stored state (another
machine's node key, say); the database did not answer (503); anything else."""

CLIENT_CLOSED = 499
"""The ``status`` label of a request whose client went away before its handler returned (a map stream
ended by its node, say; nginx's code for it): its real status was sent, or never will be."""

DB_OPERATIONS = ("select", "insert", "update", "delete")
"""``operation`` labels of the database latency histogram (every other statement is ``other``)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram buckets, seconds, of the delta latency and the policy compile time."""
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
"""Histogram buckets, seconds, of database statements."""


def failure_reason(status: int, kind: str) -> str:
    """The ``reason`` label of a refused registration answered with HTTP ``status`` and error ``kind``
    (``"auth_key"``, ``"tags"``, ``"control"``: the ``kind`` of control's sealed error JSON)."""
    if kind in ("auth_key", "tags"):
        return kind
    return {400: "bad_request", 401: "unauthenticated", 403: "not_registered", 409: "conflict"}.get(
        status, "other"
    )


class _StateCollector(Collector):
    """Reads the nodes by state and the open map streams from the server at scrape time."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        mapper = server.mapper
        now = server.clock()
        counts = dict.fromkeys(("online", "offline", "expired", "pending"), 0)
        for node in mapper.nodes.values():
            if node.expired or (node.key_expiry is not None and node.key_expiry <= now):
                counts["expired"] += 1
            elif mapper.is_online(node.id):
                counts["online"] += 1
            else:
                counts["offline"] += 1
        list_pending = getattr(server.store, "list_pending", None)
        if callable(list_pending):
            try:
                counts["pending"] = len(list_pending())
            except sa.exc.SQLAlchemyError:  # (the database is unreachable: the rest still answers)
                del counts["pending"]
        nodes = GaugeMetricFamily(
            "tailpy_control_nodes",
            "Live nodes by state (online: a map stream open on a live replica; expired: key expired or "
            "logged out), and sign-ins pending an admin's approval.",
            labels=["state"],
        )
        for state, n in counts.items():
            nodes.add_metric([state], n)
        yield nodes
        yield GaugeMetricFamily(
            "tailpy_control_map_streams", "Map streams open on this replica.", value=mapper.streams
        )
        replicas = server.replicas
        if replicas.liveness:
            replica = replicas.id
            info = GaugeMetricFamily(
                "tailpy_control_replica_info", "This control replica's id (always 1).", labels=["replica"]
            )
            info.add_metric([replica], 1)
            yield info


class ControlMetrics:
    """The metrics of one :class:`~tailpy.control.server.ControlServer` (see the module docstring), in
    :attr:`registry`. :meth:`attach` starts counting (the mapper's hooks, database events); :meth:`detach`
    stops. ``extra`` collectors (the embedded relay's) are registered with :meth:`add`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.registrations = Counter(
            "tailpy_control_registrations_total", "Registrations that succeeded.", registry=r
        )
        self.registration_failures = Counter(
            "tailpy_control_registration_failures_total",
            "Refused registrations, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REGISTRATION_FAILURES:
            self.registration_failures.labels(reason)
        self.stream_starts = Counter(
            "tailpy_control_map_stream_starts_total",
            "Map streams opened, by how they began (a full netmap, or a delta resuming the client's).",
            ["start"],
            registry=r,
        )
        for start in STREAM_STARTS:
            self.stream_starts.labels(start)
        self.delta_latency = Histogram(
            "tailpy_control_delta_latency_seconds",
            "Seconds from a change to its delta being written to a map stream (per stream).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_seconds = Histogram(
            "tailpy_control_db_operation_duration_seconds",
            "Seconds a database statement took, by operation.",
            ["operation"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.policy_compile = Histogram(
            "tailpy_control_policy_compile_seconds",
            "Seconds compiling the tailnet policy for every node took.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "tailpy_control_http_requests_total",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self._engine: sa.engine.Engine | None = None

    def add(self, collector: Collector) -> None:
        """Serve ``collector``'s metrics too (the embedded relay's, say)."""
        self.registry.register(collector)

    def attach(self, server: ControlServer) -> None:
        """Count ``server``'s events and read its state at scrape time (the database's statements from
        :meth:`listen_db` on)."""
        self.registry.register(_StateCollector(server))
        server.mapper.on_policy_compiled = self.policy_compile.observe
        server.mapper.on_delta_written = self.delta_latency.observe

    def listen_db(self, store: object) -> None:
        """Time the statements of ``store``'s SQLAlchemy engine (its ``engine``; none: nothing), until
        :meth:`detach`."""
        engine = getattr(store, "engine", None)
        if isinstance(engine, sa.engine.Engine) and self._engine is None:
            self._engine = engine
            sa.event.listen(engine, "before_cursor_execute", self._before)
            sa.event.listen(engine, "after_cursor_execute", self._after)

    def detach(self) -> None:
        """Stop listening to the database's events (the registry stays readable)."""
        if self._engine is not None:
            sa.event.remove(self._engine, "before_cursor_execute", self._before)
            sa.event.remove(self._engine, "after_cursor_execute", self._after)
            self._engine = None

    def _before(self, conn: sa.Connection, _cursor: Any, _statement: str, *_args: Any) -> None:
        conn.info.setdefault("tailpy_metrics_started", []).append(time.perf_counter())

    def _after(self, conn: sa.Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        started = conn.info.get("tailpy_metrics_started")
        if not started:
            return
        seconds = time.perf_counter() - started.pop()
        word = statement.lstrip()[:6].lower()
        self.db_seconds.labels(word if word in DB_OPERATIONS else "other").observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (:func:`tailpy.metrics.exposition`: no ``_created``)."""
        return text_exposition(self.registry)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware counting each request by route pattern, method and status (put it first,
        outermost, so it sees the status other middlewares made of errors)."""

        @web.middleware
        async def count(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as e:
                status = e.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_CLOSED  # (a map stream whose client left, mostly)
                raise
            finally:
                self.http_requests.labels(route_of(request), method_label(request.method), str(status)).inc()

        return count

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics`` on control's main listener: the exposition to loopback peers, else 403 with
        :data:`LOOPBACK_ONLY`; also 403 when the request carries a reverse proxy's header
        (:func:`tailpy.httpguard.came_through_proxy`: its TCP peer is the proxy, not the client)."""
        if not is_loopback(request.remote) or came_through_proxy(request.headers):
            return web.Response(status=403, text=LOOPBACK_ONLY)
        return metrics_response(self.registry)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Request methods counted under their own ``method`` label (RFC 9110 section 9, RFC 5789's PATCH)."""


def method_label(method: str) -> str:
    """The ``method`` label of a request: ``method`` when in :data:`METHODS` (case as sent: methods are
    case-sensitive, RFC 9110 section 9.1), else ``"other"``."""
    return method if method in METHODS else "other"


def route_of(request: web.Request) -> str:
    """The pattern of the route that served ``request`` (``/login/{id}``), ``unmatched`` when none did."""
    match = request.match_info
    resource = match.route.resource
    if getattr(match, "http_exception", None) is not None or resource is None:
        return "unmatched"
    return resource.canonical


__all__ = [
    "CLIENT_CLOSED",
    "DB_OPERATIONS",
    "LOOPBACK_ONLY",
    "METHODS",
    "METRICS_PATH",
    "REGISTRATION_FAILURES",
    "ControlMetrics",
    "failure_reason",
    "is_loopback",
    "method_label",
    "route_of",
]
