"""Machines that signed in (OpenID Connect login) and wait for an admin's approval when the server asks for
manual approval (``--approve-nodes``): one entry per machine key in ``pending_nodes``, replaced by a later
login of the same machine and removed when the machine is registered or rejected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import pending_nodes, users
from tailpy.errors import ConfigError
from tailpy.keys import MachinePublic, NodePublic


@dataclass(frozen=True)
class PendingNode:
    """A machine that signed in and waits for an admin's approval (``tailpy control nodes approve ID``):
    ``user`` and ``email`` of the user it signed in as, ``key_expiry`` and ``created`` unix seconds."""

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


def _query() -> sa.Select[Any]:
    return sa.select(
        pending_nodes, users.c.name.label("user_name"), users.c.email.label("user_email")
    ).select_from(pending_nodes.outerjoin(users, pending_nodes.c.user_id == users.c.id))


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


def add(
    conn: Connection,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    os_name: str,
    user_id: int,
    now: float,
    key_expiry: float | None,
    expiry_fixed: bool,
) -> PendingNode:
    """Park ``machine_key`` (replacing its earlier entry); returns the entry."""
    mk = machine_key.text()
    forget_machine(conn, machine_key)
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
    return _to_pending(conn.execute(_query().where(pending_nodes.c.machine_key == mk)).one())


def forget_machine(conn: Connection, machine_key: MachinePublic) -> None:
    """Remove ``machine_key``'s entry, if any (it was registered)."""
    conn.execute(pending_nodes.delete().where(pending_nodes.c.machine_key == machine_key.text()))


def list_all(conn: Connection) -> list[PendingNode]:
    """Every entry, oldest first."""
    return [_to_pending(r) for r in conn.execute(_query().order_by(pending_nodes.c.id)).all()]


def by_machine_key(conn: Connection, machine_key: MachinePublic) -> PendingNode | None:
    """The entry of ``machine_key``, or None."""
    row = conn.execute(_query().where(pending_nodes.c.machine_key == machine_key.text())).first()
    return None if row is None else _to_pending(row)


def get(conn: Connection, pending_id: int) -> tuple[PendingNode, int, bool]:
    """Entry ``pending_id`` with the id of the user it signed in as and whether its key expiry came from the
    ID token. Raises ConfigError when there is none."""
    row = conn.execute(_query().where(pending_nodes.c.id == pending_id)).first()
    if row is None:
        raise ConfigError(f"there is no pending node {pending_id}; see `tailpy control nodes pending`")
    return _to_pending(row), int(row.user_id), bool(row.key_expiry_fixed)


def delete(conn: Connection, pending_id: int) -> None:
    """Remove entry ``pending_id``."""
    conn.execute(pending_nodes.delete().where(pending_nodes.c.id == pending_id))


__all__ = ["PendingNode", "add", "by_machine_key", "delete", "forget_machine", "get", "list_all"]
