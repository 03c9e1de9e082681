"""The coordination server ("control") and the node's client for it.

* :class:`ControlServer` (``tailpy control serve``): registers machines, hands out names and addresses,
  streams each node its netmap.
* :class:`Store`: the server's SQLite state (nodes, auth keys, schema migrations).
* :class:`ControlClient`: what tailpyd uses to register and follow its netmap.

The wire format is in :mod:`tailpy.proto.control`.
"""

from tailpy.control.client import ControlClient
from tailpy.control.server import ControlServer, parse_endpoints
from tailpy.control.store import MIGRATIONS, AuthKey, Store, dns_label

__all__ = ["MIGRATIONS", "AuthKey", "ControlClient", "ControlServer", "Store", "dns_label", "parse_endpoints"]
