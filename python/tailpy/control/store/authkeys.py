"""Pre-auth keys (Tailscale's auth keys): ``tskey-auth-<32 url-safe characters>``, stored only as a SHA-256
hash (plus a short visible prefix for listings): the full text is shown once, when it is created. A key
names the owner of the nodes it registers (a user, or tags and no user), whether it is reusable and
ephemeral, and when it expires."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store import users as users_repo
from tailpy.control.store.schema import AUTH_KEY_PREFIX, auth_key_prefix, auth_keys, hash_auth_key, users
from tailpy.control.tags import parse_tags
from tailpy.errors import AuthKeyError, ConfigError

CREATE_HINT = "`tailpy control authkey create`"


@dataclass(frozen=True)
class AuthKey:
    """A pre-auth key. ``key`` is the full ``tskey-auth-…`` text only as :meth:`Store.create_auth_key` returns
    it; read back from the database it is the visible prefix and "…" (only a hash of the rest is stored).
    ``expires`` and ``created`` are unix seconds (``expires`` None: never); ``user`` the owner's name of nodes
    it registers ("" for a tagged key); ``tags`` like ("tag:server",); ``uses`` how many registrations it
    made, the last at ``last_used``."""

    key: str
    reusable: bool
    expires: float | None
    used: bool
    created: float
    id: int = 0
    user: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False
    uses: int = 0
    last_used: float | None = None

    @property
    def shown(self) -> str:
        """The key as listings show it: ``tskey-auth-AbCd…``."""
        return auth_key_prefix(self.key) + "…"

    def to_json(self, *, full_key: bool = False) -> dict[str, Any]:
        """JSON for admin output; the key shown as a prefix unless ``full_key`` (right after creation)."""
        return {
            "id": self.id,
            "key": self.key if full_key else self.shown,
            "user": self.user,
            "tags": list(self.tags),
            "reusable": self.reusable,
            "ephemeral": self.ephemeral,
            "used": self.used,
            "uses": self.uses,
            "last_used": self.last_used,
            "expires": self.expires,
            "created": self.created,
        }


def create(
    conn: Connection,
    *,
    reusable: bool,
    expires: float | None,
    now: float,
    user: str | None,
    tags: Iterable[str],
    ephemeral: bool,
) -> AuthKey:
    """A new key (see :meth:`Store.create_auth_key`). Raises ConfigError (unknown user, bad tag)."""
    tag_list = parse_tags(tags)
    if user is not None and tag_list:
        raise ConfigError("give an auth key a user or tags, not both (tagged nodes have no user)")
    key = AUTH_KEY_PREFIX + secrets.token_urlsafe(24)
    uid: int | None = None
    if user is not None:
        uid = users_repo.user_id(conn, user)
    elif not tag_list:
        user = users_repo.DEFAULT_USER
        uid = users_repo.default_user_id(conn, now)
    res = conn.execute(
        auth_keys.insert().values(
            key=hash_auth_key(key),
            prefix=auth_key_prefix(key),
            uses=0,
            reusable=reusable,
            expires=expires,
            used=False,
            created=now,
            user_id=uid,
            tags=json.dumps(list(tag_list)),
            ephemeral=ephemeral,
        )
    )
    assert res.inserted_primary_key is not None
    kid = int(res.inserted_primary_key[0])
    return AuthKey(key, reusable, expires, False, now, kid, user or "", tag_list, ephemeral)


def _query() -> sa.Select[Any]:
    return sa.select(auth_keys, users.c.name.label("user_name")).select_from(
        auth_keys.outerjoin(users, auth_keys.c.user_id == users.c.id)
    )


def _to_auth_key(r: Any) -> AuthKey:
    return AuthKey(
        (r.prefix or AUTH_KEY_PREFIX) + "…",
        bool(r.reusable),
        r.expires,
        bool(r.used),
        r.created,
        int(r.id),
        r.user_name or "",
        tuple(json.loads(r.tags or "[]")),
        bool(r.ephemeral),
        int(r.uses or 0),
        r.last_used,
    )


def list_all(conn: Connection) -> list[AuthKey]:
    """Every key, by id (``key`` as its visible prefix)."""
    return [_to_auth_key(r) for r in conn.execute(_query().order_by(auth_keys.c.id)).all()]


def expire(conn: Connection, key_or_id: str, now: float) -> AuthKey:
    """Make a key (by id, or the full ``tskey-auth-…`` text) expire now. Raises ConfigError if unknown."""
    where = (
        auth_keys.c.id == int(key_or_id)
        if key_or_id.isascii() and key_or_id.isdigit() and len(key_or_id) <= 18
        else auth_keys.c.key == hash_auth_key(key_or_id)
    )
    res = conn.execute(auth_keys.update().where(where).values(expires=now))
    if not res.rowcount:
        raise ConfigError(f"there is no auth key {key_or_id}; see `tailpy control authkey list`")
    return _to_auth_key(conn.execute(_query().where(where)).one())


def take(conn: Connection, key: str | None, now: float, why: str) -> Any:
    """The row of auth key ``key`` if it may register a machine now. Raises AuthKeyError (a sentence that
    starts with ``why`` when no key is given): unknown, expired, or single-use and used."""
    if not key:
        raise AuthKeyError(f"{why}: pass an auth key (create one with {CREATE_HINT})")
    shown = auth_key_prefix(key) + "…"
    row = conn.execute(sa.select(auth_keys).where(auth_keys.c.key == hash_auth_key(key))).first()
    if row is None:
        raise AuthKeyError(
            f"auth key {shown} is not known to this control server; create one with {CREATE_HINT}"
        )
    if row.expires is not None and row.expires <= now:
        raise AuthKeyError(f"auth key {shown} is expired; create a new one with {CREATE_HINT}")
    if row.used and not row.reusable:
        raise AuthKeyError(
            f"auth key {shown} was already used and is single-use; create a new one with {CREATE_HINT}"
            " (add --reusable for several machines)"
        )
    return row


def mark_used(conn: Connection, key_id: int, now: float) -> None:
    """Count a successful registration by key ``key_id`` (a single-use key is then used up)."""
    conn.execute(
        auth_keys.update()
        .where(auth_keys.c.id == key_id)
        .values(used=True, uses=auth_keys.c.uses + 1, last_used=now)
    )


__all__ = ["CREATE_HINT", "AuthKey", "create", "expire", "list_all", "mark_used", "parse_tags", "take"]
