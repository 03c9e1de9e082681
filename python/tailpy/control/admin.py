"""Administration of the control server: users, nodes, auth keys and settings.

Admin access is never given to nodes. It goes either

* through ``<state_dir>/admin.sock`` (mode 0600, so only the server's owner and root), which
  ``tailpy control serve`` listens on: HTTP ``POST /admin/<op>`` with a JSON object of arguments, answered
  ``200 {"result": ...}`` or ``400 {"error": sentence}``; the running server applies the change and tells
  the nodes concerned at once (``publish_node`` / ``publish_removed``); or
* straight to the database when no server answers on that socket (the server is stopped, or runs elsewhere
  on a shared PostgreSQL database: it then notices within its poll interval, 5 s).

Both paths run the same :class:`Admin` operations, so every command behaves the same either way.
Operations (``op``: arguments -> result, all JSON):

* ``users.create`` {name} -> User; ``users.list`` {} -> [User]; ``users.delete`` {name} -> {}
* ``nodes.list`` {} -> [Node]; ``nodes.show`` {id} -> Node; ``nodes.rename`` {id, name} -> Node;
  ``nodes.expire`` {id} -> Node; ``nodes.expiry`` {id, disabled} -> Node; ``nodes.delete`` {id} -> {};
  ``nodes.tag`` {id, tags: ["tag:a", ...]} -> Node (an admin override: tags validated; with a policy set,
  each tag the node does not hold yet must be defined in its ``tagOwners``, as for ``authkey.create``)
* ``authkey.create`` {user?, tags?, reusable, ephemeral, expiration (seconds up to 3650 days, or null)} ->
  AuthKey (the full key: the only time it is shown, the database keeps a hash); ``authkey.list`` {} ->
  [AuthKey] (key prefix only; ``uses``, ``last_used``); ``authkey.expire`` {key (id or full key)} -> AuthKey
* ``apikey.create`` {expiration (seconds up to 3650 days, or null: never; absent: 90 days), description?,
  by?} -> ApiKey plus ``key`` (the whole ``tpyapi-…`` key: the only time it is shown); ``apikey.list`` {}
  -> [ApiKey]; ``apikey.expire`` {key (id, prefix or the whole key)} -> ApiKey (ApiKey JSON:
  :meth:`tailpy.control.apikeys.ApiKeyInfo.to_json`; keys of the HTTP admin API)
* ``settings.show`` {} -> {domain, prefix_v4, prefix_v6, database}
* the tailnet policy (:mod:`tailpy.control.acl`; ``file`` names the policy in messages, ``FILE:LINE:COLUMN:
  message``): ``policy.get`` {} -> :meth:`tailpy.control.acl.Running.to_json`; ``policy.set`` {text, file?,
  by?} -> the same, plus ``not_enforced`` and ``warnings``; ``policy.check`` {text, file?} -> {not_enforced,
  warnings} (nothing stored); ``policy.test`` {text, file?} -> {tests: count, results: [{test, src, at,
  ok, failures}], failures: [sentence]};
  ``policy.history`` {limit?} -> [{id, text, set_by, set_at}] newest first; ``policy.show`` {id} -> {id,
  text, set_by, set_at} (one stored policy; restoring it is ``policy.set`` of its text);
  ``policy.filter`` {node: id, name or FQDN} -> {node: {id, name}, rules: [tailcfg.FilterRule JSON]}
* ``dns.show`` {} and ``dns.set`` {fields to replace} -> DNS settings (see :mod:`tailpy.control.dnsconfig`)
* subnet routes and exit nodes (:mod:`tailpy.control.routes`): ``routes.list`` {} -> [Router] (the nodes
  that advertise routes or have some approved); ``routes.approve`` {id, routes?: ["198.51.100.0/24", ...],
  exit_node?: bool} -> Router plus ``not_advertised`` (approved routes the node does not advertise: kept
  for when it does) and ``exit_route_missing`` (an exit route was given but the other one is not approved:
  an exit node needs both); ``routes.unapprove`` {id, routes?, exit_node?} -> Router plus ``not_approved``
  (given routes that were not approved); ConfigError when none of them was. Router JSON: ``{id, name,
  fqdn, online, advertised, approved, primary, exit_node: "approved" | "awaiting approval" | "", routes:
  [{prefix, state}]}``, ``state`` one of ``primary``, ``standby`` (approved, online, another router is
  primary), ``offline`` (approved, its node offline or expired), ``awaiting approval``, ``not advertised``
  (approved ahead), ``exit node``.

Node JSON is :meth:`tailpy.netmap.Node.to_json` plus ``fqdn``.

On the socket, the operations that check a policy (``policy.set``, ``policy.check``, ``policy.test``) run
the check in a worker thread (:meth:`Admin.run_async`), so that control keeps answering nodes and
``/health`` meanwhile; a refused policy answers ``400 {"error", "errors": [sentence, ...]}``. The socket
takes bodies up to :data:`MAX_BODY` (a policy of :data:`~tailpy.control.store.policy.MAX_POLICY_BYTES`
fits whatever JSON escaping does to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from tailpy.control import acl, apikeys, dnsconfig
from tailpy.control.policy import Policy, PolicyError, PolicyNode, check_tests, compile_filter
from tailpy.control.routes import node_served
from tailpy.control.store import DEFAULT_KEY_LIFETIME, Store
from tailpy.control.store.database import db_error
from tailpy.control.store.nodes import sort_routes
from tailpy.control.store.policy import MAX_POLICY_BYTES
from tailpy.control.tags import ADMIN, check_tags
from tailpy.errors import ConfigError, ControlError, StorageError
from tailpy.httperrors import make_json_errors
from tailpy.netmap import Node
from tailpy.packetfilter import filter_to_json
from tailpy.routes import EXIT_ROUTES, has_exit_routes, is_exit_route, parse_routes

if TYPE_CHECKING:
    from tailpy.control.server import ControlServer

SOCKET_NAME = "admin.sock"
MAX_EXPIRATION = 3650 * 86400.0
"""Longest auth key lifetime, seconds (10 years; `tailpy control` parses durations up to the same)."""
MAX_BODY = 6 * MAX_POLICY_BYTES + 65536
"""Largest admin request body, bytes: a policy text at its limit, each byte escaped as JSON's worst case
(``\u0000``, six bytes), and the other arguments."""


MAX_ID = 2**63 - 1
"""Largest id the database holds (a signed 64-bit integer)."""


def _ref(args: Mapping[str, Any], name: str) -> str | int:
    """A node given by id (a number) or by name (or FQDN), as the admin typed it."""
    v = args.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
        raise ConfigError(f"{name} must be a node id or name; see `tailpy control nodes list`")
    digits = v.strip() if isinstance(v, str) else None
    if (isinstance(v, int) and not 0 <= v <= MAX_ID) or (
        digits is not None
        and digits.isdigit()
        and not (digits.isascii() and len(digits) <= 19 and int(digits) <= MAX_ID)
    ):  # (a database integer has 63 bits; "²" is a digit to str.isdigit but not to int())
        raise ConfigError(f"{name} {v} is not an id; see `tailpy control nodes list`")
    return v


def _str(args: Mapping[str, Any], name: str) -> str:
    v = args.get(name)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{name} must be a non-empty string")
    return v


class Admin:
    """The admin operations on ``store``. With ``server`` (the running ControlServer), changes are published
    to nodes at once and ``online`` is the server's knowledge; without, nodes show offline.
    ``clock`` gives unix seconds; ``key_lifetime`` is the node key lifetime (seconds) used when expiry is
    enabled again for a node."""

    def __init__(
        self,
        store: Store,
        *,
        server: ControlServer | None = None,
        clock: Callable[[], float] = time.time,
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
    ) -> None:
        self.store = store
        self.server = server
        self.clock = clock
        self.key_lifetime = key_lifetime

    def run(self, op: str, args: Mapping[str, Any]) -> Any:
        """Run operation ``op`` (see the module docstring) and return its JSON-able result. Raises
        ConfigError with a sentence for a user mistake (unknown op, node or user, taken name)."""
        fn = getattr(self, "op_" + op.replace(".", "_"), None)
        if fn is None or "." not in op:
            raise ConfigError(f"unknown admin operation {op!r}")
        return fn(args)

    async def run_async(self, op: str, args: Mapping[str, Any]) -> Any:
        """:meth:`run`, with the policy checks of ``policy.set``, ``policy.check`` and ``policy.test`` in a
        worker thread (the nodes are read here, the accepted policy stored and run back here: call it on
        the event loop that owns :attr:`server`)."""
        if op == "policy.set":
            text, where = self._text(args)
            by = args.get("by")
            by = by if isinstance(by, str) and by else "admin"
            running = await self._keeper().set_async(text, by, where)
            return {**running.to_json(), **self._notes(running.policy)}
        if op == "policy.check":
            text, where = self._text(args)
            return await asyncio.to_thread(_check_result, text, where, self._policy_nodes())
        if op == "policy.test":
            text, where = self._text(args)
            return await asyncio.to_thread(_test_result, text, where, self._policy_nodes())
        return self.run(op, args)

    def _published(self, node_id: int) -> None:
        if self.server is not None:
            self.server.admin_changed(node_id)

    def _removed(self, node_id: int) -> None:
        if self.server is not None:
            self.server.admin_removed(node_id)

    def _node_json(self, node: Node) -> dict[str, Any]:
        online = self.server is not None and self.server.replicas.online(node.id)
        domain = self.store.settings().domain
        return {**node.to_json(), "online": online, "fqdn": node.fqdn(domain)}

    # --- users ---

    def _users_changed(self) -> None:
        if self.server is not None:
            self.server.users_changed()

    def op_users_create(self, args: Mapping[str, Any]) -> Any:
        user = self.store.create_user(_str(args, "name"), self.clock())
        self._users_changed()
        return user.to_json()

    def op_users_list(self, _args: Mapping[str, Any]) -> Any:
        return [u.to_json() for u in self.store.list_users()]

    def op_users_delete(self, args: Mapping[str, Any]) -> Any:
        self.store.delete_user(_str(args, "name"))
        self._users_changed()
        return {}

    # --- nodes ---

    def _node_id(self, args: Mapping[str, Any]) -> int:
        return self.store.find_node(_ref(args, "id"))

    def _pending_id(self, args: Mapping[str, Any]) -> int:
        """A pending login by its id, or by its machine's hostname when one pending login has it."""
        ref = _ref(args, "id")
        if isinstance(ref, int) or ref.strip().isdigit():
            return int(ref)
        matches = [p.id for p in self.store.list_pending() if p.hostname.lower() == ref.strip().lower()]
        if not matches:  # (worded like an unknown id: the admin API answers 404 for both)
            raise ConfigError(
                f"there is no pending login with id or hostname {ref!r} (see `tailpy control nodes pending`)"
            )
        if len(matches) > 1:
            raise ConfigError(
                f"{len(matches)} pending logins have hostname {ref!r}: give its id "
                "(see `tailpy control nodes pending`)"
            )
        return matches[0]

    def op_nodes_list(self, _args: Mapping[str, Any]) -> Any:
        return [self._node_json(n) for n in self.store.list_nodes(self.clock())]

    def op_nodes_show(self, args: Mapping[str, Any]) -> Any:
        return self._node_json(self.store.get_node(self._node_id(args), self.clock()))

    def op_nodes_rename(self, args: Mapping[str, Any]) -> Any:
        node = self.store.rename_node(self._node_id(args), _str(args, "name"))
        self._published(node.id)
        return self._node_json(node)

    def op_nodes_expire(self, args: Mapping[str, Any]) -> Any:
        node = self.store.expire_node(self._node_id(args), self.clock())
        self._published(node.id)
        return self._node_json(node)

    def op_nodes_expiry(self, args: Mapping[str, Any]) -> Any:
        lifetime = self.key_lifetime if self.key_lifetime is not None else DEFAULT_KEY_LIFETIME
        node = self.store.set_key_expiry(
            self._node_id(args), disabled=bool(args.get("disabled")), now=self.clock(), key_lifetime=lifetime
        )
        self._published(node.id)
        return self._node_json(node)

    def op_nodes_delete(self, args: Mapping[str, Any]) -> Any:
        node_id = self._node_id(args)
        if not self.store.delete_node(node_id, self.clock()):
            raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
        self._removed(node_id)
        return {}

    def op_nodes_tag(self, args: Mapping[str, Any]) -> Any:
        tags = args.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError("tags must be a list of strings like tag:server")
        node_id = self._node_id(args)
        policy = self._policy()
        if policy is not None and tags:  # the admin may apply any tag the policy defines (see .tags)
            held = self.store.get_node(node_id, self.clock()).tags
            tags = list(check_tags(policy, tags, [ADMIN], held))
        node = self.store.set_node_tags(node_id, tags, self.clock())
        self._published(node.id)
        return self._node_json(node)

    def op_nodes_pending(self, _args: Mapping[str, Any]) -> Any:

        return [p.to_json() for p in self.store.list_pending()]

    def op_nodes_approve(self, args: Mapping[str, Any]) -> Any:

        node = self.store.approve_pending(self._pending_id(args), self.clock())
        self._published(node.id)
        return self._node_json(node)

    def op_nodes_reject(self, args: Mapping[str, Any]) -> Any:

        return self.store.reject_pending(self._pending_id(args)).to_json()

    # --- auth keys ---

    def op_authkey_create(self, args: Mapping[str, Any]) -> Any:
        now = self.clock()
        lifetime = args.get("expiration")
        if lifetime is not None and (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, (int, float))
            or not 0 < lifetime <= MAX_EXPIRATION
        ):
            raise ConfigError(
                f"expiration must be a positive number of seconds up to {MAX_EXPIRATION:.0f} (3650 days), "
                "or null (never)"
            )
        tags = args.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ConfigError("tags must be a list of strings like tag:server")
        if tags:
            # the admin creates the key: may apply any tag the policy defines (tailpy.control.tags)
            tags = list(check_tags(self._policy(), tags, [ADMIN]))
        user = args.get("user")
        key = self.store.create_auth_key(
            reusable=bool(args.get("reusable")),
            ephemeral=bool(args.get("ephemeral")),
            expires=None if lifetime is None else now + float(lifetime),
            now=now,
            user=None if user is None else str(user),
            tags=tags,
        )
        return key.to_json(full_key=True)

    def op_authkey_list(self, _args: Mapping[str, Any]) -> Any:
        return [k.to_json() for k in self.store.list_auth_keys()]

    def op_authkey_expire(self, args: Mapping[str, Any]) -> Any:
        return self.store.expire_auth_key(_str(args, "key"), self.clock()).to_json()

    # --- admin API keys ---

    def op_apikey_create(self, args: Mapping[str, Any]) -> Any:
        now = self.clock()
        description = args.get("description") or ""
        by = args.get("by") or ""
        if not isinstance(by, str):
            raise ConfigError("by must be text")
        info, key = apikeys.create_api_key(
            self.store,
            expiration_seconds=args.get("expiration", apikeys.DEFAULT_EXPIRATION),
            description=description,
            created_by=by,
            now=now,
        )
        return {**info.to_json(now), "key": key}

    def op_apikey_list(self, _args: Mapping[str, Any]) -> Any:
        now = self.clock()
        return [k.to_json(now) for k in apikeys.list_api_keys(self.store)]

    def op_apikey_expire(self, args: Mapping[str, Any]) -> Any:
        ref = args.get("key")
        if isinstance(ref, bool) or not isinstance(ref, (int, str)) or ref == "":
            raise ConfigError("key must be an API key's id or prefix; see `tailpy control apikey list`")
        now = self.clock()
        return apikeys.expire_api_key(self.store, ref, now=now).to_json(now)

    # --- DNS ---

    def op_dns_show(self, _args: Mapping[str, Any]) -> Any:
        return dnsconfig.show(self.store)

    def op_dns_set(self, args: Mapping[str, Any]) -> Any:
        out, _ = dnsconfig.update(self.store, args)
        if self.server is not None:
            self.server.dns_changed()
        return out

    # --- the tailnet policy ---

    def _keeper(self) -> acl.PolicyKeeper:
        if self.server is not None:
            return self.server.policy
        keeper = acl.PolicyKeeper(
            self.store, path=None, on_change=lambda _p: None, nodes=self._policy_nodes, clock=self.clock
        )
        keeper.running = acl.stored(self.store)
        return keeper

    def _policy(self) -> Policy | None:
        return self._keeper().policy

    def _policy_nodes(self) -> list[Any]:
        if self.server is not None:
            return self.server.policy_nodes()
        return acl.policy_nodes(self.store.list_nodes(self.clock()), self.store.user_emails())

    @staticmethod
    def _text(args: Mapping[str, Any]) -> tuple[str, str]:
        text = args.get("text")
        if not isinstance(text, str):
            raise ConfigError("text must be the policy's HuJSON text")
        where = args.get("file")
        return text, where if isinstance(where, str) and where else "policy"

    @staticmethod
    def _notes(policy: Policy | None) -> dict[str, Any]:
        return policy_notes(policy)

    def op_policy_get(self, _args: Mapping[str, Any]) -> Any:
        keeper = self._keeper()
        running = keeper.running
        out = {**running.to_json(), **self._notes(running.policy)}
        if keeper.refused is not None:
            out["refused"] = keeper.refused.to_json()
        return out

    def op_policy_set(self, args: Mapping[str, Any]) -> Any:
        text, where = self._text(args)
        by = args.get("by")
        running = self._keeper().set(text, by if isinstance(by, str) and by else "admin", where)
        return {**running.to_json(), **self._notes(running.policy)}

    def op_policy_history(self, args: Mapping[str, Any]) -> Any:
        limit = args.get("limit", 20)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 1000:
            raise ConfigError("limit must be a number of policies from 1 to 1000")
        return [r.to_json() for r in self.store.policy_history(limit)]

    def op_policy_show(self, args: Mapping[str, Any]) -> Any:
        policy_id = args.get("id")
        if isinstance(policy_id, bool) or not isinstance(policy_id, int) or not 0 <= policy_id <= MAX_ID:
            raise ConfigError("id must be a policy id from `tailpy control policy history`")
        rec = self.store.policy_record(policy_id)
        if rec is None:
            raise ConfigError(f"there is no stored policy {policy_id}; see `tailpy control policy history`")
        return rec.to_json()

    def op_policy_check(self, args: Mapping[str, Any]) -> Any:
        text, where = self._text(args)
        return _check_result(text, where, self._policy_nodes())

    def op_policy_test(self, args: Mapping[str, Any]) -> Any:
        text, where = self._text(args)
        return _test_result(text, where, self._policy_nodes())

    def op_policy_filter(self, args: Mapping[str, Any]) -> Any:
        node = self.store.get_node(self.store.find_node(_ref(args, "node")), self.clock())
        rules = None
        if self.server is not None:  # the server's compiled filters, as its netmaps carry them
            rules = self.server.mapper.filter_for(node.id)
        if rules is None:
            rules = compile_filter(self._policy(), node.id, self._policy_nodes())
        return {"node": {"id": node.id, "name": node.name}, "rules": filter_to_json(tuple(rules))}

    # --- subnet routes and exit nodes ---

    def _router_json(self, node: Node) -> dict[str, Any]:
        """A node's routes for ``routes.list`` (see the module docstring)."""
        online = self.server is not None and self.server.replicas.online(node.id)  # (on any live replica)
        primaries = self.server.mapper.primary if self.server is not None else None
        served = set(node_served(node))
        approved = set(node.approved_routes)
        routes = []
        for prefix in sort_routes({*node.routable_ips, *node.approved_routes}):
            if prefix not in approved:
                state = "awaiting approval"
            elif prefix not in node.routable_ips:
                state = "not advertised"
            elif is_exit_route(prefix):
                state = "exit node" if prefix in served else "awaiting approval"
            elif primaries is not None and primaries.primary_of(prefix) == node.id:
                state = "primary"
            elif online and not node.expired:
                state = "standby"
            else:
                state = "offline"
            routes.append({"prefix": prefix, "state": state})
        exit_node = ""
        if has_exit_routes(node.routable_ips):
            exit_node = "approved" if has_exit_routes(served) else "awaiting approval"
        return {
            "id": node.id,
            "name": node.name,
            "fqdn": node.fqdn(self.store.settings().domain),
            "online": online,
            "advertised": list(node.routable_ips),
            "approved": list(node.approved_routes),
            "primary": [r["prefix"] for r in routes if r["state"] == "primary"],
            "exit_node": exit_node,
            "routes": routes,
        }

    def _route_args(self, args: Mapping[str, Any], verb: str) -> tuple[int, tuple[str, ...]]:
        node_id = self._node_id(args)
        given = args.get("routes") or []
        if isinstance(given, str):
            given = given.split(",")
        if not isinstance(given, list) or not all(isinstance(r, str) for r in given):
            raise ConfigError("routes must be a list of CIDR prefixes like 198.51.100.0/24")
        routes = parse_routes(given)
        if args.get("exit_node"):
            routes = (*routes, *(r for r in EXIT_ROUTES if r not in routes))
        if not routes:
            raise ConfigError(f"give the routes to {verb} (like 198.51.100.0/24), or the exit node routes")
        return node_id, routes

    def op_routes_list(self, _args: Mapping[str, Any]) -> Any:
        nodes = self.store.list_nodes(self.clock())
        return [self._router_json(n) for n in nodes if n.routable_ips or n.approved_routes]

    def op_routes_approve(self, args: Mapping[str, Any]) -> Any:
        node_id, routes = self._route_args(args, "approve")
        node = self.store.approve_routes(node_id, routes, self.clock())
        self._published(node.id)
        approved = set(node.approved_routes)
        # An exit node is one only with both exit routes approved (as Tailscale's "Use as exit node").
        half = [r for r in EXIT_ROUTES if r not in approved] if any(is_exit_route(r) for r in routes) else []
        return {
            **self._router_json(node),
            "not_advertised": [r for r in routes if r not in node.routable_ips],
            "exit_route_missing": half,
        }

    def op_routes_unapprove(self, args: Mapping[str, Any]) -> Any:
        node_id, routes = self._route_args(args, "unapprove")
        before = set(self.store.get_node(node_id, self.clock()).approved_routes)
        not_approved = [r for r in routes if r not in before]
        if len(not_approved) == len(routes):
            name = self.store.get_node(node_id, self.clock()).name
            raise ConfigError(
                f"node {name} has no approval for {', '.join(routes)}: nothing to unapprove (see "
                "`tailpy control routes list`)"
            )
        node = self.store.unapprove_routes(node_id, routes, self.clock())
        self._published(node.id)
        return {**self._router_json(node), "not_approved": not_approved}

    # --- settings ---

    def op_settings_show(self, _args: Mapping[str, Any]) -> Any:
        s = self.store.settings()
        return {
            "domain": s.domain,
            "prefix_v4": str(s.prefix_v4),
            "prefix_v6": str(s.prefix_v6),
            "database": self.store.where,
        }


def policy_notes(policy: Policy | None) -> dict[str, Any]:
    """``{"not_enforced": [section], "warnings": [sentence]}`` of ``policy`` (empty lists for None)."""
    if policy is None:
        return {"not_enforced": [], "warnings": []}
    return {"not_enforced": list(policy.not_enforced), "warnings": list(policy.warnings)}


def _check_result(text: str, where: str, nodes: list[PolicyNode]) -> dict[str, Any]:
    """``policy.check``: :func:`tailpy.control.acl.check` against ``nodes``, its notes. Raises
    PolicyRefused."""
    return policy_notes(acl.check(text, where, nodes))


def _test_result(text: str, where: str, nodes: list[PolicyNode]) -> dict[str, Any]:
    """``policy.test``: each test of ``text`` against ``nodes``. Raises PolicyRefused when it does not
    parse."""
    try:
        policy = Policy.parse(text)
    except PolicyError as e:
        raise acl.PolicyRefused(acl.locate(where, e)) from None
    failures = check_tests(policy, nodes)
    results = []
    for t in policy.tests:  # (check_tests points each failure at its test's position)
        mine = [f for f in failures if (f.line, f.column) == t.position]
        line, column = t.position
        results.append(
            {
                "test": t.where,
                "src": t.src,
                "at": f"{where}:{line}:{column}" if line is not None else where,
                "ok": not mine,
                "failures": [f.message for f in mine],
            }
        )
    return {
        "tests": len(policy.tests),
        "results": results,
        "failures": [acl.locate(where, f) for f in failures],
    }


class AdminServer:
    """Serves :class:`Admin` for ``server`` on the unix socket ``path`` (mode 0600)."""

    def __init__(self, admin: Admin, path: Path) -> None:
        self.admin = admin
        self.path = path
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on :attr:`path` (a stale socket file is replaced). Raises ConfigError when another server
        answers there already."""
        if self.path.exists():
            if await _alive(self.path):
                raise ConfigError(f"another control server is running on {self.path}; stop it first")
            self.path.unlink()
        where = self.admin.store.where
        app = web.Application(
            client_max_size=MAX_BODY, middlewares=[make_json_errors(translate=lambda e: db_error(e, where))]
        )
        app.router.add_post("/admin/{op}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            args = await request.json()
            if not isinstance(args, dict):
                raise ConfigError("admin request must be a JSON object")
            return web.json_response({"result": await self.admin.run_async(request.match_info["op"], args)})
        except StorageError as e:
            return web.json_response({"error": str(e)}, status=507)
        except acl.PolicyRefused as e:
            return web.json_response({"error": str(e), "errors": list(e.errors)}, status=400)
        except (ConfigError, ControlError) as e:
            return web.json_response({"error": str(e)}, status=400)
        except (ValueError, RecursionError):
            return web.json_response({"error": "admin request is not JSON"}, status=400)


async def _alive(path: Path) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    return True


async def call_socket(path: Path, op: str, args: Mapping[str, Any]) -> Any:
    """Run ``op`` on the server listening on ``path``. Raises ConfigError with the server's sentence, or
    OSError / aiohttp.ClientConnectionError when nothing listens there."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
        http.post(
            f"http://control/admin/{op}",
            data=io.BytesIO(json.dumps(dict(args)).encode()),  # (a stream: a policy may be megabytes)
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        ) as r,
    ):
        status = r.status
        body = await r.json(content_type=None)
    if not isinstance(body, dict):
        raise ControlError(f"control server on {path} sent a malformed admin answer")
    if "error" in body and isinstance(body.get("errors"), list):
        raise acl.PolicyRefused(str(body["error"]), tuple(str(e) for e in body["errors"]))
    if "error" in body:
        raise (StorageError if status == 507 else ConfigError)(str(body["error"]))
    return body.get("result")


def run(state_dir: Path | None, db: str | None, op: str, args: Mapping[str, Any]) -> Any:
    """Run admin ``op`` through ``<state_dir>/admin.sock`` when a server answers there, else directly on
    the database (``db`` URL, or SQLite in ``state_dir``). Raises ConfigError."""
    if state_dir is not None:
        sock = state_dir / SOCKET_NAME
        if sock.exists():
            try:
                return asyncio.run(call_socket(sock, op, args))
            except (OSError, aiohttp.ClientConnectionError):
                pass  # stale socket: the server is not running
    if state_dir is None:
        raise ConfigError("pass --state-dir (or --db with a state dir for the server key)")
    store = Store(state_dir, create=db is not None, db=db)
    try:
        return Admin(store).run(op, args)
    except Exception as e:
        known = db_error(e, store.where)
        if known is None:
            raise
        raise known from None
    finally:
        store.close()


def dumps(obj: Any) -> str:
    """Admin JSON output (indented)."""
    return json.dumps(obj, indent=2)


__all__ = [
    "MAX_BODY",
    "MAX_EXPIRATION",
    "SOCKET_NAME",
    "Admin",
    "AdminServer",
    "call_socket",
    "policy_notes",
    "run",
]
