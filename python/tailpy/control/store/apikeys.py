"""Keys of the HTTP admin API, as stored: a visible prefix and a SHA-256 hash of the secret part (see
:mod:`tailpy.control.apikeys` for the key format and the public functions). Functions over an open
transaction, as the other modules of :mod:`tailpy.control.store`."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import api_keys
from tailpy.errors import ConfigError

TOUCH_INTERVAL = 60.0
"""Seconds between two writes of a key's ``last_used``: a key used more often is not written per request."""

LIST_HINT = "`tailpy control apikey list`"


def hash_secret(secret: str) -> str:
    """What the database stores for a key's secret part: ``sha256:<hex>``. (A plain hash is enough: the
    secret is 32 random bytes, beyond any guessing a slow hash would hinder.)"""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyInfo:
    """An admin API key as listings show it (never the secret). ``prefix``: its visible part (10 hex
    digits; the key is ``tpyapi-<prefix>-<secret>``); times are unix seconds; ``expires_at`` None: never;
    ``last_used`` None: never used (updated at most every :data:`TOUCH_INTERVAL` seconds)."""

    id: int
    prefix: str
    description: str
    created_by: str
    created_at: float
    expires_at: float | None
    last_used: float | None

    def expired(self, now: float) -> bool:
        """Whether the key no longer authenticates at ``now`` (unix seconds)."""
        return self.expires_at is not None and self.expires_at <= now

    def to_json(self, now: float) -> dict[str, Any]:
        """``{id, prefix, description, created_by, created_at, expires_at, last_used, expired}``."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "description": self.description,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "last_used": self.last_used,
            "expired": self.expired(now),
        }


def _info(r: Any) -> ApiKeyInfo:
    return ApiKeyInfo(
        int(r.id),
        str(r.prefix),
        str(r.description or ""),
        str(r.created_by or ""),
        float(r.created_at),
        None if r.expires_at is None else float(r.expires_at),
        None if r.last_used is None else float(r.last_used),
    )


def create(
    conn: Connection,
    *,
    prefix: str,
    secret: str,
    description: str,
    created_by: str,
    now: float,
    expires_at: float | None,
) -> ApiKeyInfo | None:
    """Store a key of ``prefix`` and ``secret``; None when ``prefix`` is taken (draw another)."""
    if conn.execute(sa.select(api_keys.c.id).where(api_keys.c.prefix == prefix)).first() is not None:
        return None
    res = conn.execute(
        api_keys.insert().values(
            prefix=prefix,
            hash=hash_secret(secret),
            description=description,
            created_by=created_by,
            created_at=now,
            expires_at=expires_at,
            last_used=None,
        )
    )
    assert res.inserted_primary_key is not None
    return ApiKeyInfo(
        int(res.inserted_primary_key[0]), prefix, description, created_by, now, expires_at, None
    )


def check(conn: Connection, prefix: str, secret: str, now: float) -> ApiKeyInfo | None:
    """The key of ``prefix`` when ``secret`` is its secret (compared in constant time) and it has not
    expired at ``now``, else None. Its ``last_used`` becomes ``now`` when older than
    :data:`TOUCH_INTERVAL`."""
    r = conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix)).first()
    if r is None or not hmac.compare_digest(str(r.hash), hash_secret(secret)):
        return None
    info = _info(r)
    if info.expired(now):
        return None
    if info.last_used is None or not 0 <= now - info.last_used < TOUCH_INTERVAL:
        conn.execute(api_keys.update().where(api_keys.c.id == info.id).values(last_used=now))
        info = ApiKeyInfo(
            info.id, info.prefix, info.description, info.created_by, info.created_at, info.expires_at, now
        )
    return info


def list_all(conn: Connection) -> list[ApiKeyInfo]:
    """Every key, by id."""
    return [_info(r) for r in conn.execute(sa.select(api_keys).order_by(api_keys.c.id)).all()]


def expire(conn: Connection, ref: str | int, now: float) -> ApiKeyInfo:
    """Make key ``ref`` (its id, its prefix, ``tpyapi-<prefix>`` or the whole key) expire at ``now`` (one
    already expired keeps its time). Raises ConfigError when there is none."""
    where: Any = None
    if isinstance(ref, str):
        text = ref.strip()
        parts = text.split("-", 2)
        prefix = parts[1] if len(parts) >= 2 and parts[0] == "tpyapi" else text
        if conn.execute(sa.select(api_keys.c.id).where(api_keys.c.prefix == prefix)).first() is not None:
            where = api_keys.c.prefix == prefix
        elif text.isdigit() and len(text) < 19:
            where = api_keys.c.id == int(text)
    elif not isinstance(ref, bool) and 0 <= ref < 2**63:
        where = api_keys.c.id == ref
    r = None if where is None else conn.execute(sa.select(api_keys).where(where)).first()
    if r is None:
        raise ConfigError(f"there is no API key {ref}; see {LIST_HINT}")
    info = _info(r)
    if info.expired(now):
        return info
    conn.execute(api_keys.update().where(api_keys.c.id == info.id).values(expires_at=now))
    return ApiKeyInfo(
        info.id, info.prefix, info.description, info.created_by, info.created_at, now, info.last_used
    )


__all__ = [
    "LIST_HINT",
    "TOUCH_INTERVAL",
    "ApiKeyInfo",
    "check",
    "create",
    "expire",
    "hash_secret",
    "list_all",
]
