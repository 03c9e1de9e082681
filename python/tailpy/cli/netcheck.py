"""`tailpy netcheck`: UDP reachability, global endpoints, NAT mapping behaviour, hairpinning and DERP
latency, printed in the manner of `tailscale netcheck` (see :mod:`tailpy.magicsock.netcheck`).

When tailpyd answers on ``--socket`` and has a DERP map, and no ``--derp-map``, ``--stun`` or ``--bind-port``
is given, tailpyd runs the netcheck over its data plane's own UDP socket (``POST /localapi/v0/netcheck``):
the mapping reported is the real one peers see. Otherwise the probes leave from a UDP socket of this
command's own (``--bind-port``, any port by default): the mapping seen is the one a new socket gets from the
NAT. The STUN servers then come from ``--derp-map FILE`` (a Tailscale-shaped DERP map) when given, else from
the DERP map in tailpyd's netmap (status ``derp_map``), plus any ``--stun HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tailpy.cli.common import FiniteFloatRange, json_option, socket_option
from tailpy.cli.safetext import visible
from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError, TailpyError
from tailpy.netmap import DerpMap

if TYPE_CHECKING:
    from tailpy.magicsock.netcheck import Report


async def _daemon_derp_map(socket_path: str) -> DerpMap | None:
    """The DERP map of tailpyd's netmap, or None when the daemon does not answer or has none."""
    from tailpy.daemon.client import LocalClient

    try:
        status = await LocalClient(socket_path).status()
    except TailpyError:
        return None
    return status.derp_map or None


async def _daemon_netcheck(socket_path: str, timeout: float) -> tuple[Report, DerpMap] | None:
    """A report made by tailpyd over its data-plane socket, with its DERP map; None when the daemon does
    not answer or has no DERP map yet."""
    from tailpy.daemon.client import LocalClient

    try:
        return await LocalClient(socket_path).netcheck(timeout)
    except TailpyError:
        return None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


KEPT = "(kept from an earlier run; this one could not tell)"


def _verdict(value: bool | None, fresh: bool) -> str:
    text = "unknown" if value is None else str(value).lower()
    return text if fresh or value is None else f"{text} {KEPT}"


def _endpoint(endpoint: Endpoint, fresh: bool) -> str:
    """``yes, IP:PORT`` for an endpoint this run found; one carried over from an earlier run (see
    :data:`tailpy.magicsock.netcheck.KEEP_ENDPOINT_FOR`) is labelled instead, as the kept verdicts are: no
    server of that family answered this run."""
    return f"yes, {endpoint}" if fresh else f"{endpoint} {KEPT}"


def format_report(report: Report, derp_map: DerpMap | None) -> str:
    """The human report, laid out as `tailscale netcheck` prints it."""
    when = datetime.datetime.fromtimestamp(report.time, tz=datetime.timezone.utc).astimezone()
    lines = ["", "Report:", f"\t* Time: {when.isoformat(sep=' ', timespec='microseconds')}"]
    lines.append(f"\t* UDP: {str(report.udp).lower()}")
    if report.global_v4:
        lines.append(f"\t* IPv4: {_endpoint(report.global_v4, report.global_v4_fresh)}")
    else:
        lines.append("\t* IPv4: (no addr found)")
    if report.global_v6:
        lines.append(f"\t* IPv6: {_endpoint(report.global_v6, report.global_v6_fresh)}")
    elif report.ipv6:
        lines.append("\t* IPv6: (no addr found)")
    elif report.os_has_ipv6:
        lines.append("\t* IPv6: no, but OS has support")
    else:
        lines.append("\t* IPv6: no, unavailable in OS")
    varies = _verdict(report.mapping_varies_by_dest_ip, report.mapping_varies_fresh)
    lines.append(f"\t* MappingVariesByDestIP: {varies}")
    lines.append(f"\t* HairPinning: {_verdict(report.hairpinning, report.hairpinning_fresh)}")
    regions = derp_map.regions if derp_map is not None else {}
    if not report.region_latency:
        lines.append(
            "\t* Nearest DERP: unknown (no response to latency probes)"
            if regions
            else "\t* Nearest DERP: unknown (no DERP map)"
        )
    else:
        pref = regions.get(report.preferred_derp)
        if pref is not None:
            lines.append(f"\t* Nearest DERP: {visible(pref.region_name or pref.region_code)}")
        elif report.preferred_derp:
            lines.append(f"\t* Nearest DERP: {report.preferred_derp} (region not found in map)")
        else:
            lines.append("\t* Nearest DERP: [none]")
        lines.append("\t* DERP latency:")
        inf = float("inf")
        for rid in sorted(regions, key=lambda r: (report.region_latency.get(r, inf), r)):
            r = regions[rid]
            latency = _ms(report.region_latency[rid]) if rid in report.region_latency else ""
            code, name = visible(r.region_code), visible(r.region_name or r.region_code)
            lines.append(f"\t\t- {code:>3}: {latency:<7} ({name})")
    return "\n".join(lines)


@click.command("netcheck")
@json_option
@socket_option
@click.option(
    "--derp-map",
    "derp_map_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="DERP map JSON (Tailscale's DERPMap) whose STUN servers to probe (default: tailpyd's netmap's).",
)
@click.option(
    "--stun",
    "extra_stun",
    multiple=True,
    metavar="IP:PORT",
    help="Another STUN server to probe (repeatable); it counts for endpoints and mapping, not latency.",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=FiniteFloatRange(0.1, 60),
    help="Seconds to wait for each STUN server (requests are retransmitted per RFC 8489 until then).",
)
@click.option("--bind-port", default=0, type=click.IntRange(0, 65535), help="Local UDP port (0 = any).")
@click.option(
    "--every",
    default=0.0,
    type=FiniteFloatRange(0, None),
    help="Seconds between reports, repeating until interrupted (0 = one report). Later reports keep earlier "
    "verdicts where a run cannot tell.",
)
def command(
    as_json: bool,
    socket_path: str,
    derp_map_file: Path | None,
    extra_stun: tuple[str, ...],
    timeout: float,
    bind_port: int,
    every: float,
) -> None:
    """Print an analysis of local network conditions: UDP, global IPv4/IPv6 endpoint, whether the NAT
    mapping varies by destination, hairpinning, and latency to each DERP region (with the nearest)."""
    from tailpy.control.options import load_derp_map
    from tailpy.magicsock.netcheck import Netcheck, run, stun_targets
    from tailpy.magicsock.stun import StandaloneStun

    derp_map = load_derp_map(derp_map_file) if derp_map_file is not None else None

    async def main() -> None:
        if derp_map_file is None and not extra_stun and not bind_port:
            while (got := await _daemon_netcheck(socket_path, timeout)) is not None:
                report, daemon_dm = got
                if as_json:
                    click.echo(json.dumps(report.to_json(), indent=2))
                else:
                    click.echo(format_report(report, daemon_dm))
                if not every:
                    return
                await asyncio.sleep(every)
        dm = derp_map if derp_map_file is not None else await _daemon_derp_map(socket_path)
        targets = stun_targets(dm, extra_stun)
        if not targets:
            where = (
                f"--derp-map {derp_map_file} has no STUN servers"
                if derp_map_file is not None
                else f"no DERP map from tailpyd on {socket_path} (not running, or no netmap yet)"
            )
            raise ConfigError(f"nothing to probe: {where}; pass --derp-map FILE or --stun IP:PORT")
        history = Netcheck()
        async with StandaloneStun(port=bind_port) as sock:
            while True:
                report = await run(sock.runner, targets, history, timeout=timeout)
                if as_json:
                    click.echo(json.dumps(report.to_json(), indent=2))
                else:
                    click.echo(format_report(report, dm))
                if not every:
                    return
                await asyncio.sleep(every)

    with contextlib.suppress(KeyboardInterrupt):  # (--every runs until interrupted)
        asyncio.run(main())
