"""Client admission for the DERP server: which node keys may connect.

A verifier is an async callable ``(node_key, source_ip) -> bool`` that :class:`tailpy.derp.server.DerpServer`
calls once per login, after the client's ClientInfo box opened and before ServerInfo is sent. It returns True
to admit, False to refuse, or raises :class:`AdmissionError` when it cannot tell (the server then refuses:
it fails closed).

* :class:`AdmissionURL`: Tailscale's admission controller protocol (derper ``-verify-client-url``,
  ``tailcfg.DERPAdmitClientRequest`` / ``DERPAdmitClientResponse``): ``POST <url>`` with JSON
  ``{"NodePublic": "nodekey:<64 hex>", "Source": "<client IP>"}``, answered ``200`` with JSON
  ``{"Allow": true|false}``. Any other status, a body that is not that JSON, or no answer within ``timeout``
  seconds is an :class:`AdmissionError`. Answers are cached per (key, source) for ``allow_ttl`` /
  ``deny_ttl`` seconds, so a reconnect storm does not become a request storm.
* :func:`control_admission_url`: the URL of a tailpy control server's admission endpoint
  (:data:`CONTROL_ADMIT_PATH`; ``tailpy derp serve --verify-clients --control-url URL``).
* :func:`local_admission`: wraps a synchronous predicate (the embedded relay of ``tailpy control serve``
  asks its :class:`~tailpy.control.server.ControlServer` directly, with no HTTP).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import aiohttp

from tailpy.errors import TailpyError
from tailpy.keys import NodePublic

Verifier: TypeAlias = Callable[[NodePublic, str], Awaitable[bool]]
"""``await verifier(node_key, source_ip)`` -> True to admit; raises AdmissionError when it cannot tell."""

CONTROL_ADMIT_PATH = "/derp/admit"
"""Path of a tailpy control server's admission endpoint (Tailscale's admission controller protocol)."""

MAX_RESPONSE_BYTES = 4096
"""Largest admission response body read, bytes (derper reads at most 4 KiB too)."""


class AdmissionError(TailpyError):
    """The admission controller did not give a usable answer (unreachable, timeout, bad status or body)."""


def control_admission_url(control_url: str) -> str:
    """The admission endpoint of the tailpy control server at ``control_url`` (``http(s)://host:port``)."""
    return control_url.rstrip("/") + CONTROL_ADMIT_PATH


def local_admission(allowed: Callable[[NodePublic], bool]) -> Verifier:
    """A verifier that admits exactly the keys for which ``allowed(node_key)`` is True (source ignored)."""

    async def verify(key: NodePublic, source: str) -> bool:
        return allowed(key)

    return verify


class AdmissionURL:
    """Ask an admission controller at ``url`` (Tailscale-compatible; see the module docstring).

    ``timeout`` seconds per request; ``allow_ttl`` / ``deny_ttl`` seconds an answer is reused (0: never);
    at most ``max_cached`` answers are kept (the oldest go first). Failures are never cached. Call
    :meth:`aclose` when done (it closes the HTTP session)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        allow_ttl: float = 30.0,
        deny_ttl: float = 5.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.allow_ttl = allow_ttl
        self.deny_ttl = deny_ttl
        self.max_cached = max_cached
        self.clock = clock
        self.requests = 0
        """Requests sent to the controller (cache misses)."""
        self._cache: OrderedDict[tuple[NodePublic, str], tuple[float, bool]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, key: NodePublic, source: str) -> bool:
        now = self.clock()
        hit = self._cache.get((key, source))
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._cache[(key, source)]
        allow = await self._ask(key, source)
        ttl = self.allow_ttl if allow else self.deny_ttl
        if ttl > 0:
            self._cache[(key, source)] = (now + ttl, allow)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return allow

    async def _ask(self, key: NodePublic, source: str) -> bool:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.requests += 1
        body = {"NodePublic": key.text(), "Source": source}
        try:
            async with self._session.post(self.url, json=body) as resp:
                raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
                status = resp.status
        except asyncio.TimeoutError:
            raise AdmissionError(
                f"admission controller {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise AdmissionError(f"admission controller {self.url} is unreachable: {e}") from None
        if status != 200:
            raise AdmissionError(f"admission controller {self.url} answered HTTP {status}")
        try:
            if len(raw) > MAX_RESPONSE_BYTES:
                raise ValueError("too long")
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise AdmissionError(f"admission controller {self.url} answered with a body not JSON") from None
        allow = answer.get("Allow") if isinstance(answer, dict) else None
        if not isinstance(allow, bool):
            raise AdmissionError(f'admission controller {self.url} answered without a boolean "Allow"')
        return allow

    async def aclose(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = [
    "CONTROL_ADMIT_PATH",
    "AdmissionError",
    "AdmissionURL",
    "Verifier",
    "control_admission_url",
    "local_admission",
]
