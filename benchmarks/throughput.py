"""Throughput, CPU cost and latency through the tunnel: tailpy against stock WireGuard peers, same run.

Topology (a fresh lab per measurement): hosts ``a`` and ``b`` and a tunnel between them. For every row but
``tailpy-product``, ``a`` and ``b`` share a veth pair (198.51.100.0/30) and the tunnel is 100.64.0.1 <->
100.64.0.2 at ``--mtu``; for ``tailpy-product`` they sit on the lab tailnet's LAN (192.0.2.0/24, a bridge in
its own namespace, next to the control host), tailpyd runs with ``--mtu`` and the tunnel addresses are
whatever the control server hands out.

Rows (``--only`` picks some, comma-separated):

* ``tailpy``: the bare data plane (``python -m tailpy.lab.wgnode`` on each side, static keys and peers);
* ``tailpy-filter``: the same with a packet filter of 100 rules on each end (``bench_filter``: groups,
  ranges, single nodes, IPv6 prefixes, assorted ports and protocols), the measured flows matching its last
  rule; its ratio over ``tailpy`` is the filter's cost;
* ``tailpy-product``: tailpy as users run it (:mod:`tailpy.lab.tailnet`): ``tailpy control serve`` on a
  control host, then ``tailpyd --mtu M`` + ``tailpy up --auth-key`` on each node;
* ``wireguard-go-debian``: Debian's wireguard-go (``/usr/bin/wireguard-go``), configured with wg(8);
* ``wireguard-go-newest``: wireguard-go built from ``golang.zx2c4.com/wireguard`` at the pinned
  pseudo-version (TUN offloads, UDP GSO/GRO), configured with wg(8);
* ``boringtun`` and ``boringtun-t1``: boringtun-cli at its pinned version, at its default thread count and
  with ``--threads 1``, configured with wg(8).

The two built peers are built once into a cache (``$TAILPY_BENCH_CACHE`` or ``~/.cache/tailpy/bench-tools``;
``--build-tools`` builds them and exits); a row whose tool is missing or cannot be built is skipped, and the
reason is printed (and put in the JSON).

Per row and round:

* iperf3 TCP, ``--seconds`` long, each run against a one-off server (``iperf3 -s -1``): one stream a -> b,
  one stream b -> a (``-R``), four streams a -> b (``-P 4``): Gbit/s received, TCP retransmits of the
  sender (iperf3's ``end.sum_sent.retransmits``);
* CPU-seconds per Gbit: utime + stime of both tunnel processes (``/proc/<pid>/stat``, all threads) over each
  iperf3 run, divided by the gigabits received (for ``tailpy-product``: the two tailpyd processes);
* ping RTT p50/p99 (nearest rank) and loss through the tunnel (``ping -i 0.01 -c 200``), idle and while
  one iperf3 stream runs a -> b (the pings start once its connections are up).

Rounds alternate (round 1: every row, then round 2: every row, ...), so slow drifts of a shared machine fall
on every row alike. Each figure is the median over rounds with its spread (min-max). Ratios are taken per
round (same round, so the closest in time) and summarised the same way: ``tailpy`` and ``tailpy-product``
over ``wireguard-go-newest``, and ``tailpy-product`` and ``tailpy-filter`` over ``tailpy``.

Usage: ``python benchmarks/throughput.py [--rounds 3] [--seconds 10] [--mtu 1420] [--only ROW,...]
[--json | --markdown] [--smoke] [--build-tools]``. ``--smoke`` checks in about a minute that the benchmark
still runs (one round, 1 s iperf3 runs, 20 pings, only rows whose tools are already built). Exit status 0
when every row that was not skipped was measured in every round, 77 (skipped) when no row can run here (no
network namespaces, iperf3 missing...; the reason on stderr), 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailpy.errors import LabError, TailpyError
from tailpy.lab import Host, Lab, cpu_seconds, unavailable_reason, wait_for
from tailpy.lab.tailnet import LabTailnet
from tailpy.lab.tunnels import (
    Boringtun,
    Tool,
    UapiPeer,
    WireguardGo,
    bench_cache_dir,
    boringtun_cli,
    debian_wireguard_go,
    missing_tools,
    native_device_reason,
    start_tailpy_pair,
    wg_keypair,
    wireguard_go_newest,
)
from tailpy.lab.wgnode import PeerArg
from tailpy.packetfilter import FilterRule, NetPortRange, PortRange

A_TUN, B_TUN = "100.64.0.1", "100.64.0.2"
PORT_A, PORT_B = 41641, 51820
IPERF_PORT = 5201
#: iperf3 client errors after which a run is tried again (against a new server), and how many times.
CLIENT_ERRORS = ("busy", "Connection refused", "Connection reset", "unable to receive control message")
RETRIES = 3
#: Exit status when no row can run here (automake's "skipped"), the reason on stderr's last line.
SKIPPED = 77

#: The reference row of the ratios, and the ratios printed: (numerator, denominator).
REFERENCE = "wireguard-go-newest"
RATIOS = (
    ("tailpy", REFERENCE),
    ("tailpy-product", REFERENCE),
    ("tailpy-product", "tailpy"),
    ("tailpy-filter", "tailpy"),
)
#: Rules in the packet filter of the ``tailpy-filter`` row.
FILTER_RULES = 100

#: Figures that get a ratio, as (section, key) of a sample. Retransmits get none (the reference's are
#: often 0).
RATIO_METRICS = (
    ("forward", "gbit_s"),
    ("reverse", "gbit_s"),
    ("parallel", "gbit_s"),
    ("forward", "cpu_s_per_gbit"),
    ("reverse", "cpu_s_per_gbit"),
    ("parallel", "cpu_s_per_gbit"),
    ("ping_idle", "p50_ms"),
    ("ping_idle", "p99_ms"),
    ("ping_loaded", "p50_ms"),
    ("ping_loaded", "p99_ms"),
)


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


@dataclass
class Row:
    """One implementation to measure: how to start it, the binary it runs (for the report), and why it is
    skipped (None: measured)."""

    name: str
    description: str
    start: Starter
    tool: Tool | None = None
    skipped: str | None = None
    samples: list[dict[str, Any] | None] = field(default_factory=list)  # None: that round failed
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """How long and how hard to measure."""

    seconds: int  # each iperf3 run
    mtu: int
    ping_count: int  # pings of each ping run, 10 ms apart
    load_seconds: int  # the iperf3 run under the loaded pings: outlasts them


def veth_pair(lab: Lab) -> tuple[Host, Host, str, str]:
    """Hosts ``a`` and ``b`` on one veth pair; returns them and their addresses."""
    a, b = lab.host("a"), lab.host("b")
    ip_a, ip_b = lab.link(a, b, subnet="198.51.100.0/30")
    return a, b, ip_a, ip_b


def start_tailpy(lab: Lab, mtu: int) -> Tunnel:
    """Both ends as tailpy wgnode processes (the bare data plane)."""
    a, b, ip_a, ip_b = veth_pair(lab)
    pair = start_tailpy_pair(a, b, endpoint_a=ip_a, endpoint_b=ip_b, port_a=PORT_A, port_b=PORT_B, mtu=mtu)
    return Tunnel(a, b, B_TUN, [pair.a.proc.pid, pair.b.proc.pid], mtu)


def bench_filter(src: str, dst: str, rules: int = FILTER_RULES) -> tuple[FilterRule, ...]:
    """A filter of realistic shape for the node at ``dst``: ``rules - 1`` rules from other sources (groups'
    /24s, address ranges, single nodes, IPv6 prefixes) to assorted ports and protocols of ``dst``, then the
    one that admits ``src`` to iperf3's TCP port and ping (last, so that matching walks past the others)."""
    out: list[FilterRule] = []
    protos: tuple[tuple[int, ...], ...] = ((), (6,), (17,), (6, 17))
    for i in range(rules - 1):
        sources = (
            f"10.{i}.0.0/24",
            f"100.65.{i}.1-100.65.{i}.200",
            f"100.66.0.{i + 1}",
            f"fd7a:115c:a1e0:{i:x}::/64",
        )
        port = 1000 + 7 * i
        dsts = (NetPortRange(f"{dst}/32", PortRange(port, port + (i % 5))),)
        out.append(FilterRule(sources[: 1 + i % 4], dsts, protos[i % 4]))
    iperf = NetPortRange(f"{dst}/32", PortRange(IPERF_PORT, IPERF_PORT))
    out.append(FilterRule((f"{src}/32",), (iperf,), (6,)))
    return tuple(out)


def start_tailpy_filtered(lab: Lab, mtu: int) -> Tunnel:
    """The bare data plane with a packet filter of :data:`FILTER_RULES` rules on both ends
    (:func:`bench_filter`; the measured flows match its last rule)."""
    a, b, ip_a, ip_b = veth_pair(lab)
    pair = start_tailpy_pair(a, b, endpoint_a=ip_a, endpoint_b=ip_b, port_a=PORT_A, port_b=PORT_B, mtu=mtu)
    pair.a.set_filter(bench_filter(B_TUN, A_TUN))
    pair.b.set_filter(bench_filter(A_TUN, B_TUN))
    return Tunnel(a, b, B_TUN, [pair.a.proc.pid, pair.b.proc.pid], mtu)


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


PeerFactory = Callable[[Host, str, str, int, int, list[PeerArg]], UapiPeer]


def uapi_starter(factory: PeerFactory) -> Starter:
    """A :data:`Starter` for a userspace WireGuard configured with wg(8): ``factory(host, private_key,
    address, listen_port, mtu, peers)`` starts one end."""

    def start(lab: Lab, mtu: int) -> Tunnel:
        a, b, ip_a, ip_b = veth_pair(lab)
        (a_priv, a_pub), (b_priv, b_pub) = wg_keypair(), wg_keypair()
        to_b = [PeerArg(base64.b64decode(b_pub), f"{ip_b}:{PORT_B}", [f"{B_TUN}/32"])]
        to_a = [PeerArg(base64.b64decode(a_pub), f"{ip_a}:{PORT_A}", [f"{A_TUN}/32"])]
        pa = factory(a, a_priv, f"{A_TUN}/32", PORT_A, mtu, to_b)
        pb = factory(b, b_priv, f"{B_TUN}/32", PORT_B, mtu, to_a)
        return Tunnel(a, b, B_TUN, [pa.proc.pid, pb.proc.pid], mtu)

    return start


def wireguard_go_starter(binary: Path) -> Starter:
    """Both ends as ``binary -f`` (a wireguard-go build)."""

    def factory(host: Host, key: str, address: str, port: int, mtu: int, peers: list[PeerArg]) -> UapiPeer:
        return WireguardGo.start(
            host, key, address=address, listen_port=port, mtu=mtu, peers=peers, binary=binary
        )

    return uapi_starter(factory)


def boringtun_starter(binary: Path, threads: int | None) -> Starter:
    """Both ends as boringtun-cli with ``--threads threads`` (None: its default)."""

    def factory(host: Host, key: str, address: str, port: int, mtu: int, peers: list[PeerArg]) -> UapiPeer:
        return Boringtun.start(
            host,
            key,
            address=address,
            listen_port=port,
            mtu=mtu,
            peers=peers,
            binary=binary,
            threads=threads,
        )

    return uapi_starter(factory)


def _unavailable(lab: Lab, mtu: int) -> Tunnel:
    raise TailpyError("this row has no tool to run")


def build_tools(build: bool) -> tuple[Tool, Tool, Tool]:
    """Debian's wireguard-go, the newest wireguard-go and boringtun-cli; the last two built into the cache
    when missing and ``build`` is true (see :func:`tailpy.lab.tunnels.wireguard_go_newest`)."""
    return debian_wireguard_go(), wireguard_go_newest(build=build), boringtun_cli(build=build)


def make_rows(build: bool) -> list[Row]:
    """Every row, each with its tool or the reason it is skipped."""
    native = native_device_reason()
    debian, newest, boringtun = build_tools(build)
    rows = [
        Row("tailpy", "tailpy bare data plane (tailpy.lab.wgnode)", start_tailpy, skipped=native),
        Row(
            "tailpy-filter",
            f"tailpy bare data plane, packet filter of {FILTER_RULES} rules (flows match the last)",
            start_tailpy_filtered,
            skipped=native,
        ),
        Row(
            "tailpy-product",
            "tailpy as users run it (control + tailpyd + tailpy up)",
            start_tailpy_product,
            skipped=native,
        ),
    ]
    for tool, name, description, starter in (
        (debian, "wireguard-go-debian", "Debian's wireguard-go", wireguard_go_starter),
        (newest, "wireguard-go-newest", "newest wireguard-go", wireguard_go_starter),
    ):
        start = starter(tool.path) if tool.path else _unavailable
        rows.append(Row(name, description, start, tool, tool.reason))
    for name, threads in (("boringtun", None), ("boringtun-t1", 1)):
        start = boringtun_starter(boringtun.path, threads) if boringtun.path else _unavailable
        flag = "default threads" if threads is None else f"--threads {threads}"
        rows.append(Row(name, f"boringtun-cli ({flag})", start, boringtun, boringtun.reason))
    return rows


# -- measuring ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ping_rtts(host: Host, address: str, count: int) -> dict[str, float]:
    """p50/p99 RTT (ms) and loss (%) of ``ping -i 0.01 -c count`` from ``host``."""
    out = host.run(
        ["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "2", address],
        check=False,
        timeout=count * 0.01 + 30,
    ).stdout
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]
    if not rtts:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "loss_pct": 100.0}
    return {
        "p50_ms": percentile(rtts, 50),
        "p99_ms": percentile(rtts, 99),
        "loss_pct": 100.0 * (count - len(rtts)) / count,
    }


def serve_once(b: Host, dst: str) -> subprocess.Popen[str]:
    """A one-off iperf3 server on ``b`` (``-s -1``: serves one test, then exits), returned once it listens.

    One server per run: a long-lived iperf3 3.12 server, between two tests, now and then refuses or resets
    the next client ("the server is busy", "connection refused", "unable to receive control message").
    Raises LabError when it exits or does not listen within 10 s."""
    server = b.popen(["iperf3", "-s", "-1", "-B", dst, "-p", str(IPERF_PORT)], stderr=subprocess.DEVNULL)

    def listening() -> bool:
        if server.poll() is not None:
            raise LabError(f"iperf3 -s on {b.name} exited with status {server.returncode}")
        return "LISTEN" in b.run(["ss", "-Htln", "sport", f"= :{IPERF_PORT}"], check=False).stdout

    wait_for(listening, timeout=10, what="iperf3 server")
    return server


def finish(b: Host, server: subprocess.Popen[str]) -> None:
    """Let a one-off server exit after its test (up to 5 s), else stop it; the port is free afterwards."""
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        b.lab.stop(server)


def iperf(
    a: Host,
    b: Host,
    b_addr: str,
    seconds: int,
    pids: list[int],
    *,
    reverse: bool = False,
    streams: int = 1,
) -> dict[str, float]:
    """One iperf3 TCP run a -> b through the tunnel (b -> a with ``reverse``) against a fresh one-off server:
    Gbit/s received, CPU-seconds per Gbit of the tunnel processes, and the sender's TCP retransmits
    (iperf3 -J ``end.sum_sent.retransmits``). A run the client could not start (:data:`CLIENT_ERRORS`) is
    tried again, up to :data:`RETRIES` times. Raises TailpyError."""
    args = ["iperf3", "-c", b_addr, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", "-P", str(streams)]
    args += ["-R"] if reverse else []
    for attempt in range(RETRIES + 1):
        server = serve_once(b, b_addr)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        done = a.run(args, timeout=seconds + 30, check=False)
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        finish(b, server)
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise TailpyError(
                f"iperf3 printed no JSON (exit {done.returncode}): {done.stderr.strip()}"
            ) from None
        error = str(out.get("error", ""))
        if not any(e in error for e in CLIENT_ERRORS) or attempt == RETRIES:
            break
        time.sleep(0.5)
    if "error" in out:
        raise TailpyError(f"`{' '.join(args)}`: {out['error']}")
    received, sent = out["end"]["sum_received"], out["end"]["sum_sent"]
    gbits = received["bytes"] * 8 / 1e9
    return {
        "gbit_s": received["bits_per_second"] / 1e9,
        "cpu_s_per_gbit": cpu / gbits if gbits else math.nan,
        "retransmits": float(sent.get("retransmits", math.nan)),
    }


def start_load(
    a: Host, b: Host, dst: str, seconds: int
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """One iperf3 stream a -> b for ``seconds`` in the background against a one-off server; returns (client,
    server) once the client's control and data connections are established, so that the pings that follow
    see a loaded tunnel. Started again when the client exits first. Raises TailpyError."""
    for _ in range(RETRIES + 1):
        server = serve_once(b, dst)
        load = a.popen(["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds)])

        def connected(load: subprocess.Popen[str] = load) -> str | None:
            if load.poll() is not None:
                return "exited"
            ss = ["ss", "-Htn", "state", "established", "dst", f"{dst}:{IPERF_PORT}"]
            return "up" if len(a.run(ss, check=False).stdout.splitlines()) >= 2 else None

        if wait_for(connected, timeout=10, what="the load's iperf3 to connect") == "up":
            return load, server
        finish(b, server)
        time.sleep(0.5)
    raise TailpyError(f"the load's iperf3 to {dst} kept exiting before it connected")


def measure(row: Row, settings: Settings) -> dict[str, Any]:
    """Build a fresh lab, start ``row``'s tunnel on it, and take every measurement of one round."""
    started = time.monotonic()
    with Lab() as lab:
        t = row.start(lab, settings.mtu)
        a, b, dst = t.a, t.b, t.b_addr
        a.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "-w", "15", dst])  # handshake done
        sample: dict[str, Any] = {"mtu": t.mtu}
        sample["ping_idle"] = ping_rtts(a, dst, settings.ping_count)
        sample["forward"] = iperf(a, b, dst, settings.seconds, t.pids)
        sample["reverse"] = iperf(a, b, dst, settings.seconds, t.pids, reverse=True)
        sample["parallel"] = iperf(a, b, dst, settings.seconds, t.pids, streams=4)
        load, server = start_load(a, b, dst, settings.load_seconds)
        sample["ping_loaded"] = ping_rtts(a, dst, settings.ping_count)
        load.wait(timeout=settings.load_seconds + 30)
        finish(b, server)
    sample["elapsed_s"] = round(time.monotonic() - started, 1)  # lab set-up and tear-down included
    return sample


# -- summarising -------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    """Median, min and max of the finite values (None when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def summarize(samples: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float] | None]]:
    """Per section and figure of the samples: :func:`spread` over rounds."""
    out: dict[str, dict[str, dict[str, float] | None]] = {}
    if not samples:
        return out
    for section, figures in samples[0].items():
        if isinstance(figures, dict):
            out[section] = {k: spread([s[section][k] for s in samples]) for k in figures}
    return out


def ratio_summary(num: Row, den: Row) -> dict[str, dict[str, float] | None] | None:
    """``num / den`` per figure of :data:`RATIO_METRICS`, taken per round then summarised (None when the
    two rows share no measured round)."""
    pairs = [
        (n, d)
        for n, d in zip(num.samples, den.samples, strict=False)
        if n is not None and d is not None  # a failed round is None
    ]
    if not pairs:
        return None

    def ratio(x: float, y: float) -> float:
        return x / y if y and math.isfinite(x) and math.isfinite(y) else math.nan

    return {
        f"{section}.{key}": spread([ratio(n[section][key], d[section][key]) for n, d in pairs])
        for section, key in RATIO_METRICS
    }


def git_commit() -> str:
    """The commit of the checkout this file is in (``+dirty`` when it has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def report(
    rows: list[Row], settings: Settings, rounds: int, smoke: bool, commit: str, started: float
) -> dict[str, Any]:
    """Everything as one JSON-able dict (the ``--json`` output); ``commit`` and ``started`` (time.time())
    from the start of the run."""
    by_name = {r.name: r for r in rows}
    ratios: dict[str, Any] = {}
    for num, den in RATIOS:
        if num in by_name and den in by_name and not by_name[num].skipped and not by_name[den].skipped:
            ratios[f"{num} / {den}"] = ratio_summary(by_name[num], by_name[den])
    return {
        "date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count() or 0},
        "settings": {
            "rounds": rounds,
            "seconds": settings.seconds,
            "mtu": settings.mtu,
            "ping_count": settings.ping_count,
            "load_seconds": settings.load_seconds,
            "smoke": smoke,
        },
        "elapsed_s": round(time.time() - started, 1),
        "rows": [
            {
                "name": r.name,
                "description": r.description,
                "binary": str(r.tool.path) if r.tool and r.tool.path else None,
                "version": r.tool.version if r.tool and r.tool.path else None,
                "skipped": r.skipped,
                "errors": r.errors,
                "mtu": next((s["mtu"] for s in r.samples if s), None),
                "samples": [s for s in r.samples if s is not None],
                "summary": summarize([s for s in r.samples if s is not None]),
            }
            for r in rows
        ],
        "ratios": ratios,
    }


def _jsonable(value: Any) -> Any:
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# -- printing ----------------------------------------------------------------------------------------------

#: Columns of the two tables: (heading, section, figure, format).
TABLES: tuple[tuple[str, tuple[tuple[str, str, str, str], ...]], ...] = (
    (
        "throughput and CPU",
        (
            ("Gbit/s a→b", "forward", "gbit_s", ".2f"),
            ("Gbit/s b→a", "reverse", "gbit_s", ".2f"),
            ("Gbit/s -P 4", "parallel", "gbit_s", ".2f"),
            ("CPU-s/Gbit a→b", "forward", "cpu_s_per_gbit", ".2f"),
            ("CPU-s/Gbit b→a", "reverse", "cpu_s_per_gbit", ".2f"),
            ("CPU-s/Gbit -P 4", "parallel", "cpu_s_per_gbit", ".2f"),
        ),
    ),
    (
        "TCP retransmits of the sender and ping RTT (ms)",
        (
            ("retr. a→b", "forward", "retransmits", ".0f"),
            ("retr. b→a", "reverse", "retransmits", ".0f"),
            ("retr. -P 4", "parallel", "retransmits", ".0f"),
            ("idle p50", "ping_idle", "p50_ms", ".3f"),
            ("idle p99", "ping_idle", "p99_ms", ".3f"),
            ("loaded p50", "ping_loaded", "p50_ms", ".2f"),
            ("loaded p99", "ping_loaded", "p99_ms", ".2f"),
            ("loaded loss %", "ping_loaded", "loss_pct", ".1f"),
        ),
    ),
)


def cell(s: dict[str, float] | None, fmt: str, suffix: str = "", sep: str = " ") -> str:
    """``median (min–max)`` (just the median for one round); "–" for no value."""
    if s is None:
        return "–"
    text = f"{s['median']:{fmt}}{suffix}"
    if s["n"] > 1:
        text += f"{sep}({s['min']:{fmt}}–{s['max']:{fmt}})"
    return text


def table_rows(
    data: dict[str, Any], columns: tuple[tuple[str, str, str, str], ...], sep: str
) -> list[list[str]]:
    """The body of one table: a line per measured row, then a line per ratio (figures it has)."""
    lines = []
    for row in data["rows"]:
        if row["skipped"] or not row["samples"]:
            continue
        summary = row["summary"]
        lines.append(
            [row["name"], str(row["mtu"])]
            + [cell(summary.get(sec, {}).get(key), fmt, sep=sep) for _, sec, key, fmt in columns]
        )
    for name, ratio in data["ratios"].items():
        if ratio is None:
            continue
        lines.append(
            [f"**{name}**", ""]
            + [
                cell(ratio.get(f"{sec}.{key}"), ".2f", "x", sep) if f"{sec}.{key}" in ratio else ""
                for _, sec, key, _f in columns
            ]
        )
    return lines


def print_tables(data: dict[str, Any]) -> None:
    """The two tables with rich, then the binaries used and the skipped rows with their reasons."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    s = data["settings"]
    measured = any(row["samples"] for row in data["rows"])
    for title, columns in TABLES if measured else ():
        table = Table(
            title=f"{title}: median (min–max) of {s['rounds']} round(s), {s['seconds']} s iperf3 runs",
            title_justify="left",
        )
        table.add_column("", justify="left", no_wrap=True)
        for heading in ("MTU", *(c[0] for c in columns)):
            table.add_column(heading, justify="right")
        for line in table_rows(data, columns, sep="\n"):
            name = line[0]
            if name.startswith("**"):
                name = f"[bold]{name.strip('*')}[/bold]"
            table.add_row(name, *line[1:])
        console.print(table)
    print_notes(data, console.print)


def print_notes(data: dict[str, Any], out: Callable[[str], None]) -> None:
    """Binaries and versions of the peers, skipped rows with their reasons, failed rounds."""
    for row in data["rows"]:
        if row["binary"]:
            out(f"{row['name']}: {row['binary']} ({row['version']})")
    for row in data["rows"]:
        if row["skipped"]:
            out(f"{row['name']} skipped: {row['skipped']}")
        for err in row["errors"]:
            out(f"{row['name']} failed: {err}")


def print_markdown(data: dict[str, Any]) -> None:
    """The two tables as GitHub markdown (for the README), with the run's date, commit and settings."""
    s = data["settings"]
    print(
        f"Run on {data['date']} at commit {data['commit']}, kernel {data['machine']['kernel']}, "
        f"{data['machine']['cpus']} CPUs; {s['rounds']} alternating round(s), {s['seconds']} s per iperf3 "
        "run, "
        f"MTU {s['mtu']}; median (min–max).\n"
    )
    for title, columns in TABLES:
        print(f"{title[0].upper()}{title[1:]}:\n")
        headings = ["", "MTU", *(c[0] for c in columns)]
        print("| " + " | ".join(headings) + " |")
        print("|---|" + "---:|" * (len(headings) - 1))
        for line in table_rows(data, columns, sep=" "):
            print("| " + " | ".join(line) + " |")
        print()
    print_notes(data, lambda text: print(f"- {text}"))


# -- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over all rows (default 3)")
    p.add_argument("--seconds", type=int, default=10, help="length of each iperf3 run, s (default 10)")
    p.add_argument("--mtu", type=int, default=1420, help="tunnel MTU (default 1420)")
    p.add_argument("--only", help="comma-separated rows to measure (default: all)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--markdown", action="store_true", help="print markdown tables (for the README)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long check: 1 round, 1 s iperf3 runs, 20 pings, only peers already built",
    )
    p.add_argument(
        "--build-tools",
        action="store_true",
        help=f"build the pinned peers into {bench_cache_dir()} ($TAILPY_BENCH_CACHE) and exit",
    )
    args = p.parse_args(argv)

    if args.build_tools:
        for tool in build_tools(build=True)[1:]:
            print(
                f"{tool.name}: {tool.path} ({tool.version})" if tool.path else f"{tool.name}: {tool.reason}"
            )
        return 0

    rounds, settings = args.rounds, Settings(args.seconds, args.mtu, 200, 4)
    if args.smoke:
        rounds, settings = 1, Settings(1, args.mtu, 20, 2)
    if rounds < 1 or settings.seconds < 1:
        p.error("--rounds and --seconds must be at least 1")

    rows = make_rows(build=not args.smoke)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            p.error(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in wanted]
    base = unavailable_reason() or missing_tools("iperf3", "ping", "wg", "ss")
    for row in rows:
        if base and not row.skipped:
            row.skipped = base

    started, commit = time.time(), git_commit()
    measured = [r for r in rows if not r.skipped]
    for n in range(1, rounds + 1):
        for row in measured:
            print(f"round {n}/{rounds}: {row.name} ({settings.seconds} s per iperf3 run)...", file=sys.stderr)
            try:
                row.samples.append(measure(row, settings))
            except TailpyError as e:
                row.errors.append(f"round {n}: {e}")
                row.samples.append(None)  # keeps rounds aligned for the ratios
    data = _jsonable(report(rows, settings, rounds, args.smoke, commit, started))
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.markdown:
        print_markdown(data)
    else:
        print_tables(data)
    if not measured:
        reasons = sorted({r.skipped for r in rows if r.skipped})
        print(f"throughput.py: no row can run here: {'; '.join(reasons)}", file=sys.stderr)
        return SKIPPED
    return 0 if all(not r.errors for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
