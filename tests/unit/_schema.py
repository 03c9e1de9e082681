"""Take a SQLite control database back to an older schema version, as an older tailpy left it, so a test
can check that the later migrations bring it forward. One undo list per migration from 4 on: extend it
with each migration added."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tailpy.control.store import MIGRATIONS

_UNDO: dict[int, tuple[str, ...]] = {
    4: ("ALTER TABLE nodes DROP COLUMN home_derp",),
    5: ("ALTER TABLE nodes DROP COLUMN disco_key",),
    6: (
        "DROP TABLE pending_nodes",
        "DROP INDEX ux_users_oidc",
        *(
            f"ALTER TABLE users DROP COLUMN {c}"
            for c in ("oidc_issuer", "oidc_subject", "email", "display_name")
        ),
    ),
    7: (
        "ALTER TABLE nodes DROP COLUMN key_expiry_fixed",
        "ALTER TABLE pending_nodes DROP COLUMN key_expiry_fixed",
    ),
    8: ("DROP INDEX ix_nodes_deleted", "ALTER TABLE nodes DROP COLUMN name_by_admin"),
    9: ("DROP TABLE policies",),
    10: ("ALTER TABLE nodes DROP COLUMN routable_ips", "ALTER TABLE nodes DROP COLUMN approved_routes"),
    11: ("DROP TABLE api_keys",),
    12: ("DROP INDEX ix_console_revoked_expires", "DROP TABLE console_revoked"),
}


def rewind(db: Path, version: int) -> None:
    """Undo migrations ``len(MIGRATIONS)`` down to ``version`` + 1 in ``db`` and record ``version``."""
    missing = [v for v in range(version + 1, len(MIGRATIONS) + 1) if v not in _UNDO]
    assert not missing, f"tests/unit/_schema.py has no undo for migrations {missing}"
    with sqlite3.connect(db) as c:
        for v in range(len(MIGRATIONS), version, -1):
            for sql in _UNDO[v]:
                c.execute(sql)
        c.execute("UPDATE schema_version SET version = ?", (version,))
