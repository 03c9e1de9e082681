"""The DERP relay's counters and gauges (:class:`Metrics`), and their Prometheus text exposition (format
0.0.4) that the HTTP front serves at ``/debug/metrics``. Names follow derper's expvar metrics
(``derp/derpserver/derpserver.go``: ``accepts``, ``packets_dropped_reason_*``, ...)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

DROP_REASONS = (
    "unknown_dest",
    "unknown_dest_on_fwd",
    "gone_disconnected",
    "queue_head",
    "queue_tail",
    "write_error",
)
"""Labels of ``derp_packets_dropped_total`` (names as derpserver's ``dropReason``): no such key here (nor in
the mesh); no such key here for a packet a mesh peer forwarded; the receiver left before its packet was
written; its queue was full (oldest dropped); a mesh peer's connection was full (newest dropped); the write
failed or the mesh peer is not connected."""

REFUSAL_REASONS = ("not_admitted", "verify_failed")
"""Labels of ``derp_clients_refused_total``: the verifier said no; the verifier could not answer."""


@dataclass
class Metrics:
    """Counters and gauges, exported by :meth:`prometheus` (Prometheus text format 0.0.4)."""

    clients: int = 0
    home_clients: int = 0
    duplicate_keys: int = 0
    accepts: int = 0
    websocket_accepts: int = 0
    login_failures: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_relayed: int = 0
    bytes_relayed: int = 0
    packets_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bytes_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    peer_gone_frames: dict[str, int] = field(default_factory=lambda: {"disconnected": 0, "not_here": 0})
    packets_forwarded_out: int = 0
    bytes_forwarded_out: int = 0
    packets_forwarded_in: int = 0
    bytes_forwarded_in: int = 0
    mesh_peers: int = 0
    mesh_peers_connected: int = 0
    mesh_watchers: int = 0
    remote_clients: int = 0
    pings: int = 0
    ignored_frames: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    disconnects: dict[str, int] = field(default_factory=collections.Counter)

    def drop(self, reason: str, nbytes: int) -> None:
        """Count a dropped packet of ``nbytes`` bytes under ``reason`` (one of :data:`DROP_REASONS`)."""
        self.packets_dropped[reason] += 1
        self.bytes_dropped[reason] += nbytes

    def prometheus(self) -> str:
        """Every counter and gauge as Prometheus text (``# HELP``, ``# TYPE`` and value lines)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, values: dict[str, int] | int, label: str = "") -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            if isinstance(values, int):
                out.append(f"{name} {values}")
            else:
                for k, v in sorted(values.items()):
                    out.append(f'{name}{{{label}="{k}"}} {v}')

        metric("derp_clients", "gauge", "Connected DERP clients (connections).", self.clients)
        metric(
            "derp_home_clients", "gauge", "Clients that said this server is their home.", self.home_clients
        )
        metric("derp_duplicate_client_keys", "gauge", "Keys connected more than once.", self.duplicate_keys)
        metric("derp_accepts_total", "counter", "Connections that completed the login.", self.accepts)
        metric(
            "derp_websocket_accepts_total",
            "counter",
            "WebSocket upgrades accepted at /derp.",
            self.websocket_accepts,
        )
        metric("derp_login_failures_total", "counter", "Connections refused at login.", self.login_failures)
        metric(
            "derp_clients_refused_total",
            "counter",
            "Logins refused by client verification, by reason.",
            self.refused,
            "reason",
        )
        metric("derp_packets_received_total", "counter", "SendPacket frames received.", self.packets_received)
        metric("derp_bytes_received_total", "counter", "Packet bytes received.", self.bytes_received)
        metric(
            "derp_packets_relayed_total",
            "counter",
            "Packets written to their destination.",
            self.packets_relayed,
        )
        metric(
            "derp_bytes_relayed_total",
            "counter",
            "Packet bytes written to their destination.",
            self.bytes_relayed,
        )
        metric(
            "derp_packets_dropped_total",
            "counter",
            "Packets dropped, by reason.",
            self.packets_dropped,
            "reason",
        )
        metric(
            "derp_bytes_dropped_total",
            "counter",
            "Packet bytes dropped, by reason.",
            self.bytes_dropped,
            "reason",
        )
        metric(
            "derp_peer_gone_frames_total", "counter", "PeerGone frames sent.", self.peer_gone_frames, "reason"
        )
        metric("derp_mesh_peers", "gauge", "Mesh peers this server dials (--mesh-with, itself left out).",
               self.mesh_peers)  # fmt: skip
        metric("derp_mesh_peers_connected", "gauge", "Mesh peers whose connections are watched now.",
               self.mesh_peers_connected)  # fmt: skip
        metric("derp_mesh_watchers", "gauge", "Mesh peers watching this server's connections.",
               self.mesh_watchers)  # fmt: skip
        metric("derp_remote_clients", "gauge", "Keys reachable through a mesh peer.", self.remote_clients)
        metric("derp_packets_forwarded_out_total", "counter", "Packets forwarded to a mesh peer.",
               self.packets_forwarded_out)  # fmt: skip
        metric("derp_bytes_forwarded_out_total", "counter", "Packet bytes forwarded to a mesh peer.",
               self.bytes_forwarded_out)  # fmt: skip
        metric("derp_packets_forwarded_in_total", "counter", "Packets a mesh peer forwarded here.",
               self.packets_forwarded_in)  # fmt: skip
        metric("derp_bytes_forwarded_in_total", "counter", "Packet bytes a mesh peer forwarded here.",
               self.bytes_forwarded_in)  # fmt: skip
        metric("derp_pings_total", "counter", "Ping frames answered.", self.pings)
        metric(
            "derp_ignored_frames_total",
            "counter",
            "Frames of types a client does not send to a server (or unknown), read and ignored.",
            self.ignored_frames,
        )
        metric(
            "derp_disconnects_total",
            "counter",
            "Closed client connections, by cause.",
            dict(self.disconnects),
            "cause",
        )
        return "\n".join(out) + "\n"


__all__ = ["DROP_REASONS", "REFUSAL_REASONS", "Metrics"]
