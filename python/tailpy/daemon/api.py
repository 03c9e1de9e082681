"""tailpyd's local API: HTTP over a unix socket (mode 0600), for the CLI.

Routes (JSON): ``GET /localapi/v0/status``, ``POST /localapi/v0/up`` ({login_server, auth_key, hostname,
force_reauth, accept_dns?, advertise_tags?: ["tag:a", ...], and the route preferences below}),
``POST /localapi/v0/set`` (any of {hostname, accept_dns, advertise_tags, advertise_routes: ["CIDR", ...],
advertise_exit_node, accept_routes, exit_node: name or tailnet IP ("" none), exit_node_allow_lan_access,
snat_subnet_routes}: only those given change, on the running node, without a new login) -> the status,
``POST /localapi/v0/down``, ``POST /localapi/v0/logout``,
``GET /localapi/v0/whois?addr=IP``, ``POST /localapi/v0/ping`` ({target: peer name or tailnet IP, timeout:
seconds}) -> one disco ping's answer (:meth:`Backend.ping`), ``POST /localapi/v0/netcheck`` ({timeout}) -> a
netcheck report made over the data plane's own socket (:meth:`Backend.netcheck`); ``GET /metrics`` (also
``GET /localapi/v0/metrics``) -> the node's Prometheus metrics, text format (:mod:`tailpy.daemon.metrics`).
Errors: ``{"error": "<one sentence>"}`` with status 400 (bad request), 401 (auth key refused), 403 (a
requested tag refused by control's policy), 404 (no such node), 502 (control unreachable or refused), 507
(the state file cannot be written: disk full, read-only), 500 (anything else, logged with its traceback:
:func:`tailpy.httperrors.json_errors`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from tailpy.daemon.backend import PREF_KEYS, Backend
from tailpy.daemon.metrics import node_registry
from tailpy.daemon.netfilter import MODES
from tailpy.errors import AuthKeyError, ConfigError, ControlError, StorageError, TagError, TailpyError
from tailpy.httperrors import json_errors
from tailpy.metrics import METRICS_PATH, metrics_response

PREFIX = "/localapi/v0"


def _tags(obj: object) -> list[str] | None:
    """The ``advertise_tags`` of an ``up`` request: None (keep the last ones) or a list of strings. Raises
    ConfigError."""
    if obj is None:
        return None
    if not isinstance(obj, list) or not all(isinstance(t, str) for t in obj):
        raise ConfigError('advertise_tags must be a list of tags like ["tag:server"]')
    return obj


def _routes(body: dict[str, Any]) -> dict[str, Any]:
    """The route preferences given in a request body (:data:`tailpy.daemon.backend.PREF_KEYS`)."""
    return {k: body[k] for k in PREF_KEYS if body.get(k) is not None}


def _opt_bool(body: dict[str, Any], key: str) -> bool | None:
    v = body.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise ConfigError(f"{key} must be true or false")


def _error(status: int, e: BaseException) -> web.Response:
    return web.json_response({"error": str(e)}, status=status)


_Statuses = tuple[tuple[type[TailpyError], int], ...]

_SET_STATUS: _Statuses = (
    (TagError, 403),
    (ConfigError, 400),
    (ControlError, 502),
    (StorageError, 507),
)
"""The status of a failed ``set`` by the error's class, the first that matches (TagError is a
ControlError); another TailpyError is left to :func:`tailpy.httperrors.json_errors`."""

_UP_STATUS: _Statuses = ((AuthKeyError, 401), *_SET_STATUS, (TailpyError, 500))
"""The same for ``up``, where a refused auth key (a ControlError too) is 401, anything else 500."""


async def _change(
    backend: Backend, change: Callable[[], Awaitable[None]], statuses: _Statuses
) -> web.Response:
    """Run ``change`` (an ``up`` or ``set`` of ``backend``, with the request's preferences); the status
    after it, or the error with the status of the first of ``statuses`` whose class it is."""
    try:
        await change()
    except TailpyError as e:
        for cls, status in statuses:
            if isinstance(e, cls):
                return _error(status, e)
        raise
    return web.json_response(backend.status().to_json())


def make_app(
    backend: Backend, on_down: Callable[[], None] | None = None, registry: CollectorRegistry | None = None
) -> web.Application:
    """The aiohttp application serving ``backend``. ``on_down`` runs after a successful ``down``;
    ``registry``: the metrics served (None: :func:`tailpy.daemon.metrics.node_registry` of ``backend``)."""
    routes = web.RouteTableDef()
    metrics = registry if registry is not None else node_registry(backend.status)

    @routes.get(METRICS_PATH)
    @routes.get(PREFIX + METRICS_PATH)
    async def get_metrics(request: web.Request) -> web.Response:
        return metrics_response(metrics)

    @routes.get(PREFIX + "/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(backend.status().to_json())

    @routes.post(PREFIX + "/up")
    async def up(request: web.Request) -> web.Response:
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return _error(400, ConfigError("request body is not JSON"))
        mode = body.get("netfilter_mode")
        if mode is not None:
            if mode not in MODES:
                return _error(400, ConfigError(f"netfilter_mode must be one of {', '.join(MODES)}"))
            backend.set_netfilter_mode(str(mode))
        return await _change(
            backend,
            lambda: backend.up(
                str(body.get("login_server", "")),
                body.get("auth_key"),
                body.get("hostname"),
                force_reauth=bool(body.get("force_reauth", False)),
                accept_dns=None if body.get("accept_dns") is None else bool(body["accept_dns"]),
                advertise_tags=_tags(body.get("advertise_tags")),
                routes=_routes(body),
            ),
            _UP_STATUS,
        )

    @routes.post(PREFIX + "/set")
    async def set_prefs(request: web.Request) -> web.Response:
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return _error(400, ConfigError("request body is not JSON"))
        if not isinstance(body, dict):
            return _error(400, ConfigError("request body must be a JSON object of preferences"))
        known = {"hostname", "accept_dns", "advertise_tags", *PREF_KEYS}
        unknown = sorted(set(body) - known)
        if unknown:
            return _error(400, ConfigError(f"unknown preference {unknown[0]!r}"))
        hostname = body.get("hostname")
        if hostname is not None and not isinstance(hostname, str):
            return _error(400, ConfigError("hostname must be a string"))
        return await _change(
            backend,
            lambda: backend.set_prefs(
                routes=_routes(body),
                hostname=hostname,
                accept_dns=_opt_bool(body, "accept_dns"),
                advertise_tags=_tags(body.get("advertise_tags")),
            ),
            _SET_STATUS,
        )

    @routes.get(PREFIX + "/whois")
    async def whois(request: web.Request) -> web.Response:
        addr = request.query.get("addr", "")
        try:
            node = backend.whois(addr)
        except ConfigError as e:
            return _error(400, e)
        if node is None:
            return _error(404, ConfigError(f"no node in this tailnet has address {addr}"))
        return web.json_response(node.to_json())

    @routes.post(PREFIX + "/ping")
    async def ping(request: web.Request) -> web.Response:
        try:
            body: dict[str, Any] = await request.json()
            target = str(body.get("target", ""))
            timeout = float(body.get("timeout", 5.0))
        except (ValueError, TypeError):
            return _error(400, ConfigError("ping needs a JSON body {target, timeout}"))
        if not 0 < timeout <= 60:
            return _error(400, ConfigError("ping timeout must be between 0 and 60 seconds"))
        try:
            return web.json_response((await backend.ping(target, timeout)).to_json())
        except ConfigError as e:
            return _error(404, e)
        except TailpyError as e:
            return _error(500, e)

    @routes.post(PREFIX + "/netcheck")
    async def netcheck(request: web.Request) -> web.Response:
        try:
            body: dict[str, Any] = await request.json()
            timeout = float(body.get("timeout", 5.0))
        except (ValueError, TypeError):
            return _error(400, ConfigError("netcheck needs a JSON body {timeout}"))
        try:
            return web.json_response(await backend.netcheck(min(max(timeout, 0.1), 60.0)))
        except ConfigError as e:
            return _error(400, e)
        except TailpyError as e:
            return _error(500, e)

    @routes.post(PREFIX + "/logout")
    async def logout(request: web.Request) -> web.Response:
        try:
            await backend.logout()
        except ControlError as e:
            return _error(502, e)
        return web.json_response(backend.status().to_json())

    @routes.post(PREFIX + "/down")
    async def down(request: web.Request) -> web.Response:
        await backend.down()
        if on_down is not None:
            asyncio.get_running_loop().call_soon(on_down)
        return web.json_response(backend.status().to_json())

    app = web.Application(middlewares=[json_errors])
    app.add_routes(routes)
    return app


def socket_listener(socket_path: str) -> str | None:
    """Who accepts connections on unix socket ``socket_path`` ("pid 4242", or "pid unknown"), None when
    nothing does (a stale file, or not a socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(socket_path)
        except TimeoutError:
            return "not accepting"  # bound and listening, its backlog full
        except OSError:
            return None
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return "pid unknown"
        return f"pid {pid}"


async def serve(app: web.Application, socket_path: str) -> web.AppRunner:
    """Start serving ``app`` on unix socket ``socket_path``. A stale socket file (nothing accepts on it) is
    replaced; one another process answers on is left alone: raises ConfigError (as Tailscale's
    ``safesocket`` does before it removes a socket path)."""
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), mode=0o755, exist_ok=True)
    if os.path.exists(socket_path):
        who = socket_listener(socket_path)
        if who is not None:
            raise ConfigError(
                f"another tailpyd is listening on {socket_path} ({who}): stop it or give this one "
                "another --socket"
            )
        os.unlink(socket_path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.UnixSite(runner, socket_path)
    await site.start()
    os.chmod(socket_path, 0o600)
    return runner
