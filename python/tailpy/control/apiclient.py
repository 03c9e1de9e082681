"""The remote admin client: runs an admin operation over control's HTTP admin API
(:mod:`tailpy.control.adminapi`) instead of the admin socket or the database, for `tailpy control …
--control-url URL` with an admin API key (``TAILPY_API_KEY`` or ``--api-key-file``).

:func:`call` maps the operation onto its endpoint (:data:`tailpy.control.adminapi.ROUTES`): the arguments the
endpoint takes in its path and query go there, the rest in a JSON body; the result is the same JSON the
operation gives locally, so the commands print the same. Every failure is one sentence: a
:class:`~tailpy.errors.ConfigError` (a refusal, with the server's sentence; a missing or refused key; a
server that cannot be reached or answers something that is not the admin API),
:class:`~tailpy.control.acl.PolicyRefused` (a refused policy, every error) or
:class:`~tailpy.errors.StorageError` (507).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tailpy.control import acl
from tailpy.control.adminapi import PREFIX, ROUTES_BY_OP
from tailpy.errors import ConfigError, StorageError

ENV_URL = "TAILPY_CONTROL_URL"
ENV_KEY = "TAILPY_API_KEY"
TIMEOUT = 120.0
"""Seconds to wait for an answer (a policy check against many nodes may take a while)."""


def read_key(key_file: Path | None) -> str:
    """The admin API key: the first line of ``key_file`` when given, else ``$TAILPY_API_KEY``. Raises
    ConfigError when there is none, the file cannot be read, or the key has a space or control character."""
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"cannot read the API key file {key_file}: {getattr(e, 'strerror', None) or e}"
            ) from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ConfigError(f"the API key file {key_file} is empty")
        return _checked_key(key, f"the file {key_file}")
    key = os.environ.get(ENV_KEY, "").strip()
    if not key:
        raise ConfigError(
            f"--control-url needs an admin API key: set ${ENV_KEY} or pass --api-key-file (create one on the "
            "control host with `tailpy control apikey create`)"
        )
    return _checked_key(key, f"${ENV_KEY}")


def base_url(url: str) -> str:
    """``url`` checked (http or https, a host, a numeric port if any, no user name or password, no space nor
    control character) and without a trailing slash. Raises ConfigError."""
    u = url.strip().rstrip("/")
    wrong = f"--control-url {url!r} must be an http:// or https:// URL like https://control.example"
    try:
        parts = urllib.parse.urlsplit(u)
        port = parts.port  # (ValueError for a port that is not a number from 0 to 65535)
    except ValueError as e:  # an unclosed "[" of an IPv6 address, say
        raise ConfigError(f"{wrong} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(wrong)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{wrong}, without a user name or password (the API key authenticates)")
    if not _printable(parts.netloc) or " " in parts.netloc or port == 0:
        raise ConfigError(f"{wrong} (its host has a space or a character a host name cannot have)")
    return u


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _checked_key(key: str, where: str) -> str:
    if not _printable(key) or any(c.isspace() for c in key):
        raise ConfigError(
            f"the API key in {where} is malformed: it has a space or a control character (an admin API "
            "key is one word, tpyapi-...)"
        )
    return key


def request_for(op: str, args: Mapping[str, Any]) -> tuple[str, str, bytes | None]:
    """``(method, path with query, JSON body or None)`` of admin operation ``op`` with ``args``. Raises
    ConfigError for an operation the API does not offer."""
    route = ROUTES_BY_OP.get(op)
    if route is None:
        raise ConfigError(f"the admin API has no operation {op!r}")
    rest = dict(args)
    if route.by:
        rest.pop("by", None)  # (the server records the API key)
    path = route.path
    for name, arg, _schema in route.params:
        value = rest.pop(arg, None)
        if value is None or value == "":
            raise ConfigError(f"{arg} must be given")
        path = path.replace("{" + name + "}", urllib.parse.quote(str(value), safe=""))
    query = {}
    for name, arg, _schema in route.query:
        value = rest.pop(arg, None)
        if value is not None:
            query[name] = str(value)
    if query:
        path += "?" + urllib.parse.urlencode(query)
    body = json.dumps(rest).encode() if route.body is not None else None
    return route.method, PREFIX + path, body


def call(url: str, key: str, op: str, args: Mapping[str, Any], *, timeout: float = TIMEOUT) -> Any:
    """Run admin operation ``op`` on the control server at ``url`` with API key ``key``; its JSON result.
    Raises ConfigError, PolicyRefused or StorageError (see the module docstring)."""
    base = base_url(url)
    method, path, body = request_for(op, args)
    req = urllib.request.Request(
        base + path,
        data=body,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json"}
        | ({"Content-Type": "application/json"} if body is not None else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
        try:
            raw = e.read()
        except OSError:
            raw = b""
        finally:
            e.close()
    except urllib.error.URLError as e:
        why = getattr(e.reason, "strerror", None) or str(e.reason)
        raise ConfigError(f"cannot reach the control server at {base}: {why}") from None
    except TimeoutError:
        raise ConfigError(f"the control server at {base} did not answer within {timeout:g}s") from None
    except (OSError, ValueError) as e:  # a connection reset, an invalid URL http.client refuses
        raise ConfigError(f"cannot reach the control server at {base}: {e}") from None
    try:
        doc = json.loads(raw.decode("utf-8")) if raw else None
    except (ValueError, RecursionError):
        doc = None
    if status == 200:
        if doc is None and raw.strip() != b"null":
            raise ConfigError(f"{base} did not answer as a tailpy control server's admin API (not JSON)")
        return doc
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, str):
        raise ConfigError(
            f"{base} answered HTTP {status} to {method} {path.split('?')[0]}, not as a tailpy control "
            "server's admin API (check --control-url)"
        )
    if status in (404, 405) and error in (
        "Not Found",
        "Method Not Allowed",
    ):  # (aiohttp's, not an operation's)
        raise ConfigError(
            f"{base} has no admin API endpoint {method} {path.split('?')[0]} (HTTP {status}): check "
            "--control-url, and that the server's tailpy has the admin API"
        )
    if status == 401:
        raise ConfigError(f"the control server at {base} refused the API key: {error}")
    if status == 507:
        raise StorageError(error)
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list) and errors:
        raise acl.PolicyRefused(error, tuple(str(e) for e in errors))
    raise ConfigError(error)


__all__ = ["ENV_KEY", "ENV_URL", "TIMEOUT", "base_url", "call", "read_key", "request_for"]
