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

from tailpy.control.client import ControlClient
from tailpy.control.server import ControlServer, parse_endpoints
from tailpy.control.service import ControlConfig, ControlProcess, run_control
from tailpy.control.store import MIGRATIONS, AuthKey, Store, dns_label

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
