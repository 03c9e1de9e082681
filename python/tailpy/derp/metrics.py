"""The DERP relay's counters and gauges (:class:`Metrics`), and their two Prometheus text expositions:

* ``/debug/metrics``: :meth:`Metrics.prometheus`, hand-written, names as derper's expvar metrics
  (``derp/derpserver/derpserver.go``: ``accepts``, ``packets_dropped_reason_*``, ...) under ``derp_``; kept
  as it was for tools that scrape derper.
* ``/metrics``: :class:`RelayCollector` (and :class:`StunCollector`), read at scrape time by
  ``prometheus_client``, names under ``tailpy_derp_`` (``tailpy_stun_``) with units and ``_total`` as
  Prometheus names them, plus the send queues' depths; control serves the same families for its embedded
  relay in its own ``/metrics``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tailpy.derp.relay import Relay
    from tailpy.derp.stun_server import StunMetrics

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

DISCONNECT_REASONS = (
    "eof",
    "closed",
    "read_error",
    "idle_timeout",
    "bad_frame",
    "write_timeout",
    *REFUSAL_REASONS,
)
"""``reason`` labels of ``derp_disconnects_total``: the client closed; the server closed it (a duplicate key,
shutdown); a read failed; no frame within the idle and ping timeouts; a malformed frame; a write did not
finish in time; and the refusals of :data:`REFUSAL_REASONS`."""


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
    disconnects: dict[str, int] = field(
        default_factory=lambda: collections.Counter(dict.fromkeys(DISCONNECT_REASONS, 0))
    )

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
            "Closed client connections, by reason.",
            dict(self.disconnects),
            "reason",
        )
        return "\n".join(out) + "\n"


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, values: dict[str, int]
) -> CounterMetricFamily | GaugeMetricFamily:
    for k, v in sorted(values.items()):
        family.add_metric([k], v)
    return family


class RelayCollector(Collector):
    """The relay's counters and gauges for ``prometheus_client`` (register it in a ``CollectorRegistry``),
    read at scrape time from :attr:`Relay.metrics <tailpy.derp.relay.Relay.metrics>` and the relay's
    connections (queue depths):

    * gauges ``tailpy_derp_clients`` (connections), ``tailpy_derp_home_clients``,
      ``tailpy_derp_duplicate_client_keys``, ``tailpy_derp_queued_packets`` (packets waiting in every send
      queue), ``tailpy_derp_queue_depth_max_packets`` (the fullest queue), ``tailpy_derp_queue_limit_packets``
      (each queue's limit), ``tailpy_derp_mesh_peers``, ``tailpy_derp_mesh_peers_connected``,
      ``tailpy_derp_mesh_watchers``, ``tailpy_derp_remote_clients`` (keys reachable through a mesh peer);
    * counters ``tailpy_derp_accepts_total``, ``tailpy_derp_websocket_accepts_total``,
      ``tailpy_derp_login_failures_total``, ``tailpy_derp_clients_refused_total{reason}``,
      ``tailpy_derp_packets_received_total``, ``tailpy_derp_received_bytes_total``,
      ``tailpy_derp_packets_relayed_total``, ``tailpy_derp_relayed_bytes_total``,
      ``tailpy_derp_packets_dropped_total{reason}`` and ``tailpy_derp_dropped_bytes_total{reason}``
      (:data:`DROP_REASONS`), ``tailpy_derp_packets_forwarded_total{direction}`` and
      ``tailpy_derp_forwarded_bytes_total{direction}`` (``in``/``out``: through the mesh),
      ``tailpy_derp_peer_gone_frames_total{reason}``, ``tailpy_derp_pings_total``,
      ``tailpy_derp_ignored_frames_total``, ``tailpy_derp_disconnects_total{reason}``.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        m = self.relay.metrics
        queues = self.relay.queued_packets()

        def gauge(name: str, doc: str, v: int) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=v)

        def counter(name: str, doc: str, v: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=v)

        def by(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
            return _labelled(CounterMetricFamily(name, doc, labels=[label]), values)  # type: ignore[return-value]

        yield gauge("tailpy_derp_clients", "Connected DERP clients (connections).", m.clients)
        yield gauge(
            "tailpy_derp_home_clients", "Clients that said this server is their home.", m.home_clients
        )
        yield gauge("tailpy_derp_duplicate_client_keys", "Keys connected more than once.", m.duplicate_keys)
        yield gauge("tailpy_derp_queued_packets", "Packets waiting in the clients' send queues.", sum(queues))
        yield gauge(
            "tailpy_derp_queue_depth_max_packets",
            "Packets in the fullest send queue.",
            max(queues, default=0),
        )
        yield gauge(
            "tailpy_derp_queue_limit_packets",
            "Packets a send queue holds before its oldest is dropped.",
            self.relay.queue_depth,
        )
        yield counter("tailpy_derp_accepts_total", "Connections that completed the login.", m.accepts)
        yield counter(
            "tailpy_derp_websocket_accepts_total",
            "WebSocket upgrades accepted at /derp.",
            m.websocket_accepts,
        )
        yield counter("tailpy_derp_login_failures_total", "Connections refused at login.", m.login_failures)
        yield by(
            "tailpy_derp_clients_refused_total",
            "Logins refused by client verification, by reason.",
            "reason",
            m.refused,
        )
        yield counter("tailpy_derp_packets_received_total", "SendPacket frames received.", m.packets_received)
        yield counter("tailpy_derp_received_bytes_total", "Packet bytes received.", m.bytes_received)
        yield counter(
            "tailpy_derp_packets_relayed_total", "Packets written to their destination.", m.packets_relayed
        )
        yield counter(
            "tailpy_derp_relayed_bytes_total", "Packet bytes written to their destination.", m.bytes_relayed
        )
        yield by(
            "tailpy_derp_packets_dropped_total", "Packets dropped, by reason.", "reason", m.packets_dropped
        )
        yield by(
            "tailpy_derp_dropped_bytes_total", "Packet bytes dropped, by reason.", "reason", m.bytes_dropped
        )
        yield by(
            "tailpy_derp_packets_forwarded_total",
            "Packets forwarded through the mesh: to a mesh peer (out) or from one (in).",
            "direction",
            {"in": m.packets_forwarded_in, "out": m.packets_forwarded_out},
        )
        yield by(
            "tailpy_derp_forwarded_bytes_total",
            "Packet bytes forwarded through the mesh: to a mesh peer (out) or from one (in).",
            "direction",
            {"in": m.bytes_forwarded_in, "out": m.bytes_forwarded_out},
        )
        yield gauge("tailpy_derp_mesh_peers", "Mesh peers this server dials (itself left out).", m.mesh_peers)
        yield gauge(
            "tailpy_derp_mesh_peers_connected",
            "Mesh peers whose connections are watched now.",
            m.mesh_peers_connected,
        )
        yield gauge(
            "tailpy_derp_mesh_watchers", "Mesh peers watching this server's connections.", m.mesh_watchers
        )
        yield gauge("tailpy_derp_remote_clients", "Keys reachable through a mesh peer.", m.remote_clients)
        yield by(
            "tailpy_derp_peer_gone_frames_total",
            "PeerGone frames sent, by reason.",
            "reason",
            m.peer_gone_frames,
        )
        yield counter("tailpy_derp_pings_total", "Ping frames answered.", m.pings)
        yield counter(
            "tailpy_derp_ignored_frames_total",
            "Frames of types a client does not send to a server (or unknown), read and ignored.",
            m.ignored_frames,
        )
        yield by(
            "tailpy_derp_disconnects_total",
            "Closed client connections, by reason.",
            "reason",
            dict(m.disconnects),
        )


class StunCollector(Collector):
    """A STUN server's counters for ``prometheus_client``: ``tailpy_stun_requests_total{disposition}``,
    ``tailpy_stun_requests_by_family_total{family}``, ``tailpy_stun_write_errors_total``; ``metrics`` gives
    the :class:`~tailpy.derp.stun_server.StunMetrics` now (None: the server stopped, nothing)."""

    def __init__(self, metrics: Callable[[], StunMetrics | None]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics()
        if m is None:
            return
        yield _labelled(
            CounterMetricFamily(
                "tailpy_stun_requests_total",
                "STUN datagrams received, by what was done with them.",
                labels=["disposition"],
            ),
            m.requests,
        )
        yield _labelled(
            CounterMetricFamily(
                "tailpy_stun_requests_by_family_total",
                "STUN requests answered, by address family.",
                labels=["family"],
            ),
            m.families,
        )
        yield CounterMetricFamily(
            "tailpy_stun_write_errors_total", "STUN replies the socket refused.", value=m.write_errors
        )


__all__ = [
    "DISCONNECT_REASONS",
    "DROP_REASONS",
    "REFUSAL_REASONS",
    "Metrics",
    "RelayCollector",
    "StunCollector",
]
