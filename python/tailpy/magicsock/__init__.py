"""magicsock: a node's paths to its peers (direct UDP through NATs, or the DERP relay).

:class:`Conn` is the one owner (Tailscale's ``wgengine/magicsock``): methods in, callbacks out
(:class:`Options`). Its parts are sans-IO where they can be and tested alone: :class:`HomeChooser` (home
region with hysteresis), :mod:`tailpy.magicsock.disco` and :mod:`tailpy.magicsock.paths` (path discovery),
:mod:`tailpy.magicsock.netcheck` and :mod:`tailpy.magicsock.stun`; the I/O shells are
:class:`DerpConnections` and :class:`Relay` (DERP) and :mod:`tailpy.magicsock.linkmon`.
"""

from __future__ import annotations

from tailpy.magicsock.conn import DISCO_MAGIC, Conn, ConnDevice, ConnStatus, Options
from tailpy.magicsock.derp import DerpConnections, measure_latency
from tailpy.magicsock.home import HomeChooser, LatencyReport
from tailpy.magicsock.ping import PingReply
from tailpy.magicsock.relay import Relay

__all__ = [
    "DISCO_MAGIC",
    "Conn",
    "ConnDevice",
    "ConnStatus",
    "DerpConnections",
    "HomeChooser",
    "LatencyReport",
    "Options",
    "PingReply",
    "Relay",
    "measure_latency",
]
