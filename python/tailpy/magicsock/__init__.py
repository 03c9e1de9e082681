"""magicsock: a node's paths to its peers: DERP home region and relay, path policy (later: disco, STUN).

:class:`MagicSock` ties the pieces to the data plane; :class:`HomeChooser` (home region with hysteresis) and
:class:`FallbackPolicy` (direct first, relay when no handshake completes) are sans-IO and tested alone.
"""

from __future__ import annotations

from tailpy.magicsock.conn import DISCO_MAGIC, DiscoHandler, MagicSock, RelayDevice
from tailpy.magicsock.derp import DerpConnections, measure_latency
from tailpy.magicsock.fallback import FallbackPolicy
from tailpy.magicsock.home import HomeChooser, LatencyReport

__all__ = [
    "DISCO_MAGIC",
    "DerpConnections",
    "DiscoHandler",
    "FallbackPolicy",
    "HomeChooser",
    "LatencyReport",
    "MagicSock",
    "RelayDevice",
    "measure_latency",
]
