"""What every tailpy process's Prometheus metrics share: the exposition of a ``prometheus_client``
registry as an aiohttp response, the loopback test ``/metrics`` on a main listener applies, and the
listener of ``--metrics-listen`` (``GET /metrics`` and nothing else, to anyone who reaches it: the operator
chose the address).

Control (:mod:`tailpy.control.metrics`), the DERP relay (:mod:`tailpy.derp.metrics`) and tailpyd
(:mod:`tailpy.daemon.metrics`) each keep their own ``CollectorRegistry``, never ``prometheus_client``'s
global one, so that several servers in one process keep their values apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_address

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

METRICS_PATH = "/metrics"


class _WithoutCreated:
    """``registry`` as a collector whose counters, histograms and summaries have no ``<name>_created``
    sample (``prometheus_client`` adds one to each, a timestamp no tailpy dashboard reads)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            created = metric.name + "_created"
            if not any(s.name == created for s in metric.samples):
                yield metric
                continue
            trimmed = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            trimmed.samples = [s for s in metric.samples if s.name != created]
            yield trimmed


def exposition(registry: CollectorRegistry) -> bytes:
    """``registry``'s metrics in the Prometheus text format (``prometheus_client.generate_latest``), without
    the ``_created`` series."""
    return generate_latest(_WithoutCreated(registry))


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """``registry``'s metrics in the Prometheus text format (:func:`exposition`)."""
    resp = web.Response(body=exposition(registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def is_loopback(remote: str | None) -> bool:
    """True when ``remote`` (aiohttp's ``request.remote``, a peer's IP address, maybe with an IPv6 zone) is a
    loopback address: 127.0.0.0/8, ::1, or IPv4-mapped 127.0.0.0/8."""
    if not remote:
        return False
    try:
        ip = ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The application of a ``--metrics-listen`` listener: ``GET /metrics`` (``registry``'s), nothing else."""

    async def serve(_request: web.Request) -> web.Response:
        return metrics_response(registry)

    app = web.Application()
    app.router.add_get(METRICS_PATH, serve)
    return app


async def start_metrics_listener(registry: CollectorRegistry, host: str | None, port: int) -> web.AppRunner:
    """Serve :func:`metrics_app` on TCP ``host:port`` (``host`` None: every address; port 0 picks one; the
    bound addresses are the runner's ``addresses``). Raises OSError (the port is taken, say); stop it with
    ``await runner.cleanup()``."""
    runner = web.AppRunner(metrics_app(registry), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


__all__ = [
    "METRICS_PATH",
    "exposition",
    "is_loopback",
    "metrics_app",
    "metrics_response",
    "start_metrics_listener",
]
