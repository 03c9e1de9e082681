"""Keys of the HTTP admin API (``Authorization: Bearer <key>``), as Headscale's API keys: the key is
``tpyapi-<prefix>-<secret>``, ``prefix`` 10 hex digits (shown in listings, how ``apikey expire`` names a
key), ``secret`` 32 random bytes in unpadded base64url (43 characters). The database keeps the prefix and a
SHA-256 hash of the secret (:mod:`tailpy.control.store.apikeys`): the whole key is shown once, when it is
created. A key is valid until its ``expires_at`` (forever without one).

The functions (``store``: :class:`tailpy.control.store.Store`; ``now``: unix seconds, default the clock):

* ``create_api_key(store, *, expiration_seconds: float | None, description: str = "", created_by: str =
  "", now=None) -> (ApiKeyInfo, secret_str)``: a new key; ``secret_str`` is the whole
  ``tpyapi-<prefix>-<secret>`` text. ``expiration_seconds`` None: never expires; else 0 < seconds <=
  :data:`MAX_EXPIRATION`. Raises ConfigError for a bad expiration or a description over 256 characters.
* ``check_api_key(store, secret_str, *, now=None) -> ApiKeyInfo | None``: the key ``secret_str`` names
  when it is known, unexpired and its secret matches (compared in constant time); None for an unknown,
  expired or malformed one (never raises for bad input). ``last_used`` is written at most once a minute
  (:data:`~tailpy.control.store.apikeys.TOUCH_INTERVAL`).
* ``list_api_keys(store) -> list[ApiKeyInfo]`` by id.
* ``expire_api_key(store, id_or_prefix: int | str, *, now=None) -> ApiKeyInfo``: expires it now (the id,
  the prefix, ``tpyapi-<prefix>`` or the whole key). Raises ConfigError when there is no such key.

:class:`ApiKeyInfo` (frozen): ``id: int, prefix: str, description: str, created_by: str, created_at: float,
expires_at: float | None, last_used: float | None``; ``expired(now) -> bool``; ``to_json(now) -> {id,
prefix, description, created_by, created_at, expires_at, last_used, expired}``.

The admin operations ``apikey.create`` {expiration (seconds or null), description?, by?} -> ApiKeyInfo JSON
plus ``key`` (the whole key, shown this once), ``apikey.list`` {} -> [ApiKeyInfo JSON] and ``apikey.expire``
{key: id or prefix} -> ApiKeyInfo JSON run these (:mod:`tailpy.control.admin`).
"""

from __future__ import annotations

import re
import secrets
import time

from tailpy.control.store import Store
from tailpy.control.store.apikeys import TOUCH_INTERVAL, ApiKeyInfo
from tailpy.errors import ConfigError

KEY_PREFIX = "tpyapi-"
MAX_EXPIRATION = 3650 * 86400.0
"""Longest API key lifetime, seconds (10 years)."""
DEFAULT_EXPIRATION = 90 * 86400.0
"""Lifetime of a key created without one, seconds (90 days, as Headscale's ``apikeys create``)."""
MAX_DESCRIPTION = 256

_KEY = re.compile(r"tpyapi-([0-9a-f]{10})-([A-Za-z0-9_-]{43})")


def parse_api_key(text: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a ``tpyapi-<prefix>-<secret>`` key (surrounding spaces ignored), or None when
    ``text`` does not have that form."""
    if not isinstance(text, str):
        return None
    m = _KEY.fullmatch(text.strip())
    return (m.group(1), m.group(2)) if m else None


def shown(prefix: str) -> str:
    """How listings show a key: ``tpyapi-<prefix>…``."""
    return f"{KEY_PREFIX}{prefix}…"


def create_api_key(
    store: Store,
    *,
    expiration_seconds: float | None,
    description: str = "",
    created_by: str = "",
    now: float | None = None,
) -> tuple[ApiKeyInfo, str]:
    """A new key (see the module docstring): its info and the whole key text. Raises ConfigError."""
    if expiration_seconds is not None and (
        isinstance(expiration_seconds, bool)
        or not isinstance(expiration_seconds, (int, float))
        or not 0 < expiration_seconds <= MAX_EXPIRATION
    ):
        raise ConfigError("expiration must be a number of seconds up to 3650 days, or null (never)")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ConfigError(f"description must be text of at most {MAX_DESCRIPTION} characters")
    if not isinstance(created_by, str):
        raise ConfigError("created_by must be text")
    t = time.time() if now is None else now
    expires_at = None if expiration_seconds is None else t + float(expiration_seconds)
    for _ in range(8):
        prefix, secret = secrets.token_hex(5), secrets.token_urlsafe(32)
        info = store.add_api_key(
            prefix=prefix,
            secret=secret,
            description=description,
            created_by=created_by[:MAX_DESCRIPTION],
            now=t,
            expires_at=expires_at,
        )
        if info is not None:
            return info, f"{KEY_PREFIX}{prefix}-{secret}"
    raise ConfigError("could not draw an unused API key prefix; try again")  # (1 in 2^40 per draw)


def check_api_key(store: Store, secret_str: str, *, now: float | None = None) -> ApiKeyInfo | None:
    """The valid key ``secret_str`` names, or None (unknown, expired, malformed)."""
    parsed = parse_api_key(secret_str)
    if parsed is None:
        return None
    return store.check_api_key(parsed[0], parsed[1], time.time() if now is None else now)


def list_api_keys(store: Store) -> list[ApiKeyInfo]:
    """Every key, by id."""
    return store.list_api_keys()


def expire_api_key(store: Store, id_or_prefix: int | str, *, now: float | None = None) -> ApiKeyInfo:
    """Expire key ``id_or_prefix`` now. Raises ConfigError when there is none."""
    if isinstance(id_or_prefix, str):
        parsed = parse_api_key(id_or_prefix)
        if parsed is not None:
            id_or_prefix = parsed[0]
    return store.expire_api_key(id_or_prefix, time.time() if now is None else now)


__all__ = [
    "DEFAULT_EXPIRATION",
    "KEY_PREFIX",
    "MAX_DESCRIPTION",
    "MAX_EXPIRATION",
    "TOUCH_INTERVAL",
    "ApiKeyInfo",
    "check_api_key",
    "create_api_key",
    "expire_api_key",
    "list_api_keys",
    "parse_api_key",
    "shown",
]
