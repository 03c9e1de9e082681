"""tailpyd's Prometheus metrics: ``GET /metrics`` on the local API (and on ``tailpyd --metrics-listen``),
what ``tailpy metrics`` prints (as ``tailscale metrics print``).

Every value is read at scrape time from the node's status (:meth:`tailpy.daemon.backend.Backend.status`:
the data plane's per-peer and device counters, ``tailpy._native.Device.stats``; magicsock's DERP and disco
counters), so the data path does no extra work. Per-peer series carry ``peer`` (the peer's name in the
tailnet, else its node key's short form), bounded by the tailnet's size.

* ``tailpy_node_state{state}`` (gauge, 1 for the current backend state), ``tailpy_node_control_connected``,
  ``tailpy_node_health_warnings``, ``tailpy_node_peers``.
* ``tailpy_node_control_stream_starts_total{start}`` (counter): how this node's map streams began,
  ``netmap`` (a full netmap) or ``delta`` (resumed with one delta, on the same control server or, after a
  failover, on another replica of its database); from ``Status.map_stream_starts``
  (``tailpy.control.client.ControlClient.stream_starts``). Both labels always, 0 before any stream.
* ``tailpy_node_peer_sent_bytes_total{peer}``, ``tailpy_node_peer_received_bytes_total{peer}`` (counters:
  WireGuard datagram bytes, overhead included); ``tailpy_node_peer_path{peer, path}`` (gauge: 1 for the
  path in use, ``direct`` or ``relay``, 0 for the other; both 0 while there is none);
  ``tailpy_node_peer_handshake_age_seconds{peer}`` (gauge: seconds since the last WireGuard handshake; no
  sample before the first).
* ``tailpy_node_derp_home_region`` (gauge, region id, 0 none), ``tailpy_node_derp_connections`` (gauge:
  connected DERP regions), ``tailpy_node_derp_sent_packets_total`` /
  ``tailpy_node_derp_received_packets_total`` (WireGuard datagrams through DERP),
  ``tailpy_node_derp_dropped_packets_total{direction}`` (``send``, ``receive``).
* ``tailpy_node_disco_received_total{type}`` (``ping``, ``pong``, ``call_me_maybe``: disco messages
  accepted), ``tailpy_node_disco_sent_total{via}`` (``udp``, ``derp``),
  ``tailpy_node_disco_dropped_total{reason}`` (:class:`tailpy.magicsock.disco.DiscoCounters`' drop
  counters).
* ``tailpy_node_udp_received_datagrams_total``, ``tailpy_node_udp_sent_datagrams_total``,
  ``tailpy_node_handshakes_sent_total``, ``tailpy_node_dropped_packets_total{reason}`` (the data plane's
  drops: ``malformed``, ``unknown_peer``, ``decrypt``, ``no_route``, ``queue_full``, ``not_allowed``,
  ``no_endpoint``, ``send_error``), ``tailpy_node_filter_dropped_packets_total{reason}`` (the packet
  filter's: ``no_rule``, ``not_a_reply``, ``protocol``, ``malformed``, ``multicast``, ``link_local``),
  ``tailpy_node_filter_rules`` (gauge; no sample while no filter is set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tailpy.ipnstate import Status

STATES = ("NoState", "NeedsLogin", "Starting", "Running", "Stopped")
"""The ``state`` labels of ``tailpy_node_state`` (:attr:`tailpy.ipnstate.Status.backend_state`)."""

STREAM_STARTS = ("netmap", "delta")
"""The ``start`` labels of ``tailpy_node_control_stream_starts_total`` (:attr:`Status.map_stream_starts`)."""

DISCO_ACCEPTED = {"pings": "ping", "pongs": "pong", "call_me_maybes": "call_me_maybe"}
DISCO_SENT = {"sent_udp": "udp", "sent_derp": "derp"}
_DISCO_NOT_DROPS = {"received", *DISCO_ACCEPTED, *DISCO_SENT}


def _counter(name: str, doc: str, label: str, values: Mapping[str, int | float]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in values.items():
        fam.add_metric([k], v)
    return fam


class NodeCollector(Collector):
    """The node's metrics (see the module docstring) from ``status()`` at each scrape."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        state = GaugeMetricFamily(
            "tailpy_node_state", "The node's backend state (1: current).", labels=["state"]
        )
        for s in (*STATES, *([st.backend_state] if st.backend_state not in STATES else [])):
            state.add_metric([s], 1 if s == st.backend_state else 0)
        yield state
        yield GaugeMetricFamily(
            "tailpy_node_control_connected",
            "1 while the node's map stream to control is up.",
            value=int(st.control_connected),
        )
        yield _counter(
            "tailpy_node_control_stream_starts",
            "Map streams to control this node opened, by how they began: a full netmap or a resuming delta.",
            "start",
            {start: st.map_stream_starts.get(start, 0) for start in STREAM_STARTS},
        )
        yield GaugeMetricFamily(
            "tailpy_node_health_warnings", "Health warnings raised now.", value=len(st.health)
        )
        yield GaugeMetricFamily("tailpy_node_peers", "Peers in the netmap.", value=len(st.peers))
        yield from self._peers(st)
        yield from self._derp(st)
        yield from self._disco(st)
        if st.device is not None:
            yield from _device(st.device)

    def _peers(self, st: Status) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "tailpy_node_peer_sent_bytes", "WireGuard bytes sent to the peer (either path).", labels=["peer"]
        )
        received = CounterMetricFamily(
            "tailpy_node_peer_received_bytes", "WireGuard bytes received from the peer.", labels=["peer"]
        )
        path = GaugeMetricFamily(
            "tailpy_node_peer_path",
            "The path to the peer in use (1), direct or through a DERP relay; both 0 while there is none.",
            labels=["peer", "path"],
        )
        age = GaugeMetricFamily(
            "tailpy_node_peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with the peer.",
            labels=["peer"],
        )
        for p in st.peers:
            name = p.name or p.node_key.short()
            sent.add_metric([name], p.tx_bytes)
            received.add_metric([name], p.rx_bytes)
            for kind in ("direct", "relay"):
                path.add_metric([name, kind], 1 if p.path == kind else 0)
            if p.last_handshake is not None:
                age.add_metric([name], max(0.0, st.now - p.last_handshake))
        yield from (sent, received, path, age)

    def _derp(self, st: Status) -> Iterator[Metric]:
        d = st.derp
        if d is None:
            return
        yield GaugeMetricFamily(
            "tailpy_node_derp_home_region", "Home DERP region id (0: none).", value=d.home_derp
        )
        yield GaugeMetricFamily(
            "tailpy_node_derp_connections",
            "DERP regions the node is connected to now.",
            value=sum(1 for c in d.connections if c.connected),
        )
        yield CounterMetricFamily(
            "tailpy_node_derp_sent_packets", "WireGuard datagrams sent through DERP.", value=d.relay_sent
        )
        yield CounterMetricFamily(
            "tailpy_node_derp_received_packets",
            "WireGuard datagrams received from DERP.",
            value=d.derp_received,
        )
        yield _counter(
            "tailpy_node_derp_dropped_packets",
            "Datagrams through DERP dropped, by direction.",
            "direction",
            {"send": d.relay_dropped, "receive": d.derp_dropped},
        )

    def _disco(self, st: Status) -> Iterator[Metric]:
        t = st.traversal
        if t is None:
            return
        c = t.disco
        yield _counter(
            "tailpy_node_disco_received",
            "Disco messages accepted, by type.",
            "type",
            {label: c.get(k, 0) for k, label in DISCO_ACCEPTED.items()},
        )
        yield _counter(
            "tailpy_node_disco_sent",
            "Disco messages sent, by way.",
            "via",
            {label: c.get(k, 0) for k, label in DISCO_SENT.items()},
        )
        yield _counter(
            "tailpy_node_disco_dropped",
            "Disco datagrams dropped, by reason.",
            "reason",
            {k: v for k, v in sorted(c.items()) if k not in _DISCO_NOT_DROPS},
        )


def _device(dev: Mapping[str, Any]) -> Iterator[Metric]:
    """The data plane's counters (``Device.stats``)."""

    def num(key: str) -> int:
        v = dev.get(key, 0)
        return v if isinstance(v, int) else 0

    yield CounterMetricFamily(
        "tailpy_node_udp_received_datagrams",
        "UDP datagrams received on the node's socket.",
        value=num("rx_datagrams"),
    )
    yield CounterMetricFamily(
        "tailpy_node_udp_sent_datagrams",
        "UDP datagrams sent from the node's socket.",
        value=num("tx_datagrams"),
    )
    yield CounterMetricFamily(
        "tailpy_node_handshakes_sent", "WireGuard handshake initiations sent.", value=num("handshakes_sent")
    )
    yield _counter(
        "tailpy_node_dropped_packets",
        "Packets and datagrams the data plane dropped, by reason.",
        "reason",
        {k.removeprefix("dropped_"): num(k) for k in sorted(dev) if k.startswith("dropped_")},
    )
    filt = dev.get("filter")
    if isinstance(filt, Mapping):
        yield _counter(
            "tailpy_node_filter_dropped_packets",
            "Inbound packets the packet filter dropped, by reason.",
            "reason",
            {
                k.removeprefix("dropped_"): v
                for k, v in sorted(filt.items())
                if k.startswith("dropped_") and isinstance(v, int)
            },
        )
        rules = filt.get("rules")
        if isinstance(rules, int):
            yield GaugeMetricFamily("tailpy_node_filter_rules", "Packet filter rules in force.", value=rules)


def node_registry(status: Callable[[], Status]) -> CollectorRegistry:
    """A registry of its own holding a :class:`NodeCollector` of ``status``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(status))
    return registry


__all__ = ["STATES", "NodeCollector", "node_registry"]
