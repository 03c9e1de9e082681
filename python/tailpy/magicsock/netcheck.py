"""netcheck: what the network between this node and the internet does to UDP (in the manner of Tailscale's
``net/netcheck``).

One run sends a STUN Binding request (:mod:`tailpy.magicsock.stun`, RFC 8489 retransmission capped at the
run's ``timeout``) to every STUN server of the DERP map (each node's ``STUNPort``, 3478 when 0, none when
-1; IPv4 and IPv6 addresses of the node) and to any extra STUN endpoints, then:

* **UDP**: some server answered; **IPv4 / IPv6**: some server of that family answered.
* **global_v4 / global_v6**: the reflexive ``ip:port`` seen by the fastest server of that family.
* **mapping_varies_by_dest_ip** (IPv4): two or more distinct destinations (other IPs, or other ports of one
  IP) answered and saw different mapped addresses: an endpoint-dependent ("hard", symmetric) NAT. The same
  address from each: False. Fewer than two answers: this run cannot tell, and the previous verdict is kept
  (a flapping or missing answer must not flip it).
* **hairpinning**: a Binding request sent from the same socket to our own global IPv4 endpoint came back to
  us (the NAT loops traffic for its own public address back inside). Sent 3 times over about a second; no
  arrival = False. Unknown (previous verdict kept) when no global IPv4 endpoint was found.
* **region_latency**: per DERP region, the lowest STUN round trip (seconds) of its nodes this run.
* **preferred_derp**: the region with the lowest latency, with hysteresis: the previous preferred region is
  kept while it answered this run and the best is not clearly faster, that is unless the best is both at
  least 10 ms and at least a third faster (the same two thresholds as Tailscale's netcheck). No region
  answered: the previous one is kept. (The home-DERP choice of the daemon, with its own stickiness, is
  :mod:`tailpy.magicsock.derp`'s; this is netcheck's own verdict.)
* A global endpoint missing from a run is carried over from earlier runs for :data:`KEEP_ENDPOINT_FOR`
  seconds, so one lost round does not make the daemon tell control its endpoints changed;
  :attr:`Netcheck.endpoints_changed` says whether the last run changed them; the report marks such an
  endpoint ``global_v4_fresh`` / ``global_v6_fresh`` False (``tailpy netcheck`` labels it).

:class:`Netcheck` holds the history and computes reports from probe results (sans-IO: ``now`` passed in);
:func:`run` does one run over a :class:`~tailpy.magicsock.stun.StunRunner`, whichever socket that sends
from (tailpyd's data-plane socket, or a :class:`~tailpy.magicsock.stun.StandaloneStun`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tailpy.asyncutil import wait_event
from tailpy.endpoint import Endpoint, IPAddress
from tailpy.errors import ConfigError, EndpointError, ParseError
from tailpy.magicsock.stun import BindingResult, StunRunner
from tailpy.netmap import DerpMap
from tailpy.proto import stun

DEFAULT_STUN_PORT = 3478
KEEP_ENDPOINT_FOR = 300.0
"""Seconds a global endpoint found earlier still stands when a run finds none (Tailscale keeps 5 minutes of
netcheck history)."""
SWITCH_ABSOLUTE = 0.010
"""Seconds: a region must be at least this much faster than the preferred one to replace it..."""
SWITCH_RATIO = 2 / 3
"""...and take at most this share of the preferred region's latency."""
HAIRPIN_SENDS = 3
HAIRPIN_INTERVAL = 0.33


@dataclass(frozen=True)
class StunTarget:
    """A STUN server to probe: ``host`` (an IP literal or a DNS name) and UDP ``port``, ``family`` 4 or 6;
    ``region_id`` / ``node`` of the DERP map (region 0: an extra server outside the map)."""

    region_id: int
    node: str
    host: str
    port: int
    family: int


@dataclass(frozen=True)
class ProbeResult:
    """What one probe got: ``endpoint`` probed (None: the target's host did not resolve), ``mapped`` the
    reflexive endpoint or None, ``rtt`` seconds or None, ``error`` text when it failed."""

    target: StunTarget
    endpoint: Endpoint | None
    mapped: Endpoint | None = None
    rtt: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.mapped is not None


@dataclass(frozen=True)
class Report:
    """One netcheck report (see the module docstring for each verdict). Times: ``time`` unix seconds,
    latencies seconds. ``mapping_varies_fresh`` / ``hairpinning_fresh``: False when the verdict was
    carried over from an earlier run because this one could not tell; ``global_v4_fresh`` /
    ``global_v6_fresh`` likewise False when that endpoint was carried over (no server of the family answered
    this run), True when this run found it or there is none."""

    time: float
    udp: bool
    ipv4: bool
    ipv6: bool
    os_has_ipv6: bool
    global_v4: Endpoint | None
    global_v6: Endpoint | None
    mapping_varies_by_dest_ip: bool | None
    mapping_varies_fresh: bool
    hairpinning: bool | None
    hairpinning_fresh: bool
    preferred_derp: int
    global_v4_fresh: bool = True
    global_v6_fresh: bool = True
    region_latency: dict[int, float] = field(default_factory=dict)
    region_v4_latency: dict[int, float] = field(default_factory=dict)
    region_v6_latency: dict[int, float] = field(default_factory=dict)
    probes: tuple[ProbeResult, ...] = ()

    def endpoints(self) -> list[Endpoint]:
        """The global endpoints found, IPv4 first."""
        return [e for e in (self.global_v4, self.global_v6) if e]

    def to_json(self) -> dict[str, Any]:
        """``tailpy netcheck --json``: snake_case keys, latencies in seconds, unknown verdicts null."""
        return {
            "time": self.time,
            "udp": self.udp,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "os_has_ipv6": self.os_has_ipv6,
            "global_v4": None if self.global_v4 is None else str(self.global_v4),
            "global_v6": None if self.global_v6 is None else str(self.global_v6),
            "global_v4_fresh": self.global_v4_fresh,
            "global_v6_fresh": self.global_v6_fresh,
            "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
            "mapping_varies_fresh": self.mapping_varies_fresh,
            "hairpinning": self.hairpinning,
            "hairpinning_fresh": self.hairpinning_fresh,
            "preferred_derp": self.preferred_derp,
            "region_latency": {str(k): v for k, v in sorted(self.region_latency.items())},
            "region_v4_latency": {str(k): v for k, v in sorted(self.region_v4_latency.items())},
            "region_v6_latency": {str(k): v for k, v in sorted(self.region_v6_latency.items())},
            "probes": [
                {
                    "region_id": p.target.region_id,
                    "node": p.target.node,
                    "endpoint": f"{p.target.host}:{p.target.port}" if p.endpoint is None else str(p.endpoint),
                    "mapped": None if p.mapped is None else str(p.mapped),
                    "rtt": p.rtt,
                    "error": p.error,
                }
                for p in self.probes
            ],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Report:
        """Parse :meth:`to_json`'s form (as tailpyd's local API sends it; probes are not carried back).
        Raises ParseError."""
        try:
            return cls(
                time=float(obj["time"]),
                udp=bool(obj["udp"]),
                ipv4=bool(obj["ipv4"]),
                ipv6=bool(obj["ipv6"]),
                os_has_ipv6=bool(obj["os_has_ipv6"]),
                global_v4=None if obj.get("global_v4") is None else Endpoint.parse(obj["global_v4"]),
                global_v6=None if obj.get("global_v6") is None else Endpoint.parse(obj["global_v6"]),
                global_v4_fresh=bool(obj.get("global_v4_fresh", True)),
                global_v6_fresh=bool(obj.get("global_v6_fresh", True)),
                mapping_varies_by_dest_ip=_opt_bool(obj.get("mapping_varies_by_dest_ip")),
                mapping_varies_fresh=bool(obj.get("mapping_varies_fresh", False)),
                hairpinning=_opt_bool(obj.get("hairpinning")),
                hairpinning_fresh=bool(obj.get("hairpinning_fresh", False)),
                preferred_derp=int(obj.get("preferred_derp", 0)),
                region_latency={int(k): float(v) for k, v in obj.get("region_latency", {}).items()},
                region_v4_latency={int(k): float(v) for k, v in obj.get("region_v4_latency", {}).items()},
                region_v6_latency={int(k): float(v) for k, v in obj.get("region_v6_latency", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ParseError(f"malformed netcheck report: {e!r}") from None


def _opt_bool(v: object) -> bool | None:
    return None if v is None else bool(v)


def stun_targets(derp_map: DerpMap | None, extra: Sequence[str] = ()) -> list[StunTarget]:
    """Every STUN server to probe: each DERP node with STUN (``stun_port`` != -1; 0 means 3478) on its
    IPv4 and IPv6 addresses (``host_name`` when it has none: an IP literal goes to its family, a name to
    both), then ``extra`` endpoints ("ip:port" / "[ipv6]:port", region 0). Raises ConfigError for a
    malformed extra or one with port 0."""
    out: list[StunTarget] = []
    if derp_map is not None:
        for rid in sorted(derp_map.regions):
            for node in derp_map.regions[rid].nodes:
                if node.stun_port == -1:
                    continue
                port = node.stun_port or DEFAULT_STUN_PORT
                v4, v6 = node.ipv4, node.ipv6
                if not v4 and not v6:
                    try:
                        literal = ipaddress.ip_address(node.host_name)
                    except ValueError:
                        v4 = v6 = node.host_name
                    else:
                        v4, v6 = (str(literal), "") if literal.version == 4 else ("", str(literal))
                if v4:
                    out.append(StunTarget(rid, node.name, v4, port, 4))
                if v6:
                    out.append(StunTarget(rid, node.name, v6, port, 6))
    for e in extra:
        try:
            ep = Endpoint.parse(e.strip())
        except EndpointError as err:
            raise ConfigError(f"STUN server: {err}") from None
        if ep.port == 0:
            raise ConfigError(f"STUN server endpoint {e!r} has port 0: expected a port of 1-65535")
        out.append(StunTarget(0, str(ep), str(ep.ip), ep.port, ep.version))
    return out


class Netcheck:
    """netcheck's history: turns each run's probe results into a :class:`Report`, keeping earlier verdicts
    where a run cannot tell. ``keep_endpoint_for``: seconds (:data:`KEEP_ENDPOINT_FOR`)."""

    def __init__(self, *, keep_endpoint_for: float = KEEP_ENDPOINT_FOR) -> None:
        self.keep_endpoint_for = keep_endpoint_for
        self.last: Report | None = None
        self.endpoints_changed = False
        """Whether the last :meth:`report` changed the global endpoints (what the daemon tells control)."""
        self._seen: dict[int, tuple[Endpoint, float]] = {}  # family -> (endpoint, unix time last seen)

    def report(
        self,
        probes: Sequence[ProbeResult],
        *,
        now: float,
        hairpin: bool | None = None,
        os_has_ipv6: bool = True,
    ) -> Report:
        """The report of one run: ``probes`` its results, ``now`` unix seconds, ``hairpin`` the hairpin
        check's outcome (None: not run)."""
        prev = self.last
        ok = [p for p in probes if p.ok]
        by_family = {f: [p for p in ok if p.target.family == f] for f in (4, 6)}

        globals_: dict[int, Endpoint | None] = {}
        fresh: dict[int, bool] = {}
        for f in (4, 6):
            answered = by_family[f]
            if answered:
                fastest = min(answered, key=lambda p: p.rtt if p.rtt is not None else float("inf"))
                assert fastest.mapped is not None
                self._seen[f] = (fastest.mapped, now)
                globals_[f] = fastest.mapped
            else:
                kept = self._seen.get(f)
                globals_[f] = kept[0] if kept and now - kept[1] <= self.keep_endpoint_for else None
            fresh[f] = bool(answered) or globals_[f] is None

        dests = {p.endpoint for p in by_family[4]}
        mapped = {p.mapped for p in by_family[4]}
        varies: bool | None
        if len(dests) >= 2:
            varies, varies_fresh = len(mapped) > 1, True
        else:
            varies, varies_fresh = (prev.mapping_varies_by_dest_ip if prev else None), False

        if hairpin is None:
            hp, hp_fresh = (prev.hairpinning if prev else None), False
        else:
            hp, hp_fresh = hairpin, True

        lat: dict[int, float] = {}
        lat4: dict[int, float] = {}
        lat6: dict[int, float] = {}
        for p in ok:
            if p.target.region_id == 0 or p.rtt is None:
                continue
            rid = p.target.region_id
            for table in (lat, lat4 if p.target.family == 4 else lat6):
                table[rid] = min(table.get(rid, p.rtt), p.rtt)

        preferred = prev.preferred_derp if prev else 0
        if lat:
            best = min(lat, key=lambda r: (lat[r], r))
            if preferred in lat and preferred != best:
                old, new = lat[preferred], lat[best]
                clearly_faster = old - new >= SWITCH_ABSOLUTE and new <= old * SWITCH_RATIO
                preferred = best if clearly_faster else preferred
            else:
                preferred = best

        report = Report(
            time=now,
            udp=bool(ok),
            ipv4=bool(by_family[4]),
            ipv6=bool(by_family[6]),
            os_has_ipv6=os_has_ipv6,
            global_v4=globals_[4],
            global_v6=globals_[6],
            global_v4_fresh=fresh[4],
            global_v6_fresh=fresh[6],
            mapping_varies_by_dest_ip=varies,
            mapping_varies_fresh=varies_fresh,
            hairpinning=hp,
            hairpinning_fresh=hp_fresh,
            preferred_derp=preferred,
            region_latency=lat,
            region_v4_latency=lat4,
            region_v6_latency=lat6,
            probes=tuple(probes),
        )
        before = prev.endpoints() if prev else []
        self.endpoints_changed = report.endpoints() != before
        self.last = report
        return report


def os_has_ipv6() -> bool:
    """Whether a UDP socket can bind ::1 (Tailscale's OSHasIPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _resolve(target: StunTarget) -> IPAddress | None:
    """The target's IP for its family (a name resolved with getaddrinfo), or None."""
    try:
        ip = ipaddress.ip_address(target.host)
    except ValueError:
        pass
    else:
        return ip if ip.version == target.family else None
    family = socket.AF_INET if target.family == 4 else socket.AF_INET6
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            target.host, target.port, family=family, type=socket.SOCK_DGRAM
        )
    except (OSError, UnicodeError):
        return None
    if not infos:
        return None
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(str(infos[0][4][0]))
    return None


async def run(
    runner: StunRunner,
    targets: Sequence[StunTarget],
    history: Netcheck,
    *,
    timeout: float = 5.0,
    hairpin: bool = True,
    clock: Callable[[], float] = time.time,
    on_mapped: Callable[[Endpoint], None] | None = None,
) -> Report:
    """One netcheck run: probe every target at once over ``runner`` (each probe retransmitted per RFC
    8489 and given up after ``timeout`` seconds), check hairpinning as soon as a global IPv4 endpoint is
    known (unless ``hairpin`` is False), and return ``history``'s report. Never raises for network
    trouble (it shows as failed probes). ``on_mapped(endpoint)`` is called with each probe's mapped
    address as it arrives, before the run ends (the hairpin check alone takes about a second), so a caller
    can publish a new endpoint at once."""

    async def probe(t: StunTarget) -> ProbeResult:
        ip = await _resolve(t)
        if ip is None:
            return ProbeResult(t, None, error=f"cannot resolve {t.host} (IPv{t.family})")
        endpoint = Endpoint(ip, t.port)
        r: BindingResult = await runner.binding(endpoint, total=timeout)
        return ProbeResult(t, endpoint, r.mapped if r.ok else None, r.rtt if r.ok else None, r.error)

    tasks = [asyncio.ensure_future(probe(t)) for t in targets]
    hairpin_task: asyncio.Task[bool] | None = None
    results: list[ProbeResult] = []
    try:
        for next_done in asyncio.as_completed(tasks):
            res = await next_done
            results.append(res)
            if on_mapped is not None and res.ok and res.mapped:
                on_mapped(res.mapped)
            if hairpin and hairpin_task is None and res.ok and res.target.family == 4 and res.mapped:
                hairpin_task = asyncio.ensure_future(check_hairpin(runner, res.mapped))
        hairpin_ok = await hairpin_task if hairpin_task is not None else None
    finally:
        for t in tasks:
            t.cancel()
        if hairpin_task is not None:
            hairpin_task.cancel()
    order = {id(t): i for i, t in enumerate(targets)}
    results.sort(key=lambda p: order.get(id(p.target), 0))
    return history.report(results, now=clock(), hairpin=hairpin_ok, os_has_ipv6=os_has_ipv6())


async def check_hairpin(runner: StunRunner, own_endpoint: Endpoint) -> bool:
    """Send a Binding request from the runner's socket to ``own_endpoint`` (our global IPv4 endpoint) up to
    :data:`HAIRPIN_SENDS` times; True as soon as it arrives back (the runner's ``on_request`` sees it)."""
    txid, request = stun.binding_request()
    arrived = asyncio.Event()
    previous = runner.on_request

    def on_request(msg: stun.Message, source: Endpoint) -> None:
        if msg.txid == txid:
            arrived.set()
        elif previous is not None:
            previous(msg, source)

    runner.on_request = on_request
    try:
        for _ in range(HAIRPIN_SENDS):
            with contextlib.suppress(OSError, ValueError):
                runner.send(request, own_endpoint)
            if await wait_event(arrived, HAIRPIN_INTERVAL):
                return True
        return False
    finally:
        runner.on_request = previous


__all__ = [
    "KEEP_ENDPOINT_FOR",
    "Netcheck",
    "ProbeResult",
    "Report",
    "StunTarget",
    "check_hairpin",
    "os_has_ipv6",
    "run",
    "stun_targets",
]
