"""MagicDNS benchmark: queries per second and latency (p50/p99) with dnsperf (Debian's), in the lab.

A lab tailnet (`tailpy control serve`, two nodes with tailpyd + `tailpy up`) and a lab upstream resolver
(dnsmasq, authoritative only, on host ``dns``); control's nameserver is that upstream. dnsperf runs inside
node ``a`` against:

* ``tailnet``: MagicDNS (100.100.100.100) for tailnet names (A and AAAA of both nodes, FQDN and short name);
* ``forwarded``: MagicDNS for names it forwards to the upstream (``www<i>.example``);
* ``dnsmasq``: the upstream itself, for the same names (the reference point: a C resolver).

Each target is measured twice: saturated (dnsperf's default 100 queries outstanding, for ``--seconds``),
giving queries per second and the latency under that load, and at a light fixed rate (``--light-qps``),
giving the latency of an idle resolver. Percentiles come from dnsperf's per-query report (``-v``).

    .venv/bin/python benchmarks/magicdns.py [--seconds 10] [--light-qps 200] [--json] [--smoke]

``--smoke`` runs each target for about a second (a check that the benchmark still works, in seconds; its
figures mean nothing). Exits 1 when a target answered no query at all, and 77 (the "skipped" status of
automake's test harness) with the reason on stderr when dnsperf, dig or dnsmasq is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from tailpy.lab import Lab
from tailpy.lab import unavailable_reason as lab_reason
from tailpy.lab.dns import Dnsmasq, dnsmasq_reason
from tailpy.lab.tailnet import LabNode, LabTailnet

UPSTREAM = "192.0.2.53"
FORWARDED_NAMES = 50
SKIPPED = 77  # exit status: the benchmark could not run here (automake's convention for a skipped test)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def dnsperf(node: LabNode, server: str, queries: Path, seconds: float, qps: int | None) -> dict[str, Any]:
    """One dnsperf run inside ``node``: qps, completed/lost, latency p50/p99/mean in milliseconds."""
    args = ["dnsperf", "-s", server, "-d", str(queries), "-l", str(seconds), "-v", "-t", "2"]
    if qps:
        args += ["-Q", str(qps)]
    out = node.host.run(args, timeout=seconds + 60).stdout
    lat = sorted(float(m.group(1)) * 1000 for m in re.finditer(r"^> \S+ \S+ \S+ ([0-9.]+)$", out, re.M))
    qps_m = re.search(r"Queries per second:\s+([0-9.]+)", out)
    lost_m = re.search(r"Queries lost:\s+(\d+)", out)
    done_m = re.search(r"Queries completed:\s+(\d+)", out)
    codes = re.search(r"Response codes:\s+(.*)", out)
    return {
        "qps": float(qps_m.group(1)) if qps_m else 0.0,
        "completed": int(done_m.group(1)) if done_m else 0,
        "lost": int(lost_m.group(1)) if lost_m else 0,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "codes": codes.group(1).strip() if codes else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per saturated run")
    ap.add_argument("--light-qps", type=int, default=200, help="query rate of the light runs")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--smoke", action="store_true", help="about a second per target: check it still runs")
    opts = ap.parse_args()
    if opts.smoke:
        opts.seconds, opts.light_qps = 1.0, 50
    for tool in ("dnsperf", "dig"):
        if shutil.which(tool) is None:
            print(f"magicdns: skipped: {tool} not found (Debian: dnsperf, bind9-dnsutils)", file=sys.stderr)
            return SKIPPED
    if dnsmasq_reason():
        print(f"magicdns: skipped: {dnsmasq_reason()}", file=sys.stderr)
        return SKIPPED
    if lab_reason():
        print(f"magicdns: skipped: no lab on this machine: {lab_reason()}", file=sys.stderr)
        return SKIPPED
    rows: dict[str, dict[str, Any]] = {}
    with Lab() as lab:
        lab.install_signal_handlers()
        net = LabTailnet(lab)
        net.start_control()
        dns_host = lab.host("dns")
        net.lan.attach(dns_host)
        dns_host.add_address("lan0", f"{UPSTREAM}/24")
        names = {f"www{i}.example": [f"198.51.100.{i + 1}"] for i in range(FORWARDED_NAMES)}
        Dnsmasq(dns_host, UPSTREAM, names, net.root / "dns", "upstream")
        net.control("dns", "set", "--nameserver", UPSTREAM)
        a, _b = net.connected("a", "b")
        local = net.root / "tailnet.queries"
        local.write_text(
            "".join(
                f"{n}.{d} {t}\n" for n in ("a", "b") for d in ("tailnet.internal",) for t in ("A", "AAAA")
            )
            + "b A\na AAAA\n"
        )
        forwarded = net.root / "forwarded.queries"
        forwarded.write_text("".join(f"{n} A\n" for n in names))
        for label, server, queries in (
            ("tailnet", "100.100.100.100", local),
            ("forwarded", "100.100.100.100", forwarded),
            ("dnsmasq", UPSTREAM, forwarded),
        ):
            rows[label] = {
                "saturated": dnsperf(a, server, queries, opts.seconds, None),
                "light": dnsperf(
                    a,
                    server,
                    queries,
                    opts.seconds if opts.smoke else max(2.0, opts.seconds / 2),
                    opts.light_qps,
                ),
            }
            print(f"{label}: done", file=sys.stderr)
    silent = [label for label, r in rows.items() if not r["saturated"]["completed"] + r["light"]["completed"]]
    if silent:
        print(f"magicdns: no query answered by: {', '.join(silent)}", file=sys.stderr)
    status = 1 if silent else 0
    if opts.json:
        print(json.dumps(rows, indent=2))
        return status
    print(
        f"| target | qps (saturated) | p50 / p99 ms saturated | p50 / p99 ms at {opts.light_qps} qps | lost |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, r in rows.items():
        s, li = r["saturated"], r["light"]
        print(
            f"| {label} | {s['qps']:.0f} | {s['p50_ms']:.3f} / {s['p99_ms']:.3f} | "
            f"{li['p50_ms']:.3f} / {li['p99_ms']:.3f} | {s['lost'] + li['lost']} |"
        )
    base = rows["dnsmasq"]["saturated"]["qps"]
    if base:
        for label in ("tailnet", "forwarded"):
            print(f"{label} / dnsmasq qps: {rows[label]['saturated']['qps'] / base:.2f}x")
    return status


if __name__ == "__main__":
    sys.exit(main())
