"""The coordination server ("control") and the node's client for it.

* :class:`ControlServer` (``tailpy control serve``): registers machines, hands out names and addresses,
  streams each node its netmap.
* :class:`Store`: the server's state in SQLite or PostgreSQL (users, auth keys, nodes, settings, schema
  migrations).
* :class:`ControlClient`: what tailpyd uses to register and follow its netmap.
* :func:`run_control` / :class:`ControlProcess` over a :class:`ControlConfig`: the whole control process
  (server, embedded DERP relay and STUN server, admin socket) that ``tailpy control serve`` runs.

The wire format is in :mod:`tailpy.proto.control`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailpy.control.client import ControlClient
    from tailpy.control.server import ControlServer, parse_endpoints
    from tailpy.control.service import ControlConfig, ControlProcess, run_control
    from tailpy.control.store import MIGRATIONS, AuthKey, Store, dns_label

_EXPORTS = {
    "ControlClient": "tailpy.control.client",
    "ControlServer": "tailpy.control.server",
    "parse_endpoints": "tailpy.control.server",
    "ControlConfig": "tailpy.control.service",
    "ControlProcess": "tailpy.control.service",
    "run_control": "tailpy.control.service",
    "MIGRATIONS": "tailpy.control.store",
    "AuthKey": "tailpy.control.store",
    "Store": "tailpy.control.store",
    "dns_label": "tailpy.control.store",
}


def __getattr__(name: str) -> Any:
    """The names of :data:`__all__`, imported on first use (PEP 562), so that importing one light module of
    the package (``tailpy.control.options``, say) does not load the server, the database layer and aiohttp."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MIGRATIONS",
    "AuthKey",
    "ControlClient",
    "ControlConfig",
    "ControlProcess",
    "ControlServer",
    "Store",
    "dns_label",
    "parse_endpoints",
    "run_control",
]
