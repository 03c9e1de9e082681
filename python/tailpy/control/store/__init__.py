"""The coordination server's state through SQLAlchemy 2 Core: SQLite (``<state_dir>/control.db``, WAL) by
default, or PostgreSQL (``--db postgresql://user@host/db``).

:class:`Store` is the public API: one method per operation, each one serialized transaction. Behind it, one
module per concern, each a set of functions over an open transaction:

* :mod:`~tailpy.control.store.schema`: tables, the ordered :data:`MIGRATIONS` and indexes;
* :mod:`~tailpy.control.store.database`: the ``--db`` URL, engine setup (one writer at a time), the SQLite
  files' modes, the server key file;
* :mod:`~tailpy.control.store.settings`: tailnet domain, address prefixes, DNS configuration;
* :mod:`~tailpy.control.store.users`: users, including those of an OpenID Connect login;
* :mod:`~tailpy.control.store.authkeys`: pre-auth keys (stored hashed);
* :mod:`~tailpy.control.store.addresses`: address allocation (lowest free, never reused);
* :mod:`~tailpy.control.store.nodes`: registration, key rotation, logout, admin changes, timers;
* :mod:`~tailpy.control.store.pending`: logins waiting for an admin's approval.
"""

from __future__ import annotations

from tailpy.control import names
from tailpy.control.store.addresses import IPV4_RANGE, IPV6_RANGE, RESERVED, first_free
from tailpy.control.store.authkeys import CREATE_HINT, AuthKey, parse_tags
from tailpy.control.store.database import DB_NAME, KEY_NAME, database_url
from tailpy.control.store.facade import Store, now
from tailpy.control.store.nodes import DEFAULT_KEY_LIFETIME
from tailpy.control.store.pending import PendingNode
from tailpy.control.store.schema import AUTH_KEY_PREFIX, MIGRATIONS, auth_key_prefix, hash_auth_key
from tailpy.control.store.settings import Settings
from tailpy.control.store.users import DEFAULT_USER, User


def dns_label(hostname: str) -> str:
    """``hostname`` as a DNS label (see :func:`tailpy.control.names.sanitize`)."""
    return names.sanitize(hostname)


__all__ = [
    "AUTH_KEY_PREFIX",
    "CREATE_HINT",
    "DB_NAME",
    "DEFAULT_KEY_LIFETIME",
    "DEFAULT_USER",
    "IPV4_RANGE",
    "IPV6_RANGE",
    "KEY_NAME",
    "MIGRATIONS",
    "RESERVED",
    "AuthKey",
    "PendingNode",
    "Settings",
    "Store",
    "User",
    "auth_key_prefix",
    "database_url",
    "dns_label",
    "first_free",
    "hash_auth_key",
    "now",
    "parse_tags",
]
