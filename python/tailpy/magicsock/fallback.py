"""The interim path policy: direct first, relay (DERP) when no direct path works (sans-IO, ``now`` passed in).

Until disco ("relay from the first packet, upgrade to direct on a pong") replaces it, a peer's path is:

* no home DERP region: direct (there is nowhere to relay through);
* no direct endpoint: relay at once (and back to direct when control brings one, unless another rule below
  has relayed the peer meanwhile);
* otherwise direct, until the data plane shows we are sending to the peer and hearing nothing back: our
  transmit counter grew and the receive counter did not move for :data:`NO_SESSION_WAIT` seconds while there
  is no fresh WireGuard handshake (REKEY_TIMEOUT 5 s: a handshake would have completed), or for
  :data:`SESSION_WAIT` seconds and at least :data:`SESSION_UNANSWERED` datagrams with one (KEEPALIVE 10 s +
  REKEY_TIMEOUT 5 s: the peer would have answered or re-keyed; a lone passive keepalive, which the peer never
  answers, does not count). Then relay;
* the device's socket refusing datagrams (``dropped_send_error`` grew: a local firewall, an unroutable
  endpoint) counts as sending unanswered for every direct peer with no fresh handshake, since the data plane
  counts only datagrams that left in ``tx_packets`` (it cannot say which peer the refused ones were for; an
  idle peer with no session may thus be relayed too, which still works);
* a WireGuard datagram arriving over DERP from a peer with no fresh handshake: relay at once, so the answer
  goes back the way the peer can hear (the peer's direct path to us does not work, or it would not relay).

Otherwise relay is sticky: going back to direct is disco's job. :class:`FallbackPolicy` is one small object
so the daemon can swap it for disco's path selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Path = Literal["direct", "relay"]

NO_SESSION_WAIT = 5.0  # seconds of unanswered sending, no fresh handshake, before relaying
SESSION_WAIT = 20.0  # seconds of unanswered sending despite a session before relaying
SESSION_UNANSWERED = 3  # datagrams sent unanswered, despite a session, before relaying
IDLE_RESET = 30.0  # seconds without sending after which unanswered sending is forgotten
HANDSHAKE_FRESH = 130.0  # seconds a handshake counts as fresh (REKEY_AFTER 120 s + 2 x REKEY_TIMEOUT)


@dataclass
class _PeerTrack:
    path: Path = "direct"
    no_endpoint: bool = False  # relayed only because the peer had no endpoint
    tx: int = -1
    rx: int = -1
    unanswered_since: float | None = None  # first tx growth since rx last moved
    unanswered_tx: int = 0  # tx counter before that growth
    tx_moved: float = 0.0  # when tx last grew


class FallbackPolicy:
    """Per-peer path decisions from the data plane's counters (``device.peers()``), by node key bytes."""

    def __init__(
        self, *, no_session_wait: float = NO_SESSION_WAIT, session_wait: float = SESSION_WAIT
    ) -> None:
        self.no_session_wait = no_session_wait
        self.session_wait = session_wait
        self._peers: dict[bytes, _PeerTrack] = {}

    def path(self, key: bytes) -> Path:
        t = self._peers.get(key)
        return t.path if t is not None else "direct"

    def forget(self, key: bytes) -> None:
        """The peer left the netmap (or changed key)."""
        self._peers.pop(key, None)

    def observe(
        self,
        now: float,
        key: bytes,
        *,
        has_endpoint: bool,
        home_derp: int,
        tx_packets: int,
        rx_packets: int,
        last_handshake: float | None,
        send_errors: bool = False,
    ) -> Path:
        """The path for peer ``key`` given its counters now (``now`` and ``last_handshake`` unix seconds);
        ``send_errors``: the device's socket refused datagrams since the last call."""
        t = self._peers.setdefault(key, _PeerTrack())
        if home_derp == 0:
            t.path, t.no_endpoint = "direct", False
        elif not has_endpoint:
            if t.path == "direct":
                t.path, t.no_endpoint = "relay", True
        elif t.no_endpoint:
            t.path, t.no_endpoint = "direct", False
            t.unanswered_since = None
        if t.path == "relay" or home_derp == 0:
            t.tx, t.rx = tx_packets, rx_packets
            return t.path
        if t.tx < 0 and tx_packets > 0 and rx_packets == 0 and last_handshake is None:
            t.unanswered_since, t.unanswered_tx, t.tx_moved = now, 0, now  # sending before we first looked
        elif rx_packets != t.rx or now - t.tx_moved > IDLE_RESET:
            t.unanswered_since = None
        fresh = last_handshake is not None and now - last_handshake < HANDSHAKE_FRESH
        if (tx_packets != t.tx and t.tx >= 0) or (send_errors and not fresh):
            t.tx_moved = now
            if t.unanswered_since is None and rx_packets == t.rx:
                t.unanswered_since, t.unanswered_tx = now, t.tx
        t.tx, t.rx = tx_packets, rx_packets
        if t.unanswered_since is not None:
            waited = now - t.unanswered_since
            if fresh:
                stuck = waited >= self.session_wait and tx_packets - t.unanswered_tx >= SESSION_UNANSWERED
            else:
                stuck = waited >= self.no_session_wait
            if stuck:
                t.path = "relay"
                t.no_endpoint = False
        return t.path

    def received_via_derp(
        self, now: float, key: bytes, *, home_derp: int, last_handshake: float | None
    ) -> Path:
        """A WireGuard datagram from ``key`` came over DERP: relay to it unless a fresh handshake says the
        direct path works."""
        t = self._peers.setdefault(key, _PeerTrack())
        fresh = last_handshake is not None and now - last_handshake < HANDSHAKE_FRESH
        if home_derp != 0 and not fresh:
            t.path, t.no_endpoint = "relay", False
        return t.path


__all__ = [
    "HANDSHAKE_FRESH",
    "NO_SESSION_WAIT",
    "SESSION_UNANSWERED",
    "SESSION_WAIT",
    "FallbackPolicy",
    "Path",
]
