"""`tailpy demo`: a lab tailnet on this machine, end to end, then removed.

Builds network namespaces (a control host and two nodes on a LAN), runs `tailpy control serve` and a
tailpyd on each node, brings both up with `tailpy up`, pings each node from the other over the tunnel,
runs a 5-second iperf3 through it, prints what it did and the figures, and removes everything, also on
Ctrl-C or failure.
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


def _ping_figures(out: str) -> tuple[float | None, float | None]:
    """(loss percent, average RTT in ms) from ping(8)'s summary."""
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    return (float(loss.group(1)) if loss else None, float(rtt.group(1)) if rtt else None)


def run_demo(seconds: int, console: Console) -> dict[str, Any]:
    from tailpy.lab import Lab
    from tailpy.lab.tailnet import LabTailnet

    for tool in ("ip", "ping", "iperf3"):
        if shutil.which(tool) is None:
            raise TailpyError(f"`{tool}` is not installed: run `make demo`, which installs what is missing")
    result: dict[str, Any] = {}
    with Lab() as lab:
        lab.install_signal_handlers()
        t0 = time.monotonic()
        net = LabTailnet(lab)
        console.print(f"[bold]lab[/]: namespaces under prefix {lab.prefix}, LAN 192.0.2.0/24")
        url = net.start_control()
        console.print(f"[bold]control[/]: `tailpy control serve` at {url}")
        key = net.authkey(reusable=True)
        console.print(f"[bold]auth key[/]: {key[:16]}… (reusable)")
        a, b = net.add_node("alpha"), net.add_node("beta")
        for n in (a, b):
            st = n.up(key)
            shown = " ".join(x.split("/")[0] for x in st["self"]["addresses"])
            console.print(f"[bold]{n.name}[/]: `tailpy up` → {shown}")
        a.wait_peers(1)
        b.wait_peers(1)
        result["connect_seconds"] = round(time.monotonic() - t0, 2)
        ip_a, ip_b = a.ip(), b.ip()
        result["pings"] = []
        for src, dst, addr in ((a, b, ip_b), (b, a, ip_a), (a, b, b.ip6())):
            loss, avg = _ping_figures(src.ping(addr, count=5))
            result["pings"].append(
                {"from": src.name, "to": dst.name, "address": addr, "loss_percent": loss, "avg_ms": avg}
            )
            console.print(f"[bold]ping[/] {src.name} → {dst.name} ({addr}): {loss}% loss, avg {avg} ms")
        server = b.host.popen(["iperf3", "-s", "-1", "-B", ip_b], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        out = a.host.run(["iperf3", "-c", ip_b, "-t", str(seconds), "-J"], timeout=seconds + 30).stdout
        lab.stop(server)
        rep = json.loads(out)
        gbps = rep["end"]["sum_received"]["bits_per_second"] / 1e9
        result["iperf3_gbit_per_s"] = round(gbps, 3)
        console.print(f"[bold]iperf3[/] {a.name} → {b.name} over the tunnel, {seconds} s: {gbps:.2f} Gbit/s")
        console.print(f"[bold]tailpy status[/] on {a.name}:")
        render(Status.from_json(a.status()), console)
    console.print("[bold]cleaned up[/]: namespaces, processes and files removed")
    return result


@click.command("demo")
@click.option("--seconds", default=5, show_default=True, help="Length of the iperf3 run.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON at the end.")
def command(seconds: int, as_json: bool) -> None:
    """Build a lab tailnet on this machine (needs root), ping and iperf3 through it, then remove it."""
    result = run_demo(seconds, Console(stderr=as_json))
    if as_json:
        click.echo(json.dumps(result, indent=2))
