"""DERP relay over the codec :mod:`tailpy.proto.derp`: the HTTP front :class:`DerpServer`
(:mod:`tailpy.derp.server`), the relay core :class:`Relay` (:mod:`tailpy.derp.relay`), its counters
:class:`Metrics` (:mod:`tailpy.derp.metrics`), the WebSocket transport (:mod:`tailpy.derp.ws`), client
admission (:mod:`tailpy.derp.verify`), the mesh of several relays in one region (:mod:`tailpy.derp.mesh`) and
the STUN server (:mod:`tailpy.derp.stun_server`)."""

from __future__ import annotations

from tailpy.derp.metrics import Metrics
from tailpy.derp.relay import Conn, Relay
from tailpy.derp.server import DerpServer, load_or_create_key

__all__ = ["Conn", "DerpServer", "Metrics", "Relay", "load_or_create_key"]
