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
  ``nodes.expire`` {id} -> Node; ``nodes.expiry`` {id, disabled} -> Node; ``nodes.delete`` {id} -> {}
* ``authkey.create`` {user?, tags?, reusable, ephemeral, expiration (seconds up to 3650 days, or null)} ->
  AuthKey (the full key: the only time it is shown, the database keeps a hash); ``authkey.list`` {} ->
  [AuthKey] (key prefix only; ``uses``, ``last_used``); ``authkey.expire`` {key (id or full key)} -> AuthKey
* ``settings.show`` {} -> {domain, prefix_v4, prefix_v6, database}
* ``dns.show`` {} and ``dns.set`` {fields to replace} -> DNS settings (see :mod:`tailpy.control.dnsconfig`)

Node JSON is :meth:`tailpy.netmap.Node.to_json` plus ``fqdn``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from tailpy.control import dnsconfig
from tailpy.control.store import DEFAULT_KEY_LIFETIME, Store
from tailpy.control.store.database import db_error
from tailpy.errors import ConfigError, ControlError, StorageError
from tailpy.httperrors import make_json_errors
from tailpy.netmap import Node

if TYPE_CHECKING:
    from tailpy.control.server import ControlServer

SOCKET_NAME = "admin.sock"
MAX_EXPIRATION = 3650 * 86400.0
"""Longest auth key lifetime, seconds (10 years; `tailpy control` parses durations up to the same)."""


def _ref(args: Mapping[str, Any], name: str) -> str | int:
    """A node given by id (a number) or by name (or FQDN), as the admin typed it."""
    v = args.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
        raise ConfigError(f"{name} must be a node id or name; see `tailpy control nodes list`")
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

    def _published(self, node_id: int) -> None:
        if self.server is not None:
            self.server.admin_changed(node_id)

    def _removed(self, node_id: int) -> None:
        if self.server is not None:
            self.server.admin_removed(node_id)

    def _node_json(self, node: Node) -> dict[str, Any]:
        online = self.server is not None and self.server.is_online(node.id)
        domain = self.store.settings().domain
        return {**node.to_json(), "online": online, "fqdn": node.fqdn(domain)}

    # --- users ---

    def op_users_create(self, args: Mapping[str, Any]) -> Any:
        return self.store.create_user(_str(args, "name"), self.clock()).to_json()

    def op_users_list(self, _args: Mapping[str, Any]) -> Any:
        return [u.to_json() for u in self.store.list_users()]

    def op_users_delete(self, args: Mapping[str, Any]) -> Any:
        self.store.delete_user(_str(args, "name"))
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
        if len(matches) != 1:
            how = "none has" if not matches else f"{len(matches)} have"
            raise ConfigError(
                f"{how} hostname {ref!r} among pending logins: give its id "
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

    # --- DNS ---

    def op_dns_show(self, _args: Mapping[str, Any]) -> Any:
        return dnsconfig.show(self.store)

    def op_dns_set(self, args: Mapping[str, Any]) -> Any:
        out, _ = dnsconfig.update(self.store, args)
        if self.server is not None:
            self.server.dns_changed()
        return out

    # --- settings ---

    def op_settings_show(self, _args: Mapping[str, Any]) -> Any:
        s = self.store.settings()
        return {
            "domain": s.domain,
            "prefix_v4": str(s.prefix_v4),
            "prefix_v6": str(s.prefix_v6),
            "database": self.store.where,
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
        app = web.Application(middlewares=[make_json_errors(translate=lambda e: db_error(e, where))])
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
            return web.json_response({"result": self.admin.run(request.match_info["op"], args)})
        except StorageError as e:
            return web.json_response({"error": str(e)}, status=507)
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
        http.post(f"http://control/admin/{op}", json=dict(args), timeout=timeout) as r,
    ):
        status = r.status
        body = await r.json(content_type=None)
    if not isinstance(body, dict):
        raise ControlError(f"control server on {path} sent a malformed admin answer")
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


__all__ = ["MAX_EXPIRATION", "SOCKET_NAME", "Admin", "AdminServer", "call_socket", "run"]
