"""The answer to one ``tailpy ping`` (:class:`tailpy.ipnstate.PingReply`) from disco's
:class:`~tailpy.magicsock.paths.PingResult`, for :meth:`tailpy.magicsock.conn.Conn.ping`."""

from __future__ import annotations

from collections.abc import Callable

from tailpy.ipnstate import PingReply
from tailpy.magicsock.paths import PingResult, ViaDERP


def ping_reply(got: PingResult, region_code: Callable[[int], str]) -> PingReply:
    """The ``tailpy ping`` answer for disco's ``got``; ``region_code(region id)`` names a DERP region ("" if
    unknown). A Pong via DERP carries the DERP placeholder ``127.3.3.40:<region>`` as our source: the
    answer's ``peer_saw`` is None there, not that address."""
    if isinstance(got.via, ViaDERP):
        region = got.via.region
        code = region_code(region) if isinstance(region, int) else ""
        return PingReply(False, f"DERP({code or region})", got.rtt, None)
    return PingReply(got.direct, str(got.via), got.rtt, got.peer_saw)


__all__ = ["PingReply", "ping_reply"]
