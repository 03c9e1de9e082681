"""`tailpy demo`: the whole story of a tailnet on this machine, end to end, then removed.

Builds network namespaces: a control host on a lab internet (`tailpy control serve` with its embedded DERP
relay and STUN server) and three sites, each behind its own NAT router: ``alpha`` and ``beta`` behind
endpoint-independent NATs (as home routers), ``gamma`` behind an endpoint-dependent ("hard", symmetric) NAT.
Each node runs tailpyd and `tailpy up`; then it shows NAT traversal (`tailpy ping beta` from alpha: the first
pong through DERP, then direct through both NATs), the relay (gamma is reached only through DERP), names
through MagicDNS (plain ``ping beta``), a short iperf3 through the direct tunnel, and ends with `tailpy
status` on alpha and `tailpy netcheck` on gamma. Everything is removed at the end, also on Ctrl-C or failure.
It takes well under two minutes (about 30-40 s on a 2-core machine).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from typing import Any

import click
from rich.console import Console

from tailpy.cli.status import render
from tailpy.errors import TailpyError
from tailpy.ipnstate import Status

#: The demo's nodes and the NAT each sits behind (``LabTailnet.add_node``'s ``behind=``).
SITES = (("alpha", "eim"), ("beta", "eim"), ("gamma", "edm"))


def _ping_figures(out: str) -> tuple[float | None, float | None]:
    """(loss percent, average RTT in ms) from ping(8)'s summary."""
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return (float(loss.group(1)) if loss else None, float(rtt.group(1)) if rtt else None)


def run_demo(seconds: int, console: Console) -> dict[str, Any]:
    """Run the demo, narrating on ``console``; returns its figures: ``connect_seconds``, ``pings`` (by
    MagicDNS name), ``paths`` (each pair's path from ``tailpy ping``: "direct" or "relay"),
    ``iperf3_gbit_per_s`` (0 ``seconds``: no iperf3 run)."""
    from tailpy.lab import Lab
    from tailpy.lab.tailnet import LabTailnet

    tools = ("ip", "ping", "nft", *(("iperf3",) if seconds else ()))
    for tool in tools:
        if shutil.which(tool) is None:
            raise TailpyError(f"`{tool}` is not installed: run `make demo`, which installs what is missing")
    result: dict[str, Any] = {}
    with Lab() as lab:
        lab.install_signal_handlers()
        t0 = time.monotonic()
        net = LabTailnet(lab)
        console.print(f"[bold]lab[/]: namespaces under prefix {lab.prefix}; the lab internet is 192.0.2.0/24")
        url = net.start_control()
        console.print(f"[bold]control[/]: `tailpy control serve` at {url}, with a DERP relay and STUN server")
        key = net.authkey(reusable=True)
        nodes = {}
        for name, behind in SITES:
            n = net.add_node(name, behind=behind)
            nat = "a hard NAT (endpoint-dependent mapping)" if behind == "edm" else "a home NAT"
            lan = n.site.lan.subnet if n.site is not None else "?"
            console.print(f"[bold]{name}[/]: on LAN {lan} behind {nat}")
            nodes[name] = n
        for n in nodes.values():
            st = n.up(key)
            shown = " ".join(x.split("/")[0] for x in st["self"]["addresses"])
            console.print(f"[bold]{n.name}[/]: `tailpy up` → {shown}")
        for n in nodes.values():
            n.wait_peers(len(nodes) - 1)
        result["connect_seconds"] = round(time.monotonic() - t0, 2)
        console.print(f"all three see each other {result['connect_seconds']} s after the lab started")
        alpha, beta, gamma = nodes["alpha"], nodes["beta"], nodes["gamma"]

        result["paths"] = {}
        for src, dst, until_direct in ((alpha, beta, True), (gamma, alpha, False)):
            flag = "--until-direct" if until_direct else "--no-until-direct"
            console.print(f"[bold]{src.name}$ tailpy ping {dst.name}[/] ({flag})")
            out = src.cli("ping", dst.name, flag, "-c", "10" if until_direct else "3", check=False)
            for line in out.strip().splitlines():
                console.print(f"  {line}", highlight=False)
            direct = bool(re.search(r"via \d+\.\d+\.\d+\.\d+:\d+", out))
            result["paths"][f"{src.name}-{dst.name}"] = "direct" if direct else "relay"
        console.print("  alpha and beta went direct through both NATs; gamma's hard NAT needs the relay")

        result["pings"] = []
        for src, dst in ((alpha, beta), (beta, gamma)):
            out = src.ping(dst.name, count=3)  # the name resolves through MagicDNS (100.100.100.100)
            loss, avg = _ping_figures(out)
            result["pings"].append({"from": src.name, "to": dst.name, "loss_percent": loss, "avg_ms": avg})
            console.print(f"[bold]{src.name}$ ping {dst.name}[/] (MagicDNS): {loss}% loss, avg {avg} ms")

        if seconds:
            ip_b = beta.ip()
            server = beta.host.popen(["iperf3", "-s", "-1", "-B", ip_b], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            argv = ["iperf3", "-c", ip_b, "-t", str(seconds), "-J"]
            out = alpha.host.run(argv, timeout=seconds + 30).stdout
            lab.stop(server)
            gbps = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
            result["iperf3_gbit_per_s"] = round(gbps, 3)
            console.print(f"[bold]iperf3[/] alpha → beta, direct tunnel, {seconds} s: {gbps:.2f} Gbit/s")

        console.print("[bold]alpha$ tailpy status[/]")
        render(Status.from_json(alpha.status()), console)
        console.print("[bold]gamma$ tailpy netcheck[/]")
        for line in gamma.cli("netcheck", check=False).rstrip().splitlines():
            console.print(line, markup=False, highlight=False)
        result["seconds"] = round(time.monotonic() - t0, 1)
    console.print("[bold]cleaned up[/]: namespaces, processes and files removed")
    return result


@click.command("demo")
@click.option("--seconds", default=3, show_default=True, help="Length of the iperf3 run (0: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON at the end.")
def command(seconds: int, as_json: bool) -> None:
    """Build a lab tailnet on this machine (needs root): three sites behind NATs, two going direct and one
    behind a hard NAT relayed, names through MagicDNS, then `tailpy status` and `tailpy netcheck`; then
    remove it."""
    result = run_demo(seconds, Console(stderr=as_json))
    if as_json:
        click.echo(json.dumps(result, indent=2))
