"""DERP relay: the asyncio server (:mod:`tailpy.derp.server`) over the codec :mod:`tailpy.proto.derp`."""

from __future__ import annotations

from tailpy.derp.server import DerpServer, Metrics, load_or_create_key

__all__ = ["DerpServer", "Metrics", "load_or_create_key"]
