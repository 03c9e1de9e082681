"""Users from an identity provider and nodes registered by login (:mod:`tailpy.control.oidc`), over
:class:`Store`'s database.

A login with OpenID Connect gives an :class:`Identity` (issuer and subject: who it is for good; email, name
and groups: what it says about itself now). :func:`user_for_identity` finds the tailpy user of that issuer
and subject, or creates one named after the email (``alice@example.com``; ``alice@example.com-2`` when the
name is taken by another user), and keeps email and display name up to date.

:func:`register_for_user` registers a machine for such a user (no auth key: the login was the proof).
When the server asks for manual approval, a machine that has no live node yet is parked in ``pending_nodes``
instead (:func:`add_pending`); :func:`approve_pending` registers it, :func:`reject_pending` forgets it.
The tables come from migration 6 in :mod:`tailpy.control.store`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store import Store, nodes, pending_nodes, users
from tailpy.errors import ConfigError, ControlError
from tailpy.keys import MachinePublic, NodePublic
from tailpy.netmap import Node

oidc_users = users  # with the columns of migration 6
_NAME_BAD = re.compile(r"[^A-Za-z0-9._@+-]")


@dataclass(frozen=True)
class Identity:
    """Who signed in, from a verified ID token: ``issuer`` URL and ``subject`` (the provider's stable id),
    ``email`` ("" when not given), ``email_verified``, ``name`` (display name, may be ""), ``groups`` (from
    the configured groups claim) and ``expires`` (the token's ``exp``, unix seconds)."""

    issuer: str
    subject: str
    email: str = ""
    email_verified: bool = False
    name: str = ""
    groups: tuple[str, ...] = ()
    expires: float | None = None

    @property
    def shown(self) -> str:
        """How pages and logs name this identity: the email, else the subject."""
        return self.email or self.subject


@dataclass(frozen=True)
class PendingNode:
    """A machine that signed in and waits for an admin's approval (``tailpy control nodes approve ID``)."""

    id: int
    machine_key: MachinePublic
    node_key: NodePublic
    hostname: str
    os: str
    user: str
    email: str
    key_expiry: float | None
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "machine_key": self.machine_key.text(),
            "node_key": self.node_key.text(),
            "hostname": self.hostname,
            "os": self.os,
            "user": self.user,
            "email": self.email,
            "key_expiry": self.key_expiry,
            "created": self.created,
        }


def _user_name(identity: Identity) -> str:
    base = identity.email or f"{identity.subject}@{identity.issuer.split('://')[-1].split('/')[0]}"
    base = _NAME_BAD.sub("-", base).lstrip("._@+-")[:60] or "user"
    return base


def user_for_identity(store: Store, identity: Identity, now: float) -> int:
    """The id of the user for ``identity`` (issuer + subject), created on first login; its email and display
    name are refreshed from the token."""
    with store.engine.begin() as conn:
        row = conn.execute(
            sa.select(oidc_users.c.id).where(
                oidc_users.c.oidc_issuer == identity.issuer, oidc_users.c.oidc_subject == identity.subject
            )
        ).first()
        if row is not None:
            conn.execute(
                oidc_users.update()
                .where(oidc_users.c.id == row.id)
                .values(email=identity.email, display_name=identity.name)
            )
            return int(row.id)
        base = _user_name(identity)
        name, n = base, 1
        while conn.execute(sa.select(oidc_users.c.id).where(oidc_users.c.name == name)).first() is not None:
            n += 1
            name = f"{base}-{n}"
        res = conn.execute(
            oidc_users.insert().values(
                name=name,
                created=now,
                oidc_issuer=identity.issuer,
                oidc_subject=identity.subject,
                email=identity.email,
                display_name=identity.name,
            )
        )
        assert res.inserted_primary_key is not None
        return int(res.inserted_primary_key[0])


def has_live_node(store: Store, machine_key: MachinePublic) -> bool:
    """True when ``machine_key`` has a node in the tailnet (not deleted): a re-login needs no approval."""
    with store.engine.begin() as conn:
        row = conn.execute(
            sa.select(nodes.c.id).where(nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
        ).first()
    return row is not None


def _register(
    store: Store,
    conn: Connection,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    os_name: str,
    user_id: int,
    now: float,
    key_expiry: float | None,
    expiry_fixed: bool,
) -> Node:
    row = conn.execute(sa.select(nodes).where(nodes.c.machine_key == machine_key.text())).first()
    clash = conn.execute(
        sa.select(nodes.c.id).where(
            nodes.c.node_key == node_key.text(), nodes.c.machine_key != machine_key.text()
        )
    ).first()
    if clash is not None:
        raise ControlError(f"node key {node_key.short()} belongs to another machine; generate a new node key")
    disabled = bool(row.expiry_disabled) if row is not None else False
    values: dict[str, Any] = {
        "node_key": node_key.text(),
        "hostname": hostname,
        "last_seen": now,
        "user_id": user_id,
        "tags": "[]",
        "ephemeral": False,
        "key_expiry": None if disabled else key_expiry,
        "key_expiry_fixed": expiry_fixed and key_expiry is not None,
        "logged_out": False,
    }
    if os_name:
        values["os"] = os_name
    node_id = store._write_node(conn, row, machine_key, hostname, values, now)
    conn.execute(pending_nodes.delete().where(pending_nodes.c.machine_key == machine_key.text()))
    return store._node(conn, node_id, now)


def register_for_user(
    store: Store,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    os_name: str,
    user_id: int,
    now: float,
    key_expiry: float | None,
    *,
    expiry_fixed: bool = False,
) -> Node:
    """Register (or re-register) ``machine_key`` with ``node_key`` for user ``user_id`` after a login: the
    same one record per machine as :meth:`Store.register` (id, addresses, name kept), owned by the user, no
    tags, key expiring at ``key_expiry`` (unix seconds; None: never, and never when disabled for the node).
    ``expiry_fixed``: the expiry came from the ID token, and node key rotation keeps it.
    Raises ControlError when the node key belongs to another machine or the address pool is exhausted."""
    with store.engine.begin() as conn:
        return _register(
            store, conn, machine_key, node_key, hostname, os_name, user_id, now, key_expiry, expiry_fixed
        )


def add_pending(
    store: Store,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    os_name: str,
    user_id: int,
    now: float,
    key_expiry: float | None,
    *,
    expiry_fixed: bool = False,
) -> PendingNode:
    """Park ``machine_key`` (signed in as ``user_id``) until an admin approves it; a later login of the same
    machine replaces its entry. Returns it."""
    mk = machine_key.text()
    with store.engine.begin() as conn:
        conn.execute(pending_nodes.delete().where(pending_nodes.c.machine_key == mk))
        conn.execute(
            pending_nodes.insert().values(
                machine_key=mk,
                node_key=node_key.text(),
                hostname=hostname,
                os=os_name,
                user_id=user_id,
                key_expiry=key_expiry,
                key_expiry_fixed=expiry_fixed,
                created=now,
            )
        )
        row = conn.execute(_pending_query().where(pending_nodes.c.machine_key == mk)).one()
    return _to_pending(row)


def _pending_query() -> sa.Select[Any]:
    return sa.select(
        pending_nodes, oidc_users.c.name.label("user_name"), oidc_users.c.email.label("user_email")
    ).select_from(pending_nodes.outerjoin(oidc_users, pending_nodes.c.user_id == oidc_users.c.id))


def _to_pending(r: Any) -> PendingNode:
    return PendingNode(
        int(r.id),
        MachinePublic.from_text(r.machine_key),
        NodePublic.from_text(r.node_key),
        r.hostname,
        r.os or "",
        r.user_name or "",
        r.user_email or "",
        r.key_expiry,
        r.created,
    )


def list_pending(store: Store) -> list[PendingNode]:
    """Machines waiting for approval, oldest first."""
    with store.engine.begin() as conn:
        rows = conn.execute(_pending_query().order_by(pending_nodes.c.id)).all()
    return [_to_pending(r) for r in rows]


def pending_for(store: Store, machine_key: MachinePublic) -> PendingNode | None:
    """The approval entry of ``machine_key``, or None."""
    with store.engine.begin() as conn:
        row = conn.execute(_pending_query().where(pending_nodes.c.machine_key == machine_key.text())).first()
    return None if row is None else _to_pending(row)


def approve_pending(store: Store, pending_id: int, now: float) -> Node:
    """Register pending machine ``pending_id`` for the user it signed in as. Raises ConfigError when there is
    no such entry, ControlError as :func:`register_for_user`."""
    with store.engine.begin() as conn:
        row = conn.execute(_pending_query().where(pending_nodes.c.id == pending_id)).first()
        if row is None:
            raise ConfigError(f"there is no pending node {pending_id}; see `tailpy control nodes pending`")
        p = _to_pending(row)
        return _register(
            store,
            conn,
            p.machine_key,
            p.node_key,
            p.hostname,
            p.os,
            int(row.user_id),
            now,
            p.key_expiry,
            bool(row.key_expiry_fixed),
        )


def reject_pending(store: Store, pending_id: int) -> PendingNode:
    """Forget pending machine ``pending_id`` (it may sign in again). Raises ConfigError when unknown."""
    with store.engine.begin() as conn:
        row = conn.execute(_pending_query().where(pending_nodes.c.id == pending_id)).first()
        if row is None:
            raise ConfigError(f"there is no pending node {pending_id}; see `tailpy control nodes pending`")
        conn.execute(pending_nodes.delete().where(pending_nodes.c.id == pending_id))
    return _to_pending(row)


__all__ = [
    "Identity",
    "PendingNode",
    "add_pending",
    "approve_pending",
    "has_live_node",
    "list_pending",
    "pending_for",
    "register_for_user",
    "reject_pending",
    "user_for_identity",
]
