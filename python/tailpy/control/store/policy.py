"""The tailnet policy's history: every accepted policy (HuJSON text as given), who set it and when. The
newest row is the running policy; none means no policy (every node may reach every other, Tailscale's
default). Rows are never changed or deleted, so the history shows every policy that ran.

The text is stored as given (comments and all) and parsed by :class:`tailpy.control.policy.Policy` when it
is read back; what may be stored is decided before (:mod:`tailpy.control.acl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import policies

MAX_POLICY_BYTES = 1 << 20
"""Largest policy text stored, UTF-8 bytes (1 MiB, as Tailscale's policy file limit)."""


@dataclass(frozen=True)
class PolicyRecord:
    """One policy of the history: ``id`` (increasing), ``text`` (HuJSON as given), ``set_by`` (who: the
    admin's login name, ``file:<path>``, ...), ``set_at`` (unix seconds)."""

    id: int
    text: str
    set_by: str
    set_at: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "set_by": self.set_by, "set_at": self.set_at}


def _record(r: Any) -> PolicyRecord:
    return PolicyRecord(int(r.id), str(r.text), str(r.set_by or ""), float(r.set_at))


def current(conn: Connection) -> PolicyRecord | None:
    """The running policy (the newest row), or None when none was ever set."""
    r = conn.execute(sa.select(policies).order_by(policies.c.id.desc()).limit(1)).first()
    return None if r is None else _record(r)


def current_id(conn: Connection) -> int:
    """The id of the running policy (0: none); one indexed read, for polling."""
    v = conn.execute(sa.select(sa.func.max(policies.c.id))).scalar()
    return int(v or 0)


def add(conn: Connection, text: str, set_by: str, now: float) -> PolicyRecord:
    """Store ``text`` as the running policy, set by ``set_by`` at ``now`` (unix seconds)."""
    res = conn.execute(policies.insert().values(text=text, set_by=set_by, set_at=now))
    pk = res.inserted_primary_key
    assert pk is not None
    return PolicyRecord(int(pk[0]), text, set_by, now)


def get(conn: Connection, policy_id: int) -> PolicyRecord | None:
    """Stored policy ``policy_id``, or None when there is none with that id."""
    r = conn.execute(sa.select(policies).where(policies.c.id == policy_id)).first()
    return None if r is None else _record(r)


def history(conn: Connection, limit: int = 20) -> list[PolicyRecord]:
    """The last ``limit`` policies, newest first."""
    rows = conn.execute(sa.select(policies).order_by(policies.c.id.desc()).limit(limit)).all()
    return [_record(r) for r in rows]


__all__ = ["MAX_POLICY_BYTES", "PolicyRecord", "add", "current", "current_id", "get", "history"]
