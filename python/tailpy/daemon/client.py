"""Client of tailpyd's local API (used by the CLI)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

import aiohttp

from tailpy.errors import (
    AuthKeyError,
    ConfigError,
    ControlError,
    DaemonNotRunningError,
    ParseError,
    PermissionDeniedError,
    StorageError,
    TagError,
    TailpyError,
)
from tailpy.ipnstate import PeerStatus, PingReply, Status
from tailpy.netmap import DerpMap

if TYPE_CHECKING:
    from tailpy.magicsock.netcheck import Report


class DaemonUnresponsiveError(TailpyError):
    """tailpyd accepted a connection on its socket but did not answer in time (wedged or stopped)."""


DEFAULT_SOCKET = "/run/tailpy/tailpyd.sock"
DEFAULT_STATE_DIR = "/var/lib/tailpy"


def default_socket() -> str:
    """``$TAILPY_SOCKET`` or /run/tailpy/tailpyd.sock."""
    return os.environ.get("TAILPY_SOCKET") or DEFAULT_SOCKET


def default_state_dir() -> str:
    """``$TAILPY_STATE_DIR`` or /var/lib/tailpy."""
    return os.environ.get("TAILPY_STATE_DIR") or DEFAULT_STATE_DIR


_ERRORS: dict[int, type[TailpyError]] = {
    400: ConfigError,
    401: AuthKeyError,
    403: TagError,
    404: ConfigError,
    502: ControlError,
    507: StorageError,
}


class LocalClient:
    """Talks to the tailpyd listening on unix socket ``socket_path``; a call that gets no answer within
    ``timeout`` seconds raises DaemonUnresponsiveError."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, raw = await self._request(method, path, body)
        try:
            data: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise TailpyError(f"tailpyd answered HTTP {status} without JSON") from None
        if not isinstance(data, dict):
            raise TailpyError(f"tailpyd answered HTTP {status} with malformed JSON")
        if status >= 400:
            raise _ERRORS.get(status, TailpyError)(data.get("error", f"HTTP {status}"))
        return data

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """(HTTP status, body) of one local API request; raises the errors :meth:`_call` documents for an
        unreachable or silent daemon."""
        conn = aiohttp.UnixConnector(path=self.socket_path)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=conn, timeout=aiohttp.ClientTimeout(total=self.timeout)
                ) as session,
                session.request(method, "http://local-tailpyd/localapi/v0" + path, json=body) as resp,
            ):
                return resp.status, await resp.read()
        except asyncio.TimeoutError:
            raise DaemonUnresponsiveError(
                f"tailpyd did not answer on {self.socket_path} within {self.timeout:.0f} s"
            ) from None
        except PermissionError:
            raise PermissionDeniedError(
                f"permission denied on tailpyd's socket {self.socket_path}: run this as root (sudo)"
            ) from None
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, PermissionError):
                raise PermissionDeniedError(
                    f"permission denied on tailpyd's socket {self.socket_path}: run this as root (sudo)"
                ) from None
            raise DaemonNotRunningError(
                f"tailpyd is not running (no answer on {self.socket_path}); start it with `tailpy up`"
            ) from None
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunningError(
                f"tailpyd is not running (no answer on {self.socket_path}); start it with `tailpy up`"
            ) from None
        except aiohttp.ClientError:  # an answer that is not HTTP (a bad status line, a broken body)
            raise TailpyError(
                f"what answers on {self.socket_path} is not tailpyd (its answer is not HTTP); check --socket"
            ) from None

    async def metrics(self) -> str:
        """tailpyd's Prometheus metrics, text format (``GET /localapi/v0/metrics``)."""
        status, raw = await self._request("GET", "/metrics")
        if status != 200:
            raise TailpyError(f"tailpyd answered HTTP {status} for its metrics (an older tailpyd?)")
        return raw.decode("utf-8", "replace")

    async def status(self) -> Status:
        """tailpyd's status. Raises ParseError for an answer that is not a status."""
        return Status.from_json(await self._call("GET", "/status"))

    async def up(
        self,
        login_server: str,
        auth_key: str | None,
        hostname: str | None,
        force_reauth: bool = False,
        accept_dns: bool | None = None,
        netfilter_mode: str | None = None,
        advertise_tags: list[str] | None = None,
        routes: dict[str, Any] | None = None,
    ) -> Status:
        """Log in / bring the node up (``POST /up``): the status after it. ``advertise_tags``: tags to ask
        control for (None: as the last `up` said). ``routes``: route preferences given (``advertise_routes``
        list of CIDR, ``accept_routes``, ``exit_node``, ``exit_node_allow_lan_access``,
        ``snat_subnet_routes``; a key absent: as the last `up` said)."""
        body: dict[str, Any] = {
            "login_server": login_server,
            "auth_key": auth_key,
            "hostname": hostname,
            "force_reauth": force_reauth,
            "accept_dns": accept_dns,
        }
        if netfilter_mode is not None:
            body["netfilter_mode"] = netfilter_mode
        if advertise_tags is not None:
            body["advertise_tags"] = advertise_tags
        body.update(routes or {})
        return Status.from_json(await self._call("POST", "/up", body))

    async def set(self, prefs: dict[str, Any]) -> Status:
        """Change the given preferences of the running node (``POST /set``: ``hostname``, ``accept_dns``,
        ``advertise_tags``, ``advertise_routes``, ``accept_routes``, ``exit_node``,
        ``exit_node_allow_lan_access``, ``snat_subnet_routes``): the status after it. Raises ConfigError
        (a malformed preference; an exit node that is unknown, this node, or not offering), TagError,
        ControlError, StorageError, each with one sentence; nothing is changed then."""
        return Status.from_json(await self._call("POST", "/set", prefs))

    async def logout(self) -> Status:
        return Status.from_json(await self._call("POST", "/logout"))

    async def whois(self, address: str) -> PeerStatus:
        """The node owning tailnet ``address``; raises ConfigError when none does."""
        return PeerStatus.from_json(await self._call("GET", "/whois?addr=" + urllib.parse.quote(address)))

    async def ping(self, target: str, timeout: float) -> PingReply:
        """One disco ping to peer ``target`` (name or tailnet IP), waiting up to ``timeout`` seconds (the
        reply has its ``peer``). Raises ConfigError for an unknown peer."""
        return PingReply.from_json(await self._call("POST", "/ping", {"target": target, "timeout": timeout}))

    async def netcheck(self, timeout: float) -> tuple[Report, DerpMap]:
        """A netcheck report made by tailpyd over its data-plane socket, with tailpyd's DERP map. Raises
        ConfigError when tailpyd has no DERP map yet, ParseError for a malformed answer."""
        from tailpy.magicsock.netcheck import Report

        got = await self._call("POST", "/netcheck", {"timeout": timeout})
        try:
            return Report.from_json(got["report"]), DerpMap.from_json(got["derp_map"])
        except KeyError as e:
            raise ParseError(f"malformed netcheck answer from tailpyd: no {e}") from None

    async def down(self) -> Status:
        return Status.from_json(await self._call("POST", "/down"))
