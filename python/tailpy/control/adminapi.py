"""The HTTP admin API: REST endpoints under ``/api/v1/`` on control's main listener, each one an
:class:`~tailpy.control.admin.Admin` operation (the same validation, the same change publication to nodes
as the admin socket and `tailpy control`), described by an OpenAPI 3.1 document at
``GET /api/v1/openapi.json``.

Every endpoint but the document needs an admin API key (:mod:`tailpy.control.apikeys`) as
``Authorization: Bearer tpyapi-…`` (RFC 6750 §2.1); without one, or with an unknown, expired or malformed
one, the answer is ``401 {"error": sentence}`` with ``WWW-Authenticate: Bearer realm="tailpy"`` (and
``error="invalid_token"`` for a key that is not valid, RFC 6750 §3). Bad input is a 4xx with
``{"error": sentence}``, never a 500: a body that is not a JSON object, a field of the wrong type or an
unknown field (checked against the endpoint's schema in :data:`ROUTES` before the operation runs) is 400;
an operation's refusal (:class:`~tailpy.errors.ConfigError`) is 400, or 404 when a path names something
that does not exist; a refused policy is 400 with ``errors`` (every problem, ``FILE:LINE:COLUMN:
message``) and ``details`` (``[{line, column, message}]``, line and column null when unknown); a full disk
is 507, a database that does not answer (a lost connection, a lock wait that timed out) 503.

Changes made through the API are recorded as made by ``apikey:<prefix>`` (the ``set_by`` of a policy, the
``created_by`` of an API key).

:data:`ROUTES` is the single table of endpoints: the server, the OpenAPI document and the remote admin client
(:func:`tailpy.control.apiclient.call`, `tailpy control … --control-url`) all read it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from tailpy.control import acl, apikeys
from tailpy.control.admin import MAX_BODY, MAX_EXPIRATION, Admin
from tailpy.control.store.database import db_error
from tailpy.errors import ConfigError, ControlError, InvalidKeyError, ParseError, StorageError

log = logging.getLogger("tailpy.control.adminapi")

PREFIX = "/api/v1"
OPENAPI_PATH = PREFIX + "/openapi.json"
REALM = 'Bearer realm="tailpy"'
MAX_INT = 2**63 - 1
"""Largest integer a request may carry (a database integer); a larger one is refused with 400."""

Schema = dict[str, Any]

# --- schemas (JSON Schema 2020-12, as OpenAPI 3.1 takes them) -----------------------------------------------

STR: Schema = {"type": "string"}
NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 255}
BOOL: Schema = {"type": "boolean"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
TIME: Schema = {"type": ["number", "null"], "description": "unix seconds (null: never / not yet)"}
STRS: Schema = {"type": "array", "items": STR}


def _obj(props: Mapping[str, Schema], required: Sequence[str] = (), *, closed: bool = False) -> Schema:
    s: Schema = {"type": "object", "properties": dict(props), "required": list(required)}
    if closed:
        s["additionalProperties"] = False
    return s


def _list(item: Schema) -> Schema:
    return {"type": "array", "items": item}


ERROR = _obj(
    {
        "error": STR,
        "errors": STRS,
        "details": _list(
            _obj(
                {
                    "line": {"type": ["integer", "null"]},
                    "column": {"type": ["integer", "null"]},
                    "message": STR,
                },
                ["line", "column", "message"],
            )
        ),
    },
    ["error"],
)
EMPTY = _obj({})
USER = _obj({"id": INT, "name": STR, "created": NUM}, ["id", "name", "created"])
NODE = _obj(
    {
        "id": INT,
        "name": STR,
        "hostname": STR,
        "fqdn": STR,
        "node_key": STR,
        "machine_key": STR,
        "addresses": STRS,
        "endpoints": STRS,
        "online": BOOL,
        "last_seen": TIME,
        "user": STR,
        "tags": STRS,
        "os": STR,
        "key_expiry": TIME,
        "expired": BOOL,
        "home_derp": INT,
        "routable_ips": STRS,
        "approved_routes": STRS,
    },
    ["id", "name", "hostname", "fqdn", "node_key", "machine_key", "addresses", "online", "user", "tags"],
)
PENDING = _obj(
    {
        "id": INT,
        "machine_key": STR,
        "node_key": STR,
        "hostname": STR,
        "os": STR,
        "user": STR,
        "email": STR,
        "key_expiry": TIME,
        "created": NUM,
    },
    ["id", "machine_key", "node_key", "hostname", "user", "created"],
)
AUTH_KEY = _obj(
    {
        "id": INT,
        "key": {"type": "string", "description": "the whole key when created, else its prefix and '…'"},
        "user": STR,
        "tags": STRS,
        "reusable": BOOL,
        "ephemeral": BOOL,
        "used": BOOL,
        "uses": INT,
        "last_used": TIME,
        "expires": TIME,
        "created": NUM,
    },
    ["id", "key", "user", "tags", "reusable", "ephemeral", "used", "expires", "created"],
)
API_KEY = _obj(
    {
        "id": INT,
        "prefix": STR,
        "key": {
            "type": "string",
            "description": "the whole tpyapi-… key: only in the answer to its creation",
        },
        "description": STR,
        "created_by": STR,
        "created_at": NUM,
        "expires_at": TIME,
        "last_used": TIME,
        "expired": BOOL,
    },
    ["id", "prefix", "description", "created_by", "created_at", "expires_at", "last_used", "expired"],
)
NOTES = {"not_enforced": STRS, "warnings": STRS}
POLICY = _obj(
    {
        "policy": {"type": ["string", "null"], "description": "the running policy's HuJSON text"},
        "source": {"type": "string", "enum": ["database", "file"]},
        "path": STR,
        "id": INT,
        "set_by": STR,
        "set_at": TIME,
        "message": STR,
        "refused": _obj({"at": NUM, "error": STR}),
        **NOTES,
    },
    ["policy", "source", "id", "set_by", "set_at", "not_enforced", "warnings"],
)
POLICY_CHECK = _obj(NOTES, ["not_enforced", "warnings"])
POLICY_TEST = _obj(
    {
        "tests": INT,
        "results": _list(
            _obj(
                {"test": STR, "src": STR, "at": STR, "ok": BOOL, "failures": STRS},
                ["test", "src", "at", "ok", "failures"],
            )
        ),
        "failures": STRS,
    },
    ["tests", "results", "failures"],
)
POLICY_RECORD = _obj(
    {"id": INT, "text": STR, "set_by": STR, "set_at": NUM}, ["id", "text", "set_by", "set_at"]
)
FILTER = _obj(
    {"node": _obj({"id": INT, "name": STR}, ["id", "name"]), "rules": _list({"type": "object"})},
    ["node", "rules"],
)
ROUTE_STATES = ["primary", "standby", "offline", "awaiting approval", "not advertised", "exit node"]
ROUTER_PROPS: dict[str, Schema] = {
    "id": INT,
    "name": STR,
    "fqdn": STR,
    "online": BOOL,
    "advertised": STRS,
    "approved": STRS,
    "primary": STRS,
    "exit_node": {"type": "string", "enum": ["approved", "awaiting approval", ""]},
    "routes": _list(
        _obj({"prefix": STR, "state": {"type": "string", "enum": ROUTE_STATES}}, ["prefix", "state"])
    ),
}
ROUTER = _obj(ROUTER_PROPS, list(ROUTER_PROPS))
APPROVED = _obj(
    {**ROUTER_PROPS, "not_advertised": STRS, "exit_route_missing": STRS},
    [*ROUTER_PROPS, "not_advertised", "exit_route_missing"],
)
UNAPPROVED = _obj({**ROUTER_PROPS, "not_approved": STRS}, [*ROUTER_PROPS, "not_approved"])
RECORD = _obj(
    {"name": NAME, "type": {"type": "string", "enum": ["A", "AAAA"]}, "value": NAME},
    ["name", "type", "value"],
    closed=True,
)
DNS_PROPS: dict[str, Schema] = {
    "domain": STR,
    "magic_dns": BOOL,
    "nameservers": STRS,
    "routes": {
        "type": "object",
        "additionalProperties": STRS,
        "description": "split DNS: domain -> resolvers",
    },
    "search_domains": STRS,
    "extra_records": _list(RECORD),
}
DNS = _obj(DNS_PROPS, list(DNS_PROPS))
SETTINGS = _obj(
    {"domain": STR, "prefix_v4": STR, "prefix_v6": STR, "database": STR},
    ["domain", "prefix_v4", "prefix_v6", "database"],
)

ROUTE_LIST: Schema = {"type": "array", "items": STR, "maxItems": 256, "description": "CIDR prefixes"}
POLICY_TEXT = {
    "text": {"type": "string", "description": "the policy's HuJSON text"},
    "file": {**NAME, "description": "how messages name the policy (default: policy)"},
}
EXPIRATION: Schema = {
    "type": ["number", "null"],
    "exclusiveMinimum": 0,
    "maximum": MAX_EXPIRATION,
    "description": "lifetime in seconds (null: never expires)",
}
NODE_REF: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "description": "node id, name or FQDN",
}


@dataclass(frozen=True)
class Route:
    """One endpoint: ``method`` and ``path`` (under :data:`PREFIX`, ``{name}`` segments), the admin ``op``
    it runs; ``params``: (path parameter, admin argument, schema); ``query``: (query parameter, admin
    argument, schema); ``body``: the JSON object's schema (None: no body is read); ``defaults``: admin
    arguments when the body leaves them out; ``by``: the operation records who made it (``by`` is set to
    the API key); ``response``: the 200 answer's schema."""

    method: str
    path: str
    op: str
    summary: str
    tag: str
    response: Schema
    params: tuple[tuple[str, str, Schema], ...] = ()
    query: tuple[tuple[str, str, Schema], ...] = ()
    body: Schema | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    by: bool = False


_NODE = (("id", "id", NODE_REF),)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/users", "users.list", "List users", "users", _list(USER)),
    Route(
        "POST",
        "/users",
        "users.create",
        "Create a user",
        "users",
        USER,
        body=_obj({"name": {**NAME, "maxLength": 64}}, ["name"], closed=True),
    ),
    Route(
        "DELETE",
        "/users/{name}",
        "users.delete",
        "Delete a user and its auth keys (refused while it owns nodes)",
        "users",
        EMPTY,
        params=(("name", "name", NAME),),
    ),
    Route("GET", "/nodes", "nodes.list", "List nodes", "nodes", _list(NODE)),
    Route("GET", "/nodes/{id}", "nodes.show", "Show a node", "nodes", NODE, params=_NODE),
    Route("DELETE", "/nodes/{id}", "nodes.delete", "Delete a node", "nodes", EMPTY, params=_NODE),
    Route(
        "POST",
        "/nodes/{id}/rename",
        "nodes.rename",
        "Rename a node (its DNS name)",
        "nodes",
        NODE,
        params=_NODE,
        body=_obj({"name": NAME}, ["name"], closed=True),
    ),
    Route(
        "POST", "/nodes/{id}/expire", "nodes.expire", "Expire a node's key now", "nodes", NODE, params=_NODE
    ),
    Route(
        "POST",
        "/nodes/{id}/expiry",
        "nodes.expiry",
        "Disable or enable a node's key expiry",
        "nodes",
        NODE,
        params=_NODE,
        body=_obj({"disabled": BOOL}, ["disabled"], closed=True),
    ),
    Route(
        "POST",
        "/nodes/{id}/tags",
        "nodes.tag",
        "Set a node's tags (an admin override; [] makes it its user's again)",
        "nodes",
        NODE,
        params=_NODE,
        body=_obj({"tags": {**STRS, "maxItems": 64}}, ["tags"], closed=True),
    ),
    Route(
        "GET",
        "/nodes/{id}/filter",
        "policy.filter",
        "The packet filter the node gets (tailcfg.FilterRule JSON)",
        "policy",
        FILTER,
        params=(("id", "node", NODE_REF),),
    ),
    Route(
        "POST",
        "/nodes/{id}/routes/approve",
        "routes.approve",
        "Approve a node's subnet routes or exit node",
        "routes",
        APPROVED,
        params=_NODE,
        body=_obj({"routes": ROUTE_LIST, "exit_node": BOOL}, closed=True),
    ),
    Route(
        "POST",
        "/nodes/{id}/routes/unapprove",
        "routes.unapprove",
        "Take back approvals of a node's routes",
        "routes",
        UNAPPROVED,
        params=_NODE,
        body=_obj({"routes": ROUTE_LIST, "exit_node": BOOL}, closed=True),
    ),
    Route(
        "GET",
        "/routes",
        "routes.list",
        "Nodes that advertise or have approved routes",
        "routes",
        _list(ROUTER),
    ),
    Route(
        "GET", "/pending", "nodes.pending", "Logins waiting for an admin's approval", "nodes", _list(PENDING)
    ),
    Route(
        "POST",
        "/pending/{id}/approve",
        "nodes.approve",
        "Approve a pending login (the machine becomes a node)",
        "nodes",
        NODE,
        params=(("id", "id", {**NAME, "description": "pending id or hostname"}),),
    ),
    Route(
        "POST",
        "/pending/{id}/reject",
        "nodes.reject",
        "Reject a pending login",
        "nodes",
        PENDING,
        params=(("id", "id", {**NAME, "description": "pending id or hostname"}),),
    ),
    Route("GET", "/authkeys", "authkey.list", "List auth keys (prefix only)", "authkeys", _list(AUTH_KEY)),
    Route(
        "POST",
        "/authkeys",
        "authkey.create",
        "Create an auth key (the whole key is in this answer only)",
        "authkeys",
        AUTH_KEY,
        body=_obj(
            {
                "user": {"type": ["string", "null"], "minLength": 1, "maxLength": 64},
                "tags": {**STRS, "maxItems": 64},
                "reusable": BOOL,
                "ephemeral": BOOL,
                "expiration": {**EXPIRATION, "default": 3600},
            },
            closed=True,
        ),
        defaults={"expiration": 3600.0},
    ),
    Route(
        "POST",
        "/authkeys/{id}/expire",
        "authkey.expire",
        "Expire an auth key now",
        "authkeys",
        AUTH_KEY,
        params=(("id", "key", {**NAME, "description": "auth key id, or the whole key"}),),
    ),
    Route("GET", "/apikeys", "apikey.list", "List admin API keys (prefix only)", "apikeys", _list(API_KEY)),
    Route(
        "POST",
        "/apikeys",
        "apikey.create",
        "Create an admin API key (the whole key is in this answer only)",
        "apikeys",
        API_KEY,
        body=_obj(
            {
                "expiration": {**EXPIRATION, "default": apikeys.DEFAULT_EXPIRATION},
                "description": {"type": "string", "maxLength": apikeys.MAX_DESCRIPTION},
            },
            closed=True,
        ),
        by=True,
    ),
    Route(
        "POST",
        "/apikeys/{id}/expire",
        "apikey.expire",
        "Expire an admin API key now",
        "apikeys",
        API_KEY,
        params=(("id", "key", {**NAME, "description": "API key id or prefix"}),),
    ),
    Route("GET", "/policy", "policy.get", "The running tailnet policy", "policy", POLICY),
    Route(
        "PUT",
        "/policy",
        "policy.set",
        "Check and store a new tailnet policy (nodes get new filters at once)",
        "policy",
        POLICY,
        body=_obj(POLICY_TEXT, ["text"], closed=True),
        by=True,
    ),
    Route(
        "POST",
        "/policy/check",
        "policy.check",
        "Check a policy as PUT /policy would, storing nothing",
        "policy",
        POLICY_CHECK,
        body=_obj(POLICY_TEXT, ["text"], closed=True),
    ),
    Route(
        "POST",
        "/policy/test",
        "policy.test",
        "Run a policy's tests against the current nodes",
        "policy",
        POLICY_TEST,
        body=_obj(POLICY_TEXT, ["text"], closed=True),
    ),
    Route(
        "GET",
        "/policy/history",
        "policy.history",
        "Stored policies, newest (the running one) first",
        "policy",
        _list(POLICY_RECORD),
        query=(("limit", "limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20}),),
    ),
    Route(
        "GET",
        "/policy/history/{id}",
        "policy.show",
        "One stored policy",
        "policy",
        POLICY_RECORD,
        params=(("id", "id", {"type": "integer", "minimum": 1, "maximum": MAX_INT}),),
    ),
    Route("GET", "/dns", "dns.show", "DNS settings", "dns", DNS),
    Route(
        "PATCH",
        "/dns",
        "dns.set",
        "Change DNS settings (each field given replaces that setting)",
        "dns",
        DNS,
        body=_obj(DNS_PROPS, closed=True),
    ),
    Route(
        "GET",
        "/settings",
        "settings.show",
        "Tailnet settings (domain, address pools, database)",
        "settings",
        SETTINGS,
    ),
)
"""Every endpoint of the admin API."""

ROUTES_BY_OP = {r.op: r for r in ROUTES}

# --- request checking ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """Answer ``status`` with ``{"error": message, **extra}`` (and ``headers``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(
            {"error": self.message, **self.extra}, status=self.status, headers=self.headers
        )


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
}
_NAMES = {"string": "text", "boolean": "true or false", "integer": "a whole number", "number": "a number"}


def _type_ok(t: str, v: Any) -> bool:
    if t == "null":
        return v is None
    if t in ("integer", "number") and isinstance(v, bool):
        return False
    return isinstance(v, _TYPES[t])


def _limit(bound: float, schema: Schema) -> str:
    """A schema's bound as people read it: a whole number without an exponent, and for a lifetime in seconds
    also in days (``315360000 seconds (3650 days)``)."""
    text = str(int(bound)) if float(bound).is_integer() else f"{bound:g}"
    if "seconds" in str(schema.get("description", "")) and bound >= 86400 and bound % 86400 == 0:
        text += f" seconds ({int(bound) // 86400} days)"
    return text


def check(schema: Schema, value: Any, where: str) -> None:
    """Check ``value`` against ``schema`` (the subset of JSON Schema :data:`ROUTES` uses: type, enum,
    min/maxLength, minimum, exclusiveMinimum, maximum, items, maxItems, properties, required,
    additionalProperties). Raises ConfigError naming ``where``."""
    types = schema.get("type")
    if types is not None:
        tl = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(t, value) for t in tl):
            want = " or ".join(
                _NAMES.get(t, "a list" if t == "array" else "an object" if t == "object" else t) for t in tl
            )
            raise ConfigError(f"{where} must be {want}")
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise ConfigError(f"{where} must not be empty")
        if len(value) > schema.get("maxLength", MAX_BODY):
            raise ConfigError(f"{where} must be at most {schema.get('maxLength', MAX_BODY)} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number")
        if isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise ConfigError(f"{where} is too large")
        if "minimum" in schema and value < schema["minimum"]:
            raise ConfigError(f"{where} must be at least {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ConfigError(f"{where} must be more than {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ConfigError(f"{where} must be at most {_limit(schema['maximum'], schema)}")
    elif isinstance(value, list):
        if len(value) > schema.get("maxItems", 1024):
            raise ConfigError(f"{where} must have at most {schema.get('maxItems', 1024)} items")
        for i, item in enumerate(value):
            check(schema.get("items", {}), item, f"{where}[{i}]")
    elif isinstance(value, dict):
        props: Mapping[str, Schema] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise ConfigError(f"{where} needs field {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, v in value.items():
            sub = f"field {name!r}" if where == "the request body" else f"{where}.{name}"
            if name in props:
                check(props[name], v, sub)
            elif extra is False:
                raise ConfigError(
                    f"unknown field {name!r}" + ("" if where == "the request body" else f" in {where}")
                )
            elif isinstance(extra, dict):
                check(extra, v, sub)


def _clean_strings(value: Any) -> None:
    """Refuse text no database column takes: NUL characters and lone surrogates. Raises ConfigError."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError("text in a request must not contain NUL characters")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigError(
                "text in a request must be valid Unicode (a lone surrogate was given)"
            ) from None
    elif isinstance(value, list):
        for v in value:
            _clean_strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _clean_strings(k)
            _clean_strings(v)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_NO_BODY = object()
"""What :func:`_read_json` returns for an empty body (JSON ``null`` is None)."""


async def _read_json(request: web.Request) -> Any:
    """The request's JSON (:data:`_NO_BODY` when the body is empty). Raises ApiError (413 too large, 400 not
    JSON)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return _NO_BODY
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise ApiError(400, "the request body is not JSON") from None


_LOCATED = re.compile(r"(\d+):(\d+): (.*)", re.DOTALL)


def located(where: str, errors: Sequence[str]) -> list[dict[str, Any]]:
    """``[{line, column, message}]`` of policy errors ``WHERE:LINE:COLUMN: message`` (:func:`acl.locate`);
    line and column None for an error without a position."""
    out: list[dict[str, Any]] = []
    for e in errors:
        rest = e[len(where) + 1 :].lstrip() if e.startswith(where + ":") else e
        m = _LOCATED.fullmatch(rest)
        if m is not None:
            out.append({"line": int(m.group(1)), "column": int(m.group(2)), "message": m.group(3)})
        else:
            out.append({"line": None, "column": None, "message": rest})
    return out


# --- the server side ----------------------------------------------------------------------------------------


class AdminApi:
    """Serves :data:`ROUTES` for ``admin`` (whose store holds the API keys). ``install`` adds the routes to an
    aiohttp application."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self._document: dict[str, Any] | None = None

    def install(self, app: web.Application) -> None:
        """Add :data:`OPENAPI_PATH` and every route of :data:`ROUTES` to ``app``."""
        app.router.add_get(OPENAPI_PATH, self._openapi)
        for route in ROUTES:
            app.router.add_route(route.method, PREFIX + route.path, self._handler(route))

    async def _openapi(self, _request: web.Request) -> web.Response:
        if self._document is None:
            self._document = openapi_document()
        return web.json_response(self._document)

    def authenticate(self, request: web.Request) -> apikeys.ApiKeyInfo:
        """The API key of ``request``'s ``Authorization: Bearer`` header. Raises ApiError 401."""
        header = request.headers.get("Authorization", "")
        if not header.strip():
            raise ApiError(
                401,
                "this request needs an admin API key: send Authorization: Bearer tpyapi-… (create one with "
                "`tailpy control apikey create`)",
                headers={"WWW-Authenticate": REALM},
            )
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "the Authorization header must be 'Bearer tpyapi-…'",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'},
            )
        info = apikeys.check_api_key(self.admin.store, token.strip(), now=self.admin.clock())
        if info is None:
            raise ApiError(
                401,
                "the admin API key is not valid (unknown, expired or malformed); see `tailpy control apikey "
                "list` on the control host",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        return info

    def _handler(self, route: Route) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                info = self.authenticate(request)
                args = await self._args(request, route)
                if route.by:
                    args["by"] = f"apikey:{info.prefix}"
                return web.json_response(await self._run(route, args))
            except ApiError as e:
                return e.response()
            except SQLAlchemyError as e:  # (a lost connection, a lock wait that timed out: may work again)
                known = db_error(e, self.admin.store.where)
                if isinstance(known, StorageError):
                    return ApiError(507, str(known)).response()
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("%s %s: the database did not answer: %s", request.method, request.path, why)
                return ApiError(503, "the control database did not answer: try again").response()

        return handle

    async def _args(self, request: web.Request, route: Route) -> dict[str, Any]:
        """The admin arguments of ``request``: path parameters, query parameters and the body's fields, each
        checked against ``route``'s schema. Raises ApiError 400."""
        args: dict[str, Any] = dict(route.defaults)
        try:
            if route.body is not None:
                body = await _read_json(request)
                if body is _NO_BODY:
                    body = {}
                _clean_strings(body)
                check(route.body, body, "the request body")
                args.update(body)
            for name, arg, schema in route.query:
                raw = request.query.get(name)
                if raw is None:
                    continue
                _clean_strings(raw)
                args[arg] = _scalar(schema, raw, f"query parameter {name!r}")
            for name, arg, schema in route.params:
                raw = request.match_info[name]
                _clean_strings(raw)
                args[arg] = _scalar(schema, raw, f"path parameter {name!r}")
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return args

    async def _run(self, route: Route, args: dict[str, Any]) -> Any:
        try:
            return await self.admin.run_async(route.op, args)
        except StorageError as e:
            raise ApiError(507, str(e)) from None
        except acl.PolicyRefused as e:
            where = args.get("file") if isinstance(args.get("file"), str) and args.get("file") else "policy"
            raise ApiError(
                400, str(e), extra={"errors": list(e.errors), "details": located(str(where), e.errors)}
            ) from None
        except (ConfigError, ControlError, ParseError, InvalidKeyError) as e:
            status = 404 if route.params and str(e).startswith("there is no ") else 400
            raise ApiError(status, str(e)) from None


def _scalar(schema: Schema, raw: str, where: str) -> Any:
    """A path or query parameter as ``schema``'s type. Raises ConfigError."""
    value: Any = raw
    if schema.get("type") == "integer":
        text = raw.strip()
        if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 20):
            raise ConfigError(f"{where} must be a whole number")
        value = int(text)
    check(schema, value, where)
    return value


# --- the document -------------------------------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("tailpy")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES` (what ``GET /api/v1/openapi.json`` answers)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    paths: dict[str, dict[str, Any]] = {
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        }
    }
    for r in ROUTES:
        op: dict[str, Any] = {
            "operationId": r.op.replace(".", "_"),
            "summary": r.summary,
            "tags": [r.tag],
            "responses": {
                "200": {"description": "done", "content": {"application/json": {"schema": r.response}}},
                "400": {"description": "bad input: the sentence says what", "content": error},
                "401": {"description": "no valid admin API key", "content": error},
            },
        }
        if r.params:
            op["responses"]["404"] = {"description": "no such thing", "content": error}
        if r.body is not None:
            op["responses"]["413"] = {"description": "the body is too large", "content": error}
            op["requestBody"] = {
                "required": bool(r.body.get("required")),
                "content": {"application/json": {"schema": r.body}},
            }
        op["responses"]["503"] = {"description": "the database did not answer (try again)", "content": error}
        op["responses"]["507"] = {"description": "the database's disk is full", "content": error}
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": schema}
            for name, _arg, schema in r.params
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, _arg, schema in r.query
        ]
        if parameters:
            op["parameters"] = parameters
        paths.setdefault(PREFIX + r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tailpy control admin API",
            "version": _version(),
            "description": "Administration of a tailpy control server. Every operation but this document "
            "needs an admin API key (`tailpy control apikey create`) as `Authorization: Bearer tpyapi-…`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin API key, tpyapi-<prefix>-<secret>",
                }
            },
            "schemas": {"Error": ERROR},
        },
        "paths": paths,
    }


__all__ = [
    "OPENAPI_PATH",
    "PREFIX",
    "ROUTES",
    "ROUTES_BY_OP",
    "AdminApi",
    "ApiError",
    "Route",
    "check",
    "located",
    "openapi_document",
]
