"""PostgreSQL's driver is optional: ``pip install 'tailpy[postgres]'`` brings psycopg 3 (with its binary
libpq build). SQLite, the default database, needs nothing more."""

from __future__ import annotations

import importlib

from tailpy.errors import ConfigError

EXTRA = "tailpy[postgres]"


def require_psycopg() -> None:
    """Import psycopg (SQLAlchemy's ``postgresql+psycopg`` dialect loads it) or raise
    :class:`~tailpy.errors.ConfigError` with a sentence naming the extra to install.

    psycopg raises ImportError both when the package is absent and when it finds no libpq to bind."""
    try:
        importlib.import_module("psycopg")
    except ImportError as e:
        raise ConfigError(
            f"a postgresql:// database needs the psycopg driver, which is not installed ({e}); "
            f"install tailpy with the PostgreSQL extra: pip install '{EXTRA}'"
        ) from None
