"""The answer to one ``tailpy ping``: :class:`PingReply`, built from disco's
:class:`~tailpy.magicsock.paths.PingResult` by :meth:`tailpy.magicsock.conn.Conn.ping`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailpy.endpoint import Endpoint
from tailpy.magicsock.paths import PingResult, ViaDERP


@dataclass(frozen=True)
class PingReply:
    """One ``tailpy ping`` answer: ``via`` ``"DERP(<region code>)"`` or the direct endpoint's text
    ``"ip:port"``, ``rtt`` seconds, ``peer_saw`` our source as the peer saw it for a Pong that came
    directly, None (JSON null) for one that came via DERP (the peer saw only the DERP placeholder
    ``127.3.3.40:<region>``, not an address of ours); ``timeout`` True (``via`` empty, ``rtt`` and
    ``peer_saw`` None) when no Pong came in time."""

    direct: bool
    via: str
    rtt: float | None
    peer_saw: Endpoint | None = None
    timeout: bool = False

    @classmethod
    def from_result(cls, got: PingResult, region_code: Callable[[int], str]) -> PingReply:
        """The reply for disco's ``got``; ``region_code(region id)`` names a DERP region ("" if unknown)."""
        if isinstance(got.via, ViaDERP):
            region = got.via.region
            code = region_code(region) if isinstance(region, int) else ""
            return cls(False, f"DERP({code or region})", got.rtt, None)
        return cls(got.direct, str(got.via), got.rtt, got.peer_saw)

    def to_json(self) -> dict[str, Any]:
        return {
            "direct": self.direct,
            "via": self.via,
            "rtt": self.rtt,
            "peer_saw": None if self.peer_saw is None else str(self.peer_saw),
            "timeout": self.timeout,
        }


__all__ = ["PingReply"]
