"""Throughput, CPU cost and latency through the tunnel: tailpy's data plane vs wireguard-go, same run.

Topology (one lab per row): hosts ``a`` and ``b`` and a tunnel between them. For the two bare rows ``a`` and
``b`` share a veth pair (198.51.100.0/30) and the tunnel is 100.64.0.1 <-> 100.64.0.2; for the product row
they sit on the lab tailnet's LAN (192.0.2.0/24, a bridge in its own namespace, next to the control host) and
the tunnel addresses are whatever the control server hands out. For each row:

* iperf3 TCP, one stream, ``--seconds`` long, a -> b and b -> a (``-R``): Gbit/s received;
* CPU-seconds per Gbit: utime + stime of both tunnel processes (from /proc/<pid>/stat) over each run,
  divided by the gigabits moved (for the product row: the two tailpyd processes);
* ping RTT p50/p99 through the tunnel, idle and under load (``ping -i 0.01 -c 200`` while iperf3 runs).

Rows:

* ``tailpy``: the bare data plane (``python -m tailpy.lab.wgnode`` on each side, static keys and peers);
* ``tailpy-product``: tailpy as users run it (:mod:`tailpy.lab.tailnet`): ``tailpy control serve`` on a
  control host, then ``tailpyd`` + ``tailpy up --auth-key`` on each node. tailpyd picks its own TUN MTU
  (its default, 1280: ``LabNode`` starts it without ``--mtu``), so ``--mtu`` does not apply to this row;
* ``wireguard-go``: Debian's, configured with wg(8).

Prints a table (``--json`` for JSON) and the ratios tailpy / wireguard-go, one line per tailpy row.
Usage: ``python benchmarks/throughput.py [--seconds 10] [--mtu 1420] [--json]
[--only tailpy|tailpy-product|wireguard-go]``
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailpy.errors import TailpyError
from tailpy.lab import Host, Lab, cpu_seconds, wait_for
from tailpy.lab.tailnet import LabTailnet
from tailpy.lab.tunnels import TailpyNode, WireguardGo, missing_tools, native_device_reason, wg_keypair
from tailpy.lab.wgnode import PeerArg

A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
PORT_A, PORT_B = 41641, 51820
PING_COUNT = 200


@dataclass
class Tunnel:
    """A tunnel up between ``a`` and ``b``: where to reach ``b`` through it, the processes doing the work,
    and the MTU of the tunnel interfaces."""

    a: Host
    b: Host
    b_addr: str
    pids: list[int]
    mtu: int


Starter = Callable[[Lab, int], Tunnel]


def veth_pair(lab: Lab) -> tuple[Host, Host, str, str]:
    """Hosts ``a`` and ``b`` on one veth pair; returns them and their addresses."""
    a, b = lab.host("a"), lab.host("b")
    ip_a, ip_b = lab.link(a, b, subnet="198.51.100.0/30")
    return a, b, ip_a, ip_b


def start_tailpy(lab: Lab, mtu: int) -> Tunnel:
    """Both ends as tailpy wgnode processes (the bare data plane)."""
    a, b, ip_a, ip_b = veth_pair(lab)
    (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
    na = TailpyNode.start(
        a,
        a_priv,
        address=f"{A_TUN}/32",
        listen_port=PORT_A,
        mtu=mtu,
        peers=[PeerArg(base64.b64decode(b_pub), f"{ip_b}:{PORT_B}", [f"{B_TUN}/32"])],
    )
    nb = TailpyNode.start(
        b,
        b_priv,
        address=f"{B_TUN}/32",
        listen_port=PORT_B,
        mtu=mtu,
        peers=[PeerArg(base64.b64decode(a_pub), f"{ip_a}:{PORT_A}", [f"{A_TUN}/32"])],
    )
    return Tunnel(a, b, B_TUN, [na.proc.pid, nb.proc.pid], mtu)


def start_tailpy_product(lab: Lab, mtu: int) -> Tunnel:
    """tailpy as users run it: a control server, then tailpyd (``--mtu mtu``) + ``tailpy up`` on ``a`` and
    ``b``, on the tailnet's bridged LAN."""
    net = LabTailnet(lab)
    net.start_control()
    na, nb = net.connected("a", "b", daemon_args=("--mtu", str(mtu)))
    b_addr = nb.ip()
    tun_mtu = int(nb.host.run(["cat", f"/sys/class/net/{_route_dev(nb.host, b_addr)}/mtu"]).stdout)
    return Tunnel(na.host, nb.host, b_addr, [na.daemon.pid, nb.daemon.pid], tun_mtu)


def _route_dev(host: Host, address: str) -> str:
    """The interface ``host`` has ``address`` on."""
    out = host.run(["ip", "-o", "addr", "show", "to", address]).stdout.split()
    if len(out) < 2:
        raise TailpyError(f"{host.name} has no interface with {address}")
    return out[1]


def start_wireguard_go(lab: Lab, mtu: int) -> Tunnel:
    """Both ends as wireguard-go processes."""
    a, b, ip_a, ip_b = veth_pair(lab)
    (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
    wa = WireguardGo.start(
        a,
        a_priv,
        address=f"{A_TUN}/32",
        listen_port=PORT_A,
        mtu=mtu,
        peers=[PeerArg(base64.b64decode(b_pub), f"{ip_b}:{PORT_B}", [f"{B_TUN}/32"])],
    )
    wb = WireguardGo.start(
        b,
        b_priv,
        address=f"{B_TUN}/32",
        listen_port=PORT_B,
        mtu=mtu,
        peers=[PeerArg(base64.b64decode(a_pub), f"{ip_a}:{PORT_A}", [f"{A_TUN}/32"])],
    )
    return Tunnel(a, b, B_TUN, [wa.proc.pid, wb.proc.pid], mtu)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ping_rtts(host: Host, address: str) -> dict[str, float]:
    """p50/p99 RTT (ms) and loss (%) of ``ping -i 0.01 -c 200`` from ``host``."""
    out = host.run(
        ["ping", "-n", "-i", "0.01", "-c", str(PING_COUNT), "-W", "2", address], check=False
    ).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if not rtts:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "loss_pct": 100.0}
    return {
        "p50_ms": percentile(rtts, 50),
        "p99_ms": percentile(rtts, 99),
        "loss_pct": 100.0 * (PING_COUNT - len(rtts)) / PING_COUNT,
    }


def iperf(a: Host, b_addr: str, seconds: float, reverse: bool, pids: list[int]) -> dict[str, float]:
    """One iperf3 TCP stream through the tunnel: Gbit/s and CPU-seconds per Gbit of the tunnel processes."""
    cpu0 = sum(cpu_seconds(p) for p in pids)
    args = ["iperf3", "-c", b_addr, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    out = json.loads(a.run(args, timeout=seconds + 30).stdout)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    received = out["end"]["sum_received"]
    gbits = received["bytes"] * 8 / 1e9
    return {
        "gbit_s": received["bits_per_second"] / 1e9,
        "cpu_s_per_gbit": cpu / gbits if gbits else float("nan"),
    }


def measure(name: str, start: Starter, seconds: float, mtu: int) -> dict[str, Any]:
    """Build a fresh lab, start ``name``'s tunnel on it, and take every measurement."""
    with Lab() as lab:
        t = start(lab, mtu)
        a, b, dst = t.a, t.b, t.b_addr
        a.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", dst])  # handshake done
        b.popen(["iperf3", "-s", "-B", dst], stderr=subprocess.DEVNULL)
        wait_for(
            lambda: "LISTEN" in b.run(["ss", "-Htln", "sport", "= :5201"], check=False).stdout,
            timeout=10,
            what="iperf3 server",
        )
        result: dict[str, Any] = {"implementation": name, "mtu": t.mtu, "seconds": seconds}
        result["ping_idle"] = ping_rtts(a, dst)
        result["forward"] = iperf(a, dst, seconds, False, t.pids)
        result["reverse"] = iperf(a, dst, seconds, True, t.pids)
        load_seconds = max(4.0, PING_COUNT * 0.01 + 2)
        load = a.popen(["iperf3", "-c", dst, "-t", str(load_seconds)], stdout=subprocess.DEVNULL)
        result["ping_loaded"] = ping_rtts(a, dst)
        load.wait(timeout=load_seconds + 30)
        return result


def ratios(tp: dict[str, Any], wg: dict[str, Any]) -> dict[str, float]:
    """tailpy / wireguard-go for each figure (> 1 means tailpy has more of it)."""

    def r(x: float, y: float) -> float:
        return x / y if y else float("nan")

    return {
        "gbit_s_forward": r(tp["forward"]["gbit_s"], wg["forward"]["gbit_s"]),
        "gbit_s_reverse": r(tp["reverse"]["gbit_s"], wg["reverse"]["gbit_s"]),
        "cpu_s_per_gbit_forward": r(tp["forward"]["cpu_s_per_gbit"], wg["forward"]["cpu_s_per_gbit"]),
        "cpu_s_per_gbit_reverse": r(tp["reverse"]["cpu_s_per_gbit"], wg["reverse"]["cpu_s_per_gbit"]),
        "ping_idle_p50": r(tp["ping_idle"]["p50_ms"], wg["ping_idle"]["p50_ms"]),
        "ping_loaded_p50": r(tp["ping_loaded"]["p50_ms"], wg["ping_loaded"]["p50_ms"]),
        "ping_loaded_p99": r(tp["ping_loaded"]["p99_ms"], wg["ping_loaded"]["p99_ms"]),
    }


def print_table(results: list[dict[str, Any]], ratio: dict[str, dict[str, float]]) -> None:
    """The table: one row per implementation, then one ratio line per tailpy row (``ratio`` keys)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tunnel throughput, CPU and latency (a <-> b)")
    for col in ("", "MTU", "Gbit/s a→b", "Gbit/s b→a", "CPU-s/Gbit a→b", "CPU-s/Gbit b→a",
                "ping idle p50/p99 ms", "ping loaded p50/p99 ms (loss)"):  # fmt: skip
        table.add_column(col, justify="right" if col else "left")
    for res in results:
        if "error" in res:
            table.add_row(res["implementation"], *["-"] * 7)
            continue
        f, rv, pi, pl = res["forward"], res["reverse"], res["ping_idle"], res["ping_loaded"]
        table.add_row(
            res["implementation"],
            str(res["mtu"]),
            f"{f['gbit_s']:.2f}",
            f"{rv['gbit_s']:.2f}",
            f"{f['cpu_s_per_gbit']:.2f}",
            f"{rv['cpu_s_per_gbit']:.2f}",
            f"{pi['p50_ms']:.3f} / {pi['p99_ms']:.3f}",
            f"{pl['p50_ms']:.3f} / {pl['p99_ms']:.3f} ({pl['loss_pct']:.1f} %)",
        )
    for name, r in ratio.items():
        table.add_row(
            f"[bold]{name} / wireguard-go[/bold]",
            "",
            f"{r['gbit_s_forward']:.2f}x",
            f"{r['gbit_s_reverse']:.2f}x",
            f"{r['cpu_s_per_gbit_forward']:.2f}x",
            f"{r['cpu_s_per_gbit_reverse']:.2f}x",
            f"{r['ping_idle_p50']:.2f}x (p50)",
            f"{r['ping_loaded_p50']:.2f}x / {r['ping_loaded_p99']:.2f}x",
        )
    console = Console(width=max(Console().width, 130))
    console.print(table)
    for res in results:
        if "error" in res:
            console.print(f"[red]{res['implementation']} not measured:[/red] {res['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10, help="length of each iperf3 run (default 10)")
    p.add_argument("--mtu", type=int, default=1420, help="tunnel MTU of the bare rows (default 1420)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--only", choices=["tailpy", "tailpy-product", "wireguard-go"], help="measure one row only"
    )
    args = p.parse_args(argv)

    starters: list[tuple[str, Starter, str | None]] = [
        ("tailpy", start_tailpy, native_device_reason()),
        ("tailpy-product", start_tailpy_product, native_device_reason()),
        ("wireguard-go", start_wireguard_go, missing_tools("wireguard-go", "wg")),
    ]
    base = missing_tools("iperf3", "ping", "wg")
    results: list[dict[str, Any]] = []
    for name, start, reason in starters:
        if args.only and name != args.only:
            continue
        if base or reason:
            results.append({"implementation": name, "error": base or reason})
            continue
        if not args.json:
            print(f"measuring {name} ({args.seconds:g} s per iperf3 run)...", file=sys.stderr)
        try:
            results.append(measure(name, start, args.seconds, args.mtu))
        except TailpyError as e:
            results.append({"implementation": name, "error": str(e)})
    by_name = {r["implementation"]: r for r in results if "error" not in r}
    wg = by_name.get("wireguard-go")
    ratio = {n: ratios(by_name[n], wg) for n in ("tailpy", "tailpy-product") if wg and n in by_name}
    if args.json:
        out = {
            "results": results,
            "ratio_tailpy_over_wireguard_go": ratio.get("tailpy"),
            "ratio_tailpy_product_over_wireguard_go": ratio.get("tailpy-product"),
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(results, ratio)
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
