"""Users: created by an admin (``tailpy control users create``), by the first auth key made without an owner
(the user ``default``), or by an OpenID Connect login (keyed by the provider's issuer and subject)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import auth_keys, nodes, users
from tailpy.errors import ConfigError

DEFAULT_USER = "default"
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._@+-]")


@dataclass(frozen=True)
class User:
    """A user: ``id``, login ``name`` ("alice" or "alice@example.com"), ``created`` unix seconds."""

    id: int
    name: str
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created": self.created}


def _clash(conn: Connection, name: str) -> str | None:
    """The existing user name that a policy would take for ``name`` (equal ignoring ASCII case and one
    trailing ``@``, as :func:`tailpy.control.policy.model.user_matches` compares them), else None."""
    key = name.lower()
    key = key[:-1] if key.endswith("@") else key
    row = conn.execute(
        sa.select(users.c.name).where(sa.func.lower(users.c.name).in_([key, key + "@"])).limit(1)
    ).first()
    return None if row is None else str(row.name)


def _refuse_clash(conn: Connection, name: str) -> None:
    other = _clash(conn, name)
    if other == name:
        raise ConfigError(f"user {name} already exists")
    if other is not None:
        raise ConfigError(
            f"user name {name!r} would be the same user as {other!r} in the policy (names are compared "
            "ignoring case and a trailing '@'); choose another name"
        )


def create(conn: Connection, name: str, now: float) -> User:
    """Create user ``name``. Raises ConfigError for a bad or taken name (one equal to an existing name
    ignoring ASCII case and a trailing ``@`` is taken)."""
    if not _USER_NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r} must be 1-64 letters, digits, '.', '_', '@', '+' or '-' (alice, "
            "alice@example.com)"
        )
    _refuse_clash(conn, name)
    res = conn.execute(users.insert().values(name=name, created=now))
    pk = res.inserted_primary_key
    assert pk is not None
    return User(int(pk[0]), name, now)


def list_all(conn: Connection) -> list[User]:
    """Every user, by id."""
    rows = conn.execute(sa.select(users).order_by(users.c.id)).all()
    return [User(int(r.id), r.name, r.created) for r in rows]


def emails(conn: Connection) -> dict[str, str]:
    """Login name -> email of every user with an email (those of an OpenID Connect login)."""
    rows = conn.execute(sa.select(users.c.name, users.c.email).where(users.c.email != "")).all()
    return {str(r.name): str(r.email) for r in rows if r.email}


def user_id(conn: Connection, name: str) -> int:
    """The id of user ``name``. Raises ConfigError when there is none."""
    row = conn.execute(sa.select(users.c.id).where(users.c.name == name)).first()
    if row is None:
        if not _USER_NAME.fullmatch(name):  # (no user can have it: suggest no command that would refuse it)
            raise ConfigError(f"there is no user {name!r} (not a valid user name)")
        raise ConfigError(f"there is no user {name}; create it with `tailpy control users create {name}`")
    return int(row.id)


def default_user_id(conn: Connection, now: float) -> int:
    """The id of the user :data:`DEFAULT_USER`, created when missing. Raises ConfigError when it is missing
    and another user's name equals it ignoring case and a trailing ``@``."""
    row = conn.execute(sa.select(users.c.id).where(users.c.name == DEFAULT_USER)).first()
    if row is not None:
        return int(row.id)
    _refuse_clash(conn, DEFAULT_USER)
    res = conn.execute(users.insert().values(name=DEFAULT_USER, created=now))
    assert res.inserted_primary_key is not None
    return int(res.inserted_primary_key[0])


def delete(conn: Connection, name: str) -> None:
    """Delete user ``name`` and its auth keys. Raises ConfigError when it is unknown or still owns live
    nodes."""
    uid = user_id(conn, name)
    n = len(
        conn.execute(sa.select(nodes.c.id).where(nodes.c.user_id == uid, nodes.c.deleted.is_(None))).all()
    )
    if n:
        raise ConfigError(
            f"user {name} still owns {n} node(s); delete them first (`tailpy control nodes list`)"
        )
    conn.execute(auth_keys.delete().where(auth_keys.c.user_id == uid))
    conn.execute(nodes.update().where(nodes.c.user_id == uid).values(user_id=None))
    conn.execute(users.delete().where(users.c.id == uid))


def _login_name(issuer: str, subject: str, email: str) -> str:
    base = email or f"{subject}@{issuer.split('://')[-1].split('/')[0]}"
    return _NAME_BAD.sub("-", base).lstrip("._@+-")[:60] or "user"


def for_login(conn: Connection, issuer: str, subject: str, email: str, display_name: str, now: float) -> int:
    """The id of the user of an identity provider's ``issuer`` and ``subject``, created on first login
    (named after ``email``, else ``subject@issuer-host``; ``-2``, ``-3``... appended when the name is taken,
    names equal ignoring case and a trailing ``@`` counting as taken),
    its ``email`` and ``display_name`` refreshed."""
    row = conn.execute(
        sa.select(users.c.id).where(users.c.oidc_issuer == issuer, users.c.oidc_subject == subject)
    ).first()
    if row is not None:
        conn.execute(
            users.update().where(users.c.id == row.id).values(email=email, display_name=display_name)
        )
        return int(row.id)
    base = _login_name(issuer, subject, email)
    name, n = base, 1
    while _clash(conn, name) is not None:
        n += 1
        name = f"{base}-{n}"
    res = conn.execute(
        users.insert().values(
            name=name,
            created=now,
            oidc_issuer=issuer,
            oidc_subject=subject,
            email=email,
            display_name=display_name,
        )
    )
    assert res.inserted_primary_key is not None
    return int(res.inserted_primary_key[0])


__all__ = [
    "DEFAULT_USER",
    "User",
    "create",
    "default_user_id",
    "delete",
    "emails",
    "for_login",
    "list_all",
    "user_id",
]
