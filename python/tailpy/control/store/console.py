"""The web console's revoked one-time tokens (:data:`tailpy.control.store.schema.console_revoked`): ids of
signed-out sessions and one-time form tokens already used, each kept until it would have expired anyway.
Functions over an open transaction, as the other modules of :mod:`tailpy.control.store`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from tailpy.control.store.schema import console_revoked


def revoke(conn: Connection, token: str, expires: float, now: float) -> bool:
    """Record ``token`` as revoked until ``expires`` (unix seconds) and prune rows expired at ``now``.
    Returns False when it was already revoked (a one-time token sent twice, also by two replicas at once),
    True otherwise: one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (SQLite 3.35+, PostgreSQL) whose
    returned row says which, so a concurrent insert of the same token is never an IntegrityError."""
    conn.execute(console_revoked.delete().where(console_revoked.c.expires <= now))
    values = {"token": token, "expires": expires}
    insert: postgresql.Insert | sqlite.Insert
    if conn.dialect.name == "postgresql":
        insert = postgresql.insert(console_revoked)
    elif conn.dialect.name == "sqlite":
        insert = sqlite.insert(console_revoked)
    else:  # another database: a read then an insert (a race there is the database's IntegrityError)
        seen = conn.execute(sa.select(console_revoked.c.token).where(console_revoked.c.token == token))
        if seen.first() is not None:
            return False
        conn.execute(console_revoked.insert().values(values))
        return True
    stmt = insert.values(values).on_conflict_do_nothing().returning(console_revoked.c.token)
    return conn.execute(stmt).first() is not None


def release(conn: Connection, token: str) -> None:
    """Forget ``token``'s revocation: a one-time token spent for an action that was then refused (nothing
    done) may be sent again."""
    conn.execute(console_revoked.delete().where(console_revoked.c.token == token))


def is_revoked(conn: Connection, token: str, now: float) -> bool:
    """Whether ``token`` is revoked and its row has not expired at ``now`` (one primary-key read)."""
    row = conn.execute(sa.select(console_revoked.c.expires).where(console_revoked.c.token == token)).first()
    return row is not None and float(row.expires) > now
